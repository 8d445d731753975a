//! `C_OpenSession`, `C_CloseSession`, `C_CloseAllSessions`, `C_GetSessionInfo`, `C_Login`,
//! `C_Logout`, `C_InitPIN`, `C_SetPIN`.
//!
//! Notification callbacks are accepted and never called (PKCS#11 allows it). Must never copy a PIN
//! anywhere but into the request that carries it (a zeroized buffer).
#![allow(non_snake_case)]

use std::ffi::c_void;

use cryptoki_sys::*;

use super::memory;
use super::{guard, module};

pub(super) unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _application: *mut c_void,
    _notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        if session.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let h = m.open_session(slot, flags)?;
        // SAFETY: `session` is non-NULL and writable (the caller's contract).
        if let Err(rv) = unsafe { memory::write(session, h) } {
            // Not reachable (checked above); never leak a session the caller cannot name.
            let _ = m.close_session(h);
            return Err(rv);
        }
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_CloseSession(session: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| {
        module()?.close_session(session)?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    guard(|| {
        module()?.close_all_sessions(slot)?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_GetSessionInfo(session: CK_SESSION_HANDLE, info: *mut CK_SESSION_INFO) -> CK_RV {
    guard(|| {
        let m = module()?;
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let i = m.session_info(session)?;
        let out = CK_SESSION_INFO { slotID: i.slot, state: i.state, flags: i.flags, ulDeviceError: i.device_error };
        // SAFETY: `info` is non-NULL and points to a writable CK_SESSION_INFO.
        unsafe { memory::write(info, out) }?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_Login(
    session: CK_SESSION_HANDLE,
    user_type: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: a non-NULL `pin` points to `pin_len` bytes.
        let pin = unsafe { memory::pin(pin, pin_len) }?;
        m.login(session, user_type, pin)?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_Logout(session: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| {
        module()?.logout(session)?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_InitPIN(session: CK_SESSION_HANDLE, pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: a non-NULL `pin` points to `pin_len` bytes.
        let pin = unsafe { memory::pin(pin, pin_len) }?;
        m.init_pin(session, pin)?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_SetPIN(
    session: CK_SESSION_HANDLE,
    old_pin: *mut CK_UTF8CHAR,
    old_len: CK_ULONG,
    new_pin: *mut CK_UTF8CHAR,
    new_len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: non-NULL PIN pointers point to their lengths' worth of bytes.
        let (old_pin, new_pin) = unsafe { (memory::pin(old_pin, old_len)?, memory::pin(new_pin, new_len)?) };
        m.set_pin(session, old_pin, new_pin)?;
        Ok(CKR_OK)
    })
}
