//! `KmsClient`'s caller registry calls (`Callers`, role `officer`): register, update, list and
//! revoke the calling systems the service accepts, and manage their recipient keys.
//!
//! A caller is known by its identity, the URI subject alternative name of its client certificate
//! (`urn:kms:caller:tax-gateway`). The server checks every field (roles, system level 1-5,
//! clearance, allowed-key patterns) and the officer's own bounds; the client passes the `Caller`
//! message through unchanged. A change that needs a second officer (the officer or auditor role,
//! a raised clearance, revoking an officer or auditor) comes back as an approval request.
#![forbid(unsafe_code)]

use crate::client::Retry;
use kms_proto::v1::callers_client::CallersClient;
use kms_proto::v1::{
    AddRecipientKeyRequest, Approval, Caller, CallerChangeResponse, ListCallersRequest, ListCallersResponse,
    RegisterCallerRequest, RemoveRecipientKeyRequest, RevokeCallerRequest, UpdateCallerRequest,
};
use tonic::transport::Channel;

use super::KmsClient;
use crate::error::{ClientError, ResponseProblem};

/// What a caller change did.
#[derive(Clone, Debug, PartialEq)]
pub enum CallerChange {
    /// Made; the registration as it is now.
    Made(Caller),
    /// Filed for a second officer (not made); `caller` is the registration as it still is (none
    /// for a registration).
    AwaitingApproval { caller: Option<Caller>, approval: Approval },
}

impl CallerChange {
    fn from_wire(response: CallerChangeResponse) -> Result<CallerChange, ClientError> {
        match (response.caller, response.pending_approval) {
            (caller, Some(approval)) => Ok(CallerChange::AwaitingApproval { caller, approval }),
            (Some(caller), None) => Ok(CallerChange::Made(caller)),
            (None, None) => Err(ClientError::BadResponse(ResponseProblem::MissingField { field: "caller" })),
        }
    }
}

impl KmsClient {
    /// See [`KmsClient::key_admin`].
    pub fn callers(&self) -> CallersClient<Channel> {
        CallersClient::new(self.channel())
    }

    /// Registers a new caller. Every field but `active`, the times and the recipient keys is taken
    /// from `caller`.
    pub async fn register_caller(&self, caller: Caller) -> Result<CallerChange, ClientError> {
        let request = RegisterCallerRequest { caller: Some(caller) };
        CallerChange::from_wire(self.call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { CallersClient::new(channel).register_caller(request).await }
        }).await?)
    }

    /// Replaces the registration of the caller with `caller.identity`: agency, name, system
    /// level, clearance, roles and allowed keys all take the values given (send the unchanged
    /// ones too).
    pub async fn update_caller(&self, caller: Caller) -> Result<CallerChange, ClientError> {
        let request = UpdateCallerRequest { caller: Some(caller) };
        CallerChange::from_wire(self.call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { CallersClient::new(channel).update_caller(request).await }
        }).await?)
    }

    /// The active callers the officer may see; with `include_revoked`, the revoked ones too.
    pub async fn list_callers(&self, include_revoked: bool) -> Result<Vec<Caller>, ClientError> {
        Ok(self.list_callers_full(include_revoked).await?.callers)
    }

    /// [`KmsClient::list_callers`], with the registrations refused as forged.
    pub async fn list_callers_full(&self, include_revoked: bool) -> Result<ListCallersResponse, ClientError> {
        let request = ListCallersRequest { include_revoked };
        self.call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { CallersClient::new(channel).list_callers(request).await }
        }).await
    }

    /// Revokes the caller `identity`: from now on every request it makes is refused.
    pub async fn revoke_caller(&self, identity: &str) -> Result<CallerChange, ClientError> {
        let request = RevokeCallerRequest { identity: identity.to_owned() };
        CallerChange::from_wire(self.call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { CallersClient::new(channel).revoke_caller(request).await }
        }).await?)
    }

    /// Registers a recipient public key (PEM, SubjectPublicKeyInfo) for `identity`.
    pub async fn add_recipient_key(&self, identity: &str, pem: &str) -> Result<Caller, ClientError> {
        let request = AddRecipientKeyRequest { identity: identity.to_owned(), public_key: Vec::new(), pem: pem.to_owned() };
        self.call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { CallersClient::new(channel).add_recipient_key(request).await }
        }).await
    }

    /// Removes the recipient key with this fingerprint from `identity`.
    pub async fn remove_recipient_key(&self, identity: &str, fingerprint: &str) -> Result<Caller, ClientError> {
        let request = RemoveRecipientKeyRequest { identity: identity.to_owned(), fingerprint: fingerprint.to_owned() };
        self.call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { CallersClient::new(channel).remove_recipient_key(request).await }
        }).await
    }
}
