//! `KmsClient`'s caller registry calls (`Callers`, role `officer`): register, update, list and
//! revoke the calling systems the service accepts.
//!
//! A caller is known by its identity, the URI subject alternative name of its client certificate
//! (`urn:kms:caller:tax-gateway`). The server checks every field (roles, system level 1-5,
//! clearance, allowed-key patterns); the client passes the `Caller` message through unchanged.
#![forbid(unsafe_code)]

use kms_proto::v1::callers_client::CallersClient;
use kms_proto::v1::{
    Caller, ListCallersRequest, RegisterCallerRequest, RevokeCallerRequest, UpdateCallerRequest,
};
use tonic::transport::Channel;

use super::KmsClient;
use crate::error::ClientError;

impl KmsClient {
    /// See [`KmsClient::key_admin`].
    pub fn callers(&self) -> CallersClient<Channel> {
        CallersClient::new(self.channel.clone())
    }

    /// Registers a new caller. Every field but `active`, `created_unix` and `updated_unix` is
    /// taken from `caller`; the server answers the stored registration.
    pub async fn register_caller(&self, caller: Caller) -> Result<Caller, ClientError> {
        let request = RegisterCallerRequest {
            caller: Some(caller),
        };
        self.call(self.callers().register_caller(self.request(request)))
            .await
    }

    /// Replaces the registration of the caller with `caller.identity`: agency, name, system
    /// level, clearance, roles and allowed keys all take the values given (send the unchanged
    /// ones too). Returns the stored registration.
    pub async fn update_caller(&self, caller: Caller) -> Result<Caller, ClientError> {
        let request = UpdateCallerRequest {
            caller: Some(caller),
        };
        self.call(self.callers().update_caller(self.request(request)))
            .await
    }

    /// The active callers; with `include_revoked`, the revoked ones too.
    pub async fn list_callers(&self, include_revoked: bool) -> Result<Vec<Caller>, ClientError> {
        let request = ListCallersRequest { include_revoked };
        Ok(self
            .call(self.callers().list_callers(self.request(request)))
            .await?
            .callers)
    }

    /// Revokes the caller `identity`: from now on every request it makes is refused. Returns the
    /// registration as revoked.
    pub async fn revoke_caller(&self, identity: &str) -> Result<Caller, ClientError> {
        let request = RevokeCallerRequest {
            identity: identity.to_owned(),
        };
        self.call(self.callers().revoke_caller(self.request(request)))
            .await
    }
}
