//! `kms.v1.DataKeys`: exchange services generate envelope data keys and unwrap them again; re-wrap
//! lives in [`super::rewrap`].
//!
//! A data key is generated and wrapped inside the HSM; the blob binds it to key, version, level and
//! encryption context with a MAC computed inside the HSM. Plaintext leaves only as the level allows
//! (see `authz`): in the clear for UNCLASSIFIED and PERSONAL, sealed to one of the caller's
//! registered recipient keys for SENSITIVE_PERSONAL (bound to the blob's key, version and context),
//! never for state-secret levels.
#![forbid(unsafe_code)]

use kms_proto::v1 as pb;
use kms_proto::v1::data_keys_server::DataKeys;
use tonic::{Request, Response, Status};

use super::{rewrap, AppState};
use crate::authz::{Authorized, KeyGrant, KeyUse, Release};
use crate::blob::WrappedKeyBlob;
use crate::context;
use crate::hsm::{BindingInput, GenerateDataKey, UnwrapDataKey};
use crate::ids::ObjectId;
use crate::recipient::{self, RecipientPublicKey, SealBinding};
use crate::status::ApiError;

pub struct DataKeysService {
    state: AppState,
}

impl DataKeysService {
    pub fn new(state: AppState) -> Self {
        DataKeysService { state }
    }

    async fn generate(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<pb::GenerateDataKeyResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let req = request.into_inner();
        let digest = context::digest(&req.encryption_context)?;
        crate::audit::facts::note_context(&digest.0);
        let release = match pb::DataKeyDelivery::try_from(req.delivery) {
            Ok(pb::DataKeyDelivery::PlaintextAndWrapped) => Some(Release::Plaintext),
            Ok(pb::DataKeyDelivery::WrappedOnly) => None,
            Ok(pb::DataKeyDelivery::WrappedToRecipient) => Some(Release::SealedToRecipient),
            Ok(pb::DataKeyDelivery::Unspecified) | Err(_) => {
                return Err(ApiError::invalid(
                    "delivery",
                    "must be PLAINTEXT_AND_WRAPPED, WRAPPED_ONLY or WRAPPED_TO_RECIPIENT",
                ))
            }
        };
        let fingerprint = recipient_fingerprint(&req.recipient_key_fingerprint)?;
        if release != Some(Release::SealedToRecipient) && fingerprint.is_some() {
            return Err(ApiError::invalid("recipient_key_fingerprint", "is only used with WRAPPED_TO_RECIPIENT"));
        }
        let key = self.state.key_by_name(&req.key).await?;
        let grant = self
            .state
            .policy
            .authorize_key_use(&caller, key, KeyUse::GenerateDataKey { release })?;
        let recipient = match release {
            Some(Release::SealedToRecipient) => Some(registered_recipient(&grant, fingerprint)?),
            _ => None,
        };
        let g = grant.action();
        let header = WrappedKeyBlob::header_for(g.key.classification, g.key.id, g.version);
        let generated = self
            .state
            .hsm
            .generate_data_key(GenerateDataKey {
                kek: ObjectId::for_version(g.key.id, g.version),
                level: g.key.classification,
                extract_plaintext: release.is_some(),
                binding: BindingInput { header: header.to_bytes().to_vec(), context_digest: digest.0 },
            })
            .await?;
        let blob = WrappedKeyBlob { header, wrapped: generated.wrapped, mac: generated.mac };
        let mut resp = pb::GenerateDataKeyResponse {
            wrapped_data_key: blob.to_bytes(),
            key_id: g.key.id.to_hex(),
            key_version: g.version,
            ..Default::default()
        };
        match (release, generated.plaintext) {
            (Some(Release::Plaintext), Some(pt)) => resp.plaintext_data_key = pt.expose().to_vec(),
            (Some(Release::SealedToRecipient), Some(pt)) => {
                let (to, fpr) = recipient.as_ref().ok_or(ApiError::Internal("recipient missing after it was resolved"))?;
                let binding = SealBinding { key_id: g.key.id, key_version: g.version, context_digest: digest.0 };
                resp.recipient_sealed_data_key = recipient::seal(to, pt.expose(), &binding)?;
                resp.recipient_key_fingerprint = crate::ids::hex(fpr);
            }
            (None, None) => {}
            _ => return Err(ApiError::Internal("HSM returned a plaintext that was not asked for, or none")),
        }
        Ok(resp)
    }

    async fn decrypt(
        &self,
        request: Request<pb::DecryptDataKeyRequest>,
    ) -> Result<pb::DecryptDataKeyResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let req = request.into_inner();
        let blob = WrappedKeyBlob::parse(&req.wrapped_data_key)?;
        let digest = context::digest(&req.encryption_context)?;
        crate::audit::facts::note_context(&digest.0);
        let fingerprint = recipient_fingerprint(&req.recipient_key_fingerprint)?;
        if !req.sealed && fingerprint.is_some() {
            return Err(ApiError::invalid("recipient_key_fingerprint", "is only used with sealed"));
        }
        let key = self.state.key_by_id(blob.header.key_id).await?;
        if !req.key.is_empty() && req.key != key.name() {
            return Err(ApiError::BlobForAnotherKey { named: req.key });
        }
        if key.classification() != blob.header.classification {
            return Err(ApiError::BlobLevelMismatch { in_blob: blob.header.classification, of_key: key.classification() });
        }
        let release = if req.sealed { Release::SealedToRecipient } else { Release::Plaintext };
        let grant = self.state.policy.authorize_key_use(
            &caller,
            key,
            KeyUse::DecryptDataKey { version: blob.header.key_version, release },
        )?;
        let recipient = if req.sealed { Some(registered_recipient(&grant, fingerprint)?) } else { None };
        let g = grant.action();
        let data_key = self
            .state
            .hsm
            .unwrap_data_key(UnwrapDataKey {
                kek: ObjectId::for_version(g.key.id, g.version),
                level: g.key.classification,
                wrapped: blob.wrapped,
                binding: BindingInput { header: blob.header.to_bytes().to_vec(), context_digest: digest.0 },
                mac: blob.mac,
            })
            .await?;
        let mut resp = pb::DecryptDataKeyResponse {
            key_id: g.key.id.to_hex(),
            key_version: g.version,
            classification: g.key.classification.to_proto() as i32,
            ..Default::default()
        };
        match &recipient {
            Some((to, fpr)) => {
                let binding = SealBinding { key_id: g.key.id, key_version: g.version, context_digest: digest.0 };
                resp.recipient_sealed_data_key = recipient::seal(to, data_key.expose(), &binding)?;
                resp.recipient_key_fingerprint = crate::ids::hex(fpr);
            }
            None => resp.plaintext_data_key = data_key.expose().to_vec(),
        }
        Ok(resp)
    }
}

/// A fingerprint from the wire (64 hex digits), or `None` when empty.
fn recipient_fingerprint(s: &str) -> Result<Option<[u8; 32]>, ApiError> {
    if s.is_empty() {
        return Ok(None);
    }
    crate::ids::unhex(s)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(Some)
        .ok_or_else(|| ApiError::invalid("recipient_key_fingerprint", "must be 64 hex digits (SHA-256 of the key's SEC1 point)"))
}

/// The registered recipient key the grant allows, parsed, and its fingerprint (noted for the audit
/// record).
fn registered_recipient(grant: &Authorized<KeyGrant>, fingerprint: Option<[u8; 32]>) -> Result<(RecipientPublicKey, [u8; 32]), ApiError> {
    let key = grant.recipient(fingerprint)?;
    let fpr = key.fingerprint();
    crate::audit::facts::note_subject(&format!("sealed to recipient key {}", crate::ids::hex(&fpr)));
    Ok((RecipientPublicKey::parse(&key.public_key)?, fpr))
}

#[tonic::async_trait]
impl DataKeys for DataKeysService {
    async fn generate_data_key(
        &self,
        request: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let key = Some(request.get_ref().key.clone());
        self.state.respond("GenerateDataKey", key, request, |r| self.generate(r)).await
    }

    async fn decrypt_data_key(
        &self,
        request: Request<pb::DecryptDataKeyRequest>,
    ) -> Result<Response<pb::DecryptDataKeyResponse>, Status> {
        let key = Some(request.get_ref().key.clone());
        self.state.respond("DecryptDataKey", key, request, |r| self.decrypt(r)).await
    }

    async fn re_wrap(&self, request: Request<pb::ReWrapRequest>) -> Result<Response<pb::ReWrapResponse>, Status> {
        // The record's key is the blob's own (noted when it is loaded); the destination goes in
        // its detail.
        self.state.respond("ReWrap", None, request, |r| rewrap::re_wrap(&self.state, r)).await
    }

    async fn re_wrap_batch(
        &self,
        request: Request<pb::ReWrapBatchRequest>,
    ) -> Result<Response<pb::ReWrapBatchResponse>, Status> {
        self.state.respond("ReWrapBatch", None, request, |r| rewrap::re_wrap_batch(&self.state, r)).await
    }
}
