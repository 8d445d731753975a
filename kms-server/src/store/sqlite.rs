//! The embedded backend: one SQLite file (the quick start, the tests, single-node deployments).
//!
//! One connection behind a mutex (one writer, as SQLite wants); writes run in `BEGIN IMMEDIATE`
//! transactions (the write lock is taken before the first read, so a check-then-write cannot race
//! another process on the same file), `synchronous=FULL` so that an acknowledged commit survives a
//! power cut (invariant 6), WAL so that readers do not block the writer. The file must be private
//! (mode 0600) and is created so.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef as SqlValueRef};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::db::{Conn, DbError, DbErrorKind, Row, Value};
use super::{schema, StoreError};

/// How long a statement waits for a lock held by another connection (another process opening the
/// same file, or a backup tool) before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct SqliteBackend {
    conn: Mutex<Connection>,
    pub(super) path: PathBuf,
}

impl SqliteBackend {
    pub(super) fn open(path: &Path) -> Result<SqliteBackend, StoreError> {
        ensure_private_file(path)?;
        let mut conn = Connection::open_with_flags(
            path,
            // No CREATE: the file was made (with its mode) above, so SQLite never creates it with
            // the process umask.
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(fail("open"))?;
        configure(&conn)?;
        schema::migrate(&mut conn)?;
        Ok(SqliteBackend { conn: Mutex::new(conn), path: path.to_owned() })
    }

    /// Runs `f` in an IMMEDIATE transaction, committed if it returns `Ok`.
    pub(super) fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(fail(op))?;
        let out = f(&mut SqliteConn(&tx))?;
        tx.commit().map_err(fail(op))?;
        Ok(out)
    }

    /// Runs `f` on the connection (this process's writes wait for it: the reads of one call see
    /// one state).
    pub(super) fn read<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let conn = self.lock();
        f(&mut SqliteConn(&conn))
    }

    /// Locks the connection. A panic while the lock was held poisons the mutex, but the connection
    /// stays usable: an unfinished transaction is rolled back when its guard is dropped.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A read-only connection of its own for [`SqliteProbe`].
    pub(super) fn probe(&self) -> Result<SqliteProbe, StoreError> {
        let conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(fail("open the change probe"))?;
        // Never wait: a probe that would have to wait answers "unknown", and the caller reads the
        // store as if it had changed.
        conn.busy_timeout(Duration::ZERO).map_err(fail("set busy timeout"))?;
        Ok(SqliteProbe { conn: Mutex::new(conn) })
    }
}

/// The key change counter of a SQLite store, read on a connection of its own: the `key_changes`
/// counter (moved by triggers in the transaction of every change to a key or version row, by any
/// connection, the sqlite3 shell's too) and `PRAGMA schema_version` (which moves if a trigger is
/// dropped). A few microseconds, and never waits for a lock.
pub(super) struct SqliteProbe {
    conn: Mutex<Connection>,
}

impl SqliteProbe {
    pub(super) fn version(&self) -> Option<(i64, i64)> {
        let conn = self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let schema = conn.prepare_cached("PRAGMA schema_version").ok()?.query_row([], |r| r.get(0)).ok()?;
        let counter = conn.prepare_cached("SELECT counter FROM key_changes WHERE only_row = 1").ok()?.query_row([], |r| r.get(0)).ok()?;
        Some((schema, counter))
    }

    pub(super) fn callers_version(&self) -> Option<i64> {
        let conn = self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let schema: i64 = conn.prepare_cached("PRAGMA schema_version").ok()?.query_row([], |r| r.get(0)).ok()?;
        let counter: i64 =
            conn.prepare_cached("SELECT counter FROM caller_changes WHERE only_row = 1").ok()?.query_row([], |r| r.get(0)).ok()?;
        // A dropped trigger changes the schema version: fold it in, so that it counts as a change.
        Some(counter.wrapping_add(schema << 32))
    }
}

/// A connection or transaction of the SQLite backend.
struct SqliteConn<'a>(&'a Connection);

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(SqlValueRef::Null),
            Value::Integer(i) => ToSqlOutput::Borrowed(SqlValueRef::Integer(*i)),
            Value::Real(f) => ToSqlOutput::Borrowed(SqlValueRef::Real(*f)),
            Value::Text(t) => ToSqlOutput::Borrowed(SqlValueRef::Text(t.as_bytes())),
            Value::InvalidText(t) => ToSqlOutput::Borrowed(SqlValueRef::Text(t)),
            Value::Blob(b) => ToSqlOutput::Borrowed(SqlValueRef::Blob(b)),
        })
    }
}

impl Conn for SqliteConn<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let mut stmt = self.0.prepare_cached(sql).map_err(db_error)?;
        let n = stmt.execute(rusqlite::params_from_iter(params.iter())).map_err(db_error)?;
        Ok(n as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let mut stmt = self.0.prepare_cached(sql).map_err(db_error)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter())).map_err(db_error)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(db_error)? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                values.push(match row.get_ref(i).map_err(db_error)? {
                    SqlValueRef::Null => Value::Null,
                    SqlValueRef::Integer(v) => Value::Integer(v),
                    SqlValueRef::Real(v) => Value::Real(v),
                    SqlValueRef::Text(t) => match String::from_utf8(t.to_vec()) {
                        Ok(t) => Value::Text(t),
                        Err(bad) => Value::InvalidText(bad.into_bytes()),
                    },
                    SqlValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            out.push(Row::new(values));
        }
        Ok(out)
    }
}

/// Maps a rusqlite error of operation `op` to a store error.
pub(super) fn fail(op: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError::db(op)(db_error(e))
}

/// A SQLite failure as the store's callers see it.
pub(super) fn db_error(e: rusqlite::Error) -> DbError {
    let kind = match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            rusqlite::ErrorCode::ConstraintViolation
                if matches!(
                    f.extended_code,
                    rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                ) =>
            {
                DbErrorKind::UniqueViolation
            }
            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked => DbErrorKind::Contention,
            _ => DbErrorKind::Other,
        },
        _ => DbErrorKind::Other,
    };
    DbError { kind, backend: "SQLite", message: e.to_string() }
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
    conn.busy_timeout(BUSY_TIMEOUT).map_err(fail("set busy timeout"))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(fail("enable WAL"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(journal_mode = %mode, "SQLite refused WAL mode; continuing with this journal mode");
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;").map_err(fail("configure connection"))?;
    let fk: i64 = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0)).map_err(fail("configure connection"))?;
    if fk != 1 {
        return Err(StoreError::CorruptSchema { what: "SQLite refused to enforce foreign keys" });
    }
    Ok(())
}
