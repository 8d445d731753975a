//! `KmsClient`'s audit calls (`Audit`, role `auditor`): page through records and checkpoints, and
//! fetch the public key that verifies the checkpoints (any registered caller).
#![forbid(unsafe_code)]

use crate::client::Retry;
use kms_proto::v1::audit_client::AuditClient;
use kms_proto::v1::{
    AuditAnchor, AuditPublicKey, GetAuditAnchorRequest, GetAuditPublicKeyRequest, ListAuditCheckpointsRequest, ListAuditCheckpointsResponse,
    ListAuditRecordsRequest, ListAuditRecordsResponse,
};
use tonic::transport::Channel;

use super::KmsClient;
use crate::error::ClientError;

impl KmsClient {
    /// See [`KmsClient::key_admin`].
    pub fn audit(&self) -> AuditClient<Channel> {
        AuditClient::new(self.channel())
    }

    /// Up to `limit` records (the server caps it at 1000) from sequence number `from_seq`.
    pub async fn list_audit_records(&self, from_seq: u64, limit: u32) -> Result<ListAuditRecordsResponse, ClientError> {
        let request = ListAuditRecordsRequest { from_seq, limit, last: false };
        self.call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { AuditClient::new(channel).list_audit_records(request).await }
        }).await
    }

    /// The newest `limit` records.
    pub async fn last_audit_records(&self, limit: u32) -> Result<ListAuditRecordsResponse, ClientError> {
        let request = ListAuditRecordsRequest { from_seq: 0, limit, last: true };
        self.call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { AuditClient::new(channel).list_audit_records(request).await }
        }).await
    }

    /// Up to `limit` checkpoints from the one covering `from_seq`.
    pub async fn list_audit_checkpoints(&self, from_seq: u64, limit: u32) -> Result<ListAuditCheckpointsResponse, ClientError> {
        let request = ListAuditCheckpointsRequest { from_seq, limit };
        self.call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { AuditClient::new(channel).list_audit_checkpoints(request).await }
        }).await
    }

    /// The audit checkpoint public key (PEM and SEC1).
    /// Where the trail stood at its newest commit (the anchor the server keeps outside the audit
    /// file), for `kmsctl audit verify --anchor`.
    pub async fn audit_anchor(&self) -> Result<AuditAnchor, ClientError> {
        self.call(Retry::Safe, |channel| {
            let request = self.request(GetAuditAnchorRequest {}.clone());
            async move { AuditClient::new(channel).get_audit_anchor(request).await }
        }).await
    }

    pub async fn audit_public_key(&self) -> Result<AuditPublicKey, ClientError> {
        self.call(Retry::Safe, |channel| {
            let request = self.request(GetAuditPublicKeyRequest {}.clone());
            async move { AuditClient::new(channel).get_audit_public_key(request).await }
        }).await
    }
}
