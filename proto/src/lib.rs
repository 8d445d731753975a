//! The `kms.v1` gRPC contract: messages, clients and servers generated from `proto/kms/v1/kms.proto`.
//!
//! This crate holds no logic; it is the one place where the wire types live, shared by the server
//! and the client.
#![forbid(unsafe_code)]

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("kms.v1");
}
