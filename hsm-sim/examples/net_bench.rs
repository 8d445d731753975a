//! Measures the network HSM simulator: `C_WrapKey` (KWP, a 32-byte data key under a session copy of
//! a token KEK, as the service does) per second, in process on SoftHSM and through the client
//! module over a unix socket and TCP loopback, then with `latency 1ms` at 1, 4, 16 and 64 sessions
//! in parallel.
//!
//! ```text
//! cargo build --release -p hsm-sim -p hsm-sim-p11 && cargo build --release -p hsm-sim --examples
//! target/release/examples/net_bench [seconds per run, default 3]
//! ```
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use hsm_sim::{NetHsm, SimToken};

const LABEL: &str = "bench";

fn slot(p: &Pkcs11) -> Slot {
    p.get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .find(|s| p.get_token_info(*s).expect("token info").label().trim_end() == LABEL)
        .expect("bench token")
}

/// A logged-in session and a session copy of the token KEK.
fn prepare(p: &Pkcs11, token: &SimToken) -> (Session, ObjectHandle) {
    let s = p.open_rw_session(slot(p)).expect("session");
    match s.login(UserType::User, Some(token.user_pin())) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    let kek = match s.find_objects(&[Attribute::Label(b"kek".to_vec())]).expect("find").first() {
        Some(k) => *k,
        None => s
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Label(b"kek".to_vec()),
                    Attribute::Token(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Wrap(true),
                    Attribute::Unwrap(true),
                ],
            )
            .expect("KEK"),
    };
    let copy = s.copy_object(kek, &[Attribute::Token(false)]).expect("session copy of the KEK");
    (s, copy)
}

fn data_key(s: &Session) -> ObjectHandle {
    s.create_object(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(vec![7; 32]),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
    ])
    .expect("data key")
}

/// Wraps per second over `sessions` sessions (one thread each) for `secs`.
fn wraps_per_second(p: &Pkcs11, kek: ObjectHandle, sessions: usize, secs: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let slot = slot(p);
    let threads: Vec<_> = (0..sessions)
        .map(|_| {
            let (p, done, stop) = (p.clone(), Arc::clone(&done), Arc::clone(&stop));
            std::thread::spawn(move || {
                let s = p.open_rw_session(slot).expect("session");
                let dk = data_key(&s);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    s.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk).expect("wrap");
                    n += 1;
                }
                done.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    let t = Instant::now();
    std::thread::sleep(secs);
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join().expect("thread");
    }
    done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

fn client(endpoint: &str) -> Pkcs11 {
    std::env::set_var(hsm_sim::net::ENDPOINT_VAR, endpoint);
    let p = Pkcs11::new(NetHsm::module_path().expect("module")).expect("load the client module");
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize");
    p
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").parse().unwrap_or(0))))
        .unwrap_or(0)
}

/// The RSS of a child of `parent` (a backend).
fn backend_rss_kb(parent: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if status.lines().any(|l| l.strip_prefix("PPid:").map(str::trim) == Some(&parent.to_string())) {
            return rss_kb(pid);
        }
    }
    0
}

fn main() {
    let secs = Duration::from_secs(std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3));
    let dir = tempfile::Builder::new().prefix("hsm-bench-").tempdir_in("/dev/shm").expect("tempdir");
    let token = SimToken::create(dir.path(), LABEL).expect("token");

    let local = Pkcs11::new(token.module_path()).expect("SoftHSM");
    local.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("init");
    let (login, kek) = prepare(&local, &token);
    let in_process = wraps_per_second(&local, kek, 1, secs);
    println!("in-process SoftHSM, 1 session:      {in_process:>8.0} wraps/s  ({:>6.1} us each)", 1e6 / in_process);
    let in_process_64 = wraps_per_second(&local, kek, 64, secs);
    println!("in-process SoftHSM, 64 sessions:    {in_process_64:>8.0} wraps/s  (SoftHSM's own ceiling with many threads)");
    drop(login);
    local.finalize().expect("finalize");

    let hsm = NetHsm::start(&token).expect("hsm-sim serve");
    for (name, endpoint) in [("unix socket", hsm.unix_endpoint()), ("TCP loopback", hsm.tcp_endpoint().expect("tcp"))] {
        let p = client(&endpoint);
        let (login, kek) = prepare(&p, &token);
        let r = wraps_per_second(&p, kek, 1, secs);
        println!(
            "{name:<13}, 1 session:           {r:>8.0} wraps/s  ({:>6.1} us each, {:>5.1} us more than in process)",
            1e6 / r,
            1e6 / r - 1e6 / in_process
        );
        drop(login);
        p.finalize().expect("finalize");
    }

    // A new connection starts a backend process (and its C_Initialize): the first call pays it.
    let mut first_calls = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let p = client(&hsm.unix_endpoint());
        p.get_slots_with_token().expect("C_GetSlotList");
        first_calls.push(t.elapsed());
        p.finalize().expect("finalize");
    }
    first_calls.sort();
    println!("first call on a new connection (backend start): median {:?}, max {:?}", first_calls[5], first_calls[9]);
    let p = client(&hsm.unix_endpoint());
    let (login, kek) = prepare(&p, &token);
    if let Some(pid) = hsm.pid() {
        println!("memory: serve {} kB, one backend {} kB (RSS)", rss_kb(pid), backend_rss_kb(pid));
    }
    drop(login);
    p.finalize().expect("finalize");
    let _ = kek;

    hsm.set_latency(Duration::from_millis(1)).expect("latency 1ms");
    let p = client(&hsm.unix_endpoint());
    let (login, kek) = prepare(&p, &token);
    for sessions in [1, 4, 16, 64] {
        let r = wraps_per_second(&p, kek, sessions, secs);
        println!("unix socket, latency 1ms, {sessions:>2} sessions: {r:>8.0} wraps/s");
    }
    drop(login);
    p.finalize().expect("finalize");
    println!("{:?}", hsm.status().expect("status"));
}
