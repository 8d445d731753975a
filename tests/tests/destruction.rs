//! Destruction over mutual TLS against SoftHSM: a scheduled destruction refuses all cryptography
//! while it is pending, can be cancelled (the key comes back DISABLED), and when the waiting period
//! ends the HSM objects are destroyed and the metadata stays as a DESTROYED tombstone. Destroying a
//! personal-data key is crypto-shredding: its blobs can never be opened again, even with the store
//! put back by hand, because the key material is gone from the token.

use std::time::{Duration, Instant};

use kms_client::Delivery;
use kms_e2e::pb::{self, Classification as L, KeyState as S};
use kms_e2e::{ctx, object_id, Settings, TestServer};
use tonic::Code;

fn status(err: kms_client::ClientError) -> (Code, String) {
    let s = err.status().unwrap_or_else(|| panic!("expected a status, got {err}"));
    (s.code(), s.message().to_owned())
}

fn target(name: &str, version: u32) -> pb::KeyTarget {
    pb::KeyTarget { name: name.into(), version }
}

fn fast() -> Settings {
    Settings { destruction_wait_seconds: 1, lifecycle_check_seconds: 1, ..Settings::default() }
}

async fn schedule(officer: &kms_client::KmsClient, name: &str, version: u32) -> Result<pb::KeyChangeResponse, tonic::Status> {
    officer.key_admin().schedule_key_destruction(target(name, version)).await.map(|r| r.into_inner())
}

/// Polls until `check` holds for the key, or fails after 15 s.
async fn wait_for(officer: &kms_client::KmsClient, name: &str, what: &str, check: impl Fn(&pb::Key) -> bool) -> pb::Key {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let k = officer.get_key(name).await.unwrap();
        if check(&k) {
            return k;
        }
        assert!(Instant::now() < deadline, "key {name} never became {what}: {k:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn destroying_a_personal_key_shreds_its_data() {
    let server = TestServer::start(fast());
    let officer = server.client("officer").await;
    let key = officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[("record", "42")]);
    let dk = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    assert!(server.token_object_ids().contains(&object_id(&key.id, 1)));

    let before = kms_e2e::unix_now();
    let answer = schedule(&officer, "citizens", 0).await.unwrap();
    assert!(answer.pending_approval.is_none(), "PERSONAL keys need one officer");
    let k = answer.key.unwrap();
    assert_eq!(k.state, S::PendingDestruction as i32);
    assert!((before + 1..=before + 3).contains(&k.destroy_at_unix), "destroy_at {} vs now {before}", k.destroy_at_unix);
    // No cryptography while pending.
    assert_eq!(
        status(x.decrypt_data_key(&dk.wrapped, &c, None, None).await.unwrap_err()),
        (Code::FailedPrecondition, "key citizens is PENDING_DESTRUCTION; only ENABLED keys may be used".into())
    );

    let k = wait_for(&officer, "citizens", "DESTROYED", |k| k.state == S::Destroyed as i32).await;
    assert_eq!(k.versions.len(), 1);
    assert_eq!(k.versions[0].state, S::Destroyed as i32);
    assert!(k.destroy_at_unix > before);
    // The tombstone keeps the name and answers clearly.
    assert_eq!(
        status(x.decrypt_data_key(&dk.wrapped, &c, None, None).await.unwrap_err()),
        (Code::FailedPrecondition, "key citizens is DESTROYED; only ENABLED keys may be used".into())
    );
    assert_eq!(status(officer.create_key("citizens", L::Personal, None, None).await.unwrap_err()).0, Code::AlreadyExists);
    let err = officer.key_admin().enable_key(pb::SetKeyStateRequest { name: "citizens".into() }).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::FailedPrecondition, "key citizens is DESTROYED; nothing can change it"));
    let err = officer.key_admin().cancel_key_destruction(target("citizens", 0)).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::FailedPrecondition, "key citizens is DESTROYED, not PENDING_DESTRUCTION; there is nothing to cancel")
    );

    // Crypto-shredding: the object is gone from the token, so no edit of the store can bring the
    // data back. Forge the row back to ENABLED: the MAC refuses it; and even the HSM has nothing.
    assert!(!server.token_object_ids().contains(&object_id(&key.id, 1)), "the key's HSM object must be destroyed");
    // The lifecycle task's destruction is audited like a request, under its own identity.
    let trail = kms_audit::AuditDb::open_read_only(&server.audit_path()).unwrap().records(1, 1000).unwrap();
    let scheduled: Vec<_> = trail
        .iter()
        .filter(|r| r.record.rpc == "ScheduledDestruction")
        .map(|r| (r.record.caller.as_str(), r.record.key.as_str(), r.record.level.as_str(), r.record.outcome.as_str()))
        .collect();
    assert_eq!(
        scheduled,
        [
            ("urn:kms:server:rotation-schedule", "citizens", "PERSONAL", "begun"),
            ("urn:kms:server:rotation-schedule", "citizens", "PERSONAL", "ok")
        ]
    );
    let db = rusqlite::Connection::open(server.store_path()).unwrap();
    db.execute_batch("UPDATE keys SET state = 'ENABLED'; UPDATE key_versions SET state = 'ENABLED';").unwrap();
    assert_eq!(status(x.decrypt_data_key(&dk.wrapped, &c, None, None).await.unwrap_err()).0, Code::DataLoss);
}

#[tokio::test]
async fn a_cancelled_destruction_leaves_the_key_disabled_and_intact() {
    // The default waiting period (7 days): nothing is destroyed during the test.
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[]);
    let dk = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    let k = schedule(&officer, "citizens", 0).await.unwrap().key.unwrap();
    assert!(k.destroy_at_unix >= kms_e2e::unix_now() + 7 * 86_400 - 5);
    // Scheduling again changes nothing (same time).
    assert_eq!(schedule(&officer, "citizens", 0).await.unwrap().key.unwrap().destroy_at_unix, k.destroy_at_unix);
    let err = officer.key_admin().enable_key(pb::SetKeyStateRequest { name: "citizens".into() }).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::FailedPrecondition, "key citizens is PENDING_DESTRUCTION; cancel the destruction first (it then becomes DISABLED)")
    );
    let k = officer.key_admin().cancel_key_destruction(target("citizens", 0)).await.unwrap().into_inner();
    assert_eq!((k.state, k.destroy_at_unix), (S::Disabled as i32, 0));
    let err = officer.key_admin().cancel_key_destruction(target("citizens", 0)).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::FailedPrecondition, "key citizens is DISABLED, not PENDING_DESTRUCTION; there is nothing to cancel")
    );
    officer.key_admin().enable_key(pb::SetKeyStateRequest { name: "citizens".into() }).await.unwrap();
    let back = x.decrypt_data_key(&dk.wrapped, &c, None, None).await.unwrap();
    assert_eq!(*back.plaintext, *dk.plaintext.unwrap());
    // Exchange services cannot schedule destruction.
    assert_eq!(schedule(&x, "citizens", 0).await.unwrap_err().code(), Code::PermissionDenied);
}

#[tokio::test]
async fn destroying_one_version_shreds_only_its_blobs() {
    let server = TestServer::start(fast());
    let officer = server.client("officer").await;
    let key = officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[]);
    let v1 = x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    officer.key_admin().rotate_key(pb::RotateKeyRequest { name: "citizens".into() }).await.unwrap();
    let v2 = x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    assert_eq!(v2.key_version, 2);

    let err = schedule(&officer, "citizens", 2).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::FailedPrecondition, "version 2 is the primary version of key citizens; rotate the key first")
    );
    let err = schedule(&officer, "citizens", 7).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::NotFound, "key citizens has no version 7"));

    let k = schedule(&officer, "citizens", 1).await.unwrap().key.unwrap();
    assert_eq!((k.state, k.versions[0].state), (S::Enabled as i32, S::PendingDestruction as i32));
    assert!(k.versions[0].destroy_at_unix > 0);
    assert_eq!(
        status(x.decrypt_data_key(&v1.wrapped, &c, None, None).await.unwrap_err()),
        (Code::FailedPrecondition, "key citizens version 1 is PENDING_DESTRUCTION; only ENABLED versions may be used".into())
    );
    wait_for(&officer, "citizens", "v1 DESTROYED", |k| k.versions[0].state == S::Destroyed as i32).await;
    assert_eq!(
        status(x.decrypt_data_key(&v1.wrapped, &c, None, None).await.unwrap_err()),
        (Code::FailedPrecondition, "key citizens version 1 is DESTROYED; only ENABLED versions may be used".into())
    );
    assert!(x.decrypt_data_key(&v2.wrapped, &c, None, None).await.is_ok(), "version 2 is untouched");
    let err = officer
        .key_admin()
        .enable_key_version(pb::SetKeyVersionStateRequest { name: "citizens".into(), version: 1 })
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::FailedPrecondition, "key citizens version 1 is DESTROYED"));
    let ids = server.token_object_ids();
    assert!(!ids.contains(&object_id(&key.id, 1)) && ids.contains(&object_id(&key.id, 2)), "{ids:?}");
}

#[tokio::test]
async fn tombstones_survive_a_restart_and_reconciliation_reports_nothing_to_repair() {
    let mut server = TestServer::start(fast());
    let officer = server.client("officer").await;
    officer.create_key("gone", L::Personal, None, None).await.unwrap();
    officer.create_key("kept", L::Personal, None, None).await.unwrap();
    schedule(&officer, "gone", 0).await.unwrap();
    wait_for(&officer, "gone", "DESTROYED", |k| k.state == S::Destroyed as i32).await;
    drop(officer);
    server.restart(fast());
    let officer = server.client("officer").await;
    assert_eq!(officer.get_key("gone").await.unwrap().state, S::Destroyed as i32);
    assert_eq!(officer.get_key("kept").await.unwrap().state, S::Enabled as i32);
    let log = server.log();
    let line = log
        .lines()
        .rfind(|l| l.contains("start-up reconciliation of store and token done"))
        .unwrap_or_else(|| panic!("no reconciliation report in the log:\n{log}"));
    for field in ["keys=2", "forged_rows=0", "missing_objects=0", "debris_destroyed=0", "leftovers_destroyed=0", "unknown_objects=0"] {
        assert!(line.contains(field), "{field} not in: {line}");
    }
}
