//! The C ABI: `C_GetFunctionList`, the function list, and one thin entry point per PKCS#11
//! function, grouped by family as in [`crate::ops`].
//!
//! Each entry point checks that the module is initialised, turns the caller's pointers into Rust
//! values ([`memory`]), calls the safe operation, and writes the answer back. Panics never cross
//! the C boundary ([`guard`] turns them into `CKR_GENERAL_ERROR`). This is the only place with
//! `unsafe`; every block says why it is sound. Must never keep a caller's pointer past the call.

mod crypto;
mod general;
mod keys;
mod memory;
mod objects;
mod sessions;
mod unsupported;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, PoisonError, RwLock};

use cryptoki_sys::*;

use crate::module::{Module, Rv};

/// The initialised module, between `C_Initialize` and `C_Finalize`.
static MODULE: RwLock<Option<Arc<Module>>> = RwLock::new(None);

fn module() -> Result<Arc<Module>, Rv> {
    MODULE.read().unwrap_or_else(PoisonError::into_inner).clone().ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)
}

/// Runs an entry point's body; a panic becomes `CKR_GENERAL_ERROR` instead of unwinding into C.
fn guard(body: impl FnOnce() -> Result<Rv, Rv>) -> CK_RV {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(rv)) | Ok(Err(rv)) => rv,
        Err(_) => CKR_GENERAL_ERROR,
    }
}

/// PKCS#11 2.40 functions, in the order of `CK_FUNCTION_LIST`.
static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION { major: 2, minor: 40 },
    C_Initialize: Some(general::C_Initialize),
    C_Finalize: Some(general::C_Finalize),
    C_GetInfo: Some(general::C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(general::C_GetSlotList),
    C_GetSlotInfo: Some(general::C_GetSlotInfo),
    C_GetTokenInfo: Some(general::C_GetTokenInfo),
    C_GetMechanismList: Some(general::C_GetMechanismList),
    C_GetMechanismInfo: Some(general::C_GetMechanismInfo),
    C_InitToken: Some(general::C_InitToken),
    C_InitPIN: Some(sessions::C_InitPIN),
    C_SetPIN: Some(sessions::C_SetPIN),
    C_OpenSession: Some(sessions::C_OpenSession),
    C_CloseSession: Some(sessions::C_CloseSession),
    C_CloseAllSessions: Some(sessions::C_CloseAllSessions),
    C_GetSessionInfo: Some(sessions::C_GetSessionInfo),
    C_GetOperationState: Some(unsupported::C_GetOperationState),
    C_SetOperationState: Some(unsupported::C_SetOperationState),
    C_Login: Some(sessions::C_Login),
    C_Logout: Some(sessions::C_Logout),
    C_CreateObject: Some(objects::C_CreateObject),
    C_CopyObject: Some(objects::C_CopyObject),
    C_DestroyObject: Some(objects::C_DestroyObject),
    C_GetObjectSize: Some(unsupported::C_GetObjectSize),
    C_GetAttributeValue: Some(objects::C_GetAttributeValue),
    C_SetAttributeValue: Some(objects::C_SetAttributeValue),
    C_FindObjectsInit: Some(objects::C_FindObjectsInit),
    C_FindObjects: Some(objects::C_FindObjects),
    C_FindObjectsFinal: Some(objects::C_FindObjectsFinal),
    C_EncryptInit: Some(crypto::C_EncryptInit),
    C_Encrypt: Some(crypto::C_Encrypt),
    C_EncryptUpdate: Some(unsupported::C_EncryptUpdate),
    C_EncryptFinal: Some(unsupported::C_EncryptFinal),
    C_DecryptInit: Some(crypto::C_DecryptInit),
    C_Decrypt: Some(crypto::C_Decrypt),
    C_DecryptUpdate: Some(unsupported::C_DecryptUpdate),
    C_DecryptFinal: Some(unsupported::C_DecryptFinal),
    C_DigestInit: Some(crypto::C_DigestInit),
    C_Digest: Some(crypto::C_Digest),
    C_DigestUpdate: Some(crypto::C_DigestUpdate),
    C_DigestKey: Some(unsupported::C_DigestKey),
    C_DigestFinal: Some(crypto::C_DigestFinal),
    C_SignInit: Some(crypto::C_SignInit),
    C_Sign: Some(crypto::C_Sign),
    C_SignUpdate: Some(crypto::C_SignUpdate),
    C_SignFinal: Some(crypto::C_SignFinal),
    C_SignRecoverInit: Some(unsupported::C_SignRecoverInit),
    C_SignRecover: Some(unsupported::C_SignRecover),
    C_VerifyInit: Some(crypto::C_VerifyInit),
    C_Verify: Some(crypto::C_Verify),
    C_VerifyUpdate: Some(crypto::C_VerifyUpdate),
    C_VerifyFinal: Some(crypto::C_VerifyFinal),
    C_VerifyRecoverInit: Some(unsupported::C_VerifyRecoverInit),
    C_VerifyRecover: Some(unsupported::C_VerifyRecover),
    C_DigestEncryptUpdate: Some(unsupported::C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(unsupported::C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(unsupported::C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(unsupported::C_DecryptVerifyUpdate),
    C_GenerateKey: Some(keys::C_GenerateKey),
    C_GenerateKeyPair: Some(keys::C_GenerateKeyPair),
    C_WrapKey: Some(keys::C_WrapKey),
    C_UnwrapKey: Some(keys::C_UnwrapKey),
    C_DeriveKey: Some(keys::C_DeriveKey),
    C_SeedRandom: Some(keys::C_SeedRandom),
    C_GenerateRandom: Some(keys::C_GenerateRandom),
    C_GetFunctionStatus: Some(unsupported::C_GetFunctionStatus),
    C_CancelFunction: Some(unsupported::C_CancelFunction),
    C_WaitForSlotEvent: Some(unsupported::C_WaitForSlotEvent),
};

/// The module's one exported symbol (cryptoki 0.12 falls back to it when `C_GetInterface` is
/// absent, as do pkcs11-tool and p11-kit).
///
/// # Safety
/// `list` must be NULL or point to writable memory for one pointer.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    guard(|| {
        // The list is immutable; PKCS#11 callers only read through this pointer.
        let p = &FUNCTION_LIST as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST;
        // SAFETY: `list` is NULL (refused) or writable for one pointer.
        unsafe { memory::write(list, p) }?;
        Ok(CKR_OK)
    })
}
