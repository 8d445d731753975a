//! Payloads encrypted inside the HSM (the only way state-secret data is encrypted), and the request
//! size limits.

use kms_e2e::pb::{self, Classification as L};
use kms_e2e::{ctx, Settings, TestServer};
use tonic::Code;

async fn setup(settings: Settings) -> TestServer {
    let server = TestServer::start(settings);
    let officer = server.client("officer").await;
    officer.create_key("plans", L::Secret, None, None).await.unwrap();
    officer.create_key("memos", L::Confidential, None, None).await.unwrap();
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    server
}

fn status(err: kms_client::ClientError) -> (Code, String) {
    let s = err.status().unwrap_or_else(|| panic!("expected a status, got {err}"));
    (s.code(), s.message().to_owned())
}

const TAMPERED: &str = "blob failed authentication: it was altered, or its key, version, classification or encryption context differs from the one it was made with";

#[tokio::test]
async fn secret_payload_round_trips_inside_the_hsm() {
    let server = setup(Settings::default()).await;
    let x = server.client("exchange").await;
    let c = ctx(&[("doc", "7")]);
    let msg = b"operation plan: the bridge at dawn".to_vec();
    let e = x.encrypt("plans", &msg, &c).await.unwrap();
    assert_eq!(e.ciphertext.len(), 32 + 12 + msg.len() + 16);
    assert_eq!(e.ciphertext[6], 5, "level byte is SECRET");
    assert!(!e.ciphertext.windows(8).any(|w| w == &msg[..8]), "plaintext visible in ciphertext");
    let d = x.decrypt(&e.ciphertext, &c, Some("plans")).await.unwrap();
    assert_eq!(&d.plaintext[..], &msg[..]);
    // The same plaintext encrypts differently each time (fresh IV).
    assert_ne!(x.encrypt("plans", &msg, &c).await.unwrap().ciphertext, e.ciphertext);
    // Empty payloads work too.
    let empty = x.encrypt("memos", b"", &c).await.unwrap();
    assert!(x.decrypt(&empty.ciphertext, &c, None).await.unwrap().plaintext.is_empty());
}

#[tokio::test]
async fn tampered_ciphertext_or_wrong_context_is_refused() {
    let server = setup(Settings::default()).await;
    let x = server.client("exchange").await;
    let c = ctx(&[("doc", "7")]);
    let e = x.encrypt("plans", b"secret words", &c).await.unwrap();
    for i in [32usize, 40, 44, 50, e.ciphertext.len() - 1] {
        let mut b = e.ciphertext.clone();
        b[i] ^= 0x80;
        assert_eq!(status(x.decrypt(&b, &c, None).await.err().unwrap()), (Code::InvalidArgument, TAMPERED.into()), "byte {i}");
    }
    assert_eq!(status(x.decrypt(&e.ciphertext, &ctx(&[("doc", "8")]), None).await.err().unwrap()), (Code::InvalidArgument, TAMPERED.into()));
    assert_eq!(status(x.decrypt(&e.ciphertext, &ctx(&[]), None).await.err().unwrap()), (Code::InvalidArgument, TAMPERED.into()));
    // Presented to another key by name, or re-pointed at another key of the same level.
    assert_eq!(
        status(x.decrypt(&e.ciphertext, &c, Some("memos")).await.err().unwrap()),
        (Code::InvalidArgument, "the blob belongs to a different key than memos".into())
    );
    // A wrapped data key is not a ciphertext.
    let dk = x.generate_data_key("citizens", &c, kms_client::Delivery::WrappedOnly).await.unwrap();
    assert_eq!(
        status(x.decrypt(&dk.wrapped, &c, None).await.err().unwrap()),
        (Code::InvalidArgument, "invalid blob: blob is a wrapped data key, but an HSM ciphertext was expected here".into())
    );
    assert!(x.decrypt(&e.ciphertext, &c, None).await.is_ok());
}

#[tokio::test]
async fn envelope_keys_do_not_encrypt_payloads() {
    let server = setup(Settings::default()).await;
    let x = server.client("exchange").await;
    assert_eq!(
        status(x.encrypt("citizens", b"x", &ctx(&[])).await.unwrap_err()),
        (Code::FailedPrecondition, "key citizens has purpose ENVELOPE; this operation needs purpose HSM_ENCRYPT".into())
    );
}

#[tokio::test]
async fn oversized_payload_is_refused_with_a_clear_error() {
    let server = setup(Settings { max_payload_bytes: 1024, ..Settings::default() }).await;
    let x = server.client("exchange").await;
    assert!(x.encrypt("plans", &[7u8; 1024], &ctx(&[])).await.is_ok());
    assert_eq!(
        status(x.encrypt("plans", &[7u8; 1025], &ctx(&[])).await.unwrap_err()),
        (Code::InvalidArgument, "invalid plaintext: is 1025 bytes; the limit is 1024 bytes".into())
    );
}

#[tokio::test]
async fn oversized_message_is_refused_by_the_transport() {
    let server = setup(Settings { max_message_bytes: 64 * 1024, ..Settings::default() }).await;
    let x = server.client("exchange").await;
    let err = x
        .hsm_crypto()
        .encrypt(pb::EncryptRequest { key: "plans".into(), plaintext: vec![1; 100 * 1024], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("message length too large"), "{}", err.message());
    // The server is still fine afterwards.
    assert!(x.encrypt("plans", b"small", &ctx(&[])).await.is_ok());
}
