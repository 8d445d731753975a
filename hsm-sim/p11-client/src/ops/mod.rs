//! The PKCS#11 functions as safe Rust: what each does with the module's state and which request it
//! sends. One file per function family, as the C entry points in [`crate::ffi`].
//!
//! Owns the one-round-trip rule: `Init` calls are kept locally, every operation is one request,
//! and a size query is answered again from the result it cached. Must never touch a raw pointer.
#![forbid(unsafe_code)]

mod crypto;
mod keys;
mod objects;
mod sessions;
mod slots;

use cryptoki_sys::CKR_DEVICE_ERROR;
use hsm_sim_wire::Reply;

use crate::module::Rv;

/// The shape every answer of an operation has (the wire decodes by operation, so another shape
/// means a broken server).
fn expect<T>(reply: Reply, pick: impl FnOnce(Reply) -> Option<T>) -> Result<T, Rv> {
    pick(reply).ok_or(CKR_DEVICE_ERROR)
}
