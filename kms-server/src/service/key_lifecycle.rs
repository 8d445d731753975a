//! Key lifecycle for officers: rotate, set the rotation schedule, enable, disable, schedule and
//! cancel destruction, for whole keys and single versions; and the destruction itself when a
//! waiting period ends. The state machine is in ARCHITECTURE.md ("Key lifecycle").
//!
//! Every change is a read-modify-write of one key row under one process-wide lifecycle lock: load
//! and authenticate the row, build the next record with [`transition`] (a pure function that holds
//! every precondition), seal it with the HSM, and write it only if the row is still at the revision
//! read (`ABORTED` otherwise, e.g. another server process sharing the store).
//!
//! Crash ordering (invariant 6):
//! - rotation and creation make the HSM object *before* committing the row that names it, so a crash
//!   leaves at worst an object no row names (start-up reconciliation destroys it; no blob can refer
//!   to it because no blob was made before the commit);
//! - destruction commits the DESTROYED tombstone *before* destroying the HSM object, so a crash
//!   leaves at worst an object whose version is already refused (reconciliation destroys it);
//! - an approved change and its APPROVED request are one transaction.
#![forbid(unsafe_code)]

use kms_audit::Outcome;
use kms_proto::v1 as pb;
use tonic::Request;

use super::approvals::{approval_to_proto, file_approval};
use super::key_admin::{key_to_proto, KeyAdminService};
use super::AppState;
use crate::authz::{Approval, Authorized, ChangeGrant, KeyChange};
use crate::hsm::HsmError;
use crate::ids::{KeyId, ObjectId};
use crate::status::ApiError;
use crate::store::{ApprovalAction, ApprovalRecord, KeyRecord, KeyState, VersionRecord};

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A change to a key's state (everything but rotation, which also makes an HSM object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Enable,
    Disable,
    /// Schedule the destruction of the key.
    Destroy,
    /// Take a PENDING_DESTRUCTION key back to DISABLED.
    CancelDestroy,
    EnableVersion(u32),
    DisableVersion(u32),
    DestroyVersion(u32),
    CancelDestroyVersion(u32),
}

/// A change that may need a second officer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Rotate,
    State(Transition),
}

impl Change {
    pub fn key_change(self) -> KeyChange {
        match self {
            Change::Rotate => KeyChange::Rotate,
            Change::State(t) => match t {
                Transition::Enable => KeyChange::Enable,
                Transition::Disable => KeyChange::Disable,
                Transition::Destroy => KeyChange::Destroy,
                Transition::CancelDestroy | Transition::CancelDestroyVersion(_) => KeyChange::CancelDestroy,
                Transition::EnableVersion(_) => KeyChange::EnableVersion,
                Transition::DisableVersion(_) => KeyChange::DisableVersion,
                Transition::DestroyVersion(_) => KeyChange::DestroyVersion,
            },
        }
    }

    /// The approval action that stands for this change, for the changes that can need one.
    pub fn approval_action(self) -> Option<(ApprovalAction, u32)> {
        match self {
            Change::Rotate => Some((ApprovalAction::RotateKey, 0)),
            Change::State(Transition::Disable) => Some((ApprovalAction::DisableKey, 0)),
            Change::State(Transition::Destroy) => Some((ApprovalAction::DestroyKey, 0)),
            Change::State(Transition::DisableVersion(v)) => Some((ApprovalAction::DisableVersion, v)),
            Change::State(Transition::DestroyVersion(v)) => Some((ApprovalAction::DestroyVersion, v)),
            Change::State(Transition::Enable) => Some((ApprovalAction::EnableKey, 0)),
            Change::State(Transition::EnableVersion(v)) => Some((ApprovalAction::EnableVersion, v)),
            Change::State(_) => None,
        }
    }

    pub fn from_approval(action: ApprovalAction, version: u32) -> Change {
        match action {
            ApprovalAction::RotateKey => Change::Rotate,
            ApprovalAction::DisableKey => Change::State(Transition::Disable),
            ApprovalAction::DestroyKey => Change::State(Transition::Destroy),
            ApprovalAction::DisableVersion => Change::State(Transition::DisableVersion(version)),
            ApprovalAction::DestroyVersion => Change::State(Transition::DestroyVersion(version)),
            ApprovalAction::EnableKey => Change::State(Transition::Enable),
            ApprovalAction::EnableVersion => Change::State(Transition::EnableVersion(version)),
        }
    }
}

/// The record after `t`, or why `t` is not allowed from the key's current state. `Ok(None)` when the
/// key is already where `t` leads (nothing to write). `wait` is the destruction waiting period.
pub fn transition(key: &KeyRecord, t: Transition, now: i64, wait: i64) -> Result<Option<KeyRecord>, ApiError> {
    let name = &key.name;
    let refuse = |m: String| Err(ApiError::Precondition(m));
    let mut next = key.clone();
    match t {
        Transition::Enable | Transition::Disable => {
            let target = if t == Transition::Enable { KeyState::Enabled } else { KeyState::Disabled };
            if key.state == target {
                return Ok(None);
            }
            match key.state {
                KeyState::Enabled | KeyState::Disabled => next.state = target,
                KeyState::PendingDestruction => {
                    return refuse(format!(
                        "key {name} is PENDING_DESTRUCTION; cancel the destruction first (it then becomes DISABLED)"
                    ))
                }
                KeyState::Destroyed => return refuse(format!("key {name} is DESTROYED; nothing can change it")),
            }
        }
        Transition::Destroy => match key.state {
            KeyState::PendingDestruction => return Ok(None),
            KeyState::Destroyed => return refuse(format!("key {name} is already DESTROYED")),
            KeyState::Enabled | KeyState::Disabled => {
                next.state = KeyState::PendingDestruction;
                next.destroy_at = Some(now.saturating_add(wait));
            }
        },
        Transition::CancelDestroy => match key.state {
            KeyState::PendingDestruction => {
                next.state = KeyState::Disabled;
                next.destroy_at = None;
            }
            other => return refuse(format!("key {name} is {other}, not PENDING_DESTRUCTION; there is nothing to cancel")),
        },
        Transition::EnableVersion(v)
        | Transition::DisableVersion(v)
        | Transition::DestroyVersion(v)
        | Transition::CancelDestroyVersion(v) => {
            if !matches!(key.state, KeyState::Enabled | KeyState::Disabled) {
                return refuse(format!("key {name} is {}; its versions cannot change", key.state));
            }
            let current = key
                .version(v)
                .ok_or_else(|| ApiError::NotFound(format!("key {name} has no version {v}")))?
                .state;
            let slot = next.versions.iter_mut().find(|x| x.version == v).ok_or(ApiError::Internal("version vanished"))?;
            let primary = v == key.primary_version;
            match (t, current) {
                (Transition::EnableVersion(_), KeyState::Enabled)
                | (Transition::DisableVersion(_), KeyState::Disabled)
                | (Transition::DestroyVersion(_), KeyState::PendingDestruction) => return Ok(None),
                (_, KeyState::Destroyed) => return refuse(format!("key {name} version {v} is DESTROYED")),
                (Transition::DisableVersion(_) | Transition::DestroyVersion(_), _) if primary => {
                    return refuse(format!(
                        "version {v} is the primary version of key {name}; rotate the key first"
                    ))
                }
                (Transition::EnableVersion(_), KeyState::Disabled) => slot.state = KeyState::Enabled,
                (Transition::DisableVersion(_), KeyState::Enabled) => slot.state = KeyState::Disabled,
                (Transition::DestroyVersion(_), KeyState::Enabled | KeyState::Disabled) => {
                    slot.state = KeyState::PendingDestruction;
                    slot.destroy_at = Some(now.saturating_add(wait));
                }
                (Transition::CancelDestroyVersion(_), KeyState::PendingDestruction) => {
                    slot.state = KeyState::Disabled;
                    slot.destroy_at = None;
                }
                (Transition::EnableVersion(_) | Transition::DisableVersion(_), KeyState::PendingDestruction) => {
                    return refuse(format!(
                        "key {name} version {v} is PENDING_DESTRUCTION; cancel the destruction first"
                    ))
                }
                (Transition::CancelDestroyVersion(_), other) => {
                    return refuse(format!(
                        "key {name} version {v} is {other}, not PENDING_DESTRUCTION; there is nothing to cancel"
                    ))
                }
                _ => return Err(ApiError::Internal("unhandled version transition")),
            }
        }
    }
    Ok(Some(next))
}

/// The record after the destructions due at `now`, and the HSM objects to destroy once it is
/// committed. `None` when nothing is due.
pub fn due_destructions(key: &KeyRecord, now: i64) -> Option<(KeyRecord, Vec<ObjectId>)> {
    let mut next = key.clone();
    let mut objects = Vec::new();
    if key.state == KeyState::PendingDestruction && key.destroy_at.is_some_and(|t| t <= now) {
        next.state = KeyState::Destroyed;
        next.destroy_at = Some(now);
        for v in &mut next.versions {
            if v.state != KeyState::Destroyed {
                v.state = KeyState::Destroyed;
                v.destroy_at = Some(now);
                objects.push(v.object_id.clone());
            }
        }
    } else if matches!(key.state, KeyState::Enabled | KeyState::Disabled) {
        for v in &mut next.versions {
            if v.state == KeyState::PendingDestruction && v.destroy_at.is_some_and(|t| t <= now) {
                v.state = KeyState::Destroyed;
                v.destroy_at = Some(now);
                objects.push(v.object_id.clone());
            }
        }
    }
    (!objects.is_empty()).then_some((next, objects))
}

impl KeyAdminService {
    pub(super) async fn rotate(&self, request: Request<pb::RotateKeyRequest>) -> Result<pb::KeyChangeResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        self.request_change(&caller, &request.get_ref().name, Change::Rotate).await
    }

    pub(super) async fn schedule(&self, request: Request<pb::SetRotationScheduleRequest>) -> Result<pb::Key, ApiError> {
        let caller = self.state.caller(&request)?;
        let req = request.into_inner();
        if req.rotation_period_days > 3650 {
            return Err(ApiError::invalid("rotation_period_days", "must be at most 3650 (0 means the level's default)"));
        }
        let key = self.state.key_by_name(&req.name).await?;
        let grant = self.state.policy.authorize_key_change(&caller, key, KeyChange::SetSchedule)?;
        let _lock = self.state.lifecycle_lock.lock().await;
        let key = fresh(&self.state, &grant).await?;
        crate::audit::record_intent(&self.state.audit).await?;
        if key.state == KeyState::Destroyed {
            return Err(ApiError::Precondition(format!("key {} is DESTROYED", key.name)));
        }
        let mut next = key.clone();
        next.rotation_period_days = req.rotation_period_days;
        let saved = commit(&self.state, &key, next, None).await?;
        tracing::info!(key = %saved.name, days = saved.rotation_period_days, by = grant.caller().identity(), "rotation schedule set");
        Ok(key_to_proto(&saved, self.state.policy.rules()))
    }

    /// Enable a key, or a version when `version` is set. Never needs a second officer.
    pub(super) async fn enable(&self, caller_of: &Request<impl Sized>, name: &str, t: Transition) -> Result<pb::Key, ApiError> {
        let caller = self.state.caller(caller_of)?;
        let response = self.request_change(&caller, name, Change::State(t)).await?;
        response.key.ok_or(ApiError::Internal("a change answered without its key"))
    }

    pub(super) async fn change(
        &self,
        caller_of: &Request<impl Sized>,
        name: &str,
        change: Change,
    ) -> Result<pb::KeyChangeResponse, ApiError> {
        let caller = self.state.caller(caller_of)?;
        self.request_change(&caller, name, change).await
    }

    /// Authorises `change`; makes it, or files an approval request when the level needs two officers.
    async fn request_change(
        &self,
        caller: &crate::authz::Caller,
        name: &str,
        change: Change,
    ) -> Result<pb::KeyChangeResponse, ApiError> {
        let loaded = self.state.key_by_name(name).await?;
        let grant = self.state.policy.authorize_key_change(caller, loaded, change.key_change())?;
        let key = &grant.action().key;
        let rules = self.state.policy.rules();
        if grant.action().approval == Approval::SecondOfficerRequired {
            // Refuse now what could never be approved (e.g. destroying the primary version).
            check_possible(&self.state, key, change)?;
            let (action, version) = change.approval_action().ok_or(ApiError::Internal("approval for a plain change"))?;
            let approval = file_approval(&self.state, key, action, version, grant.caller().identity()).await?;
            return Ok(pb::KeyChangeResponse {
                key: Some(key_to_proto(key, rules)),
                pending_approval: Some(approval_to_proto(&approval, key)),
            });
        }
        let saved = apply_change(&self.state, &grant, change, None).await?;
        Ok(pb::KeyChangeResponse { key: Some(key_to_proto(&saved, rules)), pending_approval: None })
    }
}

/// Whether `change` could be made to `key` now (checked again when it is made).
fn check_possible(state: &AppState, key: &KeyRecord, change: Change) -> Result<(), ApiError> {
    match change {
        Change::Rotate if key.state != KeyState::Enabled => Err(ApiError::Precondition(format!(
            "key {} is {}; only ENABLED keys are rotated",
            key.name, key.state
        ))),
        Change::Rotate => Ok(()),
        Change::State(t) => transition(key, t, unix_now(), state.lifecycle.destruction_wait_seconds).map(|_| ()),
    }
}

/// Makes an authorised change under the lifecycle lock, reading the key afresh. `approval` is the
/// APPROVED request to commit with it, if the change was approved by a second officer.
pub async fn apply_change(
    state: &AppState,
    grant: &Authorized<ChangeGrant>,
    change: Change,
    approval: Option<ApprovalRecord>,
) -> Result<KeyRecord, ApiError> {
    if grant.action().approval == Approval::SecondOfficerRequired {
        return Err(ApiError::Internal("a change that needs a second officer was about to be made without one"));
    }
    let _lock = state.lifecycle_lock.lock().await;
    let key = fresh(state, grant).await?;
    crate::audit::record_intent(&state.audit).await?;
    let by = grant.caller().identity();
    match change {
        Change::Rotate => {
            let rotated = rotate_locked(state, key, approval, Origin::of_request()?).await?;
            tracing::info!(key = %rotated.name, version = rotated.primary_version, by, "key rotated");
            Ok(rotated)
        }
        Change::State(t) => match transition(&key, t, unix_now(), state.lifecycle.destruction_wait_seconds)? {
            Some(next) => {
                let saved = commit(state, &key, next, approval).await?;
                tracing::info!(key = %saved.name, change = ?t, state = %saved.state, by, "key lifecycle change");
                Ok(saved)
            }
            None => {
                if let Some(a) = approval {
                    super::approvals::record_decision(state, a).await?;
                }
                Ok(key)
            }
        },
    }
}

/// The authorised key read afresh (under the lifecycle lock).
async fn fresh(state: &AppState, grant: &Authorized<ChangeGrant>) -> Result<KeyRecord, ApiError> {
    let loaded = state.key_by_id(grant.action().key.id).await?;
    grant.action().fresh(loaded).ok_or(ApiError::Internal("the key read afresh is not the authorised one"))
}

/// Rotation by the schedule: the same as an officer's, under the same lock. `origin` is the
/// schedule's own audit record of the rotation.
pub async fn rotate_key(state: &AppState, key_id: KeyId, origin: Origin) -> Result<KeyRecord, ApiError> {
    let _lock = state.lifecycle_lock.lock().await;
    let key = state.key_by_id(key_id).await?.danger_open_for_server_task();
    rotate_locked(state, key, None, origin).await
}

/// The request (or server task) that makes an HSM object, as its creation intent names it: start-up
/// reconciliation reads the audit trail from `audit_seq` on to learn whether `request_id` was ever
/// acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub request_id: String,
    pub audit_seq: u64,
}

impl Origin {
    /// The request being served on this task (its `begun` record must be written first).
    pub fn of_request() -> Result<Origin, ApiError> {
        let facts = crate::audit::facts::current().ok_or(ApiError::Internal("a change made outside a request"))?;
        if !facts.intent_recorded {
            return Err(ApiError::Internal("an HSM object about to be made before its request's begun record"));
        }
        Ok(Origin { request_id: facts.request_id, audit_seq: facts.intent_seq })
    }
}

/// The key version an HSM object is made for.
pub struct NewVersion<'a> {
    pub key_id: KeyId,
    pub name: &'a str,
    pub level: crate::classification::Classification,
    pub purpose: crate::ids::KeyPurpose,
    pub version: u32,
    pub created_at: i64,
}

/// Makes the HSM object of a new key version: its creation intent is sealed and made durable
/// first, then the object is made with a label that carries its adoption record (see
/// `crate::object_label`). The caller commits the row that names it (which deletes the intent) or
/// calls [`abandon_version_object`].
///
/// An object with the same `CKA_ID` already on the token is never replaced: it is a version this
/// store does not know (restored from an older backup), with blobs that may depend on it.
pub async fn make_version_object(state: &AppState, v: &NewVersion<'_>, origin: &Origin) -> Result<ObjectId, ApiError> {
    let object_id = ObjectId::for_version(v.key_id, v.version);
    let adoption = crate::object_label::AdoptionRecord {
        key_id: v.key_id,
        version: v.version,
        name: v.name.to_owned(),
        level: v.level,
        purpose: v.purpose,
        created_at: v.created_at,
    };
    let intent = crate::store::IntentRecord {
        object_id: object_id.clone(),
        key_id: v.key_id,
        version: v.version,
        request_id: origin.request_id.clone(),
        audit_seq: origin.audit_seq,
        created_at: v.created_at,
        server: state.audit.server().to_owned(),
    };
    let (label_mac, intent_mac) = tokio::join!(state.keyauth.seal_adoption(&adoption), state.keyauth.seal_intent(&intent));
    let (label_mac, intent_mac) = (label_mac?, intent_mac?);
    let recorded = {
        let (intent, intent_mac) = (intent.clone(), intent_mac);
        state.store(move |s| s.record_intent(&intent, &intent_mac)).await
    };
    if let Err(ApiError::Store(crate::store::StoreError::InvalidRecord { .. })) = recorded {
        // An intent for this very object is on record: an earlier creation of this version that
        // failed when the HSM was lost (its request answered with a failure, its object perhaps
        // left behind). If the trail proves it, its debris goes, and the intent is recorded anew.
        crate::reconcile::sweep_abandoned(&state.store, &state.hsm, &state.keyauth, &state.audit, Some(&object_id))
            .await
            .map_err(|_| ApiError::Internal("the debris of an earlier creation could not be judged"))?;
        state.store(move |s| s.record_intent(&intent, &intent_mac)).await.map_err(|_| {
            ApiError::Precondition(format!(
                "version {} of key {} is being made by another request that is not finished; try again later",
                v.version, v.name
            ))
        })?;
    } else {
        recorded?;
    }
    let label = adoption.label(&label_mac);
    match state.hsm.create_key(&object_id, &label, v.level, v.purpose).await {
        Ok(()) => Ok(object_id),
        Err(e) => {
            // Errors the HSM layer raises before calling the token prove that nothing was made;
            // after any other, the object may exist (a network HSM that failed mid-call), and the
            // intent stays for start-up to judge.
            if matches!(e, HsmError::ObjectExists { .. } | HsmError::NotApproved { .. }) {
                let id = object_id.clone();
                if let Err(f) = state.store(move |s| s.forget_intent(&id)).await {
                    tracing::warn!(object = %object_id, error = %f, "could not delete the intent of an object that was never made; start-up will");
                }
            }
            Err(match e {
                HsmError::ObjectExists { .. } => ApiError::Precondition(format!(
                    "version {} of key {} is already on the token, but not in the key store (was the store restored \
                     from an older backup?); adopt it first (`kmsctl token adopt`), it is never replaced",
                    v.version, v.name
                )),
                other => other.into(),
            })
        }
    }
}

/// Destroys the object of a version whose row could not be committed (the request is not
/// acknowledged), then deletes its intent. If the object cannot be destroyed the intent stays, so
/// that start-up reconciliation destroys it.
pub async fn abandon_version_object(state: &AppState, object_id: &ObjectId) {
    match state.hsm.destroy_key(object_id).await {
        Ok(()) | Err(HsmError::ObjectNotFound { .. }) => {
            let id = object_id.clone();
            if let Err(e) = state.store(move |s| s.forget_intent(&id)).await {
                tracing::warn!(object = %object_id, error = %e, "could not delete the intent of a destroyed object; start-up will");
            }
        }
        Err(e) => {
            tracing::error!(object = %object_id, error = %e, "could not destroy the HSM object of a version whose row failed; start-up reconciliation will");
        }
    }
}

/// Makes a new primary version of an ENABLED key: the intent, the HSM object, then the row.
async fn rotate_locked(
    state: &AppState,
    key: KeyRecord,
    approval: Option<ApprovalRecord>,
    origin: Origin,
) -> Result<KeyRecord, ApiError> {
    if key.state != KeyState::Enabled {
        return Err(ApiError::Precondition(format!("key {} is {}; only ENABLED keys are rotated", key.name, key.state)));
    }
    let version = key
        .versions
        .iter()
        .map(|v| v.version)
        .max()
        .and_then(|v| v.checked_add(1))
        .ok_or(ApiError::Internal("key has no versions, or too many"))?;
    let now = unix_now();
    let new = NewVersion {
        key_id: key.id,
        name: &key.name,
        level: key.classification,
        purpose: key.purpose,
        version,
        created_at: now,
    };
    let object_id = make_version_object(state, &new, &origin).await?;
    let mut next = key.clone();
    next.versions.push(VersionRecord {
        version,
        object_id: object_id.clone(),
        state: KeyState::Enabled,
        created_at: now,
        destroy_at: None,
    });
    next.primary_version = version;
    next.rotated_at = now;
    match commit(state, &key, next, approval).await {
        Ok(saved) => Ok(saved),
        Err(e) => {
            // Not committed, so not acknowledged: the object must not outlive this call.
            abandon_version_object(state, &object_id).await;
            Err(e)
        }
    }
}

/// Destroys what is due at `now`: for each key, the tombstone is committed first, then the HSM
/// objects are destroyed. Returns the names of the keys changed.
pub async fn destroy_due(state: &AppState, now: i64) -> Result<Vec<String>, ApiError> {
    let mut done = Vec::new();
    let _lock = state.lifecycle_lock.lock().await;
    for key in state.keys(crate::store::KeyFilter::default()).await?.keys {
        let key = key.danger_open_for_server_task();
        let Some((next, objects)) = due_destructions(&key, now) else { continue };
        // Audited like a request: `begun` before the tombstone, the outcome after.
        let facts = crate::audit::server_facts("ScheduledDestruction", &key.name, key.classification, 0);
        state.audit.append(crate::audit::record(&facts, Outcome::Begun, 0, "")).await?;
        let saved = match commit(state, &key, next, None).await {
            Ok(saved) => saved,
            Err(e) => {
                let status = e.to_status(&facts.request_id);
                let _ = state.audit.append(crate::audit::record(&facts, Outcome::Failed, status.code() as i32, status.message())).await;
                return Err(e);
            }
        };
        for object in objects {
            match state.hsm.destroy_key(&object).await {
                Ok(()) | Err(HsmError::ObjectNotFound { .. }) => {}
                Err(e) => {
                    tracing::error!(key = %saved.name, object = %object, error = %e, "the tombstone is committed but the HSM object could not be destroyed; start-up reconciliation will destroy it");
                }
            }
        }
        tracing::warn!(key = %saved.name, state = %saved.state, "key material destroyed in the HSM");
        if let Err(e) = state.audit.append(crate::audit::record(&facts, Outcome::Ok, 0, "")).await {
            tracing::error!(key = %saved.name, error = %e, "the destruction is done but its outcome record could not be written; its begun record stands");
        }
        done.push(saved.name);
    }
    Ok(done)
}

/// Seals `next` (revision + 1) and writes it if the row is still at `current`'s revision; with
/// `approval`, the APPROVED request is written in the same transaction.
async fn commit(
    state: &AppState,
    current: &KeyRecord,
    mut next: KeyRecord,
    approval: Option<ApprovalRecord>,
) -> Result<KeyRecord, ApiError> {
    next.revision = current.revision + 1;
    let mac = state.keyauth.seal(&next).await?;
    let expected = current.revision;
    let row = next.clone();
    match approval {
        None => state.store(move |s| s.update_key(&row, &mac, expected)).await?,
        Some(a) => {
            let amac = state.keyauth.seal_approval(&a).await?;
            state.store(move |s| s.update_key_with_approval(&row, &mac, expected, &a, &amac)).await?
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classification::Classification;
    use crate::ids::KeyPurpose;

    fn key(versions: u32) -> KeyRecord {
        let id = KeyId([4; 16]);
        KeyRecord {
            id,
            name: "k".into(),
            classification: Classification::Personal,
            purpose: KeyPurpose::Envelope,
            state: KeyState::Enabled,
            primary_version: versions,
            rotation_period_days: 0,
            created_at: 0,
            rotated_at: 0,
            destroy_at: None,
            revision: 1,
            versions: (1..=versions)
                .map(|v| VersionRecord {
                    version: v,
                    object_id: ObjectId::for_version(id, v),
                    state: KeyState::Enabled,
                    created_at: 0,
                    destroy_at: None,
                })
                .collect(),
        }
    }

    fn precondition(r: Result<Option<KeyRecord>, ApiError>) -> String {
        match r {
            Err(ApiError::Precondition(m)) => m,
            other => panic!("expected a precondition error, got {other:?}"),
        }
    }

    #[test]
    fn key_states_follow_the_state_machine() {
        let k = key(1);
        assert_eq!(transition(&k, Transition::Enable, 10, 5).unwrap(), None);
        let disabled = transition(&k, Transition::Disable, 10, 5).unwrap().unwrap();
        assert_eq!(disabled.state, KeyState::Disabled);
        let pending = transition(&disabled, Transition::Destroy, 10, 5).unwrap().unwrap();
        assert_eq!((pending.state, pending.destroy_at), (KeyState::PendingDestruction, Some(15)));
        assert_eq!(transition(&pending, Transition::Destroy, 11, 5).unwrap(), None);
        assert!(precondition(transition(&pending, Transition::Enable, 10, 5)).contains("cancel the destruction first"));
        let cancelled = transition(&pending, Transition::CancelDestroy, 10, 5).unwrap().unwrap();
        assert_eq!((cancelled.state, cancelled.destroy_at), (KeyState::Disabled, None));
        assert!(precondition(transition(&k, Transition::CancelDestroy, 10, 5)).contains("nothing to cancel"));

        let (destroyed, objects) = due_destructions(&pending, 15).unwrap();
        assert!(due_destructions(&pending, 14).is_none());
        assert_eq!(destroyed.state, KeyState::Destroyed);
        assert!(destroyed.versions.iter().all(|v| v.state == KeyState::Destroyed && v.destroy_at == Some(15)));
        assert_eq!(objects, vec![ObjectId::for_version(k.id, 1)]);
        for t in [Transition::Enable, Transition::Disable, Transition::Destroy, Transition::CancelDestroy] {
            precondition(transition(&destroyed, t, 20, 5));
        }
        assert!(due_destructions(&destroyed, 100).is_none());
    }

    #[test]
    fn version_states_follow_the_state_machine() {
        let k = key(3);
        assert!(precondition(transition(&k, Transition::DisableVersion(3), 0, 5)).contains("rotate the key first"));
        assert!(precondition(transition(&k, Transition::DestroyVersion(3), 0, 5)).contains("rotate the key first"));
        assert!(matches!(transition(&k, Transition::DisableVersion(9), 0, 5), Err(ApiError::NotFound(_))));
        let d = transition(&k, Transition::DisableVersion(1), 0, 5).unwrap().unwrap();
        assert_eq!(d.version(1).unwrap().state, KeyState::Disabled);
        assert_eq!(transition(&d, Transition::DisableVersion(1), 0, 5).unwrap(), None);
        let p = transition(&d, Transition::DestroyVersion(1), 100, 5).unwrap().unwrap();
        assert_eq!((p.version(1).unwrap().state, p.version(1).unwrap().destroy_at), (KeyState::PendingDestruction, Some(105)));
        assert!(precondition(transition(&p, Transition::EnableVersion(1), 0, 5)).contains("cancel the destruction first"));
        let (gone, objects) = due_destructions(&p, 105).unwrap();
        assert_eq!(gone.state, KeyState::Enabled);
        assert_eq!(gone.version(1).unwrap().state, KeyState::Destroyed);
        assert_eq!(gone.version(2).unwrap().state, KeyState::Enabled);
        assert_eq!(objects, vec![ObjectId::for_version(k.id, 1)]);
        assert!(precondition(transition(&gone, Transition::EnableVersion(1), 0, 5)).contains("DESTROYED"));
        let back = transition(&p, Transition::CancelDestroyVersion(1), 0, 5).unwrap().unwrap();
        assert_eq!((back.version(1).unwrap().state, back.version(1).unwrap().destroy_at), (KeyState::Disabled, None));
    }
}
