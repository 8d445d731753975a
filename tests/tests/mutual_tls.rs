//! Every connection is mutual TLS with a certificate from a configured CA, and every caller is a
//! registered one (SPEC.md invariant 4).

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
}

#[tokio::test]
async fn certificate_from_foreign_ca_is_refused() {
    let server = TestServer::start(Settings::default());
    // Same identity as the registered officer, but signed by a CA the server does not trust.
    let (cert, key) = server.issue_foreign_client("officer");
    let err = match server.client_with(&cert, &key).await {
        Err(e) => e,
        Ok(c) => c.list_keys(&Default::default()).await.expect_err("foreign certificate was accepted"),
    };
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(!server.log().contains("outcome=\"ok\""), "{}", server.log());
    // The same identity with a certificate from the configured CA is served.
    let good = server.client("officer").await;
    assert_eq!(good.list_keys(&Default::default()).await.unwrap(), vec![]);
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let server = TestServer::start(Settings::default());
    let (cert, key) = server.issue_client_files("officer-expired", "officer", Validity::Expired);
    let err = match server.client_with(&cert, &key).await {
        Err(e) => e,
        Ok(c) => c.list_keys(&Default::default()).await.expect_err("expired certificate was accepted"),
    };
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(!server.log().contains("outcome=\"ok\""), "{}", server.log());
    // A certificate for the same identity that is not yet valid is refused too.
    let (cert, key) = server.issue_client_files("officer-future", "officer", Validity::NotYetValid);
    let err = match server.client_with(&cert, &key).await {
        Err(e) => e,
        Ok(c) => c.list_keys(&Default::default()).await.expect_err("not-yet-valid certificate was accepted"),
    };
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
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
