//! Two-officer approvals (the level table): a change that the key's level reserves for two
//! officers is filed as a PENDING request; a second, different officer approves it (the change is
//! made and the request marked APPROVED in one transaction) or rejects it; a request nobody decides
//! expires after the deployment's `approval_ttl_seconds`. The same holds for the changes of
//! separation of duties (a caller given or stripped of the officer or auditor role, a raised
//! clearance) and for destroying a token object no key names: those requests live in their own
//! table (`store::requests`), and both kinds are listed and decided here.
//!
//! When a request is approved, its requester must still be a registered, active officer, and the
//! approver must hold what the change needs (the key's level; for caller changes, the caller as it
//! is and as it would become must lie within the approver's own clearance, level and keys).
//!
//! Every request row is sealed with the HSM like a key row, so a request cannot be forged or its
//! requester swapped in the database.
#![forbid(unsafe_code)]

use kms_proto::v1 as pb;
use kms_proto::v1::approvals_server::Approvals;
use tonic::{Request, Response, Status};

use super::callers::{changes, keep_an_officer, proposed_of, validate};
use super::key_admin::key_to_proto;
use super::key_lifecycle::{apply_change, unix_now, Change};
use super::AppState;
use crate::authz::{AdminAction, Denied, LoadedKey};
use crate::classification::Classification;
use crate::config::Role;
use crate::ids::ObjectId;
use crate::status::ApiError;
use crate::store::{
    ApprovalAction, ApprovalId, ApprovalRecord, ApprovalState, CallerRecord, KeyRecord, RequestKind, RequestRecord,
};

/// Who files the requests of the rotation schedule (for levels whose rotation needs two officers).
pub const SCHEDULER_IDENTITY: &str = "urn:kms:server:rotation-schedule";

pub struct ApprovalsService {
    state: AppState,
}

impl ApprovalsService {
    pub fn new(state: AppState) -> ApprovalsService {
        ApprovalsService { state }
    }
}

/// Files a PENDING request for `action` on `key` by `requester`, or returns the open one for the
/// same change (so that repeating a command does not pile up requests).
pub async fn file_approval(
    state: &AppState,
    key: &KeyRecord,
    action: ApprovalAction,
    version: u32,
    requester: &str,
) -> Result<ApprovalRecord, ApiError> {
    let now = unix_now();
    let key_id = key.id;
    if let Some(open) = state.store(move |s| s.pending_approval_for(key_id, action, version)).await? {
        let open = state.keyauth.verify_approval(open).await?;
        if open.expires_at > now {
            return Ok(open);
        }
        expire(state, open, now).await?;
    }
    let record = ApprovalRecord {
        id: ApprovalId::random().map_err(|_| ApiError::Internal("system random generator failed"))?,
        key_id,
        action,
        version,
        requested_by: requester.to_owned(),
        requested_at: now,
        expires_at: now.saturating_add(state.lifecycle.approval_ttl_seconds),
        state: ApprovalState::Pending,
        decided_by: None,
        decided_at: None,
    };
    let mac = state.keyauth.seal_approval(&record).await?;
    let row = record.clone();
    crate::audit::record_intent(&state.audit).await?;
    state.store(move |s| s.insert_approval(&row, &mac)).await?;
    tracing::info!(approval = %record.id, key = %key.name, action = %action, version, by = requester, "approval requested from a second officer");
    Ok(record)
}

/// Writes a decision that changes no key (a rejection, an expiry, or an approval of a change that
/// had already happened).
pub async fn record_decision(state: &AppState, decided: ApprovalRecord) -> Result<(), ApiError> {
    let mac = state.keyauth.seal_approval(&decided).await?;
    state.store(move |s| s.decide_approval(&decided, &mac)).await
}

/// Files a PENDING request about a caller or a token object, or returns the open one for the same
/// change (same kind, subject and proposal).
pub async fn file_request(
    state: &AppState,
    kind: RequestKind,
    subject: &str,
    payload: Vec<u8>,
    base_revision: u64,
    level: Classification,
    requester: &str,
) -> Result<RequestRecord, ApiError> {
    let now = unix_now();
    let s = subject.to_owned();
    if let Some(open) = state.store(move |st| st.pending_request_for(kind, &s)).await? {
        let open = state.keyauth.verify_request(open).await?;
        if open.expires_at > now && open.payload == payload && open.base_revision == base_revision {
            return Ok(open);
        }
        if open.expires_at <= now {
            expire_request(state, open, now).await?;
        }
    }
    let record = RequestRecord {
        id: ApprovalId::random().map_err(|_| ApiError::Internal("system random generator failed"))?,
        kind,
        subject: subject.to_owned(),
        payload,
        base_revision,
        level,
        requested_by: requester.to_owned(),
        requested_at: now,
        expires_at: now.saturating_add(state.lifecycle.approval_ttl_seconds),
        state: ApprovalState::Pending,
        decided_by: None,
        decided_at: None,
    };
    let mac = state.keyauth.seal_request(&record).await?;
    crate::audit::record_intent(&state.audit).await?;
    let row = record.clone();
    state.store(move |st| st.insert_request(&row, &mac)).await?;
    Ok(record)
}

async fn record_request_decision(state: &AppState, decided: RequestRecord) -> Result<(), ApiError> {
    let mac = state.keyauth.seal_request(&decided).await?;
    state.store(move |s| s.decide_request(&decided, &mac)).await
}

async fn expire_request(state: &AppState, mut r: RequestRecord, now: i64) -> Result<RequestRecord, ApiError> {
    r.state = ApprovalState::Expired;
    r.decided_at = Some(now);
    record_request_decision(state, r.clone()).await?;
    tracing::info!(request = %r.id, "request expired undecided");
    Ok(r)
}

/// The wire form of a request about a caller or an object. `current` is the caller's registration
/// as it is now, to say what the change would change.
pub fn request_to_proto(r: &RequestRecord, current: Option<&CallerRecord>) -> pb::Approval {
    let state = if r.state == ApprovalState::Pending && r.expires_at <= unix_now() { ApprovalState::Expired } else { r.state };
    let change = match r.kind {
        RequestKind::RegisterCaller | RequestKind::UpdateCaller => match proposed_of(r)
            .ok()
            .and_then(|p| validate(p, 0, 0, 1, true).ok())
        {
            Some(proposed) => match current {
                Some(c) => changes(c, &proposed),
                None => format!(
                    "register with roles {}, clearance {}, system level {}",
                    proposed.roles.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(","),
                    proposed.clearance,
                    proposed.system_level
                ),
            },
            None => "the proposed registration does not decode".to_owned(),
        },
        RequestKind::RevokeCaller => "revoke".to_owned(),
        RequestKind::DestroyObject => "destroy the HSM object, which no key version names".to_owned(),
    };
    pb::Approval {
        id: r.id.to_hex(),
        key: String::new(),
        version: 0,
        action: match r.kind {
            RequestKind::RegisterCaller => pb::ApprovalAction::RegisterCaller,
            RequestKind::UpdateCaller => pb::ApprovalAction::UpdateCaller,
            RequestKind::RevokeCaller => pb::ApprovalAction::RevokeCaller,
            RequestKind::DestroyObject => pb::ApprovalAction::DestroyUnknownObject,
        } as i32,
        state: state_to_proto(state) as i32,
        requested_by: r.requested_by.clone(),
        requested_at_unix: r.requested_at,
        expires_at_unix: r.expires_at,
        decided_by: r.decided_by.clone().unwrap_or_default(),
        decided_at_unix: r.decided_at.unwrap_or(0),
        classification: r.level.to_proto() as i32,
        subject: r.subject.clone(),
        change,
    }
}

fn state_to_proto(s: ApprovalState) -> pb::ApprovalState {
    match s {
        ApprovalState::Pending => pb::ApprovalState::Pending,
        ApprovalState::Approved => pb::ApprovalState::Approved,
        ApprovalState::Rejected => pb::ApprovalState::Rejected,
        ApprovalState::Expired => pb::ApprovalState::Expired,
    }
}

async fn expire(state: &AppState, mut a: ApprovalRecord, now: i64) -> Result<ApprovalRecord, ApiError> {
    a.state = ApprovalState::Expired;
    a.decided_at = Some(now);
    record_decision(state, a.clone()).await?;
    tracing::info!(approval = %a.id, "approval request expired undecided");
    Ok(a)
}

/// The wire form; a PENDING request past its expiry is shown as EXPIRED.
pub fn approval_to_proto(a: &ApprovalRecord, key: &KeyRecord) -> pb::Approval {
    let state = if a.state == ApprovalState::Pending && a.expires_at <= unix_now() { ApprovalState::Expired } else { a.state };
    pb::Approval {
        id: a.id.to_hex(),
        key: key.name.clone(),
        version: a.version,
        action: match a.action {
            ApprovalAction::RotateKey => pb::ApprovalAction::RotateKey,
            ApprovalAction::DisableKey => pb::ApprovalAction::DisableKey,
            ApprovalAction::DestroyKey => pb::ApprovalAction::DestroyKey,
            ApprovalAction::DisableVersion => pb::ApprovalAction::DisableVersion,
            ApprovalAction::DestroyVersion => pb::ApprovalAction::DestroyVersion,
            ApprovalAction::EnableKey => pb::ApprovalAction::EnableKey,
            ApprovalAction::EnableVersion => pb::ApprovalAction::EnableVersion,
        } as i32,
        state: state_to_proto(state) as i32,
        requested_by: a.requested_by.clone(),
        requested_at_unix: a.requested_at,
        expires_at_unix: a.expires_at,
        decided_by: a.decided_by.clone().unwrap_or_default(),
        decided_at_unix: a.decided_at.unwrap_or(0),
        classification: key.classification.to_proto() as i32,
        subject: String::new(),
        change: String::new(),
    }
}

/// What a decision changed.
enum Decided {
    Key(ApprovalRecord, KeyRecord),
    Other(RequestRecord, Option<CallerRecord>),
}

impl ApprovalsService {
    async fn list(&self, request: Request<pb::ListApprovalsRequest>) -> Result<pb::ListApprovalsResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_admin(&caller, AdminAction::ReadKeys, None)?;
        let include_decided = request.get_ref().include_decided;
        let stored = self.state.store(move |s| s.list_approvals(include_decided)).await?;
        let mut approvals = Vec::with_capacity(stored.len());
        for s in stored {
            let a = self.state.keyauth.verify_approval(s).await?;
            // Only requests on keys the officer may see (allowed keys, clearance).
            if let Ok(key) = grant.reveal(self.state.key_by_id(a.key_id).await?) {
                approvals.push(approval_to_proto(&a, &key));
            }
        }
        let others = self.state.store(move |s| s.list_requests(include_decided, crate::store::APPROVAL_LIST_LIMIT)).await?;
        for s in others {
            let r = self.state.keyauth.verify_request(s).await?;
            // Only requests within the officer's clearance.
            if r.level <= caller.profile().clearance {
                let current = match r.kind {
                    RequestKind::DestroyObject => None,
                    _ => self.state.policy.registration(&r.subject).map(|c| CallerRecord::clone(&c)),
                };
                approvals.push(request_to_proto(&r, current.as_ref()));
            }
        }
        Ok(pb::ListApprovalsResponse { approvals })
    }

    /// Loads an authenticated key request that is still PENDING, and its key.
    async fn open_request(&self, a: ApprovalRecord) -> Result<(ApprovalRecord, LoadedKey), ApiError> {
        let key = self.state.key_by_id(a.key_id).await?;
        if a.state != ApprovalState::Pending {
            let by = a.decided_by.as_deref().map(|d| format!(" by {d}")).unwrap_or_default();
            return Err(ApiError::Precondition(format!("approval request {} is already {}{by}", a.id, a.state)));
        }
        Ok((a, key))
    }

    async fn decide(&self, request: Request<pb::DecideApprovalRequest>, approve: bool) -> Result<Decided, ApiError> {
        let caller = self.state.caller(&request)?;
        let id = crate::bounded::owned(&request.get_ref().id, 64);
        crate::audit::facts::note_subject(&format!("approval request {id} {}", if approve { "approved" } else { "rejected" }));
        let parsed = ApprovalId::from_hex(&id).ok_or_else(|| ApiError::invalid("id", "must be 32 hex digits"))?;
        let stored = self.state.store(move |s| s.approval_by_id(parsed)).await?;
        let a = match stored {
            Some(stored) => self.state.keyauth.verify_approval(stored).await?,
            None => {
                let other = self
                    .state
                    .store(move |s| s.request_by_id(parsed))
                    .await?
                    .ok_or_else(|| ApiError::NotFound(format!("no approval request {id}")))?;
                let r = self.state.keyauth.verify_request(other).await?;
                return self.decide_other(&caller, r, approve).await;
            }
        };
        let (a, key) = self.open_request(a).await?;
        let change = Change::from_approval(a.action, a.version);
        let grant = self.state.policy.authorize_decision(&caller, key, change.key_change(), &a.requested_by)?;
        let key = grant.action().key.clone();
        let now = unix_now();
        // Every path from here writes to the store.
        crate::audit::record_intent(&self.state.audit).await?;
        if a.expires_at <= now {
            let expired_at = a.expires_at;
            expire(&self.state, a, now).await?;
            return Err(ApiError::Precondition(format!(
                "approval request {id} expired at {expired_at} (unix time) without a decision; file the change again"
            )));
        }
        if approve && a.requested_by != SCHEDULER_IDENTITY && !self.state.policy.is_active_officer(&a.requested_by) {
            return Err(Denied::RequesterGone { identity: a.requested_by }.into());
        }
        let mut decided = a;
        decided.state = if approve { ApprovalState::Approved } else { ApprovalState::Rejected };
        decided.decided_by = Some(grant.caller().identity().to_owned());
        decided.decided_at = Some(now);
        if !approve {
            record_decision(&self.state, decided.clone()).await?;
            tracing::info!(approval = %decided.id, key = %key.name, by = grant.caller().identity(), "approval request rejected");
            return Ok(Decided::Key(decided, key));
        }
        let saved = apply_change(&self.state, &grant, change, Some(decided.clone())).await?;
        tracing::info!(approval = %decided.id, key = %saved.name, requested_by = %decided.requested_by, approved_by = grant.caller().identity(), "approval request approved and carried out");
        Ok(Decided::Key(decided, saved))
    }

    /// Decides a request about a caller or a token object.
    async fn decide_other(&self, caller: &crate::authz::Caller, r: RequestRecord, approve: bool) -> Result<Decided, ApiError> {
        let grant = self.state.policy.authorize_caller_admin(caller)?;
        if r.state != ApprovalState::Pending {
            let by = r.decided_by.as_deref().map(|d| format!(" by {d}")).unwrap_or_default();
            return Err(ApiError::Precondition(format!("approval request {} is already {}{by}", r.id, r.state)));
        }
        if r.requested_by == caller.identity() {
            return Err(Denied::OwnRequest { identity: r.requested_by }.into());
        }
        let p = caller.profile();
        if r.level > p.clearance {
            return Err(Denied::ClearanceTooLow { identity: p.identity.clone(), clearance: p.clearance, level: r.level }.into());
        }
        let now = unix_now();
        crate::audit::record_intent(&self.state.audit).await?;
        if r.expires_at <= now {
            let expired_at = r.expires_at;
            let id = r.id;
            expire_request(&self.state, r, now).await?;
            return Err(ApiError::Precondition(format!(
                "approval request {id} expired at {expired_at} (unix time) without a decision; file the change again"
            )));
        }
        let mut decided = r.clone();
        decided.state = if approve { ApprovalState::Approved } else { ApprovalState::Rejected };
        decided.decided_by = Some(caller.identity().to_owned());
        decided.decided_at = Some(now);
        if !approve {
            record_request_decision(&self.state, decided.clone()).await?;
            tracing::info!(request = %decided.id, by = caller.identity(), "request rejected");
            return Ok(Decided::Other(decided, None));
        }
        if !self.state.policy.is_active_officer(&r.requested_by) {
            return Err(Denied::RequesterGone { identity: r.requested_by }.into());
        }
        let dmac = self.state.keyauth.seal_request(&decided).await?;
        let outdated = || ApiError::Store(crate::store::StoreError::Conflict { key: format!("caller {}", r.subject) });
        let saved = match r.kind {
            RequestKind::DestroyObject => {
                let object = ObjectId(crate::ids::unhex(&r.subject).ok_or(ApiError::Internal("a request names a malformed object id"))?);
                super::token_objects::destroy_unknown(&self.state, &object).await?;
                let d = decided.clone();
                self.state.store(move |s| s.decide_request(&d, &dmac)).await?;
                tracing::warn!(object = %object, requested_by = %r.requested_by, approved_by = caller.identity(), "an HSM object no key named was destroyed by two officers");
                return Ok(Decided::Other(decided, None));
            }
            RequestKind::RegisterCaller => {
                let proposed = validate(proposed_of(&r)?, now, now, 1, true)?;
                grant.check_scope("register", &proposed)?;
                let mac = self.state.keyauth.seal_caller(&grant, &proposed).await?;
                let (row, d) = (proposed.clone(), decided.clone());
                self.state.store(move |s| s.write_caller_with_request(&row, &mac, None, &d, &dmac)).await.map_err(|e| match e {
                    ApiError::Store(crate::store::StoreError::DuplicateName { .. }) => {
                        ApiError::Exists(format!("caller {} was registered since the request was filed", proposed.identity))
                    }
                    other => other,
                })?;
                proposed
            }
            RequestKind::UpdateCaller | RequestKind::RevokeCaller => {
                let current = self.current_caller(&r.subject).await?;
                if current.revision != r.base_revision {
                    return Err(outdated());
                }
                grant.check_scope("change", &current)?;
                let next = if r.kind == RequestKind::UpdateCaller {
                    let mut next = validate(proposed_of(&r)?, current.created_at, now.max(current.created_at), current.revision + 1, current.active)?;
                    next.recipient_keys = current.recipient_keys.clone();
                    next
                } else {
                    let mut next = current.clone();
                    next.active = false;
                    next.updated_at = now.max(current.created_at);
                    next.revision = current.revision + 1;
                    next
                };
                grant.check_scope("change", &next)?;
                if current.roles.contains(&Role::Officer) && (!next.roles.contains(&Role::Officer) || !next.active) {
                    keep_an_officer(&self.state, &current.identity).await?;
                }
                let mac = self.state.keyauth.seal_caller(&grant, &next).await?;
                let (row, d, expected) = (next.clone(), decided.clone(), current.revision);
                self.state.store(move |s| s.write_caller_with_request(&row, &mac, Some(expected), &d, &dmac)).await?;
                next
            }
        };
        self.state.policy.set_caller(saved.clone());
        tracing::info!(request = %decided.id, caller = %saved.identity, requested_by = %r.requested_by, approved_by = caller.identity(), "caller change approved and carried out");
        Ok(Decided::Other(decided, Some(saved)))
    }

    async fn current_caller(&self, identity: &str) -> Result<CallerRecord, ApiError> {
        let id = identity.to_owned();
        let stored = self
            .state
            .store(move |s| s.caller_by_identity(&id))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no caller {identity} is registered")))?;
        Ok(self.state.keyauth.verify_caller(stored).await?)
    }
}

#[tonic::async_trait]
impl Approvals for ApprovalsService {
    async fn list_approvals(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        self.state.respond("ListApprovals", None, request, |r| self.list(r)).await
    }

    async fn approve(&self, request: Request<pb::DecideApprovalRequest>) -> Result<Response<pb::ApproveResponse>, Status> {
        self.state
            .respond("Approve", None, request, |r| async {
                let rules = self.state.policy.rules();
                Ok(match self.decide(r, true).await? {
                    Decided::Key(a, key) => pb::ApproveResponse {
                        approval: Some(approval_to_proto(&a, &key)),
                        key: Some(key_to_proto(&key, rules)),
                        caller: None,
                    },
                    Decided::Other(r, saved) => pb::ApproveResponse {
                        approval: Some(request_to_proto(&r, None)),
                        key: None,
                        caller: saved.as_ref().map(super::callers::to_proto),
                    },
                })
            })
            .await
    }

    async fn reject(&self, request: Request<pb::DecideApprovalRequest>) -> Result<Response<pb::Approval>, Status> {
        self.state
            .respond("Reject", None, request, |r| async {
                Ok(match self.decide(r, false).await? {
                    Decided::Key(a, key) => approval_to_proto(&a, &key),
                    Decided::Other(r, _) => request_to_proto(&r, None),
                })
            })
            .await
    }
}
