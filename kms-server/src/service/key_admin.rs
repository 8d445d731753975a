//! `kms.v1.KeyAdmin`: officers create, read and list keys.
//!
//! Creation order: a creation intent naming the object's `CKA_ID` is made durable, then the HSM
//! object is made, then the store row is committed (deleting the intent in the same transaction).
//! A crash in between leaves at worst an object no row names but an intent does, which start-up
//! reconciliation destroys once the audit trail shows the request was never acknowledged; never a
//! row whose key is missing. If the row cannot be written the object is destroyed again.
#![forbid(unsafe_code)]

use kms_proto::v1 as pb;
use kms_proto::v1::key_admin_server::KeyAdmin;
use tonic::{Request, Response, Status};

use super::key_lifecycle::{abandon_version_object, make_version_object, Change, NewVersion, Origin, Transition};
use super::{validate_key_name, AppState};
use crate::authz::AdminAction;
use crate::classification::{Classification, LevelRules};
use crate::ids::{KeyId, KeyPurpose, ObjectId};
use crate::status::ApiError;
use crate::store::{KeyFilter, KeyRecord, KeyState, StoreError, VersionRecord};

pub use super::key_lifecycle::unix_now;

pub struct KeyAdminService {
    pub(super) state: AppState,
}

impl KeyAdminService {
    pub fn new(state: AppState) -> Self {
        KeyAdminService { state }
    }

    async fn hsm_health(&self, request: Request<pb::GetHsmHealthRequest>) -> Result<pb::HsmHealth, ApiError> {
        let caller = self.state.caller(&request)?;
        self.state.policy.authorize_health_read(&caller)?;
        let h = self.state.hsm.health();
        let token = self.state.hsm.token();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(pb::HsmHealth {
            state: match h.state {
                crate::hsm::HsmState::Ready => pb::HsmState::Ready,
                crate::hsm::HsmState::Lost => pb::HsmState::Lost,
            } as i32,
            token_label: crate::bounded::owned(&token.label, crate::bounded::NAME),
            token_serial: crate::bounded::owned(&token.serial, crate::bounded::NAME),
            generation: h.generation,
            reconnects: h.reconnects,
            last_error: h.last_error.unwrap_or_default(),
            last_error_unix: h.last_error_unix.unwrap_or(0),
            lost_since_unix: h.lost_since_unix.unwrap_or(0),
            pools: vec![
                pb::HsmSessionPool { name: "request".into(), sessions: count(h.request_sessions), in_flight: count(h.request_in_flight) },
                pb::HsmSessionPool { name: "admin".into(), sessions: 1, in_flight: count(h.admin_in_flight) },
            ],
        })
    }

    async fn create(&self, request: Request<pb::CreateKeyRequest>) -> Result<pb::Key, ApiError> {
        let caller = self.state.caller(&request)?;
        let req = request.into_inner();
        validate_key_name(&req.name)?;
        let level = Classification::from_proto(req.classification)
            .ok_or_else(|| ApiError::invalid("classification", "must be one of the six levels"))?;
        let purpose = match pb::KeyPurpose::try_from(req.purpose) {
            Ok(pb::KeyPurpose::Unspecified) if level.is_state_secret() => KeyPurpose::HsmEncrypt,
            Ok(pb::KeyPurpose::Unspecified) => KeyPurpose::Envelope,
            Ok(pb::KeyPurpose::Envelope) => KeyPurpose::Envelope,
            Ok(pb::KeyPurpose::HsmEncrypt) => KeyPurpose::HsmEncrypt,
            Err(_) => return Err(ApiError::invalid("purpose", "unknown purpose")),
        };
        if req.rotation_period_days > 3650 {
            return Err(ApiError::invalid("rotation_period_days", "must be at most 3650"));
        }
        let grant = self
            .state
            .policy
            .authorize_admin(&caller, AdminAction::CreateKey { level, purpose }, Some(&req.name))?;

        // A retry of an idempotent creation is answered with the key the first attempt made.
        let idempotent = if req.idempotency_key.is_empty() {
            None
        } else {
            if req.idempotency_key.len() > crate::store::MAX_IDEMPOTENCY_KEY || req.idempotency_key.chars().any(char::is_control) {
                return Err(ApiError::invalid("idempotency_key", "must be 1 to 64 characters, none of them control characters"));
            }
            let hash = create_request_hash(&req.name, level, purpose, req.rotation_period_days);
            if let Some(done) = self.idempotent_replay(&caller.profile().identity, &req.idempotency_key, &hash).await? {
                return Ok(key_to_proto(&grant.reveal(done)?, self.state.policy.rules()));
            }
            Some(hash)
        };

        let id = KeyId::random().map_err(|_| ApiError::Internal("system random generator failed"))?;
        crate::audit::facts::note_key(&req.name, level);
        // The name check (a read) and the `begun` record do not depend on each other, so they run
        // together; a taken name then shows in the trail as `begun` followed by its refusal.
        let name = req.name.clone();
        let (existing, intent) =
            tokio::join!(self.state.store(move |s| s.key_by_name(&name)), crate::audit::record_intent(&self.state.audit));
        intent?;
        if existing?.is_some() {
            return Err(ApiError::AlreadyExists(req.name));
        }

        let now = unix_now();
        let object_id = ObjectId::for_version(id, 1);
        let record = KeyRecord {
            id,
            name: req.name,
            classification: level,
            purpose,
            state: KeyState::Enabled,
            primary_version: 1,
            rotation_period_days: req.rotation_period_days,
            created_at: now,
            rotated_at: now,
            destroy_at: None,
            revision: 1,
            versions: vec![VersionRecord { version: 1, object_id: object_id.clone(), state: KeyState::Enabled, created_at: now, destroy_at: None }],
        };
        let origin = Origin::of_request()?;
        let new = NewVersion { key_id: id, name: &record.name, level, purpose, version: 1, created_at: now };
        // The token key (with its intent first) and the row's MAC do not depend on each other: the
        // admin session writes the object while a request-path session computes the MAC. A MAC of a
        // row that is never stored is harmless.
        let (created, sealed) = tokio::join!(make_version_object(&self.state, &new, &origin), self.state.keyauth.seal(&record));
        created?;
        let sealed = match sealed {
            Ok(mac) => mac,
            Err(e) => {
                abandon_version_object(&self.state, &object_id).await;
                return Err(e.into());
            }
        };
        let row = record.clone();
        let inserted = match idempotent {
            None => self.state.store(move |s| s.insert_key(&row, &sealed)).await,
            Some(request_hash) => {
                let idem = crate::store::IdempotencyRecord {
                    caller: caller.profile().identity.clone(),
                    idem_key: req.idempotency_key.clone(),
                    rpc: "CreateKey".to_owned(),
                    request_hash,
                    key_id: id,
                    created_at: now,
                };
                match self.state.keyauth.seal_idempotency(&idem).await {
                    Ok(idem_mac) => self.state.store(move |s| s.insert_key_idempotent(&row, &sealed, &idem, &idem_mac)).await,
                    Err(e) => Err(e.into()),
                }
            }
        };
        if let Err(e) = inserted {
            // Not committed, so not acknowledged: the object must not outlive this call (if it
            // cannot be destroyed now, its intent lets start-up reconciliation do it).
            abandon_version_object(&self.state, &object_id).await;
            // The same idempotent request, made meanwhile on another server, may have won.
            if let (Some(hash), ApiError::Store(StoreError::DuplicateName { .. })) = (&idempotent, &e) {
                if let Some(done) = self.idempotent_replay(&caller.profile().identity, &req.idempotency_key, hash).await? {
                    return Ok(key_to_proto(&grant.reveal(done)?, self.state.policy.rules()));
                }
            }
            return Err(match e {
                ApiError::Store(StoreError::DuplicateName { name }) => ApiError::AlreadyExists(name),
                other => other,
            });
        }
        tracing::info!(key = %record.name, level = %level, purpose = %purpose, "key created");
        Ok(key_to_proto(&record, self.state.policy.rules()))
    }

    /// The key an earlier request of `caller` under `idem_key` made, if there was one and it was
    /// this same request; another request under the same idempotency key is refused.
    async fn idempotent_replay(&self, caller: &str, idem_key: &str, hash: &[u8; 32]) -> Result<Option<crate::authz::LoadedKey>, ApiError> {
        let (c, k) = (caller.to_owned(), idem_key.to_owned());
        let Some(stored) = self.state.store(move |s| s.idempotency_record(&c, &k)).await? else { return Ok(None) };
        let done = self.state.keyauth.verify_idempotency(stored).await?;
        if done.rpc != "CreateKey" || done.request_hash != *hash {
            return Err(ApiError::invalid(
                "idempotency_key",
                "was already used by this caller for another request (other fields); use a new key for a new request",
            ));
        }
        let key = self.state.key_by_id(done.key_id).await?;
        tracing::info!(key = %key.name(), "an idempotent key creation was retried: answered with the key the first attempt made");
        Ok(Some(key))
    }

    async fn get(&self, request: Request<pb::GetKeyRequest>) -> Result<pb::Key, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_admin(&caller, AdminAction::ReadKeys, Some(&request.get_ref().name))?;
        let key = grant.reveal(self.state.key_by_name(&request.get_ref().name).await?)?;
        Ok(key_to_proto(&key, self.state.policy.rules()))
    }

    async fn list(&self, request: Request<pb::ListKeysRequest>) -> Result<pb::ListKeysResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_admin(&caller, AdminAction::ReadKeys, None)?;
        let req = request.into_inner();
        let classification = match req.classification {
            0 => None,
            v => Some(
                Classification::from_proto(v)
                    .ok_or_else(|| ApiError::invalid("classification", "unknown level"))?,
            ),
        };
        if req.name_prefix.len() > 64 {
            return Err(ApiError::invalid("name_prefix", "must be at most 64 characters"));
        }
        let filter = KeyFilter {
            classification,
            name_prefix: (!req.name_prefix.is_empty()).then_some(req.name_prefix),
        };
        let listing = self.state.keys(filter).await?;
        let rules = self.state.policy.rules();
        // Only the keys the officer is allowed to see.
        let refused = listing
            .refused
            .into_iter()
            .filter(|r| grant.allows_key(&r.key))
            .map(|r| pb::RefusedKey { key: crate::bounded::owned(&r.key, crate::bounded::NAME), reason: r.reason })
            .collect();
        Ok(pb::ListKeysResponse { keys: grant.visible(listing.keys).iter().map(|k| key_to_proto(k, rules)).collect(), refused })
    }
}

#[tonic::async_trait]
impl KeyAdmin for KeyAdminService {
    async fn create_key(&self, request: Request<pb::CreateKeyRequest>) -> Result<Response<pb::Key>, Status> {
        let key = Some(request.get_ref().name.clone());
        self.state.respond("CreateKey", key, request, |r| self.create(r)).await
    }

    async fn get_key(&self, request: Request<pb::GetKeyRequest>) -> Result<Response<pb::Key>, Status> {
        let key = Some(request.get_ref().name.clone());
        self.state.respond("GetKey", key, request, |r| self.get(r)).await
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let key = None;
        self.state.respond("ListKeys", key, request, |r| self.list(r)).await
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::KeyChangeResponse>, Status> {
        let key = Some(request.get_ref().name.clone());
        self.state.respond("RotateKey", key, request, |r| self.rotate(r)).await
    }

    async fn set_rotation_schedule(
        &self,
        request: Request<pb::SetRotationScheduleRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        let key = Some(request.get_ref().name.clone());
        self.state.respond("SetRotationSchedule", key, request, |r| self.schedule(r)).await
    }

    async fn enable_key(&self, request: Request<pb::SetKeyStateRequest>) -> Result<Response<pb::KeyChangeResponse>, Status> {
        let key = request.get_ref().name.clone();
        self.state
            .respond("EnableKey", Some(key.clone()), request, |r| async move {
                self.change(&r, &key, Change::State(Transition::Enable)).await
            })
            .await
    }

    async fn disable_key(
        &self,
        request: Request<pb::SetKeyStateRequest>,
    ) -> Result<Response<pb::KeyChangeResponse>, Status> {
        let key = request.get_ref().name.clone();
        self.state
            .respond("DisableKey", Some(key.clone()), request, |r| async move {
                self.change(&r, &key, Change::State(Transition::Disable)).await
            })
            .await
    }

    async fn enable_key_version(
        &self,
        request: Request<pb::SetKeyVersionStateRequest>,
    ) -> Result<Response<pb::KeyChangeResponse>, Status> {
        let (key, v) = (request.get_ref().name.clone(), request.get_ref().version);
        self.state
            .respond("EnableKeyVersion", Some(key.clone()), request, |r| async move {
                self.change(&r, &key, Change::State(Transition::EnableVersion(v))).await
            })
            .await
    }

    async fn disable_key_version(
        &self,
        request: Request<pb::SetKeyVersionStateRequest>,
    ) -> Result<Response<pb::KeyChangeResponse>, Status> {
        let (key, v) = (request.get_ref().name.clone(), request.get_ref().version);
        self.state
            .respond("DisableKeyVersion", Some(key.clone()), request, |r| async move {
                self.change(&r, &key, Change::State(Transition::DisableVersion(v))).await
            })
            .await
    }

    async fn schedule_key_destruction(
        &self,
        request: Request<pb::KeyTarget>,
    ) -> Result<Response<pb::KeyChangeResponse>, Status> {
        let (key, v) = (request.get_ref().name.clone(), request.get_ref().version);
        let t = if v == 0 { Transition::Destroy } else { Transition::DestroyVersion(v) };
        self.state
            .respond("ScheduleKeyDestruction", Some(key.clone()), request, |r| async move {
                self.change(&r, &key, Change::State(t)).await
            })
            .await
    }

    async fn list_unknown_objects(
        &self,
        request: Request<pb::ListUnknownObjectsRequest>,
    ) -> Result<Response<pb::ListUnknownObjectsResponse>, Status> {
        self.state.respond("ListUnknownObjects", None, request, |r| self.list_unknown(r)).await
    }

    async fn adopt_objects(&self, request: Request<pb::AdoptObjectsRequest>) -> Result<Response<pb::AdoptObjectsResponse>, Status> {
        self.state.respond("AdoptObjects", None, request, |r| self.adopt(r)).await
    }

    async fn destroy_unknown_object(
        &self,
        request: Request<pb::DestroyUnknownObjectRequest>,
    ) -> Result<Response<pb::KeyChangeResponse>, Status> {
        self.state.respond("DestroyUnknownObject", None, request, |r| self.destroy_unknown_request(r)).await
    }

    async fn get_hsm_health(&self, request: Request<pb::GetHsmHealthRequest>) -> Result<Response<pb::HsmHealth>, Status> {
        self.state.respond("GetHsmHealth", None, request, |r| self.hsm_health(r)).await
    }

    async fn cancel_key_destruction(&self, request: Request<pb::KeyTarget>) -> Result<Response<pb::Key>, Status> {
        let (key, v) = (request.get_ref().name.clone(), request.get_ref().version);
        let t = if v == 0 { Transition::CancelDestroy } else { Transition::CancelDestroyVersion(v) };
        self.state
            .respond("CancelKeyDestruction", Some(key.clone()), request, |r| async move { self.enable(&r, &key, t).await })
            .await
    }
}

/// The wire form of a key; `rules` give the level's default rotation period.
pub fn key_to_proto(k: &KeyRecord, rules: &LevelRules) -> pb::Key {
    let next_rotation_at_unix = match k.state {
        KeyState::Enabled => k.rotated_at.saturating_add(i64::from(effective_rotation_days(k, rules)) * 86_400),
        _ => 0,
    };
    pb::Key {
        id: k.id.to_hex(),
        name: k.name.clone(),
        classification: k.classification.to_proto() as i32,
        purpose: k.purpose.to_proto() as i32,
        state: state_to_proto(k.state) as i32,
        primary_version: k.primary_version,
        versions: k
            .versions
            .iter()
            .map(|v| pb::KeyVersion {
                version: v.version,
                state: state_to_proto(v.state) as i32,
                created_at_unix: v.created_at,
                destroy_at_unix: v.destroy_at.unwrap_or(0),
            })
            .collect(),
        created_at_unix: k.created_at,
        rotation_period_days: k.rotation_period_days,
        rotated_at_unix: k.rotated_at,
        next_rotation_at_unix,
        destroy_at_unix: k.destroy_at.unwrap_or(0),
    }
}

/// The key's rotation period in days: its own, or its level's default.
pub fn effective_rotation_days(k: &KeyRecord, rules: &LevelRules) -> u32 {
    if k.rotation_period_days > 0 {
        k.rotation_period_days
    } else {
        rules.get(k.classification).rotation_days
    }
}

fn state_to_proto(s: KeyState) -> pb::KeyState {
    match s {
        KeyState::Enabled => pb::KeyState::Enabled,
        KeyState::Disabled => pb::KeyState::Disabled,
        KeyState::PendingDestruction => pb::KeyState::PendingDestruction,
        KeyState::Destroyed => pb::KeyState::Destroyed,
    }
}

/// What makes two CreateKey requests the same request: its fields, the idempotency key aside.
fn create_request_hash(name: &str, level: Classification, purpose: KeyPurpose, rotation_days: u32) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"kms CreateKey v1\0");
    h.update((name.len() as u32).to_be_bytes());
    h.update(name.as_bytes());
    h.update([level.to_byte()]);
    h.update(purpose.as_str().as_bytes());
    h.update(b"\0");
    h.update(rotation_days.to_be_bytes());
    h.finalize().into()
}
