//! The shared backend: a PostgreSQL database that several servers use at once.
//!
//! A small pool of blocking connections (the `postgres` crate, which drives `tokio-postgres` on a
//! runtime of its own per connection); the store is a blocking API called from the blocking pool,
//! so the same record code runs over both backends. Writes run in READ COMMITTED transactions:
//! every check the record rules make against another writer is enforced by the database itself
//! (a key's name by its unique index, a change by `WHERE revision = expected`, which PostgreSQL
//! re-evaluates on the newest row once a concurrent writer commits), so two servers changing one
//! key end with one winner and a [`StoreError::Conflict`] for the other. Reads of several
//! statements run in one REPEATABLE READ, READ ONLY transaction, so they see one state.
//!
//! Every connection carries bounds (`statement_timeout`, `lock_timeout`,
//! `idle_in_transaction_session_timeout`, a connect timeout): a stalled database fails a request
//! with `UNAVAILABLE` within seconds instead of holding it. A connection that broke is dropped
//! from the pool and replaced by the next request; nothing is retried here (the caller decides
//! what is safe to retry).
//!
//! **Never** put a parameter value in a statement's text (every value is a parameter), or a
//! password in a log line, an error, or [`PgOptions`]'s `Debug`.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use postgres::{Client, NoTls, Statement};

use super::db::{Conn, DbError, DbErrorKind, Row, Value};
use super::StoreError;

/// How long a request waits for a connection of a full pool before failing.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// Bounds set on every connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const SESSION_OPTIONS: &str = "-c statement_timeout=15000 -c lock_timeout=5000 -c idle_in_transaction_session_timeout=60000";
/// The change probe reads the key change counter at least this often, notification or not.
pub const PROBE_POLL: Duration = Duration::from_millis(500);
/// The channel the key change triggers notify.
const KEY_CHANNEL: &str = "kms_key_changes";
/// The advisory lock (session-scoped) that the server running the lifecycle task holds.
const LIFECYCLE_LOCK: i64 = 0x6b6d_735f_6c69_6665; // "kms_life"
/// The advisory lock (transaction-scoped) that serialises schema migration between servers.
const MIGRATION_LOCK: i64 = 0x6b6d_735f_7363_6865; // "kms_sche"

/// How to reach the PostgreSQL database: `[store] url` and what goes with it.
#[derive(Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// A `postgres://` URL or a libpq `key=value` string (host may be a unix socket directory).
    /// Must not hold a password: that comes from `password_file`.
    pub url: String,
    /// A file holding the password (its first line), if the server asks for one.
    pub password_file: Option<PathBuf>,
    /// Connections per server (each store operation holds one for its transaction).
    pub pool_size: usize,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL as parsed (hosts, database, user), never as written: it might hold a password.
        let url = self.url.parse::<postgres::Config>().map(|c| describe(&c)).unwrap_or_else(|_| "(unparsable)".to_owned());
        f.debug_struct("PgOptions")
            .field("url", &url)
            .field("password_file", &self.password_file)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl PgOptions {
    /// The client configuration, with the password read from its file and the session bounds.
    fn config(&self) -> Result<postgres::Config, StoreError> {
        let mut config: postgres::Config = self.url.parse().map_err(|e: postgres::Error| StoreError::Database {
            op: "parse the store URL",
            source: DbError { kind: DbErrorKind::Other, backend: "PostgreSQL", message: e.to_string() },
        })?;
        if config.get_password().is_some() {
            return Err(StoreError::Settings(
                "the store URL holds a password: put it in [store] password_file instead (a URL is logged and shown)",
            ));
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| StoreError::Io { op: "read the password file of", path: path.clone(), source })?;
            let password = text.lines().next().unwrap_or("").to_owned();
            config.password(password.as_bytes());
        }
        config.connect_timeout(CONNECT_TIMEOUT).options(SESSION_OPTIONS).application_name("kms-server");
        config.keepalives(true).keepalives_idle(Duration::from_secs(30));
        Ok(config)
    }
}

/// `host/dbname as user` of a configuration, for log lines (no password, bounded).
fn describe(config: &postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let text = format!(
        "{}/{} as {}",
        hosts.join(","),
        config.get_dbname().unwrap_or("(default database)"),
        config.get_user().unwrap_or("(default user)")
    );
    crate::bounded::text(&text, 300).into_owned()
}

/// One pooled connection and the statements it has prepared.
struct PgClient {
    client: Client,
    statements: HashMap<String, Statement>,
}

struct Pool {
    idle: Vec<PgClient>,
    /// Connections open (idle or lent).
    open: usize,
}

pub(super) struct PgBackend {
    config: postgres::Config,
    described: String,
    max: usize,
    pool: Mutex<Pool>,
    returned: Condvar,
    /// Commits of key changes made through this backend (see [`PgProbe`]).
    key_writes: Arc<AtomicI64>,
}

impl PgBackend {
    pub(super) fn open(options: &PgOptions) -> Result<PgBackend, StoreError> {
        let config = options.config()?;
        let backend = PgBackend {
            described: describe(&config),
            config,
            max: options.pool_size.max(1),
            pool: Mutex::new(Pool { idle: Vec::new(), open: 0 }),
            returned: Condvar::new(),
            key_writes: Arc::new(AtomicI64::new(0)),
        };
        let mut client = backend.take("open")?;
        let migrated = migrate(&mut client.client);
        backend.give_back(client);
        migrated?;
        tracing::info!(store = %backend.described, "opened the PostgreSQL key store");
        Ok(backend)
    }

    pub(super) fn describe(&self) -> &str {
        &self.described
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        // The pool's fields are updated together under the lock; a panic cannot leave them apart.
        self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle connection, a new one if the pool has room, or the next one given back (waiting at
    /// most [`POOL_WAIT`]).
    fn take(&self, op: &'static str) -> Result<PgClient, StoreError> {
        let deadline = Instant::now() + POOL_WAIT;
        let mut pool = self.lock();
        loop {
            if let Some(client) = pool.idle.pop() {
                return Ok(client);
            }
            if pool.open < self.max {
                pool.open += 1;
                drop(pool);
                return match self.config.connect(NoTls) {
                    Ok(client) => Ok(PgClient { client, statements: HashMap::new() }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.returned.notify_one();
                        Err(StoreError::db(op)(pg_error(&e)))
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::db(op)(DbError {
                    kind: DbErrorKind::Contention,
                    backend: "PostgreSQL",
                    message: format!("all {} connections of the pool stayed busy for {POOL_WAIT:?}", self.max),
                }));
            }
            pool = self.returned.wait_timeout(pool, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Returns a connection to the pool, or forgets it if it broke.
    fn give_back(&self, client: PgClient) {
        let mut pool = self.lock();
        if client.client.is_closed() {
            pool.open -= 1;
        } else {
            pool.idle.push(client);
        }
        drop(pool);
        self.returned.notify_one();
    }

    pub(super) fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.with_transaction(op, false, f)
    }

    /// A connection, a transaction on it, and `f`. A pooled connection that turns out to be dead
    /// when the transaction begins (the database restarted since it was last used) is replaced
    /// once: nothing was sent but `BEGIN`, so that retry is harmless.
    fn with_transaction<T>(
        &self,
        op: &'static str,
        read_only: bool,
        f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut lent = Lent { backend: self, client: Some(self.take(op)?), in_transaction: false };
        if let Err(e) = lent.begin(read_only) {
            if e.kind != DbErrorKind::Unavailable {
                return Err(StoreError::db(op)(e));
            }
            drop(lent);
            lent = Lent { backend: self, client: Some(self.take(op)?), in_transaction: false };
            lent.begin(read_only).map_err(StoreError::db(op))?;
        }
        let out = f(&mut lent.conn());
        let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = lent.end(end);
        match (out, ended) {
            (Ok(v), Ok(())) => Ok(v),
            (Ok(_), Err(e)) => Err(StoreError::db(op)(e)),
            (Err(e), _) => Err(e),
        }
    }

    /// [`PgBackend::write`] of key rows: counted once committed, so that this server's probe
    /// moves before the caller is answered.
    pub(super) fn write_keys<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let out = self.write(op, f);
        // Counted on failure too: a failed commit may have landed (a connection lost during
        // COMMIT), and reading the row again costs nothing but one read.
        self.key_writes.fetch_add(1, Ordering::AcqRel);
        out
    }

    pub(super) fn read<T>(&self, op: &'static str, f: impl FnOnce(&mut dyn Conn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.with_transaction(op, true, f)
    }

    pub(super) fn lease(&self) -> PgLease {
        PgLease { config: self.config.clone(), client: None }
    }

    pub(super) fn probe(&self) -> Result<PgProbe, StoreError> {
        PgProbe::start(self.config.clone(), Arc::clone(&self.key_writes))
    }
}

impl Drop for PgBackend {
    /// Closing a blocking client runs its runtime, which must not happen on an async runtime's
    /// thread (the last clone of a store may well be dropped on one): the idle connections are
    /// closed on a thread of their own.
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.lock().idle);
        if !idle.is_empty() {
            let _ = std::thread::Builder::new().name("kms-store-close".into()).spawn(move || drop(idle));
        }
    }
}

/// A connection lent by the pool: given back when dropped (a broken one is forgotten), after a
/// ROLLBACK if a transaction is still open on it (a panic in the middle of one).
struct Lent<'a> {
    backend: &'a PgBackend,
    client: Option<PgClient>,
    in_transaction: bool,
}

impl Lent<'_> {
    fn client(&mut self) -> &mut PgClient {
        // Some until drop.
        self.client.as_mut().expect("a lent connection")
    }

    /// Begins a transaction (READ COMMITTED for writes; REPEATABLE READ, READ ONLY for reads).
    fn begin(&mut self, read_only: bool) -> Result<(), DbError> {
        let sql = if read_only { "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" } else { "BEGIN ISOLATION LEVEL READ COMMITTED" };
        self.client().client.batch_execute(sql).map_err(|e| pg_error(&e))?;
        self.in_transaction = true;
        Ok(())
    }

    fn conn(&mut self) -> PgConn<'_> {
        let PgClient { client, statements } = self.client();
        PgConn { client, statements }
    }

    /// COMMIT or ROLLBACK.
    fn end(&mut self, sql: &str) -> Result<(), DbError> {
        let ended = self.client().client.batch_execute(sql).map_err(|e| pg_error(&e));
        self.in_transaction = false;
        ended
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(mut client) = self.client.take() {
            if self.in_transaction {
                let _ = client.client.batch_execute("ROLLBACK");
            }
            self.backend.give_back(client);
        }
    }
}

/// A connection of the PostgreSQL backend inside the transaction [`begin`] opened.
struct PgConn<'a> {
    client: &'a mut Client,
    statements: &'a mut HashMap<String, Statement>,
}

impl PgConn<'_> {
    fn statement(&mut self, sql: &str) -> Result<Statement, DbError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let prepared = self.client.prepare(&renumber(sql)).map_err(|e| pg_error(&e))?;
        self.statements.insert(sql.to_owned(), prepared.clone());
        Ok(prepared)
    }
}

impl Conn for PgConn<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let stmt = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        self.client.execute(&stmt, &params).map_err(|e| pg_error(&e))
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let stmt = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let rows = self.client.query(&stmt, &params).map_err(|e| pg_error(&e))?;
        rows.iter().map(decode_row).collect()
    }
}

/// SQLite's `?N` placeholders as PostgreSQL's `$N` (outside quoted text; the store's statements
/// hold no `?` of their own).
fn renumber(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

/// A row's columns as plain values. The schema fixes every column's type, but a column of a type
/// the store never declares is refused, not guessed at.
fn decode_row(row: &postgres::Row) -> Result<Row, DbError> {
    let bad = |e: postgres::Error| pg_error(&e);
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(i).map_err(bad)?.map(Value::Integer)
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(i).map_err(bad)?.map(|v| Value::Integer(v.into()))
        } else if *ty == Type::INT2 {
            row.try_get::<_, Option<i16>>(i).map_err(bad)?.map(|v| Value::Integer(v.into()))
        } else if *ty == Type::BOOL {
            row.try_get::<_, Option<bool>>(i).map_err(bad)?.map(|v| Value::Integer(v.into()))
        } else if *ty == Type::TEXT || *ty == Type::VARCHAR || *ty == Type::NAME {
            row.try_get::<_, Option<String>>(i).map_err(bad)?.map(Value::Text)
        } else if *ty == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(i).map_err(bad)?.map(Value::Blob)
        } else {
            return Err(DbError {
                kind: DbErrorKind::Other,
                backend: "PostgreSQL",
                message: format!("column {} has type {}, which the store never uses", i, crate::bounded::text(ty.name(), 64)),
            });
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row::new(values))
}

impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut postgres::types::private::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Integer(v) if *ty == Type::INT8 => v.to_sql(ty, out),
            Value::Integer(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            Value::Integer(v) if *ty == Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
            Value::Integer(v) if *ty == Type::BOOL => (*v != 0).to_sql(ty, out),
            Value::Text(t) => t.as_str().to_sql(ty, out),
            Value::Blob(b) if *ty == Type::BYTEA => b.as_slice().to_sql(ty, out),
            _ => Err(format!("a store parameter does not fit a column of type {}", ty.name()).into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        [Type::INT8, Type::INT4, Type::INT2, Type::BOOL, Type::TEXT, Type::VARCHAR, Type::NAME, Type::BYTEA].contains(ty)
    }

    to_sql_checked!();
}

/// A PostgreSQL failure as the store's callers see it. The message is the server's primary
/// message (which names a constraint, never a row's values: PostgreSQL's DETAIL line, which may
/// quote them, is left out) or the client's.
fn pg_error(e: &postgres::Error) -> DbError {
    let kind = match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => DbErrorKind::UniqueViolation,
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::LOCK_NOT_AVAILABLE =>
        {
            DbErrorKind::Contention
        }
        Some(c)
            if c.code().starts_with("08")
                || *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || *c == SqlState::QUERY_CANCELED
                || *c == SqlState::READ_ONLY_SQL_TRANSACTION
                || *c == SqlState::TOO_MANY_CONNECTIONS =>
        {
            // A statement timeout (QUERY_CANCELED) means a stalled database; a read-only
            // transaction error means a standby answered (a failover is under way).
            DbErrorKind::Unavailable
        }
        Some(_) => DbErrorKind::Other,
        // No SQLSTATE: the client's own failure (connect, I/O, a closed connection).
        None => DbErrorKind::Unavailable,
    };
    let message = match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    };
    DbError { kind, backend: "PostgreSQL", message }
}

/// The lifecycle lease of one server: a session-level advisory lock on a connection of its own.
/// PostgreSQL releases it when that connection ends, so the death of the holding server (its
/// process, its machine, or its network: TCP keepalives end the session) frees it for another.
pub(super) struct PgLease {
    config: postgres::Config,
    client: Option<Client>,
}

impl PgLease {
    /// Whether this server holds the lease now: the connection that holds it still answers, or
    /// a new one got it.
    pub(super) fn hold(&mut self) -> Result<bool, StoreError> {
        if let Some(client) = &mut self.client {
            if client.simple_query("SELECT 1").is_ok() {
                return Ok(true);
            }
            tracing::warn!("the connection that held the lifecycle lease is gone; trying to take the lease again");
            self.client = None;
        }
        let fail = |e: postgres::Error| StoreError::db("take the lifecycle lease")(pg_error(&e));
        let mut client = self.config.connect(NoTls).map_err(fail)?;
        let got: bool = client.query_one("SELECT pg_try_advisory_lock($1)", &[&LIFECYCLE_LOCK]).and_then(|r| r.try_get(0)).map_err(fail)?;
        if got {
            self.client = Some(client);
        }
        Ok(got)
    }
}

impl Drop for PgLease {
    /// Closes the holding connection (which releases the lease) on a thread of its own, as
    /// [`PgBackend`]'s drop does.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = std::thread::Builder::new().name("kms-lease-close".into()).spawn(move || drop(client));
        }
    }
}

/// The key change counter of a PostgreSQL store, followed by a thread of its own: it LISTENs on
/// the triggers' channel and reads the counter when a notification arrives and at least every
/// [`PROBE_POLL`]; [`PgProbe::version`] answers what it last read, without a round trip, together
/// with the count of this server's own key commits (which moves before this server answers the
/// request that made the change: a server always reads its own writes). While the thread has no
/// connection (the database is down), the answer is `None`: unknown.
pub(super) struct PgProbe {
    shared: Arc<ProbeShared>,
    own_writes: Arc<AtomicI64>,
}

struct ProbeShared {
    counter: AtomicI64,
    callers: AtomicI64,
    known: AtomicBool,
    stop: AtomicBool,
}

impl PgProbe {
    fn start(config: postgres::Config, own_writes: Arc<AtomicI64>) -> Result<PgProbe, StoreError> {
        let shared = Arc::new(ProbeShared { counter: AtomicI64::new(0), callers: AtomicI64::new(0), known: AtomicBool::new(false), stop: AtomicBool::new(false) });
        // The first reading is made here, so that a probe that cannot read fails its creation.
        let mut client = config.connect(NoTls).map_err(|e| StoreError::db("open the change probe")(pg_error(&e)))?;
        listen_and_read(&mut client, &shared).map_err(StoreError::db("open the change probe"))?;
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("kms-store-probe".into())
            .spawn(move || follow(config, client, &thread_shared))
            .map_err(|source| StoreError::Io { op: "start the change probe for", path: PathBuf::from("postgres"), source })?;
        Ok(PgProbe { shared, own_writes })
    }

    pub(super) fn callers_version(&self) -> Option<i64> {
        self.shared.known.load(Ordering::Acquire).then(|| self.shared.callers.load(Ordering::Acquire))
    }

    pub(super) fn version(&self) -> Option<(i64, i64)> {
        let own = self.own_writes.load(Ordering::Acquire);
        self.shared.known.load(Ordering::Acquire).then(|| (own, self.shared.counter.load(Ordering::Acquire)))
    }
}

impl Drop for PgProbe {
    fn drop(&mut self) {
        // The thread sees it within one PROBE_POLL and ends.
        self.shared.stop.store(true, Ordering::Release);
    }
}

fn listen_and_read(client: &mut Client, shared: &ProbeShared) -> Result<(), DbError> {
    client.batch_execute(&format!("LISTEN {KEY_CHANNEL}")).map_err(|e| pg_error(&e))?;
    read_counter(client, shared)
}

fn read_counter(client: &mut Client, shared: &ProbeShared) -> Result<(), DbError> {
    let row = client
        .query_one(
            "SELECT (SELECT counter FROM key_changes WHERE only_row = 1), (SELECT counter FROM caller_changes WHERE only_row = 1)",
            &[],
        )
        .map_err(|e| pg_error(&e))?;
    let counter: i64 = row.try_get(0).map_err(|e| pg_error(&e))?;
    let callers: i64 = row.try_get(1).map_err(|e| pg_error(&e))?;
    shared.counter.store(counter, Ordering::Release);
    shared.callers.store(callers, Ordering::Release);
    shared.known.store(true, Ordering::Release);
    Ok(())
}

/// The probe thread: waits for notifications (or [`PROBE_POLL`]), reads the counter, and when the
/// connection fails marks the version unknown and connects again.
fn follow(config: postgres::Config, mut client: Client, shared: &ProbeShared) {
    loop {
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            // Wait for one notification or the poll period; drain what else arrived, then read.
            let waited = client.notifications().timeout_iter(PROBE_POLL).next().map(|_| ());
            let drained = waited.and_then(|()| {
                let mut notifications = client.notifications();
                let mut pending = notifications.iter();
                while pending.next()?.is_some() {}
                Ok(())
            });
            let result = drained.map_err(|e| pg_error(&e)).and_then(|()| read_counter(&mut client, shared));
            if let Err(e) = result {
                shared.known.store(false, Ordering::Release);
                tracing::warn!(error = %e, "the store's change probe lost its connection; keys are read from the store until it is back");
                break;
            }
        }
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(PROBE_POLL);
            match config.connect(NoTls) {
                Ok(mut c) => match listen_and_read(&mut c, shared) {
                    Ok(()) => {
                        tracing::info!("the store's change probe is connected again");
                        client = c;
                        break;
                    }
                    Err(_) => continue,
                },
                Err(_) => continue,
            }
        }
    }
}

/// The schema of a PostgreSQL store: one step that creates the current schema (version 6, the
/// SQLite schema's current version, with the same tables, columns and rules) on an empty
/// database; later versions add one step to both backends' lists. Text columns compare bytewise
/// (`COLLATE "C"`), as SQLite's do, so listings are ordered alike.
const PG_SCHEMA_V6: &str = r#"
CREATE TABLE schema_version (
    only_row BIGINT NOT NULL PRIMARY KEY CHECK (only_row = 1),
    version  BIGINT NOT NULL
);
CREATE TABLE keys (
    id                   BYTEA  NOT NULL PRIMARY KEY,
    name                 TEXT   COLLATE "C" NOT NULL UNIQUE,
    classification       BIGINT NOT NULL,
    purpose              TEXT   COLLATE "C" NOT NULL,
    state                TEXT   COLLATE "C" NOT NULL,
    primary_version      BIGINT NOT NULL,
    rotation_period_days BIGINT NOT NULL,
    created_at           BIGINT NOT NULL,
    revision             BIGINT NOT NULL DEFAULT 1,
    rotated_at           BIGINT NOT NULL DEFAULT 0,
    destroy_at           BIGINT,
    row_mac              BYTEA
);
CREATE TABLE key_versions (
    key_id     BYTEA  NOT NULL REFERENCES keys(id) ON DELETE RESTRICT,
    version    BIGINT NOT NULL,
    object_id  BYTEA  NOT NULL UNIQUE,
    state      TEXT   COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    destroy_at BIGINT,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE approvals (
    id           BYTEA  NOT NULL PRIMARY KEY,
    key_id       BYTEA  NOT NULL REFERENCES keys(id) ON DELETE RESTRICT,
    action       TEXT   COLLATE "C" NOT NULL,
    version      BIGINT NOT NULL,
    requested_by TEXT   COLLATE "C" NOT NULL,
    requested_at BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    state        TEXT   COLLATE "C" NOT NULL,
    decided_by   TEXT   COLLATE "C",
    decided_at   BIGINT,
    row_mac      BYTEA  NOT NULL
);
CREATE INDEX approvals_by_state ON approvals (state, requested_at);
CREATE TABLE callers (
    identity       TEXT   COLLATE "C" NOT NULL PRIMARY KEY,
    agency         TEXT   COLLATE "C" NOT NULL,
    name           TEXT   COLLATE "C" NOT NULL,
    system_level   BIGINT NOT NULL,
    clearance      BIGINT NOT NULL,
    roles          TEXT   COLLATE "C" NOT NULL,
    allowed_keys   TEXT   COLLATE "C" NOT NULL,
    active         BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    revision       BIGINT NOT NULL,
    row_mac        BYTEA  NOT NULL,
    recipient_keys TEXT   COLLATE "C" NOT NULL DEFAULT ''
);
CREATE TABLE object_intents (
    object_id  BYTEA  NOT NULL PRIMARY KEY,
    key_id     BYTEA  NOT NULL,
    version    BIGINT NOT NULL,
    request_id TEXT   COLLATE "C" NOT NULL,
    audit_seq  BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    row_mac    BYTEA  NOT NULL
);
CREATE TABLE audit_anchor (
    only_row BIGINT NOT NULL PRIMARY KEY CHECK (only_row = 1),
    trail_id BYTEA  NOT NULL,
    seq      BIGINT NOT NULL,
    hash     BYTEA  NOT NULL,
    time_ms  BIGINT NOT NULL,
    row_mac  BYTEA  NOT NULL
);
CREATE TABLE requests (
    id            BYTEA  NOT NULL PRIMARY KEY,
    kind          TEXT   COLLATE "C" NOT NULL,
    subject       TEXT   COLLATE "C" NOT NULL,
    payload       BYTEA  NOT NULL,
    base_revision BIGINT NOT NULL,
    level         BIGINT NOT NULL,
    requested_by  TEXT   COLLATE "C" NOT NULL,
    requested_at  BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    state         TEXT   COLLATE "C" NOT NULL,
    decided_by    TEXT   COLLATE "C",
    decided_at    BIGINT,
    row_mac       BYTEA  NOT NULL
);
CREATE INDEX requests_by_state ON requests (state, requested_at);
CREATE TABLE key_changes (
    only_row BIGINT NOT NULL PRIMARY KEY CHECK (only_row = 1),
    counter  BIGINT NOT NULL
);
INSERT INTO key_changes (only_row, counter) VALUES (1, 0);
CREATE FUNCTION kms_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE key_changes SET counter = counter + 1 WHERE only_row = 1;
    PERFORM pg_notify('kms_key_changes', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keys
    FOR EACH STATEMENT EXECUTE FUNCTION kms_key_changed();
CREATE TRIGGER versions_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON key_versions
    FOR EACH STATEMENT EXECUTE FUNCTION kms_key_changed();
"#;

/// The schema version [`PG_SCHEMA_V6`] creates.
const PG_BASE_VERSION: i64 = 6;

/// Steps after the base, in order: `PG_MIGRATIONS[i]` takes version `PG_BASE_VERSION + i` to the
/// next, as the SQLite list's step of the same number does.
const PG_MIGRATIONS: &[&str] = &[
    // 6 -> 7: an audit anchor per server, and the caller change counter (see schema.rs).
    r#"
CREATE TABLE audit_anchors (
    server   TEXT   COLLATE "C" NOT NULL PRIMARY KEY,
    trail_id BYTEA  NOT NULL,
    seq      BIGINT NOT NULL,
    hash     BYTEA  NOT NULL,
    time_ms  BIGINT NOT NULL,
    row_mac  BYTEA  NOT NULL
);
INSERT INTO audit_anchors (server, trail_id, seq, hash, time_ms, row_mac)
    SELECT '', trail_id, seq, hash, time_ms, row_mac FROM audit_anchor;
DROP TABLE audit_anchor;
CREATE TABLE caller_changes (
    only_row BIGINT NOT NULL PRIMARY KEY CHECK (only_row = 1),
    counter  BIGINT NOT NULL
);
INSERT INTO caller_changes (only_row, counter) VALUES (1, 0);
CREATE FUNCTION kms_caller_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE caller_changes SET counter = counter + 1 WHERE only_row = 1;
    PERFORM pg_notify('kms_key_changes', 'callers');
    RETURN NULL;
END
$$;
CREATE TRIGGER callers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON callers
    FOR EACH STATEMENT EXECUTE FUNCTION kms_caller_changed();
"#,
    // 7 -> 8: the server that made a creation intent (see schema.rs).
    r#"ALTER TABLE object_intents ADD COLUMN server TEXT COLLATE "C" NOT NULL DEFAULT '';"#,
    // 8 -> 9: idempotent key creation (see schema.rs).
    r#"
CREATE TABLE idempotency (
    caller       TEXT   COLLATE "C" NOT NULL,
    idem_key     TEXT   COLLATE "C" NOT NULL,
    rpc          TEXT   COLLATE "C" NOT NULL,
    request_hash BYTEA  NOT NULL,
    key_id       BYTEA  NOT NULL,
    created_at   BIGINT NOT NULL,
    row_mac      BYTEA  NOT NULL,
    PRIMARY KEY (caller, idem_key)
);
"#,
];

/// Brings the database to [`super::SUPPORTED_SCHEMA_VERSION`] in one transaction, or refuses it.
/// Servers starting together take turns (a transaction-scoped advisory lock).
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let fail = |op| move |e: postgres::Error| StoreError::db(op)(pg_error(&e));
    let supported = super::SUPPORTED_SCHEMA_VERSION;
    debug_assert_eq!(PG_BASE_VERSION + PG_MIGRATIONS.len() as i64, supported);
    let mut tx = client.transaction().map_err(fail("begin schema migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).map_err(fail("lock schema migration"))?;
    let has_version: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = 'schema_version')",
            &[],
        )
        .and_then(|r| r.try_get(0))
        .map_err(fail("read schema version"))?;
    let found = if has_version {
        let rows = tx.query("SELECT version FROM schema_version", &[]).map_err(fail("read schema version"))?;
        match rows.as_slice() {
            [row] => row.try_get::<_, i64>(0).map_err(fail("read schema version"))?,
            _ => return Err(StoreError::CorruptSchema { what: "schema_version must hold exactly one row" }),
        }
    } else {
        let tables: i64 = tx
            .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()", &[])
            .and_then(|r| r.try_get(0))
            .map_err(fail("read schema version"))?;
        if tables != 0 {
            return Err(StoreError::CorruptSchema {
                what: "the database has tables but no schema_version: not a key store (give the store a database of its own)",
            });
        }
        tx.batch_execute(PG_SCHEMA_V6).map_err(fail("create schema"))?;
        tx.execute("INSERT INTO schema_version (only_row, version) VALUES (1, $1)", &[&PG_BASE_VERSION])
            .map_err(fail("record schema version"))?;
        tracing::info!(to = PG_BASE_VERSION, "created the key store's schema in PostgreSQL");
        PG_BASE_VERSION
    };
    if found > supported {
        return Err(StoreError::UnknownSchemaVersion { found, supported });
    }
    if found < PG_BASE_VERSION {
        return Err(StoreError::CorruptSchema { what: "a PostgreSQL key store older than schema version 6 cannot exist: the version row was edited" });
    }
    for (i, step) in PG_MIGRATIONS.iter().enumerate().skip(usize::try_from(found - PG_BASE_VERSION).unwrap_or(0)) {
        tx.batch_execute(step).map_err(fail("migrate schema"))?;
        tracing::info!(from = PG_BASE_VERSION + i as i64, to = PG_BASE_VERSION + i as i64 + 1, "key store schema migrated");
    }
    tx.execute("UPDATE schema_version SET version = $1", &[&supported]).map_err(fail("record schema version"))?;
    tx.commit().map_err(fail("commit schema migration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_outside_quotes() {
        assert_eq!(renumber("SELECT a FROM t WHERE b = ?1 AND c = '?' AND d = ?12"), "SELECT a FROM t WHERE b = $1 AND c = '?' AND d = $12");
    }

    #[test]
    fn a_password_in_the_url_is_refused_and_never_shown() {
        let options = PgOptions { url: "postgres://kms:hunter2@db/kms".into(), password_file: None, pool_size: 2 };
        assert!(!format!("{options:?}").contains("hunter2"));
        let err = options.config().unwrap_err().to_string();
        assert!(err.contains("password_file"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
