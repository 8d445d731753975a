//! `C_CreateObject`, `C_CopyObject`, `C_DestroyObject`, `C_GetAttributeValue`,
//! `C_SetAttributeValue`, `C_FindObjectsInit`, `C_FindObjects`, `C_FindObjectsFinal`.
#![allow(non_snake_case)]

use cryptoki_sys::*;

use super::memory;
use super::{guard, module};

pub(super) unsafe extern "C" fn C_CreateObject(
    session: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        if object.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: a non-NULL `template` points to `count` attributes (the caller's contract).
        let t = unsafe { memory::template(template, count) }?;
        let h = m.create_object(session, t)?;
        // SAFETY: `object` is non-NULL and writable.
        unsafe { memory::write(object, h) }?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_CopyObject(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    new_object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        if new_object.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: a non-NULL `template` points to `count` attributes.
        let t = unsafe { memory::template(template, count) }?;
        let h = m.copy_object(session, object, t)?;
        // SAFETY: `new_object` is non-NULL and writable.
        unsafe { memory::write(new_object, h) }?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_DestroyObject(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> CK_RV {
    guard(|| {
        module()?.destroy_object(session, object)?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_GetAttributeValue(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: a non-NULL `template` points to `count` attributes.
        let types = unsafe { memory::attribute_types(template, count) }?;
        let rv = m.get_attribute_values(session, object, types, |results| {
            // SAFETY: `template` points to `count` == `results.len()` writable attributes whose
            // non-NULL values have room for their lengths (the caller's contract).
            unsafe { memory::fill_attributes(template, results) }
        })?;
        Ok(rv)
    })
}

pub(super) unsafe extern "C" fn C_SetAttributeValue(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: a non-NULL `template` points to `count` attributes.
        let t = unsafe { memory::template(template, count) }?;
        m.set_attribute_values(session, object, t)?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_FindObjectsInit(session: CK_SESSION_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG) -> CK_RV {
    guard(|| {
        let m = module()?;
        // SAFETY: a non-NULL `template` points to `count` attributes.
        let t = unsafe { memory::template(template, count) }?;
        m.find_init(session, t)?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_FindObjects(
    session: CK_SESSION_HANDLE,
    objects: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module()?;
        if objects.is_null() || count.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let found = m.find_next(session, usize::try_from(max).unwrap_or(usize::MAX))?;
        for (i, h) in found.iter().enumerate() {
            // SAFETY: `objects` has room for `max` handles and `found` has at most `max`.
            unsafe { objects.add(i).write_unaligned(*h) };
        }
        // SAFETY: `count` is non-NULL and writable.
        unsafe { memory::write(count, found.len() as CK_ULONG) }?;
        Ok(CKR_OK)
    })
}

pub(super) unsafe extern "C" fn C_FindObjectsFinal(session: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| {
        module()?.find_final(session)?;
        Ok(CKR_OK)
    })
}
