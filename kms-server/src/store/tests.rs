//! Unit tests of the key store against real SQLite files in temporary directories.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::classification::Classification;
use crate::ids::{KeyId, KeyPurpose, ObjectId};

fn temp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kms.db");
    (dir, path)
}

/// A key row with `versions` versions (the last one primary and enabled); also used by other
/// modules' tests.
pub(crate) fn key(name: &str, level: Classification, id_byte: u8, versions: u32) -> KeyRecord {
    let id = KeyId([id_byte; 16]);
    KeyRecord {
        id,
        name: name.to_owned(),
        classification: level,
        purpose: KeyPurpose::Envelope,
        state: KeyState::Enabled,
        primary_version: versions,
        rotation_period_days: 30,
        created_at: 1_700_000_000,
        rotated_at: 1_700_000_000 + i64::from(versions),
        destroy_at: None,
        revision: 1,
        versions: (1..=versions)
            .map(|v| VersionRecord {
                version: v,
                object_id: ObjectId::for_version(id, v),
                state: if v == versions { KeyState::Enabled } else { KeyState::Disabled },
                created_at: 1_700_000_000 + i64::from(v),
                destroy_at: None,
            })
            .collect(),
    }
}

/// A stand-in MAC (the store keeps MACs; it never checks them).
fn mac(k: &KeyRecord) -> RowMac {
    RowMac([k.id.0[0] ^ k.revision as u8; 32])
}

fn insert(store: &Store, k: &KeyRecord) -> Result<(), StoreError> {
    store.insert_key(k, &mac(k))
}

fn stored(k: &KeyRecord) -> Option<StoredKey> {
    Some(StoredKey { record: k.clone(), mac: mac(k) })
}

/// Edits the file behind the store's back, as an attacker or a damaged disk would.
fn tamper(path: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(path).expect("open for tampering");
    conn.execute_batch(sql).expect("tamper");
}

fn assert_corrupt(store: &Store, name: &str, expected: &str) {
    match store.key_by_name(name) {
        Err(StoreError::CorruptRow { key, what }) => {
            assert_eq!(what, expected);
            assert!(!key.is_empty());
        }
        other => panic!("expected CorruptRow({expected}), got {other:?}"),
    }
}

#[test]
fn key_round_trips_with_its_versions() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let k = key("payroll", Classification::Secret, 7, 3);
    insert(&store, &k).unwrap();
    assert_eq!(store.key_by_name("payroll").unwrap(), stored(&k));
    assert_eq!(store.key_by_id(k.id).unwrap(), stored(&k));
    assert_eq!(store.key_by_name("nope").unwrap(), None);
    assert_eq!(store.key_by_id(KeyId([9; 16])).unwrap(), None);
    let ids = store.all_version_object_ids().unwrap();
    assert_eq!(ids, k.versions.iter().map(|v| v.object_id.clone()).collect::<Vec<_>>());
}

#[test]
fn reopening_keeps_the_data() {
    let (_dir, path) = temp();
    let k = key("a", Classification::Personal, 1, 1);
    {
        let store = Store::open(&path).unwrap();
        insert(&store, &k).unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.key_by_name("a").unwrap(), stored(&k));
}

#[test]
fn duplicate_name_is_refused_and_changes_nothing() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    insert(&store, &key("dup", Classification::Personal, 1, 1)).unwrap();
    let err = insert(&store, &key("dup", Classification::Secret, 2, 1)).unwrap_err();
    assert!(matches!(&err, StoreError::DuplicateName { name } if name == "dup"), "{err:?}");
    assert_eq!(store.key_by_id(KeyId([2; 16])).unwrap(), None);
    assert_eq!(store.all_version_object_ids().unwrap().len(), 1);
}

#[test]
fn list_filters_by_level_and_prefix_and_orders_by_name() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    insert(&store, &key("tax/b", Classification::Secret, 1, 1)).unwrap();
    insert(&store, &key("tax/a", Classification::Personal, 2, 2)).unwrap();
    insert(&store, &key("health/a", Classification::Secret, 3, 1)).unwrap();
    insert(&store, &key("TAX/upper", Classification::Secret, 4, 1)).unwrap();
    let names = |f: KeyFilter| -> Vec<String> { store.list_keys(&f).unwrap().keys.into_iter().map(|k| k.record.name).collect() };
    assert_eq!(names(KeyFilter::default()), ["TAX/upper", "health/a", "tax/a", "tax/b"]);
    assert_eq!(names(KeyFilter { name_prefix: Some("tax/".into()), ..Default::default() }), ["tax/a", "tax/b"]);
    assert_eq!(
        names(KeyFilter { classification: Some(Classification::Secret), ..Default::default() }),
        ["TAX/upper", "health/a", "tax/b"]
    );
    assert_eq!(
        names(KeyFilter { classification: Some(Classification::Secret), name_prefix: Some("tax".into()) }),
        ["tax/b"]
    );
    let listed = store.list_keys(&KeyFilter { name_prefix: Some("tax/a".into()), ..Default::default() }).unwrap();
    assert_eq!(listed.keys[0].record.versions.len(), 2);
    assert!(listed.unreadable.is_empty());
}

#[test]
fn prefix_treats_percent_and_underscore_literally() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    insert(&store, &key("a%b", Classification::Personal, 1, 1)).unwrap();
    insert(&store, &key("axb", Classification::Personal, 2, 1)).unwrap();
    insert(&store, &key("a_c", Classification::Personal, 3, 1)).unwrap();
    insert(&store, &key("ayc", Classification::Personal, 4, 1)).unwrap();
    let names = |p: &str| -> Vec<String> {
        let f = KeyFilter { name_prefix: Some(p.into()), ..Default::default() };
        store.list_keys(&f).unwrap().keys.into_iter().map(|k| k.record.name).collect()
    };
    assert_eq!(names("a%"), ["a%b"]);
    assert_eq!(names("a_"), ["a_c"]);
    assert_eq!(names("%"), Vec::<String>::new());
}

#[test]
fn invalid_records_are_not_written() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let mut k = key("bad", Classification::Personal, 1, 2);
    k.primary_version = 5;
    assert!(matches!(insert(&store, &k), Err(StoreError::InvalidRecord { .. })));
    let mut k = key("bad", Classification::Personal, 1, 1);
    k.versions[0].object_id = ObjectId::for_version(KeyId([2; 16]), 1);
    assert!(matches!(insert(&store, &k), Err(StoreError::InvalidRecord { .. })));
    let mut k = key("bad", Classification::Personal, 1, 1);
    k.versions.clear();
    assert!(matches!(insert(&store, &k), Err(StoreError::InvalidRecord { .. })));
    assert_eq!(store.list_keys(&KeyFilter::default()).unwrap(), KeyListing::default());
}

#[test]
fn corrupt_rows_are_refused_not_trusted() {
    let cases: &[(&str, &str)] = &[
        ("UPDATE keys SET classification = 9", "unknown classification"),
        ("UPDATE keys SET classification = 0", "unknown classification"),
        ("UPDATE keys SET purpose = 'SIGN'", "unknown purpose"),
        ("UPDATE keys SET state = 'enabled'", "unknown key state"),
        ("UPDATE keys SET primary_version = 0", "primary version out of range"),
        ("UPDATE keys SET primary_version = 4294967296", "primary version out of range"),
        ("UPDATE keys SET primary_version = 7", "the primary version is not among the versions"),
        ("UPDATE keys SET rotation_period_days = -1", "rotation period out of range"),
        ("UPDATE keys SET revision = 0", "revision out of range"),
        ("UPDATE keys SET row_mac = x'00'", "metadata MAC is not 32 bytes"),
        ("UPDATE keys SET destroy_at = 5", "a destruction time is set exactly when the key is PENDING_DESTRUCTION"),
        ("UPDATE keys SET state = 'PENDING_DESTRUCTION'", "a destruction time is set exactly when the key is PENDING_DESTRUCTION"),
        ("UPDATE keys SET state = 'DESTROYED'", "every version of a DESTROYED key is DESTROYED"),
        ("UPDATE key_versions SET state = 'DISABLED' WHERE version = 2", "the primary version of a key in use must be ENABLED"),
        ("UPDATE key_versions SET state = 'GONE' WHERE version = 1", "unknown version state"),
        ("UPDATE key_versions SET version = 0 WHERE version = 1", "version number out of range"),
        (
            "UPDATE key_versions SET object_id = x'0202020202020202020202020202020200000002' WHERE version = 2",
            "version object id does not match its key id and version",
        ),
    ];
    for (sql, expected) in cases {
        let (_dir, path) = temp();
        let store = Store::open(&path).unwrap();
        insert(&store, &key("victim", Classification::Secret, 1, 2)).unwrap();
        insert(&store, &key("bystander", Classification::Secret, 3, 1)).unwrap();
        drop(store);
        let targeted = if sql.starts_with("UPDATE keys SET") {
            format!("{sql} WHERE name = 'victim'")
        } else {
            sql.replace(" WHERE version", " WHERE key_id = x'01010101010101010101010101010101' AND version")
        };
        tamper(&path, &targeted);
        let store = Store::open(&path).unwrap();
        assert_corrupt(&store, "victim", expected);
        // The listing names the bad row and still lists the good one.
        let listing = store.list_keys(&KeyFilter::default()).unwrap();
        assert_eq!(listing.keys.iter().map(|k| k.record.name.as_str()).collect::<Vec<_>>(), ["bystander"], "after: {sql}");
        assert_eq!(listing.unreadable, vec![UnreadableKey { key: "victim".into(), what: expected }], "after: {sql}");
    }
}

#[test]
fn corrupt_key_id_is_refused() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    insert(&store, &key("victim", Classification::Secret, 1, 1)).unwrap();
    drop(store);
    tamper(&path, "PRAGMA foreign_keys=OFF; UPDATE keys SET id = x'0102'");
    let store = Store::open(&path).unwrap();
    assert_corrupt(&store, "victim", "key id is not 16 bytes");
}

#[test]
fn deleted_versions_are_detected() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    insert(&store, &key("victim", Classification::Secret, 1, 1)).unwrap();
    drop(store);
    tamper(&path, "DELETE FROM key_versions");
    let store = Store::open(&path).unwrap();
    assert_corrupt(&store, "victim", "the primary version is not among the versions");
}

#[test]
fn unknown_schema_version_is_refused() {
    let (_dir, path) = temp();
    drop(Store::open(&path).unwrap());
    tamper(&path, &format!("UPDATE schema_version SET version = {}", SUPPORTED_SCHEMA_VERSION + 1));
    match Store::open(&path) {
        Err(StoreError::UnknownSchemaVersion { found, supported }) => {
            assert_eq!(found, SUPPORTED_SCHEMA_VERSION + 1);
            assert_eq!(supported, SUPPORTED_SCHEMA_VERSION);
        }
        other => panic!("expected UnknownSchemaVersion, got {other:?}"),
    }
}

#[test]
fn new_file_has_the_supported_schema_version() {
    let (_dir, path) = temp();
    drop(Store::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, 6);
    assert_eq!(SUPPORTED_SCHEMA_VERSION, 6);
}

#[test]
fn rows_from_schema_one_are_migrated_but_refused_for_lack_of_a_mac() {
    let (_dir, path) = temp();
    std::fs::File::create(&path).unwrap().set_permissions(std::fs::Permissions::from_mode(0o600)).unwrap();
    // A schema-1 file as the first release wrote it.
    tamper(
        &path,
        "CREATE TABLE schema_version (only_row INTEGER NOT NULL PRIMARY KEY CHECK (only_row = 1), version INTEGER NOT NULL);
         INSERT INTO schema_version VALUES (1, 1);
         CREATE TABLE keys (id BLOB NOT NULL PRIMARY KEY, name TEXT NOT NULL UNIQUE, classification INTEGER NOT NULL,
             purpose TEXT NOT NULL, state TEXT NOT NULL, primary_version INTEGER NOT NULL,
             rotation_period_days INTEGER NOT NULL, created_at INTEGER NOT NULL) STRICT;
         CREATE TABLE key_versions (key_id BLOB NOT NULL REFERENCES keys(id) ON DELETE RESTRICT, version INTEGER NOT NULL,
             object_id BLOB NOT NULL UNIQUE, state TEXT NOT NULL, created_at INTEGER NOT NULL,
             PRIMARY KEY (key_id, version)) STRICT;
         INSERT INTO keys VALUES (x'01010101010101010101010101010101', 'old', 2, 'ENVELOPE', 'ENABLED', 1, 0, 1000);
         INSERT INTO key_versions VALUES (x'01010101010101010101010101010101', 1,
             x'0101010101010101010101010101010100000001', 'ENABLED', 1000);",
    );
    let store = Store::open(&path).unwrap();
    match store.key_by_name("old") {
        Err(StoreError::CorruptRow { key, what }) => {
            assert_eq!(key, "old");
            assert!(what.starts_with("the row has no metadata MAC"), "{what}");
        }
        other => panic!("expected the unauthenticated row to be refused, got {other:?}"),
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (rotated, revision): (i64, i64) =
        conn.query_row("SELECT rotated_at, revision FROM keys", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!((rotated, revision), (1000, 1));
}

fn rotated(k: &KeyRecord) -> KeyRecord {
    let mut next = k.clone();
    let v = k.versions.len() as u32 + 1;
    for old in &mut next.versions {
        old.state = KeyState::Disabled;
    }
    next.versions.push(VersionRecord {
        version: v,
        object_id: ObjectId::for_version(k.id, v),
        state: KeyState::Enabled,
        created_at: 1_800_000_000,
        destroy_at: None,
    });
    next.primary_version = v;
    next.rotated_at = 1_800_000_000;
    next.revision = k.revision + 1;
    next
}

#[test]
fn update_adds_versions_and_changes_state_under_the_expected_revision() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let k = key("payroll", Classification::Secret, 7, 1);
    insert(&store, &k).unwrap();
    let next = rotated(&k);
    store.update_key(&next, &mac(&next), 1).unwrap();
    assert_eq!(store.key_by_name("payroll").unwrap(), stored(&next));

    let mut pending = next.clone();
    pending.revision = 3;
    pending.versions[0].state = KeyState::PendingDestruction;
    pending.versions[0].destroy_at = Some(1_900_000_000);
    store.update_key(&pending, &mac(&pending), 2).unwrap();
    assert_eq!(store.key_by_id(k.id).unwrap(), stored(&pending));
}

#[test]
fn a_stale_revision_is_a_conflict_and_changes_nothing() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let k = key("payroll", Classification::Secret, 7, 1);
    insert(&store, &k).unwrap();
    let first = rotated(&k);
    store.update_key(&first, &mac(&first), 1).unwrap();
    // A second writer that also read revision 1.
    let mut second = k.clone();
    second.state = KeyState::Disabled;
    second.revision = 2;
    match store.update_key(&second, &mac(&second), 1) {
        Err(StoreError::Conflict { key }) => assert_eq!(key, "payroll"),
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(store.key_by_name("payroll").unwrap(), stored(&first));
}

#[test]
fn update_refuses_to_change_what_never_changes() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let k = key("payroll", Classification::Secret, 7, 2);
    insert(&store, &k).unwrap();
    type Edit = Box<dyn Fn(&mut KeyRecord)>;
    let edits: Vec<(Edit, &str)> = vec![
        (Box::new(|r| r.classification = Classification::Personal), "a key's name, level, purpose and creation time never change"),
        (Box::new(|r| r.name = "other".into()), "a key's name, level, purpose and creation time never change"),
        (Box::new(|r| r.created_at += 1), "a key's name, level, purpose and creation time never change"),
        (Box::new(|r| r.versions[0].created_at += 1), "a version's object id and creation time never change"),
        (Box::new(|r| { r.versions.remove(0); }), "versions are never removed"),
        (Box::new(|r| r.revision = 5), "the new revision must be the expected revision plus one"),
        (
            Box::new(|r| {
                r.id = KeyId([8; 16]);
                for v in &mut r.versions {
                    v.object_id = ObjectId::for_version(r.id, v.version);
                }
            }),
            "the key does not exist",
        ),
    ];
    for (edit, expected) in edits {
        let mut next = k.clone();
        next.revision = 2;
        edit(&mut next);
        match store.update_key(&next, &mac(&next), 1) {
            Err(StoreError::InvalidRecord { what, .. }) => assert_eq!(what, expected),
            other => panic!("expected InvalidRecord({expected}), got {other:?}"),
        }
    }
    assert_eq!(store.key_by_name("payroll").unwrap(), stored(&k));
}

#[test]
fn a_sqlite_file_that_is_not_a_key_store_is_refused() {
    let (_dir, path) = temp();
    std::fs::File::create(&path).unwrap().set_permissions(std::fs::Permissions::from_mode(0o600)).unwrap();
    tamper(&path, "CREATE TABLE something_else (x INTEGER)");
    assert!(matches!(Store::open(&path), Err(StoreError::CorruptSchema { .. })));
}

#[test]
fn new_file_is_private_and_loose_files_are_refused() {
    let (_dir, path) = temp();
    drop(Store::open(&path).unwrap());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    match Store::open(&path) {
        Err(StoreError::Permissions { mode, .. }) => assert_eq!(mode, 0o644),
        other => panic!("expected Permissions, got {other:?}"),
    }
}

#[test]
fn missing_directory_is_a_clear_io_error() {
    let (_dir, path) = temp();
    let path = path.parent().unwrap().join("no/such/dir/kms.db");
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::Io { op: "create", .. }), "{err:?}");
    assert!(err.to_string().contains("no/such/dir"));
}

fn caller_record() -> crate::store::CallerRecord {
    crate::store::CallerRecord {
        identity: "urn:kms:caller:tax".into(),
        agency: "Finance".into(),
        name: "tax gateway".into(),
        system_level: 3,
        clearance: crate::classification::Classification::Personal,
        roles: vec![crate::config::Role::Officer, crate::config::Role::Exchange],
        allowed_keys: vec!["citizens".into(), "tax/*".into()],
        active: true,
        created_at: 10,
        updated_at: 10,
        revision: 1,
        recipient_keys: vec![crate::store::RecipientKeyRecord { public_key: [4; 65], added_at: 10 }],
    }
}

#[test]
fn callers_round_trip_refuse_duplicates_and_stale_updates_and_corrupt_rows() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let mac = RowMac([7; 32]);
    let c = caller_record();
    store.insert_caller(&c, &mac).unwrap();
    assert!(matches!(store.insert_caller(&c, &mac), Err(StoreError::DuplicateName { .. })));
    let back = store.caller_by_identity(&c.identity).unwrap().unwrap();
    assert_eq!((back.record.clone(), back.mac), (c.clone(), mac));

    let mut next = c.clone();
    next.active = false;
    next.agency = "Another agency".into();
    next.revision = 2;
    next.updated_at = 20;
    assert!(matches!(store.update_caller(&next, &mac, 5), Err(StoreError::Conflict { .. })));
    store.update_caller(&next, &RowMac([8; 32]), 1).unwrap();
    let back = store.list_callers().unwrap().remove(0);
    assert_eq!((back.record, back.mac), (next.clone(), RowMac([8; 32])));
    // The creation time is part of the row's identity: an update cannot move it.
    let mut moved = next.clone();
    moved.created_at += 1;
    moved.revision = 3;
    assert!(matches!(store.update_caller(&moved, &mac, 2), Err(StoreError::Conflict { .. })));

    let mut unsorted = c.clone();
    unsorted.identity = "urn:kms:caller:other".into();
    unsorted.roles.reverse();
    assert!(matches!(store.insert_caller(&unsorted, &mac), Err(StoreError::InvalidRecord { .. })));

    for (sql, what) in [
        ("UPDATE callers SET roles = 'officer,janitor'", "unknown role"),
        ("UPDATE callers SET system_level = 9", "the system level is 1 to 5"),
        ("UPDATE callers SET clearance = 42", "unknown clearance"),
        ("UPDATE callers SET allowed_keys = 'a b'", "an allowed-key pattern is not a key name or a prefix ending in *"),
        ("UPDATE callers SET active = 2", "active is neither 0 nor 1"),
    ] {
        let (_d, p) = temp();
        let s = Store::open(&p).unwrap();
        s.insert_caller(&c, &mac).unwrap();
        rusqlite::Connection::open(&p).unwrap().execute_batch(sql).unwrap();
        match s.caller_by_identity(&c.identity) {
            Err(StoreError::CorruptRow { key, what: w }) => assert_eq!((key.as_str(), w), ("caller urn:kms:caller:tax", what), "{sql}"),
            other => panic!("{sql}: {other:?}"),
        }
    }
}

#[test]
fn change_probe_sees_every_change_of_keys_and_nothing_else() {
    let (_dir, path) = temp();
    let store = Store::open(&path).unwrap();
    let probe = store.change_probe().unwrap();
    let v0 = probe.version().unwrap();
    // Reads change nothing.
    assert_eq!(store.key_by_name("payroll").unwrap(), None);
    assert_eq!(probe.version(), Some(v0));
    // A commit through the store itself.
    let k = key("payroll", Classification::Secret, 7, 1);
    insert(&store, &k).unwrap();
    let v1 = probe.version().unwrap();
    assert_ne!(v1, v0);
    assert_eq!(probe.version(), Some(v1));
    // A failed write (duplicate name) commits nothing.
    assert!(matches!(insert(&store, &key("payroll", Classification::Secret, 8, 1)), Err(StoreError::DuplicateName { .. })));
    assert_eq!(probe.version(), Some(v1));
    // A commit by another connection (another process, or the sqlite3 shell).
    tamper(&path, "UPDATE keys SET rotation_period_days = 1");
    let v2 = probe.version().unwrap();
    assert_ne!(v2, v1);
    // While another connection holds the write lock, the probe still answers at once.
    let locker = rusqlite::Connection::open(&path).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE; UPDATE keys SET rotation_period_days = 2;").unwrap();
    let started = std::time::Instant::now();
    assert_eq!(probe.version(), Some(v2));
    assert!(started.elapsed() < std::time::Duration::from_millis(500));
    locker.execute_batch("COMMIT").unwrap();
    let v3 = probe.version().unwrap();
    assert_ne!(v3, v2);
    // Commits that change no key leave it: the audit anchor (after every group of requests).
    let anchor = crate::store::AuditAnchor { trail_id: [1; 16], seq: 9, hash: [2; 32], time_ms: 3 };
    store.set_audit_anchor(&anchor, &RowMac([4; 32])).unwrap();
    assert_eq!(probe.version(), Some(v3));
    // A version row changed by another connection moves it, and so does a dropped trigger.
    tamper(&path, "UPDATE key_versions SET created_at = 5");
    let v4 = probe.version().unwrap();
    assert_ne!(v4, v3);
    tamper(&path, "DROP TRIGGER keys_updated");
    let v5 = probe.version().unwrap();
    assert_ne!(v5, v4);
    tamper(&path, "DELETE FROM key_versions");
    assert_ne!(probe.version(), Some(v5));
}
