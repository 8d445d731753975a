//! Start-up reconciliation with servers sharing one store and one token (a real SoftHSM token, a
//! real SQLite store, each server's own audit trail): a server judges only the creation intents it
//! recorded itself. An object that another server is about to commit (its intent recorded, its
//! object made, its row not yet written) is kept, with its intent, by every other server's
//! start-up; the server that recorded it destroys it when its trail proves the creation was never
//! acknowledged.

mod hsm_support;


use hsm_support::TestHsm;
use kms_server::classification::Classification;
use kms_server::ids::{KeyId, KeyPurpose, ObjectId};
use kms_server::service::key_lifecycle::{make_version_object, NewVersion, Origin};
use kms_server::service::AppState;
use kms_server::store::Store;

async fn server(token: &TestHsm, store: &Store, dir: &std::path::Path, id: &str) -> AppState {
    hsm_support::app_state(token, store, &dir.join(format!("{id}.audit.db")), id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_never_destroys_an_object_another_server_is_about_to_commit() {
    let token = TestHsm::new(Classification::TopSecret);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("kms.db")).unwrap();
    let (a, b) = (server(&token, &store, dir.path(), "kms-a").await, server(&token, &store, dir.path(), "kms-b").await);

    // Server B is in the middle of a creation: intent recorded, object made, row not written.
    let key_id = KeyId::random().unwrap();
    let version = NewVersion {
        key_id,
        name: "citizens",
        level: Classification::Personal,
        purpose: KeyPurpose::Envelope,
        version: 1,
        created_at: 1_700_000_000,
    };
    let begun = b.audit.append(kms_server::audit::record(&kms_server::audit::server_facts("CreateKey", "citizens", Classification::Personal, 1), kms_audit::Outcome::Begun, 0, "")).await.unwrap();
    let origin = Origin { request_id: "req-b-1".into(), audit_seq: begun };
    let object = make_version_object(&b, &version, &origin).await.unwrap();
    assert_eq!(object, ObjectId::for_version(key_id, 1));
    assert!(a.hsm.key_exists(&object).await.unwrap());

    // Server A starts: the object and its intent are B's, and are left alone.
    let report = kms_server::reconcile::at_startup(&store, &a.hsm, &a.keyauth, &a.audit).await.unwrap();
    assert_eq!((report.other_servers_intents, report.debris_destroyed, report.unknown_objects), (1, 0, 0));
    assert!(a.hsm.key_exists(&object).await.unwrap(), "another server's object in the making is kept");
    let (intents, _) = store.list_intents().unwrap();
    assert_eq!(intents.iter().map(|i| (i.record.server.as_str(), i.record.object_id.clone())).collect::<Vec<_>>(), [("kms-b", object.clone())]);
    // Its sweep leaves it too.
    assert_eq!(kms_server::reconcile::sweep_abandoned(&store, &a.hsm, &a.keyauth, &a.audit, None).await.unwrap(), 0);
    assert!(a.hsm.key_exists(&object).await.unwrap());

    // B itself restarts: its trail has the creation's `begun` record and no outcome, so the
    // creation was never acknowledged; the object is its debris, and is destroyed.
    let report = kms_server::reconcile::at_startup(&store, &b.hsm, &b.keyauth, &b.audit).await.unwrap();
    assert_eq!((report.other_servers_intents, report.debris_destroyed), (0, 1));
    assert!(!b.hsm.key_exists(&object).await.unwrap());
    assert!(store.list_intents().unwrap().0.is_empty());
}
