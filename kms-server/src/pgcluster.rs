//! A disposable PostgreSQL cluster for tests and for the development command: `initdb` into a
//! directory, a `postgres` server that listens only on a Unix socket in that directory, databases
//! created from a template in a fraction of a second, and a stop that leaves nothing running.
//!
//! Why: the store's PostgreSQL tests need a real server, and one shared system cluster would make
//! test runs depend on each other and on whatever else the machine runs. A private cluster costs
//! about 1.2 s to start (`initdb --no-sync` is most of it); a database per test costs about
//! 0.1 s. Within one test run, tests can share one cluster: `scripts/pg-cluster start DIR` starts
//! one and prints its socket directory; put that in `KMS_TEST_PG` and
//! [`PgCluster::shared_or_start`] attaches to it instead of starting its own.
//!
//! Layout of the directory given to [`PgCluster::start`]:
//!
//! | path | what |
//! |---|---|
//! | `data/` | the cluster (`initdb` on first start, reused after), superuser role `kms`, trust auth |
//! | `socket/` | the server's only listening socket, `.s.PGSQL.5432` |
//! | `postgres.log` | the server's log (appended to) |
//!
//! `initdb` refuses to run as root, so when the effective uid is 0 every PostgreSQL program runs as
//! the `postgres` system user (through `setpriv`, which execs, or else `runuser`), and `data/` and
//! `socket/` are owned by that user. The server is stopped by the pid in `data/postmaster.pid`,
//! checked to be the process this handle started (and, by its start time, not a later process that
//! reused the pid).
//!
//! **Never** for anything but tests and development: authentication is `trust` for every role, so
//! anyone who can reach the socket is the superuser; there is no TCP listener at all. The server
//! runs with `fsync=on` and `synchronous_commit=on` because the store relies on durable commits;
//! never turn them off here to make tests faster. Never stops a process by name or pattern: only the
//! postmaster this handle started, by pid. Std only: no external crates.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The port in the socket's name (`.s.PGSQL.5432`). Fixed: the socket directory is private, so
/// clusters never collide on it.
pub const PORT: u16 = 5432;
/// The superuser role `initdb` creates; every connection uses it.
pub const SUPERUSER: &str = "kms";
/// Environment variable naming the socket directory of an already running cluster to share (see
/// [`PgCluster::from_env`]).
pub const SHARED_ENV: &str = "KMS_TEST_PG";
/// Longest database name [`PgCluster::create_database`] accepts.
pub const MAX_NAME: usize = 48;
/// Longest prefix [`PgCluster::unique_database`] accepts (the rest of the name is pid, counter and
/// time).
pub const MAX_PREFIX: usize = 20;

const SOCKET_FILE: &str = ".s.PGSQL.5432";
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// After SIGKILL, and for the `runuser` wrapper to exit after its postmaster.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);
/// How much of a log or of a program's output an error message carries.
const TAIL_BYTES: usize = 2000;
/// Where Debian puts each major version's programs (`/usr/lib/postgresql/15/bin`).
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";
/// libpq environment variables that would redirect or alter our own `psql`/`pg_isready`/`initdb`.
const PG_ENV: &[&str] =
    &["PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGOPTIONS", "PGDATA"];

/// What went wrong starting, using or stopping a cluster; the message says what failed and, where
/// it can, how to fix it. Carries no secrets (there are none: authentication is `trust`).
#[derive(Debug)]
pub struct PgClusterError(String);

impl fmt::Display for PgClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PgClusterError {}

fn err<T>(message: impl Into<String>) -> Result<T, PgClusterError> {
    Err(PgClusterError(message.into()))
}

/// A running PostgreSQL cluster reached through the Unix socket in [`PgCluster::socket_dir`].
///
/// Either owns its server (from [`PgCluster::start`]: [`PgCluster::stop`] and drop stop it) or
/// only uses one started elsewhere (from [`PgCluster::attach`] or `KMS_TEST_PG`: stop and drop do
/// nothing to it).
#[derive(Debug)]
pub struct PgCluster {
    socket_dir: PathBuf,
    /// `socket_dir` as text, for connection strings (checked to be UTF-8 when the handle is made).
    socket_text: String,
    bin: PathBuf,
    runner: Runner,
    owned: Option<Owned>,
}

impl PgCluster {
    /// Starts a private cluster in `dir` (created if missing) and waits, at most 30 s, until it
    /// accepts connections. Runs `initdb` into `dir/data` the first time; a later start reuses the
    /// cluster there. The directory's path must be short enough for a Unix socket (`dir` at most
    /// about 80 bytes) and, when running as root, reachable by the `postgres` user (every directory
    /// above it searchable; `dir` itself is made searchable, `o+x`, if it is not).
    pub fn start(dir: &Path) -> Result<PgCluster, PgClusterError> {
        Self::start_as(dir, Runner::detect()?)
    }

    /// A handle on the cluster started elsewhere (by `scripts/pg-cluster`) whose socket directory
    /// is `socket_dir`. It does not own the server: [`PgCluster::stop`] and drop leave it running.
    pub fn attach(socket_dir: &Path) -> Result<PgCluster, PgClusterError> {
        let bin = find_bin_dir()?;
        let runner = Runner::detect()?;
        let socket_dir = socket_dir.canonicalize().map_err(|e| {
            PgClusterError(format!(
                "no PostgreSQL socket directory {}: {e}: start a cluster with `scripts/pg-cluster start DIR` and use the directory it prints",
                socket_dir.display()
            ))
        })?;
        let socket_text = utf8_path(&socket_dir)?;
        let cluster = PgCluster { socket_dir, socket_text, bin, runner, owned: None };
        if !cluster.socket_file().exists() || !cluster.is_ready() {
            return err(format!(
                "no PostgreSQL accepts connections on {}: start one with `scripts/pg-cluster start DIR` and use the directory it prints",
                cluster.socket_file().display()
            ));
        }
        Ok(cluster)
    }

    /// The shared cluster named by `KMS_TEST_PG` (a socket directory printed by
    /// `scripts/pg-cluster start`), if that variable is set and not empty; `None` if it is not set.
    /// An error if it is set but nothing accepts connections there: a test run that meant to share
    /// a cluster must not silently start its own.
    pub fn from_env() -> Result<Option<PgCluster>, PgClusterError> {
        match std::env::var_os(SHARED_ENV) {
            Some(dir) if !dir.is_empty() => Self::attach(Path::new(&dir))
                .map(Some)
                .map_err(|e| PgClusterError(format!("{SHARED_ENV}={}: {e}", Path::new(&dir).display()))),
            _ => Ok(None),
        }
    }

    /// For tests: the shared cluster from `KMS_TEST_PG` if set (see [`PgCluster::from_env`]), else
    /// a private one started in `private_dir` (see [`PgCluster::start`]). Either way, give each test
    /// its own database with [`PgCluster::unique_database`].
    pub fn shared_or_start(private_dir: &Path) -> Result<PgCluster, PgClusterError> {
        match Self::from_env()? {
            Some(shared) => Ok(shared),
            None => Self::start(private_dir),
        }
    }

    /// The directory holding the server's socket (`.s.PGSQL.5432`): libpq's and rust-postgres's
    /// `host` for this cluster.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The pid of the postmaster this handle started and will stop; `None` for an attached
    /// (shared) cluster or once stopped.
    pub fn postmaster_pid(&self) -> Option<u32> {
        self.owned.as_ref().and_then(|o| o.postmaster).map(|p| p.pid)
    }

    /// Key=value connection string for `database`, e.g.
    /// `host=/tmp/x/socket port=5432 user=kms dbname=keys`: what `postgres::Config::from_str`,
    /// `postgres::Client::connect` and libpq (`psql "…"`) take. The `host` is a directory, which
    /// both read as a Unix socket directory. Values are quoted when they need to be.
    pub fn conninfo(&self, database: &str) -> String {
        format!(
            "host={} port={PORT} user={SUPERUSER} dbname={}",
            conninfo_value(&self.socket_text),
            conninfo_value(database)
        )
    }

    /// URL form of [`PgCluster::conninfo`]:
    /// `postgresql://kms@/keys?host=/tmp/x/socket&port=5432`. The socket directory goes in the
    /// `host` query parameter, which both libpq and rust-postgres (checked: tokio-postgres 0.7.18's
    /// URL parser) read as a socket directory; the authority part stays empty so that no TCP host
    /// is added beside it. Prefer `conninfo` where either will do.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}@/{}?host={}&port={PORT}",
            percent_encode(database.as_bytes(), b""),
            percent_encode(self.socket_text.as_bytes(), b"/")
        )
    }

    /// Creates database `name`, copied from `template` (PostgreSQL's `template1` if `None`).
    /// Names are 1 to 48 of `a-z`, `0-9`, `_`; anything else is refused before PostgreSQL sees it.
    /// The template must have no open connections while it is copied (PostgreSQL waits up to 5 s
    /// for them to close, then refuses): close a template's pool before creating databases from it.
    pub fn create_database(&self, name: &str, template: Option<&str>) -> Result<(), PgClusterError> {
        check_name("database", name)?;
        let sql = match template {
            Some(t) => {
                check_name("template", t)?;
                format!("CREATE DATABASE \"{name}\" TEMPLATE \"{t}\"")
            }
            None => format!("CREATE DATABASE \"{name}\""),
        };
        let out = self.psql("postgres", &sql)?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("being accessed by other users") {
            ": close every connection to the template first (PostgreSQL copies only a template nobody uses)"
        } else {
            ""
        };
        err(format!(
            "could not create database {name}{}: psql {}: {}{hint}",
            template.map(|t| format!(" from template {t}")).unwrap_or_default(),
            out.status,
            tail(stderr.trim(), TAIL_BYTES)
        ))
    }

    /// Creates the database `name` unless it exists (for a development cluster that is reused).
    pub fn ensure_database(&self, name: &str) -> Result<(), PgClusterError> {
        check_name("database", name)?;
        let out = self.psql("postgres", &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"))?;
        if out.status.success() && String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == "1") {
            return Ok(());
        }
        self.create_database(name, None)
    }

    /// Creates a database no other test has (its name is `prefix`, the pid, a per-process counter
    /// and the time) from `template1` and returns its name. `prefix` is 1 to 20 of `a-z`, `0-9`,
    /// `_`.
    pub fn unique_database(&self, prefix: &str) -> Result<String, PgClusterError> {
        self.unique_database_from(prefix, None)
    }

    /// [`PgCluster::unique_database`] copied from `template` (e.g. a database a test run migrated
    /// once; copying it is faster than migrating again).
    pub fn unique_database_from(&self, prefix: &str, template: Option<&str>) -> Result<String, PgClusterError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        if prefix.len() > MAX_PREFIX {
            return err(format!(
                "refusing database prefix {:?}: at most {MAX_PREFIX} bytes",
                tail(prefix, 64)
            ));
        }
        check_name("database prefix", prefix)?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let name = format!("{prefix}_{}_{n}_{}", std::process::id(), base36(nanos));
        self.create_database(&name, template)?;
        Ok(name)
    }

    /// Stops the server this handle started: SIGINT (PostgreSQL's fast shutdown: rolls back open
    /// transactions, checkpoints, removes its socket), then SIGKILL if it is still there after
    /// 10 s. Waits until the postmaster is gone and reaps our child. Does nothing for an attached
    /// cluster or a second time.
    pub fn stop(&mut self) -> Result<(), PgClusterError> {
        match self.owned.take() {
            Some(mut owned) => owned.shut_down(&self.socket_dir),
            None => Ok(()),
        }
    }

    fn start_as(dir: &Path, runner: Runner) -> Result<PgCluster, PgClusterError> {
        let bin = find_bin_dir()?;
        fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
        let dir = dir.canonicalize().map_err(|e| io_error("resolve", dir, e))?;
        let data = dir.join("data");
        let socket_dir = dir.join("socket");
        let socket_text = utf8_path(&socket_dir)?;
        let socket_file_len = socket_text.len() + 1 + SOCKET_FILE.len();
        if socket_file_len > MAX_SOCKET_PATH {
            return err(format!(
                "{}/{SOCKET_FILE} is {socket_file_len} bytes, longer than a Unix socket path may be ({MAX_SOCKET_PATH}): use a shorter directory (e.g. under /tmp)",
                socket_text
            ));
        }
        if socket_dir.join(SOCKET_FILE).exists() && is_ready(&runner, &bin, &socket_dir) {
            // Starting would only find the running server's lock; worse, its socket would answer
            // our readiness check.
            return err(format!(
                "a PostgreSQL is already running on {}/{SOCKET_FILE}: stop it first (`scripts/pg-cluster stop {}` if that started it) or use PgCluster::attach",
                socket_text,
                dir.display()
            ));
        }
        for d in [&data, &socket_dir] {
            fs::create_dir_all(d).map_err(|e| io_error("create", d, e))?;
        }
        if let Some(user) = runner.user() {
            // The postgres user must be able to pass through `dir` to reach its two directories.
            let mode = fs::metadata(&dir).map_err(|e| io_error("inspect", &dir, e))?.permissions().mode();
            if mode & 0o001 == 0 {
                fs::set_permissions(&dir, fs::Permissions::from_mode(mode | 0o001))
                    .map_err(|e| io_error("make searchable", &dir, e))?;
            }
            for d in [&data, &socket_dir] {
                std::os::unix::fs::chown(d, Some(user.uid), Some(user.gid))
                    .map_err(|e| io_error("give the postgres user", d, e))?;
            }
            let probe = runner
                .command(Path::new("test"))
                .arg("-w")
                .arg(&data)
                .arg("-a")
                .arg("-w")
                .arg(&socket_dir)
                .output()
                .map_err(|e| PgClusterError(format!("could not run `test` as the postgres user: {e}")))?;
            if !probe.status.success() {
                return err(format!(
                    "the postgres user cannot reach {}: every directory above it must be searchable by others (o+x); use a directory under /tmp",
                    dir.display()
                ));
            }
        }
        if !data.join("PG_VERSION").exists() {
            let not_empty = fs::read_dir(&data).map_err(|e| io_error("read", &data, e))?.next().is_some();
            if not_empty {
                return err(format!(
                    "{} is neither empty nor a PostgreSQL cluster (no PG_VERSION): remove it or use another directory",
                    data.display()
                ));
            }
            let out = runner
                .command(&bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["--no-sync", "-A", "trust", "-U", SUPERUSER, "--encoding=UTF8", "--locale=C"])
                .output()
                .map_err(|e| PgClusterError(format!("could not run {}: {e}", bin.join("initdb").display())))?;
            if !out.status.success() {
                return err(format!(
                    "initdb {} failed ({}): {}",
                    data.display(),
                    out.status,
                    tail(&output_text(&out), TAIL_BYTES)
                ));
            }
        }
        let log_path = dir.join("postgres.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io_error("open", &log_path, e))?;
        let log2 = log.try_clone().map_err(|e| io_error("open", &log_path, e))?;
        let child = runner
            .command(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&socket_dir)
            .arg("-p")
            .arg(PORT.to_string())
            .args(["-c", "listen_addresses="])
            .args(["-c", "unix_socket_permissions=0777"])
            .args(["-c", "fsync=on"])
            .args(["-c", "synchronous_commit=on"])
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(|e| PgClusterError(format!("could not run {}: {e}", bin.join("postgres").display())))?;
        // `setpriv` and a direct run exec postgres, so our child is the postmaster; `runuser` stays
        // as its parent, and the postmaster's pid comes from postmaster.pid once it is written.
        let via_runuser = matches!(runner, Runner::Runuser(_));
        let postmaster = if via_runuser { None } else { Proc::of(child.id()) };
        let owned = Owned { data, log: log_path, child, reaped: false, via_runuser, postmaster };
        let mut cluster = PgCluster { socket_dir, socket_text, bin, runner, owned: Some(owned) };
        match cluster.wait_ready() {
            Ok(()) => Ok(cluster),
            Err(e) => {
                let _ = cluster.stop();
                Err(e)
            }
        }
    }

    /// Polls until the server accepts connections, it exits, or 30 s pass; then learns (runuser)
    /// or checks (otherwise) the postmaster's pid from postmaster.pid.
    fn wait_ready(&mut self) -> Result<(), PgClusterError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let owned = self.owned.as_mut().expect("wait_ready on an owned cluster");
            if let Some(status) = owned.try_reap() {
                return err(format!(
                    "postgres exited ({status}) before accepting connections; the end of {}:\n{}",
                    owned.log.display(),
                    log_tail(&owned.log)
                ));
            }
            if self.socket_file().exists() && self.is_ready() {
                break;
            }
            if Instant::now() > deadline {
                let owned = self.owned.as_ref().expect("owned");
                return err(format!(
                    "postgres did not accept connections on {} within {} s; the end of {}:\n{}",
                    self.socket_file().display(),
                    START_TIMEOUT.as_secs(),
                    owned.log.display(),
                    log_tail(&owned.log)
                ));
            }
            sleep(POLL);
        }
        let owned = self.owned.as_mut().expect("owned");
        let pid_file = owned.data.join("postmaster.pid");
        let pid = read_pid_file(&pid_file)?;
        let child = owned.child.id();
        if owned.via_runuser {
            match Proc::of(pid) {
                Some(p) if Proc::parent_of(pid) == Some(child) => owned.postmaster = Some(p),
                _ => {
                    return err(format!(
                        "{} names pid {pid}, which is not the postgres started by runuser (pid {child})",
                        pid_file.display()
                    ))
                }
            }
        } else if pid != child {
            return err(format!(
                "{} names pid {pid}, not the postgres this handle started (pid {child})",
                pid_file.display()
            ));
        }
        Ok(())
    }

    fn socket_file(&self) -> PathBuf {
        self.socket_dir.join(SOCKET_FILE)
    }

    fn is_ready(&self) -> bool {
        is_ready(&self.runner, &self.bin, &self.socket_dir)
    }

    /// Runs one SQL command with psql as the superuser, stopping at the first error.
    fn psql(&self, database: &str, sql: &str) -> Result<Output, PgClusterError> {
        self.runner
            .command(&self.bin.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(PORT.to_string())
            .args(["-U", SUPERUSER, "-d", database, "-c", sql])
            .output()
            .map_err(|e| PgClusterError(format!("could not run {}: {e}", self.bin.join("psql").display())))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// For tests: the run's shared cluster (`KMS_TEST_PG`, see [`PgCluster::from_env`]), or a private
/// one in a new directory under the system's temporary directory, which is stopped and removed
/// when this is dropped. Give each test its own database with [`PgCluster::unique_database`].
#[derive(Debug)]
pub struct TestCluster {
    cluster: PgCluster,
    private_dir: Option<PathBuf>,
}

impl TestCluster {
    /// `prefix` names the private directory (`<tmp>/<prefix>-<pid>-<n>`).
    pub fn get(prefix: &str) -> Result<TestCluster, PgClusterError> {
        if let Some(cluster) = PgCluster::from_env()? {
            return Ok(TestCluster { cluster, private_dir: None });
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        match PgCluster::start(&dir) {
            Ok(cluster) => Ok(TestCluster { cluster, private_dir: Some(dir) }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }
}

impl TestCluster {
    /// A private cluster of the caller's own even when the run shares one (a test that stops and
    /// restarts PostgreSQL must not do it to everyone's).
    pub fn private(prefix: &str) -> Result<TestCluster, PgClusterError> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-own-{}-{n}", std::process::id()));
        match PgCluster::start(&dir) {
            Ok(cluster) => Ok(TestCluster { cluster, private_dir: Some(dir) }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Stops a private cluster's server (its data stays; [`TestCluster::start_again`] brings it
    /// back on the same socket). Refused for the shared cluster.
    pub fn stop_server(&mut self) -> Result<(), PgClusterError> {
        if self.private_dir.is_none() {
            return err("refusing to stop the run's shared PostgreSQL cluster: use TestCluster::private".to_owned());
        }
        self.cluster.stop()
    }

    /// Starts a private cluster's server again after [`TestCluster::stop_server`].
    pub fn start_again(&mut self) -> Result<(), PgClusterError> {
        let dir = self.private_dir.clone().ok_or_else(|| PgClusterError("the shared cluster is not this test's to start".to_owned()))?;
        self.cluster = PgCluster::start(&dir)?;
        Ok(())
    }
}

impl std::ops::Deref for TestCluster {
    type Target = PgCluster;
    fn deref(&self) -> &PgCluster {
        &self.cluster
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
        if let Some(dir) = &self.private_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The server process a [`PgCluster`] started and must stop.
#[derive(Debug)]
struct Owned {
    data: PathBuf,
    log: PathBuf,
    /// The postmaster itself, or (`via_runuser`) the `runuser` whose child it is.
    child: Child,
    /// `child` has been waited for: its pid may belong to someone else now.
    reaped: bool,
    via_runuser: bool,
    /// Known from the start (our child is the postmaster) or, via runuser, once it is ready.
    postmaster: Option<Proc>,
}

impl Owned {
    fn try_reap(&mut self) -> Option<ExitStatus> {
        if self.reaped {
            return None;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.reaped = true;
                Some(status)
            }
            _ => None,
        }
    }

    fn shut_down(&mut self, socket_dir: &Path) -> Result<(), PgClusterError> {
        if self.postmaster.is_none() && self.via_runuser {
            self.postmaster = self.find_runuser_postmaster();
        }
        // Without a known postmaster (runuser, before postmaster.pid was written) the one process
        // we are sure is ours is our unreaped child: SIGTERM makes runuser pass SIGTERM on to its
        // child and exit with it.
        let (target, first) = match (self.postmaster, self.reaped) {
            (Some(p), _) => (Some(p), "INT"),
            (None, false) => (Proc::of(self.child.id()), "TERM"),
            (None, true) => (None, "TERM"),
        };
        let mut killed = false;
        if let Some(target) = target {
            if target.is_running() {
                send_signal(target, first)?;
            }
            if !self.wait_gone(target, STOP_TIMEOUT) {
                send_signal(target, "KILL")?;
                killed = true;
                if !self.wait_gone(target, KILL_TIMEOUT) {
                    return err(format!(
                        "postgres (pid {}) is still running after SIGKILL; see {}",
                        target.pid,
                        self.log.display()
                    ));
                }
            }
        }
        // runuser exits once its postmaster has; a direct child is reaped already.
        let deadline = Instant::now() + KILL_TIMEOUT;
        while !self.reaped && self.try_reap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.reaped = true;
                break;
            }
            sleep(POLL);
        }
        if killed {
            // A killed postmaster leaves its socket and lock behind.
            let _ = fs::remove_file(socket_dir.join(SOCKET_FILE));
            let _ = fs::remove_file(socket_dir.join(format!("{SOCKET_FILE}.lock")));
        }
        Ok(())
    }

    /// The postmaster named by postmaster.pid, if it is the child of our runuser.
    fn find_runuser_postmaster(&self) -> Option<Proc> {
        if self.reaped {
            return None;
        }
        let pid = read_pid_file(&self.data.join("postmaster.pid")).ok()?;
        (Proc::parent_of(pid) == Some(self.child.id())).then(|| Proc::of(pid)).flatten()
    }

    /// Waits until `target` has exited (reaping our child meanwhile, so that an exited direct
    /// child does not linger as a zombie); false if it is still there after `limit`.
    fn wait_gone(&mut self, target: Proc, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            self.try_reap();
            if !target.is_running() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            sleep(POLL);
        }
    }
}

/// A process identified by pid and start time (field 22 of `/proc/PID/stat`), so that a pid reused
/// by a later process is never mistaken for it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Proc {
    pid: u32,
    start_time: u64,
}

impl Proc {
    fn of(pid: u32) -> Option<Proc> {
        let (_, _, start_time) = proc_stat(pid)?;
        Some(Proc { pid, start_time })
    }

    fn parent_of(pid: u32) -> Option<u32> {
        proc_stat(pid).map(|(_, ppid, _)| ppid)
    }

    /// Still the same process, and not a zombie.
    fn is_running(&self) -> bool {
        matches!(proc_stat(self.pid), Some((state, _, start)) if start == self.start_time && state != 'Z' && state != 'X')
    }
}

/// State, parent pid and start time of `pid`, from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(char, u32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may itself contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some((state, ppid, start_time))
}

/// Whether a server accepts connections on the socket in `socket_dir` (pg_isready).
fn is_ready(runner: &Runner, bin: &Path, socket_dir: &Path) -> bool {
    runner
        .command(&bin.join("pg_isready"))
        .arg("-q")
        .arg("-h")
        .arg(socket_dir)
        .arg("-p")
        .arg(PORT.to_string())
        .args(["-U", SUPERUSER, "-d", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Sends `signal` with kill(1) (std has no kill(2) for pids that are not our children), after
/// checking once more that `target` is the same process.
fn send_signal(target: Proc, signal: &str) -> Result<(), PgClusterError> {
    if !target.is_running() {
        return Ok(());
    }
    let out = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(target.pid.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PgClusterError(format!("could not run kill (procps or util-linux) to stop postgres: {e}")))?;
    if out.status.success() || !target.is_running() {
        return Ok(());
    }
    err(format!("kill -{signal} {} failed: {}", target.pid, tail(output_text(&out).trim(), TAIL_BYTES)))
}

fn read_pid_file(path: &Path) -> Result<u32, PgClusterError> {
    let text = fs::read_to_string(path).map_err(|e| io_error("read", path, e))?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| PgClusterError(format!("{} does not start with a pid", path.display())))
}

/// The `postgres` system user (from `/etc/passwd`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct PgUser {
    uid: u32,
    gid: u32,
}

/// How PostgreSQL's programs are run: as ourselves, or (as root) as the `postgres` user.
#[derive(Clone, Debug, PartialEq)]
enum Runner {
    Direct,
    /// `setpriv --reuid --regid --init-groups`: execs the program, so a spawned child is it.
    Setpriv(PgUser, PathBuf),
    /// `runuser -u postgres`: stays as the program's parent.
    Runuser(PgUser),
}

impl Runner {
    fn detect() -> Result<Runner, PgClusterError> {
        if !effective_uid_is_root()? {
            return Ok(Runner::Direct);
        }
        let user = postgres_user()?;
        if let Some(setpriv) = find_on_path("setpriv") {
            Ok(Runner::Setpriv(user, setpriv))
        } else if find_on_path("runuser").is_some() {
            Ok(Runner::Runuser(user))
        } else {
            err("running as root, PostgreSQL must run as the postgres user, but neither setpriv nor runuser was found: install util-linux")
        }
    }

    fn user(&self) -> Option<PgUser> {
        match self {
            Runner::Direct => None,
            Runner::Setpriv(u, _) | Runner::Runuser(u) => Some(*u),
        }
    }

    /// `program` ready to run as the right user, from `/` (root's working directory may be
    /// closed to the postgres user), without libpq variables that would point it elsewhere, and
    /// with no input.
    fn command(&self, program: &Path) -> Command {
        let mut c = match self {
            Runner::Direct => Command::new(program),
            Runner::Setpriv(u, setpriv) => {
                let mut c = Command::new(setpriv);
                c.arg(format!("--reuid={}", u.uid))
                    .arg(format!("--regid={}", u.gid))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(program);
                c
            }
            Runner::Runuser(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            }
        };
        c.current_dir("/").stdin(Stdio::null());
        for v in PG_ENV {
            c.env_remove(v);
        }
        c
    }
}

fn effective_uid_is_root() -> Result<bool, PgClusterError> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|e| PgClusterError(format!("could not read /proc/self/status to learn our uid: {e}")))?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| PgClusterError("/proc/self/status has no Uid line".into()))?;
    Ok(euid == "0")
}

fn postgres_user() -> Result<PgUser, PgClusterError> {
    let passwd =
        fs::read_to_string("/etc/passwd").map_err(|e| PgClusterError(format!("could not read /etc/passwd: {e}")))?;
    parse_passwd(&passwd, "postgres").ok_or_else(|| {
        PgClusterError(
            "running as root, PostgreSQL must run as the postgres user, but /etc/passwd has none: install the Debian package postgresql (it creates the user)".into(),
        )
    })
}

fn parse_passwd(passwd: &str, name: &str) -> Option<PgUser> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            Some(PgUser { uid: f[2].parse().ok()?, gid: f[3].parse().ok()? })
        } else {
            None
        }
    })
}

/// The newest `/usr/lib/postgresql/VERSION/bin` that has the programs this module runs, else the
/// directory of an `initdb` on `PATH` (distributions other than Debian).
fn find_bin_dir() -> Result<PathBuf, PgClusterError> {
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir(DEBIAN_PG_ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name.to_str().and_then(parse_version) else { continue };
            let bin = entry.path().join("bin");
            if is_executable(&bin.join("initdb")) && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, bin));
            }
        }
    }
    let bin = match best {
        Some((_, bin)) => bin,
        None => match find_on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf)) {
            Some(bin) => bin,
            None => {
                return err(format!(
                    "PostgreSQL's initdb was not found under {DEBIAN_PG_ROOT}/*/bin or on PATH: install the Debian package postgresql (apt-get install postgresql)"
                ))
            }
        },
    };
    let missing: Vec<&str> =
        ["postgres", "psql", "pg_isready"].into_iter().filter(|p| !is_executable(&bin.join(p))).collect();
    if !missing.is_empty() {
        return err(format!(
            "{} has initdb but not {}: reinstall the Debian package postgresql",
            bin.display(),
            missing.join(", ")
        ));
    }
    Ok(bin)
}

/// `15` → `[15]`, `9.6` → `[9, 6]`; anything else is not a version directory.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|p| p.parse().ok()).collect()
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| is_executable(p))
}

/// Database, template and prefix names: 1 to 48 of `a-z`, `0-9`, `_`, so that they need no quoting
/// beyond the double quotes around them and cannot carry SQL.
fn check_name(what: &str, name: &str) -> Result<(), PgClusterError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        return Ok(());
    }
    err(format!(
        "refusing {what} name {:?}: use 1 to {MAX_NAME} of a-z, 0-9 and _",
        tail(name, 64)
    ))
}

fn utf8_path(path: &Path) -> Result<String, PgClusterError> {
    path.to_str().map(str::to_owned).ok_or_else(|| {
        PgClusterError(format!("{} is not UTF-8: use a UTF-8 path for a PostgreSQL cluster", path.display()))
    })
}

/// A libpq/rust-postgres connection-string value, single-quoted (with `\` escapes) if it is empty
/// or has whitespace, a quote or a backslash.
fn conninfo_value(value: &str) -> String {
    if !value.is_empty() && !value.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\') {
        return value.to_owned();
    }
    let mut out = String::from("'");
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Percent-encodes all but ASCII letters, digits, `-._~` and the bytes in `keep`.
fn percent_encode(bytes: &[u8], keep: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn base36(mut n: u128) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII digits")
}

/// The last `max` bytes of `s` (cut at a character boundary), control characters but newlines and
/// tabs replaced, so that an error message stays short and cannot forge a log line of its own.
fn tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    let cut: String =
        s[start..].chars().map(|c| if c.is_control() && c != '\n' && c != '\t' { '?' } else { c }).collect();
    if start > 0 {
        format!("…{cut}")
    } else {
        cut
    }
}

fn log_tail(log: &Path) -> String {
    match fs::read(log) {
        Ok(bytes) => tail(String::from_utf8_lossy(&bytes).trim_end(), TAIL_BYTES),
        Err(e) => format!("(could not read it: {e})"),
    }
}

fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn io_error(doing: &str, path: &Path, e: std::io::Error) -> PgClusterError {
    PgClusterError(format!("could not {doing} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, short directory under the system temp dir (Unix socket paths are short), removed
    /// on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir()
                .join(format!("pgc-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// `select current_database()` through psql run as ourselves (as root: root reaching the
    /// postgres-owned socket, as the server's own code will) with `target` as the connection string.
    fn current_database(bin: &Path, target: &str) -> String {
        let out = Command::new(bin.join("psql"))
            .args(["-X", "-qAt", "-v", "ON_ERROR_STOP=1", "-c", "select 1, current_database()", target])
            .current_dir("/")
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {target}: {}", output_text(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn pid_exists(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn starts_creates_databases_and_stops_leaving_nothing_running() {
        let dir = TempDir::new("main");
        let started = Instant::now();
        let mut pg = PgCluster::start(&dir.0).unwrap();
        eprintln!("cluster started in {:?}", started.elapsed());
        let pid = pg.postmaster_pid().expect("an owned cluster knows its postmaster");
        let socket = pg.socket_dir().join(SOCKET_FILE);
        assert!(socket.exists());
        assert!(pid_exists(pid));

        let created = Instant::now();
        pg.create_database("first", None).unwrap();
        let second = pg.unique_database_from("t", Some("first")).unwrap();
        eprintln!("two databases created in {:?}", created.elapsed());
        assert!(second.starts_with(&format!("t_{}_", std::process::id())), "{second}");

        assert_eq!(current_database(&pg.bin, &pg.conninfo("first")), "1|first");
        assert_eq!(current_database(&pg.bin, &pg.url(&second)), format!("1|{second}"));
        // An existing name is refused by PostgreSQL, and the message says so.
        let e = pg.create_database("first", None).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");

        let stopped = Instant::now();
        pg.stop().unwrap();
        eprintln!("cluster stopped in {:?}", stopped.elapsed());
        assert!(!pid_exists(pid), "postmaster {pid} still exists");
        assert!(!socket.exists(), "{} is still there", socket.display());
        assert_eq!(pg.postmaster_pid(), None);
        pg.stop().unwrap();
    }

    #[test]
    fn a_second_start_reuses_the_cluster_and_drop_stops_it() {
        let dir = TempDir::new("reuse");
        let pid = {
            let mut pg = PgCluster::start(&dir.0).unwrap();
            pg.create_database("kept", None).unwrap();
            pg.stop().unwrap();
            let pg = PgCluster::start(&dir.0).unwrap();
            assert_eq!(current_database(&pg.bin, &pg.conninfo("kept")), "1|kept");
            pg.postmaster_pid().unwrap()
        };
        assert!(!pid_exists(pid), "drop left postmaster {pid} running");
        assert!(!dir.0.join("socket").join(SOCKET_FILE).exists());
    }

    #[test]
    fn a_failed_start_reports_the_log_and_leaves_the_running_cluster_alone() {
        let dir = TempDir::new("twice");
        let mut pg = PgCluster::start(&dir.0).unwrap();
        let pid = pg.postmaster_pid().unwrap();
        let e = PgCluster::start(&dir.0).unwrap_err().to_string();
        assert!(e.contains("already running"), "{e}");
        // Its socket gone (as after a crash: postgres still holds data/postmaster.pid), a second
        // postgres exits at once, and the error shows why from the log.
        fs::rename(pg.socket_dir(), dir.0.join("moved")).unwrap();
        let e = PgCluster::start(&dir.0).unwrap_err().to_string();
        assert!(e.contains("exited") && e.contains("postmaster.pid"), "{e}");
        fs::remove_dir_all(pg.socket_dir()).unwrap();
        fs::rename(dir.0.join("moved"), pg.socket_dir()).unwrap();
        assert!(pid_exists(pid));
        assert_eq!(current_database(&pg.bin, &pg.conninfo("postgres")), "1|postgres");
        pg.stop().unwrap();
        assert!(!pid_exists(pid));
    }

    #[test]
    fn an_attached_cluster_is_used_but_never_stopped() {
        let dir = TempDir::new("attach");
        let mut owner = PgCluster::start(&dir.0).unwrap();
        let pid = owner.postmaster_pid().unwrap();
        {
            let mut shared = PgCluster::attach(owner.socket_dir()).unwrap();
            assert_eq!(shared.postmaster_pid(), None);
            let db = shared.unique_database("shared").unwrap();
            assert_eq!(current_database(&shared.bin, &shared.conninfo(&db)), format!("1|{db}"));
            shared.stop().unwrap();
        }
        assert!(pid_exists(pid));
        assert_eq!(current_database(&owner.bin, &owner.conninfo("postgres")), "1|postgres");
        owner.stop().unwrap();
        assert!(!pid_exists(pid));

        let e = PgCluster::attach(&dir.0.join("socket")).unwrap_err().to_string();
        assert!(e.contains("scripts/pg-cluster start"), "{e}");
    }

    #[test]
    fn through_runuser_the_real_postmaster_is_stopped() {
        let Ok(Runner::Setpriv(user, _)) = Runner::detect() else {
            eprintln!("skipped: not root, or no setpriv (runuser is then the default and tested above)");
            return;
        };
        if find_on_path("runuser").is_none() {
            eprintln!("skipped: no runuser");
            return;
        }
        let dir = TempDir::new("runuser");
        let mut pg = PgCluster::start_as(&dir.0, Runner::Runuser(user)).unwrap();
        let owned = pg.owned.as_ref().unwrap();
        let (pid, wrapper) = (pg.postmaster_pid().unwrap(), owned.child.id());
        assert_ne!(pid, wrapper, "runuser stays as the postmaster's parent");
        assert_eq!(Proc::parent_of(pid), Some(wrapper));
        pg.create_database("via_runuser", None).unwrap();
        pg.stop().unwrap();
        assert!(!pid_exists(pid), "postmaster {pid} still exists");
        assert!(!pid_exists(wrapper), "runuser {wrapper} was not reaped");
        assert!(!dir.0.join("socket").join(SOCKET_FILE).exists());
    }

    fn unstarted() -> PgCluster {
        PgCluster {
            socket_dir: PathBuf::from("/tmp/x y/socket"),
            socket_text: "/tmp/x y/socket".into(),
            bin: PathBuf::from("/nonexistent"),
            runner: Runner::Direct,
            owned: None,
        }
    }

    #[test]
    fn create_database_refuses_bad_names_before_running_anything() {
        let pg = unstarted();
        let long = "a".repeat(MAX_NAME + 1);
        for bad in ["", "Keys", "a-b", "a;drop database x", "x\"y", "ключ", long.as_str()] {
            let e = pg.create_database(bad, None).unwrap_err().to_string();
            assert!(e.starts_with("refusing database name"), "{bad:?}: {e}");
        }
        let e = pg.create_database("ok", Some("bad\"template")).unwrap_err().to_string();
        assert!(e.starts_with("refusing template name"), "{e}");
        let e = pg.unique_database("Bad").unwrap_err().to_string();
        assert!(e.starts_with("refusing database prefix"), "{e}");
        let e = pg.unique_database(&"p".repeat(MAX_PREFIX + 1)).unwrap_err().to_string();
        assert!(e.contains("at most 20 bytes"), "{e}");
        // A name of exactly 48 passes the check and only then fails (no psql in /nonexistent).
        let e = pg.create_database(&"a".repeat(MAX_NAME), None).unwrap_err().to_string();
        assert!(e.contains("could not run"), "{e}");
    }

    #[test]
    fn connection_strings_quote_and_encode_the_socket_dir() {
        let pg = unstarted();
        assert_eq!(pg.conninfo("keys"), "host='/tmp/x y/socket' port=5432 user=kms dbname=keys");
        assert_eq!(pg.url("keys"), "postgresql://kms@/keys?host=/tmp/x%20y/socket&port=5432");
        assert_eq!(conninfo_value("it's"), r"'it\'s'");
        assert_eq!(conninfo_value(""), "''");
    }

    #[test]
    fn helpers_parse_what_the_system_gives() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\npostgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(parse_passwd(passwd, "postgres"), Some(PgUser { uid: 101, gid: 104 }));
        assert_eq!(parse_passwd(passwd, "nobody"), None);
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert!(parse_version("9.6") < parse_version("15"));
        assert_eq!(parse_version("15-old"), None);
        assert_eq!(base36(0), "0");
        assert_eq!(base36(36 * 36 + 35), "10z");
        let me = Proc::of(std::process::id()).unwrap();
        assert!(me.is_running());
        assert!(!Proc { start_time: me.start_time + 1, ..me }.is_running());
        assert_eq!(tail("abcdef", 3), "…def");
        assert_eq!(tail("a\u{1b}b\nc", 100), "a?b\nc");
    }
}
