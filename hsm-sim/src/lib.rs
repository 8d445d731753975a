//! Disposable SoftHSMv2 tokens for tests and the dev server.
//!
//! A [`SimToken`] lives in its own directory: `softhsm2.conf`, a `tokens/` store, the token label and
//! the PIN files (mode 0600). The token is initialised through PKCS#11 itself (`C_InitToken`, then
//! `C_InitPIN`) with random PINs; `softhsm2-util` is never run.
//!
//! # SoftHSM reads its configuration once per `C_Initialize`
//!
//! SoftHSM takes `SOFTHSM2_CONF` from the environment when PKCS#11 is initialised, and keeps it until
//! `C_Finalize`. [`SimToken::create`] therefore sets `SOFTHSM2_CONF` for the whole process, initialises,
//! provisions the token and finalises again, so that the process (the dev server, a test) can initialise
//! PKCS#11 afterwards with the same configuration. Consequences:
//! - one process works with one token directory at a time; several tokens (labels) may share a
//!   directory and its configuration;
//! - if PKCS#11 is already initialised in this process (the server's HSM layer is open), `create`
//!   only works when `SOFTHSM2_CONF` already points at the same configuration, and then it leaves the
//!   library initialised for its owner; otherwise it fails with [`SimError::AlreadyInitialized`].
//! - `SOFTHSM2_CONF` is process-global state: do not change it while another thread uses PKCS#11.
//!
//! # A network HSM
//! The `hsm-sim serve` subcommand serves a token directory to PKCS#11 clients over a socket (the
//! client module is the `hsm-sim-p11` crate, `libhsm_sim_p11.so`), with fault injection. Tests
//! run it with [`NetHsm`] and drive its faults through the [`control`] protocol.
//!
//! This crate must never print or log a PIN, and never touch the system-wide token store.
#![forbid(unsafe_code)]

pub mod control;
pub mod net;

pub use net::{NetHsm, NetHsmError};

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use secrecy::{ExposeSecret, SecretString};

/// Where Debian-like systems install the SoftHSM module, tried in order.
const MODULE_PATHS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

const CONF_FILE: &str = "softhsm2.conf";
const LABEL_FILE: &str = "label";
const USER_PIN_FILE: &str = "user.pin";
const SO_PIN_FILE: &str = "so.pin";
/// PKCS#11 token labels are 32 bytes, space padded.
const MAX_LABEL_LEN: usize = 32;

/// Why a simulated token could not be made or opened. Never carries a PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    #[error("SoftHSM module not found (looked at $SOFTHSM2_MODULE and {searched:?}); install it with `apt-get install softhsm2` or set SOFTHSM2_MODULE")]
    ModuleNotFound { searched: Vec<PathBuf> },
    #[error("SOFTHSM2_MODULE points at {path}, which does not exist")]
    ModuleMissing { path: PathBuf },
    #[error("cannot load the PKCS#11 module {path}: {detail}")]
    ModuleLoad { path: PathBuf, detail: String },
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("invalid token label {label:?}: {reason}")]
    InvalidLabel { label: String, reason: &'static str },
    #[error("a token labelled {label:?} already exists in {dir}")]
    LabelExists { label: String, dir: PathBuf },
    #[error("no token labelled {label:?} in {dir}")]
    TokenNotFound { label: String, dir: PathBuf },
    #[error("SoftHSM has no free slot for a new token")]
    NoFreeSlot,
    #[error("PKCS#11 is already initialised in this process with another configuration (SOFTHSM2_CONF={current:?}); SoftHSM reads its configuration only at C_Initialize, so finalise first")]
    AlreadyInitialized { current: Option<String> },
    #[error("{function} failed: {code}")]
    Pkcs11 { function: String, code: String },
    #[error("cryptoki: {0}")]
    Cryptoki(String),
    #[error("the operating system's random generator failed: {0}")]
    Random(getrandom::Error),
    #[error("{path} is not a simulated token directory: {reason}")]
    NotATokenDir { path: PathBuf, reason: &'static str },
}

impl From<CkError> for SimError {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(rv, f) => SimError::Pkcs11 { function: format!("C_{f:?}"), code: format!("{rv:?}") },
            other => SimError::Cryptoki(other.to_string()),
        }
    }
}

/// The SoftHSM module: `$SOFTHSM2_MODULE` if set, else the usual install paths.
pub fn find_softhsm_module() -> Result<PathBuf, SimError> {
    if let Some(p) = std::env::var_os("SOFTHSM2_MODULE") {
        let path = PathBuf::from(p);
        return if path.exists() { Ok(path) } else { Err(SimError::ModuleMissing { path }) };
    }
    MODULE_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| SimError::ModuleNotFound { searched: MODULE_PATHS.iter().map(PathBuf::from).collect() })
}

/// A SoftHSM token in its own directory, with its configuration and PINs.
pub struct SimToken {
    dir: PathBuf,
    conf: PathBuf,
    module: PathBuf,
    label: String,
    user_pin: SecretString,
}

impl fmt::Debug for SimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimToken")
            .field("dir", &self.dir)
            .field("label", &self.label)
            .field("user_pin", &"<redacted>")
            .finish()
    }
}

impl SimToken {
    /// Creates (or reuses) `dir` with its configuration and initialises a new token labelled `label`.
    ///
    /// Sets `SOFTHSM2_CONF` for the process. A second token in the same directory shares the
    /// configuration and the PINs of the first. The PKCS#11 library is finalised before returning
    /// (unless it was already initialised by someone else with this configuration).
    pub fn create(dir: &Path, label: &str) -> Result<SimToken, SimError> {
        validate_label(label)?;
        let module = find_softhsm_module()?;
        let tokens = dir.join("tokens");
        fs::create_dir_all(&tokens).map_err(io("create", &tokens))?;
        let dir = fs::canonicalize(dir).map_err(io("resolve", dir))?;
        let tokens = dir.join("tokens");
        let conf = dir.join(CONF_FILE);
        if !conf.exists() {
            let text = format!(
                "# SoftHSM configuration written by hsm-sim; private to this directory.\n\
                 directories.tokendir = {}\n\
                 objectstore.backend = file\n\
                 log.level = ERROR\n\
                 slots.removable = false\n",
                tokens.display()
            );
            write_private(&conf, text.as_bytes())?;
        }
        // Reuse the directory's PINs so that every token in it opens with the same files.
        let user_pin_path = dir.join(USER_PIN_FILE);
        let so_pin_path = dir.join(SO_PIN_FILE);
        let (user_pin, so_pin) = if user_pin_path.exists() && so_pin_path.exists() {
            (read_pin(&user_pin_path)?, read_pin(&so_pin_path)?)
        } else {
            let pins = (random_pin()?, random_pin()?);
            write_private(&user_pin_path, pins.0.expose_secret().as_bytes())?;
            write_private(&so_pin_path, pins.1.expose_secret().as_bytes())?;
            pins
        };

        let previous_conf = std::env::var_os("SOFTHSM2_CONF");
        set_conf_env(&conf);
        let pkcs11 = Pkcs11::new(&module)
            .map_err(|e| SimError::ModuleLoad { path: module.clone(), detail: e.to_string() })?;
        let owned = match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => true,
            // Someone in this process holds the library, and SoftHSM keeps the configuration it read
            // at their C_Initialize. Proceed only if that was ours; never finalise their context.
            Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _))
                if previous_conf.as_deref() == Some(conf.as_os_str()) =>
            {
                false
            }
            Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                match &previous_conf {
                    Some(p) => std::env::set_var("SOFTHSM2_CONF", p),
                    None => std::env::remove_var("SOFTHSM2_CONF"),
                }
                return Err(SimError::AlreadyInitialized {
                    current: previous_conf.map(|p| p.to_string_lossy().into_owned()),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let result = provision(&pkcs11, &dir, label, &user_pin, &so_pin);
        if owned {
            // cryptoki does not finalise on drop: do it explicitly, also after a failure.
            let fin = pkcs11.finalize();
            result?;
            fin?;
        } else {
            result?;
        }
        let label_path = dir.join(LABEL_FILE);
        if !label_path.exists() {
            // The first token's label stays the directory's default for `open`.
            write_private(&label_path, label.as_bytes())?;
        }
        Ok(SimToken { dir, conf, module, label: label.to_owned(), user_pin })
    }

    /// Reopens the token made by [`SimToken::create`] in `dir` (the first label created there).
    /// Sets `SOFTHSM2_CONF` for the process; does not touch PKCS#11.
    pub fn open(dir: &Path) -> Result<SimToken, SimError> {
        let label_path = dir.join(LABEL_FILE);
        let label = fs::read_to_string(&label_path).map_err(io("read", &label_path))?;
        Self::open_label(dir, label.trim_end_matches('\n'))
    }

    /// Reopens the token labelled `label` in `dir` (for directories holding several tokens).
    pub fn open_label(dir: &Path, label: &str) -> Result<SimToken, SimError> {
        validate_label(label)?;
        let dir = fs::canonicalize(dir).map_err(io("resolve", dir))?;
        let conf = dir.join(CONF_FILE);
        if !conf.is_file() {
            return Err(SimError::NotATokenDir { path: dir, reason: "no softhsm2.conf" });
        }
        let user_pin = read_pin(&dir.join(USER_PIN_FILE))?;
        let module = find_softhsm_module()?;
        set_conf_env(&conf);
        Ok(SimToken { dir, conf, module, label: label.to_owned(), user_pin })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `softhsm2.conf` to put in `SOFTHSM2_CONF` before `C_Initialize`.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// The SoftHSM PKCS#11 module.
    pub fn module_path(&self) -> &Path {
        &self.module
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The user PIN. Never print it.
    pub fn user_pin(&self) -> &SecretString {
        &self.user_pin
    }

    /// The file (mode 0600) holding the user PIN, for configurations that take a PIN file.
    pub fn user_pin_file(&self) -> PathBuf {
        self.dir.join(USER_PIN_FILE)
    }

    /// The shell line that points SoftHSM tools at this token's configuration.
    pub fn env_line(&self) -> String {
        format!("export SOFTHSM2_CONF={}", self.conf.display())
    }
}

fn provision(
    pkcs11: &Pkcs11,
    dir: &Path,
    label: &str,
    user_pin: &SecretString,
    so_pin: &SecretString,
) -> Result<(), SimError> {
    if find_slot_by_label(pkcs11, label)?.is_some() {
        return Err(SimError::LabelExists { label: label.to_owned(), dir: dir.to_owned() });
    }
    // SoftHSM always offers one slot with an uninitialised token.
    let free = pkcs11
        .get_slots_with_token()?
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).map(|t| !t.token_initialized()).unwrap_or(false))
        .ok_or(SimError::NoFreeSlot)?;
    pkcs11.init_token(free, so_pin, label)?;
    // C_InitToken moves the token to a new slot id: find it again by label.
    let slot = find_slot_by_label(pkcs11, label)?
        .ok_or_else(|| SimError::TokenNotFound { label: label.to_owned(), dir: dir.to_owned() })?;
    let session = pkcs11.open_rw_session(slot)?;
    session.login(UserType::So, Some(so_pin))?;
    session.init_pin(user_pin)?;
    session.logout()?;
    session.close()?;
    Ok(())
}

fn find_slot_by_label(pkcs11: &Pkcs11, label: &str) -> Result<Option<Slot>, SimError> {
    for slot in pkcs11.get_slots_with_initialized_token()? {
        if pkcs11.get_token_info(slot)?.label().trim_end() == label {
            return Ok(Some(slot));
        }
    }
    Ok(None)
}

fn validate_label(label: &str) -> Result<(), SimError> {
    let bad = |reason| Err(SimError::InvalidLabel { label: label.to_owned(), reason });
    if label.is_empty() {
        return bad("empty");
    }
    if label.len() > MAX_LABEL_LEN {
        return bad("longer than 32 bytes");
    }
    if label.trim() != label || label.chars().any(char::is_control) {
        return bad("leading/trailing spaces or control characters");
    }
    Ok(())
}

fn set_conf_env(conf: &Path) {
    // Edition 2021: set_var is safe; it is process-global, see the module docs.
    std::env::set_var("SOFTHSM2_CONF", conf);
}

/// 16 random bytes as 32 hex characters.
fn random_pin() -> Result<SecretString, SimError> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(SimError::Random)?;
    let mut s = String::with_capacity(32);
    for x in b {
        s.push(char::from(b"0123456789abcdef"[usize::from(x >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(x & 0xf)]));
    }
    b.fill(0);
    Ok(SecretString::from(s))
}

fn read_pin(path: &Path) -> Result<SecretString, SimError> {
    let s = fs::read_to_string(path).map_err(io("read", path))?;
    Ok(SecretString::from(s.trim_end_matches(['\n', '\r']).to_owned()))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SimError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))?;
    f.write_all(bytes).map_err(io("write", path))
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SimError + 'a {
    move |source| SimError::Io { action, path: path.to_owned(), source }
}
