//! The hash chain and its signed checkpoints: how each record is bound to everything before it,
//! the head the server carries from batch to batch, and the exact bytes a checkpoint signs.
//!
//! `hash_n = SHA-256("kms-audit-chain-v1" || hash_{n-1} || record_n.encode())`, `hash_0 = GENESIS`.
//!
//! A checkpoint signs `"kms-audit-checkpoint-v1" || seq (u64 BE) || hash || time_unix_ms (i64 BE)`
//! with ECDSA P-256 over its SHA-256 ([`checkpoint_digest`]), the 64-byte `r || s` that PKCS#11
//! `CKM_ECDSA` returns. The private key lives in the HSM; this module never signs.

use sha2::{Digest, Sha256};

use crate::record::AuditRecord;

/// The hash before the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// The domain-separation tag of every chain hash.
pub const CHAIN_TAG: &[u8] = b"kms-audit-chain-v1";

/// The domain-separation tag of every checkpoint message.
pub const CHECKPOINT_TAG: &[u8] = b"kms-audit-checkpoint-v1";

/// `hash_n = SHA-256("kms-audit-chain-v1" || hash_{n-1} || record_n.encode())`; `hash_0 = GENESIS`.
pub fn chain_hash(prev: &[u8; 32], record: &AuditRecord) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CHAIN_TAG);
    h.update(prev);
    h.update(record.encode());
    h.finalize().into()
}

/// A record with its chain hash, as stored and exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The record.
    pub record: AuditRecord,
    /// Its chain hash: [`chain_hash`] of the previous record's hash and this record.
    pub hash: [u8; 32],
}

/// The head of the chain: the last sequence number and hash. Cheap to copy; the server seals a
/// batch on a copy and adopts it only after the batch commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The sequence number of the last record sealed (0 before the first).
    pub seq: u64,
    /// The hash of the last record sealed ([`GENESIS`] before the first).
    pub hash: [u8; 32],
}

impl Chain {
    /// The empty chain: seq 0, hash [`GENESIS`].
    pub fn new() -> Chain {
        Chain { seq: 0, hash: GENESIS }
    }

    /// Gives `record` the next sequence number (`self.seq + 1`), computes its chain hash, and
    /// advances the head to it.
    ///
    /// The sequence number saturates at `u64::MAX`, a trail no server will ever reach; a record
    /// sealed there would repeat the number and be reported by verification.
    pub fn seal(&mut self, mut record: AuditRecord) -> StoredRecord {
        record.seq = self.seq.saturating_add(1);
        let hash = chain_hash(&self.hash, &record);
        self.seq = record.seq;
        self.hash = hash;
        StoredRecord { record, hash }
    }
}

impl Default for Chain {
    fn default() -> Chain {
        Chain::new()
    }
}

/// A signed statement that the chain's hash at record `seq` was `hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The sequence number of the last record covered.
    pub seq: u64,
    /// The chain hash of record `seq`.
    pub hash: [u8; 32],
    /// When the checkpoint was made, in milliseconds since the Unix epoch.
    pub time_unix_ms: i64,
    /// ECDSA P-256 over [`checkpoint_digest`], 64 bytes `r || s` (high-S accepted).
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// The bytes this checkpoint's signature covers ([`checkpoint_message`]).
    pub fn message(&self) -> Vec<u8> {
        checkpoint_message(self.seq, &self.hash, self.time_unix_ms)
    }

    /// What the HSM signs for this checkpoint ([`checkpoint_digest`]).
    pub fn digest(&self) -> [u8; 32] {
        checkpoint_digest(self.seq, &self.hash, self.time_unix_ms)
    }
}

/// The bytes a checkpoint signs: `"kms-audit-checkpoint-v1" || seq u64 BE || hash || time i64 BE`.
pub fn checkpoint_message(seq: u64, hash: &[u8; 32], time_unix_ms: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_TAG.len() + 8 + 32 + 8);
    m.extend_from_slice(CHECKPOINT_TAG);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&time_unix_ms.to_be_bytes());
    m
}

/// SHA-256 of [`checkpoint_message`]: what the HSM signs with raw `CKM_ECDSA`.
pub fn checkpoint_digest(seq: u64, hash: &[u8; 32], time_unix_ms: i64) -> [u8; 32] {
    Sha256::digest(checkpoint_message(seq, hash, time_unix_ms)).into()
}

/// A whole trail as read from an export or a database: records in the order they were read
/// (never sorted, so that reordering stays detectable) and the checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trail {
    /// The records, in the order they were read.
    pub records: Vec<StoredRecord>,
    /// The checkpoints, in the order they were read.
    pub checkpoints: Vec<Checkpoint>,
}

impl Trail {
    /// Verifies the trail against the checkpoint signing key (see [`crate::verify()`]).
    pub fn verify(&self, key: &p256::ecdsa::VerifyingKey) -> crate::VerifyReport {
        crate::verify::verify(self.records.iter().cloned(), &self.checkpoints, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Outcome;

    fn record(n: u32) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time_unix_ms: 1_700_000_000_000 + i64::from(n),
            caller: "spiffe://example/svc".into(),
            cert_fingerprint: vec![n as u8; 32],
            rpc: "Encrypt".into(),
            key: "k".into(),
            key_version: n,
            level: "PERSONAL".into(),
            outcome: Outcome::Ok,
            status_code: 0,
            request_id: format!("req-{n}"),
            context_hash: vec![],
            detail: String::new(),
        }
    }

    #[test]
    fn seal_numbers_and_links_records() {
        let mut c = Chain::default();
        assert_eq!(c, Chain { seq: 0, hash: GENESIS });
        let a = c.seal(record(1));
        let b = c.seal(record(2));
        assert_eq!((a.record.seq, b.record.seq), (1, 2));
        assert_eq!(a.hash, chain_hash(&GENESIS, &a.record));
        assert_eq!(b.hash, chain_hash(&a.hash, &b.record));
        assert_eq!(c, Chain { seq: 2, hash: b.hash });
    }

    #[test]
    fn sealing_a_copy_leaves_the_original_head() {
        let mut head = Chain::new();
        head.seal(record(1));
        let mut copy = head;
        copy.seal(record(2));
        assert_eq!(head.seq, 1);
        assert_eq!(copy.seq, 2);
    }

    // Computed once from the documented layout by an independent implementation (Python's
    // hashlib and struct), not by this crate.
    const PIN_CONTEXT: &str = "3595d99f6ef094e11625a520d599c46cd1f3b410d8aae1e80a2d60289b4033ee";
    const PIN_ENCODED: &str = "136c362bf130c5334c11dbb63de36cb99e2e7fa76975c48116ae2daf987ea54e";
    const PIN_HASH_1: &str = "ca14d78e5d0874db639a4f6ed6800c45d3d5b3140c8aa888d06fb83baa6649a3";
    const PIN_HASH_2: &str = "811382a7f78338e85c11e9e4b79d5c1dcff7a62adb61af5dd8fca50a4e9f4540";
    const PIN_CHECKPOINT: &str = "92d53a43500ab1c212f371a61b9867fa195fac49b2a941baa67ec72ca824614e";

    /// A fixed record whose encoding and chain hash are pinned below: if either constant has to
    /// change, the v1 format has changed, which breaks every existing trail.
    fn pinned_record() -> AuditRecord {
        let mut context = std::collections::BTreeMap::new();
        context.insert("purpose".to_owned(), "payroll".to_owned());
        context.insert("tenant".to_owned(), "agency-7".to_owned());
        AuditRecord {
            seq: 1,
            time_unix_ms: 1_717_171_717_171,
            caller: "spiffe://agency.example/payroll".into(),
            cert_fingerprint: (0u8..32).collect(),
            rpc: "GenerateDataKey".into(),
            key: "payroll-kek".into(),
            key_version: 3,
            level: "PERSONAL".into(),
            outcome: Outcome::Refused,
            status_code: 7,
            request_id: "0f1e2d3c".into(),
            context_hash: crate::record::context_hash(&context).to_vec(),
            detail: "caller lacks the PERSONAL level".into(),
        }
    }

    #[test]
    fn v1_format_is_pinned() {
        let r = pinned_record();
        let hex = |b: &[u8]| crate::hex::encode(b);
        let encoded: [u8; 32] = Sha256::digest(r.encode()).into();
        let hash = chain_hash(&GENESIS, &r);
        let next = chain_hash(&hash, &AuditRecord { seq: 2, outcome: Outcome::Ok, ..r.clone() });
        assert_eq!(hex(&r.context_hash), PIN_CONTEXT);
        assert_eq!(hex(&encoded), PIN_ENCODED);
        assert_eq!(hex(&hash), PIN_HASH_1);
        assert_eq!(hex(&next), PIN_HASH_2);
        assert_eq!(hex(&checkpoint_digest(2, &next, 1_717_171_800_000)), PIN_CHECKPOINT);
    }

    #[test]
    fn checkpoint_message_layout() {
        let m = checkpoint_message(258, &[0xCD; 32], -2);
        assert_eq!(&m[..23], b"kms-audit-checkpoint-v1");
        assert_eq!(&m[23..31], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&m[31..63], &[0xCD; 32]);
        assert_eq!(&m[63..], &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE]);
        let d: [u8; 32] = Sha256::digest(&m).into();
        assert_eq!(checkpoint_digest(258, &[0xCD; 32], -2), d);
    }
}
