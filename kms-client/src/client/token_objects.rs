//! `KmsClient`'s calls about the token's objects that no key version names (`KeyAdmin`, role
//! `officer`): list them, adopt them back into the store, and file their destruction for a second
//! officer.
#![forbid(unsafe_code)]

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
        self.call(self.key_admin().get_hsm_health(self.request(GetHsmHealthRequest {}))).await
    }

    /// The service's objects on the token that no key version names.
    pub async fn list_unknown_objects(&self) -> Result<Vec<UnknownObject>, ClientError> {
        let request = ListUnknownObjectsRequest {};
        Ok(self.call(self.key_admin().list_unknown_objects(self.request(request))).await?.objects)
    }

    /// Adopts the named objects (hex CKA_IDs), or every adoptable one when `object_ids` is empty.
    pub async fn adopt_objects(&self, object_ids: &[String]) -> Result<Vec<AdoptResult>, ClientError> {
        let request = AdoptObjectsRequest { object_ids: object_ids.to_vec(), all: object_ids.is_empty() };
        Ok(self.call(self.key_admin().adopt_objects(self.request(request))).await?.results)
    }

    /// Files the destruction of an unknown object for a second officer; returns the request.
    pub async fn destroy_unknown_object(&self, object_id: &str) -> Result<Approval, ClientError> {
        let request = DestroyUnknownObjectRequest { object_id: object_id.to_owned() };
        self.call(self.key_admin().destroy_unknown_object(self.request(request)))
            .await?
            .pending_approval
            .ok_or(ClientError::BadResponse(ResponseProblem::MissingField { field: "pending_approval" }))
    }
}
