//! The per-token blob-binding key and the MAC that binds a wrapped key or ciphertext to its header
//! and context: HMAC-SHA256 over `header || body || context_digest`, computed and checked inside the
//! HSM. The same key authenticates key-metadata rows (invariant 5), over inputs that start
//! with a different domain tag.
//!
//! Must never make the binding key extractable or readable, and never compare MACs outside the HSM.

use cryptoki::context::Function;
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::session::Session;

use super::error::HsmError;
use super::handles::{self, HandleCache};
use super::pool::Worker;
use super::templates::{self, BINDING_KEY_ID};

/// What a MAC binds besides the wrapped key or payload: the blob header and the digest of the
/// caller's encryption context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingInput {
    pub header: Vec<u8>,
    pub context_digest: [u8; 32],
}

impl BindingInput {
    fn mac_input(&self, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.header.len() + body.len() + self.context_digest.len());
        v.extend_from_slice(&self.header);
        v.extend_from_slice(body);
        v.extend_from_slice(&self.context_digest);
        v
    }
}

/// Finds the binding key, creating it if the token has none; caches its handle. Run once at open.
/// Returns whether it had to be created (a new token, or not the token the store was made with).
pub(crate) fn ensure_key(session: &Session, cache: &HandleCache) -> Result<bool, HsmError> {
    let (handle, created) = match handles::find(session, BINDING_KEY_ID)? {
        Some(h) => (h, false),
        None => {
            tracing::info!("creating the token's blob-binding MAC key");
            (session.generate_key(&Mechanism::GenericSecretKeyGen, &templates::binding_key())?, true)
        }
    };
    cache.insert(BINDING_KEY_ID, handle);
    Ok(created)
}

/// Finds the binding key without ever creating it (a re-opening after the HSM was lost) and caches
/// its handle; false if the token has none.
pub(crate) fn find_key(session: &Session, cache: &HandleCache) -> Result<bool, HsmError> {
    match handles::find(session, BINDING_KEY_ID)? {
        Some(h) => {
            cache.insert(BINDING_KEY_ID, h);
            Ok(true)
        }
        None => Ok(false),
    }
}

pub(crate) fn mac(w: &Worker, binding: &BindingInput, body: &[u8]) -> Result<[u8; 32], HsmError> {
    mac_bytes(w, &binding.mac_input(body))
}

/// Checks the MAC inside the HSM (`C_Verify`); a mismatch is [`HsmError::IntegrityCheckFailed`].
pub(crate) fn verify(w: &Worker, binding: &BindingInput, body: &[u8], mac: &[u8; 32]) -> Result<(), HsmError> {
    verify_bytes(w, &binding.mac_input(body), mac)
}

/// Domain tag of key-metadata MACs. Blob MAC inputs start with the blob magic `KMSB`, so a MAC made
/// for one use can never pass as the other.
const METADATA_TAG: &[u8] = b"KMSR\x01";

/// HMAC-SHA256 over a key-metadata record, prefixed with its domain tag.
pub(crate) fn mac_metadata(w: &Worker, record: &[u8]) -> Result<[u8; 32], HsmError> {
    mac_bytes(w, &tagged(record))
}

pub(crate) fn verify_metadata(w: &Worker, record: &[u8], mac: &[u8; 32]) -> Result<(), HsmError> {
    verify_bytes(w, &tagged(record), mac)
}

fn tagged(record: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(METADATA_TAG.len() + record.len());
    v.extend_from_slice(METADATA_TAG);
    v.extend_from_slice(record);
    v
}

fn mac_bytes(w: &Worker, input: &[u8]) -> Result<[u8; 32], HsmError> {
    let tag = w.with_key(BINDING_KEY_ID, |h| Ok(w.session.sign(&Mechanism::Sha256Hmac, h, input)?))?;
    tag.try_into()
        .map_err(|_| HsmError::Library { detail: "HMAC-SHA256 did not return 32 bytes".to_owned() })
}

fn verify_bytes(w: &Worker, input: &[u8], mac: &[u8; 32]) -> Result<(), HsmError> {
    w.with_key(BINDING_KEY_ID, |h| Ok(w.session.verify(&Mechanism::Sha256Hmac, h, input, mac)?))
        .map_err(|e| {
            if e.is_failure_of(Function::Verify, &[RvError::SignatureInvalid, RvError::SignatureLenRange]) {
                HsmError::IntegrityCheckFailed
            } else {
                e
            }
        })
}
