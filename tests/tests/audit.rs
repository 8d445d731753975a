//! The audit trail over mutual TLS against SoftHSM (invariant 3): every request, allowed or
//! refused, is a record before its answer leaves; records chain, checkpoints are signed by a key
//! made inside the token; `kmsctl audit verify` names the first record that was edited, deleted,
//! inserted or reordered in the SQLite file or in an export; auditors read the trail and nothing
//! else; and when the trail cannot be written, requests fail with UNAVAILABLE and nothing happens.

use std::collections::HashMap;
use std::path::Path;

use kms_client::Delivery;
use kms_e2e::pb::Classification as L;
use kms_e2e::{ctx, identity_of, Settings, TestServer};
use kms_server::pki::Validity;
use tonic::Code;

fn code(err: kms_client::ClientError) -> (Code, String) {
    let s = err.status().unwrap_or_else(|| panic!("expected a status, got {err}"));
    (s.code(), s.message().to_owned())
}

fn records(server: &TestServer) -> Vec<kms_audit::StoredRecord> {
    let db = kms_audit::AuditDb::open_read_only(&server.audit_path()).expect("open the audit trail");
    db.records(1, 100_000).expect("read records")
}

/// Checkpoint every 10 records so that short tests have several.
fn settings() -> Settings {
    Settings { checkpoint_every_records: 10, ..Settings::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_allowed_or_refused_is_recorded_with_caller_key_level_and_outcome() {
    let server = TestServer::start(settings());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    officer.create_key("plans", L::Secret, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[("citizen", "4711-secret-person")]);
    let dk = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    // Refused: clearance too low, wrong role, unknown caller, tampered blob.
    let low = server.client("personal-only").await;
    assert_eq!(code(low.encrypt("plans", b"x", &c).await.unwrap_err()).0, Code::PermissionDenied);
    assert_eq!(code(x.create_key("mine", L::Personal, None, None).await.unwrap_err()).0, Code::PermissionDenied);
    let (cert, key) = server.issue_client("stranger", Validity::default());
    let stranger = server.client_with(&cert, &key).await.unwrap();
    assert_eq!(code(stranger.get_key("citizens").await.unwrap_err()).0, Code::Unauthenticated);
    let mut bad = dk.wrapped.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(code(x.decrypt_data_key(&bad, &c, None, None).await.unwrap_err()).0, Code::InvalidArgument);

    let trail = records(&server);
    let find = |rpc: &str, caller: &str| {
        trail
            .iter()
            .filter(|r| r.record.rpc == rpc && r.record.caller == identity_of(caller))
            .map(|r| &r.record)
            .collect::<Vec<_>>()
    };
    // A creation is a `begun` record before the key exists, then the outcome.
    let created = find("CreateKey", "officer");
    let outcomes: Vec<_> = created.iter().map(|r| (r.key.as_str(), r.outcome.as_str(), r.level.as_str())).collect();
    assert_eq!(
        outcomes,
        [("citizens", "begun", "PERSONAL"), ("citizens", "ok", "PERSONAL"), ("plans", "begun", "SECRET"), ("plans", "ok", "SECRET")]
    );
    assert_eq!(created[0].request_id, created[1].request_id);
    assert_eq!(created[1].cert_fingerprint.len(), 32);

    let generated = find("GenerateDataKey", "exchange");
    assert_eq!(generated.len(), 1);
    let g = generated[0];
    assert_eq!((g.key.as_str(), g.key_version, g.level.as_str(), g.outcome.as_str(), g.status_code), ("citizens", 1, "PERSONAL", "ok", 0));
    let wire: HashMap<String, String> = c.clone().into_iter().collect();
    let digest = kms_server::context::digest(&wire).unwrap();
    assert_eq!(g.context_hash, digest.0.to_vec(), "the record holds the context's digest");

    let refused = find("Encrypt", "personal-only");
    assert_eq!(refused.len(), 1);
    assert_eq!((refused[0].outcome.as_str(), refused[0].status_code, refused[0].level.as_str()), ("refused", Code::PermissionDenied as i32, "SECRET"));
    assert_eq!(refused[0].detail, "caller urn:kms:caller:test-personal-only is cleared up to PERSONAL; the key is SECRET");
    let wrong_role = find("CreateKey", "exchange");
    assert_eq!(wrong_role.len(), 1, "a refused change has no begun record");
    assert_eq!((wrong_role[0].outcome.as_str(), wrong_role[0].status_code), ("refused", Code::PermissionDenied as i32));
    let unknown = find("GetKey", "stranger");
    assert_eq!((unknown.len(), unknown[0].status_code), (1, Code::Unauthenticated as i32));
    assert_eq!(unknown[0].detail, "caller urn:kms:caller:test-stranger is not registered");
    let tampered = find("DecryptDataKey", "exchange");
    assert_eq!((tampered[0].outcome.as_str(), tampered[0].status_code), ("refused", Code::InvalidArgument as i32));

    // Sequence numbers are dense, and nothing of the context is stored in clear.
    assert!(trail.iter().enumerate().all(|(i, r)| r.record.seq == i as u64 + 1));
    drop((officer, x, low, stranger));
    let bytes = std::fs::read(server.audit_path()).unwrap();
    let wal = std::fs::read(server.path("kms.audit.db-wal")).unwrap_or_default();
    for file in [&bytes, &wal] {
        assert!(!file.windows(18).any(|w| w == b"4711-secret-person"), "the context value reached the audit file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditors_read_the_trail_and_nothing_else() {
    let server = TestServer::start(settings());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    let auditor = server.client("auditor").await;
    let page = auditor.list_audit_records(1, 1000).await.unwrap();
    assert_eq!(page.records.len(), 2);
    assert_eq!(page.records[1].rpc, "CreateKey");
    let (c, m) = code(auditor.get_key("citizens").await.unwrap_err());
    assert_eq!((c, m.as_str()), (Code::PermissionDenied, "caller urn:kms:caller:test-auditor lacks the officer role"));
    let (c, m) = code(auditor.generate_data_key("citizens", &ctx(&[]), Delivery::WrappedOnly).await.unwrap_err());
    assert_eq!((c, m.as_str()), (Code::PermissionDenied, "caller urn:kms:caller:test-auditor lacks the exchange role"));
    let x = server.client("exchange").await;
    let (c, m) = code(x.list_audit_records(1, 10).await.unwrap_err());
    assert_eq!((c, m.as_str()), (Code::PermissionDenied, "caller urn:kms:caller:test-exchange lacks the auditor role"));
    // Any registered caller may fetch the public key; it is the token's.
    let key = x.audit_public_key().await.unwrap();
    assert!(key.pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    assert_eq!(key.sec1.len(), 65);
    // Each of those refusals is itself a record.
    let tail = auditor.last_audit_records(3).await.unwrap();
    let last: Vec<_> = tail.records.iter().map(|r| (r.rpc.as_str(), r.outcome.as_str())).collect();
    assert_eq!(last, [("GenerateDataKey", "refused"), ("ListAuditRecords", "refused"), ("GetAuditPublicKey", "ok")]);
    assert_eq!(tail.head_seq, tail.records[2].seq);
    assert_eq!(code(auditor.list_audit_records(1, 1001).await.unwrap_err()).0, Code::InvalidArgument);
}

/// Runs `kmsctl audit verify` and returns (exit code, stdout).
fn verify(server: &TestServer, source: &str, path: &Path, pem: &Path) -> (i32, String) {
    let out = server.kmsctl("auditor", &["audit", "verify", source, path.to_str().unwrap(), "--public-key", pem.to_str().unwrap()]);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmsctl_audit_verify_names_the_first_edited_deleted_inserted_or_reordered_record() {
    let mut server = TestServer::start(settings());
    let officer = server.client("officer").await;
    for i in 0..12 {
        officer.create_key(&format!("k{i}"), L::Personal, None, None).await.unwrap();
    }
    let pem = server.path("audit.pem");
    let out = server.kmsctl("officer", &["audit", "public-key", "--out", pem.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    // An export through the API verifies, and a swapped pair of lines is named.
    let export = server.path("trail.jsonl");
    let out = server.kmsctl("auditor", &["audit", "export", "--out", export.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    drop(officer);
    server.stop(); // a clean stop signs a last checkpoint
    let (rc, text) = verify(&server, "--file", &export, &pem);
    assert_eq!(rc, 0, "{text}");
    assert!(text.contains("INTACT"), "{text}");
    let lines: Vec<String> = std::fs::read_to_string(&export).unwrap().lines().map(str::to_owned).collect();
    let mut swapped = lines.clone();
    swapped.swap(4, 5);
    let reordered = server.path("reordered.jsonl");
    std::fs::write(&reordered, swapped.join("\n") + "\n").unwrap();
    let (rc, text) = verify(&server, "--file", &reordered, &pem);
    assert_eq!(rc, 8, "{text}");
    assert!(text.contains("record 5 appears after record 4") || text.contains("record 5"), "{text}");

    let db = server.audit_path();
    let (rc, text) = verify(&server, "--db", &db, &pem);
    assert_eq!(rc, 0, "{text}");
    assert!(text.contains("INTACT") && !text.contains("not covered"), "the stop signed the tail: {text}");
    let total = records(&server).len() as u64;
    assert_eq!(total, 24 + 3, "12 creations (begun + ok), the public key, the export's two calls");

    let attacks: [(&str, &str, &str); 4] = [
        ("edited", "UPDATE audit_records SET outcome = 'refused' WHERE seq = 7", "record 7 does not match its hash"),
        ("deleted", "DELETE FROM audit_records WHERE seq = 7", "record 7 is missing"),
        (
            "inserted",
            "UPDATE audit_records SET seq = seq + 1000 WHERE seq >= 7; UPDATE audit_records SET seq = seq - 999 WHERE seq >= 1007; \
             INSERT INTO audit_records SELECT 7, time_ms, caller, cert_fingerprint, rpc, 'forged', key_version, level, outcome, status_code, request_id, context_hash, detail, hash FROM audit_records WHERE seq = 6",
            "record 7 does not match its hash",
        ),
        (
            "reordered",
            "UPDATE audit_records SET seq = -1 WHERE seq = 7; UPDATE audit_records SET seq = 7 WHERE seq = 8; UPDATE audit_records SET seq = 8 WHERE seq = -1",
            "record 7 does not match its hash",
        ),
    ];
    for (name, sql, named) in attacks {
        let copy = server.path(&format!("{name}.audit.db"));
        std::fs::copy(&db, &copy).unwrap();
        rusqlite::Connection::open(&copy).unwrap().execute_batch(sql).unwrap();
        let (rc, text) = verify(&server, "--db", &copy, &pem);
        assert_eq!(rc, 8, "{name}: {text}");
        let first = text.lines().find(|l| l.trim_start().starts_with("record ")).unwrap_or_default();
        assert!(first.contains(named), "{name}: the first problem should name it: {text}");
    }

    // An attacker who knows the format and recomputes every hash is caught by the signatures.
    let copy = server.path("rehashed.audit.db");
    std::fs::copy(&db, &copy).unwrap();
    {
        let conn = rusqlite::Connection::open(&copy).unwrap();
        conn.execute("UPDATE audit_records SET detail = 'nothing happened' WHERE seq = 7", []).unwrap();
        let store = kms_audit::AuditDb::open_read_only(&copy).unwrap();
        let mut chain = kms_audit::Chain::new();
        let rows = store.records(1, 1000).unwrap();
        drop(store);
        for r in rows {
            let sealed = chain.seal(r.record);
            conn.execute("UPDATE audit_records SET hash = ?1 WHERE seq = ?2", rusqlite::params![sealed.hash.to_vec(), sealed.record.seq as i64])
                .unwrap();
        }
    }
    let (rc, text) = verify(&server, "--db", &copy, &pem);
    assert_eq!(rc, 8, "{text}");
    assert!(text.contains("records 1..=10 do not match the signed checkpoint at record 10"), "{text}");

    // Truncating covered records is seen too.
    let copy = server.path("truncated.audit.db");
    std::fs::copy(&db, &copy).unwrap();
    rusqlite::Connection::open(&copy).unwrap().execute(&format!("DELETE FROM audit_records WHERE seq > {}", total - 3), []).unwrap();
    let (rc, text) = verify(&server, "--db", &copy, &pem);
    assert_eq!(rc, 8, "{text}");
    assert!(text.contains("were deleted"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_trail_cannot_be_written_requests_fail_unavailable_and_nothing_happens() {
    let server = TestServer::start(settings());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[("case", "1")]);
    let objects_before = server.token_object_ids().len();

    // Another process holds the audit database's write lock: nothing can be made durable.
    let lock = rusqlite::Connection::open(server.audit_path()).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (create, generate) = tokio::join!(
        officer.create_key("payroll", L::Personal, None, None),
        x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped)
    );
    for (what, result) in [("create", create.map(|_| ()).unwrap_err()), ("generate", generate.map(|_| ()).unwrap_err())] {
        let (c, m) = code(result);
        assert_eq!(c, Code::Unavailable, "{what}: {m}");
        assert!(m.starts_with("the audit trail cannot be written, so nothing was done"), "{what}: {m}");
    }
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    // Nothing happened: no key, no HSM object; and the service works again at once.
    assert_eq!(code(officer.get_key("payroll").await.unwrap_err()).0, Code::NotFound);
    assert_eq!(server.token_object_ids().len(), objects_before);
    x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    let trail = records(&server);
    let payroll: Vec<_> = trail.iter().filter(|r| r.record.key == "payroll").map(|r| (r.record.rpc.as_str(), r.record.outcome.as_str())).collect();
    assert_eq!(payroll, [("GetKey", "refused")], "no record of a creation that never began");
    assert!(server.log().contains("audit records could not be made durable"));
}
