//! One opening of the token: the logged-in session, the two worker pools with their sessions, and
//! the handle cache. When the HSM is lost (its sessions die, the module reports the device or token
//! gone, a call hangs past its deadline) the whole generation is abandoned and a new one is opened
//! in its place (`super::recovery`): handles and session copies belong to a generation and die with
//! it.
//!
//! Must never create a service key while re-opening (a token that lost its binding or audit key is
//! not the token the store was made with: recovery stays down and says so), and never join a worker
//! thread that may be stuck in a call to a hung HSM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cryptoki::context::Pkcs11;
use cryptoki::session::Session;

use super::error::HsmError;
use super::handles::HandleCache;
use super::pool::Pool;
use super::{audit_key, binding, context, keys, HsmConfig, TokenInfo, QUEUE_PER_WORKER};

/// What opening a generation learnt about the token.
pub(crate) struct Opened {
    pub(crate) generation: Generation,
    pub(crate) token: TokenInfo,
    pub(crate) audit_public_key: Vec<u8>,
    pub(crate) binding_key_created: bool,
}

pub(crate) struct Generation {
    /// 1 for the generation opened at start-up, then one more per recovery.
    pub(crate) number: u64,
    /// The request path: cryptography with existing keys (`HsmConfig::workers` sessions).
    pub(crate) pool: Pool,
    /// Token-object writes and searches and audit checkpoint signatures, on a session and thread
    /// of their own: a token write takes a millisecond on tmpfs and up to 100 ms on a disk, and
    /// must not hold up data-key requests queued behind it.
    pub(crate) admin: Pool,
    /// Shared by both pools (token handles and the keys' session copies).
    pub(crate) handles: Arc<HandleCache>,
    /// Keeps the token logged in (closing the last session logs it out). Closed after the workers.
    login: Mutex<Option<Session>>,
    /// Set once a call of this generation found the HSM lost: no new job goes to it.
    broken: AtomicBool,
}

/// Whether opening may make the service's own keys (only the first opening, at start-up).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keys {
    CreateIfMissing,
    MustExist,
}

impl Generation {
    /// Finds the token by label, logs in, finds (or, at start-up, creates) the binding and audit
    /// keys, and starts the workers. Blocking.
    pub(crate) fn open(pkcs11: &Pkcs11, cfg: &HsmConfig, number: u64, keys_rule: Keys) -> Result<Opened, HsmError> {
        let mut sessions = Vec::with_capacity(cfg.workers + 1);
        let (slot, token) = context::find_token(pkcs11, &cfg.token_label)?;
        let login = context::login(pkcs11, slot, &cfg.token_label, &cfg.pin)?;
        let handles = Arc::new(HandleCache::default());
        let (binding_key_created, audit_public_key) = match keys_rule {
            Keys::CreateIfMissing => (binding::ensure_key(&login, &handles)?, audit_key::ensure_key(&login, &handles)?),
            Keys::MustExist => {
                if !binding::find_key(&login, &handles)? {
                    return Err(HsmError::ServiceKeyMissing { what: "blob-binding key" });
                }
                let public = audit_key::find_key(&login, &handles)?.ok_or(HsmError::ServiceKeyMissing { what: "audit signing key" })?;
                (false, public)
            }
        };
        for _ in 0..=cfg.workers {
            sessions.push(pkcs11.open_rw_session(slot)?);
        }
        let token_writes = Arc::new(Mutex::new(()));
        let admin_session = sessions.pop().into_iter().collect();
        let pool = Pool::start(
            &format!("hsm-worker-g{number}"),
            sessions,
            Arc::clone(&handles),
            Arc::clone(&token_writes),
            cfg.workers * QUEUE_PER_WORKER,
        )?;
        let admin = match Pool::start(&format!("hsm-admin-g{number}"), admin_session, Arc::clone(&handles), token_writes, QUEUE_PER_WORKER) {
            Ok(a) => a,
            Err(e) => {
                pool.close();
                return Err(e);
            }
        };
        let generation =
            Generation { number, pool, admin, handles, login: Mutex::new(Some(login)), broken: AtomicBool::new(false) };
        Ok(Opened { generation, token, audit_public_key, binding_key_created })
    }

    /// After a recovery: the handle of every key object on the token, so that creation keeps
    /// `CKA_ID`s unique without searching (see `keys::create`). Blocking in a worker job.
    pub(crate) async fn fill_handle_cache(&self) -> Result<usize, HsmError> {
        self.admin.run(|w| keys::list(w).map(|objects| objects.len())).await
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Marks the generation lost; true for the caller that marked it first.
    pub(crate) fn mark_broken(&self) -> bool {
        !self.broken.swap(true, Ordering::AcqRel)
    }

    /// Stops the workers cleanly (queued jobs finish) and closes the login session. Blocking.
    pub(crate) fn close(&self) {
        self.pool.close();
        self.admin.close();
        self.close_login();
    }

    /// Stops taking jobs without waiting for the workers: one may be stuck in a call to a hung HSM
    /// (it ends when the module gives up on that call). Its sessions close as its threads exit.
    pub(crate) fn abandon(&self) {
        self.pool.abandon();
        self.admin.abandon();
        // The login session's C_CloseSession would also wait for a hung HSM: leave it to the
        // process (a finalised module forgets it).
        std::mem::forget(self.login.lock().unwrap_or_else(PoisonError::into_inner).take());
    }

    fn close_login(&self) {
        if let Some(login) = self.login.lock().unwrap_or_else(PoisonError::into_inner).take() {
            if let Err(e) = login.close() {
                tracing::warn!(error = %HsmError::from(e), "closing the login session failed");
            }
        }
    }
}
