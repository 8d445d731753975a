//! Several servers on one PostgreSQL store and one network HSM (whatever the run's defaults:
//! this test always uses both): a key made on one server is used on another at once, a caller
//! revoked on one is refused by the others within the bound, each server writes its own audit
//! trail under its own anchor, and exactly one server at a time runs the lifecycle task, another
//! taking over when the holder is killed.

use std::time::{Duration, Instant};

use std::sync::Arc;

use kms_client::{Delivery, KmsClient};
use kms_e2e::load::DataKeyLoad;
use kms_e2e::pb::Classification as L;
use kms_e2e::{ctx, identity_of, HsmMode, Settings, StoreMode, TestServer};
use tonic::Code;

const HOLDS: &str = "this server holds the lifecycle lease";
const WAITS: &str = "another server holds the lifecycle lease";

fn shared() -> Settings {
    Settings { hsm: HsmMode::Network, store: StoreMode::Postgres, lifecycle_check_seconds: 1, ..Settings::default() }
}

/// Waits (at most `limit`) until `check` holds; how long it took.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_share_keys_callers_and_one_lifecycle_task() {
    let settings = shared();
    let one = TestServer::start(settings.clone());
    let two = one.start_peer(&settings, 2);
    let mut three = one.start_peer(&settings, 3);

    // A key created on one server is used on the others at once.
    let officer = one.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    let c = ctx(&[("record", "7")]);
    let on_two = two.client("exchange").await;
    let made = on_two.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    let on_three = three.client("exchange").await;
    let opened = on_three.decrypt_data_key(&made.wrapped, &c, None, None).await.unwrap();
    assert_eq!(opened.plaintext.as_slice(), made.plaintext.as_ref().unwrap().as_slice());
    // And a key the others have served is rotated on one of them: the next data key on another
    // server is made under the new version.
    let rotated = three.kmsctl("officer", &["key", "rotate", "citizens"]);
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    // (Within the propagation bound: server 2 may serve version 1 for the milliseconds the
    // store's notification takes.)
    let rotated_at = Instant::now();
    let mut after = on_two.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    while after.key_version != 2 {
        assert!(rotated_at.elapsed() < Duration::from_secs(1), "server 2 still uses version {}", after.key_version);
        tokio::time::sleep(Duration::from_millis(10)).await;
        after = on_two.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    }
    eprintln!("server 2 used the version made on server 3 {:?} after the rotation was answered", rotated_at.elapsed());
    let back = one.client("exchange").await.decrypt_data_key(&after.wrapped, &c, None, None).await.unwrap();
    assert_eq!(back.key_version, 2);

    // A caller revoked on one server is refused by the others within the bound (1 s).
    let exchange_on_three = three.client("exchange").await;
    exchange_on_three.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    officer.revoke_caller(&identity_of("exchange")).await.unwrap();
    let revoked_at = Instant::now();
    let revoked = (Code::Unauthenticated, format!("caller {} was revoked", identity_of("exchange")));
    for (n, client) in [(3, &exchange_on_three), (2, &on_two)] {
        let bound = Duration::from_secs(1).saturating_sub(revoked_at.elapsed());
        eventually(bound, &format!("the revocation reaches server {n} within 1 s"), || {
            let answer = block_on(client.generate_data_key("citizens", &c, Delivery::WrappedOnly));
            answer.err().and_then(|e| e.status().map(|s| (s.code(), s.message().to_owned()))) == Some(revoked.clone())
        });
        eprintln!("a revocation on server 1 was refused by server {n} {:?} after it was made", revoked_at.elapsed());
    }

    // Each server writes its own trail under its own anchor, and `kmsctl audit verify` checks
    // all of them at once, offline, each against its own server's anchor.
    let anchor_of = |out: std::process::Output| -> String {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().find_map(|l| l.strip_prefix("anchor: ")).expect("an anchor line").to_owned()
    };
    let anchors = [
        anchor_of(one.kmsctl("auditor", &["audit", "anchor"])),
        anchor_of(two.kmsctl("auditor", &["audit", "anchor"])),
        anchor_of(three.kmsctl("auditor", &["audit", "anchor"])),
    ];
    let pem = one.path("audit.pem");
    assert!(one.kmsctl("auditor", &["audit", "public-key", "--out", pem.to_str().unwrap()]).status.success());
    let trails = [one.audit_path(), two.audit_path(), three.audit_path()];
    let verify = |trails: &[std::path::PathBuf]| {
        let mut args = vec!["audit".to_owned(), "verify".to_owned(), "--public-key".to_owned(), pem.display().to_string()];
        for (t, a) in trails.iter().zip(&anchors) {
            args.extend(["--db".to_owned(), t.display().to_string(), "--anchor".to_owned(), a.clone()]);
        }
        one.kmsctl("auditor", &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let all = verify(&trails);
    let text = String::from_utf8_lossy(&all.stdout).into_owned();
    assert!(all.status.success(), "{text}{}", String::from_utf8_lossy(&all.stderr));
    assert_eq!(text.matches("INTACT: the chain and every checkpoint signature verify").count(), 3, "{text}");
    // A record deleted from one server's trail (a copy of it) is found, and the file named.
    let copy = one.path("kms-3-copy.audit.db");
    let db = rusqlite::Connection::open(&trails[2]).unwrap();
    db.execute("VACUUM INTO ?1", [copy.to_str().unwrap()]).unwrap();
    drop(db);
    rusqlite::Connection::open(&copy).unwrap().execute("DELETE FROM audit_records WHERE seq = 2", []).unwrap();
    let cut = verify(&[trails[0].clone(), trails[1].clone(), copy.clone()]);
    assert_eq!(cut.status.code(), Some(8), "{}", String::from_utf8_lossy(&cut.stdout));
    assert!(String::from_utf8_lossy(&cut.stderr).contains(&copy.display().to_string()), "{}", String::from_utf8_lossy(&cut.stderr));

    // Exactly one server runs the lifecycle task.
    let logs = || [one.log(), two.log(), three.log()];
    eventually(Duration::from_secs(5), "every server has looked at the lease", || {
        logs().iter().all(|l| l.contains(HOLDS) || l.contains(WAITS))
    });
    let holders: Vec<usize> = logs().iter().enumerate().filter(|(_, l)| l.contains(HOLDS)).map(|(i, _)| i + 1).collect();
    assert_eq!(holders.len(), 1, "one holder, got {holders:?}");
    // Killed with SIGKILL, the holder's session ends and another server takes over.
    if holders == [3] {
        three.kill();
        let took = eventually(Duration::from_secs(10), "another server takes the lease", || {
            one.log().contains(HOLDS) || two.log().contains(HOLDS)
        });
        eprintln!("the lifecycle lease moved {took:?} after its holder was killed");
        three.launch();
        std::thread::sleep(Duration::from_secs(2));
        assert!(!three.log().rsplit("listening").next().unwrap_or("").contains(HOLDS), "the restarted server waits");
    } else {
        drop(three);
        let holder_is_one = holders == [1];
        let (mut two, mut one) = (two, one);
        if holder_is_one {
            one.kill();
            let took = eventually(Duration::from_secs(10), "another server takes the lease", || two.log().contains(HOLDS));
            eprintln!("the lifecycle lease moved {took:?} after its holder was killed");
        } else {
            two.kill();
            let took = eventually(Duration::from_secs(10), "another server takes the lease", || one.log().contains(HOLDS));
            eprintln!("the lifecycle lease moved {took:?} after its holder was killed");
        }
    }
}

/// Runs a future to completion from a synchronous closure inside the multi-threaded runtime.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_under_load_keeps_working_when_a_server_is_killed_and_uses_it_again_when_it_is_back() {
    let settings = shared();
    let one = TestServer::start(settings.clone());
    let mut two = one.start_peer(&settings, 2);
    let three = one.start_peer(&settings, 3);
    one.client("officer").await.create_key("load", L::Personal, None, None).await.unwrap();
    let endpoints = [one.endpoint(), two.endpoint(), three.endpoint()].join(",");
    let x = KmsClient::connect_with_files(&endpoints, one.ca_path(), one.path("exchange.crt"), one.path("exchange.key"))
        .await
        .unwrap();

    // Data-key load at 8 in flight over the three servers.
    let load = DataKeyLoad::start(&x, "load", 8, Duration::ZERO);
    let live = Arc::clone(&load.tally);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kill = live.ok();
    // Server 2 dies with SIGKILL, with requests in flight on it.
    tokio::task::block_in_place(|| two.kill());
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = live.ok() - before_kill;
    // It comes back on its port; the client uses it again once its health says SERVING.
    tokio::task::block_in_place(|| two.launch());
    let back = Instant::now();
    let endpoint_two = two.endpoint();
    let took = eventually(Duration::from_secs(5), "the client uses server 2 again", || x.usable_endpoints().contains(&endpoint_two));
    let back_ms = kms_e2e::unix_now() * 1000;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = load.stop().await;
    // Every failure counts here, UNAVAILABLE too: a retry on another server must complete it.
    let mut failed = tally.other();
    failed.extend((0..tally.unavailable()).map(|_| "UNAVAILABLE".to_owned()));
    let (ok, wrong) = (tally.ok(), tally.wrong());
    eprintln!(
        "server 2 killed under load: {ok} answered ({during} in the 2 s it was down), {} failed, {wrong} wrong; \
         it was used again {took:?} after it was back ({:?} after the kill)",
        failed.len(),
        back.duration_since(killed) + took
    );
    assert_eq!(wrong, 0);
    assert!(failed.is_empty(), "every request in flight at the kill was completed by a retry: {failed:?}");
    assert!(during > 0, "the other servers kept answering");
    // Server 2 answered requests after it came back.
    let db = kms_audit::AuditDb::open_read_only(&two.audit_path()).unwrap();
    let served_after = db
        .records(1, 1_000_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.record.rpc == "GenerateDataKey" && r.record.outcome == kms_audit::Outcome::Ok && r.record.time_unix_ms >= back_ms - 1000)
        .count();
    assert!(served_after > 0, "server 2 served data keys again after its return");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_creation_retried_on_another_server_with_its_idempotency_key_makes_one_key() {
    use kms_e2e::pb;
    let settings = shared();
    let one = TestServer::start(settings.clone());
    let two = one.start_peer(&settings, 2);
    let request = |level: L| pb::CreateKeyRequest {
        name: "citizens".into(),
        classification: level as i32,
        idempotency_key: "retry-me-1".into(),
        ..Default::default()
    };
    let first = one.client("officer").await.key_admin().create_key(request(L::Personal)).await.unwrap().into_inner();
    // The same request again, on the other server (the client lost the first answer): the same key.
    let again = two.client("officer").await.key_admin().create_key(request(L::Personal)).await.unwrap().into_inner();
    assert_eq!((again.id.as_str(), again.name.as_str(), again.primary_version), (first.id.as_str(), "citizens", 1));
    // The same idempotency key for another request is refused, naming the rule.
    let other = two.client("officer").await.key_admin().create_key(request(L::Secret)).await.unwrap_err();
    assert_eq!(
        (other.code(), other.message()),
        (
            Code::InvalidArgument,
            "invalid idempotency_key: was already used by this caller for another request (other fields); use a new key for a new request"
        )
    );
    // Another caller's idempotency keys are its own: its request is a new creation, refused since
    // the name is taken.
    let officer2 = one.client("officer2").await.key_admin().create_key(request(L::Personal)).await.unwrap_err();
    assert_eq!(officer2.code(), Code::AlreadyExists);
    // One key, one object on the token.
    let objects: Vec<String> = one.token_object_ids().into_iter().filter(|id| id.starts_with(&first.id)).collect();
    assert_eq!(objects, [kms_e2e::object_id(&first.id, 1)]);
    // And the client's own create_key carries a fresh idempotency key, so it may retry it.
    let x = KmsClient::connect_with_files(format!("{},{}", one.endpoint(), two.endpoint()), one.ca_path(), one.path("officer.crt"), one.path("officer.key"))
        .await
        .unwrap();
    x.create_key("tax", L::Personal, None, None).await.unwrap();
    assert_eq!(x.create_key("tax", L::Personal, None, None).await.unwrap_err().code(), Some(Code::AlreadyExists));
}
