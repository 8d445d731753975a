//! Two-officer approvals (SPEC.md, levels table): a change that the key's level reserves for two
//! officers is filed as a PENDING request; a second, different officer approves it (the change is
//! made and the request marked APPROVED in one transaction) or rejects it; a request nobody decides
//! expires after the deployment's `approval_ttl_seconds`.
//!
//! Every request row is sealed with the HSM like a key row, so a request cannot be forged or its
//! requester swapped in the database.
#![forbid(unsafe_code)]

use kms_proto::v1 as pb;
use kms_proto::v1::approvals_server::Approvals;
use tonic::{Request, Response, Status};

use super::key_admin::key_to_proto;
use super::key_lifecycle::{apply_change, unix_now, Change};
use super::AppState;
use crate::authz::{AdminAction, LoadedKey};
use crate::status::ApiError;
use crate::store::{ApprovalAction, ApprovalId, ApprovalRecord, ApprovalState, KeyRecord};

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
        } as i32,
        state: match state {
            ApprovalState::Pending => pb::ApprovalState::Pending,
            ApprovalState::Approved => pb::ApprovalState::Approved,
            ApprovalState::Rejected => pb::ApprovalState::Rejected,
            ApprovalState::Expired => pb::ApprovalState::Expired,
        } as i32,
        requested_by: a.requested_by.clone(),
        requested_at_unix: a.requested_at,
        expires_at_unix: a.expires_at,
        decided_by: a.decided_by.clone().unwrap_or_default(),
        decided_at_unix: a.decided_at.unwrap_or(0),
        classification: key.classification.to_proto() as i32,
    }
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
            // Only requests on keys the officer may see.
            if let Ok(key) = grant.reveal(self.state.key_by_id(a.key_id).await?) {
                approvals.push(approval_to_proto(&a, &key));
            }
        }
        Ok(pb::ListApprovalsResponse { approvals })
    }

    /// Loads an authenticated request that is still PENDING, and its key.
    async fn open_request(&self, id: &str) -> Result<(ApprovalRecord, LoadedKey), ApiError> {
        let parsed = ApprovalId::from_hex(id).ok_or_else(|| ApiError::invalid("id", "must be 32 hex digits"))?;
        let stored = self
            .state
            .store(move |s| s.approval_by_id(parsed))
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no approval request {id}")))?;
        let a = self.state.keyauth.verify_approval(stored).await?;
        let key = self.state.key_by_id(a.key_id).await?;
        if a.state != ApprovalState::Pending {
            let by = a.decided_by.as_deref().map(|d| format!(" by {d}")).unwrap_or_default();
            return Err(ApiError::Precondition(format!("approval request {id} is already {}{by}", a.state)));
        }
        Ok((a, key))
    }

    async fn decide(&self, request: Request<pb::DecideApprovalRequest>, approve: bool) -> Result<(ApprovalRecord, KeyRecord), ApiError> {
        let caller = self.state.caller(&request)?;
        let id = request.get_ref().id.clone();
        let (a, key) = self.open_request(&id).await?;
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
        let mut decided = a;
        decided.state = if approve { ApprovalState::Approved } else { ApprovalState::Rejected };
        decided.decided_by = Some(grant.caller().identity().to_owned());
        decided.decided_at = Some(now);
        if !approve {
            record_decision(&self.state, decided.clone()).await?;
            tracing::info!(approval = %decided.id, key = %key.name, by = grant.caller().identity(), "approval request rejected");
            return Ok((decided, key));
        }
        let saved = apply_change(&self.state, &grant, change, Some(decided.clone())).await?;
        tracing::info!(approval = %decided.id, key = %saved.name, requested_by = %decided.requested_by, approved_by = grant.caller().identity(), "approval request approved and carried out");
        Ok((decided, saved))
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
                let (a, key) = self.decide(r, true).await?;
                let rules = self.state.policy.rules();
                Ok(pb::ApproveResponse { approval: Some(approval_to_proto(&a, &key)), key: Some(key_to_proto(&key, rules)) })
            })
            .await
    }

    async fn reject(&self, request: Request<pb::DecideApprovalRequest>) -> Result<Response<pb::Approval>, Status> {
        self.state
            .respond("Reject", None, request, |r| async {
                let (a, key) = self.decide(r, false).await?;
                Ok(approval_to_proto(&a, &key))
            })
            .await
    }
}
