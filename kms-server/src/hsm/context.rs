//! The process-wide PKCS#11 context: loading the module, `C_Initialize` once, finding the token by
//! label, the login session, and `C_Finalize` when the last user releases it.
//!
//! Owns the only `Pkcs11` value of the process (reference counted, so that two `Hsm`s in one process
//! do not finalise under each other). Must never fork, never log a PIN, and never close the login
//! session while workers still run (SoftHSM logs the token out when its last session closes).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;

use super::error::{HsmError, Pkcs11Code};
use super::TokenInfo;

struct ProcessContext {
    pkcs11: Pkcs11,
    module: PathBuf,
    users: usize,
}

/// The one PKCS#11 context of this process, and how many open `Hsm`s use it.
static CONTEXT: Mutex<Option<ProcessContext>> = Mutex::new(None);

/// Sets what the module reads from the environment at `C_Initialize`: `SOFTHSM2_CONF` for SoftHSM,
/// and the module's own variables (a network module's endpoint, say).
fn set_environment(softhsm_conf: Option<&Path>, env: &[(String, String)]) {
    // Edition 2021: set_var is safe. It is process-global and read by the module at C_Initialize.
    if let Some(conf) = softhsm_conf {
        std::env::set_var("SOFTHSM2_CONF", conf);
    }
    for (k, v) in env {
        std::env::set_var(k, v);
    }
}

/// Finalises and initialises the module again, to recover from a lost HSM, when this process's
/// only `Hsm` is the caller; otherwise leaves the shared initialisation alone. Blocking.
pub(crate) fn restart(module: &Path, softhsm_conf: Option<&Path>, env: &[(String, String)]) -> Result<Pkcs11, HsmError> {
    let mut guard = CONTEXT.lock().unwrap_or_else(PoisonError::into_inner);
    let ctx = guard
        .as_mut()
        .ok_or_else(|| HsmError::ModuleLoad { path: module.to_owned(), detail: "the PKCS#11 context was released".into() })?;
    if ctx.users == 1 {
        if let Err(e) = ctx.pkcs11.clone().finalize() {
            tracing::debug!(error = %HsmError::from(e), "C_Finalize of the lost HSM failed");
        }
        set_environment(softhsm_conf, env);
        match ctx.pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(ctx.pkcs11.clone())
}

/// Loads and initialises the module (or shares the context already initialised by this layer).
/// `softhsm_conf`, if given, is put in `SOFTHSM2_CONF` before `C_Initialize`; SoftHSM reads it then.
pub(crate) fn acquire(module: &Path, softhsm_conf: Option<&Path>, env: &[(String, String)]) -> Result<Pkcs11, HsmError> {
    let mut guard = CONTEXT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(ctx) = guard.as_mut() {
        if ctx.module != module {
            return Err(HsmError::ModuleLoad {
                path: module.to_owned(),
                detail: format!("this process already uses the PKCS#11 module {}", ctx.module.display()),
            });
        }
        ctx.users += 1;
        return Ok(ctx.pkcs11.clone());
    }
    set_environment(softhsm_conf, env);
    let pkcs11 = Pkcs11::new(module)
        .map_err(|e| HsmError::ModuleLoad { path: module.to_owned(), detail: e.to_string() })?;
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        // Someone else in the process initialised the library: share it (we finalise at the end).
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            tracing::warn!("PKCS#11 was already initialised in this process; sharing that initialisation");
        }
        Err(e) => {
            return Err(HsmError::ModuleLoad { path: module.to_owned(), detail: HsmError::from(e).to_string() })
        }
    }
    *guard = Some(ProcessContext { pkcs11: pkcs11.clone(), module: module.to_owned(), users: 1 });
    Ok(pkcs11)
}

/// Gives back one use of the context; the last one calls `C_Finalize`. All sessions of the caller
/// must be closed already.
pub(crate) fn release() {
    let mut guard = CONTEXT.lock().unwrap_or_else(PoisonError::into_inner);
    let last = match guard.as_mut() {
        Some(ctx) => {
            ctx.users = ctx.users.saturating_sub(1);
            ctx.users == 0
        }
        None => false,
    };
    if last {
        if let Some(ctx) = guard.take() {
            // cryptoki (since 0.11) does not finalise on drop.
            if let Err(e) = ctx.pkcs11.finalize() {
                tracing::warn!(error = %HsmError::from(e), "C_Finalize failed");
            }
        }
    }
}

/// The slot holding the token with this label (the slot id changes when a token is initialised, so
/// never remember slot numbers).
pub(crate) fn find_token(pkcs11: &Pkcs11, label: &str) -> Result<(Slot, TokenInfo), HsmError> {
    for slot in pkcs11.get_slots_with_initialized_token()? {
        let info = pkcs11.get_token_info(slot)?;
        if info.label().trim_end() == label {
            let token = TokenInfo {
                label: info.label().trim_end().to_owned(),
                serial: info.serial_number().trim().to_owned(),
                manufacturer: info.manufacturer_id().trim_end().to_owned(),
                model: info.model().trim_end().to_owned(),
            };
            return Ok((slot, token));
        }
    }
    Err(HsmError::TokenNotFound { label: label.to_owned() })
}

/// Opens the session that keeps the token logged in for the life of the `Hsm`.
pub(crate) fn login(pkcs11: &Pkcs11, slot: Slot, label: &str, pin: &SecretString) -> Result<Session, HsmError> {
    let session = pkcs11.open_rw_session(slot)?;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) => Ok(session),
        // Login is per process and token: another Hsm of this process already logged in.
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(CkError::Pkcs11(rv, _)) => Err(HsmError::Login { label: label.to_owned(), code: Pkcs11Code(rv) }),
        Err(e) => Err(e.into()),
    }
}
