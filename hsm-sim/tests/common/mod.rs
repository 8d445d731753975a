//! What the network-HSM tests share: a token under `/dev/shm`, a running `hsm-sim serve` on it, and
//! `cryptoki` loading the client module `libhsm_sim_p11.so` against it, exactly as the service
//! loads a vendor module.
//!
//! The module reads `HSM_SIM_ENDPOINT` at `C_Initialize`, and SoftHSM reads `SOFTHSM2_CONF` at its
//! own, so each test takes a process-wide lock and finalises both at the end: under cargo-nextest
//! (one process per test) the lock is never contended; under plain `cargo test` the tests of a
//! file run one at a time.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use hsm_sim::{NetHsm, SimToken};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub const LABEL: &str = "net-test";

/// A token, its simulator, and the client module initialised against it.
pub struct Net {
    pub hsm: NetHsm,
    pub token: SimToken,
    pub p11: Option<Pkcs11>,
    pub slot: Slot,
    // Dropped last: the token directory.
    _dir: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl Net {
    /// Over the unix socket, with the module's default deadline.
    pub fn start() -> Net {
        Net::start_with(Endpoint::Unix, None)
    }

    pub fn start_with(endpoint: Endpoint, timeout: Option<Duration>) -> Net {
        let serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::Builder::new().prefix("hsm-net-").tempdir_in("/dev/shm").expect("tempdir in /dev/shm");
        let token = SimToken::create(dir.path(), LABEL).expect("create token");
        let hsm = NetHsm::start(&token).expect("start hsm-sim serve");
        let value = match endpoint {
            Endpoint::Unix => hsm.unix_endpoint(),
            Endpoint::Tcp => hsm.tcp_endpoint().expect("tcp endpoint"),
        };
        std::env::set_var(hsm_sim::net::ENDPOINT_VAR, value);
        match timeout {
            Some(t) => std::env::set_var(hsm_sim::net::TIMEOUT_VAR, t.as_millis().to_string()),
            None => std::env::remove_var(hsm_sim::net::TIMEOUT_VAR),
        }
        let p11 = Pkcs11::new(NetHsm::module_path().expect("client module")).expect("load libhsm_sim_p11.so");
        p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize");
        let slot = find_slot(&p11);
        Net { hsm, token, p11: Some(p11), slot, _dir: dir, _serial: serial }
    }

    pub fn p11(&self) -> &Pkcs11 {
        self.p11.as_ref().expect("initialised")
    }

    /// A read-write session logged in as the user.
    pub fn user_session(&self) -> Session {
        let s = self.p11().open_rw_session(self.slot).expect("C_OpenSession");
        match s.login(UserType::User, Some(self.token.user_pin())) {
            Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => s,
            Err(e) => panic!("C_Login: {e}"),
        }
    }

    pub fn dir(&self) -> &Path {
        self.token.dir()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(p) = self.p11.take() {
            let _ = p.finalize();
        }
    }
}

#[derive(Clone, Copy)]
pub enum Endpoint {
    Unix,
    Tcp,
}

pub fn find_slot(p11: &Pkcs11) -> Slot {
    p11.get_slots_with_initialized_token()
        .expect("C_GetSlotList")
        .into_iter()
        .find(|s| p11.get_token_info(*s).expect("C_GetTokenInfo").label().trim_end() == LABEL)
        .expect("the test token")
}

/// SoftHSM itself, in this process, on the same token directory (for byte comparisons).
pub fn in_process(token: &SimToken) -> (Pkcs11, Slot) {
    let p = Pkcs11::new(token.module_path()).expect("load SoftHSM");
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("SoftHSM C_Initialize");
    let slot = find_slot(&p);
    (p, slot)
}

/// A sensitive, non-extractable AES-256 token key that can wrap, unwrap, encrypt and decrypt.
pub fn token_kek(s: &Session, label: &str) -> ObjectHandle {
    s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ],
    )
    .expect("C_GenerateKey token KEK")
}

/// A readable, extractable AES session key with the value `value`.
pub fn known_session_key(s: &Session, value: &[u8]) -> ObjectHandle {
    s.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(value.to_vec()),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
    ])
    .expect("C_CreateObject session key")
}

pub fn find_by_label(s: &Session, label: &str) -> Vec<ObjectHandle> {
    s.find_objects(&[Attribute::Label(label.as_bytes().to_vec())]).expect("C_FindObjects")
}

/// The `CK_RV` of a failed `cryptoki` call.
pub fn code<T: std::fmt::Debug>(r: Result<T, Error>) -> RvError {
    match r {
        Err(Error::Pkcs11(rv, _)) => rv,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}
