//! A server that survives its HSM, against the network HSM simulator (`hsm-sim serve`, its own
//! process) with faults injected into the real HSM process, never into the server:
//! - data-key load at 8 in flight while the HSM is, in turn, slowed to 5 ms a call, made to fail
//!   100 calls with `CKR_DEVICE_ERROR`, made to drop every connection, hung, and killed and
//!   restarted. Every request is answered correctly or refused `UNAVAILABLE` (never a wrong answer,
//!   never another error), within a bounded time; service resumes by itself after each fault; and
//!   a restart finds store and token consistent.
//! - an HSM error during a lifecycle change leaves store and token consistent, and what must not be
//!   retried (a key creation) is not, while what may (a wrap) is.
//!
//! `KMS_FAULT_LONG=1` runs the long form (longer phases, a 10 s hang): `scripts/fault-soak`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_sim::control::ControlCommand;
use hsm_sim_wire::{rv_from_name, Op};
use kms_client::Delivery;
use kms_e2e::pb::{self, Classification as L};
use kms_e2e::load::{DataKeyLoad, Tally};
use kms_e2e::{ctx, HsmMode, Settings, TestServer};
use tonic::Code;

fn network() -> Settings {
    Settings { hsm: HsmMode::Network, lifecycle_check_seconds: 1, ..Settings::default() }
}

fn long() -> bool {
    std::env::var("KMS_FAULT_LONG").is_ok_and(|v| v == "1")
}

fn fail(server: &TestServer, count: u32, code: &str, function: Option<&str>) {
    let rv = rv_from_name(code).expect("a CKR_ name");
    let function = function.map(|f| Op::from_function_name(f).expect("a PKCS#11 function"));
    server.net_hsm().unwrap().send(&ControlCommand::Fail { count, rv, function }).expect("inject the failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_key_load_survives_a_slow_failing_dropping_hung_and_restarted_hsm() {
    let mut server = TestServer::start(network());
    server.client("officer").await.create_key("load", L::Personal, None, None).await.unwrap();
    // A refused request is retried after a short pause, as a client would.
    let load = DataKeyLoad::start(&server.client("exchange").await, "load", 8, Duration::from_millis(2));
    let t = Arc::clone(&load.tally);
    let phase = if long() { Duration::from_secs(5) } else { Duration::from_millis(1500) };
    let net = |server: &TestServer| server.net_hsm().unwrap().send(&ControlCommand::Status).unwrap();
    let mut report = Vec::new();
    let snapshot = |t: &Tally| (t.ok(), t.unavailable());
    tokio::time::sleep(phase).await;
    let (ok0, _) = snapshot(&t);
    assert!(ok0 > 0, "the load runs");

    // 1. Slowed to 5 ms a call.
    let before = snapshot(&t);
    server.net_hsm().unwrap().set_latency(Duration::from_millis(5)).unwrap();
    tokio::time::sleep(phase).await;
    server.net_hsm().unwrap().set_latency(Duration::ZERO).unwrap();
    let after = snapshot(&t);
    assert!(after.0 > before.0, "requests are answered while the HSM is slow");
    report.push(("5 ms per call", after.0 - before.0, after.1 - before.1, Duration::ZERO));

    // 2. 100 calls answered CKR_DEVICE_ERROR. Every call counts, the recovery's own attempts too
    // (one failed call each), so the HSM is well again only once the 100th has been answered.
    let before = snapshot(&t);
    let at = Instant::now();
    fail(&server, 100, "CKR_DEVICE_ERROR", None);
    let well = loop {
        if server.net_hsm().unwrap().status().unwrap().failures_pending == 0 {
            break Instant::now();
        }
        assert!(at.elapsed() < Duration::from_secs(60), "the injected failures were not all answered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let took = load.recovered(at, Duration::from_secs(30)).await;
    tokio::time::sleep(phase).await;
    let after = snapshot(&t);
    eprintln!(
        "100 x CKR_DEVICE_ERROR: the last injected failure was answered {} ms after the first; service resumed {} ms after that",
        well.duration_since(at).as_millis(),
        took.saturating_sub(well.duration_since(at)).as_millis()
    );
    report.push(("100 x CKR_DEVICE_ERROR", after.0 - before.0, after.1 - before.1, took));

    // 3. Every connection dropped.
    let before = snapshot(&t);
    let at = Instant::now();
    server.net_hsm().unwrap().drop_connections().unwrap();
    let took = load.recovered(at, Duration::from_secs(30)).await;
    tokio::time::sleep(phase).await;
    let after = snapshot(&t);
    report.push(("connections dropped", after.0 - before.0, after.1 - before.1, took));

    // 4. Hung (no answer at all), then answering again.
    let hang = if long() { Duration::from_secs(10) } else { Duration::from_secs(3) };
    let before = snapshot(&t);
    t.slowest_ms.store(0, Ordering::Relaxed);
    let at = Instant::now();
    server.net_hsm().unwrap().hang(Some(hang)).unwrap();
    tokio::time::sleep(hang).await;
    let took = load.recovered(at, Duration::from_secs(30)).await;
    let slowest = t.slowest_ms.load(Ordering::Relaxed);
    tokio::time::sleep(phase).await;
    let after = snapshot(&t);
    // One request is two calls to the server, each bounded by the HSM deadline (2 s) and the wait
    // for a recovery (2 s more): a hung HSM never hangs a request.
    assert!(slowest < 9_000, "a request took {slowest} ms while the HSM hung");
    report.push(("hung", after.0 - before.0, after.1 - before.1, took.saturating_sub(hang)));

    // 5. Killed, and started again a moment later.
    let before = snapshot(&t);
    let at = Instant::now();
    server.net_hsm_mut().unwrap().kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let restarted = Instant::now();
    server.net_hsm_mut().unwrap().restart().expect("restart the HSM");
    let took = load.recovered(restarted, Duration::from_secs(30)).await;
    tokio::time::sleep(phase).await;
    let after = snapshot(&t);
    report.push(("killed and restarted", after.0 - before.0, after.1 - before.1, took));
    let _ = at;

    let t = load.stop().await;
    eprintln!("fault                      answered  UNAVAILABLE  resumed after");
    for (name, ok, unavailable, took) in &report {
        eprintln!("{name:<26} {ok:>8}  {unavailable:>11}  {:>8} ms", took.as_millis());
    }
    eprintln!("hsm-sim: {}", net(&server));
    assert_eq!(t.wrong(), 0, "no wrong answer, ever");
    assert!(t.other().is_empty(), "only UNAVAILABLE refusals: {:?}", t.other());
    assert!(t.unavailable.load(Ordering::Relaxed) > 0, "the faults were felt");
    // The health says what happened: ready again, reopened at least once per fault that lost it
    // (device errors, dropped connections, the hang, the kill), with the last error.
    let health = server.client("officer").await.hsm_health().await.unwrap();
    assert_eq!(health.state, pb::HsmState::Ready as i32, "{health:?}");
    assert!(health.reconnects >= 4 && health.generation == health.reconnects + 1, "{health:?}");
    assert!(!health.last_error.is_empty() && health.last_error_unix > 0 && health.lost_since_unix == 0, "{health:?}");
    eprintln!("health: generation {} reconnects {} last error {:?}", health.generation, health.reconnects, health.last_error);
    let log = server.log();
    assert!(log.contains("the HSM is lost; requests are answered UNAVAILABLE while it is reopened"), "{log}");
    assert!(log.contains("the HSM answers again: reopened, logged in and serving"), "{log}");

    // The state at the end reconciles with no repair.
    server.restart(network());
    let line = server.log().lines().rfind(|l| l.contains("start-up reconciliation of store and token done")).unwrap().to_owned();
    for field in ["forged_rows=0", "missing_objects=0", "unknown_objects=0", "debris_destroyed=0", "undecided=0"] {
        assert!(line.contains(field), "{field} not in {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hsm_error_retries_a_wrap_but_never_a_key_creation_and_leaves_no_debris() {
    let mut server = TestServer::start(network());
    let officer = server.client("officer").await;
    officer.create_key("k", L::Personal, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[]);

    // One failed wrap: the data-key request runs again on the reopened HSM and succeeds.
    fail(&server, 1, "CKR_DEVICE_ERROR", Some("C_WrapKey"));
    x.generate_data_key("k", &c, Delivery::PlaintextAndWrapped).await.expect("a wrap is retried");

    // One failed key generation: the creation is answered UNAVAILABLE, not tried again (a retry
    // would have succeeded: only one failure was injected).
    fail(&server, 1, "CKR_DEVICE_ERROR", Some("C_GenerateKey"));
    let err = officer.create_key("never", L::Personal, None, None).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(err.status().unwrap().message().contains("the HSM"), "{err}");
    assert_eq!(officer.get_key("never").await.unwrap_err().code(), Some(Code::NotFound));
    officer.create_key("again", L::Personal, None, None).await.expect("the HSM is back");

    // A rotation whose key generation fails: answered UNAVAILABLE, not rotated, and its intent
    // (recorded before the HSM was called) is cleared by the lifecycle task once the trail shows
    // the request answered with its failure; the version number is then free again.
    fail(&server, 1, "CKR_DEVICE_ERROR", Some("C_GenerateKey"));
    let err = officer.key_admin().rotate_key(pb::RotateKeyRequest { name: "k".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(officer.get_key("k").await.unwrap().primary_version, 1, "not rotated");
    let intents = || -> i64 {
        rusqlite::Connection::open(server.store_path()).unwrap().query_row("SELECT count(*) FROM object_intents", [], |r| r.get(0)).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while intents() > 0 {
        assert!(Instant::now() < deadline, "the failed rotation's intent stayed:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    officer.key_admin().rotate_key(pb::RotateKeyRequest { name: "k".into() }).await.expect("rotate");
    assert_eq!(officer.get_key("k").await.unwrap().primary_version, 2);
    let key_ids: Vec<String> = server.token_object_ids();
    assert_eq!(key_ids.len(), 4, "binding key, k v1 and v2, again v1: {key_ids:?}");

    // Store and token agree after a restart, with nothing left to repair.
    drop((officer, x));
    server.restart(network());
    let line = server.log().lines().rfind(|l| l.contains("start-up reconciliation of store and token done")).unwrap().to_owned();
    for field in ["missing_objects=0", "unknown_objects=0", "debris_destroyed=0", "forged_intents=0"] {
        assert!(line.contains(field), "{field} not in {line}");
    }
}
