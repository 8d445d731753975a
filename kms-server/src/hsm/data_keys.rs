//! Envelope data keys: generate a session AES-256 key, wrap it under a KEK (`CKM_AES_KEY_WRAP_PAD`),
//! bind it with the HSM MAC, later verify and unwrap it, or re-wrap it under another KEK without its
//! value ever leaving the HSM. Each operation is one worker job.
//!
//! Must never leave a data key as an object on the token (every session object made here is destroyed
//! on every path), never read a value unless the caller asked for the plaintext, and never hold a
//! plaintext key outside `Zeroizing`.

use std::fmt;

use cryptoki::context::Function;
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use zeroize::{Zeroize, Zeroizing};

use super::binding::{self, BindingInput};
use super::error::HsmError;
use super::pool::Worker;
use super::templates;
use crate::classification::Classification;
use crate::ids::ObjectId;

/// A plaintext 256-bit data key; zeroized on drop, redacted in `Debug`.
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    pub fn from_bytes(bytes: [u8; 32]) -> DataKey {
        DataKey(Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

#[derive(Clone, Debug)]
pub struct GenerateDataKey {
    pub kek: ObjectId,
    pub level: Classification,
    /// Also return the plaintext (only for levels that may release it).
    pub extract_plaintext: bool,
    pub binding: BindingInput,
}

#[derive(Debug)]
pub struct GeneratedDataKey {
    /// RFC 5649 (KWP) wrapping of the data key under the KEK: 40 bytes.
    pub wrapped: Vec<u8>,
    /// HMAC-SHA256 over `header || wrapped || context_digest` with the token's binding key.
    pub mac: [u8; 32],
    pub plaintext: Option<DataKey>,
}

#[derive(Clone, Debug)]
pub struct UnwrapDataKey {
    pub kek: ObjectId,
    pub level: Classification,
    pub wrapped: Vec<u8>,
    pub binding: BindingInput,
    pub mac: [u8; 32],
}

pub(crate) fn generate(w: &Worker, req: &GenerateDataKey) -> Result<GeneratedDataKey, HsmError> {
    let readable = req.extract_plaintext;
    w.with_key(req.kek.as_bytes(), |kek| {
        let dk = w.session.generate_key(&Mechanism::AesKeyGen, &templates::session_data_key(readable))?;
        let result = wrap_and_bind(w, kek, dk, req);
        // Always destroy the session copy, also when wrapping or MACing failed.
        let destroyed = w.session.destroy_object(dk);
        let out = result?;
        destroyed?;
        Ok(out)
    })
}

fn wrap_and_bind(w: &Worker, kek: ObjectHandle, dk: ObjectHandle, req: &GenerateDataKey) -> Result<GeneratedDataKey, HsmError> {
    let wrapped = w.session.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk)?;
    let plaintext = if req.extract_plaintext { Some(read_value(&w.session, dk)?) } else { None };
    let mac = binding::mac(w, &req.binding, &wrapped)?;
    Ok(GeneratedDataKey { wrapped, mac, plaintext })
}

/// How SoftHSM (and other tokens) report a wrapped key that does not unwrap under this KEK.
const UNWRAP_INTEGRITY_CODES: [RvError; 6] = [
    RvError::GeneralError,
    RvError::WrappedKeyInvalid,
    RvError::WrappedKeyLenRange,
    RvError::EncryptedDataInvalid,
    RvError::EncryptedDataLenRange,
    RvError::DataLenRange,
];

pub(crate) fn unwrap(w: &Worker, req: &UnwrapDataKey) -> Result<DataKey, HsmError> {
    binding::verify(w, &req.binding, &req.wrapped, &req.mac)?;
    let template = templates::unwrapped_data_key();
    w.with_key(req.kek.as_bytes(), |kek| {
        let dk = w
            .session
            .unwrap_key(&Mechanism::AesKeyWrapPad, kek, &req.wrapped, &template)
            .map_err(HsmError::from)
            .map_err(|e| {
                if e.is_failure_of(Function::UnwrapKey, &UNWRAP_INTEGRITY_CODES) {
                    HsmError::IntegrityCheckFailed
                } else {
                    e
                }
            })?;
        let value = read_value(&w.session, dk);
        let destroyed = w.session.destroy_object(dk);
        let key = value?;
        destroyed?;
        Ok(key)
    })
}

/// A wrapped data key to move from one KEK (and header) to another, inside the HSM.
#[derive(Clone, Debug)]
pub struct ReWrapDataKey {
    /// The blob as it is: its KEK, level, wrapped key, binding and MAC.
    pub source: UnwrapDataKey,
    /// The KEK to wrap under, and the level of its key.
    pub destination_kek: ObjectId,
    pub destination_level: Classification,
    /// The new blob's header and the same context digest.
    pub destination_binding: BindingInput,
}

/// The new blob's body. The data key itself never left the HSM.
#[derive(Debug)]
pub struct ReWrappedDataKey {
    pub wrapped: Vec<u8>,
    pub mac: [u8; 32],
}

/// Verifies the source MAC, unwraps the data key into a sensitive session object (its value can
/// never be read), wraps it under the destination KEK, MACs the new header and wrapping, and destroys
/// the session object on every path.
pub(crate) fn rewrap(w: &Worker, req: &ReWrapDataKey) -> Result<ReWrappedDataKey, HsmError> {
    let src = &req.source;
    binding::verify(w, &src.binding, &src.wrapped, &src.mac)?;
    let template = templates::rewrapped_data_key();
    let dk = w.with_key(src.kek.as_bytes(), |kek| {
        w.session
            .unwrap_key(&Mechanism::AesKeyWrapPad, kek, &src.wrapped, &template)
            .map_err(HsmError::from)
            .map_err(|e| {
                if e.is_failure_of(Function::UnwrapKey, &UNWRAP_INTEGRITY_CODES) {
                    HsmError::IntegrityCheckFailed
                } else {
                    e
                }
            })
    })?;
    // Its length cannot be checked here (SoftHSM leaves CKA_VALUE_LEN at 0 on unwrap, and the value
    // is sensitive); the source MAC proves the blob is one of ours, and ours wrap 32-byte keys.
    let result = w
        .with_key(req.destination_kek.as_bytes(), |kek| Ok(w.session.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk)?))
        .and_then(|wrapped| {
            let mac = binding::mac(w, &req.destination_binding, &wrapped)?;
            Ok(ReWrappedDataKey { wrapped, mac })
        });
    // Always destroy the session object, also when wrapping or MACing failed.
    let destroyed = w.session.destroy_object(dk);
    let out = result?;
    destroyed?;
    Ok(out)
}

/// Reads a readable session key's 32-byte value; the intermediate buffer is zeroized.
fn read_value(session: &Session, key: ObjectHandle) -> Result<DataKey, HsmError> {
    let mut attrs = session.get_attributes(key, &[AttributeType::Value])?;
    let mut out = None;
    for attr in attrs.iter_mut() {
        if let Attribute::Value(v) = attr {
            if let Ok(bytes) = <[u8; 32]>::try_from(v.as_slice()) {
                out = Some(DataKey::from_bytes(bytes));
            } else if out.is_none() {
                // An authentic (MAC-checked) blob that unwraps to another length: not ours.
                v.zeroize();
                return Err(HsmError::IntegrityCheckFailed);
            }
            v.zeroize();
        }
    }
    out.ok_or_else(|| HsmError::Library { detail: "the token did not return the data key's value".to_owned() })
}
