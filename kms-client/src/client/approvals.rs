//! `KmsClient`'s two-officer calls (`Approvals`): list the requests, approve or reject one.
//!
//! The server enforces who may decide (a different officer than the requester, with the level and
//! clearance for the key); the client only carries the request id, the hex string the server gave.
#![forbid(unsafe_code)]

use crate::client::Retry;
use kms_proto::v1::approvals_client::ApprovalsClient;
use kms_proto::v1::{Approval, DecideApprovalRequest, Key, ListApprovalsRequest};
use tonic::transport::Channel;

use super::KmsClient;
use crate::error::{ClientError, ResponseProblem};

/// An approved request and the key after the change it made.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovedChange {
    pub approval: Approval,
    /// The key after the change (key actions).
    pub key: Option<Key>,
    /// The caller after the change (caller actions).
    pub caller: Option<kms_proto::v1::Caller>,
}

impl KmsClient {
    /// See [`KmsClient::key_admin`].
    pub fn approvals(&self) -> ApprovalsClient<Channel> {
        ApprovalsClient::new(self.channel())
    }

    /// The pending requests; with `include_decided`, also approved, rejected and expired ones
    /// (newest first, as many as the server returns).
    pub async fn list_approvals(
        &self,
        include_decided: bool,
    ) -> Result<Vec<Approval>, ClientError> {
        let request = ListApprovalsRequest { include_decided };
        Ok(self
            .call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { ApprovalsClient::new(channel).list_approvals(request).await }
        })
            .await?
            .approvals)
    }

    /// Approves the pending request `id`; the server makes the change and returns the key.
    pub async fn approve(&self, id: &str) -> Result<ApprovedChange, ClientError> {
        let request = DecideApprovalRequest { id: id.to_owned() };
        let response = self
            .call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { ApprovalsClient::new(channel).approve(request).await }
        })
            .await?;
        let missing = |field| ClientError::BadResponse(ResponseProblem::MissingField { field });
        Ok(ApprovedChange {
            approval: response.approval.ok_or_else(|| missing("approval"))?,
            key: response.key,
            caller: response.caller,
        })
    }

    /// Rejects the pending request `id`; nothing changes.
    pub async fn reject(&self, id: &str) -> Result<Approval, ClientError> {
        let request = DecideApprovalRequest { id: id.to_owned() };
        self.call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { ApprovalsClient::new(channel).reject(request).await }
        })
            .await
    }
}
