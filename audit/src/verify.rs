//! Offline verification of a trail with only the checkpoint public key: recomputes the hash chain
//! from GENESIS, checks every checkpoint's signature and the hash it signed, and names the first
//! bad record. Holds the report types and the loading of the public key.
//!
//! Rules, walking the records in the order given (expected seq starts at 1):
//!
//! - a seq above the expected one is `Missing` at the expected seq (refined to `OutOfOrder` if
//!   the missing record turns up later in the walk: the records were reordered);
//! - a seq below the expected one is `OutOfOrder`;
//! - a stored hash that is not `chain_hash(previous, record)` is `HashMismatch`;
//! - after the first record problem the chain is no longer checked (everything after depends on
//!   it), records are only counted, and checkpoints past that point are only signature-checked;
//! - a checkpoint with a bad signature is `CheckpointSignatureInvalid`; a well-signed one whose
//!   hash differs from the recomputed hash at its seq is `CheckpointMismatch`; a well-signed one
//!   past the last record is `CheckpointBeyondEnd`.

use std::fmt;

use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;

use crate::chain::{chain_hash, Checkpoint, StoredRecord, GENESIS};

/// What kind of damage a [`Problem`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A record is absent where its seq was expected.
    Missing,
    /// A record appears after one with a higher or equal seq.
    OutOfOrder,
    /// A record's content does not give its stored hash.
    HashMismatch,
    /// A checkpoint's signature does not verify with the given key.
    CheckpointSignatureInvalid,
    /// A well-signed checkpoint's hash is not the recomputed chain hash at its seq.
    CheckpointMismatch,
    /// A well-signed checkpoint names a seq past the last record.
    CheckpointBeyondEnd,
    /// The trail ends before the record an anchor (kept outside the trail) names: records were cut.
    CutBeforeAnchor,
    /// The record an anchor names does not have the anchored hash.
    AnchorMismatch,
}

impl ProblemKind {
    /// The kind's stable name, as serialised (`"missing"`, `"hash_mismatch"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Missing => "missing",
            ProblemKind::OutOfOrder => "out_of_order",
            ProblemKind::HashMismatch => "hash_mismatch",
            ProblemKind::CheckpointSignatureInvalid => "checkpoint_signature_invalid",
            ProblemKind::CheckpointMismatch => "checkpoint_mismatch",
            ProblemKind::CheckpointBeyondEnd => "checkpoint_beyond_end",
            ProblemKind::CutBeforeAnchor => "cut_before_anchor",
            ProblemKind::AnchorMismatch => "anchor_mismatch",
        }
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing wrong with a trail.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// The record (or checkpoint) seq the problem is at.
    pub seq: u64,
    /// What kind of problem.
    pub kind: ProblemKind,
    /// A full sentence naming the record.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The result of verifying a trail.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// How many records were read.
    pub records: u64,
    /// How many checkpoints were read.
    pub checkpoints: usize,
    /// How many checkpoints carry a valid signature (whether or not the records agree with them).
    pub valid_checkpoints: usize,
    /// The problems, in order of seq; empty means the trail is intact.
    pub problems: Vec<Problem>,
    /// Records after the last validly signed checkpoint that no signature covers yet
    /// `(first, last)`; `None` if there are none or a record problem was found.
    pub uncovered: Option<(u64, u64)>,
}

impl VerifyReport {
    /// Checks the trail against an anchor `(seq, hash)` kept outside it (the server's, from
    /// `kmsctl audit anchor`): the trail must reach record `seq`, and `hash_at_seq` (the stored
    /// hash of that record in the verified trail, `None` when absent) must be `hash`. Records cut
    /// after the last checkpoint are found this way; the file alone cannot show them.
    pub fn check_anchor(&mut self, seq: u64, hash: &[u8; 32], hash_at_seq: Option<[u8; 32]>) {
        if seq == 0 {
            return;
        }
        let problem = if self.records < seq {
            Some(Problem {
                seq: self.records + 1,
                kind: ProblemKind::CutBeforeAnchor,
                message: format!(
                    "the trail ends at record {} but the anchor names record {seq}: records {}..={seq} were cut",
                    self.records,
                    self.records + 1
                ),
            })
        } else if hash_at_seq.as_ref() != Some(hash) {
            Some(Problem {
                seq,
                kind: ProblemKind::AnchorMismatch,
                message: format!("record {seq} does not have the hash the anchor names: the trail was rewritten"),
            })
        } else {
            None
        };
        if let Some(p) = problem {
            self.uncovered = None;
            let at = self.problems.partition_point(|q| q.seq <= p.seq);
            self.problems.insert(at, p);
        }
    }

    /// Whether no problem was found.
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }

    /// The problem with the lowest seq.
    pub fn first_problem(&self) -> Option<&Problem> {
        self.problems.first()
    }
}

/// The checkpoint public key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum VerifyKeyError {
    /// The PEM is not an SPKI ("BEGIN PUBLIC KEY") P-256 public key.
    #[error("not a P-256 public key in SPKI PEM (\"BEGIN PUBLIC KEY\"): {0}")]
    Pem(#[source] p256::pkcs8::spki::Error),
    /// The bytes are not a SEC1-encoded P-256 point.
    #[error("not a SEC1-encoded P-256 public key: {0}")]
    Sec1(#[source] p256::ecdsa::Error),
}

/// Reads the checkpoint public key from SPKI PEM ("BEGIN PUBLIC KEY").
pub fn verifying_key_from_pem(pem: &str) -> Result<VerifyingKey, VerifyKeyError> {
    VerifyingKey::from_public_key_pem(pem.trim()).map_err(VerifyKeyError::Pem)
}

/// Reads the checkpoint public key from a SEC1 point (65 bytes uncompressed, or 33 compressed),
/// the form the HSM's `CKA_EC_POINT` gives.
pub fn verifying_key_from_sec1(point: &[u8]) -> Result<VerifyingKey, VerifyKeyError> {
    VerifyingKey::from_sec1_bytes(point).map_err(VerifyKeyError::Sec1)
}

/// Whether `c.signature` is a valid ECDSA P-256 signature by `key` over the checkpoint: 64 bytes
/// `r || s` over SHA-256 of [`crate::checkpoint_message`]. High-S signatures (which HSMs do not
/// normalise) are accepted.
pub fn checkpoint_signature_valid(c: &Checkpoint, key: &VerifyingKey) -> bool {
    let Ok(sig) = Signature::from_slice(&c.signature) else { return false };
    let message = c.message();
    if key.verify(&message, &sig).is_ok() {
        return true;
    }
    sig.normalize_s().is_some_and(|low| key.verify(&message, &low).is_ok())
}

/// Verifies a trail: records in the order given (never re-sorted), checkpoints in any order. See
/// the module documentation for the rules.
pub fn verify(
    records: impl IntoIterator<Item = StoredRecord>,
    checkpoints: &[Checkpoint],
    key: &VerifyingKey,
) -> VerifyReport {
    let mut problems = Vec::new();
    let mut signed: Vec<&Checkpoint> = Vec::with_capacity(checkpoints.len());
    for c in checkpoints {
        if checkpoint_signature_valid(c, key) {
            signed.push(c);
        } else {
            problems.push(Problem {
                seq: c.seq,
                kind: ProblemKind::CheckpointSignatureInvalid,
                message: format!(
                    "the checkpoint at record {} has an invalid signature: it was forged or altered, or the \
                     public key is not the one that signed the trail",
                    c.seq
                ),
            });
        }
    }
    signed.sort_by_key(|c| c.seq);
    let valid_checkpoints = signed.len();

    let mut walk = Walk { signed, next_checkpoint: 0, last_matched: 0, last_signed: 0, problems };
    // A checkpoint of the empty trail can only name GENESIS.
    walk.check_checkpoints_up_to(0, &GENESIS);

    let mut count: u64 = 0;
    let mut expected: u64 = 1;
    let mut prev_hash = GENESIS;
    let mut prev_seq: Option<u64> = None;
    let mut verified_to: u64 = 0;
    let mut record_problem: Option<Problem> = None;
    let mut awaiting_missing: Option<u64> = None;

    for stored in records {
        count = count.saturating_add(1);
        let seq = stored.record.seq;
        if record_problem.is_none() {
            if seq > expected {
                record_problem = Some(missing(expected));
                awaiting_missing = Some(expected);
            } else if seq < expected {
                record_problem = Some(out_of_order(seq, prev_seq));
            } else {
                let hash = chain_hash(&prev_hash, &stored.record);
                if hash != stored.hash {
                    record_problem = Some(Problem {
                        seq,
                        kind: ProblemKind::HashMismatch,
                        message: format!("record {seq} does not match its hash: it was edited, inserted or reordered"),
                    });
                } else {
                    prev_hash = hash;
                    verified_to = seq;
                    expected = seq.saturating_add(1);
                    walk.check_checkpoints_up_to(seq, &hash);
                }
            }
        } else if awaiting_missing == Some(seq) {
            // The record reported missing is here after all, later in the walk: the trail was
            // reordered rather than cut.
            record_problem = Some(out_of_order(seq, prev_seq));
            awaiting_missing = None;
        }
        prev_seq = Some(seq);
    }

    let Walk { signed, next_checkpoint, last_signed, mut problems, .. } = walk;
    let uncovered = match record_problem {
        Some(p) => {
            problems.push(p);
            None
        }
        None => {
            for c in &signed[next_checkpoint..] {
                problems.push(Problem {
                    seq: c.seq,
                    kind: ProblemKind::CheckpointBeyondEnd,
                    message: format!(
                        "the signed checkpoint at record {} covers records that are gone: records {}..={} were \
                         deleted",
                        c.seq,
                        verified_to.saturating_add(1),
                        c.seq
                    ),
                });
            }
            (last_signed < verified_to).then(|| (last_signed.saturating_add(1), verified_to))
        }
    };
    problems.sort_by_key(|p| (p.seq, p.kind));
    VerifyReport { records: count, checkpoints: checkpoints.len(), valid_checkpoints, problems, uncovered }
}

/// The checkpoint side of a walk: the well-signed checkpoints in seq order, compared with the
/// recomputed chain as it advances.
struct Walk<'c> {
    signed: Vec<&'c Checkpoint>,
    /// Index in `signed` of the first checkpoint not yet compared.
    next_checkpoint: usize,
    /// The seq of the last checkpoint that matched the recomputed chain (0 if none).
    last_matched: u64,
    /// The seq of the last well-signed checkpoint compared (0 if none).
    last_signed: u64,
    problems: Vec<Problem>,
}

impl Walk<'_> {
    /// Compares every well-signed checkpoint at or below `seq` with `hash`, the recomputed hash
    /// at `seq`. Records are checked in consecutive order, so those checkpoints are exactly the
    /// ones at `seq`.
    fn check_checkpoints_up_to(&mut self, seq: u64, hash: &[u8; 32]) {
        while let Some(c) = self.signed.get(self.next_checkpoint).copied().filter(|c| c.seq <= seq) {
            self.next_checkpoint += 1;
            self.last_signed = c.seq;
            if c.hash == *hash {
                self.last_matched = c.seq;
                continue;
            }
            let message = if c.seq == 0 {
                "the signed checkpoint at record 0 does not name the genesis hash: it was not made for this \
                 trail"
                    .to_owned()
            } else {
                format!(
                    "records {}..={} do not match the signed checkpoint at record {}: a record among them was \
                     changed and the hashes after it recomputed",
                    self.last_matched.saturating_add(1),
                    c.seq,
                    c.seq
                )
            };
            self.problems.push(Problem { seq: c.seq, kind: ProblemKind::CheckpointMismatch, message });
        }
    }
}

fn missing(seq: u64) -> Problem {
    Problem {
        seq,
        kind: ProblemKind::Missing,
        message: format!("record {seq} is missing: deleted, or the records after it were renumbered"),
    }
}

fn out_of_order(seq: u64, prev: Option<u64>) -> Problem {
    let message = match prev {
        Some(prev) => {
            format!("record {seq} appears after record {prev}: inserted, duplicated or reordered")
        }
        None => format!("record {seq} appears at the start of the trail: inserted, duplicated or reordered"),
    };
    Problem { seq, kind: ProblemKind::OutOfOrder, message }
}
