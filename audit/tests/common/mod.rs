//! Shared test fixtures: a deterministic signing key, varied records, a real trail of sealed and
//! checkpointed records in an audit database, and a separate "attacker" connection to tamper with it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kms_audit::{checkpoint_digest, context_hash, AuditDb, AuditRecord, Chain, Checkpoint, Outcome, StoredRecord};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};

/// The test stand-in for the HSM's checkpoint key.
pub fn signing_key() -> SigningKey {
    SigningKey::from_slice(&[0x42; 32]).unwrap()
}

pub fn verifying_key() -> VerifyingKey {
    *signing_key().verifying_key()
}

/// A key that did not sign anything.
pub fn other_key() -> VerifyingKey {
    *SigningKey::from_slice(&[0x43; 32]).unwrap().verifying_key()
}

/// Signs like the HSM: raw ECDSA over the 32-byte digest, 64-byte r || s.
pub fn sign(key: &SigningKey, seq: u64, hash: &[u8; 32], time_unix_ms: i64) -> Checkpoint {
    let sig: Signature = key.sign_prehash(&checkpoint_digest(seq, hash, time_unix_ms)).unwrap();
    Checkpoint { seq, hash: *hash, time_unix_ms, signature: sig.to_bytes().to_vec() }
}

/// A varied, unsealed record (seq 0 until sealed).
pub fn record(i: u64) -> AuditRecord {
    let outcome = match i % 4 {
        0 => Outcome::Ok,
        1 => Outcome::Refused,
        2 => Outcome::Failed,
        _ => Outcome::Begun,
    };
    let mut ctx = BTreeMap::new();
    ctx.insert("tenant".to_owned(), format!("t{}", i % 3));
    AuditRecord {
        seq: 0,
        time_unix_ms: 1_700_000_000_000 + 1000 * i as i64,
        caller: if i.is_multiple_of(5) { String::new() } else { format!("spiffe://agency.example/svc-{}", i % 7) },
        cert_fingerprint: if i.is_multiple_of(5) { vec![] } else { vec![(i % 251) as u8; 32] },
        rpc: if i.is_multiple_of(2) { "GenerateDataKey".into() } else { "Decrypt".into() },
        key: format!("key-{}", i % 3),
        key_version: (i % 4) as u32,
        level: "PERSONAL".into(),
        outcome,
        status_code: if outcome == Outcome::Ok { 0 } else { 7 },
        request_id: format!("req-{i:04}"),
        context_hash: if i.is_multiple_of(6) { vec![] } else { context_hash(&ctx).to_vec() },
        detail: if outcome == Outcome::Ok { String::new() } else { format!("refused: rule {i} \"quoted\" ü") },
    }
}

/// Seals `n` records into `db` the way the server does: batches sealed on a copy of the head and
/// adopted after they commit, and a checkpoint every `every` records signed with `key`.
pub fn fill(db: &mut AuditDb, n: u64, every: u64, key: &SigningKey) -> Vec<StoredRecord> {
    let mut head = db.head().unwrap();
    let mut all = Vec::new();
    let mut batch_head = head;
    let mut batch = Vec::new();
    for i in 1..=n {
        batch.push(batch_head.seal(record(batch_head.seq + 1)));
        let seq = batch_head.seq;
        if batch.len() == 4 || seq.is_multiple_of(every) || i == n {
            db.append(&batch).unwrap();
            head = batch_head;
            all.append(&mut batch);
            if seq.is_multiple_of(every) {
                db.insert_checkpoint(&sign(key, head.seq, &head.hash, 1_800_000_000_000 + seq as i64)).unwrap();
            }
        }
    }
    assert_eq!(head, Chain { seq: all.len() as u64, hash: all.last().unwrap().hash });
    all
}

/// A fresh audit database with `n` records and a checkpoint every 10.
pub fn trail(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let mut db = AuditDb::open(&path).unwrap();
    fill(&mut db, n, 10, &signing_key());
    (dir, path)
}

/// The attacker's own connection to the file.
pub fn attacker(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}
