//! Shared harness of the `hsm_*` integration tests: a fresh SoftHSM token per test (under /dev/shm),
//! an open `Hsm` on it, and an independent raw PKCS#11 view to check what is on the token.
//!
//! SoftHSM's configuration and PKCS#11 initialisation are per process, so tests take a process-wide
//! lock: they run one at a time under plain `cargo test`, and alone under nextest.
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use hsm_sim::SimToken;
use kms_server::classification::Classification;
use kms_server::hsm::{Hsm, HsmConfig};
use kms_server::ids::{KeyId, ObjectId};

static SOFTHSM: Mutex<()> = Mutex::new(());

pub struct TestHsm {
    pub hsm: Option<Hsm>,
    pub token: SimToken,
    _dir: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl TestHsm {
    /// A new token and an `Hsm` approved up to `approved`, with 2 workers.
    pub fn new(approved: Classification) -> TestHsm {
        let serial = SOFTHSM.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::Builder::new().prefix("kms-hsm-test").tempdir_in("/dev/shm").expect("tempdir");
        let token = SimToken::create(&dir.path().join("softhsm"), "kms-hsm-test").expect("create token");
        let hsm = Hsm::open(config(&token, approved)).expect("open hsm");
        TestHsm { hsm: Some(hsm), token, _dir: dir, _serial: serial }
    }

    pub fn hsm(&self) -> &Hsm {
        self.hsm.as_ref().expect("hsm open")
    }

    /// Shuts the `Hsm` down and opens it again on the same token.
    pub fn reopen(&mut self, approved: Classification) {
        if let Some(h) = self.hsm.take() {
            h.shutdown();
        }
        self.hsm = Some(Hsm::open(config(&self.token, approved)).expect("reopen hsm"));
    }

    /// An independent session on the same token (the library is already initialised by the `Hsm`;
    /// this handle shares it and never finalises).
    pub fn raw_session(&self) -> Session {
        self.open_raw(false)
    }

    /// Like [`TestHsm::raw_session`], read-write (the `Hsm`'s login covers it).
    pub fn raw_rw_session(&self) -> Session {
        self.open_raw(true)
    }

    fn open_raw(&self, rw: bool) -> Session {
        let p = Pkcs11::new(self.token.module_path()).expect("module");
        let _ = p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)); // already initialised
        let slot = p
            .get_slots_with_initialized_token()
            .expect("slots")
            .into_iter()
            .find(|s| p.get_token_info(*s).expect("info").label().trim_end() == self.token.label())
            .expect("slot");
        if rw {
            p.open_rw_session(slot).expect("raw rw session")
        } else {
            p.open_ro_session(slot).expect("raw session")
        }
    }

    /// All objects this process can see on the token (token objects and this process's session
    /// objects).
    pub fn object_count(&self) -> usize {
        self.raw_session().find_objects(&[]).expect("find all").len()
    }

    pub fn raw_find(&self, id: &[u8]) -> Vec<ObjectHandle> {
        self.raw_session().find_objects(&[Attribute::Id(id.to_vec())]).expect("find by id")
    }

    /// What the token says about reading CKA_VALUE of `id`: (get_attribute_info, get_attributes).
    pub fn try_read_value(&self, id: &ObjectId) -> (AttributeInfo, Vec<Attribute>) {
        let s = self.raw_session();
        let h = *s.find_objects(&[Attribute::Id(id.0.clone())]).expect("find").first().expect("object exists");
        let info = s.get_attribute_info(h, &[AttributeType::Value]).expect("attribute info").remove(0);
        let attrs = s.get_attributes(h, &[AttributeType::Value]).expect("get attributes");
        (info, attrs)
    }
}

impl Drop for TestHsm {
    fn drop(&mut self) {
        if let Some(h) = self.hsm.take() {
            h.shutdown();
        }
    }
}

pub fn config(token: &SimToken, approved: Classification) -> HsmConfig {
    HsmConfig {
        module: token.module_path().to_owned(),
        token_label: token.label().to_owned(),
        pin: token.user_pin().clone(),
        approved_up_to: approved,
        workers: 2,
        softhsm_conf: Some(token.conf_path().to_owned()),
        module_env: Vec::new(),
        call_timeout: std::time::Duration::from_secs(10),
        admin_timeout: std::time::Duration::from_secs(10),
    }
}

pub fn new_object_id() -> ObjectId {
    ObjectId::for_version(KeyId::random().expect("random"), 1)
}

/// The state a server's services run on, over `token`'s HSM and `store`, with a new audit trail
/// at `audit_path` written by server `server` (empty: a store's only server), no callers, and short
/// lifecycle waits; the writer task is detached.
pub async fn app_state(token: &TestHsm, store: &kms_server::store::Store, audit_path: &std::path::Path, server: &str) -> kms_server::service::AppState {
    use std::sync::Arc;
    use kms_server::audit::{AuditLog, AuditSettings};
    let hsm = token.hsm().clone();
    let settings = AuditSettings {
        path: audit_path.to_owned(),
        server: server.to_owned(),
        checkpoint_every_records: 1000,
        checkpoint_every: std::time::Duration::from_secs(3600),
        new_trail: false,
    };
    let keyauth = Arc::new(kms_server::keyauth::KeyAuth::new(hsm.clone()));
    let (audit, _writer) = AuditLog::start(settings, hsm.clone(), store.clone(), Arc::clone(&keyauth)).await.expect("start the audit trail");
    let policy = kms_server::authz::Policy::new(
        vec![],
        kms_server::classification::LevelRules::default(),
        true,
        "kms-hsm-test".into(),
        Classification::TopSecret,
    );
    kms_server::service::AppState {
        policy: Arc::new(policy),
        hsm,
        store: store.clone(),
        keyauth,
        limits: kms_server::service::Limits { max_payload_bytes: 1024 },
        lifecycle: kms_server::service::LifecycleSettings { destruction_wait_seconds: 60, approval_ttl_seconds: 3600 },
        lifecycle_lock: Arc::new(tokio::sync::Mutex::new(())),
        audit,
        key_cache: Arc::new(kms_server::key_cache::KeyCache::new(store.change_probe().expect("the store's change probe"))),
    }
}
