//! The `Callers` service (officers): register, update, list and revoke calling systems; and the
//! start-up step that seeds the store with the configuration's callers and loads every
//! registration into the policy.
//!
//! A registration is a store row sealed by the HSM (`crate::keyauth`): one edited behind the
//! service's back is refused at start-up and never trusted. A change is written to the store, then
//! installed in the policy, so the next request is judged by it. Must never let an officer lock
//! everyone out: the last active officer cannot be revoked or lose the role, and no one revokes
//! themselves.
#![forbid(unsafe_code)]

use kms_proto::v1 as pb;
use kms_proto::v1::callers_server::Callers;
use tonic::{Request, Response, Status};

use super::key_lifecycle::unix_now;
use super::AppState;
use crate::authz::{Authorized, CallerAdmin};
use crate::classification::Classification;
use crate::config::{CallerEntry, Role};
use crate::keyauth::KeyAuth;
use crate::status::ApiError;
use crate::store::{CallerRecord, Store};

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
        };
        let mac = keyauth.seal_configured_caller(&record).await?;
        let s = store.clone();
        let row = record.clone();
        tokio::task::spawn_blocking(move || s.insert_caller(&row, &mac))
            .await
            .map_err(|_| ApiError::Internal("store task panicked"))??;
        tracing::info!(caller = %record.identity, "caller registered from the configuration");
    }
    let s = store.clone();
    let stored = tokio::task::spawn_blocking(move || s.list_callers()).await.map_err(|_| ApiError::Internal("store task panicked"))??;
    let mut profiles = Vec::with_capacity(stored.len());
    for row in stored {
        match keyauth.verify_caller(row).await {
            Ok(r) => profiles.push(r),
            Err(crate::keyauth::KeyAuthError::ForgedCaller { identity }) => {
                tracing::error!(caller = %identity, "caller registration failed authentication at start-up; the caller is refused");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(profiles)
}

impl CallersService {
    pub fn new(state: AppState) -> CallersService {
        CallersService { state }
    }

    async fn register(&self, request: Request<pb::RegisterCallerRequest>) -> Result<pb::Caller, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_caller_admin(&caller)?;
        let wire = request.into_inner().caller.ok_or_else(|| ApiError::invalid("caller", "is required"))?;
        let now = unix_now();
        let record = validate(wire, now, now, 1, true)?;
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
        Ok(to_proto(&record))
    }

    async fn update(&self, request: Request<pb::UpdateCallerRequest>) -> Result<pb::Caller, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_caller_admin(&caller)?;
        let wire = request.into_inner().caller.ok_or_else(|| ApiError::invalid("caller", "is required"))?;
        let current = self.current(&wire.identity).await?;
        let next = validate(wire, current.created_at, unix_now().max(current.created_at), current.revision + 1, current.active)?;
        if current.roles.contains(&Role::Officer) && !next.roles.contains(&Role::Officer) {
            self.keep_an_officer(&current.identity).await?;
        }
        self.write(&grant, &current, next).await
    }

    async fn revoke(&self, request: Request<pb::RevokeCallerRequest>) -> Result<pb::Caller, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_caller_admin(&caller)?;
        let identity = request.into_inner().identity;
        if identity == caller.identity() {
            return Err(ApiError::Precondition("an officer cannot revoke their own registration".into()));
        }
        let current = self.current(&identity).await?;
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
        self.write(&grant, &current, next).await
    }

    async fn list(&self, request: Request<pb::ListCallersRequest>) -> Result<pb::ListCallersResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        self.state.policy.authorize_caller_admin(&caller)?;
        let include_revoked = request.get_ref().include_revoked;
        let stored = self.state.store(|s| s.list_callers()).await?;
        let mut callers = Vec::with_capacity(stored.len());
        for row in stored {
            let r = self.state.keyauth.verify_caller(row).await?;
            if r.active || include_revoked {
                callers.push(to_proto(&r));
            }
        }
        Ok(pb::ListCallersResponse { callers })
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

    /// Refuses a change that would leave no active officer.
    async fn keep_an_officer(&self, losing: &str) -> Result<(), ApiError> {
        let stored = self.state.store(|s| s.list_callers()).await?;
        let others = stored
            .iter()
            .filter(|c| c.record.active && c.record.identity != losing && c.record.roles.contains(&Role::Officer))
            .count();
        if others == 0 {
            return Err(ApiError::Precondition(format!(
                "{losing} is the last active officer; register another officer first"
            )));
        }
        Ok(())
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

/// Checks every field of a registration from the wire and builds the record.
fn validate(c: pb::Caller, created_at: i64, updated_at: i64, revision: u64, active: bool) -> Result<CallerRecord, ApiError> {
    let printable = |s: &str| !s.chars().any(char::is_control);
    if c.identity.is_empty() || c.identity.len() > 512 || !c.identity.contains(':') || c.identity.chars().any(char::is_whitespace) {
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
    let mut roles = Vec::with_capacity(c.roles.len());
    for r in &c.roles {
        roles.push(r.parse::<Role>().map_err(|e| ApiError::invalid("roles", e.to_string()))?);
    }
    if roles.is_empty() {
        return Err(ApiError::invalid("roles", "at least one of exchange, officer, auditor"));
    }
    roles.sort();
    roles.dedup();
    let mut allowed_keys = c.allowed_keys;
    for p in &allowed_keys {
        crate::store::validate_key_pattern(p).map_err(|why| ApiError::invalid("allowed_keys", format!("{p:?} {why}")))?;
    }
    allowed_keys.sort();
    allowed_keys.dedup();
    if allowed_keys.len() > 256 {
        return Err(ApiError::invalid("allowed_keys", "at most 256 patterns"));
    }
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
    })
}

fn to_proto(r: &CallerRecord) -> pb::Caller {
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
    }
}

#[tonic::async_trait]
impl Callers for CallersService {
    async fn register_caller(&self, request: Request<pb::RegisterCallerRequest>) -> Result<Response<pb::Caller>, Status> {
        self.state.respond("RegisterCaller", None, request, |r| self.register(r)).await
    }

    async fn update_caller(&self, request: Request<pb::UpdateCallerRequest>) -> Result<Response<pb::Caller>, Status> {
        self.state.respond("UpdateCaller", None, request, |r| self.update(r)).await
    }

    async fn list_callers(&self, request: Request<pb::ListCallersRequest>) -> Result<Response<pb::ListCallersResponse>, Status> {
        self.state.respond("ListCallers", None, request, |r| self.list(r)).await
    }

    async fn revoke_caller(&self, request: Request<pb::RevokeCallerRequest>) -> Result<Response<pb::Caller>, Status> {
        self.state.respond("RevokeCaller", None, request, |r| self.revoke(r)).await
    }
}
