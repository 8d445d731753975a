//! `libhsm_sim_p11.so`: a PKCS#11 module that reaches a simulated network HSM (`hsm-sim serve`),
//! loaded by applications exactly like a vendor's module (`cryptoki`, `pkcs11-tool --module`).
//!
//! Configured from the environment at `C_Initialize` (see [`config`]): `HSM_SIM_ENDPOINT`
//! (`unix:/path` or `tcp:IP:PORT`) and `HSM_SIM_TIMEOUT_MS` (per-call deadline, default 10000).
//!
//! Code map: [`ffi`] is the C ABI (the crate's only `unsafe`); [`ops`] the PKCS#11 functions as safe
//! Rust; [`module`] the state between calls (connection, sessions, handle translation);
//! [`session_state`] one session's pending operation and caches; [`connection`] the multiplexed
//! stream; [`config`] the environment. The wire format is the `hsm-sim-wire` crate.
//!
//! Architecture invariants: one round trip per operation (`Init` calls are kept locally, size
//! queries answered from a cached result); one connection per initialised module, shared by all
//! sessions, so object handles are valid in every session; a handle from an earlier connection is
//! refused, never sent; no PIN, key or data byte is ever printed.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
mod connection;
mod ffi;
mod module;
mod ops;
mod session_state;

/// The module's one exported symbol, also callable through the rlib (the C ABI tests do).
pub use ffi::C_GetFunctionList;

// PKCS#11 CK_ULONG is 8 bytes on every platform this module supports (64-bit Unix); the C layouts
// read and written in `ffi` assume it.
const _: () = assert!(std::mem::size_of::<cryptoki_sys::CK_ULONG>() == 8);
