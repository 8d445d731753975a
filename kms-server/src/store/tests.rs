//! Unit tests of the key store: the record rules against both backends (a real SQLite file in a
//! temporary directory, and a real PostgreSQL database of its own in a disposable cluster: the
//! one `scripts/test` started, named by `KMS_TEST_PG`, or one started for this test process), and
//! what is particular to each.

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

/// A store's database, as a test sees it: it can open the store again, and edit the database
/// behind the store's back as an attacker or a damaged disk would.
pub(crate) struct Db {
    pub location: StoreLocation,
    /// Kept for the SQLite file (and its directory) and the cluster; dropped last.
    _dir: tempfile::TempDir,
    cluster: Option<std::sync::Arc<TestPg>>,
}

/// The test process's cluster (see [`crate::pgcluster::TestCluster`]).
pub(crate) type TestPg = crate::pgcluster::TestCluster;

impl Db {
    pub(crate) fn sqlite() -> Db {
        let (dir, path) = temp();
        Db { location: StoreLocation::Sqlite(path), _dir: dir, cluster: None }
    }

    /// A database of its own in the test cluster.
    pub(crate) fn postgres(pg: &std::sync::Arc<TestPg>) -> Db {
        let name = pg.unique_database("store").expect("create a test database");
        let options = PgOptions { url: pg.conninfo(&name), password_file: None, pool_size: 4 };
        Db { location: StoreLocation::Postgres(options), _dir: tempfile::tempdir().unwrap(), cluster: Some(pg.clone()) }
    }

    /// Another empty database of the same backend.
    pub(crate) fn fresh(&self) -> Db {
        match &self.cluster {
            None => Db::sqlite(),
            Some(c) => Db::postgres(c),
        }
    }

    pub(crate) fn is_postgres(&self) -> bool {
        self.cluster.is_some()
    }

    pub(crate) fn open(&self) -> Store {
        Store::open_location(&self.location).expect("open the store")
    }

    pub(crate) fn try_open(&self) -> Result<Store, StoreError> {
        Store::open_location(&self.location)
    }

    /// Runs `sql` on a connection of its own (committed at once). Blob literals are written
    /// `x'..'` and rewritten for PostgreSQL.
    pub(crate) fn tamper(&self, sql: &str) {
        match &self.location {
            StoreLocation::Sqlite(path) => tamper(path, sql),
            StoreLocation::Postgres(o) => {
                let sql = pg_blobs(sql);
                let mut client = ::postgres::Client::connect(&o.url, ::postgres::NoTls).expect("connect for tampering");
                client.batch_execute(&sql).unwrap_or_else(|e| panic!("tamper {sql}: {e}"));
            }
        }
    }

    /// Like [`Db::tamper`], with foreign keys not enforced.
    pub(crate) fn tamper_unchecked(&self, sql: &str) {
        if self.is_postgres() {
            self.tamper(&format!("SET session_replication_role = replica; {sql}"));
        } else {
            self.tamper(&format!("PRAGMA foreign_keys=OFF; {sql}"));
        }
    }
}

/// `x'0102'` as PostgreSQL's `'\x0102'::bytea`.
fn pg_blobs(sql: &str) -> String {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(i) = rest.find("x'") {
        let before_ok = i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric();
        out.push_str(&rest[..i]);
        if !before_ok {
            out.push_str("x'");
            rest = &rest[i + 2..];
            continue;
        }
        let tail = &rest[i + 2..];
        let end = tail.find('\'').expect("closed blob literal");
        out.push_str(&format!("'\\x{}'::bytea", &tail[..end]));
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The disposable cluster of this test process (shared while any test store holds it).
pub(crate) fn pg_cluster() -> std::sync::Arc<TestPg> {
    use std::sync::{Arc, Mutex, Weak};
    static SHARED: Mutex<Weak<TestPg>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = shared.upgrade() {
        return c;
    }
    let pg = TestPg::get("kms-store-test-pg").expect("a PostgreSQL cluster for the test");
    let pg = Arc::new(pg);
    *shared = Arc::downgrade(&pg);
    pg
}

/// Runs `test` on a new SQLite store and on a new PostgreSQL store.
pub(crate) fn on_both(test: impl Fn(&Db)) {
    test(&Db::sqlite());
    let cluster = pg_cluster();
    test(&Db::postgres(&cluster));
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
    on_both(|db| {
        let store = db.open();
        let k = key("payroll", Classification::Secret, 7, 3);
        insert(&store, &k).unwrap();
        assert_eq!(store.key_by_name("payroll").unwrap(), stored(&k));
        assert_eq!(store.key_by_id(k.id).unwrap(), stored(&k));
        assert_eq!(store.key_by_name("nope").unwrap(), None);
        assert_eq!(store.key_by_id(KeyId([9; 16])).unwrap(), None);
        let ids = store.all_version_object_ids().unwrap();
        assert_eq!(ids, k.versions.iter().map(|v| v.object_id.clone()).collect::<Vec<_>>());
    })
}

#[test]
fn reopening_keeps_the_data() {
    on_both(|db| {
        let k = key("a", Classification::Personal, 1, 1);
        insert(&db.open(), &k).unwrap();
        assert_eq!(db.open().key_by_name("a").unwrap(), stored(&k));
    })
}

#[test]
fn duplicate_name_is_refused_and_changes_nothing() {
    on_both(|db| {
        let store = db.open();
        insert(&store, &key("dup", Classification::Personal, 1, 1)).unwrap();
        let err = insert(&store, &key("dup", Classification::Secret, 2, 1)).unwrap_err();
        assert!(matches!(&err, StoreError::DuplicateName { name } if name == "dup"), "{err:?}");
        assert_eq!(store.key_by_id(KeyId([2; 16])).unwrap(), None);
        assert_eq!(store.all_version_object_ids().unwrap().len(), 1);
    })
}

#[test]
fn list_filters_by_level_and_prefix_and_orders_by_name() {
    on_both(|db| {
        let store = db.open();
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
    })
}

#[test]
fn prefix_treats_percent_and_underscore_literally() {
    on_both(|db| {
        let store = db.open();
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
    })
}

#[test]
fn invalid_records_are_not_written() {
    on_both(|db| {
        let store = db.open();
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
    })
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
    on_both(|first| {
        for (sql, expected) in cases {
            let db = first.fresh();
            let store = db.open();
            insert(&store, &key("victim", Classification::Secret, 1, 2)).unwrap();
            insert(&store, &key("bystander", Classification::Secret, 3, 1)).unwrap();
            drop(store);
            let targeted = if sql.starts_with("UPDATE keys SET") {
                format!("{sql} WHERE name = 'victim'")
            } else {
                sql.replace(" WHERE version", " WHERE key_id = x'01010101010101010101010101010101' AND version")
            };
            db.tamper(&targeted);
            let store = db.open();
            assert_corrupt(&store, "victim", expected);
            // The listing names the bad row and still lists the good one.
            let listing = store.list_keys(&KeyFilter::default()).unwrap();
            assert_eq!(listing.keys.iter().map(|k| k.record.name.as_str()).collect::<Vec<_>>(), ["bystander"], "after: {sql}");
            assert_eq!(listing.unreadable, vec![UnreadableKey { key: "victim".into(), what: expected }], "after: {sql}");
        }
    })
}

#[test]
fn corrupt_key_id_is_refused() {
    on_both(|db| {
        let store = db.open();
        insert(&store, &key("victim", Classification::Secret, 1, 1)).unwrap();
        db.tamper_unchecked("UPDATE keys SET id = x'0102'");
        assert_corrupt(&store, "victim", "key id is not 16 bytes");
    })
}

#[test]
fn deleted_versions_are_detected() {
    on_both(|db| {
        let store = db.open();
        insert(&store, &key("victim", Classification::Secret, 1, 1)).unwrap();
        db.tamper("DELETE FROM key_versions");
        assert_corrupt(&store, "victim", "the primary version is not among the versions");
    })
}

#[test]
fn unknown_schema_version_is_refused() {
    on_both(|db| {
        drop(db.open());
        db.tamper(&format!("UPDATE schema_version SET version = {}", SUPPORTED_SCHEMA_VERSION + 1));
        match db.try_open() {
            Err(StoreError::UnknownSchemaVersion { found, supported }) => {
                assert_eq!(found, SUPPORTED_SCHEMA_VERSION + 1);
                assert_eq!(supported, SUPPORTED_SCHEMA_VERSION);
            }
            other => panic!("expected UnknownSchemaVersion, got {other:?}"),
        }
    })
}

#[test]
fn new_file_has_the_supported_schema_version() {
    let (_dir, path) = temp();
    drop(Store::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = conn.query_row("SELECT version FROM schema_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, 9);
    assert_eq!(SUPPORTED_SCHEMA_VERSION, 9);
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
    on_both(|db| {
        let store = db.open();
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
    })
}

#[test]
fn a_stale_revision_is_a_conflict_and_changes_nothing() {
    on_both(|db| {
        let store = db.open();
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
    })
}

#[test]
fn update_refuses_to_change_what_never_changes() {
    on_both(|db| {
        let store = db.open();
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
    })
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
    on_both(|db| {
    let store = db.open();
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
        let fresh = db.fresh();
        let s = fresh.open();
        s.insert_caller(&c, &mac).unwrap();
        fresh.tamper(sql);
        match s.caller_by_identity(&c.identity) {
            Err(StoreError::CorruptRow { key, what: w }) => assert_eq!((key.as_str(), w), ("caller urn:kms:caller:tax", what), "{sql}"),
            other => panic!("{sql}: {other:?}"),
        }
    }
    })
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
    store.set_audit_anchor("", &anchor, &RowMac([4; 32])).unwrap();
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

/// Waits (at most 3 s) until the probe answers something else than `old`; how long it took.
fn wait_for_change(probe: &ChangeProbe, old: Option<(i64, i64)>) -> std::time::Duration {
    let started = std::time::Instant::now();
    while probe.version() == old {
        assert!(started.elapsed() < std::time::Duration::from_secs(3), "the probe never saw the change");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    started.elapsed()
}

#[test]
fn postgres_change_probe_sees_other_servers_changes_within_the_bound() {
    let pg = pg_cluster();
    let db = Db::postgres(&pg);
    let (here, there) = (db.open(), db.open());
    let probe = here.change_probe().unwrap();
    let v0 = probe.version().unwrap();
    // Reads and commits that change no key leave it alone.
    assert_eq!(there.key_by_name("payroll").unwrap(), None);
    let anchor = crate::store::AuditAnchor { trail_id: [1; 16], seq: 9, hash: [2; 32], time_ms: 3 };
    there.set_audit_anchor("kms-b", &anchor, &RowMac([4; 32])).unwrap();
    std::thread::sleep(PROBE_POLL * 2);
    assert_eq!(probe.version(), Some(v0));
    // A key made through another store (another server) is seen within milliseconds (a
    // notification), and well within PROBE_POLL even without one.
    let k = key("payroll", Classification::Secret, 7, 1);
    insert(&there, &k).unwrap();
    let took = wait_for_change(&probe, Some(v0));
    eprintln!("another server's key change was seen after {took:?}");
    assert!(took < PROBE_POLL, "{took:?}");
    // An edit with psql moves it too (the triggers fire for every connection), and so does a
    // version row's.
    let v1 = probe.version();
    db.tamper("UPDATE keys SET rotation_period_days = 1");
    wait_for_change(&probe, v1);
    let v2 = probe.version();
    db.tamper("UPDATE key_versions SET created_at = 5");
    wait_for_change(&probe, v2);
    // A failed write (a duplicate name) commits nothing.
    let v3 = probe.version();
    assert!(matches!(insert(&there, &key("payroll", Classification::Secret, 8, 1)), Err(StoreError::DuplicateName { .. })));
    std::thread::sleep(PROBE_POLL * 2);
    assert_eq!(probe.version(), v3);
}

#[test]
fn postgres_two_servers_changing_one_key_end_with_one_winner() {
    let pg = pg_cluster();
    let db = Db::postgres(&pg);
    let k = key("payroll", Classification::Secret, 7, 1);
    insert(&db.open(), &k).unwrap();
    // Two servers rotate the same key from the same revision, at the same moment: exactly one
    // commits; the other gets a Conflict, and the store holds the winner's row and no other version.
    for _ in 0..5 {
        let current = db.open().key_by_name("payroll").unwrap().unwrap().record;
        let next = rotated(&current);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let results: Vec<Result<(), StoreError>> = (0..2)
            .map(|_| {
                let (store, next, barrier, revision) = (db.open(), next.clone(), barrier.clone(), current.revision);
                std::thread::spawn(move || {
                    barrier.wait();
                    store.update_key(&next, &mac(&next), revision)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let won = results.iter().filter(|r| r.is_ok()).count();
        let conflicts = results.iter().filter(|r| matches!(r, Err(StoreError::Conflict { key }) if key == "payroll")).count();
        assert_eq!((won, conflicts), (1, 1), "{results:?}");
        assert_eq!(db.open().key_by_name("payroll").unwrap(), stored(&next));
    }
    // Two servers creating one name at once: one key, and DuplicateName for the other.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let results: Vec<Result<(), StoreError>> = [1u8, 2]
        .into_iter()
        .map(|b| {
            let (store, barrier) = (db.open(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                insert(&store, &key("tax", Classification::Personal, 100 + b, 1))
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert_eq!(results.iter().filter(|r| matches!(r, Err(StoreError::DuplicateName { name }) if name == "tax")).count(), 1);
    assert_eq!(db.open().all_version_object_ids().unwrap().len(), 7);
}

#[test]
fn postgres_database_that_is_not_a_key_store_or_is_unreachable_is_refused() {
    let pg = pg_cluster();
    let db = Db::postgres(&pg);
    db.tamper("CREATE TABLE something_else (x BIGINT)");
    assert!(matches!(db.try_open(), Err(StoreError::CorruptSchema { .. })));
    // No server behind the socket directory: UNAVAILABLE, within the connect timeout.
    let empty = tempfile::tempdir().unwrap();
    let options = PgOptions {
        url: format!("host={} port=5432 user=kms dbname=kms", empty.path().display()),
        password_file: None,
        pool_size: 1,
    };
    let started = std::time::Instant::now();
    let err = Store::open_location(&StoreLocation::Postgres(options)).unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(6));
}

#[test]
fn postgres_new_database_has_the_supported_schema_version_and_servers_may_open_it_together() {
    let pg = pg_cluster();
    let db = Db::postgres(&pg);
    // Three servers starting at once: one creates the schema, the others wait for it and use it.
    let opened: Vec<Result<Store, StoreError>> = (0..3)
        .map(|_| {
            let location = db.location.clone();
            std::thread::spawn(move || Store::open_location(&location))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(opened.iter().all(Result::is_ok), "{opened:?}");
    let StoreLocation::Postgres(o) = &db.location else { unreachable!() };
    let mut client = ::postgres::Client::connect(&o.url, ::postgres::NoTls).unwrap();
    let v: i64 = client.query_one("SELECT version FROM schema_version", &[]).unwrap().get(0);
    assert_eq!(v, SUPPORTED_SCHEMA_VERSION);
}

#[test]
fn postgres_lifecycle_lease_is_held_by_one_server_and_freed_by_its_death() {
    let pg = pg_cluster();
    let db = Db::postgres(&pg);
    let (a, b) = (db.open(), db.open());
    let (mut first, mut second) = (a.lifecycle_lease(), b.lifecycle_lease());
    assert!(first.hold().unwrap());
    assert!(!second.hold().unwrap());
    assert!(first.hold().unwrap(), "the holder keeps it");
    assert!(!second.hold().unwrap());
    // The holder's session ends (its server died, or its connection was cut): the lease is free,
    // the other server takes it, and the former holder finds out at its next check.
    // The lock's 64-bit key 0x6b6d735f_6c696665 ("kms_life") shows as classid (high half), objid.
    db.tamper(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND classid = 1802335071 AND objid = 1818846821 AND granted",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !second.hold().unwrap() {
        assert!(std::time::Instant::now() < deadline, "the lease was never freed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!first.hold().unwrap(), "the former holder lost it");
    // Dropping the holder's lease (its server shutting down) frees it too.
    drop(second);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !first.hold().unwrap() {
        assert!(std::time::Instant::now() < deadline, "a dropped lease was never freed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // With SQLite (one server per file) the lease is always held.
    let sqlite = Db::sqlite();
    assert!(sqlite.open().lifecycle_lease().hold().unwrap());
}

#[test]
fn each_server_has_its_own_audit_anchor_and_a_schema_6_anchor_moves_to_the_unnamed_server() {
    on_both(|db| {
        let store = db.open();
        let a = crate::store::AuditAnchor { trail_id: [1; 16], seq: 9, hash: [2; 32], time_ms: 3 };
        let b = crate::store::AuditAnchor { trail_id: [5; 16], seq: 4, hash: [6; 32], time_ms: 7 };
        assert_eq!(store.audit_anchor("kms-a").unwrap(), None);
        store.set_audit_anchor("kms-a", &a, &RowMac([4; 32])).unwrap();
        store.set_audit_anchor("kms-b", &b, &RowMac([8; 32])).unwrap();
        assert_eq!(store.audit_anchor("kms-a").unwrap().map(|s| (s.anchor, s.mac)), Some((a, RowMac([4; 32]))));
        assert_eq!(store.audit_anchor("kms-b").unwrap().map(|s| (s.anchor, s.mac)), Some((b, RowMac([8; 32]))));
        assert_eq!(store.audit_anchor("").unwrap(), None);
        let moved = crate::store::AuditAnchor { seq: 10, ..a };
        store.set_audit_anchor("kms-a", &moved, &RowMac([9; 32])).unwrap();
        assert_eq!(store.audit_anchor("kms-a").unwrap().map(|s| s.anchor), Some(moved));
        assert_eq!(store.audit_anchor("kms-b").unwrap().map(|s| s.anchor), Some(b));
    });
    // A SQLite store anchored under schema 6 keeps its anchor, now the unnamed server's.
    let (_dir, path) = temp();
    std::fs::File::create(&path).unwrap().set_permissions(std::fs::Permissions::from_mode(0o600)).unwrap();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let mut conn = conn;
        super::schema::migrate_to_for_tests(&mut conn, 6);
        conn.execute_batch(
            "INSERT INTO audit_anchor VALUES (1, x'01010101010101010101010101010101', 12,
             x'0202020202020202020202020202020202020202020202020202020202020202', 99,
             x'0303030303030303030303030303030303030303030303030303030303030303')",
        )
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    let kept = store.audit_anchor("").unwrap().unwrap();
    assert_eq!((kept.anchor.trail_id, kept.anchor.seq, kept.anchor.time_ms, kept.mac), ([1; 16], 12, 99, RowMac([3; 32])));
}

#[test]
fn caller_changes_move_the_callers_version_and_nothing_else_does() {
    on_both(|db| {
        let store = db.open();
        let probe = store.change_probe().unwrap();
        let c0 = probe.callers_version();
        assert!(c0.is_some());
        let k0 = probe.version();
        let c = caller_record();
        store.insert_caller(&c, &RowMac([7; 32])).unwrap();
        wait_for_callers(&probe, c0);
        // A key change moves the key version, not the callers'.
        let c1 = probe.callers_version();
        insert(&store, &key("payroll", Classification::Secret, 7, 1)).unwrap();
        wait_for_change(&probe, k0);
        assert_eq!(probe.callers_version(), c1);
        // An edit by another connection (a revocation by another server, or with a shell).
        db.tamper("UPDATE callers SET active = 0");
        wait_for_callers(&probe, c1);
    })
}

fn wait_for_callers(probe: &ChangeProbe, old: Option<i64>) {
    let started = std::time::Instant::now();
    while probe.callers_version() == old {
        assert!(started.elapsed() < std::time::Duration::from_secs(3), "the probe never saw the caller change");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
