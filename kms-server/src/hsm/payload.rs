//! Payload encryption inside the HSM (state-secret levels): AES-256-GCM with the caller's 12-byte IV,
//! AAD and a 128-bit tag appended to the ciphertext.
//!
//! Must never hold plaintext outside `Zeroizing`, and never generate or reuse IVs (the caller owns IV
//! uniqueness).

use cryptoki::context::Function;
use cryptoki::error::RvError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use zeroize::Zeroizing;

use super::error::HsmError;
use super::pool::Worker;
use crate::classification::Classification;
use crate::ids::ObjectId;

const TAG_BITS: u64 = 128;

pub struct EncryptPayload {
    pub key: ObjectId,
    pub level: Classification,
    pub iv: [u8; 12],
    pub aad: Vec<u8>,
    pub plaintext: Zeroizing<Vec<u8>>,
}

/// The plaintext may be state-secret data: `Debug` shows only its length.
impl std::fmt::Debug for EncryptPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptPayload")
            .field("key", &self.key)
            .field("level", &self.level)
            .field("aad_len", &self.aad.len())
            .field("plaintext", &format_args!("<{} bytes redacted>", self.plaintext.len()))
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct DecryptPayload {
    pub key: ObjectId,
    pub level: Classification,
    pub iv: [u8; 12],
    pub aad: Vec<u8>,
    /// Ciphertext with the 16-byte tag appended.
    pub ciphertext: Vec<u8>,
}

/// A ciphertext to decrypt under one payload key and encrypt again under another, in one worker job.
#[derive(Clone, Debug)]
pub struct ReEncryptPayload {
    pub source: DecryptPayload,
    pub destination_key: ObjectId,
    pub destination_level: Classification,
    /// A fresh IV for the new ciphertext.
    pub destination_iv: [u8; 12],
    /// The new ciphertext's additional data (its header and the same context digest).
    pub destination_aad: Vec<u8>,
}

pub(crate) fn encrypt(w: &Worker, req: &EncryptPayload) -> Result<Vec<u8>, HsmError> {
    gcm_encrypt(w, &req.key, req.iv, &req.aad, &req.plaintext)
}

fn gcm_encrypt(w: &Worker, key: &ObjectId, iv: [u8; 12], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, HsmError> {
    w.with_key(key.as_bytes(), |key| {
        let mut iv = iv;
        let params = GcmParams::new(&mut iv, aad, TAG_BITS.into())?;
        Ok(w.session.encrypt(&Mechanism::AesGcm(params), key, plaintext)?)
    })
}

/// Decrypts and encrypts again without the plaintext leaving this worker job; the plaintext is
/// zeroized when the job ends, whatever the outcome.
pub(crate) fn reencrypt(w: &Worker, req: &ReEncryptPayload) -> Result<Vec<u8>, HsmError> {
    let plaintext = decrypt(w, &req.source)?;
    gcm_encrypt(w, &req.destination_key, req.destination_iv, &req.destination_aad, &plaintext)
}

/// SoftHSM reports a failed tag check as `CKR_GENERAL_ERROR`; the standard says
/// `CKR_ENCRYPTED_DATA_INVALID`.
const TAG_FAILURE_CODES: [RvError; 3] =
    [RvError::GeneralError, RvError::EncryptedDataInvalid, RvError::EncryptedDataLenRange];

pub(crate) fn decrypt(w: &Worker, req: &DecryptPayload) -> Result<Zeroizing<Vec<u8>>, HsmError> {
    w.with_key(req.key.as_bytes(), |key| {
        let mut iv = req.iv;
        let params = GcmParams::new(&mut iv, &req.aad, TAG_BITS.into())?;
        let plaintext = w.session.decrypt(&Mechanism::AesGcm(params), key, &req.ciphertext)?;
        Ok(Zeroizing::new(plaintext))
    })
    .map_err(|e| if e.is_failure_of(Function::Decrypt, &TAG_FAILURE_CODES) { HsmError::IntegrityCheckFailed } else { e })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::KeyId;

    #[test]
    fn debug_never_shows_the_plaintext() {
        let req = EncryptPayload {
            key: ObjectId::for_version(KeyId([1; 16]), 1),
            level: Classification::Secret,
            iv: [0; 12],
            aad: vec![0; 64],
            plaintext: Zeroizing::new(b"attack at dawn".to_vec()),
        };
        let shown = format!("{req:?}");
        assert!(shown.contains("<14 bytes redacted>"), "{shown}");
        assert!(!shown.contains("97, 116"), "{shown}"); // the bytes of "at"
        assert!(!shown.contains("attack"), "{shown}");
    }
}
