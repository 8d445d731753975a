//! Nested templates (`CKA_WRAP_TEMPLATE`, `CKA_UNWRAP_TEMPLATE`, `CKA_DERIVE_TEMPLATE`) for SoftHSM.
//!
//! `cryptoki` 0.12 has no attribute for a nested template. Its vendor-defined attribute passes any
//! bytes to the token unchanged, so a nested template goes to SoftHSM as the bytes of a C array of
//! `CK_ATTRIBUTE` whose `pValue` fields hold the addresses of value buffers owned by [`Buffers`].
//! No `unsafe` is needed to build that (an address is only an integer here), but the soundness
//! argument is that of an `unsafe` block, so it is stated once, here:
//!
//! - every value buffer is a `Vec<u8>` pushed into [`Buffers`] before its address is taken and
//!   never touched again: moving or growing the outer vector moves the `Vec` headers, not the heap
//!   bytes the addresses point to;
//! - a [`Buffers`] lives inside the `convert::Template` whose attributes carry the arrays, and the
//!   template outlives the one `cryptoki` call it is built for (it is a local of that call);
//! - the array layout is `CK_ATTRIBUTE`'s: `type_` (`CK_ULONG`), `pValue` (pointer), `ulValueLen`
//!   (`CK_ULONG`), 24 bytes, native byte order; checked against `cryptoki_sys` at compile time;
//! - SoftHSM only reads through these addresses (it copies templates when it stores them).
//!
//! Must never hand out an address of a buffer it does not own, and never nest deeper than one
//! level (the wire refuses deeper nesting; PKCS#11 defines none).

use std::mem::{offset_of, size_of};

use cryptoki_sys::{CK_ATTRIBUTE, CK_ULONG, CKR_ATTRIBUTE_VALUE_INVALID, CK_RV};
use hsm_sim_wire::Attribute;
use zeroize::Zeroize;

use super::convert::flat_bytes;

// The layout the arrays below are built in.
const _: () = {
    assert!(size_of::<CK_ATTRIBUTE>() == 24);
    assert!(offset_of!(CK_ATTRIBUTE, type_) == 0);
    assert!(offset_of!(CK_ATTRIBUTE, pValue) == 8);
    assert!(offset_of!(CK_ATTRIBUTE, ulValueLen) == 16);
    assert!(size_of::<usize>() == 8 && size_of::<CK_ULONG>() == 8);
};

/// The value buffers nested templates point into. Zeroized when dropped (they may hold values
/// of the keys an unwrap template constrains, never key material itself, but they are cheap to
/// clear).
#[derive(Default)]
pub(super) struct Buffers {
    values: Vec<Vec<u8>>,
}

impl Buffers {
    /// The bytes of a `CK_ATTRIBUTE` array for `inner`, whose values this `Buffers` now owns.
    pub(super) fn layout(&mut self, inner: &[Attribute]) -> Result<Vec<u8>, CK_RV> {
        let mut array = Vec::with_capacity(inner.len() * size_of::<CK_ATTRIBUTE>());
        for a in inner {
            // A template inside a nested template: the wire never delivers one.
            let value = flat_bytes(&a.value).ok_or(CKR_ATTRIBUTE_VALUE_INVALID)?;
            let len = value.len() as CK_ULONG;
            self.values.push(value);
            // The address of the heap bytes just pushed; stable for the life of `self` (see the
            // module docs). An empty value gets a null address, as C callers pass it.
            let address = match self.values.last() {
                Some(v) if !v.is_empty() => v.as_ptr() as usize,
                _ => 0,
            };
            array.extend_from_slice(&(a.attr_type as CK_ULONG).to_ne_bytes());
            array.extend_from_slice(&address.to_ne_bytes());
            array.extend_from_slice(&len.to_ne_bytes());
        }
        Ok(array)
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        for v in &mut self.values {
            v.zeroize();
        }
    }
}
