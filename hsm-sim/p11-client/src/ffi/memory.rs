//! Reading the caller's memory into wire values and writing answers back, by the PKCS#11 rules:
//! templates (with nested templates), mechanisms and their parameters, byte strings, PINs, and the
//! size-query convention for outputs and lists.
//!
//! Every function here trusts the pointers it is given exactly as far as PKCS#11 lets a module
//! trust its caller (a non-NULL pointer points to as many valid items as its length says) and no
//! further: NULLs, lengths and counts are checked before use, values are read unaligned. Must never
//! keep a pointer past the call, nor write past a length the caller gave.

use std::ffi::c_void;
use std::mem::size_of;
use std::ptr;

use cryptoki_sys::*;
use hsm_sim_wire::{
    param_kind, value_kind, AttrResult, AttrValue, Attribute, Blob, MechParam, Mechanism, ParamKind, ValueKind,
    MAX_AAD, MAX_ATTRIBUTE_VALUE, MAX_FRAME, MAX_PARAM, MAX_PIN, MAX_TEMPLATE,
};

use crate::module::{Rv, Space};

fn len_of(len: CK_ULONG, max: usize, too_long: Rv) -> Result<usize, Rv> {
    usize::try_from(len).ok().filter(|l| *l <= max).ok_or(too_long)
}

/// The `len` bytes at `p` (empty for a zero length, whatever `p` is).
///
/// # Safety
/// A non-NULL `p` must point to `len` readable bytes that stay unchanged during the call.
pub(super) unsafe fn bytes<'a>(p: *const u8, len: CK_ULONG) -> Result<&'a [u8], Rv> {
    let len = len_of(len, MAX_FRAME, CKR_DATA_LEN_RANGE)?;
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: `p` is non-NULL and points to `len` readable bytes (the caller's contract); `len`
    // is at most 16 MiB, so the slice fits `isize`.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A PIN: `None` for a NULL pointer with zero length (protected authentication path).
///
/// # Safety
/// As [`bytes`].
pub(super) unsafe fn pin(p: *const u8, len: CK_ULONG) -> Result<Option<Blob>, Rv> {
    if p.is_null() && len == 0 {
        return Ok(None);
    }
    let len = len_of(len, MAX_PIN, CKR_PIN_LEN_RANGE)?;
    // SAFETY: the caller's contract, passed on.
    Ok(Some(Blob::from_slice(unsafe { bytes(p, len as CK_ULONG) }?)))
}

/// The `count` attributes at `p`, typed by [`value_kind`].
///
/// # Safety
/// A non-NULL `p` must point to `count` `CK_ATTRIBUTE`s whose non-NULL `pValue`s point to
/// `ulValueLen` readable bytes (for nested templates: to `CK_ATTRIBUTE` arrays, recursively).
pub(super) unsafe fn template(p: *const CK_ATTRIBUTE, count: CK_ULONG) -> Result<Vec<Attribute>, Rv> {
    // SAFETY: the caller's contract, passed on.
    unsafe { template_at(p, count, 0) }
}

unsafe fn template_at(p: *const CK_ATTRIBUTE, count: CK_ULONG, depth: u8) -> Result<Vec<Attribute>, Rv> {
    let count = len_of(count, MAX_TEMPLATE, CKR_ARGUMENTS_BAD)?;
    if count == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        // SAFETY: `p` points to `count` attributes; `i < count`. Unaligned: a nested template is
        // any buffer of the caller's.
        let a = unsafe { ptr::read_unaligned(p.add(i)) };
        let len = len_of(a.ulValueLen, MAX_ATTRIBUTE_VALUE, CKR_ATTRIBUTE_VALUE_INVALID)?;
        if a.pValue.is_null() && len != 0 {
            return Err(CKR_ATTRIBUTE_VALUE_INVALID);
        }
        let v = a.pValue as *const u8;
        let value = match value_kind(a.type_) {
            ValueKind::Ulong if len == size_of::<CK_ULONG>() => {
                // SAFETY: `v` points to `len` bytes, one CK_ULONG.
                AttrValue::Ulong(unsafe { ptr::read_unaligned(v as *const CK_ULONG) })
            }
            ValueKind::UlongList if len % size_of::<CK_ULONG>() == 0 => {
                let n = len / size_of::<CK_ULONG>();
                // SAFETY: `v` points to `n` CK_ULONGs (`len` bytes); `n == 0` reads nothing.
                AttrValue::UlongList((0..n).map(|j| unsafe { ptr::read_unaligned((v as *const CK_ULONG).add(j)) }).collect())
            }
            ValueKind::Template if depth == 0 && len % size_of::<CK_ATTRIBUTE>() == 0 => {
                let n = (len / size_of::<CK_ATTRIBUTE>()) as CK_ULONG;
                // SAFETY: the caller's contract covers nested templates.
                AttrValue::Template(unsafe { template_at(v as *const CK_ATTRIBUTE, n, depth + 1) }?)
            }
            ValueKind::Template => return Err(CKR_ATTRIBUTE_VALUE_INVALID),
            // A CK_ULONG type with another length goes as bytes: the token refuses it.
            _ => {
                // SAFETY: `v` points to `len` readable bytes.
                AttrValue::Bytes(Blob::from_slice(unsafe { bytes(v, len as CK_ULONG) }?))
            }
        };
        out.push(Attribute { attr_type: a.type_, value });
    }
    Ok(out)
}

/// The attribute types of the template at `p` (for `C_GetAttributeValue`).
///
/// # Safety
/// A non-NULL `p` must point to `count` `CK_ATTRIBUTE`s.
pub(super) unsafe fn attribute_types(p: *const CK_ATTRIBUTE, count: CK_ULONG) -> Result<Vec<u64>, Rv> {
    let count = len_of(count, MAX_TEMPLATE, CKR_ARGUMENTS_BAD)?;
    if count == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: `p` points to `count` attributes.
    Ok((0..count).map(|i| unsafe { ptr::read_unaligned(p.add(i)) }.type_).collect())
}

/// The mechanism at `p`, its parameter typed by [`param_kind`].
///
/// # Safety
/// `p` must be NULL or point to a `CK_MECHANISM` whose non-NULL `pParameter` points to
/// `ulParameterLen` bytes laid out as the mechanism's parameter structure, whose pointers in turn
/// point to as many bytes as their lengths say.
pub(super) unsafe fn mechanism(p: *const CK_MECHANISM) -> Result<Mechanism, Rv> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: `p` points to a CK_MECHANISM.
    let m = unsafe { ptr::read_unaligned(p) };
    let plen = usize::try_from(m.ulParameterLen).map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
    let pp = m.pParameter as *const u8;
    let absent = pp.is_null() || plen == 0;
    let param = match param_kind(m.mechanism) {
        // Optional parameters (an IV of AES key wrap), and those the token insists on itself.
        ParamKind::None | ParamKind::Bytes | ParamKind::Pss | ParamKind::Oaep if absent => MechParam::None,
        ParamKind::None => return Err(CKR_MECHANISM_PARAM_INVALID),
        ParamKind::Bytes => {
            let len = len_of(m.ulParameterLen, MAX_PARAM, CKR_MECHANISM_PARAM_INVALID)?;
            // SAFETY: `pp` points to `len` bytes.
            MechParam::Bytes(Blob::from_slice(unsafe { bytes(pp, len as CK_ULONG) }?))
        }
        ParamKind::Gcm => {
            // SAFETY: `pp` points to `plen` bytes of a CK_GCM_PARAMS (either layout).
            unsafe { gcm(pp, plen) }?
        }
        ParamKind::Ecdh1 if !absent && plen == size_of::<CK_ECDH1_DERIVE_PARAMS>() => {
            // SAFETY: `pp` points to a CK_ECDH1_DERIVE_PARAMS.
            let e = unsafe { ptr::read_unaligned(pp as *const CK_ECDH1_DERIVE_PARAMS) };
            MechParam::Ecdh1 {
                kdf: e.kdf,
                // SAFETY: the structure's pointers point to their lengths' worth of bytes.
                shared_data: unsafe { param_bytes(e.pSharedData, e.ulSharedDataLen, MAX_PARAM) }?,
                // SAFETY: as above.
                public_data: unsafe { param_bytes(e.pPublicData, e.ulPublicDataLen, MAX_PARAM) }?,
            }
        }
        ParamKind::Pss if plen == size_of::<CK_RSA_PKCS_PSS_PARAMS>() => {
            // SAFETY: `pp` points to a CK_RSA_PKCS_PSS_PARAMS.
            let s = unsafe { ptr::read_unaligned(pp as *const CK_RSA_PKCS_PSS_PARAMS) };
            MechParam::Pss { hash: s.hashAlg, mgf: s.mgf, salt_len: s.sLen }
        }
        ParamKind::Oaep if plen == size_of::<CK_RSA_PKCS_OAEP_PARAMS>() => {
            // SAFETY: `pp` points to a CK_RSA_PKCS_OAEP_PARAMS.
            let o = unsafe { ptr::read_unaligned(pp as *const CK_RSA_PKCS_OAEP_PARAMS) };
            MechParam::Oaep {
                hash: o.hashAlg,
                mgf: o.mgf,
                source: o.source,
                // SAFETY: the structure's pointer points to its length's worth of bytes.
                source_data: unsafe { param_bytes(o.pSourceData as *const u8, o.ulSourceDataLen, MAX_PARAM) }?,
            }
        }
        ParamKind::Ecdh1 | ParamKind::Pss | ParamKind::Oaep => return Err(CKR_MECHANISM_PARAM_INVALID),
    };
    Ok(Mechanism { mechanism: m.mechanism, param })
}

/// `CK_GCM_PARAMS` in the PKCS#11 3.0 layout (with `ulIvBits`, 48 bytes) or the original 2.40 one
/// (without, 40 bytes): callers of both exist.
unsafe fn gcm(pp: *const u8, plen: usize) -> Result<MechParam, Rv> {
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct GcmParams240 {
        p_iv: *mut CK_BYTE,
        ul_iv_len: CK_ULONG,
        p_aad: *mut CK_BYTE,
        ul_aad_len: CK_ULONG,
        ul_tag_bits: CK_ULONG,
    }
    if pp.is_null() {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    }
    let (iv, iv_len, iv_bits, aad, aad_len, tag_bits) = if plen == size_of::<CK_GCM_PARAMS>() {
        // SAFETY: `pp` points to a CK_GCM_PARAMS (3.0 layout).
        let g = unsafe { ptr::read_unaligned(pp as *const CK_GCM_PARAMS) };
        (g.pIv, g.ulIvLen, g.ulIvBits, g.pAAD, g.ulAADLen, g.ulTagBits)
    } else if plen == size_of::<GcmParams240>() {
        // SAFETY: `pp` points to a CK_GCM_PARAMS (2.40 layout).
        let g = unsafe { ptr::read_unaligned(pp as *const GcmParams240) };
        (g.p_iv, g.ul_iv_len, 0, g.p_aad, g.ul_aad_len, g.ul_tag_bits)
    } else {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    };
    Ok(MechParam::Gcm {
        // SAFETY: the structure's pointers point to their lengths' worth of bytes.
        iv: unsafe { param_bytes(iv, iv_len, MAX_PARAM) }?,
        iv_bits,
        // SAFETY: as above.
        aad: unsafe { param_bytes(aad, aad_len, MAX_AAD) }?,
        tag_bits,
    })
}

unsafe fn param_bytes(p: *const u8, len: CK_ULONG, max: usize) -> Result<Blob, Rv> {
    let len = len_of(len, max, CKR_MECHANISM_PARAM_INVALID)?;
    if len != 0 && p.is_null() {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    }
    // SAFETY: the caller's contract.
    Ok(Blob::from_slice(unsafe { bytes(p, len as CK_ULONG) }?))
}

/// What the caller's output buffer offers.
///
/// # Safety
/// `out_len` must be NULL or point to a readable `CK_ULONG`.
pub(super) unsafe fn space<T>(out: *const T, out_len: *const CK_ULONG) -> Result<Space, Rv> {
    if out_len.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    if out.is_null() {
        return Ok(Space::Query);
    }
    // SAFETY: `out_len` is non-NULL and readable.
    let n = unsafe { ptr::read_unaligned(out_len) };
    Ok(Space::Buffer(usize::try_from(n).unwrap_or(usize::MAX)))
}

/// Writes `data` by the size-query convention: NULL `out` → the length only; a short buffer → the
/// length and `CKR_BUFFER_TOO_SMALL`; otherwise the bytes and their length.
///
/// # Safety
/// `out_len` must point to a writable `CK_ULONG` (checked non-NULL by [`space`] first); a non-NULL
/// `out` to `*out_len` writable bytes.
pub(super) unsafe fn deliver(out: *mut u8, out_len: *mut CK_ULONG, data: &[u8]) -> Rv {
    // SAFETY: the caller's contract.
    unsafe { deliver_items(out, out_len, data) }
}

/// [`deliver`] for lists of `CK_ULONG` (slot ids, mechanisms).
///
/// # Safety
/// As [`deliver`], counting items instead of bytes.
pub(super) unsafe fn deliver_list(out: *mut CK_ULONG, count: *mut CK_ULONG, list: &[u64]) -> Rv {
    // SAFETY: the caller's contract.
    unsafe { deliver_items(out, count, list) }
}

unsafe fn deliver_items<T: Copy>(out: *mut T, out_len: *mut CK_ULONG, items: &[T]) -> Rv {
    if out_len.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let n = items.len() as CK_ULONG;
    if out.is_null() {
        // SAFETY: `out_len` is non-NULL and writable.
        unsafe { ptr::write_unaligned(out_len, n) };
        return CKR_OK;
    }
    // SAFETY: `out_len` is non-NULL and readable.
    let room = unsafe { ptr::read_unaligned(out_len) };
    // SAFETY: `out_len` is writable.
    unsafe { ptr::write_unaligned(out_len, n) };
    if room < n {
        return CKR_BUFFER_TOO_SMALL;
    }
    // SAFETY: `out` has room for `room >= n` items; `items` is our own memory, so the two do not
    // overlap.
    unsafe { ptr::copy_nonoverlapping(items.as_ptr(), out, items.len()) };
    CKR_OK
}

/// Writes one value through a caller's out-pointer.
///
/// # Safety
/// `p` must be NULL or point to writable memory for a `T`.
pub(super) unsafe fn write<T>(p: *mut T, v: T) -> Result<(), Rv> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: `p` is non-NULL and writable.
    unsafe { ptr::write_unaligned(p, v) };
    Ok(())
}

/// Fills the caller's `C_GetAttributeValue` template from the server's answers, by the rules of
/// PKCS#11 (and SoftHSM's order of precedence: sensitive, then type invalid, then buffer too
/// small). Returns the call's code and whether the caller will probably call again (it asked for a
/// length or gave a short buffer).
///
/// # Safety
/// `t` must point to `results.len()` writable `CK_ATTRIBUTE`s whose non-NULL `pValue`s point to
/// `ulValueLen` writable bytes.
pub(super) unsafe fn fill_attributes(t: *mut CK_ATTRIBUTE, results: &[AttrResult]) -> (Rv, bool) {
    let (mut sensitive, mut invalid, mut short, mut again) = (false, false, false, false);
    for (i, r) in results.iter().enumerate() {
        // SAFETY: `t` points to `results.len()` attributes; `i` is below that.
        let a = unsafe { t.add(i) };
        // SAFETY: `a` is a valid, writable CK_ATTRIBUTE.
        let mut attr = unsafe { ptr::read_unaligned(a) };
        let value = match r {
            AttrResult::Value(v) => native(v),
            AttrResult::Sensitive => {
                sensitive = true;
                None
            }
            AttrResult::TypeInvalid => {
                invalid = true;
                None
            }
            AttrResult::Unavailable => None,
        };
        match value {
            None => attr.ulValueLen = CK_UNAVAILABLE_INFORMATION,
            Some(bytes) if attr.pValue.is_null() => {
                attr.ulValueLen = bytes.len() as CK_ULONG;
                again = true;
            }
            Some(bytes) if (attr.ulValueLen as u128) < bytes.len() as u128 => {
                attr.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                short = true;
                again = true;
            }
            Some(bytes) => {
                // SAFETY: `pValue` has room for `ulValueLen >= bytes.len()` bytes.
                unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), attr.pValue as *mut u8, bytes.len()) };
                attr.ulValueLen = bytes.len() as CK_ULONG;
            }
        }
        // SAFETY: `a` is writable.
        unsafe { ptr::write_unaligned(a, attr) };
    }
    let rv = if sensitive {
        CKR_ATTRIBUTE_SENSITIVE
    } else if invalid {
        CKR_ATTRIBUTE_TYPE_INVALID
    } else if short {
        CKR_BUFFER_TOO_SMALL
    } else {
        CKR_OK
    };
    (rv, again)
}

/// An answered value in this machine's C layout (`None` for a nested template: the server never
/// sends one, see its module docs).
fn native(v: &AttrValue) -> Option<Blob> {
    match v {
        AttrValue::Bytes(b) => Some(b.clone()),
        AttrValue::Ulong(x) => Some(Blob::from_slice(&(*x as CK_ULONG).to_ne_bytes())),
        AttrValue::UlongList(l) => {
            Some(Blob::new(l.iter().flat_map(|x| (*x as CK_ULONG).to_ne_bytes()).collect()))
        }
        AttrValue::Template(_) => None,
    }
}

/// Blank-padded fixed-width text, as PKCS#11 info structures hold it.
pub(super) fn padded<const N: usize>(text: &str) -> [CK_UTF8CHAR; N] {
    let mut out = [b' '; N];
    for (o, b) in out.iter_mut().zip(text.bytes()) {
        *o = b;
    }
    out
}

/// `pReserved`-style arguments must be NULL.
pub(super) fn reserved_is_null(p: *mut c_void) -> Result<(), Rv> {
    if p.is_null() {
        Ok(())
    } else {
        Err(CKR_ARGUMENTS_BAD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_with_nested_templates_are_read_typed() {
        let yes: CK_BBOOL = CK_TRUE;
        let class: CK_OBJECT_CLASS = CKO_SECRET_KEY;
        let mut inner = [
            CK_ATTRIBUTE { type_: CKA_SENSITIVE, pValue: &yes as *const _ as *mut c_void, ulValueLen: 1 },
            CK_ATTRIBUTE { type_: CKA_CLASS, pValue: &class as *const _ as *mut c_void, ulValueLen: 8 },
        ];
        let outer = [CK_ATTRIBUTE {
            type_: CKA_UNWRAP_TEMPLATE,
            pValue: inner.as_mut_ptr() as *mut c_void,
            ulValueLen: (2 * size_of::<CK_ATTRIBUTE>()) as CK_ULONG,
        }];
        // SAFETY: every pointer above points to live locals of the stated sizes.
        let t = unsafe { template(outer.as_ptr(), 1) }.unwrap();
        assert_eq!(
            t,
            vec![Attribute::new(
                CKA_UNWRAP_TEMPLATE,
                AttrValue::Template(vec![Attribute::bool(CKA_SENSITIVE, true), Attribute::ulong(CKA_CLASS, CKO_SECRET_KEY)])
            )]
        );
        let bad = [CK_ATTRIBUTE { type_: CKA_LABEL, pValue: ptr::null_mut(), ulValueLen: 4 }];
        // SAFETY: a NULL value pointer is refused before any read.
        assert_eq!(unsafe { template(bad.as_ptr(), 1) }, Err(CKR_ATTRIBUTE_VALUE_INVALID));
    }

    #[test]
    fn gcm_parameters_of_both_layouts_are_read() {
        let mut iv = [7u8; 12];
        let mut aad = *b"header";
        let p = CK_GCM_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: 12,
            ulIvBits: 96,
            pAAD: aad.as_mut_ptr(),
            ulAADLen: 6,
            ulTagBits: 128,
        };
        let m = CK_MECHANISM {
            mechanism: CKM_AES_GCM,
            pParameter: &p as *const _ as *mut c_void,
            ulParameterLen: size_of::<CK_GCM_PARAMS>() as CK_ULONG,
        };
        // SAFETY: the mechanism and its parameter are live locals.
        let got = unsafe { mechanism(&m) }.unwrap();
        assert_eq!(
            got.param,
            MechParam::Gcm { iv: Blob::from_slice(&iv), iv_bits: 96, aad: Blob::from_slice(&aad), tag_bits: 128 }
        );
        let plain = CK_MECHANISM { mechanism: CKM_SHA256_HMAC, pParameter: ptr::null_mut(), ulParameterLen: 0 };
        // SAFETY: as above.
        assert_eq!(unsafe { mechanism(&plain) }.unwrap(), Mechanism::plain(CKM_SHA256_HMAC));
        let stray = CK_MECHANISM { mechanism: CKM_SHA256, pParameter: iv.as_mut_ptr() as *mut c_void, ulParameterLen: 12 };
        // SAFETY: as above.
        assert_eq!(unsafe { mechanism(&stray) }, Err(CKR_MECHANISM_PARAM_INVALID));
    }

    #[test]
    fn outputs_follow_the_size_query_convention() {
        let mut len: CK_ULONG = 0;
        // SAFETY: `len` is a live local; a NULL output is never written.
        assert_eq!(unsafe { deliver(ptr::null_mut(), &mut len, b"abcd") }, CKR_OK);
        assert_eq!(len, 4);
        let mut buf = [0u8; 3];
        len = 3;
        // SAFETY: `buf` has `len` bytes.
        assert_eq!(unsafe { deliver(buf.as_mut_ptr(), &mut len, b"abcd") }, CKR_BUFFER_TOO_SMALL);
        assert_eq!((len, buf), (4, [0; 3]));
        let mut buf = [0u8; 8];
        len = 8;
        // SAFETY: `buf` has `len` bytes.
        assert_eq!(unsafe { deliver(buf.as_mut_ptr(), &mut len, b"abcd") }, CKR_OK);
        assert_eq!((len, &buf[..4]), (4, &b"abcd"[..]));
    }

    #[test]
    fn attribute_answers_follow_the_rules() {
        let mut value = [0u8; 8];
        let mut t = [
            CK_ATTRIBUTE { type_: CKA_VALUE, pValue: ptr::null_mut(), ulValueLen: 0 },
            CK_ATTRIBUTE { type_: CKA_VALUE_LEN, pValue: value.as_mut_ptr() as *mut c_void, ulValueLen: 8 },
            CK_ATTRIBUTE { type_: CKA_LABEL, pValue: ptr::null_mut(), ulValueLen: 0 },
        ];
        let results = [
            AttrResult::Sensitive,
            AttrResult::Value(AttrValue::Ulong(32)),
            AttrResult::Value(AttrValue::Bytes(Blob::from_slice(b"kek"))),
        ];
        // SAFETY: `t` and `value` are live locals of the stated sizes.
        let (rv, again) = unsafe { fill_attributes(t.as_mut_ptr(), &results) };
        assert_eq!((rv, again), (CKR_ATTRIBUTE_SENSITIVE, true));
        assert_eq!(t[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
        assert_eq!((t[1].ulValueLen, CK_ULONG::from_ne_bytes(value)), (8, 32));
        assert_eq!(t[2].ulValueLen, 3);
    }
}
