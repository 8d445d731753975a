//! `C_Initialize`, `C_Finalize`, `C_GetInfo`, and the slot, token and mechanism functions.
//!
//! `C_GetInfo` describes this module and is answered locally; everything about slots and tokens
//! comes from the server. Must never connect in `C_Initialize` (a module must load while its HSM is
//! down; the first call that needs the HSM connects).
#![allow(non_snake_case)]

use std::ffi::c_void;
use std::ptr;
use std::sync::{Arc, PoisonError};

use cryptoki_sys::*;
use hsm_sim_wire::{MechanismInfo, SlotInfo, TokenInfo};

use super::memory::{self, padded};
use super::{guard, module, MODULE};
use crate::config::Config;
use crate::module::Module;

pub(super) unsafe extern "C" fn C_Initialize(args: *mut c_void) -> CK_RV {
    guard(|| {
        if !args.is_null() {
            // SAFETY: PKCS#11: a non-NULL pInitArgs points to a CK_C_INITIALIZE_ARGS.
            let a = unsafe { ptr::read_unaligned(args as *const CK_C_INITIALIZE_ARGS) };
            memory::reserved_is_null(a.pReserved)?;
            let given = [a.CreateMutex.is_some(), a.DestroyMutex.is_some(), a.LockMutex.is_some(), a.UnlockMutex.is_some()];
            if given.iter().any(|g| *g) && !given.iter().all(|g| *g) {
                return Err(CKR_ARGUMENTS_BAD);
            }
            if a.flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS != 0 {
                // The connection needs a reader thread.
                return Err(CKR_NEED_TO_CREATE_THREADS);
            }
            if given[0] && a.flags & CKF_OS_LOCKING_OK == 0 {
                // Only the operating system's locks are used, never the caller's.
                return Err(CKR_CANT_LOCK);
            }
        }
        let mut m = MODULE.write().unwrap_or_else(PoisonError::into_inner);
        if m.is_some() {
            return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        }
        let config = Config::from_env().map_err(|e| {
            // The one message this module prints: without it a misconfigured caller only sees a code.
            eprintln!("hsm-sim-p11: {e}");
            CKR_FUNCTION_FAILED
        })?;
        *m = Some(Arc::new(Module::new(config)));
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_Finalize(reserved: *mut c_void) -> CK_RV {
    guard(|| {
        memory::reserved_is_null(reserved)?;
        let m = MODULE.write().unwrap_or_else(PoisonError::into_inner).take().ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)?;
        m.shutdown();
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_GetInfo(info: *mut CK_INFO) -> CK_RV {
    guard(|| {
        module()?;
        let version = env!("CARGO_PKG_VERSION").split('.').map(|p| p.parse::<u8>().unwrap_or(0)).collect::<Vec<_>>();
        let i = CK_INFO {
            cryptokiVersion: CK_VERSION { major: 2, minor: 40 },
            manufacturerID: padded("hsm-sim"),
            flags: 0,
            libraryDescription: padded("hsm-sim network HSM client"),
            libraryVersion: CK_VERSION {
                major: version.first().copied().unwrap_or(0),
                minor: version.get(1).copied().unwrap_or(0),
            },
        };
        // SAFETY: `info` is NULL (refused) or points to a writable CK_INFO.
        unsafe { memory::write(info, i) }?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_GetSlotList(token_present: CK_BBOOL, list: *mut CK_SLOT_ID, count: *mut CK_ULONG) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: `count` is NULL (refused) or readable.
        let space = unsafe { memory::space(list, count) }?;
        let slots = m.slot_list(token_present != CK_FALSE, space)?;
        // SAFETY: `count` is writable; a non-NULL `list` has room for `*count` ids.
        Ok(unsafe { memory::deliver_list(list, count, &slots) })
    })
}

pub(super) unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    guard(|| {
        let m = module()?;
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let SlotInfo { description, manufacturer, flags, hardware_version, firmware_version } = m.slot_info(slot)?;
        let i = CK_SLOT_INFO {
            slotDescription: description,
            manufacturerID: manufacturer,
            flags,
            hardwareVersion: CK_VERSION { major: hardware_version[0], minor: hardware_version[1] },
            firmwareVersion: CK_VERSION { major: firmware_version[0], minor: firmware_version[1] },
        };
        // SAFETY: `info` is non-NULL and points to a writable CK_SLOT_INFO.
        unsafe { memory::write(info, i) }?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    guard(|| {
        let m = module()?;
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let t: TokenInfo = m.token_info(slot)?;
        let c = t.counts;
        let i = CK_TOKEN_INFO {
            label: t.label,
            manufacturerID: t.manufacturer,
            model: t.model,
            serialNumber: t.serial,
            flags: t.flags,
            ulMaxSessionCount: c[0],
            ulSessionCount: c[1],
            ulMaxRwSessionCount: c[2],
            ulRwSessionCount: c[3],
            ulMaxPinLen: c[4],
            ulMinPinLen: c[5],
            ulTotalPublicMemory: c[6],
            ulFreePublicMemory: c[7],
            ulTotalPrivateMemory: c[8],
            ulFreePrivateMemory: c[9],
            hardwareVersion: CK_VERSION { major: t.hardware_version[0], minor: t.hardware_version[1] },
            firmwareVersion: CK_VERSION { major: t.firmware_version[0], minor: t.firmware_version[1] },
            utcTime: t.utc_time,
        };
        // SAFETY: `info` is non-NULL and points to a writable CK_TOKEN_INFO.
        unsafe { memory::write(info, i) }?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_GetMechanismList(
    slot: CK_SLOT_ID,
    list: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: `count` is NULL (refused) or readable.
        let space = unsafe { memory::space(list, count) }?;
        let mechanisms = m.mechanism_list(slot, space)?;
        // SAFETY: `count` is writable; a non-NULL `list` has room for `*count` entries.
        Ok(unsafe { memory::deliver_list(list, count, &mechanisms) })
    })
}

pub(super) unsafe extern "C" fn C_GetMechanismInfo(
    slot: CK_SLOT_ID,
    mechanism: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let MechanismInfo { min_key_size, max_key_size, flags } = m.mechanism_info(slot, mechanism)?;
        let i = CK_MECHANISM_INFO { ulMinKeySize: min_key_size, ulMaxKeySize: max_key_size, flags };
        // SAFETY: `info` is non-NULL and points to a writable CK_MECHANISM_INFO.
        unsafe { memory::write(info, i) }?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_InitToken(
    slot: CK_SLOT_ID,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
    label: *mut CK_UTF8CHAR,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        if label.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: PKCS#11: a non-NULL pLabel points to 32 bytes.
        let label = unsafe { ptr::read_unaligned(label as *const [u8; 32]) };
        // SAFETY: a non-NULL `pin` points to `pin_len` bytes.
        let pin = unsafe { memory::pin(pin, pin_len) }?;
        m.init_token(slot, pin, label)?;
        Ok(CKR_OK)
    })
}
