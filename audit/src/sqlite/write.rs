//! Writing the audit database: appending a batch of sealed records in one transaction and
//! storing checkpoints. Both refuse anything that would break the chain as stored (a gap, a
//! duplicate, a hash that does not link, a checkpoint for a hash the trail does not have), so the
//! server can never write a trail that fails verification.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::read::head_of;
use super::{AuditDb, AuditDbError};
use crate::chain::{chain_hash, Chain, Checkpoint, StoredRecord, GENESIS};

/// A sequence number as SQLite stores it.
fn seq_sql(seq: u64, what: &'static str) -> Result<i64, AuditDbError> {
    i64::try_from(seq).map_err(|_| AuditDbError::InvalidRecord { seq, what })
}

/// Whether a byte field is a SHA-256 value or absent.
fn hash_or_empty(bytes: &[u8]) -> bool {
    bytes.is_empty() || bytes.len() == 32
}

impl AuditDb {
    /// Appends a batch of sealed records in one transaction: all of them or none.
    ///
    /// The batch must continue the stored trail: the first record's seq is the stored head's seq
    /// plus one, the seqs are consecutive, and each hash chains from the one before (the first
    /// from the stored head's hash). `cert_fingerprint` and `context_hash` must be 32 bytes or
    /// empty. An empty batch does nothing. A file that cannot be written gives an error.
    pub fn append(&mut self, batch: &[StoredRecord]) -> Result<(), AuditDbError> {
        if batch.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(AuditDbError::sqlite("begin append"))?;
        let mut head = head_of(&tx)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO audit_records (seq, time_ms, caller, cert_fingerprint, rpc, key, key_version, \
                     level, outcome, status_code, request_id, context_hash, detail, hash) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )
                .map_err(AuditDbError::sqlite("prepare append"))?;
            for stored in batch {
                let r = &stored.record;
                let expected = head.seq.checked_add(1).ok_or(AuditDbError::InvalidRecord {
                    seq: r.seq,
                    what: "the trail has reached the largest sequence number",
                })?;
                if r.seq != expected {
                    return Err(AuditDbError::NotContiguous { expected, got: r.seq });
                }
                if !hash_or_empty(&r.cert_fingerprint) {
                    return Err(AuditDbError::InvalidRecord {
                        seq: r.seq,
                        what: "cert_fingerprint is neither 32 bytes nor empty",
                    });
                }
                if !hash_or_empty(&r.context_hash) {
                    return Err(AuditDbError::InvalidRecord {
                        seq: r.seq,
                        what: "context_hash is neither 32 bytes nor empty",
                    });
                }
                if chain_hash(&head.hash, r) != stored.hash {
                    return Err(AuditDbError::BrokenLink { seq: r.seq });
                }
                let seq = seq_sql(r.seq, "seq is too large for SQLite")?;
                insert
                    .execute(params![
                        seq,
                        r.time_unix_ms,
                        r.caller,
                        r.cert_fingerprint,
                        r.rpc,
                        r.key,
                        i64::from(r.key_version),
                        r.level,
                        r.outcome.as_str(),
                        r.status_code,
                        r.request_id,
                        r.context_hash,
                        r.detail,
                        stored.hash.as_slice(),
                    ])
                    .map_err(AuditDbError::sqlite("append records"))?;
                head = Chain { seq: r.seq, hash: stored.hash };
            }
        }
        tx.commit().map_err(AuditDbError::sqlite("commit append"))
    }

    /// Stores a checkpoint. Its `(seq, hash)` must be a stored record's (or `(0, GENESIS)`), and
    /// no checkpoint may already be stored at that seq: the server checkpoints only a head that
    /// has moved. The signature is stored as given; verification judges it.
    pub fn insert_checkpoint(&mut self, c: &Checkpoint) -> Result<(), AuditDbError> {
        let seq = i64::try_from(c.seq).map_err(|_| AuditDbError::CheckpointNotOnChain { seq: c.seq })?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(AuditDbError::sqlite("begin checkpoint"))?;
        let exists = tx
            .query_row("SELECT 1 FROM audit_checkpoints WHERE seq = ?1", [seq], |_| Ok(()))
            .optional()
            .map_err(AuditDbError::sqlite("look up checkpoint"))?
            .is_some();
        if exists {
            return Err(AuditDbError::CheckpointExists { seq: c.seq });
        }
        let on_chain = if c.seq == 0 {
            c.hash == GENESIS
        } else {
            let stored: Option<Vec<u8>> = tx
                .query_row("SELECT hash FROM audit_records WHERE seq = ?1", [seq], |r| r.get(0))
                .optional()
                .map_err(AuditDbError::sqlite("look up checkpointed record"))?;
            stored.as_deref() == Some(c.hash.as_slice())
        };
        if !on_chain {
            return Err(AuditDbError::CheckpointNotOnChain { seq: c.seq });
        }
        tx.execute(
            "INSERT INTO audit_checkpoints (seq, hash, time_ms, signature) VALUES (?1, ?2, ?3, ?4)",
            params![seq, c.hash.as_slice(), c.time_unix_ms, c.signature],
        )
        .map_err(AuditDbError::sqlite("insert checkpoint"))?;
        tx.commit().map_err(AuditDbError::sqlite("commit checkpoint"))
    }
}
