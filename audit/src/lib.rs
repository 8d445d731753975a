//! The audit trail of the key management service: the record format, the SHA-256 hash chain and
//! its signed checkpoints, the SQLite audit database, the JSON-lines export, and offline
//! verification with only the checkpoint public key.
//!
//! The server encodes each gRPC request as an [`AuditRecord`], seals batches with [`Chain::seal`],
//! stores them with [`AuditDb::append`], and every so often has the HSM sign
//! [`checkpoint_digest`] of the head, stored with [`AuditDb::insert_checkpoint`]. `kmsctl audit`
//! reads a database ([`AuditDb::open_read_only`]) or an export ([`jsonl::read`]) and runs
//! [`verify()`], which names the first bad record.
//!
//! Nothing here ever sees key material, and an encryption context is never stored, only its
//! [`context_hash`]. The formats are versioned by the tags in their encodings (`…-v1`) and never
//! change within a version.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod chain;
mod hex;
pub mod jsonl;
mod record;
mod sqlite;
mod verify;

pub use chain::{
    chain_hash, checkpoint_digest, checkpoint_message, Chain, Checkpoint, StoredRecord, Trail, CHAIN_TAG,
    CHECKPOINT_TAG, GENESIS,
};
pub use record::{context_hash, AuditRecord, Outcome, OutcomeParseError, CONTEXT_TAG, RECORD_TAG};
pub use sqlite::{AuditDb, AuditDbError, RecordIter, SCHEMA_VERSION};
pub use verify::{
    checkpoint_signature_valid, verify, verifying_key_from_pem, verifying_key_from_sec1, Problem, ProblemKind,
    VerifyKeyError, VerifyReport,
};
