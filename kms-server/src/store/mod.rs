//! The key store: key metadata (name, level, purpose, state, versions and the `CKA_ID` of each
//! version's HSM object) in an embedded SQLite file.
//!
//! - [`records`]: the domain types ([`KeyRecord`], [`VersionRecord`], [`KeyState`], [`KeyFilter`]).
//! - [`schema`]: the versioned schema and its migrations; an unknown (newer) version is refused.
//! - [`keys`]: the queries, and the validation of every column read back.
//! - [`intents`]: creation intents, written before an HSM object is made (what start-up may destroy).
//! - [`anchor`]: the audit trail's anchor (its id and head, sealed by the HSM).
//! - [`requests`]: two-officer requests about callers and token objects (key changes: [`approvals`]).
//!
//! [`Store`] is a blocking API over one connection behind a mutex (one writer, as SQLite wants).
//! The server must call it from `tokio::task::spawn_blocking`, never on the async runtime.
//!
//! **Never:** store a PKCS#11 object handle (handles are per process; only `CKA_ID`s are kept),
//! store key material, or trust a row: the file is treated as hostile input, and a column that
//! does not decode is a [`StoreError::CorruptRow`], never a panic. Metadata authentication against
//! the HSM (invariant 5) is layered above this module.
#![forbid(unsafe_code)]

/// An enum stored as text: the variants, the exact text of each (no case folding when parsed: the
/// database is written only by us), `ALL`, `as_str`, `parse` and `Display`.
macro_rules! stored_text_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The text stored in the database and shown in messages.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// Parses the exact stored text.
            pub fn parse(s: &str) -> Option<$name> {
                $name::ALL.iter().copied().find(|v| v.as_str() == s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

mod anchor;
mod approvals;
mod callers;
mod intents;
mod keys;
mod records;
mod requests;
mod schema;

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

pub use approvals::{ApprovalAction, ApprovalId, ApprovalRecord, ApprovalState, StoredApproval, LIST_LIMIT as APPROVAL_LIST_LIMIT};
pub use anchor::{AuditAnchor, StoredAnchor};
pub use intents::{IntentRecord, StoredIntent, UnreadableIntent};
pub use callers::{validate_pattern as validate_key_pattern, CallerRecord, RecipientKeyRecord, StoredCaller, MAX_RECIPIENT_KEYS};
pub use requests::{RequestKind, RequestRecord, StoredRequest};
pub use records::{KeyFilter, KeyListing, KeyRecord, KeyState, RowMac, StoredKey, UnreadableKey, VersionRecord};
pub use schema::SUPPORTED_SCHEMA_VERSION;

/// How long a statement waits for a lock held by another connection (another process opening the
/// same file, or a backup tool) before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A SQLite call failed; `op` says which store operation was running.
    #[error("SQLite failed during {op}: {source}")]
    Sqlite { op: &'static str, source: rusqlite::Error },
    /// The database file could not be created or inspected.
    #[error("cannot {op} the key store file {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    /// The database file is readable or writable by group or others.
    #[error(
        "the key store file {path} has mode {mode:o}: it must not be accessible to group or others \
         (run `chmod 600` on it)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// The file was written by a newer version of the server.
    #[error("the key store has schema version {found}; this server supports up to {supported}; refusing to open it")]
    UnknownSchemaVersion { found: i64, supported: i64 },
    /// The file is a SQLite database, but not a key store (or its version table is damaged).
    #[error("the key store's schema is damaged: {what}")]
    CorruptSchema { what: &'static str },
    /// A key with this name already exists.
    #[error("a key named {name:?} already exists")]
    DuplicateName { name: String },
    /// A row read back does not decode; the database was edited or damaged.
    #[error("the stored row of key {key} is corrupt: {what}")]
    CorruptRow { key: String, what: &'static str },
    /// The row changed since it was read (another officer's change, or the rotation task's).
    #[error("key {key} was changed by another operation while this one ran; read it again and retry")]
    Conflict { key: String },
    /// A record given to a write method breaks a rule the store enforces on reading.
    #[error("refusing to store key {key}: {what}")]
    InvalidRecord { key: String, what: &'static str },
}

impl StoreError {
    fn sqlite(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        move |source| StoreError::Sqlite { op, source }
    }
}

/// The key store. Cheap to clone: clones share one connection.
///
/// Blocking: every method runs SQLite on the calling thread. Call it from
/// `tokio::task::spawn_blocking`, never from an async task.
#[derive(Clone, Debug)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: Arc<Path>,
}

impl Store {
    /// Opens the key store at `path`, creating it (mode 0600) and its schema if it does not exist.
    ///
    /// Refuses a file that group or others may access, a file of an unknown (newer) schema version,
    /// and a SQLite file that is not a key store.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        ensure_private_file(path)?;
        let mut conn = Connection::open_with_flags(
            path,
            // No CREATE: the file was made (with its mode) above, so SQLite never creates it with
            // the process umask.
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(StoreError::sqlite("open"))?;
        configure(&conn)?;
        schema::migrate(&mut conn)?;
        Ok(Store { conn: Arc::new(Mutex::new(conn)), path: path.into() })
    }

    /// A probe that tells cheaply whether anything changed the store since an earlier look: see
    /// [`ChangeProbe`]. It has a connection of its own.
    pub fn change_probe(&self) -> Result<ChangeProbe, StoreError> {
        let conn = Connection::open_with_flags(&*self.path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(StoreError::sqlite("open the change probe"))?;
        // Never wait: a probe that would have to wait answers "unknown", and the caller reads the
        // store as if it had changed.
        conn.busy_timeout(Duration::ZERO).map_err(StoreError::sqlite("set busy timeout"))?;
        let probe = ChangeProbe { conn: Mutex::new(conn) };
        probe.version().ok_or(StoreError::CorruptSchema { what: "the key change counter cannot be read" })?;
        Ok(probe)
    }

    /// Locks the connection. A panic while the lock was held poisons the mutex, but the connection
    /// stays usable: an unfinished transaction is rolled back when its guard is dropped.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Tells whether the keys in the store have changed: the `key_changes` counter, which triggers
/// move in the transaction of every change to a key or version row, by any connection (this
/// process's, another server's, the sqlite3 shell's), together with `PRAGMA schema_version`, which
/// moves if a trigger is dropped. Commits that touch no key (the audit anchor after every group of
/// requests, intents, approvals, callers) leave it alone. Read on a connection of its own; it
/// takes a few microseconds and never waits for a lock (busy timeout zero), so it may be asked on
/// the async runtime, on every request.
#[derive(Debug)]
pub struct ChangeProbe {
    conn: Mutex<Connection>,
}

impl ChangeProbe {
    /// The store's key version now (schema version, key change counter); `None` when it cannot be
    /// read without waiting (treat the keys as changed).
    pub fn version(&self) -> Option<(i64, i64)> {
        let conn = self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let schema = conn.prepare_cached("PRAGMA schema_version").ok()?.query_row([], |r| r.get(0)).ok()?;
        let counter = conn.prepare_cached("SELECT counter FROM key_changes WHERE only_row = 1").ok()?.query_row([], |r| r.get(0)).ok()?;
        Some((schema, counter))
    }
}

/// Creates the file with mode 0600 if it is new, and refuses an existing one that group or others
/// may read or write.
fn ensure_private_file(path: &Path) -> Result<(), StoreError> {
    match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => {
            tracing::info!(path = %path.display(), "created a new key store");
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(StoreError::Io { op: "create", path: path.to_owned(), source }),
    }
    let meta =
        std::fs::metadata(path).map_err(|source| StoreError::Io { op: "inspect", path: path.to_owned(), source })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StoreError::Permissions { path: path.to_owned(), mode });
    }
    Ok(())
}

/// Connection settings: durable commits (an acknowledged operation survives a power cut,
/// invariant 6), foreign keys enforced, WAL so that readers do not block the writer.
fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT).map_err(StoreError::sqlite("set busy timeout"))?;
    let mode: String =
        conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(StoreError::sqlite("enable WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(journal_mode = %mode, "SQLite refused WAL mode; continuing with this journal mode");
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(StoreError::sqlite("configure connection"))?;
    let fk: i64 =
        conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).map_err(StoreError::sqlite("configure connection"))?;
    if fk != 1 {
        return Err(StoreError::CorruptSchema { what: "SQLite refused to enforce foreign keys" });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
