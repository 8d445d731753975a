//! The key management server: gRPC over mutual TLS in front of a PKCS#11 HSM.
//!
//! See ARCHITECTURE.md for the bird's-eye view. Only [`hsm`] calls `cryptoki`. The whole crate
//! forbids `unsafe`: `cryptoki` wraps the FFI, so even the HSM layer needs none. Should a PKCS#11
//! call ever need `unsafe`, relax this to `deny` and allow it in `hsm` alone, with a `SAFETY:` comment.
#![forbid(unsafe_code)]

pub mod classification;
pub mod ids;

pub mod config;
pub mod dev;
pub mod health;
pub mod hsm;
pub mod pgcluster;
pub mod pki;
pub mod store;

pub mod audit;
pub mod authz;
pub mod blob;
pub mod bounded;
pub mod context;
pub mod identity;
pub mod recipient;
pub mod server;
pub mod service;
pub mod key_cache;
pub mod keyauth;
pub mod object_label;
pub mod reconcile;
pub mod status;
pub mod tls;
