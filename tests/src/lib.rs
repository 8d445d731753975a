//! End-to-end test harness: a real `kms-server` process on a fresh SoftHSM token, real mutual TLS
//! with certificates made for the test, a real SQLite file, and clients that connect to it.
//!
//! Each [`TestServer`] lives in its own temporary directory under `/dev/shm` when available (SoftHSM
//! writes token objects synchronously; tmpfs makes that cheap) and is killed when dropped. SoftHSM
//! reads its configuration once per process, so a test process makes one token: run the suite with
//! cargo-nextest (one process per test), as `scripts/test` does.
#![forbid(unsafe_code)]

pub mod load;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hsm_sim::SimToken;
use kms_client::KmsClient;
use kms_server::config::{AuditSpec, CallerSpec, ConfigSpec, LifecycleSpec};
use kms_server::pki::{CertificateAuthority, Validity};

pub use kms_client;
pub use kms_proto::v1 as pb;

/// A caller registered in the server's configuration; its certificate identity is
/// `urn:kms:caller:test-<name>`.
#[derive(Clone, Debug)]
pub struct TestCaller {
    pub name: &'static str,
    pub system_level: u8,
    pub clearance: &'static str,
    pub roles: &'static [&'static str],
}

/// The callers every test server knows.
pub fn default_callers() -> Vec<TestCaller> {
    vec![
        TestCaller { name: "officer", system_level: 5, clearance: "SECRET", roles: &["officer"] },
        // A second officer, for two-officer approvals.
        TestCaller { name: "officer2", system_level: 5, clearance: "SECRET", roles: &["officer"] },
        TestCaller { name: "exchange", system_level: 5, clearance: "SECRET", roles: &["exchange"] },
        TestCaller { name: "level2", system_level: 2, clearance: "SECRET", roles: &["exchange"] },
        TestCaller { name: "personal-only", system_level: 5, clearance: "PERSONAL", roles: &["exchange"] },
        TestCaller { name: "auditor", system_level: 5, clearance: "UNCLASSIFIED", roles: &["auditor"] },
    ]
}

/// What a test server is configured with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub approved_up_to: &'static str,
    pub isolated_network: bool,
    pub max_message_bytes: usize,
    pub max_payload_bytes: usize,
    pub callers: Vec<TestCaller>,
    /// `server.rotation_check_seconds`: how often the lifecycle task runs (rotation, destruction).
    pub lifecycle_check_seconds: u64,
    /// `server.destruction_wait_seconds`.
    pub destruction_wait_seconds: u64,
    /// `server.approval_ttl_seconds`.
    pub approval_ttl_seconds: u64,
    /// `audit.checkpoint_every_records` and `audit.checkpoint_every_seconds`.
    pub checkpoint_every_records: u64,
    pub checkpoint_every_seconds: u64,
    /// `KMS_LOG` for the server: `debug` (tests read debug lines), or `None` for the server's
    /// default (the benchmark measures the server as deployed).
    pub log_level: Option<&'static str>,
    /// `hsm.workers`; `None`: the default for the module (1 for SoftHSM in-process, more for the
    /// network HSM).
    pub hsm_workers: Option<usize>,
    /// Where the server's HSM is.
    pub hsm: HsmMode,
    /// Where the server's key store is.
    pub store: StoreMode,
    /// With a PostgreSQL store: a cluster of the test's own instead of the run's shared one, so
    /// that the test may stop and restart it ([`PgStore::stop_server`]).
    pub own_pg_cluster: bool,
    /// `server.health_listen`: a plain-text port for `grpc.health.v1` only.
    pub health_listen: Option<SocketAddr>,
}

/// Where a test server's key store is: a SQLite file in the test's directory, or a PostgreSQL
/// database of its own in the run's disposable cluster (`KMS_TEST_PG`, which `scripts/test`
/// starts; without it, a cluster of the test's own). `KMS_E2E_STORE=postgres` makes PostgreSQL
/// every test's default. Either way the audit trail is a SQLite file in the test's directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreMode {
    Sqlite,
    Postgres,
}

impl StoreMode {
    /// The mode `KMS_E2E_STORE` asks for (`postgres`), SQLite otherwise.
    pub fn from_env() -> StoreMode {
        match std::env::var("KMS_E2E_STORE").as_deref() {
            Ok("postgres") => StoreMode::Postgres,
            _ => StoreMode::Sqlite,
        }
    }
}

/// A test server's PostgreSQL database, and the cluster it lives in (stopped with the test when it
/// is the test's own).
pub struct PgStore {
    pub conninfo: String,
    _cluster: kms_server::pgcluster::TestCluster,
}

impl PgStore {
    fn create(own_cluster: bool) -> PgStore {
        use kms_server::pgcluster::TestCluster;
        let cluster = if own_cluster { TestCluster::private("kms-e2e-pg") } else { TestCluster::get("kms-e2e-pg") }
            .expect("a PostgreSQL cluster for the test");
        let name = cluster.unique_database("e2e").expect("create the test's database");
        PgStore { conninfo: cluster.conninfo(&name), _cluster: cluster }
    }

    /// Stops PostgreSQL (a cluster of the test's own: `Settings::own_pg_cluster`).
    pub fn stop_server(&mut self) {
        self._cluster.stop_server().expect("stop the test's PostgreSQL");
    }

    /// Starts it again after [`PgStore::stop_server`].
    pub fn start_again(&mut self) {
        self._cluster.start_again().expect("start the test's PostgreSQL again");
    }

    /// A connection of the test's own to the database (to look at rows, or edit them).
    pub fn connect(&self) -> postgres::Client {
        postgres::Client::connect(&self.conninfo, postgres::NoTls).expect("connect to the test's PostgreSQL store")
    }
}

/// Where a test server's HSM is: SoftHSM loaded into the server's process, or the network HSM
/// simulator (`hsm-sim serve`, a process of its own on the same token, reached through the
/// workspace's PKCS#11 client module over TCP loopback). `KMS_E2E_HSM=network` makes the network
/// HSM every test's default, so that the end-to-end suite runs against both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HsmMode {
    InProcess,
    Network,
}

impl HsmMode {
    /// The mode `KMS_E2E_HSM` asks for (`network`), in-process otherwise.
    pub fn from_env() -> HsmMode {
        match std::env::var("KMS_E2E_HSM").as_deref() {
            Ok("network") => HsmMode::Network,
            _ => HsmMode::InProcess,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            approved_up_to: "SECRET",
            isolated_network: false,
            max_message_bytes: 1 << 20,
            max_payload_bytes: 64 * 1024,
            callers: default_callers(),
            lifecycle_check_seconds: 300,
            destruction_wait_seconds: 7 * 86_400,
            approval_ttl_seconds: 86_400,
            checkpoint_every_records: 1000,
            checkpoint_every_seconds: 60,
            log_level: Some("debug"),
            hsm_workers: None,
            hsm: HsmMode::from_env(),
            store: StoreMode::from_env(),
            own_pg_cluster: false,
            health_listen: None,
        }
    }
}

pub fn identity_of(name: &str) -> String {
    format!("urn:kms:caller:test-{name}")
}

/// A secret-key object on a test token, as `pkcs11-tool --list-objects` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenObject {
    /// The heading line, e.g. `Secret Key Object; AES length 32`.
    pub kind: String,
    pub label: String,
    /// Hex `CKA_ID`, empty when the object has none.
    pub id: String,
}

/// A running server and everything it was made from.
pub struct TestServer {
    dir: tempfile::TempDir,
    token: SimToken,
    ca: CertificateAuthority,
    child: Option<Child>,
    addr: SocketAddr,
    /// The network HSM, when the server reaches its token through one.
    net: Option<hsm_sim::NetHsm>,
    /// The PostgreSQL store, when the server's store is one.
    pg: Option<PgStore>,
}

impl TestServer {
    /// Provisions a token, a CA, certificates and a config, and starts the server.
    pub fn start(settings: Settings) -> TestServer {
        let mut me = TestServer::provision(&settings);
        me.launch(&settings);
        me
    }

    /// Provisions everything but does not start the server (see [`TestServer::restart`]): the
    /// token can be used in-process first, as the benchmark does.
    pub fn provision(settings: &Settings) -> TestServer {
        let dir = scratch_dir();
        let token = SimToken::create(&dir.path().join("softhsm"), "kms-test").expect("create SoftHSM token");
        let ca = CertificateAuthority::generate("kms test CA").expect("generate CA");
        let server = ca
            .issue_server("localhost", &["localhost"], &["127.0.0.1".parse().expect("ip")])
            .expect("issue server cert");
        server
            .write_files(&dir.path().join("server.crt"), &dir.path().join("server.key"))
            .expect("write server cert");
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).expect("write CA");
        let net = match settings.hsm {
            HsmMode::InProcess => None,
            HsmMode::Network => Some(hsm_sim::NetHsm::start(&token).expect("start the network HSM (hsm-sim serve)")),
        };
        let pg = (settings.store == StoreMode::Postgres).then(|| PgStore::create(settings.own_pg_cluster));
        let me = TestServer { dir, token, ca, child: None, addr: "127.0.0.1:0".parse().expect("addr"), net, pg };
        for c in &settings.callers {
            me.issue_client(c.name, Validity::default());
        }
        me
    }

    /// The server process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server and starts it again on the same token, store and certificates with new settings.
    pub fn restart(&mut self, settings: Settings) {
        self.stop();
        for c in &settings.callers {
            if !self.path(&format!("{}.crt", c.name)).exists() {
                self.issue_client(c.name, Validity::default());
            }
        }
        self.launch(&settings);
    }

    /// Issues a client certificate for `urn:kms:caller:test-<name>` (registered or not) and returns
    /// the paths of (cert, key).
    pub fn issue_client(&self, name: &str, validity: Validity) -> (PathBuf, PathBuf) {
        self.issue_client_files(name, name, validity)
    }

    /// Like [`TestServer::issue_client`], but written to `<stem>.crt` / `<stem>.key`, so that a
    /// registered identity can get a second, different certificate (expired, say).
    pub fn issue_client_files(&self, stem: &str, name: &str, validity: Validity) -> (PathBuf, PathBuf) {
        let cert = self
            .ca
            .issue_client(&identity_of(name), name, validity)
            .expect("issue client cert");
        let paths = (self.path(&format!("{stem}.crt")), self.path(&format!("{stem}.key")));
        cert.write_files(&paths.0, &paths.1).expect("write client cert");
        paths
    }

    /// A client certificate for a registered identity but issued by a CA the server does not know.
    pub fn issue_foreign_client(&self, name: &str) -> (PathBuf, PathBuf) {
        let foreign = CertificateAuthority::generate("foreign CA").expect("foreign CA");
        let cert = foreign
            .issue_client(&identity_of(name), name, Validity::default())
            .expect("issue foreign cert");
        let paths = (self.path(&format!("foreign-{name}.crt")), self.path(&format!("foreign-{name}.key")));
        cert.write_files(&paths.0, &paths.1).expect("write foreign cert");
        paths
    }

    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn ca_path(&self) -> PathBuf {
        self.path("ca.crt")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn token(&self) -> &SimToken {
        &self.token
    }

    /// The network HSM the server uses, if it uses one (for fault injection).
    pub fn net_hsm(&self) -> Option<&hsm_sim::NetHsm> {
        self.net.as_ref()
    }

    /// See [`TestServer::net_hsm`].
    pub fn net_hsm_mut(&mut self) -> Option<&mut hsm_sim::NetHsm> {
        self.net.as_mut()
    }

    /// The SQLite store's file. A test that reads or edits it runs on SQLite only (the PostgreSQL
    /// pass of `scripts/test` leaves it out); on PostgreSQL, see [`TestServer::pg_store`].
    pub fn store_path(&self) -> PathBuf {
        assert!(self.pg.is_none(), "this test reads the SQLite store's file, but the store is PostgreSQL (KMS_E2E_STORE)");
        self.path("kms.db")
    }

    /// The PostgreSQL store, when the server's store is one.
    pub fn pg_store(&self) -> Option<&PgStore> {
        self.pg.as_ref()
    }

    /// See [`TestServer::pg_store`].
    pub fn pg_store_mut(&mut self) -> Option<&mut PgStore> {
        self.pg.as_mut()
    }

    /// The audit trail's database (its default place next to the store).
    pub fn audit_path(&self) -> PathBuf {
        self.path("kms.audit.db")
    }

    /// The secret-key objects on the test token, read from outside the server with `pkcs11-tool`
    /// (package opensc).
    pub fn token_objects(&self) -> Vec<TokenObject> {
        use secrecy::ExposeSecret;
        let token = self.token();
        let out = Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", token.conf_path())
            .arg("--module")
            .arg(token.module_path())
            .args(["--token-label", token.label(), "--login", "--pin", token.user_pin().expose_secret()])
            .args(["--list-objects", "--type", "secrkey"])
            .output()
            .expect("pkcs11-tool (package opensc) must be installed");
        assert!(out.status.success(), "pkcs11-tool failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut objects: Vec<TokenObject> = Vec::new();
        for line in String::from_utf8(out.stdout).expect("pkcs11-tool prints UTF-8").lines() {
            if !line.starts_with(' ') {
                objects.push(TokenObject { kind: line.trim().to_owned(), label: String::new(), id: String::new() });
            } else if let Some(o) = objects.last_mut() {
                if let Some(v) = line.trim().strip_prefix("label:") {
                    o.label = v.trim().to_owned();
                } else if let Some(v) = line.trim().strip_prefix("ID:") {
                    o.id = v.trim().to_lowercase();
                }
            }
        }
        objects
    }

    /// Runs `pkcs11-tool` (package opensc), logged in to the test token, with `args`.
    pub fn pkcs11_tool(&self, args: &[&str]) -> Output {
        use secrecy::ExposeSecret;
        let token = self.token();
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", token.conf_path())
            .arg("--module")
            .arg(token.module_path())
            .args(["--token-label", token.label(), "--login", "--pin", token.user_pin().expose_secret()])
            .args(args)
            .output()
            .expect("pkcs11-tool (package opensc) must be installed")
    }

    /// The hex `CKA_ID`s of the secret-key objects on the test token (see [`TestServer::token_objects`]).
    pub fn token_object_ids(&self) -> Vec<String> {
        self.token_objects().into_iter().filter(|o| !o.id.is_empty()).map(|o| o.id).collect()
    }

    /// The server's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("server.log")).unwrap_or_default()
    }

    /// A client authenticated as the named caller.
    pub async fn client(&self, name: &str) -> KmsClient {
        let cert = self.path(&format!("{name}.crt"));
        let key = self.path(&format!("{name}.key"));
        self.client_with(&cert, &key).await.unwrap_or_else(|e| panic!("connect as {name}: {e}"))
    }

    /// A client with explicit certificate files.
    pub async fn client_with(&self, cert: &Path, key: &Path) -> Result<KmsClient, kms_client::ClientError> {
        KmsClient::connect_with_files(self.endpoint(), self.ca_path(), cert, key).await
    }

    /// Makes a recipient key pair for the named caller and has the officer register its public
    /// half (only registered keys are sealed to).
    pub async fn register_recipient(&self, name: &str) -> kms_client::RecipientKey {
        let key = kms_client::RecipientKey::generate().expect("recipient key");
        let officer = self.client("officer").await;
        officer
            .add_recipient_key(&identity_of(name), &key.public_key_pem().expect("pem"))
            .await
            .unwrap_or_else(|e| panic!("register a recipient key for {name}: {e}"));
        key
    }

    /// Runs `kmsctl` as the named caller with `args` and returns its output.
    pub fn kmsctl(&self, name: &str, args: &[&str]) -> Output {
        kmsctl_as(&self.endpoint(), self.dir.path(), name, args)
    }

    /// Stops the server with SIGTERM (a clean shutdown that finalises the HSM) and waits for it.
    /// Clients still connected should be driven by a multi-threaded runtime, or the server waits
    /// out its drain period for them.
    pub fn stop(&mut self) {
        self.signal_and_wait("-TERM");
    }

    /// Kills the server with SIGKILL, as a crash would, and waits for it.
    pub fn kill(&mut self) {
        self.signal_and_wait("-KILL");
    }

    fn signal_and_wait(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(signal).arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }

    fn launch(&mut self, settings: &Settings) {
        self.launch_with(settings, &[]);
    }

    /// Starts the server (stopped before) with extra `serve` arguments, such as `--new-store`.
    pub fn start_with(&mut self, settings: &Settings, args: &[&str]) {
        self.stop();
        self.launch_with(settings, args);
    }

    fn launch_with(&mut self, settings: &Settings, args: &[&str]) {
        let config = self.path("config.toml");
        std::fs::write(&config, self.render_config(settings)).expect("write config");
        let (child, addr) = spawn_server(&config, &self.path("ready"), &self.path("server.log"), settings.log_level, args, "kms-server");
        self.child = Some(child);
        self.addr = addr;
    }

    /// Waits for the server to exit by itself (for start-up refusals) and returns whether it failed.
    pub fn launch_expecting_exit(&mut self, settings: &Settings) -> std::process::ExitStatus {
        self.launch_expecting_exit_with(settings, &[])
    }

    /// [`TestServer::launch_expecting_exit`] with extra `serve` arguments.
    pub fn launch_expecting_exit_with(&mut self, settings: &Settings, args: &[&str]) -> std::process::ExitStatus {
        let config = self.path("config.toml");
        std::fs::write(&config, self.render_config(settings)).expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("server.log"))
            .expect("open server log");
        let mut child = Command::new(binary("kms-server"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kms-server");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kms-server kept running; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn render_config(&self, s: &Settings) -> String {
        self.config_spec(s).render()
    }

    /// Starts server number `n` (2, 3, ...) beside this one: the same PostgreSQL store, network
    /// HSM, certificates and callers, its own port, `server.id` (`kms-test-<n>`), audit trail
    /// (`kms-<n>.audit.db`), config and log (`server-<n>.log`) in this server's directory.
    /// This server must use the network HSM and a PostgreSQL store.
    pub fn start_peer(&self, settings: &Settings, n: u32) -> PeerServer {
        assert!(self.net.is_some() && self.pg.is_some(), "peers share a network HSM and a PostgreSQL store");
        assert!(n >= 2, "server 1 is this one");
        let mut peer = PeerServer {
            n,
            dir: self.dir.path().to_owned(),
            child: None,
            addr: "127.0.0.1:0".parse().expect("addr"),
            spec: self.config_spec(settings),
            log_level: settings.log_level,
            child_started_once: false,
        };
        peer.spec.server_id = Some(format!("kms-test-{n}"));
        peer.spec.audit_path = Some(peer.path(&format!("kms-{n}.audit.db")));
        peer.launch();
        peer
    }

    fn config_spec(&self, s: &Settings) -> ConfigSpec {
        ConfigSpec {
            listen: "127.0.0.1:0".parse().expect("addr"),
            max_message_bytes: s.max_message_bytes,
            max_payload_bytes: s.max_payload_bytes,
            tls_cert: self.path("server.crt"),
            tls_key: self.path("server.key"),
            client_ca: vec![self.ca_path()],
            hsm_module: match &self.net {
                None => self.token.module_path().to_owned(),
                Some(_) => hsm_sim::NetHsm::module_path().expect("the network HSM's client module is built"),
            },
            token_label: self.token.label().to_owned(),
            pin_file: self.token.user_pin_file(),
            softhsm_conf: self.net.is_none().then(|| self.token.conf_path().to_owned()),
            approved_up_to: s.approved_up_to.parse().expect("level"),
            hsm_workers: s.hsm_workers.unwrap_or(match &self.net {
                None => kms_server::config::DEFAULT_HSM_WORKERS,
                Some(_) => kms_server::config::DEFAULT_NETWORK_HSM_WORKERS,
            }),
            module_env: match &self.net {
                None => Vec::new(),
                Some(net) => vec![
                    (hsm_sim::net::ENDPOINT_VAR.to_owned(), net.tcp_endpoint().expect("the network HSM listens on TCP")),
                    // The server's own deadline (2 s) comes first; the module's is a backstop.
                    (hsm_sim::net::TIMEOUT_VAR.to_owned(), "5000".to_owned()),
                ],
            },
            store_path: self.path("kms.db"),
            store_url: self.pg.as_ref().map(|p| p.conninfo.clone()),
            server_id: self.pg.as_ref().map(|_| "kms-test-1".to_owned()),
            health_listen: s.health_listen,
            audit_path: self.pg.as_ref().map(|_| self.audit_path()),
            isolated_network: s.isolated_network,
            lifecycle: LifecycleSpec {
                check_seconds: s.lifecycle_check_seconds,
                destruction_wait_seconds: s.destruction_wait_seconds,
                approval_ttl_seconds: s.approval_ttl_seconds,
            },
            audit: AuditSpec {
                checkpoint_every_records: s.checkpoint_every_records,
                checkpoint_every_seconds: s.checkpoint_every_seconds,
            },
            callers: s
                .callers
                .iter()
                .map(|c| CallerSpec {
                    identity: identity_of(c.name),
                    agency: "Test agency".to_owned(),
                    allowed_keys: vec!["*".to_owned()],
                    name: c.name.to_owned(),
                    system_level: c.system_level,
                    clearance: c.clearance.parse().expect("level"),
                    roles: c.roles.iter().map(|r| r.parse().expect("role")).collect(),
                })
                .collect(),
        }
    }
}

/// Another server beside a [`TestServer`] (see [`TestServer::start_peer`]); killed when dropped.
pub struct PeerServer {
    n: u32,
    dir: PathBuf,
    child: Option<Child>,
    addr: SocketAddr,
    spec: ConfigSpec,
    log_level: Option<&'static str>,
    child_started_once: bool,
}

impl PeerServer {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path(&format!("server-{}.log", self.n))).unwrap_or_default()
    }

    /// Its audit trail's file.
    pub fn audit_path(&self) -> PathBuf {
        self.path(&format!("kms-{}.audit.db", self.n))
    }

    /// A client of this server authenticated as the named caller.
    pub async fn client(&self, name: &str) -> KmsClient {
        let (cert, key) = (self.path(&format!("{name}.crt")), self.path(&format!("{name}.key")));
        KmsClient::connect_with_files(self.endpoint(), self.path("ca.crt"), &cert, &key)
            .await
            .unwrap_or_else(|e| panic!("connect to server {} as {name}: {e}", self.n))
    }

    /// Runs `kmsctl` against this server as the named caller.
    pub fn kmsctl(&self, name: &str, args: &[&str]) -> Output {
        kmsctl_as(&self.endpoint(), &self.dir, name, args)
    }

    /// Kills it with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-KILL").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// Starts it again (after [`PeerServer::kill`]), on the port it had (clients that know it
    /// find it there again).
    pub fn launch(&mut self) {
        self.kill();
        if self.addr.port() != 0 && self.spec.listen.port() == 0 && self.child_started_once {
            self.spec.listen = self.addr;
        }
        self.child_started_once = true;
        let config = self.path(&format!("config-{}.toml", self.n));
        std::fs::write(&config, self.spec.render()).expect("write config");
        let (ready, log) = (self.path(&format!("ready-{}", self.n)), self.path(&format!("server-{}.log", self.n)));
        let (child, addr) = spawn_server(&config, &ready, &log, self.log_level, &[], &format!("server {}", self.n));
        self.child = Some(child);
        self.addr = addr;
    }
}

/// Runs `kmsctl` against `endpoint` as the caller `name`, with the CA and that caller's
/// certificate from a test server's directory `dir`.
fn kmsctl_as(endpoint: &str, dir: &Path, name: &str, args: &[&str]) -> Output {
    Command::new(binary("kmsctl"))
        .env_clear()
        .env("KMS_ENDPOINT", endpoint)
        .env("KMS_CA", dir.join("ca.crt"))
        .env("KMS_CERT", dir.join(format!("{name}.crt")))
        .env("KMS_KEY", dir.join(format!("{name}.key")))
        .args(args)
        .output()
        .expect("run kmsctl")
}

/// Starts `kms-server serve --config CONFIG --ready-file READY ARGS`, its stderr appended to `log`
/// (`KMS_LOG` set to `log_level`, or left to the server's default), and waits at most 30 s until
/// it listens; the process and its address. Panics with the log if it exits or never listens.
fn spawn_server(config: &Path, ready: &Path, log: &Path, log_level: Option<&str>, args: &[&str], name: &str) -> (Child, SocketAddr) {
    let _ = std::fs::remove_file(ready);
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open server log");
    let mut command = Command::new(binary("kms-server"));
    command.arg("serve").arg("--config").arg(config).arg("--ready-file").arg(ready).args(args);
    match log_level {
        Some(level) => command.env("KMS_LOG", level),
        None => command.env_remove("KMS_LOG"),
    };
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file).spawn().expect("spawn kms-server");
    let read_log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(addr) = std::fs::read_to_string(ready).ok().and_then(|a| a.trim().parse().ok()) {
            return (child, addr);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{name} exited with {status} before listening; log:\n{}", read_log());
        }
        if Instant::now() > deadline {
            panic!("{name} did not listen within 30 s; log:\n{}", read_log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Drop for TestServer {
    /// The test is over: no need for a clean shutdown, which would wait for the test's clients
    /// (whose runtime is blocked right here) to close their connections.
    /// A failing test with `KMS_E2E_KEEP=<dir>` set leaves a copy of its files there (token,
    /// store, log, certificates) to look at.
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            if let Some(to) = std::env::var_os("KMS_E2E_KEEP") {
                let _ = std::fs::create_dir_all(&to);
                let to = Path::new(&to).join(self.dir.path().file_name().unwrap_or_default());
                let copied = Command::new("cp").arg("-a").arg(self.dir.path()).arg(&to).status();
                eprintln!("KMS_E2E_KEEP: the failed test's files are in {} ({copied:?})", to.display());
            }
        }
    }
}

/// A built binary of the workspace (`target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // A test runs from `target/<profile>/deps/`, a workspace binary (the benchmark) from
    // `target/<profile>/`.
    let beside = exe.parent().map(|d| d.join(name)).filter(|p| p.exists());
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = beside.unwrap_or_else(|| dir.join(name));
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = || {
        let mut b = tempfile::Builder::new();
        b.prefix("kms-e2e-");
        b
    };
    if shm.is_dir() {
        if let Ok(d) = builder().tempdir_in(shm) {
            return d;
        }
    }
    builder().tempdir().expect("tempdir")
}

/// Builds an encryption context from pairs.
pub fn ctx(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The hex `CKA_ID` of a key version's HSM object: the key's 16-byte id, then the version as 4
/// big-endian bytes.
pub fn object_id(key_id: &str, version: u32) -> String {
    format!("{key_id}{version:08x}")
}

/// The caller of a change that was made (panics if it awaits a second officer).
pub fn made(change: kms_client::CallerChange) -> pb::Caller {
    match change {
        kms_client::CallerChange::Made(c) => c,
        other => panic!("expected the change to be made, got {other:?}"),
    }
}

/// The approval request of a change that awaits a second officer (panics if it was made).
pub fn pending(change: kms_client::CallerChange) -> pb::Approval {
    match change {
        kms_client::CallerChange::AwaitingApproval { approval, .. } => approval,
        other => panic!("expected the change to await a second officer, got {other:?}"),
    }
}
