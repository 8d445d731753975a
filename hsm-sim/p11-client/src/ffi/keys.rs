//! `C_GenerateKey`, `C_GenerateKeyPair`, `C_WrapKey`, `C_UnwrapKey`, `C_DeriveKey`,
//! `C_SeedRandom`, `C_GenerateRandom`.
#![allow(non_snake_case)]

use cryptoki_sys::*;
use hsm_sim_wire::Blob;

use super::memory;
use super::{guard, module};

pub(super) unsafe extern "C" fn C_GenerateKey(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        if key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: non-NULL pointers point to a mechanism and `count` attributes.
        let (mech, t) = unsafe { (memory::mechanism(mechanism)?, memory::template(template, count)?) };
        let h = m.generate_key(session, mech, t)?;
        // SAFETY: `key` is non-NULL and writable.
        unsafe { memory::write(key, h) }?;
        Ok(CKR_OK)
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) unsafe extern "C" fn C_GenerateKeyPair(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    public_template: *mut CK_ATTRIBUTE,
    public_count: CK_ULONG,
    private_template: *mut CK_ATTRIBUTE,
    private_count: CK_ULONG,
    public_key: *mut CK_OBJECT_HANDLE,
    private_key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        if public_key.is_null() || private_key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: non-NULL pointers point to a mechanism and to their counts of attributes.
        let (mech, public, private) = unsafe {
            (
                memory::mechanism(mechanism)?,
                memory::template(public_template, public_count)?,
                memory::template(private_template, private_count)?,
            )
        };
        let (pubh, privh) = m.generate_key_pair(session, mech, public, private)?;
        // SAFETY: both out-pointers are non-NULL and writable.
        unsafe {
            memory::write(public_key, pubh)?;
            memory::write(private_key, privh)?;
        }
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_WrapKey(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    wrapping_key: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    wrapped: *mut CK_BYTE,
    wrapped_len: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: a non-NULL mechanism pointer points to a mechanism; `wrapped_len` is NULL
        // (refused) or readable.
        let (mech, space) = unsafe { (memory::mechanism(mechanism)?, memory::space(wrapped, wrapped_len)?) };
        let out = m.wrap_key(session, mech, wrapping_key, key, space)?;
        // SAFETY: `wrapped_len` is writable; a non-NULL `wrapped` has room for `*wrapped_len`.
        Ok(unsafe { memory::deliver(wrapped, wrapped_len, &out) })
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) unsafe extern "C" fn C_UnwrapKey(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    unwrapping_key: CK_OBJECT_HANDLE,
    wrapped: *mut CK_BYTE,
    wrapped_len: CK_ULONG,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        if key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: non-NULL pointers point to a mechanism, `wrapped_len` bytes, `count` attributes.
        let (mech, wrapped, t) = unsafe {
            (memory::mechanism(mechanism)?, memory::bytes(wrapped, wrapped_len)?, memory::template(template, count)?)
        };
        let h = m.unwrap_key(session, mech, unwrapping_key, Blob::from_slice(wrapped), t)?;
        // SAFETY: `key` is non-NULL and writable.
        unsafe { memory::write(key, h) }?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_DeriveKey(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    base_key: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        if key.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: non-NULL pointers point to a mechanism and `count` attributes.
        let (mech, t) = unsafe { (memory::mechanism(mechanism)?, memory::template(template, count)?) };
        let h = m.derive_key(session, mech, base_key, t)?;
        // SAFETY: `key` is non-NULL and writable.
        unsafe { memory::write(key, h) }?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_SeedRandom(session: CK_SESSION_HANDLE, seed: *mut CK_BYTE, seed_len: CK_ULONG) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: a non-NULL `seed` points to `seed_len` bytes.
        let seed = unsafe { memory::bytes(seed, seed_len) }?;
        m.seed_random(session, Blob::from_slice(seed))?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_GenerateRandom(session: CK_SESSION_HANDLE, out: *mut CK_BYTE, len: CK_ULONG) -> CK_RV {
    guard(|| {
        let m = module()?;
        let n = usize::try_from(len).map_err(|_| CKR_DATA_LEN_RANGE)?;
        if n == 0 {
            return Ok(CKR_OK);
        }
        if out.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let random = m.generate_random(session, n)?;
        // SAFETY: `out` has room for `len` bytes and `random` has exactly `len`; ours, so no overlap.
        unsafe { std::ptr::copy_nonoverlapping(random.as_ptr(), out, n) };
        Ok(CKR_OK)
    })
}
