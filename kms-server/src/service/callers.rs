//! The `Callers` service (officers): register, update, list and revoke calling systems, and manage
//! their recipient keys; and the start-up step that seeds the store with the configuration's
//! callers and loads every registration into the policy.
//!
//! A registration is a store row sealed by the HSM (`crate::keyauth`): one edited behind the
//! service's back is refused at start-up and never trusted. A change is written to the store, then
//! installed in the policy, so the next request is judged by it.
//!
//! Separation of duties (ARCHITECTURE.md): an officer never changes its own registration and never
//! manages a caller outside what it holds itself (clearance, system level, allowed keys), before or
//! after the change; registering or granting the officer or auditor role, raising a clearance and
//! revoking an officer or auditor file a request for a second officer instead of acting; an
//! identity holds one of officer and auditor at most, and an officer no other role. Must never let
//! an officer lock everyone out: the last active officer cannot be revoked or lose the role.
#![forbid(unsafe_code)]

use kms_proto::v1 as pb;
use kms_proto::v1::callers_server::Callers;
use prost::Message;
use tonic::{Request, Response, Status};

use super::approvals::{file_request, request_to_proto};
use super::key_lifecycle::unix_now;
use super::AppState;
use crate::authz::{check_roles, Authorized, CallerAdmin};
use crate::classification::Classification;
use crate::config::{CallerEntry, Role};
use crate::keyauth::KeyAuth;
use crate::status::ApiError;
use crate::store::{CallerRecord, RecipientKeyRecord, RequestKind, RequestRecord, Store, MAX_RECIPIENT_KEYS};

pub struct CallersService {
    state: AppState,
}

/// Registers the configured callers the store does not hold yet, then returns every registration
/// that authenticates. A forged row is logged and left out: that caller is refused as unknown.
pub async fn load_callers(store: &Store, keyauth: &KeyAuth, seeds: &[CallerEntry]) -> Result<Vec<CallerRecord>, ApiError> {
    let now = unix_now();
    for seed in seeds {
        let s = store.clone();
        let identity = seed.identity.clone();
        if tokio::task::spawn_blocking(move || s.caller_by_identity(&identity))
            .await
            .map_err(|_| ApiError::Internal("store task panicked"))??
            .is_some()
        {
            continue;
        }
        let mut roles = seed.roles.clone();
        roles.sort();
        roles.dedup();
        check_roles(&roles).map_err(|why| ApiError::invalid("roles", format!("caller {}: {why}", seed.identity)))?;
        let mut allowed_keys = seed.allowed_keys.clone();
        allowed_keys.sort();
        allowed_keys.dedup();
        let record = CallerRecord {
            identity: seed.identity.clone(),
            agency: seed.agency.clone(),
            name: seed.name.clone(),
            system_level: seed.system_level,
            clearance: seed.clearance,
            roles,
            allowed_keys,
            active: true,
            created_at: now,
            updated_at: now,
            revision: 1,
            recipient_keys: Vec::new(),
        };
        let mac = keyauth.seal_configured_caller(&record).await?;
        let s = store.clone();
        let row = record.clone();
        tokio::task::spawn_blocking(move || s.insert_caller(&row, &mac))
            .await
            .map_err(|_| ApiError::Internal("store task panicked"))??;
        tracing::info!(caller = %record.identity, "caller registered from the configuration");
    }
    authenticated_callers(store, keyauth).await
}

/// Every caller registration in the store that authenticates. A forged row is logged and left
/// out: that caller is refused as unknown.
pub async fn authenticated_callers(store: &Store, keyauth: &KeyAuth) -> Result<Vec<CallerRecord>, ApiError> {
    let s = store.clone();
    let stored = tokio::task::spawn_blocking(move || s.list_callers()).await.map_err(|_| ApiError::Internal("store task panicked"))??;
    let mut profiles = Vec::with_capacity(stored.len());
    for row in stored {
        match keyauth.verify_caller(row).await {
            Ok(r) => profiles.push(r),
            Err(crate::keyauth::KeyAuthError::ForgedCaller { identity }) => {
                tracing::error!(caller = %crate::bounded::text(&identity, crate::bounded::NAME), "caller registration failed authentication; the caller is refused");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(profiles)
}

/// How often the registry sync looks at the store's caller change counter.
pub const REGISTRY_SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Keeps the policy's registry equal to the store's: whenever the caller change counter moves (a
/// registration, change or revocation made by another server sharing the store, or by anyone
/// else), every registration is read and authenticated again and the registry replaced. So a
/// caller revoked on one server is refused on every server within [`REGISTRY_SYNC_EVERY`] plus
/// the store's change notification (a few milliseconds with PostgreSQL; at most its probe's poll
/// period). While the store or the HSM cannot be read, the registry is kept as it is and the sync
/// tries again. `seen` is the counter read before the registry was loaded.
pub fn spawn_registry_sync(state: AppState, probe: crate::store::ChangeProbe, mut seen: Option<i64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REGISTRY_SYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let now = probe.callers_version();
            if now.is_none() || now == seen {
                continue;
            }
            match authenticated_callers(&state.store, &state.keyauth).await {
                Ok(callers) => {
                    let (total, active) = (callers.len(), callers.iter().filter(|c| c.active).count());
                    state.policy.replace_callers(callers);
                    seen = now;
                    if failing {
                        tracing::info!("the caller registry can be read again");
                    }
                    failing = false;
                    tracing::debug!(callers = total, active, "caller registry reloaded after a change in the store");
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "the caller registry changed in the store but cannot be read; keeping the registry as it was and retrying");
                    }
                    failing = true;
                }
            }
        }
    })
}

impl CallersService {
    pub fn new(state: AppState) -> CallersService {
        CallersService { state }
    }

    async fn register(&self, request: Request<pb::RegisterCallerRequest>) -> Result<pb::CallerChangeResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_caller_admin(&caller)?;
        let wire = request.into_inner().caller.ok_or_else(|| ApiError::invalid("caller", "is required"))?;
        let now = unix_now();
        let record = validate(wire, now, now, 1, true)?;
        crate::audit::facts::note_subject(&format!("caller {}: registered as {}", record.identity, describe(&record)));
        grant.check_scope("register", &record)?;
        let identity = record.identity.clone();
        if self.state.store(move |s| s.caller_by_identity(&identity)).await?.is_some() {
            return Err(ApiError::Exists(format!("caller {} is already registered; use UpdateCaller", record.identity)));
        }
        if powers(&record.roles) {
            let approval = self.request(&grant, RequestKind::RegisterCaller, &record, None, 0).await?;
            return Ok(pb::CallerChangeResponse { caller: None, pending_approval: Some(approval) });
        }
        let mac = self.state.keyauth.seal_caller(&grant, &record).await?;
        crate::audit::record_intent(&self.state.audit).await?;
        let row = record.clone();
        self.state.store(move |s| s.insert_caller(&row, &mac)).await.map_err(|e| match e {
            ApiError::Store(crate::store::StoreError::DuplicateName { .. }) => {
                ApiError::Exists(format!("caller {} is already registered; use UpdateCaller", record.identity))
            }
            other => other,
        })?;
        self.state.policy.set_caller(record.clone());
        tracing::info!(caller = %record.identity, by = caller.identity(), "caller registered");
        Ok(pb::CallerChangeResponse { caller: Some(to_proto(&record)), pending_approval: None })
    }

    async fn update(&self, request: Request<pb::UpdateCallerRequest>) -> Result<pb::CallerChangeResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_caller_admin(&caller)?;
        let wire = request.into_inner().caller.ok_or_else(|| ApiError::invalid("caller", "is required"))?;
        let current = self.current(&crate::bounded::owned(&wire.identity, crate::bounded::NAME)).await?;
        grant.check_scope("change", &current)?;
        let mut next = validate(wire, current.created_at, unix_now().max(current.created_at), current.revision + 1, current.active)?;
        next.recipient_keys = current.recipient_keys.clone();
        crate::audit::facts::note_subject(&format!("caller {}: {}", next.identity, changes(&current, &next)));
        grant.check_scope("change", &next)?;
        if current.roles.contains(&Role::Officer) && !next.roles.contains(&Role::Officer) {
            self.keep_an_officer(&current.identity).await?;
        }
        let granted_power = next.roles.iter().any(|r| matches!(r, Role::Officer | Role::Auditor) && !current.roles.contains(r));
        if granted_power || next.clearance > current.clearance {
            let approval = self.request(&grant, RequestKind::UpdateCaller, &next, Some(&current), current.revision).await?;
            return Ok(pb::CallerChangeResponse { caller: Some(to_proto(&current)), pending_approval: Some(approval) });
        }
        let saved = self.write(&grant, &current, next).await?;
        Ok(pb::CallerChangeResponse { caller: Some(saved), pending_approval: None })
    }

    async fn revoke(&self, request: Request<pb::RevokeCallerRequest>) -> Result<pb::CallerChangeResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_caller_admin(&caller)?;
        let identity = crate::bounded::owned(&request.into_inner().identity, crate::bounded::NAME);
        crate::audit::facts::note_subject(&format!("caller {identity}: revoked"));
        if identity == caller.identity() {
            return Err(ApiError::Precondition("an officer cannot revoke their own registration".into()));
        }
        let current = self.current(&identity).await?;
        grant.check_scope("revoke", &current)?;
        if !current.active {
            return Err(ApiError::Precondition(format!("caller {identity} is already revoked")));
        }
        if current.roles.contains(&Role::Officer) {
            self.keep_an_officer(&identity).await?;
        }
        let mut next = current.clone();
        next.active = false;
        next.updated_at = unix_now().max(current.created_at);
        next.revision = current.revision + 1;
        if powers(&current.roles) {
            let approval = self.request(&grant, RequestKind::RevokeCaller, &next, Some(&current), current.revision).await?;
            return Ok(pb::CallerChangeResponse { caller: Some(to_proto(&current)), pending_approval: Some(approval) });
        }
        let saved = self.write(&grant, &current, next).await?;
        Ok(pb::CallerChangeResponse { caller: Some(saved), pending_approval: None })
    }

    async fn list(&self, request: Request<pb::ListCallersRequest>) -> Result<pb::ListCallersResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_caller_admin(&caller)?;
        let include_revoked = request.get_ref().include_revoked;
        let stored = self.state.store(|s| s.list_callers()).await?;
        let mut callers = Vec::with_capacity(stored.len());
        let mut refused = Vec::new();
        for row in stored {
            match self.state.keyauth.verify_caller(row).await {
                // Only the callers within the officer's own clearance, level and allowed keys (and
                // the officer itself).
                Ok(r) if (r.active || include_revoked) && (grant.sees(&r) || r.identity == caller.identity()) => {
                    callers.push(to_proto(&r))
                }
                Ok(_) => {}
                Err(crate::keyauth::KeyAuthError::ForgedCaller { identity }) => refused.push(pb::RefusedCaller {
                    identity,
                    reason: "its registration failed authentication: the store was changed outside the service".into(),
                }),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(pb::ListCallersResponse { callers, refused })
    }

    async fn add_recipient_key(&self, request: Request<pb::AddRecipientKeyRequest>) -> Result<pb::Caller, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_caller_admin(&caller)?;
        let req = request.into_inner();
        let point = parse_public_key(&req.public_key, &req.pem)?;
        let key = RecipientKeyRecord { public_key: point, added_at: unix_now() };
        let fingerprint = crate::ids::hex(&key.fingerprint());
        let current = self.current(&crate::bounded::owned(&req.identity, crate::bounded::NAME)).await?;
        crate::audit::facts::note_subject(&format!("caller {}: recipient key {fingerprint} added", current.identity));
        grant.check_scope("change", &current)?;
        if current.recipient_keys.iter().any(|k| k.public_key == point) {
            return Err(ApiError::Exists(format!("recipient key {fingerprint} is already registered for {}", current.identity)));
        }
        if current.recipient_keys.len() >= MAX_RECIPIENT_KEYS {
            return Err(ApiError::Precondition(format!(
                "{} has {MAX_RECIPIENT_KEYS} recipient keys, the most allowed; remove one first",
                current.identity
            )));
        }
        let mut next = current.clone();
        next.recipient_keys.push(key);
        next.updated_at = unix_now().max(current.created_at);
        next.revision = current.revision + 1;
        self.write(&grant, &current, next).await
    }

    async fn remove_recipient_key(&self, request: Request<pb::RemoveRecipientKeyRequest>) -> Result<pb::Caller, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_caller_admin(&caller)?;
        let req = request.into_inner();
        let wanted = parse_fingerprint(&req.fingerprint)?;
        let current = self.current(&crate::bounded::owned(&req.identity, crate::bounded::NAME)).await?;
        crate::audit::facts::note_subject(&format!("caller {}: recipient key {} removed", current.identity, crate::ids::hex(&wanted)));
        grant.check_scope("change", &current)?;
        let mut next = current.clone();
        next.recipient_keys.retain(|k| k.fingerprint() != wanted);
        if next.recipient_keys.len() == current.recipient_keys.len() {
            return Err(ApiError::NotFound(format!(
                "{} has no recipient key {}",
                current.identity,
                crate::ids::hex(&wanted)
            )));
        }
        next.updated_at = unix_now().max(current.created_at);
        next.revision = current.revision + 1;
        self.write(&grant, &current, next).await
    }

    async fn current(&self, identity: &str) -> Result<CallerRecord, ApiError> {
        let id = identity.to_owned();
        let stored = self
            .state
            .store(move |s| s.caller_by_identity(&id))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no caller {identity} is registered")))?;
        Ok(self.state.keyauth.verify_caller(stored).await?)
    }

    async fn keep_an_officer(&self, losing: &str) -> Result<(), ApiError> {
        keep_an_officer(&self.state, losing).await
    }

    /// Files a request for a second officer: the proposed registration travels with it.
    async fn request(
        &self,
        grant: &Authorized<CallerAdmin>,
        kind: RequestKind,
        proposed: &CallerRecord,
        current: Option<&CallerRecord>,
        base_revision: u64,
    ) -> Result<pb::Approval, ApiError> {
        let level = current.map_or(proposed.clearance, |c| c.clearance.max(proposed.clearance));
        let payload = to_proto(proposed).encode_to_vec();
        let filed = file_request(&self.state, kind, &proposed.identity, payload, base_revision, level, grant.caller().identity()).await?;
        tracing::info!(request = %filed.id, caller = %proposed.identity, kind = %kind, by = grant.caller().identity(), "caller change filed for a second officer");
        Ok(request_to_proto(&filed, current))
    }

    async fn write(&self, grant: &Authorized<CallerAdmin>, current: &CallerRecord, next: CallerRecord) -> Result<pb::Caller, ApiError> {
        let by = grant.caller().identity();
        let mac = self.state.keyauth.seal_caller(grant, &next).await?;
        crate::audit::record_intent(&self.state.audit).await?;
        let row = next.clone();
        let expected = current.revision;
        self.state.store(move |s| s.update_caller(&row, &mac, expected)).await?;
        self.state.policy.set_caller(next.clone());
        tracing::info!(caller = %next.identity, active = next.active, by, "caller registration changed");
        Ok(to_proto(&next))
    }
}

/// Refuses a change that would leave no active officer.
pub async fn keep_an_officer(state: &AppState, losing: &str) -> Result<(), ApiError> {
    let stored = state.store(|s| s.list_callers()).await?;
    let others = stored
        .iter()
        .filter(|c| c.record.active && c.record.identity != losing && c.record.roles.contains(&Role::Officer))
        .count();
    if others == 0 {
        return Err(ApiError::Precondition(format!("{losing} is the last active officer; register another officer first")));
    }
    Ok(())
}

/// Whether a role set holds one of the powers only two officers may grant or take away.
pub fn powers(roles: &[Role]) -> bool {
    roles.iter().any(|r| matches!(r, Role::Officer | Role::Auditor))
}

/// A registration in words, for audit records and approval requests.
fn describe(c: &CallerRecord) -> String {
    format!(
        "roles {}, clearance {}, system level {}, allowed keys [{}]",
        roles_text(&c.roles),
        c.clearance,
        c.system_level,
        c.allowed_keys.join(", ")
    )
}

fn roles_text(roles: &[Role]) -> String {
    roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")
}

/// What changes between two registrations, field by field.
pub fn changes(from: &CallerRecord, to: &CallerRecord) -> String {
    let mut out = Vec::new();
    if from.roles != to.roles {
        out.push(format!("roles {} -> {}", roles_text(&from.roles), roles_text(&to.roles)));
    }
    if from.clearance != to.clearance {
        out.push(format!("clearance {} -> {}", from.clearance, to.clearance));
    }
    if from.system_level != to.system_level {
        out.push(format!("system level {} -> {}", from.system_level, to.system_level));
    }
    if from.allowed_keys != to.allowed_keys {
        out.push(format!("allowed keys [{}] -> [{}]", from.allowed_keys.join(", "), to.allowed_keys.join(", ")));
    }
    if from.agency != to.agency {
        out.push("agency changed".to_owned());
    }
    if from.name != to.name {
        out.push("name changed".to_owned());
    }
    if from.active != to.active {
        out.push(if to.active { "reinstated".to_owned() } else { "revoked".to_owned() });
    }
    if out.is_empty() {
        "no change".to_owned()
    } else {
        out.join("; ")
    }
}

/// Checks every field of a registration from the wire and builds the record (with no recipient
/// keys: those are managed on their own).
pub fn validate(c: pb::Caller, created_at: i64, updated_at: i64, revision: u64, active: bool) -> Result<CallerRecord, ApiError> {
    let printable = |s: &str| !s.chars().any(char::is_control);
    if c.identity.is_empty() || c.identity.len() > 512 || !c.identity.contains(':') || c.identity.chars().any(char::is_whitespace) || !printable(&c.identity) {
        return Err(ApiError::invalid("identity", "must be the certificate's URI SAN (1-512 bytes, no spaces), e.g. urn:kms:caller:tax-gateway"));
    }
    if c.name.is_empty() || c.name.len() > 200 || !printable(&c.name) {
        return Err(ApiError::invalid("name", "must be 1-200 bytes of printable text"));
    }
    if c.agency.is_empty() || c.agency.len() > 200 || !printable(&c.agency) {
        return Err(ApiError::invalid("agency", "must be 1-200 bytes of printable text"));
    }
    let system_level = u8::try_from(c.system_level)
        .ok()
        .filter(|l| (1..=5).contains(l))
        .ok_or_else(|| ApiError::invalid("system_level", "must be 1 to 5"))?;
    let clearance = Classification::from_proto(c.clearance).ok_or_else(|| ApiError::invalid("clearance", "unknown or unspecified level"))?;
    if c.roles.len() > 8 {
        return Err(ApiError::invalid("roles", "at most one of each of exchange, officer, auditor"));
    }
    let mut roles = Vec::with_capacity(c.roles.len());
    for r in &c.roles {
        roles.push(r.parse::<Role>().map_err(|_| {
            ApiError::invalid("roles", format!("unknown role {:?}: expected exchange, officer or auditor", crate::bounded::text(r, 32)))
        })?);
    }
    if roles.is_empty() {
        return Err(ApiError::invalid("roles", "at least one of exchange, officer, auditor"));
    }
    roles.sort();
    roles.dedup();
    check_roles(&roles).map_err(|why| ApiError::invalid("roles", why))?;
    if c.allowed_keys.len() > 256 {
        return Err(ApiError::invalid("allowed_keys", "at most 256 patterns"));
    }
    let mut allowed_keys = c.allowed_keys;
    for p in &allowed_keys {
        crate::store::validate_key_pattern(p)
            .map_err(|why| ApiError::invalid("allowed_keys", format!("{:?} {why}", crate::bounded::text(p, 80))))?;
    }
    allowed_keys.sort();
    allowed_keys.dedup();
    Ok(CallerRecord {
        identity: c.identity,
        agency: c.agency,
        name: c.name,
        system_level,
        clearance,
        roles,
        allowed_keys,
        active,
        created_at,
        updated_at,
        revision,
        recipient_keys: Vec::new(),
    })
}

/// The proposed registration a request carries.
pub fn proposed_of(request: &RequestRecord) -> Result<pb::Caller, ApiError> {
    pb::Caller::decode(request.payload.as_slice()).map_err(|_| ApiError::Internal("a request's proposed registration does not decode"))
}

pub fn to_proto(r: &CallerRecord) -> pb::Caller {
    pb::Caller {
        identity: r.identity.clone(),
        agency: r.agency.clone(),
        name: r.name.clone(),
        system_level: u32::from(r.system_level),
        clearance: r.clearance.to_proto().into(),
        roles: r.roles.iter().map(|r| r.as_str().to_owned()).collect(),
        allowed_keys: r.allowed_keys.clone(),
        active: r.active,
        created_unix: r.created_at,
        updated_unix: r.updated_at,
        recipient_keys: r
            .recipient_keys
            .iter()
            .map(|k| pb::RecipientKey {
                fingerprint: crate::ids::hex(&k.fingerprint()),
                public_key: k.public_key.to_vec(),
                added_unix: k.added_at,
            })
            .collect(),
    }
}

/// A P-256 public key from the wire: an uncompressed SEC1 point, or SubjectPublicKeyInfo PEM.
fn parse_public_key(point: &[u8], pem: &str) -> Result<[u8; 65], ApiError> {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let key = match (point.is_empty(), pem.is_empty()) {
        (false, true) => p256::PublicKey::from_sec1_bytes(point)
            .map_err(|_| ApiError::invalid("public_key", "is not a P-256 point (SEC1)"))?,
        (true, false) => {
            if pem.len() > 4096 {
                return Err(ApiError::invalid("pem", "is longer than 4096 bytes"));
            }
            p256::pkcs8::DecodePublicKey::from_public_key_pem(pem)
                .map_err(|_| ApiError::invalid("pem", "is not a P-256 public key in SubjectPublicKeyInfo PEM"))?
        }
        _ => return Err(ApiError::invalid("public_key", "give exactly one of public_key (SEC1) and pem")),
    };
    let encoded = key.to_encoded_point(false);
    encoded.as_bytes().try_into().map_err(|_| ApiError::Internal("an uncompressed P-256 point is not 65 bytes"))
}

/// A hex SHA-256 fingerprint.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], ApiError> {
    crate::ids::unhex(s)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ApiError::invalid("fingerprint", "must be 64 hex digits (the SHA-256 of the key's SEC1 point)"))
}

#[tonic::async_trait]
impl Callers for CallersService {
    async fn register_caller(&self, request: Request<pb::RegisterCallerRequest>) -> Result<Response<pb::CallerChangeResponse>, Status> {
        self.state.respond("RegisterCaller", None, request, |r| self.register(r)).await
    }

    async fn update_caller(&self, request: Request<pb::UpdateCallerRequest>) -> Result<Response<pb::CallerChangeResponse>, Status> {
        self.state.respond("UpdateCaller", None, request, |r| self.update(r)).await
    }

    async fn list_callers(&self, request: Request<pb::ListCallersRequest>) -> Result<Response<pb::ListCallersResponse>, Status> {
        self.state.respond("ListCallers", None, request, |r| self.list(r)).await
    }

    async fn revoke_caller(&self, request: Request<pb::RevokeCallerRequest>) -> Result<Response<pb::CallerChangeResponse>, Status> {
        self.state.respond("RevokeCaller", None, request, |r| self.revoke(r)).await
    }

    async fn add_recipient_key(&self, request: Request<pb::AddRecipientKeyRequest>) -> Result<Response<pb::Caller>, Status> {
        self.state.respond("AddRecipientKey", None, request, |r| self.add_recipient_key(r)).await
    }

    async fn remove_recipient_key(&self, request: Request<pb::RemoveRecipientKeyRequest>) -> Result<Response<pb::Caller>, Status> {
        self.state.respond("RemoveRecipientKey", None, request, |r| self.remove_recipient_key(r)).await
    }
}
