//! Envelope data keys: generate a session AES-256 key, wrap it under a KEK (`CKM_AES_KEY_WRAP_PAD`),
//! bind it with the HSM MAC, and later verify and unwrap it. Each operation is one worker job.
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
    w.with_object(req.kek.as_bytes(), |kek| {
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
    w.with_object(req.kek.as_bytes(), |kek| {
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
