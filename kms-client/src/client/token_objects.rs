//! `KmsClient`'s calls about the token's objects that no key version names (`KeyAdmin`, role
//! `officer`): list them, adopt them back into the store, and file their destruction for a second
//! officer.
#![forbid(unsafe_code)]

use crate::client::Retry;
use kms_proto::v1::key_admin_client::KeyAdminClient;
use kms_proto::v1::{
    AdoptObjectsRequest, AdoptResult, Approval, DestroyUnknownObjectRequest, GetHsmHealthRequest, HsmHealth, ListUnknownObjectsRequest,
    UnknownObject,
};

use super::KmsClient;
use crate::error::{ClientError, ResponseProblem};

impl KmsClient {
    /// How the server's HSM is doing: state, reconnects, last error, session pools (officers and
    /// auditors).
    pub async fn hsm_health(&self) -> Result<HsmHealth, ClientError> {
        self.call(Retry::Safe, |channel| {
            let request = self.request(GetHsmHealthRequest {}.clone());
            async move { KeyAdminClient::new(channel).get_hsm_health(request).await }
        }).await
    }

    /// The service's objects on the token that no key version names.
    pub async fn list_unknown_objects(&self) -> Result<Vec<UnknownObject>, ClientError> {
        let request = ListUnknownObjectsRequest {};
        Ok(self.call(Retry::Safe, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).list_unknown_objects(request).await }
        }).await?.objects)
    }

    /// Adopts the named objects (hex CKA_IDs), or every adoptable one when `object_ids` is empty.
    pub async fn adopt_objects(&self, object_ids: &[String]) -> Result<Vec<AdoptResult>, ClientError> {
        let request = AdoptObjectsRequest { object_ids: object_ids.to_vec(), all: object_ids.is_empty() };
        Ok(self.call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).adopt_objects(request).await }
        }).await?.results)
    }

    /// Files the destruction of an unknown object for a second officer; returns the request.
    pub async fn destroy_unknown_object(&self, object_id: &str) -> Result<Approval, ClientError> {
        let request = DestroyUnknownObjectRequest { object_id: object_id.to_owned() };
        self.call(Retry::Never, |channel| {
            let request = self.request(request.clone());
            async move { KeyAdminClient::new(channel).destroy_unknown_object(request).await }
        })
            .await?
            .pending_approval
            .ok_or(ClientError::BadResponse(ResponseProblem::MissingField { field: "pending_approval" }))
    }
}
