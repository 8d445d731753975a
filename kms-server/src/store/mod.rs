//! The key store: key metadata (name, level, purpose, state, versions and the `CKA_ID` of each
//! version's HSM object), callers, approvals, intents and the audit anchor, in an embedded SQLite
//! file or in a PostgreSQL database that several servers share.
//!
//! - [`db`]: what the record rules need from a database ([`db::Conn`]), and the two backends
//!   behind it: [`sqlite`] and [`postgres`]. The modules below are written once, against it.
//! - [`records`]: the domain types ([`KeyRecord`], [`VersionRecord`], [`KeyState`], [`KeyFilter`]).
//! - [`schema`]: the versioned schema and its migrations; an unknown (newer) version is refused.
//! - [`keys`]: the queries, and the validation of every column read back.
//! - [`intents`]: creation intents, written before an HSM object is made (what start-up may destroy).
//! - [`anchor`]: the audit trail's anchor (its id and head, sealed by the HSM).
//! - [`requests`]: two-officer requests about callers and token objects (key changes: [`approvals`]).
//!
//! [`Store`] is a blocking API (one SQLite connection behind a mutex, or a pool of PostgreSQL
//! connections). The server must call it from `tokio::task::spawn_blocking`, never on the async
//! runtime.
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
pub(crate) mod db;
mod idempotency;
mod intents;
mod keys;
mod postgres;
mod records;
mod requests;
mod schema;
mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use approvals::{ApprovalAction, ApprovalId, ApprovalRecord, ApprovalState, StoredApproval, LIST_LIMIT as APPROVAL_LIST_LIMIT};
pub use anchor::{AuditAnchor, StoredAnchor};
pub use db::{DbError, DbErrorKind};
pub use idempotency::{IdempotencyRecord, StoredIdempotency, MAX_IDEMPOTENCY_KEY};
pub use intents::{IntentRecord, StoredIntent, UnreadableIntent};
pub use callers::{validate_pattern as validate_key_pattern, CallerRecord, RecipientKeyRecord, StoredCaller, MAX_RECIPIENT_KEYS};
pub use postgres::{PgOptions, PROBE_POLL};
pub use requests::{RequestKind, RequestRecord, StoredRequest};
pub use records::{KeyFilter, KeyListing, KeyRecord, KeyState, RowMac, StoredKey, UnreadableKey, VersionRecord};
pub use schema::SUPPORTED_SCHEMA_VERSION;

use db::Conn;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A database call failed; `op` says which store operation was running.
    #[error("the key store failed during {op}: {source}")]
    Database { op: &'static str, source: DbError },
    /// The database file could not be created or inspected.
    #[error("cannot {op} the key store file {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    /// The database file is readable or writable by group or others.
    #[error(
        "the key store file {path} has mode {mode:o}: it must not be accessible to group or others \
         (run `chmod 600` on it)"
    )]
    Permissions { path: PathBuf, mode: u32 },
    /// The database was written by a newer version of the server.
    #[error("the key store has schema version {found}; this server supports up to {supported}; refusing to open it")]
    UnknownSchemaVersion { found: i64, supported: i64 },
    /// The database is not a key store (or its version table is damaged).
    #[error("the key store's schema is damaged: {what}")]
    CorruptSchema { what: &'static str },
    /// A key with this name already exists.
    #[error("a key named {name:?} already exists")]
    DuplicateName { name: String },
    /// A row read back does not decode; the database was edited or damaged.
    #[error("the stored row of key {key} is corrupt: {what}")]
    CorruptRow { key: String, what: &'static str },
    /// The row changed since it was read (another officer's change, the rotation task's, or
    /// another server's).
    #[error("key {key} was changed by another operation while this one ran; read it again and retry")]
    Conflict { key: String },
    /// The store's settings cannot be used; the message says why.
    #[error("{0}")]
    Settings(&'static str),
    /// A record given to a write method breaks a rule the store enforces on reading.
    #[error("refusing to store key {key}: {what}")]
    InvalidRecord { key: String, what: &'static str },
}

impl StoreError {
    fn db(op: &'static str) -> impl FnOnce(DbError) -> StoreError {
        move |source| StoreError::Database { op, source }
    }

    /// Whether the database could not be reached (nothing is known to have been written; the
    /// request may be retried once it is back).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Database { source, .. } if source.kind == DbErrorKind::Unavailable)
    }

    /// Whether another transaction got in the way (a lock wait timed out, a deadlock): nothing
    /// was written and the operation may be retried.
    pub fn is_contention(&self) -> bool {
        matches!(self, StoreError::Database { source, .. } if source.kind == DbErrorKind::Contention)
    }
}

/// Where the store lives: `[store] path` (SQLite) or `[store] url` (PostgreSQL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    Postgres(PgOptions),
}

/// The key store. Cheap to clone: clones share one backend (one SQLite connection, or one pool
/// of PostgreSQL connections).
///
/// Blocking: every method runs the database on the calling thread. Call it from
/// `tokio::task::spawn_blocking`, never from an async task.
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
}

enum Backend {
    Sqlite(sqlite::SqliteBackend),
    Postgres(postgres::PgBackend),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.backend {
            Backend::Sqlite(b) => f.debug_struct("Store").field("sqlite", &b.path).finish(),
            Backend::Postgres(b) => f.debug_struct("Store").field("postgres", &b.describe()).finish(),
        }
    }
}

impl Store {
    /// Opens the SQLite key store at `path`, creating it (mode 0600) and its schema if it does not
    /// exist.
    ///
    /// Refuses a file that group or others may access, a file of an unknown (newer) schema version,
    /// and a SQLite file that is not a key store.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store { backend: Arc::new(Backend::Sqlite(sqlite::SqliteBackend::open(path)?)) })
    }

    /// Opens the store at `location`, creating its schema if the database is empty; refuses an
    /// unknown (newer) schema version and a database that is not a key store.
    pub fn open_location(location: &StoreLocation) -> Result<Store, StoreError> {
        match location {
            StoreLocation::Sqlite(path) => Store::open(path),
            StoreLocation::Postgres(options) => {
                Ok(Store { backend: Arc::new(Backend::Postgres(postgres::PgBackend::open(options)?)) })
            }
        }
    }

    /// What the store is, for log lines and health answers: `sqlite <path>` or `postgres <host>/<db>`
    /// (never a password).
    pub fn describe(&self) -> String {
        match &*self.backend {
            Backend::Sqlite(b) => format!("sqlite {}", b.path.display()),
            Backend::Postgres(b) => format!("postgres {}", b.describe()),
        }
    }

    /// A probe that tells cheaply whether any key changed in the store since an earlier look: see
    /// [`ChangeProbe`].
    pub fn change_probe(&self) -> Result<ChangeProbe, StoreError> {
        let probe = match &*self.backend {
            Backend::Sqlite(b) => ChangeProbe(Probe::Sqlite(b.probe()?)),
            Backend::Postgres(b) => ChangeProbe(Probe::Postgres(b.probe()?)),
        };
        probe.version().ok_or(StoreError::CorruptSchema { what: "the key change counter cannot be read" })?;
        Ok(probe)
    }

    /// The lease that lets one server at a time run the lifecycle task (rotations, destructions,
    /// the sweep of failed creations). With SQLite (one server per file) it is always held.
    pub fn lifecycle_lease(&self) -> LifecycleLease {
        match &*self.backend {
            Backend::Sqlite(_) => LifecycleLease(Lease::Local),
            Backend::Postgres(b) => LifecycleLease(Lease::Postgres(b.lease())),
        }
    }

    /// Runs `f` in one transaction, committed if it returns `Ok` and rolled back otherwise.
    fn write<T>(&self, op: &'static str, f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &*self.backend {
            Backend::Sqlite(b) => b.write(op, f),
            Backend::Postgres(b) => b.write(op, f),
        }
    }

    /// [`Store::write`] for a transaction that changes key or version rows: once it has committed,
    /// this server's own [`ChangeProbe`] moves at once (with PostgreSQL, the notification that
    /// tells the other servers arrives a little later; this server must read its own writes).
    fn write_keys<T>(&self, op: &'static str, f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &*self.backend {
            Backend::Sqlite(b) => b.write(op, f),
            Backend::Postgres(b) => b.write_keys(op, f),
        }
    }

    /// Runs the reads of `f` on one consistent state of the store.
    fn read<T>(&self, op: &'static str, f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &*self.backend {
            Backend::Sqlite(b) => b.read(f),
            Backend::Postgres(b) => b.read(op, f),
        }
    }
}

/// See [`Store::lifecycle_lease`]. Blocking: ask [`LifecycleLease::hold`] from the blocking pool.
pub struct LifecycleLease(Lease);

enum Lease {
    Local,
    Postgres(postgres::PgLease),
}

impl LifecycleLease {
    /// Whether this server holds the lease now (taking it if it is free). Asked before every
    /// lifecycle pass: a server that lost the lease's connection finds out here and stops.
    pub fn hold(&mut self) -> Result<bool, StoreError> {
        match &mut self.0 {
            Lease::Local => Ok(true),
            Lease::Postgres(lease) => lease.hold(),
        }
    }
}

/// Tells whether the keys in the store have changed: a key change counter that moves in the
/// transaction of every change to a key or version row, by any connection (this server's, another
/// server's, an administrator's shell). Commits that touch no key (the audit anchor after every
/// group of requests, intents, approvals, callers) leave it alone. It may be asked on the async
/// runtime, on every request: it never waits.
///
/// - SQLite: the counter (and `PRAGMA schema_version`, which moves if a trigger is dropped), read
///   on a read-only connection of its own in a few microseconds, busy timeout zero.
/// - PostgreSQL: a thread of its own LISTENs for the triggers' notifications and reads the counter
///   when one arrives (and every [`postgres::PROBE_POLL`] in any case); `version` reads what it
///   last saw. While that thread has no connection, the answer is "unknown".
pub struct ChangeProbe(Probe);

enum Probe {
    Sqlite(sqlite::SqliteProbe),
    Postgres(postgres::PgProbe),
}

impl std::fmt::Debug for ChangeProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Probe::Sqlite(_) => "ChangeProbe(sqlite)",
            Probe::Postgres(_) => "ChangeProbe(postgres)",
        })
    }
}

impl ChangeProbe {
    /// The store's key version now; `None` when it cannot be told without waiting (treat the
    /// keys as changed).
    pub fn version(&self) -> Option<(i64, i64)> {
        match &self.0 {
            Probe::Sqlite(p) => p.version(),
            Probe::Postgres(p) => p.version(),
        }
    }

    /// The store's caller version now (it moves with every change to a caller row, by any
    /// connection); `None` when it cannot be told without waiting.
    pub fn callers_version(&self) -> Option<i64> {
        match &self.0 {
            Probe::Sqlite(p) => p.callers_version(),
            Probe::Postgres(p) => p.callers_version(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
