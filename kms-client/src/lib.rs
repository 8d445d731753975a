//! Rust client for the key management service (`kms.v1` over mutual TLS), and the library behind
//! the `kmsctl` command-line tool.
//!
//! Code map:
//! - [`config`]: `ClientConfig`, the endpoint, CA, client certificate and key (read from files).
//! - [`client`]: `KmsClient`, one method per RPC with plain Rust arguments; key lifecycle changes
//!   answer a `KeyChangeOutcome` (made, or awaiting a second officer), re-wrap batches answer
//!   item by item.
//! - [`recipient`]: `RecipientKey`, which opens data keys the server sealed to the caller's P-256
//!   key, so that a plaintext data key never crosses the network.
//! - [`names`]: parsing and printing of classification levels and key purposes.
//! - [`error`]: `ClientError`, which keeps the server's gRPC status intact.
//!
//! Architecture invariant: plaintext data keys and private keys are only ever held in `Zeroizing`
//! buffers and never appear in `Debug` output or error messages.
//!
//! ```no_run
//! # async fn example() -> Result<(), kms_client::ClientError> {
//! use std::collections::BTreeMap;
//! use kms_client::{Delivery, KmsClient, RecipientKey};
//!
//! let kms = KmsClient::connect_with_files("https://kms.local:7443", "ca.pem", "me.pem", "me.key").await?;
//! let context = BTreeMap::from([("record".to_owned(), "42".to_owned())]);
//! let recipient = RecipientKey::generate()?;
//! let generated = kms.generate_data_key("citizens", &context, Delivery::ToRecipient(&recipient)).await?;
//! let data_key = generated.plaintext.expect("opened locally");
//! # let _ = data_key; Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod error;
pub mod names;
pub mod recipient;

pub use client::{
    ApprovedChange, CallerChange, Decrypted, DecryptedDataKey, Delivery, GeneratedDataKey, KeyChangeOutcome,
    KeyFilter, KmsClient, ReWrapItem, MAX_REWRAP_BATCH,
};
pub use config::{ClientConfig, DEFAULT_TIMEOUT};
pub use error::{ClientError, ConfigProblem, EndpointProblem, RecipientError, ResponseProblem};
pub use kms_proto::v1 as proto;
pub use names::{parse_classification, parse_purpose, UnknownName};
pub use recipient::{RecipientKey, SealBinding};
