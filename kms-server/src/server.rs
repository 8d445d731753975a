//! Start-up, serving and shutdown: builds the TLS acceptor, the store, the HSM pool and the policy
//! from a [`Config`], checks the token and the keys before accepting a single request, serves the
//! gRPC services over mutual TLS, and finalises the HSM on the way out.
//!
//! Start-up refuses to serve when a key version's HSM object is readable (not sensitive, or
//! extractable): that would break invariant 1 and means the token was tampered with.
#![forbid(unsafe_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kms_proto::v1::approvals_server::ApprovalsServer;
use kms_proto::v1::audit_server::AuditServer;
use kms_proto::v1::callers_server::CallersServer;
use kms_proto::v1::data_keys_server::DataKeysServer;
use kms_proto::v1::hsm_crypto_server::HsmCryptoServer;
use kms_proto::v1::key_admin_server::KeyAdminServer;

use crate::authz::Policy;
use crate::classification::Classification;
use crate::config::Config;
use crate::hsm::{Hsm, HsmConfig, HsmError};
use crate::keyauth::KeyAuth;
use crate::service::data_keys::DataKeysService;
use crate::service::hsm_crypto::HsmCryptoService;
use crate::service::key_admin::KeyAdminService;
use crate::service::approvals::ApprovalsService;
use crate::service::audit::AuditService;
use crate::service::callers::CallersService;
use crate::audit::{AuditLog, AuditSettings};
use crate::tls::MutualTls;
use crate::service::{AppState, LifecycleSettings, Limits};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("cannot read {what} {path}: {source}")]
    ReadFile { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    #[error("start-up check failed: {0}")]
    StartupCheck(String),
    #[error("audit trail: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("start-up reconciliation: {0}")]
    Reconcile(#[from] crate::reconcile::ReconcileError),
    #[error("cannot write the ready file {path}: {source}")]
    ReadyFile { path: PathBuf, source: std::io::Error },
    #[error("server failed: {0}")]
    Serve(String),
}

/// How long open connections may take to finish after the shutdown signal.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Options that are not part of the configuration file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Once listening, write the bound address here (used by tests and scripts with port 0).
    pub ready_file: Option<PathBuf>,
    /// Accept a missing or empty key store in front of a token that holds this service's keys
    /// (they are kept, and can be adopted). Without it such a start is refused.
    pub new_store: bool,
    /// Start a new audit trail even though the store is anchored to another one (the old file is
    /// moved aside, and the new trail's first record says so).
    pub new_audit_trail: bool,
}

/// Runs the server until `shutdown` completes.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let tls = tls_config(&config)?;
    // Bound before anything else is opened: an address in use fails start-up before the HSM and the
    // store are touched. Connections made before the server is ready wait in the backlog.
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| ServerError::Listen { addr: config.server.listen, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServerError::Listen { addr: config.server.listen, source })?;
    let health_listener = match config.server.health_listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr).await.map_err(|source| ServerError::Listen { addr, source })?,
        ),
    };

    let pin = config.hsm.read_pin()?;
    let hsm_config = HsmConfig {
        module: config.hsm.module.clone(),
        token_label: config.hsm.token_label.clone(),
        pin,
        approved_up_to: config.hsm.approved_up_to,
        workers: config.hsm.workers(),
        softhsm_conf: config.hsm.softhsm_conf.clone(),
        module_env: config.hsm.module_env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        call_timeout: std::time::Duration::from_millis(config.hsm.call_timeout_ms),
        admin_timeout: std::time::Duration::from_millis(config.hsm.admin_timeout_ms),
    };
    let hsm = blocking(move || Hsm::open(hsm_config)).await??;
    let token = hsm.token().clone();
    tracing::info!(
        token = %token.label, serial = %token.serial, model = %token.model,
        approved_up_to = %hsm.approved_up_to(), "HSM token opened"
    );
    if token.is_softhsm() && hsm.approved_up_to() > Classification::Personal {
        tracing::warn!(
            "!!! SoftHSM token {} is approved up to {} by configuration. SoftHSM is a software token \
             with no hardware protection: it is NOT approved hardware. Use this only for development \
             and testing, never for real {} data. !!!",
            token.label,
            hsm.approved_up_to(),
            hsm.approved_up_to()
        );
    }
    if !config.policy.isolated_network {
        tracing::info!("no isolated network declared: TOP_SECRET keys are refused");
    }
    let opened = open_store_and_trail(&config, &options, &hsm).await;
    let (store, keyauth, audit, audit_writer) = match opened {
        Ok(v) => v,
        Err(e) => {
            hsm.shutdown();
            return Err(e);
        }
    };
    let s = store.clone();
    let key_cache = Arc::new(crate::key_cache::KeyCache::new(blocking(move || s.change_probe()).await??));

    // Read before the registry is loaded: a change that lands meanwhile makes the sync reload it.
    let s = store.clone();
    let caller_probe = blocking(move || s.change_probe()).await??;
    let callers_seen = caller_probe.callers_version();
    let callers = match crate::service::callers::load_callers(&store, &keyauth, &config.callers).await {
        Ok(c) => c,
        Err(e) => {
            hsm.shutdown();
            return Err(ServerError::StartupCheck(format!("cannot load the registered callers: {e}")));
        }
    };
    tracing::info!(callers = callers.len(), active = callers.iter().filter(|c| c.active).count(), "registered callers loaded");
    let policy = Policy::new(
        callers,
        config.policy.level_rules(),
        config.policy.isolated_network,
        token.label.clone(),
        hsm.approved_up_to(),
    );
    let state = AppState {
        policy: Arc::new(policy),
        hsm: hsm.clone(),
        store,
        keyauth,
        limits: Limits { max_payload_bytes: config.server.max_payload_bytes },
        lifecycle: LifecycleSettings {
            destruction_wait_seconds: i64::try_from(config.server.destruction_wait_seconds).unwrap_or(i64::MAX),
            approval_ttl_seconds: i64::try_from(config.server.approval_ttl_seconds).unwrap_or(i64::MAX),
        },
        lifecycle_lock: Arc::new(tokio::sync::Mutex::new(())),
        audit,
        key_cache,
    };
    let registry_sync = crate::service::callers::spawn_registry_sync(state.clone(), caller_probe, callers_seen);
    let scheduler = crate::service::rotation::spawn(
        state.clone(),
        std::time::Duration::from_secs(config.server.rotation_check_seconds),
    );

    tracing::info!(address = %bound, "kms-server listening (mutual TLS)");

    let max = config.server.max_message_bytes;
    let handshakes = state.audit.detached();
    let incoming = tls.incoming(listener, move |remote, reason| {
        tracing::warn!(remote = ?remote, reason = %reason, "TLS handshake refused");
        let facts = crate::audit::RequestFacts { rpc: "TLSHandshake", request_id: crate::service::request_id(), ..Default::default() };
        let detail = match remote {
            Some(r) => format!("{reason} (from {r})"),
            None => reason,
        };
        handshakes.record(crate::audit::record(&facts, kms_audit::Outcome::Refused, tonic::Code::Unauthenticated as i32, &detail));
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let health = crate::health::spawn(state.clone(), health_reporter).await;
    let plain_health = match health_listener {
        None => None,
        Some(listener) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(address = %addr, "grpc.health.v1 on a plain-text port (health only)");
            }
            let service = health_service.clone();
            Some(tokio::spawn(async move {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                if let Err(e) = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await {
                    tracing::error!(error = %e, "the plain-text health port failed");
                }
            }))
        }
    };
    let router = tonic::transport::Server::builder()
        .layer(crate::audit::unrouted::RecordUnrouted::new(state.audit.clone()))
        .add_service(health_service)
        .add_service(
            KeyAdminServer::new(KeyAdminService::new(state.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            DataKeysServer::new(DataKeysService::new(state.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            HsmCryptoServer::new(HsmCryptoService::new(state.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            ApprovalsServer::new(ApprovalsService::new(state.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            CallersServer::new(CallersService::new(state.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            AuditServer::new(AuditService::new(state.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        );
    // On the shutdown signal tonic stops accepting and lets open connections finish; a client that
    // keeps an idle connection open must not hold the HSM hostage, so draining is bounded.
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = signalled_tx.send(());
    };
    let ready = match &options.ready_file {
        Some(path) => std::fs::write(path, bound.to_string()).map_err(|source| ServerError::ReadyFile { path: path.clone(), source }),
        None => Ok(()),
    };
    let result = if let Err(e) = ready {
        Err(e)
    } else {
        let serve = router.serve_with_incoming_shutdown(incoming, signal);
        tokio::pin!(serve);
        tokio::select! {
            r = &mut serve => r,
            _ = async {
                if signalled_rx.await.is_ok() {
                    tokio::time::sleep(SHUTDOWN_DRAIN).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::warn!("connections still open {} s after the shutdown signal; closing them", SHUTDOWN_DRAIN.as_secs());
                Ok(())
            }
        }
        .map_err(|e| ServerError::Serve(e.to_string()))
    };
    scheduler.abort();
    let _ = scheduler.await;
    registry_sync.abort();
    let _ = registry_sync.await;
    health.abort();
    let _ = health.await;
    if let Some(plain) = plain_health {
        plain.abort();
        let _ = plain.await;
    }
    drop(state);
    // Every handle on the audit log is gone: the writer signs a last checkpoint and ends.
    if tokio::time::timeout(std::time::Duration::from_secs(10), audit_writer).await.is_err() {
        tracing::error!("the audit writer did not finish within 10 s; the last records may lack a checkpoint");
    }
    tracing::info!("kms-server stopping; finalising the HSM");
    blocking(move || hsm.shutdown()).await?;
    result
}

/// Opens the key store (refusing a missing or empty one in front of a token that holds this
/// service's keys, unless `--new-store`), the audit trail (refusing one that is not the trail the
/// store is anchored to, unless `--new-audit-trail`), and reconciles the store with the token.
async fn open_store_and_trail(
    config: &Config,
    options: &RunOptions,
    hsm: &Hsm,
) -> Result<(Store, Arc<KeyAuth>, AuditLog, tokio::task::JoinHandle<()>), ServerError> {
    let location = config.store.location();
    let described = config.store.describe();
    let (objects, keys_on_token) = crate::reconcile::count_service_objects(hsm).await?;
    let what_to_do = |found: &str| {
        format!(
            "{described} {found}, but token {} holds {objects} key objects of this service ({keys_on_token} keys), \
             which it would no longer know. If store.path or store.url is wrong, fix it; if the store was lost, restore it from its \
             backup (keys and versions made since the backup stay on the token and are adopted back with `kmsctl token \
             adopt`; see the README, \"Recovering the key store\"). To start with a new, empty store in front of these \
             keys anyway (they are kept, and officers adopt them), start once with --new-store. Refusing to start.",
            hsm.token().label
        )
    };
    if let crate::store::StoreLocation::Sqlite(path) = &location {
        if !path.exists() && objects > 0 && !options.new_store {
            return Err(ServerError::StartupCheck(what_to_do("does not exist")));
        }
    }
    let store = blocking(move || Store::open_location(&location)).await??;
    let s = store.clone();
    let stored_keys = blocking(move || s.key_count()).await??;
    if stored_keys == 0 && objects > 0 {
        if !options.new_store {
            return Err(ServerError::StartupCheck(what_to_do("holds no keys")));
        }
        tracing::warn!(objects, keys = keys_on_token, "a new, empty key store in front of a token with this service's keys, as the operator asked (--new-store): the keys are kept and can be adopted");
    }
    if hsm.binding_key_created() && stored_keys > 0 {
        return Err(ServerError::StartupCheck(format!(
            "token {} had no blob-binding key, but {} holds {stored_keys} keys: this is not the token the \
             store was made with (check hsm.token_label and the PKCS#11 module). Refusing to start.",
            hsm.token().label,
            config.store.describe()
        )));
    }
    let keyauth = Arc::new(KeyAuth::new(hsm.clone()));
    let audit_settings = AuditSettings {
        path: config.audit_path(),
        server: config.server.id.clone().unwrap_or_default(),
        checkpoint_every_records: config.audit.checkpoint_every_records,
        checkpoint_every: std::time::Duration::from_secs(config.audit.checkpoint_every_seconds),
        new_trail: options.new_audit_trail,
    };
    let (audit, writer) = AuditLog::start(audit_settings, hsm.clone(), store.clone(), Arc::clone(&keyauth)).await?;
    match crate::reconcile::at_startup(&store, hsm, &keyauth, &audit).await {
        Ok(report) => {
            let destroyed = report.leftovers_destroyed + report.debris_destroyed + report.incomplete_destroyed;
            if destroyed > 0 || report.unknown_objects > 0 || report.forged_rows > 0 || report.forged_intents > 0 {
                let facts = crate::audit::RequestFacts {
                    rpc: "StartupReconciliation",
                    request_id: crate::service::request_id(),
                    caller: crate::audit::log::OPERATOR_IDENTITY.to_owned(),
                    ..Default::default()
                };
                let detail = format!(
                    "destroyed: {} objects of DESTROYED versions, {} objects of unacknowledged creations, {} incomplete \
                     objects; kept: {} unknown objects ({} of acknowledged creations missing from the store), {} undecided; \
                     refused: {} key rows, {} intents",
                    report.leftovers_destroyed,
                    report.debris_destroyed,
                    report.incomplete_destroyed,
                    report.unknown_objects,
                    report.acknowledged_unrecorded,
                    report.undecided,
                    report.forged_rows,
                    report.forged_intents
                );
                audit.append(crate::audit::record(&facts, kms_audit::Outcome::Ok, 0, &detail)).await?;
            }
            Ok((store, keyauth, audit, writer))
        }
        Err(e) => Err(ServerError::StartupCheck(e.to_string())),
    }
}

fn tls_config(config: &Config) -> Result<MutualTls, ServerError> {
    let cert = read(&config.tls.cert, "server certificate")?;
    let key = zeroize::Zeroizing::new(read(&config.tls.key, "server private key")?);
    let mut cas = Vec::new();
    for ca in &config.tls.client_ca {
        cas.push(read(ca, "client CA certificate")?);
    }
    // Client certificates are mandatory; one that does not chain to these CAs, or is not valid
    // now, completes the handshake but every request on it is refused (see `crate::tls`).
    MutualTls::new(&cert, &key, &cas).map_err(|e| ServerError::Tls(e.to_string()))
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::ReadFile { what, path: path.to_owned(), source })
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R, ServerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServerError::Serve(format!("blocking task failed: {e}")))
}
