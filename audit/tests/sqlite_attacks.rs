//! Attacks on an audit database file, made with plain SQL through a separate connection, and the
//! problem verification must name for each.

mod common;

use common::{attacker, other_key, trail, verifying_key};
use kms_audit::{chain_hash, AuditDb, ProblemKind, VerifyReport};

/// Verifies the file both ways (streaming from the database, and from the loaded trail) and
/// checks they agree.
fn verify(path: &std::path::Path) -> VerifyReport {
    let db = AuditDb::open_read_only(path).unwrap();
    let streamed = db.verify(&verifying_key()).unwrap();
    let loaded = db.trail().unwrap().verify(&verifying_key());
    assert_eq!(streamed, loaded);
    streamed
}

fn first(report: &VerifyReport) -> (u64, ProblemKind, &str) {
    let p = report.first_problem().expect("a problem");
    (p.seq, p.kind, p.message.as_str())
}

#[test]
fn untouched_trail_is_intact_and_reports_uncovered_records() {
    let (_dir, path) = trail(53);
    let report = verify(&path);
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.records, 53);
    assert_eq!(report.checkpoints, 5);
    assert_eq!(report.valid_checkpoints, 5);
    assert_eq!(report.uncovered, Some((51, 53)));

    let (_dir, path) = trail(50);
    let report = verify(&path);
    assert!(report.is_intact());
    assert_eq!(report.uncovered, None);
}

#[test]
fn edited_record_is_named() {
    let (_dir, path) = trail(53);
    // Record 17 was refused (17 % 4 == 1); the attacker makes it look like a success.
    attacker(&path).execute("UPDATE audit_records SET outcome = 'ok' WHERE seq = 17", []).unwrap();
    let report = verify(&path);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let (seq, kind, message) = first(&report);
    assert_eq!((seq, kind), (17, ProblemKind::HashMismatch));
    assert_eq!(message, "record 17 does not match its hash: it was edited, inserted or reordered");
    assert_eq!(report.records, 53);
    assert_eq!(report.uncovered, None);
}

#[test]
fn deleted_record_is_named() {
    let (_dir, path) = trail(53);
    attacker(&path).execute("DELETE FROM audit_records WHERE seq = 17", []).unwrap();
    let report = verify(&path);
    let (seq, kind, message) = first(&report);
    assert_eq!((seq, kind), (17, ProblemKind::Missing));
    assert_eq!(message, "record 17 is missing: deleted, or the records after it were renumbered");
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.records, 52);
}

/// Moves records 17.. up by one, making room at 17.
fn renumber_from_17(conn: &rusqlite::Connection) {
    conn.execute_batch(
        "UPDATE audit_records SET seq = seq + 1000 WHERE seq >= 17;
         UPDATE audit_records SET seq = seq - 999 WHERE seq >= 1017;",
    )
    .unwrap();
}

#[test]
fn inserted_record_is_named() {
    let (_dir, path) = trail(53);
    let conn = attacker(&path);
    renumber_from_17(&conn);
    // The forgery copies record 16's row (hash included) under a new request id.
    conn.execute(
        "INSERT INTO audit_records SELECT 17, time_ms + 1, caller, cert_fingerprint, rpc, key, key_version, level, \
         'ok', 0, 'forged', context_hash, '', hash FROM audit_records WHERE seq = 16",
        [],
    )
    .unwrap();
    let report = verify(&path);
    let (seq, kind, _) = first(&report);
    assert_eq!((seq, kind), (17, ProblemKind::HashMismatch));
    assert_eq!(report.records, 54);
    assert_eq!(report.problems.len(), 1);
}

#[test]
fn inserted_record_with_a_correct_hash_is_caught_at_the_next_record() {
    // An attacker who knows the format gives the forgery its true chain hash but does not
    // recompute the hashes after it: the renumbered record after it no longer matches.
    let (_dir, path) = trail(53);
    let mut forged = AuditDb::open_read_only(&path).unwrap().records(16, 1).unwrap().remove(0);
    forged.record.seq = 17;
    forged.record.request_id = "forged".into();
    let hash = chain_hash(&forged.hash, &forged.record);
    let conn = attacker(&path);
    renumber_from_17(&conn);
    conn.execute(
        "INSERT INTO audit_records SELECT 17, time_ms, caller, cert_fingerprint, rpc, key, key_version, level, \
         outcome, status_code, 'forged', context_hash, detail, ?1 FROM audit_records WHERE seq = 16",
        [hash.as_slice()],
    )
    .unwrap();
    let report = verify(&path);
    let (seq, kind, message) = first(&report);
    assert_eq!((seq, kind), (18, ProblemKind::HashMismatch));
    assert!(message.contains("inserted"));
}

#[test]
fn reordered_records_are_named() {
    let (_dir, path) = trail(53);
    attacker(&path)
        .execute_batch(
            "UPDATE audit_records SET seq = -17 WHERE seq = 17;
             UPDATE audit_records SET seq = 17 WHERE seq = 18;
             UPDATE audit_records SET seq = 18 WHERE seq = -17;",
        )
        .unwrap();
    let report = verify(&path);
    let (seq, kind, _) = first(&report);
    assert_eq!((seq, kind), (17, ProblemKind::HashMismatch));
    assert_eq!(report.problems.len(), 1);
}

#[test]
fn edit_with_recomputed_hashes_is_caught_by_the_checkpoint() {
    let (_dir, path) = trail(53);
    let conn = attacker(&path);
    conn.execute("UPDATE audit_records SET outcome = 'ok', status_code = 0 WHERE seq = 17", []).unwrap();
    // Recompute every stored hash from record 17 on, with the published format.
    let db = AuditDb::open_read_only(&path).unwrap();
    let mut prev = db.records(16, 1).unwrap()[0].hash;
    for stored in db.records(17, u32::MAX).unwrap() {
        prev = chain_hash(&prev, &stored.record);
        conn.execute(
            "UPDATE audit_records SET hash = ?1 WHERE seq = ?2",
            rusqlite::params![prev.as_slice(), stored.record.seq as i64],
        )
        .unwrap();
    }
    drop(db);

    let report = verify(&path);
    let kinds: Vec<_> = report.problems.iter().map(|p| (p.seq, p.kind)).collect();
    assert_eq!(kinds, [20, 30, 40, 50].map(|s| (s, ProblemKind::CheckpointMismatch)).to_vec(), "{:?}", report.problems);
    let (_, _, message) = first(&report);
    assert_eq!(
        message,
        "records 11..=20 do not match the signed checkpoint at record 20: a record among them was changed and \
         the hashes after it recomputed"
    );
    assert!(report.problems[1].message.starts_with("records 11..=30 do not match"));
    assert_eq!(report.valid_checkpoints, 5);
}

#[test]
fn truncated_trail_is_caught_by_the_checkpoint() {
    let (_dir, path) = trail(50);
    attacker(&path).execute("DELETE FROM audit_records WHERE seq > 45", []).unwrap();
    let report = verify(&path);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let (seq, kind, message) = first(&report);
    assert_eq!((seq, kind), (50, ProblemKind::CheckpointBeyondEnd));
    assert_eq!(
        message,
        "the signed checkpoint at record 50 covers records that are gone: records 46..=50 were deleted"
    );
    assert_eq!(report.records, 45);
}

#[test]
fn truncation_past_several_checkpoints_names_each() {
    let (_dir, path) = trail(53);
    attacker(&path).execute("DELETE FROM audit_records WHERE seq > 35", []).unwrap();
    let report = verify(&path);
    let got: Vec<_> = report.problems.iter().map(|p| (p.seq, p.kind)).collect();
    assert_eq!(got, vec![(40, ProblemKind::CheckpointBeyondEnd), (50, ProblemKind::CheckpointBeyondEnd)]);
    assert!(report.problems[0].message.contains("records 36..=40 were deleted"));
}

#[test]
fn altered_checkpoint_signature_is_named() {
    let (_dir, path) = trail(53);
    let conn = attacker(&path);
    let mut sig: Vec<u8> =
        conn.query_row("SELECT signature FROM audit_checkpoints WHERE seq = 30", [], |r| r.get(0)).unwrap();
    sig[10] ^= 0x01;
    conn.execute("UPDATE audit_checkpoints SET signature = ?1 WHERE seq = 30", [&sig]).unwrap();
    let report = verify(&path);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    let (seq, kind, message) = first(&report);
    assert_eq!((seq, kind), (30, ProblemKind::CheckpointSignatureInvalid));
    assert!(message.starts_with("the checkpoint at record 30 has an invalid signature"));
    assert_eq!(report.valid_checkpoints, 4);
    assert_eq!(report.uncovered, Some((51, 53)));
}

#[test]
fn altered_checkpoint_hash_breaks_its_signature() {
    let (_dir, path) = trail(53);
    attacker(&path).execute("UPDATE audit_checkpoints SET time_ms = time_ms + 1 WHERE seq = 20", []).unwrap();
    let report = verify(&path);
    assert_eq!(
        report.problems.iter().map(|p| (p.seq, p.kind)).collect::<Vec<_>>(),
        vec![(20, ProblemKind::CheckpointSignatureInvalid)]
    );
}

#[test]
fn wrong_key_invalidates_every_checkpoint() {
    let (_dir, path) = trail(53);
    let db = AuditDb::open_read_only(&path).unwrap();
    let report = db.verify(&other_key()).unwrap();
    assert_eq!(report.valid_checkpoints, 0);
    assert_eq!(
        report.problems.iter().map(|p| (p.seq, p.kind)).collect::<Vec<_>>(),
        [10, 20, 30, 40, 50].map(|s| (s, ProblemKind::CheckpointSignatureInvalid)).to_vec()
    );
    assert_eq!(report.uncovered, Some((1, 53)));
}

#[test]
fn checkpoints_past_the_first_record_problem_are_only_signature_checked() {
    let (_dir, path) = trail(53);
    let conn = attacker(&path);
    conn.execute("UPDATE audit_records SET detail = 'x' WHERE seq = 25", []).unwrap();
    conn.execute("DELETE FROM audit_records WHERE seq > 45", []).unwrap();
    let report = verify(&path);
    // Checkpoints 10 and 20 matched; 30.. are past the broken record, so neither a mismatch nor
    // the truncation is reported on top of it.
    assert_eq!(
        report.problems.iter().map(|p| (p.seq, p.kind)).collect::<Vec<_>>(),
        vec![(25, ProblemKind::HashMismatch)]
    );
    assert_eq!(report.valid_checkpoints, 5);
    assert_eq!(report.records, 45);
}
