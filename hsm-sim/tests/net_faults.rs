//! Faults of a network HSM, injected by `hsm-sim serve` and seen through the client module: added
//! latency, failed calls, dropped connections, a hang past the module's deadline, and the HSM
//! process killed and restarted. Each test asserts the exact codes a service would see, and that
//! it recovers by opening new sessions, without restarting.
//!
//! Run with cargo-nextest (one process per test); see `common` for why.

#![forbid(unsafe_code)]

mod common;

use std::time::{Duration, Instant};

use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki_sys::*;
use hsm_sim_wire::Op;

use common::{code, find_by_label, known_session_key, token_kek, Endpoint, Net};

/// The module notices a closed connection on its reader thread; give it a moment before asserting
/// the code of a call made after the fact (a call already in flight gets `CKR_DEVICE_ERROR`).
fn let_the_module_notice() {
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn latency_delays_each_call_by_about_the_configured_time_without_serialising_sessions() {
    let net = Net::start();
    let s = net.user_session();
    let kek = token_kek(&s, "kek");
    let dk = known_session_key(&s, &[3; 32]);
    let wrap = |s: &cryptoki::session::Session| s.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk).expect("wrap");
    let time = |n: u32, s: &cryptoki::session::Session| {
        let t = Instant::now();
        for _ in 0..n {
            wrap(s);
        }
        t.elapsed() / n
    };
    let base = time(20, &s);
    net.hsm.set_latency(Duration::from_millis(5)).expect("latency 5ms");
    let slow = time(20, &s);
    let added = slow.saturating_sub(base);
    assert!(added >= Duration::from_micros(4900) && added < Duration::from_millis(12), "added {added:?} per call (base {base:?})");
    assert_eq!(net.hsm.status().expect("status").latency, Duration::from_millis(5));

    // Eight sessions, ten calls each: serialised that would take at least 400 ms.
    let p11 = net.p11().clone();
    let slot = net.slot;
    let t = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let p11 = p11.clone();
            std::thread::spawn(move || {
                let s = p11.open_rw_session(slot).expect("session");
                for _ in 0..10 {
                    s.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk).expect("wrap");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().expect("thread");
    }
    let parallel = t.elapsed();
    assert!(parallel < Duration::from_millis(250), "8 x 10 calls at 5 ms took {parallel:?}");

    net.hsm.set_latency(Duration::ZERO).expect("latency 0");
    assert!(time(10, &s) < Duration::from_millis(3));
}

#[test]
fn fail_n_fails_exactly_n_calls_with_that_code_and_the_next_succeeds() {
    let net = Net::start();
    let s = net.user_session();
    net.hsm.fail_next(3, CKR_DEVICE_ERROR, None).expect("fail 3");
    for _ in 0..3 {
        assert_eq!(code(s.generate_random_vec(16)), RvError::DeviceError);
    }
    assert_eq!(s.generate_random_vec(16).expect("the fourth call").len(), 16);

    for (rv, want) in [
        (CKR_SESSION_HANDLE_INVALID, RvError::SessionHandleInvalid),
        (CKR_DEVICE_REMOVED, RvError::DeviceRemoved),
        (CKR_TOKEN_NOT_PRESENT, RvError::TokenNotPresent),
        (CKR_GENERAL_ERROR, RvError::GeneralError),
    ] {
        net.hsm.fail_next(1, rv, None).expect("fail 1");
        assert_eq!(code(s.generate_random_vec(16)), want);
        s.generate_random_vec(16).expect("the call after");
    }
    let status = net.hsm.status().expect("status");
    assert_eq!((status.faults, status.failures_pending), (7, 0));
}

#[test]
fn fail_n_of_one_function_fails_only_that_function() {
    let net = Net::start();
    let s = net.user_session();
    let kek = token_kek(&s, "kek");
    let dk = known_session_key(&s, &[9; 32]);
    net.hsm.fail_next(2, CKR_SESSION_HANDLE_INVALID, Some(Op::WrapKey)).expect("fail 2 C_WrapKey");
    s.digest(&Mechanism::Sha256, b"other functions pass").expect("not a wrap");
    s.generate_random_vec(8).expect("not a wrap either");
    for _ in 0..2 {
        assert_eq!(code(s.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk)), RvError::SessionHandleInvalid);
    }
    // The session itself was never invalid: the third wrap works.
    assert_eq!(s.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk).expect("third wrap").len(), 40);

    // An operation's Init call names it too.
    net.hsm
        .send(&hsm_sim::control::ControlCommand::parse("fail 1 CKR_DEVICE_ERROR C_EncryptInit").expect("parse"))
        .expect("fail 1 C_EncryptInit");
    assert_eq!(code(s.encrypt(&Mechanism::AesEcb, dk, &[0; 16])), RvError::DeviceError);
    assert_eq!(s.encrypt(&Mechanism::AesEcb, dk, &[0; 16]).expect("encrypt").len(), 16);
}

#[test]
fn dropped_connections_fail_the_next_call_and_new_sessions_recover() {
    let net = Net::start();
    let s = net.user_session();
    let kek = token_kek(&s, "kek");
    net.hsm.drop_connections().expect("drop");
    let_the_module_notice();
    assert_eq!(code(s.generate_random_vec(8)), RvError::SessionHandleInvalid);
    assert_eq!(code(s.wrap_key(&Mechanism::AesKeyWrapPad, kek, kek)), RvError::SessionHandleInvalid);

    // A new session (the module reconnects by itself) works after a new login.
    let s2 = net.user_session();
    // A handle from the dropped connection is refused, not sent to the new SoftHSM instance.
    let dk = known_session_key(&s2, &[5; 32]);
    assert_eq!(code(s2.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk)), RvError::WrappingKeyHandleInvalid);
    let kek = *find_by_label(&s2, "kek").first().expect("the KEK is still on the token");
    assert_eq!(s2.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk).expect("wrap").len(), 40);
    let status = net.hsm.status().expect("status");
    assert_eq!((status.connections, status.accepted), (1, 2));
}

#[test]
fn a_call_in_flight_when_the_connection_drops_gets_device_error() {
    let net = Net::start();
    let s = net.user_session();
    net.hsm.hang(None).expect("hang");
    let p11 = net.p11().clone();
    let slot = net.slot;
    let waiting = std::thread::spawn(move || {
        let s = p11.open_ro_session(slot);
        s.map(drop)
    });
    while net.hsm.status().expect("status").held == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    net.hsm.drop_connections().expect("drop");
    assert_eq!(code(waiting.join().expect("thread")), RvError::DeviceError);
    net.hsm.release().expect("release");
    let_the_module_notice();
    assert_eq!(code(s.generate_random_vec(8)), RvError::SessionHandleInvalid);
    net.user_session().generate_random_vec(8).expect("a new session works");
}

#[test]
fn a_hang_times_out_at_the_module_deadline_with_device_error_and_release_restores_service() {
    let deadline = Duration::from_millis(400);
    let net = Net::start_with(Endpoint::Unix, Some(deadline));
    let s = net.user_session();

    // A hang shorter than the deadline only delays the call.
    net.hsm.hang(Some(Duration::from_millis(150))).expect("hang 150ms");
    let t = Instant::now();
    s.generate_random_vec(8).expect("a call that waits out a short hang");
    assert!(t.elapsed() >= Duration::from_millis(140), "{:?}", t.elapsed());

    net.hsm.hang(None).expect("hang");
    let t = Instant::now();
    assert_eq!(code(s.generate_random_vec(8)), RvError::DeviceError);
    let waited = t.elapsed();
    assert!(waited >= deadline && waited < deadline + Duration::from_millis(300), "timed out after {waited:?}");
    assert!(net.hsm.status().expect("status").hanging);
    // The connection is dead after a timeout: the session is gone.
    assert_eq!(code(s.generate_random_vec(8)), RvError::SessionHandleInvalid);
    // While the hang lasts, a new session cannot be opened either (the call that connects waits).
    assert_eq!(code(net.p11().open_ro_session(net.slot)), RvError::DeviceError);

    net.hsm.release().expect("release");
    let s2 = net.user_session();
    assert_eq!(s2.generate_random_vec(8).expect("service restored").len(), 8);
}

#[test]
fn a_killed_and_restarted_hsm_fails_old_sessions_serves_new_ones_and_keeps_its_objects() {
    let net_start = Net::start_with(Endpoint::Tcp, Some(Duration::from_millis(2000)));
    let mut net = net_start;
    let s = net.user_session();
    token_kek(&s, "survivor");
    let old_pid = net.hsm.pid().expect("running");
    net.hsm.kill();
    let_the_module_notice();
    assert_eq!(code(s.generate_random_vec(8)), RvError::SessionHandleInvalid);
    // Nothing listens: a call that needs a new connection fails at once.
    assert_eq!(code(net.p11().open_rw_session(net.slot)), RvError::DeviceError);

    net.hsm.restart().expect("restart on the same port");
    assert_ne!(net.hsm.pid(), Some(old_pid));
    let s2 = net.user_session();
    let kek = *find_by_label(&s2, "survivor").first().expect("the token object survived the restart");
    let dk = known_session_key(&s2, &[1; 32]);
    assert_eq!(s2.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk).expect("wrap").len(), 40);
    assert_eq!(net.hsm.status().expect("status").accepted, 1, "a fresh process");
}

#[test]
fn finalize_and_initialize_again_recovers_without_a_restart() {
    let mut net = Net::start();
    let s = net.user_session();
    token_kek(&s, "kek");
    drop(s);
    net.hsm.drop_connections().expect("drop");
    let p11 = net.p11.take().expect("initialised");
    p11.finalize().expect("C_Finalize");
    let p11 = cryptoki::context::Pkcs11::new(hsm_sim::NetHsm::module_path().expect("module")).expect("load");
    assert_eq!(
        code(p11.initialize(cryptoki::context::CInitializeArgs::new(cryptoki::context::CInitializeFlags::OS_LOCKING_OK)).and_then(|()| {
            p11.initialize(cryptoki::context::CInitializeArgs::new(cryptoki::context::CInitializeFlags::OS_LOCKING_OK))
        })),
        RvError::CryptokiAlreadyInitialized
    );
    net.p11 = Some(p11);
    let s = net.user_session();
    assert_eq!(find_by_label(&s, "kek").len(), 1);
}
