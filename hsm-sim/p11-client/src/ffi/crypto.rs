//! `C_EncryptInit`/`C_Encrypt`, `C_DecryptInit`/`C_Decrypt`, `C_DigestInit`/`C_Digest`/
//! `C_DigestUpdate`/`C_DigestFinal`, `C_SignInit`/`C_Sign`/`C_SignUpdate`/`C_SignFinal`,
//! `C_VerifyInit`/`C_Verify`/`C_VerifyUpdate`/`C_VerifyFinal`.
#![allow(non_snake_case)]

use cryptoki_sys::*;

use super::memory;
use super::{guard, module};
use crate::session_state::CryptoKind;

unsafe fn init(session: CK_SESSION_HANDLE, kind: CryptoKind, mechanism: *mut CK_MECHANISM, key: Option<CK_OBJECT_HANDLE>) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: a non-NULL `mechanism` points to a CK_MECHANISM with a valid parameter.
        let mech = unsafe { memory::mechanism(mechanism) }?;
        m.crypto_init(session, kind, mech, key)?;
        Ok(CKR_OK)
    })
}

unsafe fn single(
    session: CK_SESSION_HANDLE,
    kind: CryptoKind,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: a non-NULL `data` points to `data_len` bytes; `out_len` is NULL or readable.
        let (data, space) = unsafe { (memory::bytes(data, data_len)?, memory::space(out, out_len)?) };
        let result = m.crypto_single(session, kind, data, space)?;
        // SAFETY: `out_len` is writable; a non-NULL `out` has room for `*out_len` bytes.
        Ok(unsafe { memory::deliver(out, out_len, &result) })
    })
}

unsafe fn update(session: CK_SESSION_HANDLE, kind: CryptoKind, part: *mut CK_BYTE, part_len: CK_ULONG) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: a non-NULL `part` points to `part_len` bytes.
        let part = unsafe { memory::bytes(part, part_len) }?;
        m.crypto_update(session, kind, part)?;
        Ok(CKR_OK)
    })
}

unsafe fn finish(session: CK_SESSION_HANDLE, kind: CryptoKind, out: *mut CK_BYTE, out_len: *mut CK_ULONG) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: `out_len` is NULL (refused) or readable.
        let space = unsafe { memory::space(out, out_len) }?;
        let result = m.crypto_final(session, kind, space)?;
        // SAFETY: `out_len` is writable; a non-NULL `out` has room for `*out_len` bytes.
        Ok(unsafe { memory::deliver(out, out_len, &result) })
    })
}

pub(super) unsafe extern "C" fn C_EncryptInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { init(s, CryptoKind::Encrypt, mechanism, Some(key)) }
}

pub(super) unsafe extern "C" fn C_Encrypt(
    s: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { single(s, CryptoKind::Encrypt, data, data_len, out, out_len) }
}

pub(super) unsafe extern "C" fn C_DecryptInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { init(s, CryptoKind::Decrypt, mechanism, Some(key)) }
}

pub(super) unsafe extern "C" fn C_Decrypt(
    s: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { single(s, CryptoKind::Decrypt, data, data_len, out, out_len) }
}

pub(super) unsafe extern "C" fn C_DigestInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { init(s, CryptoKind::Digest, mechanism, None) }
}

pub(super) unsafe extern "C" fn C_Digest(
    s: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { single(s, CryptoKind::Digest, data, data_len, out, out_len) }
}

pub(super) unsafe extern "C" fn C_DigestUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { update(s, CryptoKind::Digest, part, part_len) }
}

pub(super) unsafe extern "C" fn C_DigestFinal(s: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { finish(s, CryptoKind::Digest, out, out_len) }
}

pub(super) unsafe extern "C" fn C_SignInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { init(s, CryptoKind::Sign, mechanism, Some(key)) }
}

pub(super) unsafe extern "C" fn C_Sign(
    s: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { single(s, CryptoKind::Sign, data, data_len, out, out_len) }
}

pub(super) unsafe extern "C" fn C_SignUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { update(s, CryptoKind::Sign, part, part_len) }
}

pub(super) unsafe extern "C" fn C_SignFinal(s: CK_SESSION_HANDLE, out: *mut CK_BYTE, out_len: *mut CK_ULONG) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { finish(s, CryptoKind::Sign, out, out_len) }
}

pub(super) unsafe extern "C" fn C_VerifyInit(s: CK_SESSION_HANDLE, mechanism: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { init(s, CryptoKind::Verify, mechanism, Some(key)) }
}

pub(super) unsafe extern "C" fn C_Verify(
    s: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    signature: *mut CK_BYTE,
    signature_len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: non-NULL pointers point to their lengths' worth of bytes.
        let (data, signature) = unsafe { (memory::bytes(data, data_len)?, memory::bytes(signature, signature_len)?) };
        m.verify_single(s, data, signature)?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_VerifyUpdate(s: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG) -> CK_RV {
    // SAFETY: the caller's PKCS#11 contract, passed on.
    unsafe { update(s, CryptoKind::Verify, part, part_len) }
}

pub(super) unsafe extern "C" fn C_VerifyFinal(s: CK_SESSION_HANDLE, signature: *mut CK_BYTE, signature_len: CK_ULONG) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: a non-NULL `signature` points to `signature_len` bytes.
        let signature = unsafe { memory::bytes(signature, signature_len) }?;
        m.verify_final(s, signature)?;
        Ok(CKR_OK)
    })
}
