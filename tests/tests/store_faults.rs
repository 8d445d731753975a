//! A server that survives its PostgreSQL store: data-key load at 8 in flight while the database
//! (a cluster of the test's own) is stopped and started again. Every request is answered correctly
//! or refused `UNAVAILABLE` (never a wrong answer, never another error), service resumes by itself
//! once the database is back, and nothing acknowledged is lost: every answered request is in the
//! audit trail, the keys made before are still there, and the server starts again on the store
//! and trail it left.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_client::Delivery;
use kms_e2e::load::DataKeyLoad;
use kms_e2e::pb::Classification as L;
use kms_e2e::{ctx, Settings, StoreMode, TestServer};

/// The serving state of the whole server on its plain-text health port.
async fn health(port: u16) -> Option<i32> {
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).ok()?.connect().await.ok()?;
    let answer = HealthClient::new(channel).check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.ok()?;
    Some(answer.into_inner().status)
}

async fn health_becomes(port: u16, status: i32, limit: Duration) -> Duration {
    let started = Instant::now();
    while health(port).await != Some(status) {
        assert!(started.elapsed() < limit, "the health port never said {status} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_postgresql_refuses_with_unavailable_and_recovers_by_itself() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let settings = Settings {
        store: StoreMode::Postgres,
        own_pg_cluster: true,
        health_listen: Some(format!("127.0.0.1:{port}").parse().unwrap()),
        ..Settings::default()
    };
    let mut server = TestServer::start(settings.clone());
    let officer = server.client("officer").await;
    officer.create_key("load", L::Personal, None, None).await.unwrap();
    officer.create_key("before", L::Personal, None, None).await.unwrap();

    let load = DataKeyLoad::start(&server.client("exchange").await, "load", 8, Duration::ZERO);
    let tally = Arc::clone(&load.tally);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = tally.ok();
    assert!(before > 0, "the load runs before the fault");
    assert_eq!(health(port).await, Some(ServingStatus::Serving as i32), "ready before the fault");

    // PostgreSQL stops (a fast shutdown, as a restart does) and comes back 2 s later.
    let pg = server.pg_store_mut().expect("a PostgreSQL store");
    tokio::task::block_in_place(|| pg.stop_server());
    let stopped_ms = load.ms_at(Instant::now());
    let unready = health_becomes(port, ServingStatus::NotServing as i32, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(unready)).await;
    let during = tally.unavailable();
    let pg = server.pg_store_mut().expect("a PostgreSQL store");
    tokio::task::block_in_place(|| pg.start_again());
    let back = Instant::now();
    let back_ms = load.ms_at(back);
    // Service resumes by itself: correct answers again, within seconds.
    let resumed = load.recovered(back, Duration::from_secs(10)).await;
    let ready = health_becomes(port, ServingStatus::Serving as i32, Duration::from_secs(10)).await + resumed;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tally = load.stop().await;
    let (ok, unavailable, wrong, other) = (tally.ok(), tally.unavailable(), tally.wrong(), tally.other());
    let last_failure = tally.last_failure_ms.load(Ordering::Relaxed);
    eprintln!(
        "PostgreSQL stopped for 2 s: {ok} answered, {unavailable} UNAVAILABLE ({during} while it was down), {wrong} wrong, \
         {} other; service resumed {resumed:?} after it was back; last failure {} ms after it was stopped; \
         the health port said NOT_SERVING {unready:?} after the stop and SERVING again about {ready:?} after the return",
        other.len(),
        last_failure.saturating_sub(stopped_ms)
    );
    assert_eq!(wrong, 0);
    assert!(other.is_empty(), "only UNAVAILABLE while the store is down: {other:?}");
    assert!(during > 0, "requests were refused while PostgreSQL was down");
    assert!(last_failure < back_ms + 5_000, "failures stopped once PostgreSQL was back");

    // Nothing acknowledged is lost: the keys made before are there, a new one can be made, every
    // answered request is in the trail, and the server starts again on what it left.
    let after = server.client("officer").await;
    after.create_key("after", L::Personal, None, None).await.unwrap();
    let names: Vec<String> = after.list_keys(&kms_client::KeyFilter::default()).await.unwrap().into_iter().map(|k| k.name).collect();
    assert_eq!(names, ["after", "before", "load"]);
    server.restart(settings);
    let db = kms_audit::AuditDb::open_read_only(&server.audit_path()).unwrap();
    let answered = db
        .records(1, 1_000_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.record.rpc == "GenerateDataKey" && r.record.outcome == kms_audit::Outcome::Ok)
        .count() as u64;
    assert!(answered >= ok, "{answered} data keys in the trail, {ok} answered");
    let x = server.client("exchange").await;
    x.generate_data_key("before", &ctx(&[]), Delivery::WrappedOnly).await.unwrap();
}
