//! The `Audit` service: auditors page through the records and checkpoints of the trail; any
//! registered caller may fetch the public key that verifies the checkpoints. Reading is itself
//! audited, like every request.
#![forbid(unsafe_code)]

use kms_proto::v1 as pb;
use kms_proto::v1::audit_server::Audit;
use tonic::{Request, Response, Status};

use super::AppState;
use crate::authz::AuditRead;
use crate::status::ApiError;

/// Largest page of records or checkpoints.
const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;
/// A page of records stops once it holds this many bytes (it always holds at least one record), so
/// that no page can exceed a gRPC message limit however large the records.
const PAGE_BYTES: usize = 1 << 20;

pub struct AuditService {
    state: AppState,
}

impl AuditService {
    pub fn new(state: AppState) -> AuditService {
        AuditService { state }
    }

    async fn records(&self, request: Request<pb::ListAuditRecordsRequest>) -> Result<pb::ListAuditRecordsResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_audit_read(&caller, AuditRead::Records)?;
        let req = request.into_inner();
        let limit = page(req.limit)?;
        let (records, head) = self.state.audit.records(&grant, req.from_seq.max(1), limit, req.last).await?;
        let mut bytes = 0usize;
        let mut page = Vec::with_capacity(records.len());
        for r in records {
            let size = r.record.encode().len() + 64;
            if !page.is_empty() && bytes + size > PAGE_BYTES {
                break;
            }
            bytes += size;
            page.push(record_to_proto(r));
        }
        Ok(pb::ListAuditRecordsResponse { records: page, head_seq: head })
    }

    async fn checkpoints(
        &self,
        request: Request<pb::ListAuditCheckpointsRequest>,
    ) -> Result<pb::ListAuditCheckpointsResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_audit_read(&caller, AuditRead::Checkpoints)?;
        let req = request.into_inner();
        let limit = page(req.limit)?;
        let checkpoints = self.state.audit.checkpoints(&grant, req.from_seq, limit).await?;
        Ok(pb::ListAuditCheckpointsResponse {
            checkpoints: checkpoints
                .into_iter()
                .map(|c| pb::AuditCheckpoint {
                    seq: c.seq,
                    hash: c.hash.to_vec(),
                    time_unix_ms: c.time_unix_ms,
                    signature: c.signature,
                })
                .collect(),
        })
    }

    async fn public_key(&self, request: Request<pb::GetAuditPublicKeyRequest>) -> Result<pb::AuditPublicKey, ApiError> {
        // Any registered caller: the key verifies, it grants nothing.
        self.state.caller(&request)?;
        Ok(pb::AuditPublicKey {
            pem: self.state.audit.public_key_pem().to_owned(),
            sec1: self.state.audit.public_key_sec1().to_vec(),
        })
    }
}

impl AuditService {
    async fn anchor(&self, request: Request<pb::GetAuditAnchorRequest>) -> Result<pb::AuditAnchor, ApiError> {
        let caller = self.state.caller(&request)?;
        self.state.policy.authorize_audit_read(&caller, AuditRead::Anchor)?;
        let server = self.state.audit.server().to_owned();
        let name = server.clone();
        let stored = self
            .state
            .store(move |s| s.audit_anchor(&name))
            .await?
            .ok_or(ApiError::Internal("the audit trail has no anchor"))?;
        let a = self.state.keyauth.verify_anchor(&server, stored).await?;
        Ok(pb::AuditAnchor { trail_id: crate::ids::hex(&a.trail_id), seq: a.seq, hash: a.hash.to_vec(), time_unix_ms: a.time_ms })
    }
}

fn page(limit: u32) -> Result<u32, ApiError> {
    match limit {
        0 => Ok(DEFAULT_PAGE),
        1..=MAX_PAGE => Ok(limit),
        _ => Err(ApiError::invalid("limit", format!("must be at most {MAX_PAGE}"))),
    }
}

fn record_to_proto(s: kms_audit::StoredRecord) -> pb::AuditRecord {
    let r = s.record;
    pb::AuditRecord {
        seq: r.seq,
        time_unix_ms: r.time_unix_ms,
        caller: r.caller,
        cert_fingerprint: r.cert_fingerprint,
        rpc: r.rpc,
        key: r.key,
        key_version: r.key_version,
        level: r.level,
        outcome: r.outcome.as_str().to_owned(),
        status_code: r.status_code,
        request_id: r.request_id,
        context_hash: r.context_hash,
        detail: r.detail,
        hash: s.hash.to_vec(),
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        self.state.respond("ListAuditRecords", None, request, |r| self.records(r)).await
    }

    async fn list_audit_checkpoints(
        &self,
        request: Request<pb::ListAuditCheckpointsRequest>,
    ) -> Result<Response<pb::ListAuditCheckpointsResponse>, Status> {
        self.state.respond("ListAuditCheckpoints", None, request, |r| self.checkpoints(r)).await
    }

    async fn get_audit_public_key(
        &self,
        request: Request<pb::GetAuditPublicKeyRequest>,
    ) -> Result<Response<pb::AuditPublicKey>, Status> {
        self.state.respond("GetAuditPublicKey", None, request, |r| self.public_key(r)).await
    }

    async fn get_audit_anchor(&self, request: Request<pb::GetAuditAnchorRequest>) -> Result<Response<pb::AuditAnchor>, Status> {
        self.state.respond("GetAuditAnchor", None, request, |r| self.anchor(r)).await
    }
}
