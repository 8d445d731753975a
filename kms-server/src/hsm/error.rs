//! The HSM layer's error type: which PKCS#11 function failed with which `CKR_` code, or which typed
//! rule refused the request.
//!
//! Must never carry key bytes, PINs or plaintext, in `Display` or `Debug`. The mapping to gRPC
//! statuses lives in `status.rs`, not here.

use std::fmt;
use std::path::PathBuf;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

use crate::classification::Classification;
use crate::ids::ObjectId;

/// Why an HSM operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// A PKCS#11 function returned an error code.
    #[error("{function} failed with {code}")]
    Pkcs11 { function: Pkcs11Function, code: Pkcs11Code },
    /// The `cryptoki` wrapper failed before or after the PKCS#11 call (conversion, missing symbol).
    #[error("PKCS#11 wrapper error: {detail}")]
    Library { detail: String },
    #[error("cannot load the PKCS#11 module {path}: {detail}")]
    ModuleLoad { path: PathBuf, detail: String },
    #[error("no token labelled {label:?} in any slot of the PKCS#11 module")]
    TokenNotFound { label: String },
    /// Login failed; the PIN is never part of the message.
    #[error("login to token {label:?} failed with {code}")]
    Login { label: String, code: Pkcs11Code },
    #[error("no HSM object with CKA_ID {id}")]
    ObjectNotFound { id: ObjectId },
    #[error("an HSM object with CKA_ID {id} already exists")]
    ObjectExists { id: ObjectId },
    #[error("{count} HSM objects share CKA_ID {id}; refusing to guess which one is meant")]
    DuplicateObjects { id: ObjectId, count: usize },
    #[error("token {token_label:?} is approved up to {approved}, not for {level}")]
    NotApproved { level: Classification, approved: Classification, token_label: String },
    #[error("data keys of level {level} are never released or generated; its data is encrypted inside the HSM")]
    ReleaseForbidden { level: Classification },
    /// A MAC, a wrapped key or a GCM tag did not verify: the blob was altered, or belongs to another
    /// key or context.
    #[error("integrity check failed: the blob was altered or belongs to another key or context")]
    IntegrityCheckFailed,
    /// The worker pool is shut down (or a worker failed while running the request).
    #[error("the HSM worker pool is closed")]
    PoolClosed,
    #[error("invalid HSM configuration: {reason}")]
    InvalidConfig { reason: &'static str },
    /// The audit signing key's private half is on the token without a readable public half. Making a
    /// new pair would orphan every checkpoint signed so far, so the service refuses to guess.
    #[error("the token's audit signing key (CKA_ID kms/audit-signing/v1) has no usable public half (kms/audit-signing/v1.pub); restore it from a backup of the token")]
    AuditKeyIncomplete,
    /// A call took longer than its deadline: the HSM is taken for hung.
    #[error("the HSM did not answer within {after_ms} ms")]
    Timeout { after_ms: u64 },
    /// The HSM is lost and being reopened; the request was not carried out (or, for a token write,
    /// may or may not have reached the token).
    #[error("the HSM is unreachable (for {for_ms} ms; last error: {last_error}); it is being reopened")]
    Unavailable { for_ms: u64, last_error: String },
    /// A reopened token lacks one of the service's own keys: it is not the token the service uses.
    #[error("the reopened token has no {what}: it is not the token this service was started with")]
    ServiceKeyMissing { what: &'static str },
    /// A reopened module shows another token under the label.
    #[error("the token labelled {label:?} has another serial number since the HSM was reopened: it is not the same token")]
    TokenChanged { label: String },
}

impl HsmError {
    /// The PKCS#11 code, if this is a PKCS#11 failure.
    pub fn pkcs11_code(&self) -> Option<Pkcs11Code> {
        match self {
            HsmError::Pkcs11 { code, .. } | HsmError::Login { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the error means the HSM itself is lost (its sessions dead, the device or token gone,
    /// the module not initialised, a call past its deadline), not that this one operation failed.
    /// `CKR_GENERAL_ERROR` is not among them: SoftHSM answers it for a tampered blob.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            HsmError::Timeout { .. } | HsmError::Unavailable { .. } => true,
            HsmError::Pkcs11 { code, .. } => matches!(
                code.0,
                RvError::DeviceError
                    | RvError::DeviceRemoved
                    | RvError::TokenNotPresent
                    | RvError::TokenNotRecognized
                    | RvError::SessionHandleInvalid
                    | RvError::SessionClosed
                    | RvError::UserNotLoggedIn
                    | RvError::CryptokiNotInitialized
            ),
            _ => false,
        }
    }

    /// The handle used was not (or no longer) valid: evict it from the cache and look it up again.
    pub(crate) fn is_stale_handle(&self) -> bool {
        matches!(
            self,
            HsmError::Pkcs11 { code, .. } if matches!(
                code.0,
                RvError::ObjectHandleInvalid
                    | RvError::KeyHandleInvalid
                    | RvError::WrappingKeyHandleInvalid
                    | RvError::UnwrappingKeyHandleInvalid
            )
        )
    }

    /// `function` failed with one of `codes`.
    pub(crate) fn is_failure_of(&self, function: Function, codes: &[RvError]) -> bool {
        matches!(self, HsmError::Pkcs11 { function: f, code } if *f == Pkcs11Function(function) && codes.contains(&code.0))
    }
}

impl From<CkError> for HsmError {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(rv, function) => {
                HsmError::Pkcs11 { function: Pkcs11Function(function), code: Pkcs11Code(rv) }
            }
            other => HsmError::Library { detail: other.to_string() },
        }
    }
}

/// A PKCS#11 function, displayed as its C name (`C_WrapKey`).
#[derive(Clone, Copy)]
pub struct Pkcs11Function(pub(crate) Function);

// cryptoki's `Function` has no `PartialEq`; it is a fieldless enum, so the discriminant is its identity.
impl PartialEq for Pkcs11Function {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(&self.0) == std::mem::discriminant(&other.0)
    }
}

impl Eq for Pkcs11Function {}

impl Pkcs11Function {
    pub fn name(&self) -> String {
        format!("C_{:?}", self.0)
    }
}

impl fmt::Display for Pkcs11Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "C_{:?}", self.0)
    }
}

impl fmt::Debug for Pkcs11Function {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A PKCS#11 return code, displayed as its `CKR_` name (`CKR_GENERAL_ERROR`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Pkcs11Code(pub(crate) RvError);

impl Pkcs11Code {
    /// The `CKR_` name, e.g. `CKR_KEY_HANDLE_INVALID`.
    pub fn name(&self) -> String {
        match self.0 {
            RvError::VendorDefined(v) => format!("CKR_VENDOR_DEFINED(0x{v:08x})"),
            RvError::UnknownErrorCode(v) => format!("CKR_UNKNOWN(0x{v:08x})"),
            rv => {
                // cryptoki's variant names are the CKR_ names in CamelCase.
                let camel = format!("{rv:?}");
                let mut s = String::from("CKR_");
                for (i, c) in camel.chars().enumerate() {
                    if c.is_ascii_uppercase() && i > 0 {
                        s.push('_');
                    }
                    s.push(c.to_ascii_uppercase());
                }
                s
            }
        }
    }
}

impl fmt::Display for Pkcs11Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl fmt::Debug for Pkcs11Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_functions_print_their_pkcs11_names() {
        let e = HsmError::from(CkError::Pkcs11(RvError::GeneralError, Function::UnwrapKey));
        assert_eq!(e.to_string(), "C_UnwrapKey failed with CKR_GENERAL_ERROR");
        assert_eq!(Pkcs11Code(RvError::KeyHandleInvalid).name(), "CKR_KEY_HANDLE_INVALID");
        assert_eq!(Pkcs11Code(RvError::CryptokiAlreadyInitialized).name(), "CKR_CRYPTOKI_ALREADY_INITIALIZED");
    }

    #[test]
    fn stale_handle_codes_are_recognised() {
        let stale = HsmError::from(CkError::Pkcs11(RvError::WrappingKeyHandleInvalid, Function::WrapKey));
        assert!(stale.is_stale_handle());
        let other = HsmError::from(CkError::Pkcs11(RvError::GeneralError, Function::WrapKey));
        assert!(!other.is_stale_handle());
    }
}
