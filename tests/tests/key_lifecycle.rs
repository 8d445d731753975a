//! Key lifecycle over mutual TLS: rotation keeps old blobs decrypting, disabled keys and versions
//! refuse with a message naming them, and a key row edited behind the server's back is refused
//! (invariant 5). Destruction and two-officer approvals are in `destruction.rs` and
//! `approvals.rs`.

use kms_client::Delivery;
use kms_e2e::pb::{self, Classification as L};
use kms_e2e::{ctx, Settings, TestServer};
use tonic::Code;

fn status(err: kms_client::ClientError) -> (Code, String) {
    let s = err.status().unwrap_or_else(|| panic!("expected a status, got {err}"));
    (s.code(), s.message().to_owned())
}

async fn rotate(officer: &kms_client::KmsClient, name: &str) -> pb::Key {
    officer
        .key_admin()
        .rotate_key(pb::RotateKeyRequest { name: name.into() })
        .await
        .unwrap_or_else(|e| panic!("rotate {name}: {e}"))
        .into_inner()
        .key
        .expect("the rotated key")
}

async fn set_version(officer: &kms_client::KmsClient, name: &str, version: u32, enable: bool) -> Result<pb::Key, tonic::Status> {
    let req = pb::SetKeyVersionStateRequest { name: name.into(), version };
    let mut admin = officer.key_admin();
    if enable {
        admin.enable_key_version(req).await.map(|r| r.into_inner().key.expect("the key"))
    } else {
        admin.disable_key_version(req).await.map(|r| r.into_inner().key.expect("the key"))
    }
}

async fn set_key(officer: &kms_client::KmsClient, name: &str, enable: bool) -> Result<pb::Key, tonic::Status> {
    let req = pb::SetKeyStateRequest { name: name.into() };
    let mut admin = officer.key_admin();
    if enable {
        admin.enable_key(req).await.map(|r| r.into_inner().key.expect("the key"))
    } else {
        admin.disable_key(req).await.map(|r| r.into_inner().key.expect("the key"))
    }
}

#[tokio::test]
async fn rotation_makes_a_new_primary_and_old_blobs_still_decrypt() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    officer.create_key("plans", L::Secret, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[("case", "1")]);
    let old = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    let old_ct = x.encrypt("plans", b"v1 secret", &c).await.unwrap();
    assert_eq!((old.key_version, old_ct.key_version), (1, 1));

    let k = rotate(&officer, "citizens").await;
    assert_eq!(k.primary_version, 2);
    assert_eq!(k.versions.iter().map(|v| (v.version, v.state)).collect::<Vec<_>>(), [(1, pb::KeyState::Enabled as i32), (2, pb::KeyState::Enabled as i32)]);
    assert!(k.rotated_at_unix >= k.created_at_unix);
    assert_eq!(k.next_rotation_at_unix, k.rotated_at_unix + 365 * 86_400);
    assert_eq!(rotate(&officer, "plans").await.primary_version, 2);
    assert_eq!(rotate(&officer, "plans").await.primary_version, 3);

    let new = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    assert_eq!(new.key_version, 2);
    assert_eq!(new.wrapped[27], 2, "blob header carries version 2");
    let back = x.decrypt_data_key(&old.wrapped, &c, None, None).await.unwrap();
    assert_eq!((back.key_version, *back.plaintext), (1, *old.plaintext.unwrap()));
    let new_ct = x.encrypt("plans", b"v3 secret", &c).await.unwrap();
    assert_eq!(new_ct.key_version, 3);
    assert_eq!(&x.decrypt(&old_ct.ciphertext, &c, None).await.unwrap().plaintext[..], b"v1 secret");
    assert_eq!(&x.decrypt(&new_ct.ciphertext, &c, None).await.unwrap().plaintext[..], b"v3 secret");
}

#[tokio::test]
async fn disabled_version_refuses_its_blobs_until_enabled_again() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[]);
    let v1 = x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    // The primary version cannot be disabled.
    let err = set_version(&officer, "citizens", 1, false).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::FailedPrecondition, "version 1 is the primary version of key citizens; rotate the key first"));
    rotate(&officer, "citizens").await;
    let k = set_version(&officer, "citizens", 1, false).await.unwrap();
    assert_eq!(k.versions[0].state, pb::KeyState::Disabled as i32);
    assert_eq!(
        status(x.decrypt_data_key(&v1.wrapped, &c, None, None).await.err().unwrap()),
        (Code::FailedPrecondition, "key citizens version 1 is DISABLED; only ENABLED versions may be used".into())
    );
    // New data keys use version 2 and work.
    let v2 = x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    assert!(x.decrypt_data_key(&v2.wrapped, &c, None, None).await.is_ok());
    set_version(&officer, "citizens", 1, true).await.unwrap();
    assert!(x.decrypt_data_key(&v1.wrapped, &c, None, None).await.is_ok());
    // Unknown version.
    let err = set_version(&officer, "citizens", 9, false).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::NotFound, "key citizens has no version 9"));
}

#[tokio::test]
async fn disabled_key_refuses_all_cryptography_until_enabled_again() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[]);
    let blob = x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    let k = set_key(&officer, "citizens", false).await.unwrap();
    assert_eq!((k.state, k.next_rotation_at_unix), (pb::KeyState::Disabled as i32, 0));
    let refused = (Code::FailedPrecondition, "key citizens is DISABLED; only ENABLED keys may be used".to_owned());
    assert_eq!(status(x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.err().unwrap()), refused);
    assert_eq!(status(x.decrypt_data_key(&blob.wrapped, &c, None, None).await.err().unwrap()), refused);
    let err = officer.key_admin().rotate_key(pb::RotateKeyRequest { name: "citizens".into() }).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::FailedPrecondition, "key citizens is DISABLED; only ENABLED keys are rotated"));
    assert_eq!(set_key(&officer, "citizens", true).await.unwrap().state, pb::KeyState::Enabled as i32);
    assert!(x.decrypt_data_key(&blob.wrapped, &c, None, None).await.is_ok());
    // Exchange services cannot change key states.
    let err = set_key(&x, "citizens", false).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn rotation_schedule_is_set_per_key() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    let mut admin = officer.key_admin();
    let k = admin
        .set_rotation_schedule(pb::SetRotationScheduleRequest { name: "citizens".into(), rotation_period_days: 30 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(k.rotation_period_days, 30);
    assert_eq!(k.next_rotation_at_unix, k.rotated_at_unix + 30 * 86_400);
    let err = admin
        .set_rotation_schedule(pb::SetRotationScheduleRequest { name: "citizens".into(), rotation_period_days: 4000 })
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "invalid rotation_period_days: must be at most 3650 (0 means the level's default)"));
    assert_eq!(officer.get_key("citizens").await.unwrap().rotation_period_days, 30);
}

#[tokio::test]
async fn key_row_edited_behind_the_servers_back_is_refused() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::SensitivePersonal, None, None).await.unwrap();
    officer.create_key("tax", L::Personal, None, None).await.unwrap();
    rotate(&officer, "tax").await;
    let x = server.client("exchange").await;
    let c = ctx(&[]);
    let tax_v1 = x.generate_data_key("tax", &c, Delivery::WrappedOnly).await.unwrap();
    // Both rows are now in the server's key cache: an edit by another connection must still be
    // seen by the very next request.
    x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();

    let db = rusqlite::Connection::open(server.store_path()).unwrap();
    // Lower a level so that plaintext data keys would be released.
    assert_eq!(db.execute("UPDATE keys SET classification = 2 WHERE name = 'citizens'", []).unwrap(), 1);
    let forged = (
        Code::DataLoss,
        "the metadata of key citizens failed authentication: the key store was changed outside the service; the key is refused".to_owned(),
    );
    assert_eq!(status(x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.err().unwrap()), forged);
    assert_eq!(status(officer.get_key("citizens").await.unwrap_err()), forged);
    // One forged row refuses that key, never the others: the listing names it and lists the rest.
    let listing = officer.key_admin().list_keys(pb::ListKeysRequest::default()).await.unwrap().into_inner();
    assert_eq!(listing.keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["tax"]);
    assert_eq!(
        listing.refused,
        [pb::RefusedKey {
            key: "citizens".into(),
            reason: "its metadata failed authentication: the store was changed outside the service".into()
        }]
    );
    assert!(x.generate_data_key("tax", &c, Delivery::WrappedOnly).await.is_ok(), "the other keys keep working");
    // Put it back: the original row is accepted again.
    db.execute("UPDATE keys SET classification = 3 WHERE name = 'citizens'", []).unwrap();
    assert!(officer.get_key("citizens").await.is_ok());

    // Edit a version row: disable tax v1 through the service, then re-enable it by hand.
    set_version(&officer, "tax", 1, false).await.unwrap();
    db.execute("UPDATE key_versions SET state = 'ENABLED' WHERE version = 1 AND key_id = (SELECT id FROM keys WHERE name = 'tax')", []).unwrap();
    let err = x.decrypt_data_key(&tax_v1.wrapped, &c, None, None).await.err().unwrap();
    assert_eq!(status(err).0, Code::DataLoss);
    drop(db);
    assert!(server.log().contains("key metadata failed authentication"), "{}", server.log());
}
