//! The audit database as a store: schema and versioning, read-only opening, refusals on append
//! and checkpoint, paging and streaming, and hostile rows that must be errors, never panics.

mod common;

use common::{attacker, fill, record, sign, signing_key, trail, verifying_key};
use kms_audit::{AuditDb, AuditDbError, Chain, StoredRecord, GENESIS, SCHEMA_VERSION};

#[test]
fn open_creates_the_schema_in_wal_mode_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let db = AuditDb::open(&path).unwrap();
    assert_eq!(db.head().unwrap(), Chain::new());
    assert_eq!(db.last_checkpoint().unwrap(), None);
    assert_eq!(db.record_count().unwrap(), 0);
    drop(db);

    let conn = attacker(&path);
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let strict: i64 = conn
        .query_row("SELECT count(*) FROM pragma_table_list WHERE name LIKE 'audit_%' AND strict = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(strict, 3);
    drop(conn);

    let mut db = AuditDb::open(&path).unwrap();
    let rows = fill(&mut db, 12, 10, &signing_key());
    drop(db);
    let db = AuditDb::open(&path).unwrap();
    let head = db.head().unwrap();
    assert_eq!(head, Chain { seq: 12, hash: rows[11].hash });
    assert_eq!(db.last_checkpoint().unwrap().unwrap().seq, 10);
    let rows_in_version: i64 =
        attacker(&path).query_row("SELECT count(*) FROM schema_version", [], |r| r.get(0)).unwrap();
    assert_eq!(rows_in_version, 1);
}

#[test]
fn a_trail_has_one_id_for_life_and_a_version_1_file_gets_one() {
    let (_dir, path) = trail(3);
    let id = AuditDb::open(&path).unwrap().trail_id().unwrap().expect("a new trail has an id");
    assert_eq!(AuditDb::open(&path).unwrap().trail_id().unwrap(), Some(id), "reopening keeps the id");
    assert_eq!(AuditDb::open_read_only(&path).unwrap().trail_id().unwrap(), Some(id));
    // A file written by schema version 1 has no id: read-only opening says so, and the first
    // opening for writing gives it one.
    let conn = attacker(&path);
    conn.execute_batch("DROP TABLE audit_trail; UPDATE schema_version SET version = 1;").unwrap();
    drop(conn);
    assert_eq!(AuditDb::open_read_only(&path).unwrap().trail_id().unwrap(), None);
    let new_id = AuditDb::open(&path).unwrap().trail_id().unwrap().expect("migrated");
    assert_ne!(new_id, id);
    let version: i64 = attacker(&path).query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // Two ids in one file is a corrupt file, not a choice.
    attacker(&path).execute("INSERT INTO audit_trail (trail_id) VALUES (x'00000000000000000000000000000000')", []).unwrap();
    assert!(matches!(AuditDb::open_read_only(&path).unwrap().trail_id(), Err(AuditDbError::CorruptRow { .. })));
}

#[test]
fn the_outcomes_of_a_request_are_found_from_a_sequence_number_on() {
    let (_dir, path) = trail(12);
    let db = AuditDb::open_read_only(&path).unwrap();
    let r5 = db.records(5, 1).unwrap().remove(0);
    let id = r5.record.request_id.clone();
    assert_eq!(db.outcomes_of(&id, 1).unwrap(), vec![r5.record.outcome]);
    assert_eq!(db.outcomes_of(&id, 5).unwrap(), vec![r5.record.outcome]);
    assert!(db.outcomes_of(&id, 6).unwrap().is_empty());
    assert!(db.outcomes_of("no-such-request", 1).unwrap().is_empty());
    assert_eq!(db.record_hash(5).unwrap(), Some(r5.hash));
    assert_eq!(db.record_hash(13).unwrap(), None);
}

#[test]
fn newer_schema_is_refused() {
    let (_dir, path) = trail(3);
    attacker(&path).execute("UPDATE schema_version SET version = 3", []).unwrap();
    for result in [AuditDb::open(&path), AuditDb::open_read_only(&path)] {
        match result {
            Err(e @ AuditDbError::UnsupportedVersion { found: 3, supported: 2, .. }) => {
                assert!(e.to_string().contains("newer"), "{e}");
            }
            other => panic!("expected UnsupportedVersion, got {other:?}"),
        }
    }
}

#[test]
fn foreign_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    attacker(&path).execute("CREATE TABLE keys (name TEXT)", []).unwrap();
    assert!(matches!(AuditDb::open(&path), Err(AuditDbError::NotAnAuditDb { .. })));
    assert!(matches!(AuditDb::open_read_only(&path), Err(AuditDbError::NotAnAuditDb { .. })));
    // Nothing was added to it.
    let tables: i64 = attacker(&path).query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0)).unwrap();
    assert_eq!(tables, 1);

    let junk = dir.path().join("junk.db");
    std::fs::write(
        &junk,
        b"this is not an SQLite file, not even close....................................................",
    )
    .unwrap();
    assert!(matches!(AuditDb::open_read_only(&junk), Err(AuditDbError::Sqlite { .. })));
}

#[test]
fn read_only_open_never_creates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.db");
    assert!(matches!(AuditDb::open_read_only(&path), Err(AuditDbError::Sqlite { op: "open read-only", .. })));
    assert!(!path.exists());
}

fn next_batch(db: &AuditDb, n: u64) -> Vec<StoredRecord> {
    let mut head = db.head().unwrap();
    (0..n).map(|i| head.seal(record(100 + i))).collect()
}

#[test]
fn append_fails_on_a_database_that_cannot_be_written() {
    let (dir, path) = trail(5);
    let mut ro = AuditDb::open_read_only(&path).unwrap();
    let batch = next_batch(&ro, 2);
    let err = ro.append(&batch).unwrap_err();
    assert!(matches!(err, AuditDbError::Sqlite { .. }), "{err:?}");
    let err = ro.insert_checkpoint(&sign(&signing_key(), 5, &ro.head().unwrap().hash, 1)).unwrap_err();
    assert!(matches!(err, AuditDbError::Sqlite { .. }), "{err:?}");
    assert_eq!(ro.head().unwrap().seq, 5);

    // Also a read-write handle on a file made read-only (file and directory), where the
    // permission actually binds: as root it does not, so that half is skipped.
    use std::os::unix::fs::PermissionsExt;
    let mut db = AuditDb::open(&path).unwrap();
    let batch = next_batch(&db, 2);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let privileged = std::fs::OpenOptions::new().append(true).open(&path).is_ok();
    let reopened = AuditDb::open(&path);
    if !privileged {
        match reopened {
            Err(_) => {}
            Ok(mut again) => assert!(again.append(&batch).is_err()),
        }
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    db.append(&batch).unwrap();
    assert_eq!(db.head().unwrap().seq, 7);
}

#[test]
fn append_refuses_batches_that_break_the_chain_and_is_all_or_nothing() {
    let (_dir, path) = trail(5);
    let mut db = AuditDb::open(&path).unwrap();
    let before = db.head().unwrap();

    // A gap: a batch sealed from an empty head.
    let mut stale = Chain::new();
    let replay = vec![stale.seal(record(1))];
    assert!(matches!(db.append(&replay), Err(AuditDbError::NotContiguous { expected: 6, got: 1 })));

    // A hash that does not chain.
    let mut batch = next_batch(&db, 3);
    batch[1].hash[0] ^= 1;
    assert!(matches!(db.append(&batch), Err(AuditDbError::BrokenLink { seq: 7 })));
    assert_eq!(db.head().unwrap(), before, "record 6 must not have been kept");

    // A fingerprint that is not a SHA-256.
    let mut head = before;
    let mut bad = record(9);
    bad.cert_fingerprint = vec![1; 20];
    let batch = vec![head.seal(record(8)), head.seal(bad)];
    assert!(matches!(db.append(&batch), Err(AuditDbError::InvalidRecord { seq: 7, .. })));
    assert_eq!(db.head().unwrap(), before);

    db.append(&[]).unwrap();
    let good = next_batch(&db, 3);
    db.append(&good).unwrap();
    assert_eq!(db.head().unwrap(), Chain { seq: 8, hash: good[2].hash });
}

#[test]
fn checkpoints_must_name_a_stored_hash_once() {
    let (_dir, path) = trail(12);
    let mut db = AuditDb::open(&path).unwrap();
    let key = signing_key();
    assert!(matches!(
        db.insert_checkpoint(&sign(&key, 12, &[7; 32], 1)),
        Err(AuditDbError::CheckpointNotOnChain { seq: 12 })
    ));
    assert!(matches!(
        db.insert_checkpoint(&sign(&key, 13, &[7; 32], 1)),
        Err(AuditDbError::CheckpointNotOnChain { seq: 13 })
    ));
    let head = db.head().unwrap();
    let c = sign(&key, 12, &head.hash, 5);
    db.insert_checkpoint(&c).unwrap();
    assert_eq!(db.last_checkpoint().unwrap(), Some(c.clone()));
    assert!(matches!(db.insert_checkpoint(&c), Err(AuditDbError::CheckpointExists { seq: 12 })));
    // The empty trail's checkpoint names GENESIS.
    db.insert_checkpoint(&sign(&key, 0, &GENESIS, 0)).unwrap();
    assert_eq!(db.checkpoints(0, 10).unwrap().iter().map(|c| c.seq).collect::<Vec<_>>(), vec![0, 10, 12]);
    assert!(db.verify(&verifying_key()).unwrap().is_intact());
}

#[test]
fn paging_and_streaming_read_records_in_seq_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let mut db = AuditDb::open(&path).unwrap();
    let all = fill(&mut db, 2600, 100, &signing_key());

    assert_eq!(db.records(1, 3).unwrap(), all[..3].to_vec());
    assert_eq!(db.records(2599, 10).unwrap(), all[2598..].to_vec());
    assert_eq!(db.records(0, 1).unwrap(), all[..1].to_vec());
    assert!(db.records(u64::MAX, 10).unwrap().is_empty());
    assert_eq!(db.last_records(4).unwrap(), all[2596..].to_vec());
    assert_eq!(db.last_records(0).unwrap(), vec![]);
    assert_eq!(db.checkpoints(2500, 10).unwrap().iter().map(|c| c.seq).collect::<Vec<_>>(), vec![2500, 2600]);
    assert_eq!(db.record_count().unwrap(), 2600);

    let streamed: Vec<_> = db.iter_records().collect::<Result<_, _>>().unwrap();
    assert_eq!(streamed, all);
    let mut seen = 0u64;
    db.for_each_record(|r| -> Result<(), AuditDbError> {
        seen += 1;
        assert_eq!(r.record.seq, seen);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, 2600);
    let report = db.verify(&verifying_key()).unwrap();
    assert!(report.is_intact());
    assert_eq!((report.records, report.valid_checkpoints, report.uncovered), (2600, 26, None));
}

/// Opens the tampered file and expects every read path to fail on the named row.
fn expect_corrupt(path: &std::path::Path, want_seq: i64, want_what: &str) {
    let db = AuditDb::open_read_only(path).unwrap();
    let check = |e: AuditDbError| match e {
        AuditDbError::CorruptRow { seq, what } => {
            assert_eq!(seq, want_seq);
            assert!(what.contains(want_what), "{what}");
        }
        other => panic!("expected CorruptRow, got {other:?}"),
    };
    check(db.verify(&verifying_key()).unwrap_err());
    check(db.trail().unwrap_err());
    if want_seq >= 0 {
        // `records` reads from a u64 seq on, so a negative row is outside its range.
        check(db.records(0, 100).unwrap_err());
    }
}

#[test]
fn hostile_rows_are_errors_naming_the_row() {
    let cases: &[(&str, i64, &str)] = &[
        ("UPDATE audit_records SET hash = x'0102' WHERE seq = 4", 4, "hash"),
        ("UPDATE audit_records SET cert_fingerprint = zeroblob(31) WHERE seq = 3", 3, "cert_fingerprint"),
        ("UPDATE audit_records SET context_hash = zeroblob(33) WHERE seq = 2", 2, "context_hash"),
        ("UPDATE audit_records SET outcome = 'maybe' WHERE seq = 5", 5, "outcome"),
        ("UPDATE audit_records SET key_version = -1 WHERE seq = 2", 2, "key_version"),
        ("UPDATE audit_records SET status_code = 4294967296 WHERE seq = 2", 2, "status_code"),
        ("UPDATE audit_records SET seq = -3 WHERE seq = 3", -3, "seq"),
        ("UPDATE audit_records SET seq = 0 WHERE seq = 1", 0, "seq"),
        ("UPDATE audit_records SET caller = CAST(x'ff' AS TEXT) WHERE seq = 5", 5, "caller"),
    ];
    for (sql, seq, what) in cases {
        let (_dir, path) = trail(5);
        attacker(&path).execute(sql, []).unwrap();
        expect_corrupt(&path, *seq, what);
    }
}

#[test]
fn hostile_non_strict_tables_give_errors_not_panics() {
    let (_dir, path) = trail(5);
    let conn = attacker(&path);
    conn.execute_batch(
        "ALTER TABLE audit_records RENAME TO old;
         CREATE TABLE audit_records (seq INTEGER PRIMARY KEY, time_ms, caller, cert_fingerprint, rpc, key,
             key_version, level, outcome, status_code, request_id, context_hash, detail, hash);
         INSERT INTO audit_records SELECT * FROM old;
         DROP TABLE old;
         UPDATE audit_records SET time_ms = 'yesterday' WHERE seq = 2;",
    )
    .unwrap();
    expect_corrupt(&path, 2, "time_ms");
    conn.execute_batch(
        "UPDATE audit_records SET time_ms = 1 WHERE seq = 2;
         UPDATE audit_records SET hash = lower(hex(hash)) WHERE seq = 3;",
    )
    .unwrap();
    expect_corrupt(&path, 3, "hash");
    conn.execute("UPDATE audit_records SET hash = NULL WHERE seq = 3", []).unwrap();
    expect_corrupt(&path, 3, "hash");

    conn.execute_batch(
        "DROP TABLE audit_checkpoints;
         CREATE TABLE audit_checkpoints (seq INTEGER PRIMARY KEY, hash, time_ms, signature);
         INSERT INTO audit_checkpoints VALUES (1, 'abc', 0, x'00');",
    )
    .unwrap();
    let db = AuditDb::open_read_only(&path).unwrap();
    assert!(matches!(db.last_checkpoint(), Err(AuditDbError::CorruptCheckpoint { seq: 1, .. })));
}

#[test]
fn handles_can_move_to_a_blocking_thread() {
    fn send<T: Send>() {}
    send::<AuditDb>();
    send::<AuditDbError>();
    send::<kms_audit::jsonl::JsonlError>();
    let (_dir, path) = trail(3);
    let db = AuditDb::open(&path).unwrap();
    let head = std::thread::spawn(move || db.head().unwrap()).join().unwrap();
    assert_eq!(head.seq, 3);
}

#[test]
fn a_new_audit_database_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kms.audit.db");
    drop(kms_audit::AuditDb::open(&path).unwrap());
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
}
