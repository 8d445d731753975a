//! The audit trail cannot be replaced or cut unnoticed: its head is anchored in the key store
//! (sealed by the HSM, moved on every commit), so a trail deleted, replaced by another, or cut after
//! its last checkpoint is refused at start-up, and `kmsctl audit verify --anchor` finds a cut copy.
//! A new trail starts only when the operator asks for it, and its first record says so.

use kms_client::Delivery;
use kms_e2e::pb::Classification as L;
use kms_e2e::{ctx, Settings, TestServer};

/// Makes some records: a key and a few data keys.
async fn activity(server: &TestServer) {
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    let x = server.client("exchange").await;
    for i in 0..5 {
        x.generate_data_key("citizens", &ctx(&[("i", &i.to_string())]), Delivery::WrappedOnly).await.unwrap();
    }
}

fn head(server: &TestServer) -> u64 {
    kms_audit::AuditDb::open_read_only(&server.audit_path()).unwrap().head().unwrap().seq
}

fn remove_trail(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_trail_is_refused_until_the_operator_asks_for_a_new_one_which_is_recorded() {
    let mut server = TestServer::start(Settings::default());
    activity(&server).await;
    server.stop();
    let records = head(&server);
    assert!(records > 5);
    remove_trail(&server.audit_path());
    assert!(!server.launch_expecting_exit(&Settings::default()).success());
    let log = server.log();
    assert!(
        log.contains(&format!("the audit trail {} is missing, but the key store's anchor says trail", server.audit_path().display()))
            && log.contains(&format!("had {records} records")),
        "{log}"
    );
    assert!(!server.audit_path().exists(), "no new trail was started silently");

    server.start_with(&Settings::default(), &["--new-audit-trail"]);
    let db = kms_audit::AuditDb::open_read_only(&server.audit_path()).unwrap();
    let first = db.records(1, 1).unwrap().remove(0).record;
    assert_eq!((first.seq, first.rpc.as_str(), first.caller.as_str()), (1, "NewAuditTrail", "urn:kms:server:operator"));
    assert!(
        first.detail.starts_with("a new audit trail was started by the operator (--new-audit-trail): the previous trail ")
            && first.detail.contains(&format!("ended at record {records} "))
            && first.detail.ends_with("; no file was found at the trail's path"),
        "{}",
        first.detail
    );
    // The next start needs no flag: the new trail is the anchored one.
    server.restart(Settings::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trail_cut_after_its_last_checkpoint_is_refused_and_its_numbers_never_reissued() {
    let mut server = TestServer::start(Settings::default());
    activity(&server).await;
    server.kill();
    let records = head(&server);
    // Cut the last three records (after the last checkpoint: the kill left none since the start).
    let db = rusqlite::Connection::open(server.audit_path()).unwrap();
    let cut = db.execute("DELETE FROM audit_records WHERE seq > ?1", [(records - 3) as i64]).unwrap();
    assert_eq!(cut, 3);
    drop(db);
    assert!(!server.launch_expecting_exit(&Settings::default()).success());
    let log = server.log();
    assert!(
        log.contains(&format!(
            "ends at record {}, but the key store's anchor says it reached record {records}: records {}..={records} were cut",
            records - 3,
            records - 2
        )),
        "{log}"
    );
    assert_eq!(head(&server), records - 3, "nothing was appended to the cut trail");

    // With --new-audit-trail the cut file is moved aside, never deleted.
    server.start_with(&Settings::default(), &["--new-audit-trail"]);
    let aside: Vec<_> = std::fs::read_dir(server.path(""))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("kms.audit.db.replaced-"))
        .collect();
    assert!(!aside.is_empty(), "the old trail was kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trail_replaced_by_another_is_refused() {
    let mut server = TestServer::start(Settings::default());
    activity(&server).await;
    server.stop();
    // Another trail (a fresh one, with records of its own) in its place.
    remove_trail(&server.audit_path());
    let mut other = kms_audit::AuditDb::open(&server.audit_path()).unwrap();
    let mut chain = kms_audit::Chain::new();
    let sealed = chain.seal(kms_audit::AuditRecord {
        seq: 0,
        time_unix_ms: 1,
        caller: "urn:kms:caller:x".into(),
        cert_fingerprint: vec![],
        rpc: "GetKey".into(),
        key: String::new(),
        key_version: 0,
        level: String::new(),
        outcome: kms_audit::Outcome::Ok,
        status_code: 0,
        request_id: "r".into(),
        context_hash: vec![],
        detail: String::new(),
    });
    other.append(&[sealed]).unwrap();
    drop(other);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(server.audit_path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    assert!(!server.launch_expecting_exit(&Settings::default()).success());
    let log = server.log();
    assert!(log.contains("is not the trail the key store is anchored to"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmsctl_verify_with_the_anchor_finds_a_copy_cut_after_its_last_checkpoint() {
    let server = TestServer::start(Settings::default());
    activity(&server).await;
    // The auditor takes the anchor and a copy of the trail.
    let out = server.kmsctl("auditor", &["--output", "json", "audit", "anchor"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let anchor: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let anchor = anchor["anchor"].as_str().unwrap().to_owned();
    let seq: u64 = anchor.split(':').next().unwrap().parse().unwrap();
    let out = server.kmsctl("auditor", &["audit", "public-key", "--out", server.path("audit.pem").to_str().unwrap()]);
    assert!(out.status.success());
    let copy = server.path("copy.db");
    let db = rusqlite::Connection::open(server.audit_path()).unwrap();
    db.execute("VACUUM INTO ?1", [copy.to_str().unwrap()]).unwrap();
    drop(db);
    let verify = |anchor: &str| {
        server.kmsctl(
            "auditor",
            &["audit", "verify", "--db", copy.to_str().unwrap(), "--public-key", server.path("audit.pem").to_str().unwrap(), "--anchor", anchor],
        )
    };
    let out = verify(&anchor);
    assert_eq!(out.status.code(), Some(0), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Cut the copy after its last checkpoint: the file alone still verifies, the anchor does not.
    let db = rusqlite::Connection::open(&copy).unwrap();
    db.execute("DELETE FROM audit_records WHERE seq > ?1", [(seq - 2) as i64]).unwrap();
    drop(db);
    let plain = server.kmsctl(
        "auditor",
        &["audit", "verify", "--db", copy.to_str().unwrap(), "--public-key", server.path("audit.pem").to_str().unwrap()],
    );
    assert_eq!(plain.status.code(), Some(0), "without the anchor the cut is invisible");
    let out = verify(&anchor);
    assert_eq!(out.status.code(), Some(8));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("the trail ends at record {} but the anchor names record {seq}: records {}..={seq} were cut", seq - 2, seq - 1)),
        "{text}"
    );
    // An anchor that is not SEQ:HASH is a usage error.
    assert_eq!(verify("12:zz").status.code(), Some(2));
}
