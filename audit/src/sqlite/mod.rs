//! The audit database file (the server's `audit.db`): its schema and versioning, opening it for
//! the server (create, migrate, write) or for offline verification (read-only, never creates),
//! and the errors of every database operation.
//!
//! ```sql
//! CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT;  -- one row
//! CREATE TABLE audit_records (seq INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL,
//!     caller TEXT NOT NULL, cert_fingerprint BLOB NOT NULL, rpc TEXT NOT NULL, key TEXT NOT NULL,
//!     key_version INTEGER NOT NULL, level TEXT NOT NULL, outcome TEXT NOT NULL,
//!     status_code INTEGER NOT NULL, request_id TEXT NOT NULL, context_hash BLOB NOT NULL,
//!     detail TEXT NOT NULL, hash BLOB NOT NULL) STRICT;
//! CREATE TABLE audit_checkpoints (seq INTEGER PRIMARY KEY, hash BLOB NOT NULL,
//!     time_ms INTEGER NOT NULL, signature BLOB NOT NULL) STRICT;
//! CREATE TABLE audit_trail (trail_id BLOB NOT NULL) STRICT;  -- version 2: one row
//! ```
//!
//! Version 2 adds `audit_trail`: a random 16-byte id made when the trail is created (or, for a
//! version 1 file, when it is first opened for writing). The server keeps the id and the head of
//! the trail outside this file (its anchor), so that a file replaced by another trail, or cut, is
//! told apart from the one it belongs with.
//!
//! Writing (append, checkpoints) is in the `write` submodule, reading and row decoding in `read`. A file
//! may be hostile: every value read is checked, and a bad one is an [`AuditDbError::CorruptRow`]
//! naming the row, never a panic.

mod read;
mod write;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

pub use read::RecordIter;

/// The schema version this crate writes and reads.
pub const SCHEMA_VERSION: i64 = 2;

const CREATE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS audit_records (seq INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL,
    caller TEXT NOT NULL, cert_fingerprint BLOB NOT NULL, rpc TEXT NOT NULL, key TEXT NOT NULL,
    key_version INTEGER NOT NULL, level TEXT NOT NULL, outcome TEXT NOT NULL,
    status_code INTEGER NOT NULL, request_id TEXT NOT NULL, context_hash BLOB NOT NULL,
    detail TEXT NOT NULL, hash BLOB NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS audit_checkpoints (seq INTEGER PRIMARY KEY, hash BLOB NOT NULL,
    time_ms INTEGER NOT NULL, signature BLOB NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS audit_trail (trail_id BLOB NOT NULL) STRICT;
";

/// How long a connection waits for another one's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A failure of the audit database.
#[derive(Debug, thiserror::Error)]
pub enum AuditDbError {
    /// The file could not be created.
    #[error("cannot create the audit database {path}: {source}")]
    Create {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An SQLite call failed; `op` names what was being done.
    #[error("audit database: {op} failed: {source}")]
    Sqlite {
        /// The operation that failed, e.g. `"append records"`.
        op: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A record row holds a value of the wrong type, range or length.
    #[error("audit database: record row {seq} is corrupt: {what}")]
    CorruptRow {
        /// The row's `seq` as stored.
        seq: i64,
        /// What is wrong with it.
        what: &'static str,
    },
    /// A checkpoint row holds a value of the wrong type, range or length.
    #[error("audit database: checkpoint row {seq} is corrupt: {what}")]
    CorruptCheckpoint {
        /// The row's `seq` as stored.
        seq: i64,
        /// What is wrong with it.
        what: &'static str,
    },
    /// The file's schema is newer than this program.
    #[error(
        "audit database {path}: schema version {found} is newer than version {supported}, the \
         newest this program understands; use a newer release"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version the file records.
        found: i64,
        /// [`SCHEMA_VERSION`].
        supported: i64,
    },
    /// The file is an SQLite database but not an audit database.
    #[error("{path} is not an audit database: {why}")]
    NotAnAuditDb {
        /// The file.
        path: PathBuf,
        /// Why not.
        why: &'static str,
    },
    /// A batch does not continue the stored trail: its first record (or a later one) has the wrong
    /// sequence number.
    #[error("cannot append record {got}: the next record of the trail is {expected}")]
    NotContiguous {
        /// The sequence number the trail needs next.
        expected: u64,
        /// The one the batch has.
        got: u64,
    },
    /// A record's hash is not the chain hash of its predecessor and itself.
    #[error("cannot append record {seq}: its hash does not chain from the record before it")]
    BrokenLink {
        /// The record's sequence number.
        seq: u64,
    },
    /// A record cannot be stored as it is.
    #[error("cannot append record {seq}: {what}")]
    InvalidRecord {
        /// The record's sequence number.
        seq: u64,
        /// What is wrong with it.
        what: &'static str,
    },
    /// A checkpoint names a hash that is not the stored hash at its sequence number.
    #[error("cannot store the checkpoint at record {seq}: the stored trail has no such record with that hash")]
    CheckpointNotOnChain {
        /// The checkpoint's sequence number.
        seq: u64,
    },
    /// A checkpoint at this sequence number is already stored (one per sequence number).
    #[error("a checkpoint at record {seq} is already stored")]
    CheckpointExists {
        /// The checkpoint's sequence number.
        seq: u64,
    },
}

impl AuditDbError {
    /// Wraps an SQLite error with the operation that failed.
    fn sqlite(op: &'static str) -> impl FnOnce(rusqlite::Error) -> AuditDbError {
        move |source| AuditDbError::Sqlite { op, source }
    }
}

/// The audit database: one SQLite connection.
#[derive(Debug)]
pub struct AuditDb {
    conn: Connection,
}

impl AuditDb {
    /// Opens the audit database at `path` for reading and writing, creating it (and its tables)
    /// if needed, in WAL mode with `synchronous=FULL`. Refuses a file whose schema is newer than
    /// [`SCHEMA_VERSION`] and an SQLite file that holds other tables but no audit schema.
    pub fn open(path: &Path) -> Result<AuditDb, AuditDbError> {
        // A new file is private to its owner (the trail names callers and keys); SQLite's own
        // `-wal` and `-shm` files take the main file's mode.
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(AuditDbError::Create { path: path.to_owned(), source: e }),
            }
        }
        let mut conn = Connection::open(path).map_err(AuditDbError::sqlite("open"))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(AuditDbError::sqlite("set busy timeout"))?;
        conn.pragma_update(None, "trusted_schema", false).map_err(AuditDbError::sqlite("set trusted_schema"))?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
            .map_err(AuditDbError::sqlite("set journal_mode=WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(AuditDbError::sqlite("set synchronous=FULL"))?;

        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(AuditDbError::sqlite("begin schema setup"))?;
        match stored_version(&tx, path)? {
            Some(v) => check_version(path, v)?,
            None => {
                let others: i64 = tx
                    .query_row(
                        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(AuditDbError::sqlite("inspect schema"))?;
                if others > 0 {
                    return Err(AuditDbError::NotAnAuditDb {
                        path: path.to_owned(),
                        why: "it holds other tables and no audit schema version",
                    });
                }
            }
        }
        tx.execute_batch(CREATE_TABLES).map_err(AuditDbError::sqlite("create tables"))?;
        let rows: i64 = tx
            .query_row("SELECT count(*) FROM schema_version", [], |r| r.get(0))
            .map_err(AuditDbError::sqlite("read schema version"))?;
        if rows == 0 {
            tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [SCHEMA_VERSION])
                .map_err(AuditDbError::sqlite("record schema version"))?;
        } else {
            tx.execute("UPDATE schema_version SET version = ?1", [SCHEMA_VERSION])
                .map_err(AuditDbError::sqlite("record schema version"))?;
        }
        let ids: i64 = tx
            .query_row("SELECT count(*) FROM audit_trail", [], |r| r.get(0))
            .map_err(AuditDbError::sqlite("read trail id"))?;
        if ids == 0 {
            let mut id = [0u8; 16];
            getrandom::getrandom(&mut id).map_err(|_| AuditDbError::NotAnAuditDb {
                path: path.to_owned(),
                why: "the system random generator failed while making the trail id",
            })?;
            tx.execute("INSERT INTO audit_trail (trail_id) VALUES (?1)", [id.as_slice()])
                .map_err(AuditDbError::sqlite("record trail id"))?;
        }
        tx.commit().map_err(AuditDbError::sqlite("commit schema setup"))?;
        Ok(AuditDb { conn })
    }

    /// Opens an existing audit database for offline verification: read-only, never creates the
    /// file, never writes (also `PRAGMA query_only`). Any write through it fails.
    pub fn open_read_only(path: &Path) -> Result<AuditDb, AuditDbError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(AuditDbError::sqlite("open read-only"))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(AuditDbError::sqlite("set busy timeout"))?;
        conn.pragma_update(None, "query_only", true).map_err(AuditDbError::sqlite("set query_only"))?;
        conn.pragma_update(None, "trusted_schema", false).map_err(AuditDbError::sqlite("set trusted_schema"))?;
        match stored_version(&conn, path)? {
            Some(v) => check_version(path, v)?,
            None => {
                return Err(AuditDbError::NotAnAuditDb { path: path.to_owned(), why: "it has no schema_version table" })
            }
        }
        for table in ["audit_records", "audit_checkpoints"] {
            if !table_exists(&conn, table)? {
                return Err(AuditDbError::NotAnAuditDb { path: path.to_owned(), why: "an audit table is missing" });
            }
        }
        Ok(AuditDb { conn })
    }
}

/// Whether a table (or view) of that name exists.
fn table_exists(conn: &Connection, name: &str) -> Result<bool, AuditDbError> {
    conn.query_row("SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?1", [name], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
        .map_err(AuditDbError::sqlite("inspect schema"))
}

/// The recorded schema version, `None` if there is no `schema_version` table.
fn stored_version(conn: &Connection, path: &Path) -> Result<Option<i64>, AuditDbError> {
    if !table_exists(conn, "schema_version")? {
        return Ok(None);
    }
    let v: Option<rusqlite::types::Value> = conn
        .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
        .map_err(AuditDbError::sqlite("read schema version"))?;
    match v {
        Some(rusqlite::types::Value::Integer(v)) => Ok(Some(v)),
        // An empty table: a creation interrupted before its row was written (same transaction,
        // so only a foreign tool can leave this); `open` fills it in.
        Some(rusqlite::types::Value::Null) | None => Ok(Some(SCHEMA_VERSION)),
        Some(_) => Err(AuditDbError::NotAnAuditDb { path: path.to_owned(), why: "its schema version is not a number" }),
    }
}

fn check_version(path: &Path, found: i64) -> Result<(), AuditDbError> {
    if found > SCHEMA_VERSION {
        return Err(AuditDbError::UnsupportedVersion { path: path.to_owned(), found, supported: SCHEMA_VERSION });
    }
    if found < 1 {
        return Err(AuditDbError::NotAnAuditDb { path: path.to_owned(), why: "its schema version is below 1" });
    }
    Ok(())
}
