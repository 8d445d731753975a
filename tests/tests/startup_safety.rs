//! Start-up never destroys what it cannot prove is its own debris (invariant 9), checked against the
//! real binary, a real SoftHSM token and `pkcs11-tool` looking at the token from outside:
//! - a store moved aside (or a wrong `store.path`) is refused, saying how many keys the token holds,
//!   and nothing on the token is touched; `--new-store` starts anyway and the keys are adopted back;
//! - an empty store in front of a token with keys is refused the same way;
//! - a store restored from an older backup loses nothing: the keys and versions made since are kept,
//!   reported, and adopted back, and their blobs decrypt again;
//! - another application's objects on the token are never touched, nor adopted;
//! - one forged key row refuses that key and no other: listings, data keys and the lifecycle task
//!   go on for the rest.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kms_client::Delivery;
use kms_e2e::pb::{self, Classification as L};
use kms_e2e::{ctx, Settings, TestServer};
use tonic::Code;

fn status(err: kms_client::ClientError) -> (Code, String) {
    let s = err.status().unwrap_or_else(|| panic!("expected a status, got {err}"));
    (s.code(), s.message().to_owned())
}

/// The hex ids of the secret-key objects `pkcs11-tool` sees on the token.
fn ids_on_token(server: &TestServer) -> BTreeSet<String> {
    server.token_object_ids().into_iter().collect()
}

fn reconciliation(log: &str) -> String {
    log.lines()
        .rfind(|l| l.contains("start-up reconciliation of store and token done"))
        .unwrap_or_else(|| panic!("no reconciliation report in the log:\n{log}"))
        .to_owned()
}

/// A consistent copy of the store (SQLite's online backup), as an operator's nightly backup is.
fn backup(server: &TestServer, to: &std::path::Path) {
    let db = rusqlite::Connection::open(server.store_path()).unwrap();
    db.execute("VACUUM INTO ?1", [to.to_str().unwrap()]).unwrap();
}

/// The store refuses a file that group or others may read.
fn private(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_store_is_refused_and_no_key_is_destroyed_and_the_keys_are_adopted_back() {
    let mut server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    officer.create_key("plans", L::Secret, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[("case", "1")]);
    let dk = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    let ct = x.encrypt("plans", b"the plan", &c).await.unwrap();
    drop((officer, x));
    server.stop();
    let before = ids_on_token(&server);
    assert_eq!(before.len(), 3, "two key versions and the binding key: {before:?}");

    // The store is moved aside, as a wrong store.path or an unmounted volume would do.
    std::fs::rename(server.store_path(), server.path("kms.db.aside")).unwrap();
    let status_code = server.launch_expecting_exit(&Settings::default());
    assert!(!status_code.success());
    let log = server.log();
    assert!(
        log.contains(&format!(
            "the key store {} does not exist, but token kms-test holds 2 key objects of this service (2 keys)",
            server.store_path().display()
        )),
        "{log}"
    );
    assert!(log.contains("--new-store"), "the refusal says what to do: {log}");
    assert!(!server.store_path().exists(), "no empty store was created");
    assert_eq!(ids_on_token(&server), before, "nothing on the token was touched");

    // An empty store (a new file) is refused the same way.
    drop(rusqlite::Connection::open(server.store_path()).unwrap());
    private(&server.store_path());
    assert!(!server.launch_expecting_exit(&Settings::default()).success());
    assert!(server.log().contains("holds no keys, but token kms-test holds 2 key objects"), "{}", server.log());
    std::fs::remove_file(server.store_path()).unwrap();

    // The operator asks for a new store explicitly: the keys are kept, unknown, never used...
    server.start_with(&Settings::default(), &["--new-store"]);
    let report = reconciliation(&server.log());
    assert!(report.contains("unknown_objects=2") && report.contains("debris_destroyed=0"), "{report}");
    assert_eq!(ids_on_token(&server), before);
    let x = server.client("exchange").await;
    assert_eq!(status(x.decrypt_data_key(&dk.wrapped, &c, None, None).await.err().unwrap()).0, Code::NotFound);

    // ... until an officer adopts them: the blobs decrypt again.
    let officer = server.client("officer").await;
    let unknown = officer.list_unknown_objects().await.unwrap();
    let mut named: Vec<(String, u32, i32, bool)> =
        unknown.iter().map(|o| (o.key.clone(), o.version, o.classification, o.adoptable)).collect();
    named.sort();
    assert_eq!(
        named,
        [("citizens".into(), 1, L::Personal as i32, true), ("plans".into(), 1, L::Secret as i32, true)]
    );
    let results = officer.adopt_objects(&[]).await.unwrap();
    assert!(results.iter().all(|r| r.code == 0), "{results:?}");
    assert_eq!(results.len(), 2);
    let back = x.decrypt_data_key(&dk.wrapped, &c, None, None).await.unwrap();
    assert_eq!(*back.plaintext, *dk.plaintext.unwrap());
    assert_eq!(&x.decrypt(&ct.ciphertext, &c, None).await.unwrap().plaintext[..], b"the plan");
    let key = officer.get_key("plans").await.unwrap();
    assert_eq!((key.classification, key.purpose, key.primary_version), (L::Secret as i32, pb::KeyPurpose::HsmEncrypt as i32, 1));
    assert!(officer.list_unknown_objects().await.unwrap().is_empty());
    // Adoption is audited.
    let db = kms_audit::AuditDb::open_read_only(&server.audit_path()).unwrap();
    let adopted: Vec<String> = db
        .records(1, 100_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.record.rpc == "AdoptObjects" && r.record.outcome == kms_audit::Outcome::Ok)
        .map(|r| r.record.detail)
        .collect();
    assert_eq!(adopted, ["adopted citizens v1, plans v1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_from_an_older_backup_loses_no_key_and_gets_the_newer_ones_back() {
    let mut server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("tax", L::Personal, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[("case", "2")]);
    let old_blob = x.generate_data_key("tax", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    backup(&server, &server.path("kms.db.backup"));

    // After the backup: tax is rotated (v2) and a new key is made; both are used.
    officer.key_admin().rotate_key(pb::RotateKeyRequest { name: "tax".into() }).await.unwrap();
    officer.create_key("health", L::Personal, None, None).await.unwrap();
    let v2_blob = x.generate_data_key("tax", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    assert_eq!(v2_blob.key_version, 2);
    let new_blob = x.generate_data_key("health", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    drop((officer, x));
    server.stop();
    let before = ids_on_token(&server);

    // Restore last night's backup.
    std::fs::copy(server.path("kms.db.backup"), server.store_path()).unwrap();
    private(&server.store_path());
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", server.store_path().display()));
    }
    server.start_with(&Settings::default(), &[]);
    let report = reconciliation(&server.log());
    assert!(report.contains("unknown_objects=2") && report.contains("debris_destroyed=0") && report.contains("missing_objects=0"), "{report}");
    assert_eq!(ids_on_token(&server), before, "the versions made after the backup are still on the token");

    let x = server.client("exchange").await;
    assert!(x.decrypt_data_key(&old_blob.wrapped, &c, None, None).await.is_ok());
    let (code, _) = status(x.decrypt_data_key(&v2_blob.wrapped, &c, None, None).await.err().unwrap());
    assert_eq!(code, Code::FailedPrecondition, "tax v2 is unknown to the restored store");
    // A rotation would make tax v2 again: refused, never replaced.
    let officer = server.client("officer").await;
    let err = officer.key_admin().rotate_key(pb::RotateKeyRequest { name: "tax".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("version 2 of key tax is already on the token"), "{}", err.message());
    assert_eq!(ids_on_token(&server), before);

    // Adoption brings them back, tax v2 as its primary again.
    let results = officer.adopt_objects(&[]).await.unwrap();
    assert!(results.iter().all(|r| r.code == 0), "{results:?}");
    let tax = officer.get_key("tax").await.unwrap();
    assert_eq!((tax.primary_version, tax.versions.len()), (2, 2));
    assert_eq!(*x.decrypt_data_key(&v2_blob.wrapped, &c, None, None).await.unwrap().plaintext, *v2_blob.plaintext.unwrap());
    assert_eq!(*x.decrypt_data_key(&new_blob.wrapped, &c, None, None).await.unwrap().plaintext, *new_blob.plaintext.unwrap());
    assert_eq!(*x.decrypt_data_key(&old_blob.wrapped, &c, None, None).await.unwrap().plaintext, *old_blob.plaintext.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_applications_objects_are_never_touched_nor_adopted() {
    let mut server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    drop(officer);
    server.stop();
    // Someone else's keys on the same token: one with another label, one with our label's prefix
    // but another id shape, one with our marks whose label's adoption record is forged.
    let foreign = [
        ("other-app key", "0102030405060708090a0b0c0d0e0f1011121314"),
        ("kms:looks-like-ours:v1", "0102"),
        (
            "kms:forged:v1 SECRET ENVELOPE 1700000000 0000000000000000000000000000000000000000000000000000000000000000",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa00000001",
        ),
    ];
    for (label, id) in foreign {
        let out = server.pkcs11_tool(&["--keygen", "--key-type", "AES:32", "--label", label, "--id", id]);
        assert!(out.status.success(), "pkcs11-tool keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    let before = ids_on_token(&server);
    assert_eq!(before.len(), 5);

    server.start_with(&Settings::default(), &[]);
    let report = reconciliation(&server.log());
    assert!(report.contains("foreign_objects=2") && report.contains("unknown_objects=1") && report.contains("debris_destroyed=0"), "{report}");
    assert_eq!(ids_on_token(&server), before, "nothing was destroyed");
    let officer = server.client("officer").await;
    // The forged one is listed (it carries our marks), but cannot be adopted; the others are not
    // even listed.
    let unknown = officer.list_unknown_objects().await.unwrap();
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(!unknown[0].adoptable);
    assert_eq!(
        unknown[0].not_adoptable_reason,
        "its label's adoption record fails the HSM's check: it was not made by this service as labelled"
    );
    let results = officer.adopt_objects(&["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa00000001".into()]).await.unwrap();
    assert_eq!(results[0].code, Code::FailedPrecondition as i32);
    let results = officer.adopt_objects(&["0102030405060708090a0b0c0d0e0f1011121314".into()]).await.unwrap();
    assert_eq!(results[0].code, Code::NotFound as i32, "a foreign object is not one of ours to adopt");
    // Destroying it needs two officers; an object whose label the HSM does not vouch for counts as
    // TOP_SECRET, beyond these officers' SECRET clearance.
    let err = officer.destroy_unknown_object("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa00000001").await.unwrap_err();
    assert_eq!(status(err).0, Code::PermissionDenied);
    assert_eq!(ids_on_token(&server), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_object_is_destroyed_only_by_two_officers() {
    let mut server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("old", L::Personal, None, None).await.unwrap();
    let id = officer.get_key("old").await.unwrap().id;
    drop(officer);
    server.stop();
    // The store forgets the key (a store made anew): the object becomes unknown.
    std::fs::remove_file(server.store_path()).unwrap();
    server.start_with(&Settings::default(), &["--new-store"]);
    let object = kms_e2e::object_id(&id, 1);
    assert!(ids_on_token(&server).contains(&object));
    let (officer, officer2) = (server.client("officer").await, server.client("officer2").await);
    let request = officer.destroy_unknown_object(&object).await.unwrap();
    assert_eq!((request.action, request.subject.as_str()), (pb::ApprovalAction::DestroyUnknownObject as i32, object.as_str()));
    assert!(ids_on_token(&server).contains(&object), "not before a second officer approves");
    assert_eq!(status(officer.approve(&request.id).await.unwrap_err()).0, Code::PermissionDenied, "not by its requester");
    officer2.approve(&request.id).await.unwrap();
    assert!(!ids_on_token(&server).contains(&object));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_forged_key_row_refuses_that_key_only() {
    let settings = Settings { lifecycle_check_seconds: 1, destruction_wait_seconds: 1, ..Settings::default() };
    let mut server = TestServer::start(settings.clone());
    let officer = server.client("officer").await;
    for name in ["forged", "kept", "doomed"] {
        officer.create_key(name, L::Personal, None, None).await.unwrap();
    }
    let x = server.client("exchange").await;
    let c = ctx(&[]);
    drop((officer, x));
    server.stop();
    let db = rusqlite::Connection::open(server.store_path()).unwrap();
    assert_eq!(db.execute("UPDATE keys SET rotation_period_days = 1 WHERE name = 'forged'", []).unwrap(), 1);
    drop(db);
    let before = ids_on_token(&server);
    server.start_with(&settings, &[]);
    assert!(reconciliation(&server.log()).contains("forged_rows=1"));
    assert_eq!(ids_on_token(&server), before, "the forged row's object is left alone");

    let (officer, x) = (server.client("officer").await, server.client("exchange").await);
    let listing = officer.key_admin().list_keys(pb::ListKeysRequest::default()).await.unwrap().into_inner();
    assert_eq!(listing.keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["doomed", "kept"]);
    assert_eq!(listing.refused.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["forged"]);
    assert_eq!(status(x.generate_data_key("forged", &c, Delivery::PlaintextAndWrapped).await.err().unwrap()).0, Code::DataLoss);
    x.generate_data_key("kept", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    // The lifecycle task still destroys what is due.
    officer
        .key_admin()
        .schedule_key_destruction(pb::KeyTarget { name: "doomed".into(), version: 0 })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if officer.get_key("doomed").await.unwrap().state == pb::KeyState::Destroyed as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "the scheduled destruction never happened:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
