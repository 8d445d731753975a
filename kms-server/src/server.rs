//! Start-up, serving and shutdown: builds the TLS acceptor, the store, the HSM pool and the policy
//! from a [`Config`], checks the token and the keys before accepting a single request, serves the
//! gRPC services over mutual TLS, and finalises the HSM on the way out.
//!
//! Start-up refuses to serve when a key version's HSM object is readable (not sensitive, or
//! extractable): that would break SPEC.md invariant 1 and means the token was tampered with.
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
use crate::keyauth::{KeyAuth, KeyAuthError};
use crate::service::data_keys::DataKeysService;
use crate::service::hsm_crypto::HsmCryptoService;
use crate::service::key_admin::KeyAdminService;
use crate::service::approvals::ApprovalsService;
use crate::service::audit::AuditService;
use crate::service::callers::CallersService;
use crate::audit::{AuditLog, AuditSettings};
use crate::tls::MutualTls;
use crate::service::{AppState, LifecycleSettings, Limits};
use crate::store::{KeyFilter, KeyState, Store, StoreError};

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
}

/// Runs the server until `shutdown` completes.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let tls = tls_config(&config)?;

    let store_path = config.store.path.clone();
    let store = blocking(move || Store::open(&store_path)).await??;
    let key_cache = Arc::new(crate::key_cache::KeyCache::new(store.change_probe()?));

    let pin = config.hsm.read_pin()?;
    let hsm_config = HsmConfig {
        module: config.hsm.module.clone(),
        token_label: config.hsm.token_label.clone(),
        pin,
        approved_up_to: config.hsm.approved_up_to,
        workers: config.hsm.workers,
        softhsm_conf: config.hsm.softhsm_conf.clone(),
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

    let keyauth = Arc::new(KeyAuth::new(hsm.clone()));
    if let Err(e) = startup_checks(&store, &hsm, &keyauth).await {
        hsm.shutdown();
        return Err(e);
    }

    let audit_settings = AuditSettings {
        path: config.audit_path(),
        checkpoint_every_records: config.audit.checkpoint_every_records,
        checkpoint_every: std::time::Duration::from_secs(config.audit.checkpoint_every_seconds),
    };
    let (audit, audit_writer) = match AuditLog::start(audit_settings, hsm.clone()) {
        Ok(v) => v,
        Err(e) => {
            hsm.shutdown();
            return Err(e.into());
        }
    };

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
    let scheduler = crate::service::rotation::spawn(
        state.clone(),
        std::time::Duration::from_secs(config.server.rotation_check_seconds),
    );

    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| ServerError::Listen { addr: config.server.listen, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServerError::Listen { addr: config.server.listen, source })?;
    tracing::info!(address = %bound, "kms-server listening (mutual TLS)");
    if let Some(path) = &options.ready_file {
        std::fs::write(path, bound.to_string())
            .map_err(|source| ServerError::ReadyFile { path: path.clone(), source })?;
    }

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
    let router = tonic::transport::Server::builder()
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
    let result = {
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
    };
    scheduler.abort();
    let _ = scheduler.await;
    drop(state);
    // Every handle on the audit log is gone: the writer signs a last checkpoint and ends.
    if tokio::time::timeout(std::time::Duration::from_secs(10), audit_writer).await.is_err() {
        tracing::error!("the audit writer did not finish within 10 s; the last records may lack a checkpoint");
    }
    tracing::info!("kms-server stopping; finalising the HSM");
    blocking(move || hsm.shutdown()).await?;
    result.map_err(|e| ServerError::Serve(e.to_string()))
}

/// What start-up reconciliation found and repaired.
#[derive(Debug, Default)]
struct Reconciliation {
    keys: usize,
    forged_rows: usize,
    /// Live versions whose HSM object is missing (never repaired: it would take the key's data).
    missing_objects: usize,
    /// Token objects no row names, left by a creation or rotation that crashed before its commit;
    /// destroyed (no blob can refer to them: a blob is made only after the commit).
    orphans_destroyed: usize,
    /// Objects of DESTROYED versions, left by a crash between the tombstone and the destruction;
    /// destroyed.
    leftovers_destroyed: usize,
    /// Objects with neither id nor label, left by a key generation killed half-way; destroyed.
    incomplete_destroyed: usize,
}

/// Reconciles the store with the token before serving (SPEC.md invariant 6), and reports:
/// - every key row's MAC is verified (a forged row is reported, and refused on every use);
/// - every live version's object exists and is a sensitive, non-extractable token key;
/// - objects of DESTROYED versions still on the token are destroyed;
/// - token objects in the service's `CKA_ID` format that no row names are destroyed;
/// - keys whose level the token is not approved for are reported (refused on every use).
async fn startup_checks(store: &Store, hsm: &Hsm, keyauth: &KeyAuth) -> Result<(), ServerError> {
    let s = store.clone();
    let stored = blocking(move || s.list_keys(&KeyFilter::default())).await??;
    let mut report = Reconciliation { keys: stored.len(), ..Reconciliation::default() };
    let mut keys = Vec::with_capacity(stored.len());
    for row in stored {
        match keyauth.verify(row).await {
            Ok(k) => keys.push(k),
            Err(KeyAuthError::Forged { key }) => {
                report.forged_rows += 1;
                tracing::error!(key = %key, "key row failed authentication at start-up; it will be refused");
            }
            Err(KeyAuthError::ForgedApproval { .. } | KeyAuthError::ForgedCaller { .. }) => {}
            Err(KeyAuthError::Hsm(e)) => return Err(e.into()),
        }
    }
    // One listing of the token, compared with the rows: a find per version would make start-up
    // quadratic in the number of tombstones.
    let incomplete = hsm.destroy_incomplete_objects().await?;
    if incomplete > 0 {
        report.incomplete_destroyed = incomplete;
        tracing::warn!(objects = incomplete, "repaired: destroyed token objects with neither id nor label (a key generation was interrupted half-way)");
    }
    let on_token: std::collections::HashSet<Vec<u8>> =
        hsm.list_key_object_ids().await?.into_iter().map(|o| o.0).collect();
    for key in &keys {
        if key.classification > hsm.approved_up_to() {
            tracing::error!(
                key = %key.name, level = %key.classification, approved_up_to = %hsm.approved_up_to(),
                "key's level is above the token's approval: every use of it will be refused"
            );
        }
        for v in &key.versions {
            let present = on_token.contains(v.object_id.as_bytes());
            if v.state == KeyState::Destroyed {
                if present {
                    match hsm.destroy_key(&v.object_id).await {
                        Ok(()) | Err(HsmError::ObjectNotFound { .. }) => {
                            report.leftovers_destroyed += 1;
                            tracing::warn!(key = %key.name, version = v.version, "repaired: destroyed the HSM object of a DESTROYED version (a destruction was interrupted)");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                continue;
            }
            if !present {
                report.missing_objects += 1;
                tracing::error!(key = %key.name, version = v.version, state = %v.state, "HSM object of key version is missing from the token");
                continue;
            }
            let info = hsm.inspect_key(&v.object_id).await?;
            if !info.sensitive || info.extractable || !info.token {
                return Err(ServerError::StartupCheck(format!(
                    "HSM object of key {} version {} is not a sensitive, non-extractable token key \
                     (sensitive={}, extractable={}, token={}); refusing to serve",
                    key.name, v.version, info.sensitive, info.extractable, info.token
                )));
            }
        }
    }
    // Orphans: compared with every version row, authenticated or not, so that a forged row's
    // objects are never destroyed on its account.
    let s = store.clone();
    let known: std::collections::HashSet<Vec<u8>> =
        blocking(move || s.all_version_object_ids()).await??.into_iter().map(|o| o.0).collect();
    for id in on_token {
        if id.len() != 20 || known.contains(&id) {
            continue;
        }
        let id = crate::ids::ObjectId(id);
        match hsm.destroy_key(&id).await {
            Ok(()) | Err(HsmError::ObjectNotFound { .. }) => {
                report.orphans_destroyed += 1;
                tracing::warn!(object = %id, "repaired: destroyed a token object that no key version names (a creation or rotation was interrupted before its commit)");
            }
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(
        keys = report.keys,
        forged_rows = report.forged_rows,
        missing_objects = report.missing_objects,
        orphans_destroyed = report.orphans_destroyed,
        leftovers_destroyed = report.leftovers_destroyed,
        incomplete_destroyed = report.incomplete_destroyed,
        "start-up reconciliation of store and token done"
    );
    Ok(())
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
