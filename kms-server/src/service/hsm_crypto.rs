//! `kms.v1.HsmCrypto`: payloads encrypted and decrypted inside the HSM with AES-256-GCM.
//!
//! This is how state-secret data is protected: the GCM key is a non-extractable token object and the
//! additional data binds each ciphertext to its key, version, level and encryption context. The IV is
//! 96 random bits from the operating system; key rotation keeps the number of messages per key far
//! below the 2^32 that random IVs allow.
#![forbid(unsafe_code)]

use kms_proto::v1 as pb;
use kms_proto::v1::hsm_crypto_server::HsmCrypto;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::AppState;
use crate::authz::KeyUse;
use crate::blob::{self, CiphertextBlob, IV_LEN};
use crate::context;
use crate::hsm::{DecryptPayload, EncryptPayload};
use crate::ids::ObjectId;
use crate::status::ApiError;

pub struct HsmCryptoService {
    state: AppState,
}

impl HsmCryptoService {
    pub fn new(state: AppState) -> Self {
        HsmCryptoService { state }
    }

    async fn encrypt(&self, request: Request<pb::EncryptRequest>) -> Result<pb::EncryptResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let mut req = request.into_inner();
        let plaintext = Zeroizing::new(std::mem::take(&mut req.plaintext));
        let limit = self.state.limits.max_payload_bytes;
        if plaintext.len() > limit {
            return Err(ApiError::invalid(
                "plaintext",
                format!("is {} bytes; the limit is {limit} bytes", plaintext.len()),
            ));
        }
        let digest = context::digest(&req.encryption_context)?;
        crate::audit::facts::note_context(&digest.0);
        let key = self.state.key_by_name(&req.key).await?;
        let grant = self.state.policy.authorize_key_use(&caller, key, KeyUse::Encrypt)?;
        let g = grant.action();
        let header = CiphertextBlob::header_for(g.key.classification, g.key.id, g.version, plaintext.len())
            .ok_or_else(|| ApiError::invalid("plaintext", "too large"))?;
        let mut iv = [0u8; IV_LEN];
        getrandom::getrandom(&mut iv).map_err(|_| ApiError::Internal("system random generator failed"))?;
        let ciphertext = self
            .state
            .hsm
            .encrypt(EncryptPayload {
                key: ObjectId::for_version(g.key.id, g.version),
                level: g.key.classification,
                iv,
                aad: blob::ciphertext_aad(&header, &digest.0),
                plaintext,
            })
            .await?;
        let out = CiphertextBlob { header, iv, ciphertext };
        Ok(pb::EncryptResponse { ciphertext: out.to_bytes(), key_id: g.key.id.to_hex(), key_version: g.version })
    }

    async fn decrypt(&self, request: Request<pb::DecryptRequest>) -> Result<pb::DecryptResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let req = request.into_inner();
        let blob = CiphertextBlob::parse(&req.ciphertext)?;
        let digest = context::digest(&req.encryption_context)?;
        crate::audit::facts::note_context(&digest.0);
        let key = self.state.key_by_id(blob.header.key_id).await?;
        if !req.key.is_empty() && req.key != key.name() {
            return Err(ApiError::BlobForAnotherKey { named: req.key });
        }
        if key.classification() != blob.header.classification {
            return Err(ApiError::BlobLevelMismatch { in_blob: blob.header.classification, of_key: key.classification() });
        }
        let grant = self
            .state
            .policy
            .authorize_key_use(&caller, key, KeyUse::Decrypt { version: blob.header.key_version })?;
        let g = grant.action();
        let plaintext = self
            .state
            .hsm
            .decrypt(DecryptPayload {
                key: ObjectId::for_version(g.key.id, g.version),
                level: g.key.classification,
                iv: blob.iv,
                aad: blob::ciphertext_aad(&blob.header, &digest.0),
                ciphertext: blob.ciphertext,
            })
            .await?;
        // prost needs a plain Vec<u8>: this copy is not zeroized on drop. It lives only until tonic
        // has encoded the response; the HSM layer's buffer is zeroized.
        Ok(pb::DecryptResponse { plaintext: plaintext.to_vec(), key_id: g.key.id.to_hex(), key_version: g.version })
    }
}

#[tonic::async_trait]
impl HsmCrypto for HsmCryptoService {
    async fn encrypt(&self, request: Request<pb::EncryptRequest>) -> Result<Response<pb::EncryptResponse>, Status> {
        let key = Some(request.get_ref().key.clone());
        self.state.respond("Encrypt", key, request, |r| HsmCryptoService::encrypt(self, r)).await
    }

    async fn decrypt(&self, request: Request<pb::DecryptRequest>) -> Result<Response<pb::DecryptResponse>, Status> {
        let key = Some(request.get_ref().key.clone());
        self.state.respond("Decrypt", key, request, |r| HsmCryptoService::decrypt(self, r)).await
    }
}
