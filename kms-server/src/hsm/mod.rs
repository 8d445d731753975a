//! The PKCS#11 layer: the only module of the project that calls `cryptoki`.
//!
//! [`Hsm`] is a cheap-to-clone handle on one token of one PKCS#11 module. It owns the process's
//! PKCS#11 context ([`context`]), a logged-in session kept open for its whole life, and a bounded pool
//! of worker threads ([`pool`]) that each own an R/W session and run every PKCS#11 call. Object handles
//! are cached by `CKA_ID` ([`handles`]); `C_FindObjects` runs only on a cache miss.
//!
//! Code map: [`error`] (the error type), [`templates`] (every attribute template), [`keys`] (key-version
//! objects), [`data_keys`] (envelope data keys), [`payload`] (in-HSM AES-GCM), [`binding`] (the
//! blob-binding MAC key), [`audit_key`] (the audit checkpoint signing key).
//!
//! Architecture invariants: every operation that takes a level checks it against the token's approval
//! first, on every call; no key value of a token key is ever read; no data key remains as an object;
//! PKCS#11 never runs on the async runtime. This module must never log or format a PIN, a key value
//! or a plaintext. It needs no `unsafe`.

mod audit_key;
mod binding;
mod context;
mod data_keys;
mod error;
mod generation;
mod handles;
mod keys;
mod payload;
mod pool;
mod recovery;
mod templates;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use cryptoki::mechanism::Mechanism;
use secrecy::SecretString;
use zeroize::Zeroizing;

pub use binding::BindingInput;
pub use data_keys::{DataKey, GenerateDataKey, GeneratedDataKey, ReWrapDataKey, ReWrappedDataKey, UnwrapDataKey};
pub use error::{HsmError, Pkcs11Code, Pkcs11Function};
pub use keys::{KeyObjectInfo, ListedObject};
pub use payload::{DecryptPayload, EncryptPayload, ReEncryptPayload};

use crate::classification::{Classification, DataKeyRelease};
use crate::ids::{KeyPurpose, ObjectId};
use generation::Generation;
pub use recovery::{HsmHealth, HsmState};

/// Jobs that may wait in the queue per worker before callers wait for room.
pub(crate) const QUEUE_PER_WORKER: usize = 64;

/// How to reach the token.
pub struct HsmConfig {
    /// The vendor's PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// The token is found by label, never by slot number.
    pub token_label: String,
    pub pin: SecretString,
    /// The highest level this token is approved for (by configuration).
    pub approved_up_to: Classification,
    /// Worker threads of the request path, each with its own session. At least 1. Token writes run on
    /// one more session and thread of their own.
    pub workers: usize,
    /// For SoftHSM: put in `SOFTHSM2_CONF` before `C_Initialize`.
    pub softhsm_conf: Option<PathBuf>,
    /// Environment variables the module reads at `C_Initialize` (a network module's endpoint and
    /// timeouts, say), set before it.
    pub module_env: Vec<(String, String)>,
    /// The deadline of one request-path call (cryptography with existing keys). A call that takes
    /// longer is taken for a hung HSM: the request is answered `UNAVAILABLE` and the HSM reopened.
    pub call_timeout: Duration,
    /// The deadline of one admin call (token-object writes and searches, checkpoint signatures).
    pub admin_timeout: Duration,
}

impl fmt::Debug for HsmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmConfig")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"<redacted>")
            .field("approved_up_to", &self.approved_up_to)
            .field("workers", &self.workers)
            .field("softhsm_conf", &self.softhsm_conf)
            .field("module_env", &self.module_env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("call_timeout", &self.call_timeout)
            .field("admin_timeout", &self.admin_timeout)
            .finish()
    }
}

/// What the token says about itself (space padding trimmed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub label: String,
    pub serial: String,
    pub manufacturer: String,
    pub model: String,
}

impl TokenInfo {
    /// A SoftHSM software token (not approved hardware, whatever the configuration says).
    pub fn is_softhsm(&self) -> bool {
        self.manufacturer.contains("SoftHSM") || self.model.contains("SoftHSM")
    }
}

/// A handle on the HSM token. Cheap to clone; all clones share one pool and one context.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: HsmConfig,
    token: TokenInfo,
    approved_up_to: Classification,
    /// The generation requests use; replaced as a whole by a recovery.
    current: RwLock<Arc<Generation>>,
    /// Bumped when a recovery installs a new generation; requests waiting for one watch it.
    installed: tokio::sync::watch::Sender<u64>,
    recovery: recovery::Recovery,
    closed: AtomicBool,
    /// The audit signing key's public half, uncompressed SEC1.
    audit_public_key: Vec<u8>,
    /// Whether opening the token had to create the blob-binding key.
    binding_key_created: bool,
}

impl fmt::Debug for Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hsm")
            .field("token", &self.inner.token)
            .field("approved_up_to", &self.inner.approved_up_to)
            .finish_non_exhaustive()
    }
}

/// Which pool a job runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    Request,
    Admin,
}

/// Whether a job may run again after the HSM was lost under it. Cryptography with existing keys,
/// MACs, searches and signatures may (running them twice changes nothing on the token); creating
/// or destroying a token object never is: the first attempt may have reached the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    Safe,
    Never,
}

impl Hsm {
    /// Loads the module, finds the token by label, logs in, creates the blob-binding MAC key and the
    /// audit signing key pair if the token has none, and starts the workers. Blocking: call it from a blocking context.
    pub fn open(cfg: HsmConfig) -> Result<Hsm, HsmError> {
        if cfg.workers == 0 {
            return Err(HsmError::InvalidConfig { reason: "workers must be at least 1" });
        }
        let pkcs11 = context::acquire(&cfg.module, cfg.softhsm_conf.as_deref(), &cfg.module_env)?;
        let opened = match Generation::open(&pkcs11, &cfg, 1, generation::Keys::CreateIfMissing) {
            Ok(o) => o,
            Err(e) => {
                context::release();
                return Err(e);
            }
        };
        let (installed, _) = tokio::sync::watch::channel(1);
        Ok(Hsm {
            inner: Arc::new(Inner {
                current: RwLock::new(Arc::new(opened.generation)),
                installed,
                recovery: recovery::Recovery::default(),
                token: opened.token,
                approved_up_to: cfg.approved_up_to,
                closed: AtomicBool::new(false),
                audit_public_key: opened.audit_public_key,
                binding_key_created: opened.binding_key_created,
                cfg,
            }),
        })
    }

    /// What the HSM layer knows of its HSM's health now (for readiness checks and operators).
    pub fn health(&self) -> HsmHealth {
        let generation = self.inner.generation();
        self.inner.recovery.health(&generation, self.inner.cfg.workers)
    }

    /// Whether the token had no blob-binding key when it was opened, and one was created: a new
    /// token, or not the token a key store with keys was made with (every row MAC would fail).
    pub fn binding_key_created(&self) -> bool {
        self.inner.binding_key_created
    }

    /// The audit checkpoint signing key's public half (ECDSA P-256, uncompressed SEC1 point).
    pub fn audit_public_key(&self) -> &[u8] {
        &self.inner.audit_public_key
    }

    /// Signs an audit checkpoint digest with the token's audit key: 64 bytes, `r || s`.
    pub async fn sign_audit_digest(&self, digest: [u8; 32]) -> Result<Vec<u8>, HsmError> {
        self.run(Lane::Admin, Retry::Safe, move |w| audit_key::sign_digest(w, &digest)).await
    }

    pub fn token(&self) -> &TokenInfo {
        &self.inner.token
    }

    pub fn approved_up_to(&self) -> Classification {
        self.inner.approved_up_to
    }

    /// Creates an AES-256 key-version object on the token (sensitive, non-extractable, copyable into
    /// a session object; wrap/unwrap for Envelope, encrypt/decrypt for HsmEncrypt).
    pub async fn create_key(
        &self,
        id: &ObjectId,
        label: &str,
        level: Classification,
        purpose: KeyPurpose,
    ) -> Result<(), HsmError> {
        self.check_level(level)?;
        let (id, label) = (id.clone(), label.to_owned());
        self.run(Lane::Admin, Retry::Never, move |w| keys::create(w, &id, &label, purpose)).await
    }

    pub async fn destroy_key(&self, id: &ObjectId) -> Result<(), HsmError> {
        let id = id.clone();
        self.run(Lane::Admin, Retry::Never, move |w| keys::destroy(w, &id)).await
    }

    pub async fn key_exists(&self, id: &ObjectId) -> Result<bool, HsmError> {
        let id = id.clone();
        self.run(Lane::Admin, Retry::Safe, move |w| keys::exists(w, &id)).await
    }

    /// The key object's security attributes (never its value).
    pub async fn inspect_key(&self, id: &ObjectId) -> Result<KeyObjectInfo, HsmError> {
        let id = id.clone();
        self.run(Lane::Admin, Retry::Safe, move |w| keys::inspect(w, &id)).await
    }

    /// Every secret-key token object with a `CKA_ID` (the binding key excepted), with its label.
    /// Uses `C_FindObjects`: for start-up reconciliation and officers' inventory of the token only.
    pub async fn list_key_objects(&self) -> Result<Vec<ListedObject>, HsmError> {
        self.run(Lane::Admin, Retry::Safe, keys::list).await
    }

    /// How many secret-key objects have neither `CKA_ID` nor `CKA_LABEL` (see
    /// [`Hsm::destroy_incomplete_objects`]).
    pub async fn count_incomplete_objects(&self) -> Result<usize, HsmError> {
        self.run(Lane::Admin, Retry::Safe, keys::count_incomplete).await
    }

    /// Destroys at most `max` secret-key token objects that have neither `CKA_ID` nor `CKA_LABEL`:
    /// the debris of a key generation killed half-way (SoftHSM writes an object in steps). The
    /// caller proves how many such objects are the service's own (one per creation it began whose
    /// object is missing). For start-up reconciliation only.
    pub async fn destroy_incomplete_objects(&self, max: usize) -> Result<usize, HsmError> {
        self.run(Lane::Admin, Retry::Never, move |w| keys::destroy_incomplete(w, max)).await
    }

    /// A fresh data key wrapped under `kek` and bound with the HSM MAC; the plaintext too if asked
    /// and allowed. Refused for levels whose data keys are `Never` released.
    pub async fn generate_data_key(&self, req: GenerateDataKey) -> Result<GeneratedDataKey, HsmError> {
        self.check_level(req.level)?;
        check_data_key_level(req.level)?;
        self.run(Lane::Request, Retry::Safe, move |w| data_keys::generate(w, &req)).await
    }

    /// Verifies the MAC in the HSM, then unwraps. Any tampering, or another KEK, is
    /// [`HsmError::IntegrityCheckFailed`].
    pub async fn unwrap_data_key(&self, req: UnwrapDataKey) -> Result<DataKey, HsmError> {
        self.check_level(req.level)?;
        check_data_key_level(req.level)?;
        self.run(Lane::Request, Retry::Safe, move |w| data_keys::unwrap(w, &req)).await
    }

    /// Moves a wrapped data key under another KEK (and header) inside the HSM: verifies the source
    /// MAC, unwraps into a sensitive session object, wraps and MACs again, destroys the object. The
    /// data key never reaches host memory. Both levels are checked as for [`Hsm::unwrap_data_key`].
    pub async fn rewrap_data_key(&self, req: ReWrapDataKey) -> Result<ReWrappedDataKey, HsmError> {
        for level in [req.source.level, req.destination_level] {
            self.check_level(level)?;
            check_data_key_level(level)?;
        }
        self.run(Lane::Request, Retry::Safe, move |w| data_keys::rewrap(w, &req)).await
    }

    /// AES-256-GCM inside the HSM; returns ciphertext || 16-byte tag.
    pub async fn encrypt(&self, req: EncryptPayload) -> Result<Vec<u8>, HsmError> {
        self.check_level(req.level)?;
        self.run(Lane::Request, Retry::Safe, move |w| payload::encrypt(w, &req)).await
    }

    /// AES-256-GCM inside the HSM; a failed tag is [`HsmError::IntegrityCheckFailed`].
    pub async fn decrypt(&self, req: DecryptPayload) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.check_level(req.level)?;
        self.run(Lane::Request, Retry::Safe, move |w| payload::decrypt(w, &req)).await
    }

    /// Decrypts a payload and encrypts it again under another key, in one worker job: the plaintext
    /// never leaves the HSM layer and is zeroized at once. Both levels are checked.
    pub async fn reencrypt(&self, req: ReEncryptPayload) -> Result<Vec<u8>, HsmError> {
        self.check_level(req.source.level)?;
        self.check_level(req.destination_level)?;
        self.run(Lane::Request, Retry::Safe, move |w| payload::reencrypt(w, &req)).await
    }

    /// HMAC-SHA256, inside the HSM, over a key-metadata record (domain-separated from blob MACs).
    pub async fn mac_metadata(&self, record: Vec<u8>) -> Result<[u8; 32], HsmError> {
        self.run(Lane::Request, Retry::Safe, move |w| binding::mac_metadata(w, &record)).await
    }

    /// Checks a key-metadata MAC inside the HSM; a mismatch is [`HsmError::IntegrityCheckFailed`].
    pub async fn verify_metadata(&self, record: Vec<u8>, mac: [u8; 32]) -> Result<(), HsmError> {
        self.run(Lane::Request, Retry::Safe, move |w| binding::verify_metadata(w, &record, &mac)).await
    }

    /// Stops the workers (queued jobs finish first), closes every session and releases the PKCS#11
    /// context (`C_Finalize` when no other `Hsm` of the process uses it). Blocking.
    ///
    /// Takes effect for every clone: clones still alive get [`HsmError::PoolClosed`] afterwards.
    /// Calling it on several clones is harmless (the first call does the work). Dropping the last
    /// clone without calling it does the same.
    pub fn shutdown(self) {
        self.inner.close();
    }

    /// How many keys have a session copy in this process (the request path works with copies; see
    /// `hsm::handles`). For tests and diagnostics.
    #[doc(hidden)]
    pub fn session_copies(&self) -> usize {
        self.inner.generation().handles.copies()
    }

    /// Test hook: replaces the cached handle of `id` with a handle that is no longer valid (a
    /// destroyed session object), to exercise the evict-find-retry path.
    #[doc(hidden)]
    pub async fn danger_poison_handle_cache_for_tests(&self, id: &ObjectId) -> Result<(), HsmError> {
        let id = id.clone();
        self.run(Lane::Request, Retry::Never, move |w| {
            let stale = w.session.generate_key(&Mechanism::AesKeyGen, &templates::session_data_key(false))?;
            w.session.destroy_object(stale)?;
            w.handles.poison_for_tests(id.as_bytes(), stale);
            Ok(())
        })
        .await
    }

    /// Runs `job` on a worker of the current generation, within the lane's deadline. If the HSM is
    /// found lost (its sessions dead, the device or token gone, the deadline passed), the generation
    /// is abandoned and a recovery started; a `Retry::Safe` job runs once more on the recovered
    /// generation if it comes within the deadline, and otherwise the caller gets
    /// [`HsmError::Unavailable`].
    async fn run<T, F>(&self, lane: Lane, retry: Retry, job: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&pool::Worker) -> Result<T, HsmError> + Send + Sync + 'static,
    {
        let timeout = match lane {
            Lane::Request => self.inner.cfg.call_timeout,
            Lane::Admin => self.inner.cfg.admin_timeout,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let job = Arc::new(job);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let generation = self.inner.usable_generation(deadline).await?;
            let j = Arc::clone(&job);
            let pool = match lane {
                Lane::Request => &generation.pool,
                Lane::Admin => &generation.admin,
            };
            let result = match tokio::time::timeout(timeout, pool.run(move |w| j(w))).await {
                Ok(r) => r,
                Err(_) => Err(HsmError::Timeout { after_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX) }),
            };
            let lost = match &result {
                Err(e) if e.is_connection_loss() => true,
                // A job dropped by a generation that was abandoned under it.
                Err(HsmError::PoolClosed) => !self.inner.closed.load(Ordering::Acquire),
                _ => false,
            };
            if !lost {
                return result;
            }
            let error = result.err().map(|e| e.to_string()).unwrap_or_default();
            self.inner.lost(&generation, &error);
            if retry == Retry::Never || attempt >= 2 || tokio::time::Instant::now() >= deadline {
                return Err(self.inner.recovery.unavailable(&error));
            }
        }
    }

    fn check_level(&self, level: Classification) -> Result<(), HsmError> {
        if level <= self.inner.approved_up_to {
            Ok(())
        } else {
            Err(HsmError::NotApproved {
                level,
                approved: self.inner.approved_up_to,
                token_label: self.inner.token.label.clone(),
            })
        }
    }
}

/// State-secret data keys never exist: their data is encrypted inside the HSM.
fn check_data_key_level(level: Classification) -> Result<(), HsmError> {
    match level.data_key_release() {
        DataKeyRelease::Never => Err(HsmError::ReleaseForbidden { level }),
        DataKeyRelease::Plaintext | DataKeyRelease::SealedToRecipientOnly => Ok(()),
    }
}

impl Inner {
    fn generation(&self) -> Arc<Generation> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The current generation once it is usable: now, or when a recovery installs one before
    /// `deadline`; [`HsmError::Unavailable`] otherwise.
    async fn usable_generation(&self, deadline: tokio::time::Instant) -> Result<Arc<Generation>, HsmError> {
        let mut installed = self.installed.subscribe();
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(HsmError::PoolClosed);
            }
            let generation = self.generation();
            if !generation.is_broken() {
                return Ok(generation);
            }
            if tokio::time::timeout_at(deadline, installed.changed()).await.is_err() {
                return Err(self.recovery.unavailable(""));
            }
        }
    }

    fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let generation = self.generation();
        if generation.is_broken() {
            generation.abandon();
        } else {
            generation.close();
        }
        context::release();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close();
    }
}
