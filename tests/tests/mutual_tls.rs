//! Every connection is mutual TLS with a certificate from a configured CA, and every caller is a
//! registered one (invariant 4). A certificate that is expired, not yet valid or from a
//! foreign CA gets `UNAUTHENTICATED` naming the rule on every request, and each refusal, like a
//! handshake without a certificate, is in the audit trail.

fn audit_records(server: &TestServer) -> Vec<kms_audit::AuditRecord> {
    kms_audit::AuditDb::open_read_only(&server.audit_path()).unwrap().records(1, 10_000).unwrap().into_iter().map(|r| r.record).collect()
}

/// Waits for a record that nobody waits for (a refused handshake is recorded in the background).
async fn wait_for_record(server: &TestServer, rpc: &str) -> kms_audit::AuditRecord {
    for _ in 0..100 {
        if let Some(r) = audit_records(server).into_iter().find(|r| r.rpc == rpc) {
            return r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no {rpc} record in the audit trail");
}

use kms_e2e::{Settings, TestServer};
use kms_server::pki::Validity;
use tonic::Code;

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let server = TestServer::start(Settings::default());
    // A TLS client that trusts the server's CA but presents no certificate of its own.
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(server.ca_path()).unwrap());
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await;
    let result = match channel {
        Err(_) => None, // refused during the handshake
        Ok(ch) => Some(
            kms_e2e::pb::key_admin_client::KeyAdminClient::new(ch)
                .list_keys(kms_e2e::pb::ListKeysRequest::default())
                .await,
        ),
    };
    match result {
        None => {}
        Some(Ok(_)) => panic!("a client without a certificate was served"),
        Some(Err(status)) => assert_ne!(status.code(), Code::Ok),
    }
    assert!(!server.log().contains("outcome=\"ok\""), "no request may succeed:\n{}", server.log());
    let record = wait_for_record(&server, "TLSHandshake").await;
    assert_eq!((record.outcome.as_str(), record.status_code), ("refused", Code::Unauthenticated as i32));
    assert!(record.detail.starts_with("no client certificate was presented (from 127.0.0.1:"), "{}", record.detail);
}

#[tokio::test]
async fn certificate_from_foreign_ca_is_refused() {
    let server = TestServer::start(Settings::default());
    // Same identity as the registered officer, but signed by a CA the server does not trust.
    let (cert, key) = server.issue_foreign_client("officer");
    let client = server.client_with(&cert, &key).await.expect("the handshake completes; requests are refused");
    let err = client.list_keys(&Default::default()).await.expect_err("foreign certificate was accepted");
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    assert_eq!(
        err.status().unwrap().message(),
        "the client certificate of urn:kms:caller:test-officer is not accepted: the client certificate was not issued by a CA this service trusts"
    );
    assert!(!server.log().contains("outcome=\"ok\""), "{}", server.log());
    let record = audit_records(&server).into_iter().find(|r| r.rpc == "ListKeys").expect("audited");
    assert_eq!((record.caller.as_str(), record.outcome.as_str(), record.status_code), ("urn:kms:caller:test-officer", "refused", Code::Unauthenticated as i32));
    assert_eq!(record.cert_fingerprint.len(), 32, "the fingerprint tells the impostor's certificate from the real one");
    // The same identity with a certificate from the configured CA is served.
    let good = server.client("officer").await;
    assert_eq!(good.list_keys(&Default::default()).await.unwrap(), vec![]);
    let fingerprints: Vec<Vec<u8>> = audit_records(&server).into_iter().filter(|r| r.rpc == "ListKeys").map(|r| r.cert_fingerprint).collect();
    assert_ne!(fingerprints[0], fingerprints[1]);
}

#[tokio::test]
async fn expired_or_not_yet_valid_certificates_are_refused() {
    let server = TestServer::start(Settings::default());
    for (stem, validity, rule) in [
        ("officer-expired", Validity::Expired, "the client certificate has expired"),
        ("officer-future", Validity::NotYetValid, "the client certificate is not valid yet"),
    ] {
        let (cert, key) = server.issue_client_files(stem, "officer", validity);
        let client = server.client_with(&cert, &key).await.expect("the handshake completes; requests are refused");
        let err = client.create_key("k", kms_e2e::pb::Classification::Personal, None, None).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
        assert_eq!(
            err.status().unwrap().message(),
            format!("the client certificate of urn:kms:caller:test-officer is not accepted: {rule}")
        );
    }
    assert!(!server.log().contains("outcome=\"ok\""), "{}", server.log());
    // Refused before any handler ran: no key, no `begun` record, two refusals audited.
    let records = audit_records(&server);
    let refused: Vec<_> = records.iter().map(|r| (r.rpc.as_str(), r.outcome.as_str(), r.status_code)).collect();
    assert_eq!(refused, [("CreateKey", "refused", 16), ("CreateKey", "refused", 16)]);
    let officer = server.client("officer").await;
    assert_eq!(officer.get_key("k").await.unwrap_err().code(), Some(Code::NotFound));
}

#[tokio::test]
async fn unregistered_caller_is_unauthenticated() {
    let server = TestServer::start(Settings::default());
    let (cert, key) = server.issue_client("stranger", Validity::default());
    let client = server.client_with(&cert, &key).await.unwrap();
    let err = client.list_keys(&Default::default()).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated));
    assert_eq!(err.status().unwrap().message(), "caller urn:kms:caller:test-stranger is not registered");
}

#[tokio::test]
async fn registered_caller_is_served() {
    let server = TestServer::start(Settings::default());
    let client = server.client("officer").await;
    assert_eq!(client.list_keys(&Default::default()).await.unwrap(), vec![]);
}
