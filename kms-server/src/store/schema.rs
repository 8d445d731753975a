//! The versioned schema of the key store and its migrations.
//!
//! `schema_version` holds exactly one row. A new file starts at 0 and is migrated step by step to
//! [`SUPPORTED_SCHEMA_VERSION`]; each step is one entry of [`MIGRATIONS`] (step `i` takes version
//! `i` to `i + 1`), so schema v2 is one more entry, never an edit of an existing one. A file of a
//! higher version was written by a newer server and is refused, not guessed at.
//!
//! **Never** edit a released migration: files in the field have already run it.
#![forbid(unsafe_code)]

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::StoreError;

/// Migration steps, in order. `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: keys and their versions.
    "CREATE TABLE keys (
        id                   BLOB    NOT NULL PRIMARY KEY,
        name                 TEXT    NOT NULL UNIQUE,
        classification       INTEGER NOT NULL,
        purpose              TEXT    NOT NULL,
        state                TEXT    NOT NULL,
        primary_version      INTEGER NOT NULL,
        rotation_period_days INTEGER NOT NULL,
        created_at           INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE key_versions (
        key_id     BLOB    NOT NULL REFERENCES keys(id) ON DELETE RESTRICT,
        version    INTEGER NOT NULL,
        object_id  BLOB    NOT NULL UNIQUE,
        state      TEXT    NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (key_id, version)
    ) STRICT;",
    // 1 -> 2: the key lifecycle. `revision` (optimistic concurrency), `rotated_at` (the rotation
    // schedule counts from it), `destroy_at` (end of a PENDING_DESTRUCTION waiting period) and
    // `row_mac` (the HSM-computed metadata MAC, invariant 5). Rows written by schema 1 have
    // no MAC and are refused until re-created: there is no way to tell whether they were edited.
    // `approvals`: two-officer requests, each row sealed like a key row.
    "ALTER TABLE keys ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE keys ADD COLUMN rotated_at INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE keys ADD COLUMN destroy_at INTEGER;
    ALTER TABLE keys ADD COLUMN row_mac BLOB;
    UPDATE keys SET rotated_at = created_at;
    ALTER TABLE key_versions ADD COLUMN destroy_at INTEGER;
    CREATE TABLE approvals (
        id           BLOB    NOT NULL PRIMARY KEY,
        key_id       BLOB    NOT NULL REFERENCES keys(id) ON DELETE RESTRICT,
        action       TEXT    NOT NULL,
        version      INTEGER NOT NULL,
        requested_by TEXT    NOT NULL,
        requested_at INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL,
        state        TEXT    NOT NULL,
        decided_by   TEXT,
        decided_at   INTEGER,
        row_mac      BLOB    NOT NULL
    ) STRICT;
    CREATE INDEX approvals_by_state ON approvals (state, requested_at);",
    // 2 -> 3: registered callers move from the configuration into the store (the configuration
    // only seeds the first ones). Each row is sealed by the HSM like a key row.
    "CREATE TABLE callers (
        identity     TEXT    NOT NULL PRIMARY KEY,
        agency       TEXT    NOT NULL,
        name         TEXT    NOT NULL,
        system_level INTEGER NOT NULL,
        clearance    INTEGER NOT NULL,
        roles        TEXT    NOT NULL,
        allowed_keys TEXT    NOT NULL,
        active       INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        revision     INTEGER NOT NULL,
        row_mac      BLOB    NOT NULL
    ) STRICT;",
    // 3 -> 4: nothing lost at start-up, and an anchored audit trail. `object_intents`: written
    // before an HSM key object is made, deleted in the transaction that commits the row naming it,
    // so that start-up destroys only objects it can prove it made for an unacknowledged request.
    // `audit_anchor`: the audit trail's id and head (sequence number and hash), sealed by the HSM
    // and moved after every commit of the trail, so that a trail cut, replaced or deleted outside
    // the service is refused at start-up.
    "CREATE TABLE object_intents (
        object_id  BLOB    NOT NULL PRIMARY KEY,
        key_id     BLOB    NOT NULL,
        version    INTEGER NOT NULL,
        request_id TEXT    NOT NULL,
        audit_seq  INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        row_mac    BLOB    NOT NULL
    ) STRICT;
    CREATE TABLE audit_anchor (
        only_row INTEGER NOT NULL PRIMARY KEY CHECK (only_row = 1),
        trail_id BLOB    NOT NULL,
        seq      INTEGER NOT NULL,
        hash     BLOB    NOT NULL,
        time_ms  INTEGER NOT NULL,
        row_mac  BLOB    NOT NULL
    ) STRICT;",
    // 4 -> 5: separation of duties and registered recipient keys. `requests`: two-officer requests
    // about something other than a key row (a caller's registration or revocation, the destruction
    // of a token object no key names), each sealed by the HSM. `callers.recipient_keys`: the P-256
    // keys a caller's data keys may be sealed to (covered by the row's MAC).
    "CREATE TABLE requests (
        id            BLOB    NOT NULL PRIMARY KEY,
        kind          TEXT    NOT NULL,
        subject       TEXT    NOT NULL,
        payload       BLOB    NOT NULL,
        base_revision INTEGER NOT NULL,
        level         INTEGER NOT NULL,
        requested_by  TEXT    NOT NULL,
        requested_at  INTEGER NOT NULL,
        expires_at    INTEGER NOT NULL,
        state         TEXT    NOT NULL,
        decided_by    TEXT,
        decided_at    INTEGER,
        row_mac       BLOB    NOT NULL
    ) STRICT;
    CREATE INDEX requests_by_state ON requests (state, requested_at);
    ALTER TABLE callers ADD COLUMN recipient_keys TEXT NOT NULL DEFAULT '';",
    // 5 -> 6: `key_changes` counts every change to a key row or a version row, by triggers, so
    // that the key cache can tell a change of keys from the audit anchor's commits (one after
    // every group of requests). Triggers fire for every connection, the sqlite3 shell's too;
    // dropping one changes `PRAGMA schema_version`, which the cache also watches.
    "CREATE TABLE key_changes (
        only_row INTEGER NOT NULL PRIMARY KEY CHECK (only_row = 1),
        counter  INTEGER NOT NULL
    ) STRICT;
    INSERT INTO key_changes (only_row, counter) VALUES (1, 0);
    CREATE TRIGGER keys_inserted AFTER INSERT ON keys BEGIN UPDATE key_changes SET counter = counter + 1; END;
    CREATE TRIGGER keys_updated AFTER UPDATE ON keys BEGIN UPDATE key_changes SET counter = counter + 1; END;
    CREATE TRIGGER keys_deleted AFTER DELETE ON keys BEGIN UPDATE key_changes SET counter = counter + 1; END;
    CREATE TRIGGER versions_inserted AFTER INSERT ON key_versions BEGIN UPDATE key_changes SET counter = counter + 1; END;
    CREATE TRIGGER versions_updated AFTER UPDATE ON key_versions BEGIN UPDATE key_changes SET counter = counter + 1; END;
    CREATE TRIGGER versions_deleted AFTER DELETE ON key_versions BEGIN UPDATE key_changes SET counter = counter + 1; END;",
    // 6 -> 7: several servers on one store. `audit_anchors`: one anchor per server's trail, keyed
    // by the server's id (`server.id`; empty for the one server of a SQLite store, whose anchor
    // moves over unchanged). `caller_changes`: counts every change to a caller row, so that each
    // server reloads its registry when another server (or anyone) changed one.
    "CREATE TABLE audit_anchors (
        server   TEXT    NOT NULL PRIMARY KEY,
        trail_id BLOB    NOT NULL,
        seq      INTEGER NOT NULL,
        hash     BLOB    NOT NULL,
        time_ms  INTEGER NOT NULL,
        row_mac  BLOB    NOT NULL
    ) STRICT;
    INSERT INTO audit_anchors (server, trail_id, seq, hash, time_ms, row_mac)
        SELECT '', trail_id, seq, hash, time_ms, row_mac FROM audit_anchor;
    DROP TABLE audit_anchor;
    CREATE TABLE caller_changes (
        only_row INTEGER NOT NULL PRIMARY KEY CHECK (only_row = 1),
        counter  INTEGER NOT NULL
    ) STRICT;
    INSERT INTO caller_changes (only_row, counter) VALUES (1, 0);
    CREATE TRIGGER callers_inserted AFTER INSERT ON callers BEGIN UPDATE caller_changes SET counter = counter + 1; END;
    CREATE TRIGGER callers_updated AFTER UPDATE ON callers BEGIN UPDATE caller_changes SET counter = counter + 1; END;
    CREATE TRIGGER callers_deleted AFTER DELETE ON callers BEGIN UPDATE caller_changes SET counter = counter + 1; END;",
    // 7 -> 8: a creation intent names the server that made it (`server.id`; empty for a store's
    // only server), so that a server judges only its own intents: another server's may belong to
    // a creation that is still running, or be recorded in a trail this server cannot read.
    "ALTER TABLE object_intents ADD COLUMN server TEXT NOT NULL DEFAULT '';",
    // 8 -> 9: idempotent key creation. One row per (caller, idempotency key), written in the
    // transaction that inserts the key, sealed by the HSM; it names the request (a hash of its
    // fields) and the key it made.
    "CREATE TABLE idempotency (
        caller       TEXT    NOT NULL,
        idem_key     TEXT    NOT NULL,
        rpc          TEXT    NOT NULL,
        request_hash BLOB    NOT NULL,
        key_id       BLOB    NOT NULL,
        created_at   INTEGER NOT NULL,
        row_mac      BLOB    NOT NULL,
        PRIMARY KEY (caller, idem_key)
    ) STRICT;",
];

/// The schema version this build writes and understands.
pub const SUPPORTED_SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database to [`SUPPORTED_SCHEMA_VERSION`] in one transaction, or refuses it.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    // IMMEDIATE: take the write lock before reading the version, so that two processes opening a
    // new file cannot both create the tables.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(super::sqlite::fail("begin schema migration"))?;
    let found = read_version(&tx)?;
    if found > SUPPORTED_SCHEMA_VERSION {
        return Err(StoreError::UnknownSchemaVersion { found, supported: SUPPORTED_SCHEMA_VERSION });
    }
    if found == SUPPORTED_SCHEMA_VERSION {
        return Ok(());
    }
    for (from, step) in MIGRATIONS.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
        tx.execute_batch(step).map_err(super::sqlite::fail("migrate schema"))?;
        tracing::info!(from, to = from + 1, "key store schema migrated");
    }
    tx.execute("UPDATE schema_version SET version = ?1", [SUPPORTED_SCHEMA_VERSION])
        .map_err(super::sqlite::fail("record schema version"))?;
    tx.commit().map_err(super::sqlite::fail("commit schema migration"))
}

/// The stored version; creates the version table (at 0) in an empty database.
fn read_version(conn: &Connection) -> Result<i64, StoreError> {
    let has_table: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'schema_version')",
            [],
            |r| r.get(0),
        )
        .map_err(super::sqlite::fail("read schema version"))?;
    if !has_table {
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema WHERE type = 'table'", [], |r| r.get(0))
            .map_err(super::sqlite::fail("read schema version"))?;
        if tables != 0 {
            return Err(StoreError::CorruptSchema {
                what: "the file is a SQLite database with tables but no schema_version: not a key store",
            });
        }
        conn.execute_batch(
            "CREATE TABLE schema_version (
                 only_row INTEGER NOT NULL PRIMARY KEY CHECK (only_row = 1),
                 version  INTEGER NOT NULL
             );
             INSERT INTO schema_version (only_row, version) VALUES (1, 0);",
        )
        .map_err(super::sqlite::fail("create schema version table"))?;
        return Ok(0);
    }
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM schema_version", [], |r| r.get(0))
        .map_err(super::sqlite::fail("read schema version"))?;
    if rows != 1 {
        return Err(StoreError::CorruptSchema { what: "schema_version must hold exactly one row" });
    }
    let version: Option<rusqlite::types::Value> = conn
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .optional()
        .map_err(super::sqlite::fail("read schema version"))?;
    match version {
        Some(rusqlite::types::Value::Integer(v)) if v >= 0 => Ok(v),
        _ => Err(StoreError::CorruptSchema { what: "schema_version.version is not a non-negative integer" }),
    }
}

/// Creates the schema up to `version` only (for tests of later migrations).
#[cfg(test)]
pub(super) fn migrate_to_for_tests(conn: &mut Connection, version: usize) {
    let tx = conn.transaction().unwrap();
    read_version(&tx).unwrap();
    for step in &MIGRATIONS[..version] {
        tx.execute_batch(step).unwrap();
    }
    tx.execute("UPDATE schema_version SET version = ?1", [version as i64]).unwrap();
    tx.commit().unwrap();
}
