//! SimToken against the real SoftHSM module. SoftHSM's configuration is process-global, so the tests
//! of this file take a lock and run one at a time under plain `cargo test` (nextest runs each alone).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::UserType;
use hsm_sim::{SimError, SimToken};
use secrecy::ExposeSecret;

static SOFTHSM: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SOFTHSM.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("hsm-sim-test").tempdir_in("/dev/shm").expect("tempdir in /dev/shm")
}

/// Initialises PKCS#11 again in this process (as the dev server does after provisioning), finds the
/// token by label, logs in with the user PIN, and finalises.
fn login_after_create(t: &SimToken) -> Vec<String> {
    let p = Pkcs11::new(t.module_path()).expect("load module");
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("second C_Initialize in one process");
    let labels: Vec<String> = p
        .get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .map(|s| p.get_token_info(s).expect("token info").label().trim_end().to_owned())
        .collect();
    let slot = p
        .get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .find(|s| p.get_token_info(*s).expect("info").label().trim_end() == t.label())
        .expect("token found by label");
    let session = p.open_rw_session(slot).expect("session");
    session.login(UserType::User, Some(t.user_pin())).expect("user login with the generated PIN");
    session.close().expect("close");
    p.finalize().expect("finalize");
    labels
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

#[test]
fn create_then_initialise_again_in_the_same_process_and_log_in() {
    let _g = serial();
    let dir = tmp();
    let t = SimToken::create(&dir.path().join("hsm"), "sim-one").expect("create token");
    assert_eq!(t.label(), "sim-one");
    assert_eq!(std::env::var_os("SOFTHSM2_CONF").as_deref(), Some(t.conf_path().as_os_str()));
    let conf = std::fs::read_to_string(t.conf_path()).expect("conf");
    assert!(conf.contains("objectstore.backend = file"));
    assert!(conf.contains(&format!("directories.tokendir = {}", t.dir().join("tokens").display())));
    assert_eq!(mode(&t.user_pin_file()), 0o600);
    assert_eq!(mode(&t.dir().join("so.pin")), 0o600);
    assert!(t.user_pin().expose_secret().len() >= 16);
    assert!(!format!("{t:?}").contains(t.user_pin().expose_secret()), "Debug must redact the PIN");
    let labels = login_after_create(&t);
    assert_eq!(labels, ["sim-one"]);
    // And a third initialisation still works (C_Finalize really reset the library).
    login_after_create(&t);
}

#[test]
fn a_second_token_in_the_same_dir_shares_the_configuration() {
    let _g = serial();
    let dir = tmp();
    let a = SimToken::create(dir.path(), "sim-a").expect("first token");
    let b = SimToken::create(dir.path(), "sim-b").expect("second token");
    assert_eq!(a.conf_path(), b.conf_path());
    let mut labels = login_after_create(&b);
    labels.sort();
    assert_eq!(labels, ["sim-a", "sim-b"]);
    login_after_create(&a);
}

#[test]
fn reopening_reads_label_conf_and_pin() {
    let _g = serial();
    let dir = tmp();
    let made = SimToken::create(dir.path(), "sim-reopen").expect("create");
    let again = SimToken::open(dir.path()).expect("open");
    assert_eq!(again.label(), "sim-reopen");
    assert_eq!(again.conf_path(), made.conf_path());
    assert_eq!(again.user_pin().expose_secret(), made.user_pin().expose_secret());
    login_after_create(&again);
}

#[test]
fn duplicate_and_invalid_labels_are_refused() {
    let _g = serial();
    let dir = tmp();
    SimToken::create(dir.path(), "sim-dup").expect("create");
    let err = SimToken::create(dir.path(), "sim-dup").expect_err("same label twice");
    assert!(matches!(err, SimError::LabelExists { .. }), "{err}");
    let err = SimToken::create(dir.path(), "a label that is much longer than 32 bytes").expect_err("long");
    assert!(matches!(err, SimError::InvalidLabel { .. }), "{err}");
}

#[test]
fn binary_creates_a_token_and_never_prints_the_pin() {
    let _g = serial();
    let dir = tmp();
    let d = dir.path().join("cli");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hsm-sim"))
        .args(["create", "--dir"])
        .arg(&d)
        .args(["--label", "sim-cli"])
        .output()
        .expect("run hsm-sim");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pin = std::fs::read_to_string(d.join("user.pin")).expect("pin file");
    let so = std::fs::read_to_string(d.join("so.pin")).expect("so pin file");
    assert!(!stdout.contains(pin.trim()) && !stdout.contains(so.trim()));
    assert!(stdout.contains("label: sim-cli"));
    assert!(stdout.contains("user.pin"));
    let env = std::process::Command::new(env!("CARGO_BIN_EXE_hsm-sim"))
        .args(["env", "--dir"])
        .arg(&d)
        .output()
        .expect("run hsm-sim env");
    assert!(env.status.success());
    let line = String::from_utf8_lossy(&env.stdout);
    assert!(line.starts_with("export SOFTHSM2_CONF=") && line.trim_end().ends_with("softhsm2.conf"), "{line}");
}
