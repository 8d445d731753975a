//! The server's configuration file (TOML): what to listen on, the TLS identity and client CAs, the
//! HSM module and token, the store, the level-rule overrides and the registered callers.
//!
//! [`Config::load`] is the only way to get a [`Config`] from a file: it parses with unknown fields
//! refused, resolves relative paths against the file's directory, and validates every field, naming
//! it in the error. [`ConfigSpec`] renders a config file from values (for `kms-server dev` and the
//! end-to-end tests); whatever it renders loads.
//!
//! **Never:** hold the HSM PIN in a `Config` (only where to find it; [`HsmSection::read_pin`]
//! reads it into a `SecretString` on demand), or put a PIN in an error or a `Debug` output.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use secrecy::SecretString;

use crate::classification::{Classification, LevelRule, LevelRules};

/// Default gRPC message limit (decode and encode): 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Default largest plaintext for in-HSM Encrypt: 256 KiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 << 10;
/// Default number of PKCS#11 worker threads of the request path (one session each). One: SoftHSM
/// serialises most of its work internally, so a second session adds at most a tenth to the raw rate
/// and, on a 2-core machine, costs the service a quarter of its end-to-end rate in contention
/// (`kms-bench --hsm-workers`). A network HSM that runs sessions in parallel wants more.
pub const DEFAULT_HSM_WORKERS: usize = 1;
/// Default number of request-path sessions for any module that is not SoftHSM in this process: a
/// network HSM answers each call after a round trip, so one session would serialise the service
/// behind the latency.
pub const DEFAULT_NETWORK_HSM_WORKERS: usize = 16;
/// Default deadline of one request-path HSM call; past it the HSM is taken for hung.
pub const DEFAULT_HSM_CALL_TIMEOUT_MS: u64 = 2_000;
/// Default deadline of one admin HSM call (token writes, searches, checkpoint signatures).
pub const DEFAULT_HSM_ADMIN_TIMEOUT_MS: u64 = 10_000;
/// Most PKCS#11 worker threads allowed.
pub const MAX_HSM_WORKERS: usize = 64;

/// A loaded, validated configuration. Paths are absolute or relative to the working directory
/// (resolved against the config file's directory at load time).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub hsm: HsmSection,
    pub store: StoreConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub callers: Vec<CallerEntry>,
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// This server's name among the servers that share one store: whose audit anchor in the store
    /// its trail moves. Required with a PostgreSQL store (1 to 64 of `A-Z a-z 0-9 . _ -`), unique
    /// per server and never reused for another trail; with a SQLite store, unset.
    #[serde(default)]
    pub id: Option<String>,
    /// gRPC message limit, decode and encode.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Largest plaintext for in-HSM Encrypt.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    #[serde(default)]
    pub log_level: LogLevel,
    /// How often the lifecycle task looks for keys due for rotation and for destructions whose
    /// waiting period is over, in seconds (default 300).
    #[serde(default = "default_rotation_check_seconds")]
    pub rotation_check_seconds: u64,
    /// Waiting period between scheduling a destruction and destroying the HSM objects, in seconds
    /// (default 7 days; 1 to 365 days). Short values are for tests.
    #[serde(default = "default_destruction_wait_seconds")]
    pub destruction_wait_seconds: u64,
    /// How long a two-officer approval request stays open, in seconds (default 1 day; 1 s to 30 days).
    #[serde(default = "default_approval_ttl_seconds")]
    pub approval_ttl_seconds: u64,
    /// A plain-text local address that serves only `grpc.health.v1` (for probes that cannot
    /// present a client certificate); unset: health is served on the mutual-TLS port only.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// CAs whose client certificates are accepted (at least one).
    pub client_ca: Vec<PathBuf>,
}

/// The `[hsm]` section: which module and token, where the PIN is, and what the token is approved for.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    /// The PKCS#11 module (shared library).
    pub module: PathBuf,
    /// The token is found by label, never by slot number.
    pub token_label: String,
    /// A file holding the user PIN (exactly one of `pin_file` and `pin_env`).
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// An environment variable holding the user PIN.
    #[serde(default)]
    pub pin_env: Option<String>,
    /// The highest level this token is approved for.
    #[serde(default = "default_approved_up_to")]
    pub approved_up_to: Classification,
    /// PKCS#11 worker threads, each with its own session. Default: 1 for SoftHSM (which serialises
    /// its work), [`DEFAULT_NETWORK_HSM_WORKERS`] for any other module; see [`HsmSection::workers`].
    #[serde(default, rename = "workers")]
    workers_set: Option<usize>,
    /// SoftHSM only: the `softhsm2.conf` to point `SOFTHSM2_CONF` at.
    #[serde(default)]
    pub softhsm_conf: Option<PathBuf>,
    /// Environment variables the module reads at `C_Initialize` (a network module's endpoint and
    /// timeouts). Never a PIN: that goes in `pin_file` or `pin_env`.
    #[serde(default)]
    pub module_env: std::collections::BTreeMap<String, String>,
    /// The deadline of one request-path call, in milliseconds.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
    /// The deadline of one admin call (token writes, searches, signatures), in milliseconds.
    #[serde(default = "default_admin_timeout_ms")]
    pub admin_timeout_ms: u64,
}

impl HsmSection {
    /// The request-path sessions: as configured, or the default for the module (1 for SoftHSM,
    /// which serialises its work, [`DEFAULT_NETWORK_HSM_WORKERS`] for any other).
    pub fn workers(&self) -> usize {
        self.workers_set.unwrap_or_else(|| {
            let softhsm = self.module.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase().contains("softhsm")).unwrap_or(false);
            if softhsm {
                DEFAULT_HSM_WORKERS
            } else {
                DEFAULT_NETWORK_HSM_WORKERS
            }
        })
    }

    /// Reaches the same token through another module (the development network HSM): `module`
    /// with `module_env`, no `SOFTHSM2_CONF`, and the session count that suits the new module
    /// unless `workers` is given.
    pub fn reach_through(&mut self, module: PathBuf, module_env: std::collections::BTreeMap<String, String>, workers: Option<usize>) {
        self.module = module;
        self.softhsm_conf = None;
        self.module_env = module_env;
        self.workers_set = workers;
    }
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite file (one server). Exactly one of `path` and `url` is set.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A PostgreSQL database that several servers share: a `postgres://` URL or a libpq
    /// `key=value` string (a host may be a unix socket directory). No password in it: see
    /// `password_file`.
    #[serde(default)]
    pub url: Option<String>,
    /// A file whose first line is the PostgreSQL password, if the database asks for one.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PostgreSQL connections this server keeps (default 8).
    #[serde(default = "default_store_pool_size")]
    pub pool_size: usize,
}

fn default_store_pool_size() -> usize {
    8
}

impl StoreConfig {
    /// Where the store lives (validated: exactly one of `path` and `url`).
    pub fn location(&self) -> crate::store::StoreLocation {
        match (&self.path, &self.url) {
            (Some(path), _) => crate::store::StoreLocation::Sqlite(path.clone()),
            (None, url) => crate::store::StoreLocation::Postgres(crate::store::PgOptions {
                url: url.clone().unwrap_or_default(),
                password_file: self.password_file.clone(),
                pool_size: self.pool_size,
            }),
        }
    }

    /// `the key store <path>` or `the PostgreSQL key store <host/db>`, for messages.
    pub fn describe(&self) -> String {
        match self.location() {
            crate::store::StoreLocation::Sqlite(path) => format!("the key store {}", path.display()),
            crate::store::StoreLocation::Postgres(o) => format!("the PostgreSQL key store {o:?}"),
        }
    }
}

/// The `[audit]` section: where the audit trail is kept and how often its chain head is signed.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The audit SQLite file. Default: `<store file stem>.audit.db` next to the key store. A file of
    /// its own, so that it can live on its own disk and be copied for auditors.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Sign a checkpoint after this many records (default 1000).
    #[serde(default = "default_checkpoint_every_records")]
    pub checkpoint_every_records: u64,
    /// ... or this many seconds after the first record it would cover (default 60).
    #[serde(default = "default_checkpoint_every_seconds")]
    pub checkpoint_every_seconds: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: None,
            checkpoint_every_records: default_checkpoint_every_records(),
            checkpoint_every_seconds: default_checkpoint_every_seconds(),
        }
    }
}

pub const DEFAULT_CHECKPOINT_EVERY_RECORDS: u64 = 1000;
pub const DEFAULT_CHECKPOINT_EVERY_SECONDS: u64 = 60;
fn default_checkpoint_every_records() -> u64 {
    DEFAULT_CHECKPOINT_EVERY_RECORDS
}
fn default_checkpoint_every_seconds() -> u64 {
    DEFAULT_CHECKPOINT_EVERY_SECONDS
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// TOP_SECRET keys are refused unless this is true.
    #[serde(default)]
    pub isolated_network: bool,
    /// Per-level overrides of the level table.
    #[serde(default)]
    pub levels: BTreeMap<Classification, LevelRule>,
}

impl PolicyConfig {
    /// the level table's defaults with this configuration's overrides applied.
    pub fn level_rules(&self) -> LevelRules {
        let mut rules = LevelRules::default();
        for (level, rule) in &self.levels {
            rules.set(*level, rule.clone());
        }
        rules
    }
}

/// A calling system to register at start-up if the store does not hold it yet (a seed: once in
/// the store, the registration is managed with `kmsctl caller` and the store's copy wins).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerEntry {
    /// The client certificate's URI SAN.
    pub identity: String,
    #[serde(default)]
    pub agency: String,
    pub name: String,
    /// Approved information-system security level (Decree 85/2016), 1..=5.
    pub system_level: u8,
    /// The highest classification it may use.
    pub clearance: Classification,
    pub roles: Vec<Role>,
    /// Keys it may use: names, or prefixes ending in `*` (default `["*"]`, every key).
    #[serde(default = "all_keys")]
    pub allowed_keys: Vec<String>,
}

fn all_keys() -> Vec<String> {
    vec!["*".to_owned()]
}

/// What a caller may do: officers administer keys, exchange services use them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Officer,
    Exchange,
    /// Reads the audit trail and nothing else.
    Auditor,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Officer, Role::Exchange, Role::Auditor];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Officer => "officer",
            Role::Exchange => "exchange",
            Role::Auditor => "auditor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown role {0:?}: expected \"officer\", \"exchange\" or \"auditor\"")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

impl<'de> serde::Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Syntax, a wrong type, a missing or unknown field; toml's message names the field and line.
    #[error("invalid configuration{}: {source}", in_file(.path))]
    Parse { path: Option<PathBuf>, source: Box<toml::de::Error> },
    #[error("invalid configuration: {field} {problem}")]
    Invalid { field: String, problem: Problem },
    #[error("cannot read the HSM PIN file {path}: {source}")]
    PinFile { path: PathBuf, source: std::io::Error },
    #[error("the HSM PIN environment variable {var} is not set or not UTF-8")]
    PinEnv { var: String },
    /// The PIN source exists but holds nothing (after trimming the trailing newline).
    #[error("the HSM PIN from {source_name} is empty")]
    PinEmpty { source_name: String },
}

fn in_file(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default()
}

/// What is wrong with a field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error("must be between {min} and {max} (found {found})")]
    OutOfRange { min: u64, max: u64, found: u64 },
    #[error("must not be empty")]
    Empty,
    #[error("duplicates {first}")]
    Duplicate { first: String },
    #[error("set both pin_file and pin_env: exactly one is allowed")]
    BothPinSources,
    #[error("needs pin_file or pin_env")]
    NoPinSource,
    #[error("{why}")]
    Pattern { why: &'static str },
    #[error("{0}")]
    Rule(&'static str),
}

fn invalid(field: impl Into<String>, problem: Problem) -> ConfigError {
    ConfigError::Invalid { field: field.into(), problem }
}

fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}
fn default_max_payload_bytes() -> usize {
    DEFAULT_MAX_PAYLOAD_BYTES
}
fn default_rotation_check_seconds() -> u64 {
    300
}
pub const DEFAULT_DESTRUCTION_WAIT_SECONDS: u64 = 7 * 86_400;
pub const DEFAULT_APPROVAL_TTL_SECONDS: u64 = 86_400;
fn default_destruction_wait_seconds() -> u64 {
    DEFAULT_DESTRUCTION_WAIT_SECONDS
}
fn default_approval_ttl_seconds() -> u64 {
    DEFAULT_APPROVAL_TTL_SECONDS
}
fn default_approved_up_to() -> Classification {
    Classification::Personal
}
fn default_call_timeout_ms() -> u64 {
    DEFAULT_HSM_CALL_TIMEOUT_MS
}
fn default_admin_timeout_ms() -> u64 {
    DEFAULT_HSM_ADMIN_TIMEOUT_MS
}

impl Config {
    /// Reads, parses and validates a configuration file; relative paths resolve against its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        Config::parse(&text, &base).map_err(|e| match e {
            ConfigError::Parse { path: None, source } => ConfigError::Parse { path: Some(path.to_owned()), source },
            other => other,
        })
    }

    /// Parses and validates configuration text; relative paths resolve against `base_dir`.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        Config::parse(text, base_dir)
    }

    fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: None, source: Box::new(e) })?;
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.tls.cert);
        resolve(&mut self.tls.key);
        self.tls.client_ca.iter_mut().for_each(resolve);
        resolve(&mut self.hsm.module);
        if let Some(p) = self.hsm.pin_file.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.hsm.softhsm_conf.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.store.path.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.store.password_file.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.audit.path.as_mut() {
            resolve(p);
        }
    }

    /// The audit trail's file: `audit.path`, or `<store file stem>.audit.db` next to a SQLite
    /// store (with a PostgreSQL store, `audit.path` is required: validation says so).
    pub fn audit_path(&self) -> PathBuf {
        match (&self.audit.path, &self.store.path) {
            (Some(p), _) => p.clone(),
            (None, Some(store)) => {
                let stem = store.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "kms".into());
                store.with_file_name(format!("{stem}.audit.db"))
            }
            (None, None) => PathBuf::from("kms.audit.db"),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = |field: &str, v: usize| {
            if v == 0 {
                Err(invalid(field, Problem::OutOfRange { min: 1, max: u64::MAX, found: 0 }))
            } else {
                Ok(())
            }
        };
        positive("server.max_message_bytes", self.server.max_message_bytes)?;
        positive("server.max_payload_bytes", self.server.max_payload_bytes)?;
        if !(1..=86_400).contains(&self.server.rotation_check_seconds) {
            return Err(invalid(
                "server.rotation_check_seconds",
                Problem::OutOfRange { min: 1, max: 86_400, found: self.server.rotation_check_seconds },
            ));
        }
        if !(1..=365 * 86_400).contains(&self.server.destruction_wait_seconds) {
            return Err(invalid(
                "server.destruction_wait_seconds",
                Problem::OutOfRange { min: 1, max: 365 * 86_400, found: self.server.destruction_wait_seconds },
            ));
        }
        if !(1..=30 * 86_400).contains(&self.server.approval_ttl_seconds) {
            return Err(invalid(
                "server.approval_ttl_seconds",
                Problem::OutOfRange { min: 1, max: 30 * 86_400, found: self.server.approval_ttl_seconds },
            ));
        }

        if !(1..=1_000_000).contains(&self.audit.checkpoint_every_records) {
            return Err(invalid(
                "audit.checkpoint_every_records",
                Problem::OutOfRange { min: 1, max: 1_000_000, found: self.audit.checkpoint_every_records },
            ));
        }
        if !(1..=86_400).contains(&self.audit.checkpoint_every_seconds) {
            return Err(invalid(
                "audit.checkpoint_every_seconds",
                Problem::OutOfRange { min: 1, max: 86_400, found: self.audit.checkpoint_every_seconds },
            ));
        }
        match (&self.store.path, &self.store.url) {
            (Some(_), Some(_)) => return Err(invalid("store", Problem::Rule("set both path and url: exactly one is allowed"))),
            (None, None) => {
                return Err(invalid("store", Problem::Rule("needs path (a SQLite file) or url (a PostgreSQL database)")))
            }
            (Some(_), None) if self.store.password_file.is_some() => {
                return Err(invalid("store.password_file", Problem::Rule("is for a PostgreSQL store (url), not a SQLite file")))
            }
            (None, Some(url)) => {
                if url.trim().is_empty() {
                    return Err(invalid("store.url", Problem::Empty));
                }
                if self.audit.path.is_none() {
                    return Err(invalid(
                        "audit.path",
                        Problem::Rule("is required with a PostgreSQL store: each server keeps its own trail, in a file of its own"),
                    ));
                }
            }
            _ => {}
        }
        match (&self.server.id, &self.store.url) {
            (Some(id), _) if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) => {
                return Err(invalid("server.id", Problem::Rule("must be 1 to 64 of the characters A-Z a-z 0-9 . _ -")))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "server.id",
                    Problem::Rule("is required with a PostgreSQL store: it names this server's audit anchor among the servers sharing the store"),
                ))
            }
            _ => {}
        }
        if !(1..=256).contains(&self.store.pool_size) {
            return Err(invalid(
                "store.pool_size",
                Problem::OutOfRange { min: 1, max: 256, found: self.store.pool_size as u64 },
            ));
        }
        if self.audit.path.is_some() && self.audit.path == self.store.path {
            return Err(invalid("audit.path", Problem::Duplicate { first: "store.path".into() }));
        }

        if self.tls.client_ca.is_empty() {
            return Err(invalid("tls.client_ca", Problem::Empty));
        }

        let hsm = &self.hsm;
        if hsm.token_label.is_empty() {
            return Err(invalid("hsm.token_label", Problem::Empty));
        }
        match (&hsm.pin_file, &hsm.pin_env) {
            (Some(_), Some(_)) => return Err(invalid("hsm", Problem::BothPinSources)),
            (None, None) => return Err(invalid("hsm", Problem::NoPinSource)),
            (None, Some(var)) if var.is_empty() => return Err(invalid("hsm.pin_env", Problem::Empty)),
            _ => {}
        }
        if !(1..=MAX_HSM_WORKERS).contains(&hsm.workers()) {
            return Err(invalid(
                "hsm.workers",
                Problem::OutOfRange { min: 1, max: MAX_HSM_WORKERS as u64, found: hsm.workers() as u64 },
            ));
        }
        for (field, value) in [("hsm.call_timeout_ms", hsm.call_timeout_ms), ("hsm.admin_timeout_ms", hsm.admin_timeout_ms)] {
            if !(10..=600_000).contains(&value) {
                return Err(invalid(field, Problem::OutOfRange { min: 10, max: 600_000, found: value }));
            }
        }
        for key in hsm.module_env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(invalid("hsm.module_env", Problem::Empty));
            }
        }

        for (level, rule) in &self.policy.levels {
            let field = |name: &str| format!("policy.levels.{level}.{name}");
            system_level(&field("min_system_level"), rule.min_system_level)?;
            if rule.rotation_days == 0 {
                return Err(invalid(
                    field("rotation_days"),
                    Problem::OutOfRange { min: 1, max: u64::from(u32::MAX), found: 0 },
                ));
            }
        }

        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, c) in self.callers.iter().enumerate() {
            let field = |name: &str| format!("callers[{i}].{name}");
            if c.identity.is_empty() {
                return Err(invalid(field("identity"), Problem::Empty));
            }
            if let Some(first) = seen.insert(&c.identity, i) {
                return Err(invalid(
                    field("identity"),
                    Problem::Duplicate { first: format!("callers[{first}] ({})", c.identity) },
                ));
            }
            system_level(&field("system_level"), c.system_level)?;
            if c.roles.is_empty() {
                return Err(invalid(field("roles"), Problem::Empty));
            }
            for (j, p) in c.allowed_keys.iter().enumerate() {
                if let Err(why) = crate::store::validate_key_pattern(p) {
                    return Err(invalid(format!("callers[{i}].allowed_keys[{j}]"), Problem::Pattern { why }));
                }
            }
        }
        Ok(())
    }
}

/// Decree 85/2016 system security levels are 1..=5.
fn system_level(field: &str, level: u8) -> Result<(), ConfigError> {
    if (1..=5).contains(&level) {
        Ok(())
    } else {
        Err(invalid(field, Problem::OutOfRange { min: 1, max: 5, found: u64::from(level) }))
    }
}

impl HsmSection {
    /// Reads the user PIN from its file or environment variable, without its trailing newline.
    pub fn read_pin(&self) -> Result<SecretString, ConfigError> {
        let (raw, source_name) = match (&self.pin_file, &self.pin_env) {
            (Some(path), None) => {
                if let Ok(meta) = std::fs::metadata(path) {
                    if meta.permissions().mode() & 0o077 != 0 {
                        tracing::warn!(path = %path.display(), "the HSM PIN file is accessible to group or others");
                    }
                }
                let pin = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::PinFile { path: path.clone(), source })?;
                (pin, path.display().to_string())
            }
            (None, Some(var)) => {
                let pin = std::env::var(var).map_err(|_| ConfigError::PinEnv { var: var.clone() })?;
                (pin, format!("environment variable {var}"))
            }
            (Some(_), Some(_)) => return Err(invalid("hsm", Problem::BothPinSources)),
            (None, None) => return Err(invalid("hsm", Problem::NoPinSource)),
        };
        // Moved into a SecretString as soon as trimmed; `raw` is a plain String only until then.
        let mut raw = zeroize::Zeroizing::new(raw);
        let len = raw.trim_end_matches(['\n', '\r']).len();
        raw.truncate(len);
        if raw.is_empty() {
            return Err(ConfigError::PinEmpty { source_name });
        }
        Ok(SecretString::from(raw.as_str()))
    }
}

/// The values of a config file, rendered as commented TOML by [`ConfigSpec::render`]. Used by
/// `kms-server dev` and by the end-to-end tests; log level and worker count take their defaults.
#[derive(Clone, Debug)]
pub struct ConfigSpec {
    pub listen: SocketAddr,
    /// `server.id` (needed with `store_url`).
    pub server_id: Option<String>,
    /// `server.health_listen`.
    pub health_listen: Option<SocketAddr>,
    pub max_message_bytes: usize,
    pub max_payload_bytes: usize,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: Vec<PathBuf>,
    pub hsm_module: PathBuf,
    pub token_label: String,
    pub pin_file: PathBuf,
    pub softhsm_conf: Option<PathBuf>,
    pub approved_up_to: Classification,
    /// `hsm.workers`: HSM sessions (and worker threads).
    pub hsm_workers: usize,
    /// `hsm.module_env`: what the module reads from the environment (a network HSM's endpoint).
    pub module_env: Vec<(String, String)>,
    /// `store.path`, unless `store_url` is set.
    pub store_path: PathBuf,
    /// `store.url`: a PostgreSQL store instead of the SQLite file (then `audit_path` is needed).
    pub store_url: Option<String>,
    /// `audit.path`; `None`: next to the SQLite store.
    pub audit_path: Option<PathBuf>,
    pub isolated_network: bool,
    pub lifecycle: LifecycleSpec,
    pub audit: AuditSpec,
    pub callers: Vec<CallerSpec>,
}

/// The audit settings of a rendered config (the trail's file takes its default place).
#[derive(Clone, Copy, Debug)]
pub struct AuditSpec {
    pub checkpoint_every_records: u64,
    pub checkpoint_every_seconds: u64,
}

impl Default for AuditSpec {
    fn default() -> Self {
        AuditSpec {
            checkpoint_every_records: DEFAULT_CHECKPOINT_EVERY_RECORDS,
            checkpoint_every_seconds: DEFAULT_CHECKPOINT_EVERY_SECONDS,
        }
    }
}

/// The lifecycle timings of a rendered config.
#[derive(Clone, Copy, Debug)]
pub struct LifecycleSpec {
    pub check_seconds: u64,
    pub destruction_wait_seconds: u64,
    pub approval_ttl_seconds: u64,
}

impl Default for LifecycleSpec {
    fn default() -> Self {
        LifecycleSpec {
            check_seconds: default_rotation_check_seconds(),
            destruction_wait_seconds: DEFAULT_DESTRUCTION_WAIT_SECONDS,
            approval_ttl_seconds: DEFAULT_APPROVAL_TTL_SECONDS,
        }
    }
}

/// A caller to register in a rendered config.
#[derive(Clone, Debug)]
pub struct CallerSpec {
    pub identity: String,
    pub agency: String,
    pub name: String,
    pub system_level: u8,
    pub clearance: Classification,
    pub roles: Vec<Role>,
    pub allowed_keys: Vec<String>,
}

impl ConfigSpec {
    /// Renders the configuration as a commented TOML file. Paths are written as given (absolute
    /// paths make the file independent of where it is stored); non-UTF-8 paths are written lossily.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; the results of writeln! are ignored for that reason.
        let w = &mut out;
        let _ = writeln!(
            w,
            "# kms-server configuration (generated). Relative paths resolve against this file's directory."
        );
        let _ = writeln!(w);
        let _ = writeln!(w, "[server]");
        let _ = writeln!(w, "listen = {}", quote(&self.listen.to_string()));
        if let Some(id) = &self.server_id {
            let _ = writeln!(w, "# This server's name among the servers sharing the store (its audit anchor).");
            let _ = writeln!(w, "id = {}", quote(id));
        }
        if let Some(addr) = &self.health_listen {
            let _ = writeln!(w, "# grpc.health.v1 only, plain text, for local probes.");
            let _ = writeln!(w, "health_listen = {}", quote(&addr.to_string()));
        }
        let _ = writeln!(w, "# gRPC message limit (decode and encode), bytes.");
        let _ = writeln!(w, "max_message_bytes = {}", self.max_message_bytes);
        let _ = writeln!(w, "# Largest plaintext for in-HSM Encrypt, bytes.");
        let _ = writeln!(w, "max_payload_bytes = {}", self.max_payload_bytes);
        let _ = writeln!(w, "log_level = \"info\"");
        let _ = writeln!(w, "# How often the lifecycle task rotates due keys and destroys keys past their waiting period, s.");
        let _ = writeln!(w, "rotation_check_seconds = {}", self.lifecycle.check_seconds);
        let _ = writeln!(w, "# Waiting period before a scheduled destruction happens, s (cancellable until then).");
        let _ = writeln!(w, "destruction_wait_seconds = {}", self.lifecycle.destruction_wait_seconds);
        let _ = writeln!(w, "# How long a two-officer approval request stays open, s.");
        let _ = writeln!(w, "approval_ttl_seconds = {}", self.lifecycle.approval_ttl_seconds);
        let _ = writeln!(w);
        let _ = writeln!(w, "[tls]");
        let _ = writeln!(w, "cert = {}", quote_path(&self.tls_cert));
        let _ = writeln!(w, "key = {}", quote_path(&self.tls_key));
        let _ = writeln!(w, "# CAs whose client certificates are accepted.");
        let cas: Vec<String> = self.client_ca.iter().map(|p| quote_path(p)).collect();
        let _ = writeln!(w, "client_ca = [{}]", cas.join(", "));
        let _ = writeln!(w);
        let _ = writeln!(w, "[hsm]");
        let _ = writeln!(w, "module = {}", quote_path(&self.hsm_module));
        let _ = writeln!(w, "token_label = {}", quote(&self.token_label));
        let _ = writeln!(w, "pin_file = {}", quote_path(&self.pin_file));
        if self.softhsm_conf.is_some() && self.approved_up_to > Classification::Personal {
            let _ = writeln!(
                w,
                "# DEVELOPMENT ONLY: this SoftHSM token is approved above what SoftHSM deserves. SoftHSM is\n\
                 # software with no hardware protection; never use it for real {} data.",
                self.approved_up_to
            );
        }
        let _ = writeln!(w, "approved_up_to = {}", quote(self.approved_up_to.as_str()));
        let _ = writeln!(w, "workers = {}", self.hsm_workers);
        if let Some(conf) = &self.softhsm_conf {
            let _ = writeln!(w, "# Sets SOFTHSM2_CONF for SoftHSM.");
            let _ = writeln!(w, "softhsm_conf = {}", quote_path(conf));
        }
        if !self.module_env.is_empty() {
            let _ = writeln!(w, "# What the PKCS#11 module reads from the environment at C_Initialize.");
            let _ = writeln!(w, "[hsm.module_env]");
            for (k, v) in &self.module_env {
                let _ = writeln!(w, "{} = {}", quote(k), quote(v));
            }
        }
        let _ = writeln!(w);
        let _ = writeln!(w, "[store]");
        match &self.store_url {
            None => {
                let _ = writeln!(w, "path = {}", quote_path(&self.store_path));
            }
            Some(url) => {
                let _ = writeln!(w, "# A PostgreSQL database, which several servers may share.");
                let _ = writeln!(w, "url = {}", quote(url));
            }
        }
        let _ = writeln!(w);
        let _ = writeln!(w, "[audit]");
        match &self.audit_path {
            None => {
                let _ = writeln!(w, "# The trail is kept in <store file stem>.audit.db next to the store unless `path` is set.");
            }
            Some(path) => {
                let _ = writeln!(w, "# This server's own trail.");
                let _ = writeln!(w, "path = {}", quote_path(path));
            }
        }
        let _ = writeln!(w, "# A checkpoint (the chain head signed in the HSM) after this many records...");
        let _ = writeln!(w, "checkpoint_every_records = {}", self.audit.checkpoint_every_records);
        let _ = writeln!(w, "# ...or this many seconds, whichever comes first.");
        let _ = writeln!(w, "checkpoint_every_seconds = {}", self.audit.checkpoint_every_seconds);
        let _ = writeln!(w);
        let _ = writeln!(w, "[policy]");
        let _ = writeln!(w, "# TOP_SECRET keys are refused unless the deployment runs on an isolated network.");
        let _ = writeln!(w, "isolated_network = {}", self.isolated_network);
        for c in &self.callers {
            let _ = writeln!(w);
            let _ = writeln!(w, "# Registered in the store at first start; afterwards managed with `kmsctl caller`.");
            let _ = writeln!(w, "[[callers]]");
            let _ = writeln!(w, "# The client certificate's URI SAN.");
            let _ = writeln!(w, "identity = {}", quote(&c.identity));
            let _ = writeln!(w, "agency = {}", quote(&c.agency));
            let _ = writeln!(w, "name = {}", quote(&c.name));
            let _ = writeln!(w, "system_level = {}", c.system_level);
            let _ = writeln!(w, "clearance = {}", quote(c.clearance.as_str()));
            let roles: Vec<String> = c.roles.iter().map(|r| quote(r.as_str())).collect();
            let _ = writeln!(w, "roles = [{}]", roles.join(", "));
            let keys: Vec<String> = c.allowed_keys.iter().map(|k| quote(k)).collect();
            let _ = writeln!(w, "# Keys it may use: names, or prefixes ending in *.");
            let _ = writeln!(w, "allowed_keys = [{}]", keys.join(", "));
        }
        out
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04X}", u32::from(c));
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn quote_path(p: &Path) -> String {
    quote(&p.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const MINIMAL: &str = r#"
        [server]
        listen = "127.0.0.1:7443"
        [tls]
        cert = "server.crt"
        key = "server.key"
        client_ca = ["ca.crt"]
        [hsm]
        module = "/usr/lib/softhsm/libsofthsm2.so"
        token_label = "kms-dev"
        pin_file = "softhsm/user.pin"
        [store]
        path = "kms.db"
    "#;

    fn with(extra: &str) -> String {
        format!("{MINIMAL}\n{extra}")
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("/etc/kms"))
    }

    fn invalid_field(text: &str) -> (String, Problem) {
        match parse(text) {
            Err(ConfigError::Invalid { field, problem }) => (field, problem),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn the_store_is_a_sqlite_file_or_a_postgres_database_never_both_or_neither() {
        let pg = MINIMAL
            .replace("path = \"kms.db\"", "url = \"host=/run/postgresql dbname=kms\"\npassword_file = \"pg.pw\"")
            .replace("listen = \"127.0.0.1:7443\"", "listen = \"127.0.0.1:7443\"\nid = \"kms-a\"");
        let c = parse(&format!("{pg}\n[audit]\npath = \"audit.db\"")).unwrap();
        match c.store.location() {
            crate::store::StoreLocation::Postgres(o) => {
                assert_eq!(o.url, "host=/run/postgresql dbname=kms");
                assert_eq!(o.password_file.as_deref(), Some(Path::new("/etc/kms/pg.pw")));
                assert_eq!(o.pool_size, 8);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.audit_path(), Path::new("/etc/kms/audit.db"));
        assert_eq!(c.server.id.as_deref(), Some("kms-a"));
        let rule = |text: &str| match invalid_field(text) {
            (field, Problem::Rule(why)) => (field, why),
            other => panic!("{other:?}"),
        };
        let unnamed = pg.replace("id = \"kms-a\"", "");
        assert_eq!(rule(&format!("{unnamed}\n[audit]\npath = \"a.db\"")).0, "server.id");
        let badly_named = pg.replace("id = \"kms-a\"", "id = \"kms a\"");
        assert_eq!(rule(&format!("{badly_named}\n[audit]\npath = \"a.db\"")).0, "server.id");
        assert_eq!(rule(&pg).0, "audit.path");
        assert_eq!(
            rule(&MINIMAL.replace("path = \"kms.db\"", "path = \"kms.db\"\nurl = \"dbname=kms\"")),
            ("store".to_owned(), "set both path and url: exactly one is allowed")
        );
        assert_eq!(
            rule(&MINIMAL.replace("path = \"kms.db\"", "")),
            ("store".to_owned(), "needs path (a SQLite file) or url (a PostgreSQL database)")
        );
        assert_eq!(rule(&MINIMAL.replace("path = \"kms.db\"", "path = \"kms.db\"\npassword_file = \"x\"")).0, "store.password_file");
        let (field, problem) = invalid_field(&format!("{}\n[audit]\npath = \"a.db\"", pg.replace("password_file", "pool_size = 0\npassword_file")));
        assert_eq!(field, "store.pool_size");
        assert!(matches!(problem, Problem::OutOfRange { min: 1, max: 256, found: 0 }));
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.max_message_bytes, 1 << 20);
        assert_eq!(c.server.max_payload_bytes, 256 << 10);
        assert_eq!(c.server.log_level, LogLevel::Info);
        assert_eq!(c.hsm.workers(), DEFAULT_HSM_WORKERS, "SoftHSM gets one session by default");
        let network = parse(&MINIMAL.replace("/usr/lib/softhsm/libsofthsm2.so", "/opt/vendor/libcloudhsm_pkcs11.so")).unwrap();
        assert_eq!(network.hsm.workers(), DEFAULT_NETWORK_HSM_WORKERS, "any other module gets more");
        assert_eq!((c.hsm.call_timeout_ms, c.hsm.admin_timeout_ms), (DEFAULT_HSM_CALL_TIMEOUT_MS, DEFAULT_HSM_ADMIN_TIMEOUT_MS));
        assert_eq!(c.hsm.approved_up_to, Classification::Personal);
        assert!(!c.policy.isolated_network);
        assert_eq!(c.tls.cert, Path::new("/etc/kms/server.crt"));
        assert_eq!(c.tls.client_ca, [PathBuf::from("/etc/kms/ca.crt")]);
        assert_eq!(c.hsm.pin_file.as_deref(), Some(Path::new("/etc/kms/softhsm/user.pin")));
        assert_eq!(c.hsm.module, Path::new("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(c.store.path.as_deref(), Some(Path::new("/etc/kms/kms.db")));
        assert_eq!(c.policy.level_rules(), LevelRules::default());
    }

    #[test]
    fn load_resolves_against_the_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.store.path, Some(dir.path().join("kms.db")));
        assert_eq!(c.tls.key, dir.path().join("server.key"));
    }

    #[test]
    fn level_overrides_replace_the_defaults() {
        let c = parse(&with(
            "[policy]\nisolated_network = true\n[policy.levels.SECRET]\nmin_system_level = 5\n\
             rotation_days = 30\ntwo_officer_destroy = true\ntwo_officer_rotate = true\n",
        ))
        .unwrap();
        assert!(c.policy.isolated_network);
        let rules = c.policy.level_rules();
        let secret = rules.get(Classification::Secret);
        assert_eq!((secret.min_system_level, secret.rotation_days, secret.two_officer_rotate), (5, 30, true));
        assert_eq!(rules.get(Classification::Personal), LevelRules::default().get(Classification::Personal));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = parse(&with("[oops]\nx = 1")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let err = parse(&MINIMAL.replace("[store]", "[store]\npaht = \"x\"")).unwrap_err();
        assert!(err.to_string().contains("paht"), "{err}");
    }

    #[test]
    fn unknown_role_and_level_are_refused_with_their_names() {
        let caller = "[[callers]]\nidentity = \"urn:a\"\nname = \"a\"\nsystem_level = 3\n";
        let err = parse(&with(&format!("{caller}clearance = \"SECRET\"\nroles = [\"admin\"]"))).unwrap_err();
        assert!(err.to_string().contains("admin"), "{err}");
        let err = parse(&with(&format!("{caller}clearance = \"MAT\"\nroles = [\"officer\"]"))).unwrap_err();
        assert!(err.to_string().contains("MAT"), "{err}");
    }

    fn caller(identity: &str, level: u8) -> String {
        format!(
            "[[callers]]\nidentity = \"{identity}\"\nname = \"n\"\nsystem_level = {level}\n\
             clearance = \"SECRET\"\nroles = [\"officer\", \"exchange\"]\n"
        )
    }

    #[test]
    fn callers_parse_with_roles() {
        let c = parse(&with(&caller("urn:a", 4))).unwrap();
        assert_eq!(c.callers[0].roles, [Role::Officer, Role::Exchange]);
        assert_eq!(c.callers[0].clearance, Classification::Secret);
    }

    #[test]
    fn system_level_must_be_one_to_five() {
        assert_eq!(
            invalid_field(&with(&caller("urn:a", 6))),
            ("callers[0].system_level".into(), Problem::OutOfRange { min: 1, max: 5, found: 6 })
        );
        assert_eq!(invalid_field(&with(&caller("urn:a", 0))).0, "callers[0].system_level");
    }

    #[test]
    fn caller_identities_are_unique_and_not_empty() {
        let (field, problem) = invalid_field(&with(&format!("{}{}", caller("urn:a", 1), caller("urn:a", 2))));
        assert_eq!(field, "callers[1].identity");
        assert!(matches!(problem, Problem::Duplicate { .. }));
        assert_eq!(invalid_field(&with(&caller("", 1))), ("callers[0].identity".into(), Problem::Empty));
    }

    #[test]
    fn level_override_min_system_level_is_checked() {
        let text = with(
            "[policy.levels.CONFIDENTIAL]\nmin_system_level = 9\nrotation_days = 1\n\
             two_officer_destroy = true\ntwo_officer_rotate = false\n",
        );
        assert_eq!(invalid_field(&text).0, "policy.levels.CONFIDENTIAL.min_system_level");
    }

    #[test]
    fn exactly_one_pin_source() {
        let both = MINIMAL.replace("pin_file = ", "pin_env = \"KMS_PIN\"\npin_file = ");
        assert_eq!(invalid_field(&both), ("hsm".into(), Problem::BothPinSources));
        let none = MINIMAL.replace("pin_file = \"softhsm/user.pin\"", "");
        assert_eq!(invalid_field(&none), ("hsm".into(), Problem::NoPinSource));
    }

    #[test]
    fn at_least_one_client_ca() {
        let text = MINIMAL.replace("client_ca = [\"ca.crt\"]", "client_ca = []");
        assert_eq!(invalid_field(&text), ("tls.client_ca".into(), Problem::Empty));
    }

    #[test]
    fn workers_and_sizes_are_bounded() {
        let text = MINIMAL.replace("token_label", "workers = 0\ntoken_label");
        assert_eq!(invalid_field(&text).0, "hsm.workers");
        let text = MINIMAL.replace("token_label", "workers = 65\ntoken_label");
        assert_eq!(invalid_field(&text).0, "hsm.workers");
        let text = MINIMAL.replace("token_label", "workers = 64\ntoken_label");
        assert_eq!(parse(&text).unwrap().hsm.workers(), 64);
        let text = MINIMAL.replace("listen", "max_message_bytes = 0\nlisten");
        assert_eq!(invalid_field(&text).0, "server.max_message_bytes");
        let text = MINIMAL.replace("listen", "max_payload_bytes = 0\nlisten");
        assert_eq!(invalid_field(&text).0, "server.max_payload_bytes");
    }

    #[test]
    fn pin_is_read_trimmed_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let pin_path = dir.path().join("user.pin");
        std::fs::write(&pin_path, "123456\n").unwrap();
        std::fs::set_permissions(&pin_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut c = parse(MINIMAL).unwrap();
        c.hsm.pin_file = Some(pin_path.clone());
        let pin = c.hsm.read_pin().unwrap();
        assert_eq!(pin.expose_secret(), "123456");
        assert!(!format!("{pin:?}").contains("123456"));
        assert!(!format!("{c:?}").contains("123456"));

        std::fs::write(&pin_path, "\n").unwrap();
        let err = c.hsm.read_pin().unwrap_err();
        assert!(matches!(err, ConfigError::PinEmpty { .. }), "{err:?}");

        c.hsm.pin_file = Some(dir.path().join("missing.pin"));
        assert!(matches!(c.hsm.read_pin(), Err(ConfigError::PinFile { .. })));

        c.hsm.pin_file = None;
        c.hsm.pin_env = Some("KMS_TEST_PIN_VARIABLE_THAT_IS_NOT_SET".into());
        assert!(matches!(c.hsm.read_pin(), Err(ConfigError::PinEnv { .. })));
    }

    fn spec() -> ConfigSpec {
        ConfigSpec {
            listen: "127.0.0.1:0".parse().unwrap(),
            max_message_bytes: 4096,
            max_payload_bytes: 1024,
            tls_cert: "/x/server.crt".into(),
            tls_key: "/x/server.key".into(),
            client_ca: vec!["/x/ca.crt".into(), "/x/other \"ca\".crt".into()],
            hsm_module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_label: "kms-test".into(),
            pin_file: "/x/softhsm/user.pin".into(),
            softhsm_conf: Some("/x/softhsm/softhsm2.conf".into()),
            approved_up_to: Classification::Secret,
            hsm_workers: DEFAULT_HSM_WORKERS,
            module_env: Vec::new(),
            store_path: "kms.db".into(),
            server_id: None,
            health_listen: None,
            store_url: None,
            audit_path: None,
            isolated_network: true,
            lifecycle: LifecycleSpec { check_seconds: 7, destruction_wait_seconds: 30, approval_ttl_seconds: 60 },
            audit: AuditSpec::default(),
            callers: vec![CallerSpec {
                identity: "urn:kms:caller:test-officer".into(),
                agency: String::new(),
                name: "officer \\ one".into(),
                system_level: 5,
                clearance: Classification::TopSecret,
                roles: vec![Role::Officer, Role::Exchange],
                allowed_keys: vec!["*".into()],
            }],
        }
    }

    #[test]
    fn rendered_spec_loads_back() {
        let text = spec().render();
        assert!(text.contains("approved above what SoftHSM deserves"), "{text}");
        let c = Config::from_toml_str(&text, Path::new("/base")).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
        assert_eq!(c.server.max_message_bytes, 4096);
        assert_eq!(c.server.max_payload_bytes, 1024);
        assert_eq!(
            (c.server.rotation_check_seconds, c.server.destruction_wait_seconds, c.server.approval_ttl_seconds),
            (7, 30, 60)
        );
        assert_eq!(c.tls.client_ca[1], Path::new("/x/other \"ca\".crt"));
        assert_eq!(c.hsm.approved_up_to, Classification::Secret);
        assert_eq!(c.hsm.softhsm_conf.as_deref(), Some(Path::new("/x/softhsm/softhsm2.conf")));
        assert_eq!(c.store.path.as_deref(), Some(Path::new("/base/kms.db")));
        assert!(c.policy.isolated_network);
        assert_eq!(
            c.callers,
            [CallerEntry {
                identity: "urn:kms:caller:test-officer".into(),
                agency: String::new(),
                name: "officer \\ one".into(),
                system_level: 5,
                clearance: Classification::TopSecret,
                roles: vec![Role::Officer, Role::Exchange],
                allowed_keys: vec!["*".into()],
            }]
        );
    }

    #[test]
    fn roles_parse_from_their_names() {
        assert_eq!("officer".parse::<Role>(), Ok(Role::Officer));
        assert_eq!("exchange".parse::<Role>(), Ok(Role::Exchange));
        assert!("Officer".parse::<Role>().is_err());
    }
}

#[cfg(test)]
mod deploy_example {
    use super::*;

    /// The annotated example in `deploy/` must stay a valid configuration.
    #[test]
    fn deploy_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kms-server.example.toml");
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(config.hsm.approved_up_to, Classification::Secret);
        assert_eq!(config.hsm.pin_env.as_deref(), Some("KMS_HSM_PIN"));
        assert_eq!(config.callers.len(), 2);
        assert!(!config.policy.isolated_network);
        assert!(config.tls.client_ca[0].ends_with("tls/agency-ca.crt"));
    }
}
