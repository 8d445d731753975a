//! `kms-server dev`: provisions (first run) or reuses a self-contained development setup in one
//! directory: a SoftHSM token, a dev CA, server and client certificates, a config file and `kmsctl`
//! environment files. Needs nothing but SoftHSM (through `hsm-sim`) and `rcgen`; no network.
//!
//! Layout of the directory (mode 0700):
//!
//! | file | what |
//! |---|---|
//! | `softhsm/` | the SoftHSM token `kms-dev`, its `softhsm2.conf` and PIN files (0600) |
//! | `ca.crt`, `ca.key` | the dev CA (key 0600) |
//! | `server.crt`, `server.key` | `localhost`, 127.0.0.1, ::1 |
//! | `officer.crt/.key` | `urn:kms:caller:dev-officer`: level 5, SECRET, role officer |
//! | `exchange.crt/.key` | `urn:kms:caller:dev-exchange`: level 4, SECRET, role exchange |
//! | `kmsctl.env`, `kmsctl-exchange.env` | `KMS_ENDPOINT`, `KMS_CA`, `KMS_CERT`, `KMS_KEY` |
//! | `config.toml` | written last: its presence means the directory is complete |
//! | `kms.db` | created by the server on first start |
//!
//! **Never** for production: the SoftHSM token is configured as approved up to SECRET, which real
//! SoftHSM does not deserve; the config file and the server log say so.
#![forbid(unsafe_code)]

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hsm_sim::{SimError, SimToken};

use crate::classification::Classification;
use crate::config::{
    CallerSpec, AuditSpec, LifecycleSpec, Config, ConfigError, ConfigSpec, Role, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_PAYLOAD_BYTES,
};
use crate::pki::{write_private, CertificateAuthority, PkiError, Validity};

/// The token label of the dev SoftHSM token.
pub const DEV_TOKEN_LABEL: &str = "kms-dev";
pub const DEV_OFFICER_IDENTITY: &str = "urn:kms:caller:dev-officer";
pub const DEV_EXCHANGE_IDENTITY: &str = "urn:kms:caller:dev-exchange";

const CONFIG: &str = "config.toml";
const OFFICER_ENV: &str = "kmsctl.env";
const EXCHANGE_ENV: &str = "kmsctl-exchange.env";
/// Every file a complete directory holds besides `config.toml` (the store is made by the server).
const EXPECTED: &[&str] = &[
    "softhsm/softhsm2.conf",
    "softhsm/user.pin",
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "officer.crt",
    "officer.key",
    "exchange.crt",
    "exchange.key",
    OFFICER_ENV,
    EXCHANGE_ENV,
];

/// Where things are in a provisioned directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevLayout {
    /// The directory, absolute.
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// `kmsctl.env` for the officer.
    pub officer_env: PathBuf,
    /// `kmsctl-exchange.env` for the exchange service.
    pub exchange_env: PathBuf,
    /// True if this call provisioned the directory, false if it reused it.
    pub created: bool,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    #[error("cannot {op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("SoftHSM token: {0}")]
    Token(#[from] SimError),
    #[error("another kms-server dev is serving {dir}; stop it first, or give this one another --dir")]
    InUse { dir: PathBuf },
    #[error("the development network HSM: {0}")]
    NetworkHsm(#[from] hsm_sim::net::NetHsmError),
    #[error("certificates: {0}")]
    Pki(#[from] PkiError),
    #[error("PostgreSQL for the dev servers: {0}")]
    Postgres(String),
    #[error("{servers} servers from port {first} run past port 65535")]
    Ports { first: u16, servers: u16 },
    #[error("the generated configuration does not load: {0}")]
    Config(#[from] ConfigError),
    #[error(
        "{dir} is half-provisioned: missing {}; remove the directory to provision it again",
        missing.join(", ")
    )]
    Incomplete { dir: PathBuf, missing: Vec<&'static str> },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DevError + 'a {
    move |source| DevError::Io { op, path: path.to_owned(), source }
}

/// Provisions `dir` on first run, or checks and reuses it. `listen` is used only when provisioning;
/// a reused directory keeps the address in its `config.toml`.
pub fn provision(dir: &Path, listen: SocketAddr) -> Result<DevLayout, DevError> {
    if dir.join(CONFIG).is_file() {
        return reuse(dir, listen);
    }
    if dir.exists() {
        let is_empty = fs::read_dir(dir).map_err(io("read", dir))?.next().is_none();
        if !is_empty {
            let mut missing = missing_files(dir);
            missing.push(CONFIG);
            return Err(DevError::Incomplete { dir: dir.to_owned(), missing });
        }
    }
    create(dir, listen)
}

fn missing_files(dir: &Path) -> Vec<&'static str> {
    EXPECTED.iter().copied().filter(|f| !dir.join(f).is_file()).collect()
}

fn layout(dir: PathBuf, created: bool) -> DevLayout {
    DevLayout {
        config_path: dir.join(CONFIG),
        officer_env: dir.join(OFFICER_ENV),
        exchange_env: dir.join(EXCHANGE_ENV),
        dir,
        created,
    }
}

fn reuse(dir: &Path, listen: SocketAddr) -> Result<DevLayout, DevError> {
    let missing = missing_files(dir);
    if !missing.is_empty() {
        return Err(DevError::Incomplete { dir: dir.to_owned(), missing });
    }
    let dir = fs::canonicalize(dir).map_err(io("resolve", dir))?;
    let config = Config::load(&dir.join(CONFIG))?;
    if config.server.listen != listen {
        tracing::warn!(
            configured = %config.server.listen, requested = %listen,
            "reusing the dev directory: it listens where its config.toml says"
        );
    }
    Ok(layout(dir, false))
}

fn create(dir: &Path, listen: SocketAddr) -> Result<DevLayout, DevError> {
    fs::create_dir_all(dir).map_err(io("create", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io("restrict", dir))?;
    let dir = fs::canonicalize(dir).map_err(io("resolve", dir))?;
    let path = |name: &str| dir.join(name);

    let token = SimToken::create(&path("softhsm"), DEV_TOKEN_LABEL)?;

    let ca = CertificateAuthority::generate("kms development CA")?;
    fs::write(path("ca.crt"), ca.cert_pem()).map_err(io("write", &path("ca.crt")))?;
    write_private(&path("ca.key"), ca.key_pem().as_bytes())?;
    let loopback = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
    ca.issue_server("localhost", &["localhost"], &loopback)?.write_files(&path("server.crt"), &path("server.key"))?;
    ca.issue_client(DEV_OFFICER_IDENTITY, "dev officer", Validity::default())?
        .write_files(&path("officer.crt"), &path("officer.key"))?;
    ca.issue_client(DEV_EXCHANGE_IDENTITY, "dev exchange service", Validity::default())?
        .write_files(&path("exchange.crt"), &path("exchange.key"))?;

    let endpoint = format!("https://localhost:{}", listen.port());
    let env = |cert: &str, key: &str| {
        format!(
            "KMS_ENDPOINT={endpoint}\nKMS_CA={}\nKMS_CERT={}\nKMS_KEY={}\n",
            path("ca.crt").display(),
            path(cert).display(),
            path(key).display()
        )
    };
    fs::write(path(OFFICER_ENV), env("officer.crt", "officer.key")).map_err(io("write", &path(OFFICER_ENV)))?;
    fs::write(path(EXCHANGE_ENV), env("exchange.crt", "exchange.key")).map_err(io("write", &path(EXCHANGE_ENV)))?;

    let spec = dev_config_spec(&dir, listen, &token);
    let text = format!(
        "# Development configuration written by `kms-server dev`. NOT FOR PRODUCTION: the SoftHSM\n\
         # token below is a software token configured as approved up to SECRET.\n{}",
        spec.render()
    );
    // config.toml marks a complete directory, so it is written last and atomically.
    let tmp = path("config.toml.tmp");
    fs::write(&tmp, text).map_err(io("write", &tmp))?;
    Config::load(&tmp)?;
    fs::rename(&tmp, path(CONFIG)).map_err(io("rename", &tmp))?;
    tracing::info!(dir = %dir.display(), "provisioned a development setup");
    Ok(layout(dir, true))
}

/// The dev server's configuration: the dev token approved up to SECRET, no isolated network, and the
/// two dev callers.
pub fn dev_config_spec(dir: &Path, listen: SocketAddr, token: &SimToken) -> ConfigSpec {
    ConfigSpec {
        listen,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        tls_cert: dir.join("server.crt"),
        tls_key: dir.join("server.key"),
        client_ca: vec![dir.join("ca.crt")],
        hsm_module: token.module_path().to_owned(),
        token_label: token.label().to_owned(),
        pin_file: token.user_pin_file(),
        softhsm_conf: Some(token.conf_path().to_owned()),
        approved_up_to: Classification::Secret,
        hsm_workers: crate::config::DEFAULT_HSM_WORKERS,
        module_env: Vec::new(),
        store_path: dir.join("kms.db"),
        store_url: None,
        server_id: None,
        health_listen: None,
        audit_path: None,
        isolated_network: false,
        lifecycle: LifecycleSpec::default(),
        audit: AuditSpec::default(),
        callers: vec![
            CallerSpec {
                identity: DEV_OFFICER_IDENTITY.to_owned(),
                agency: "Development".to_owned(),
                allowed_keys: vec!["*".to_owned()],
                name: "Development officer".to_owned(),
                system_level: 5,
                clearance: Classification::Secret,
                roles: vec![Role::Officer],
            },
            CallerSpec {
                identity: DEV_EXCHANGE_IDENTITY.to_owned(),
                agency: "Development".to_owned(),
                allowed_keys: vec!["*".to_owned()],
                name: "Development exchange service".to_owned(),
                system_level: 4,
                clearance: Classification::Secret,
                roles: vec![Role::Exchange],
            },
        ],
    }
}

/// The lock file that one `kms-server dev` holds on its directory while it runs.
const LOCK: &str = "kms-dev.lock";

/// Held by the one `kms-server dev` that serves a directory: two servers on one store, trail and
/// token would each take the other's objects for debris.
#[derive(Debug)]
pub struct DevDirLock {
    _file: fs::File,
}

/// Takes the directory's lock, or says who holds it.
pub fn lock(layout: &DevLayout) -> Result<DevDirLock, DevError> {
    let path = layout.dir.join(LOCK);
    let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io("open", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(DevDirLock { _file: file }),
        Err(fs::TryLockError::WouldBlock) => Err(DevError::InUse { dir: layout.dir.clone() }),
        Err(fs::TryLockError::Error(e)) => Err(DevError::Io { op: "lock", path, source: e }),
    }
}

/// How `kms-server dev` reaches its token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DevHsm {
    /// SoftHSM loaded into the server process (the default).
    #[default]
    InProcess,
    /// The same token served by `hsm-sim serve` in its own process, reached through the client
    /// module `libhsm_sim_p11.so` over a unix socket, as a vendor's network HSM would be.
    Network,
}

/// The development network HSM: `hsm-sim serve` on the dev token, started by `kms-server dev` and
/// stopped (by its pid) when it ends. The simulator also exits by itself when the server dies,
/// however it dies: it watches a pipe on its stdin that only the server holds.
pub struct DevNetworkHsm {
    hsm: hsm_sim::NetHsm,
    module: PathBuf,
}

impl std::fmt::Debug for DevNetworkHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevNetworkHsm").field("hsm", &self.hsm).field("module", &self.module).finish()
    }
}

/// The per-call deadline of the client module: a backstop behind the server's own deadlines
/// (`hsm.call_timeout_ms`, `hsm.admin_timeout_ms`), so that a hung simulator cannot hold a worker
/// thread for ever.
const DEV_MODULE_TIMEOUT_MS: u64 = 15_000;

impl DevNetworkHsm {
    /// Starts `hsm-sim serve` on the token of the dev directory `layout`, with `latency` added to
    /// every call (a network HSM's round trip), and points `config` at it.
    pub fn start(layout: &DevLayout, config: &mut Config, latency: Duration) -> Result<DevNetworkHsm, DevError> {
        let token = SimToken::open_label(&layout.dir.join("softhsm"), DEV_TOKEN_LABEL)?;
        let module = hsm_sim::NetHsm::module_path()?;
        let hsm = hsm_sim::NetHsm::start(&token)?;
        if !latency.is_zero() {
            hsm.set_latency(latency)?;
        }
        let env = [
            (hsm_sim::net::ENDPOINT_VAR.to_owned(), hsm.unix_endpoint()),
            (hsm_sim::net::TIMEOUT_VAR.to_owned(), DEV_MODULE_TIMEOUT_MS.to_string()),
        ];
        config.hsm.reach_through(module.clone(), env.into_iter().collect(), None);
        tracing::info!(
            pid = hsm.pid().unwrap_or(0),
            socket = %hsm.socket_path().display(),
            control = %hsm.control_path().display(),
            latency_ms = latency.as_millis() as u64,
            sessions = config.hsm.workers(),
            "the dev token is served by hsm-sim (a network HSM in its own process)"
        );
        Ok(DevNetworkHsm { hsm, module })
    }

    /// The simulator, for its controls (latency, failures, kill and restart).
    pub fn hsm(&self) -> &hsm_sim::NetHsm {
        &self.hsm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Needs SoftHSM (`apt-get install softhsm2`); SoftHSM reads its configuration once per process,
    /// so run with one process per test (cargo-nextest) when other tests open tokens too.
    #[test]
    fn provisions_once_then_reuses() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        let listen: SocketAddr = "127.0.0.1:7443".parse().unwrap();

        let first = provision(&dir, listen).unwrap();
        assert!(first.created);
        assert_eq!(mode(&first.dir), 0o700);
        for secret in ["ca.key", "server.key", "officer.key", "exchange.key", "softhsm/user.pin"] {
            assert_eq!(mode(&first.dir.join(secret)), 0o600, "{secret}");
        }

        let config = Config::load(&first.config_path).unwrap();
        assert_eq!(config.server.listen, listen);
        assert_eq!(config.hsm.approved_up_to, Classification::Secret);
        assert_eq!(config.hsm.token_label, DEV_TOKEN_LABEL);
        assert!(!config.policy.isolated_network);
        assert!(!config.hsm.read_pin().unwrap().expose_secret().is_empty());
        let officer = &config.callers[0];
        assert_eq!((officer.identity.as_str(), officer.system_level), (DEV_OFFICER_IDENTITY, 5));
        assert_eq!((officer.clearance, officer.roles.as_slice()), (Classification::Secret, &[Role::Officer][..]));
        let exchange = &config.callers[1];
        assert_eq!((exchange.identity.as_str(), exchange.system_level), (DEV_EXCHANGE_IDENTITY, 4));
        assert_eq!(exchange.roles, [Role::Exchange]);
        let text = fs::read_to_string(&first.config_path).unwrap();
        assert!(text.contains("approved above what SoftHSM deserves"));

        let env = fs::read_to_string(&first.officer_env).unwrap();
        assert!(env.contains("KMS_ENDPOINT=https://localhost:7443\n"), "{env}");
        assert!(env.contains(&format!("KMS_CERT={}\n", first.dir.join("officer.crt").display())));
        let env = fs::read_to_string(&first.exchange_env).unwrap();
        assert!(env.contains(&format!("KMS_KEY={}\n", first.dir.join("exchange.key").display())));

        let ca_before = fs::read(first.dir.join("ca.crt")).unwrap();
        let second = provision(&dir, listen).unwrap();
        assert!(!second.created);
        assert_eq!(second.config_path, first.config_path);
        assert_eq!(fs::read(second.dir.join("ca.crt")).unwrap(), ca_before);

        fs::remove_file(first.dir.join("officer.key")).unwrap();
        match provision(&dir, listen) {
            Err(DevError::Incomplete { missing, .. }) => assert_eq!(missing, ["officer.key"]),
            other => panic!("expected Incomplete, got {other:?}"),
        }
    }

    #[test]
    fn a_non_empty_directory_without_config_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("ca.crt"), "x").unwrap();
        let err = provision(tmp.path(), "127.0.0.1:7443".parse().unwrap()).unwrap_err();
        match &err {
            DevError::Incomplete { missing, .. } => {
                assert!(missing.contains(&"config.toml") && missing.contains(&"server.key"));
                assert!(!missing.contains(&"ca.crt"));
            }
            other => panic!("expected Incomplete, got {other:?}"),
        }
        assert!(err.to_string().contains("remove the directory"));
    }
}

/// `kms-server dev --servers N`: N servers on one PostgreSQL database and one network HSM, on
/// ports `listen`, `listen + 1`, ... This process serves the first; the others are `kms-server
/// serve` processes of their own (configs `config-<i>.toml`, logs `server-<i>.log`, trails
/// `kms-dev-<i>.audit.db` in the dev directory), stopped by their pids when this one ends. The
/// PostgreSQL cluster lives beside the dev directory (`<dir>-pg`, reused by later runs; its
/// database `kms`), listens only on a unix socket there, and is stopped with the servers.
pub struct DevCluster {
    children: std::sync::Arc<std::sync::Mutex<Vec<std::process::Child>>>,
    /// Set when this process ends, so that servers not yet started are not started.
    ending: std::sync::Arc<std::sync::atomic::AtomicBool>,
    starter: Option<std::thread::JoinHandle<()>>,
    pg: Option<crate::pgcluster::PgCluster>,
    endpoints: Vec<String>,
}

impl std::fmt::Debug for DevCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCluster").field("endpoints", &self.endpoints).finish()
    }
}

impl DevCluster {
    /// Starts PostgreSQL and servers 2..=`servers`, and points `config` (server 1's) at the
    /// shared store. `network` is the running dev network HSM that every server reaches.
    /// The others start once the first has written `ready` (its ready file: it listens, with its
    /// token's own keys made).
    pub fn start(layout: &DevLayout, config: &mut Config, network: &DevNetworkHsm, servers: u16, ready: &Path) -> Result<DevCluster, DevError> {
        let _ = fs::remove_file(ready);
        let ready = ready.to_owned();
        let dir = &layout.dir;
        let pg_dir = PathBuf::from(format!("{}-pg", dir.display()));
        let pg = crate::pgcluster::PgCluster::start(&pg_dir).map_err(|e| DevError::Postgres(e.to_string()))?;
        pg.ensure_database("kms").map_err(|e| DevError::Postgres(e.to_string()))?;
        let url = pg.conninfo("kms");
        let first = config.server.listen;
        config.store.path = None;
        config.store.url = Some(url.clone());
        config.server.id = Some("dev-1".to_owned());
        config.audit.path = Some(dir.join("kms-dev-1.audit.db"));
        let token = SimToken::open_label(&dir.join("softhsm"), DEV_TOKEN_LABEL)?;
        let mut endpoints = vec![format!("https://localhost:{}", first.port())];
        let mut commands = Vec::new();
        for i in 2..=servers {
            let listen = SocketAddr::new(first.ip(), first.port().checked_add(i - 1).ok_or(DevError::Ports { first: first.port(), servers })?);
            let mut spec = dev_config_spec(dir, listen, &token);
            spec.hsm_module = network.module.clone();
            spec.softhsm_conf = None;
            spec.module_env = config.hsm.module_env.clone().into_iter().collect();
            spec.hsm_workers = config.hsm.workers();
            spec.store_url = Some(url.clone());
            spec.server_id = Some(format!("dev-{i}"));
            spec.audit_path = Some(dir.join(format!("kms-dev-{i}.audit.db")));
            let path = dir.join(format!("config-{i}.toml"));
            fs::write(&path, spec.render()).map_err(io("write", &path))?;
            let log_path = dir.join(format!("server-{i}.log"));
            let log = fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io("open", &log_path))?;
            let exe = std::env::current_exe().map_err(io("find", Path::new("kms-server")))?;
            let mut command = std::process::Command::new(exe);
            command.arg("serve").arg("--config").arg(&path).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(log);
            commands.push((i, listen, log_path, command));
            endpoints.push(format!("https://localhost:{}", listen.port()));
        }
        // The others start once the first is ready: a new token's own keys (the blob-binding and
        // audit keys) are made by the first server alone.
        let children = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let ending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (kids, stop) = (std::sync::Arc::clone(&children), std::sync::Arc::clone(&ending));
        let starter = std::thread::Builder::new()
            .name("dev-servers".into())
            .spawn(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(120);
                while !ready.exists() {
                    if stop.load(std::sync::atomic::Ordering::Acquire) || std::time::Instant::now() > deadline {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                for (i, listen, log_path, mut command) in commands {
                    let mut started = kids.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if stop.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    match command.spawn() {
                        Ok(child) => {
                            tracing::info!(server = i, pid = child.id(), address = %listen, log = %log_path.display(), "dev server started");
                            started.push(child);
                        }
                        Err(e) => tracing::error!(server = i, error = %e, "cannot start a dev server"),
                    }
                }
            })
            .map_err(io("start a thread for", dir))?;
        Ok(DevCluster { children, ending, starter: Some(starter), pg: Some(pg), endpoints })
    }

    /// Every server's endpoint, as `KMS_ENDPOINT` takes them.
    pub fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }
}

impl Drop for DevCluster {
    /// Stops the other servers (SIGTERM, by pid; SIGKILL after 10 s), then PostgreSQL.
    fn drop(&mut self) {
        self.ending.store(true, std::sync::atomic::Ordering::Release);
        if let Some(starter) = self.starter.take() {
            let _ = starter.join();
        }
        let mut children = self.children.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for child in children.iter() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for child in children.iter_mut() {
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        drop(children);
        if let Some(mut pg) = self.pg.take() {
            let _ = pg.stop();
        }
    }
}
