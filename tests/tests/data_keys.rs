//! Envelope data keys: generation in each delivery mode, decryption, and the binding of every wrapped
//! blob to its key, version, level and encryption context (invariant 2).

use kms_client::Delivery;
use kms_e2e::pb::{self, Classification as L};
use kms_e2e::{ctx, Settings, TestServer};
use tonic::Code;

async fn setup() -> (TestServer, kms_client::KmsClient) {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    officer.create_key("tax", L::Personal, None, None).await.unwrap();
    let exchange = server.client("exchange").await;
    (server, exchange)
}

fn status(err: kms_client::ClientError) -> (Code, String) {
    let s = err.status().unwrap_or_else(|| panic!("expected a status, got {err}"));
    (s.code(), s.message().to_owned())
}

const TAMPERED: &str = "blob failed authentication: it was altered, or its key, version, classification or encryption context differs from the one it was made with";

#[tokio::test]
async fn plaintext_data_key_decrypts_to_the_same_bytes() {
    let (_server, x) = setup().await;
    let c = ctx(&[("record", "42"), ("agency", "tax")]);
    let g = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    let pt = g.plaintext.clone().unwrap();
    assert_eq!(g.wrapped.len(), 104);
    assert_eq!(&g.wrapped[..4], b"KMSB");
    assert_eq!(g.key_version, 1);
    let back = x.decrypt_data_key(&g.wrapped, &c, Some("citizens"), None).await.unwrap();
    assert_eq!(*back.plaintext, *pt);
    assert_eq!(back.key_version, 1);
    assert_eq!(back.classification, L::Personal);
    // Two data keys are different keys.
    let g2 = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    assert_ne!(*g2.plaintext.unwrap(), *pt);
}

#[tokio::test]
async fn wrapped_only_returns_no_key_material() {
    let (_server, x) = setup().await;
    let raw = x
        .data_keys()
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "citizens".into(),
            delivery: pb::DataKeyDelivery::WrappedOnly as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(raw.plaintext_data_key.is_empty());
    assert!(raw.recipient_sealed_data_key.is_empty());
    assert_eq!(raw.wrapped_data_key.len(), 104);
    // It decrypts later with the (empty) context.
    let back = x.decrypt_data_key(&raw.wrapped_data_key, &ctx(&[]), None, None).await.unwrap();
    assert_eq!(back.plaintext.len(), 32);
}

#[tokio::test]
async fn recipient_sealed_key_matches_the_plaintext_key() {
    let (server, x) = setup().await;
    let c = ctx(&[("k", "v")]);
    let g = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    let r = server.register_recipient("exchange").await;
    let sealed = x.decrypt_data_key(&g.wrapped, &c, None, Some(&r)).await.unwrap();
    assert_eq!(*sealed.plaintext, *g.plaintext.unwrap());
    // A malformed fingerprint is refused before anything happens.
    let err = x
        .data_keys()
        .generate_data_key(pb::GenerateDataKeyRequest {
            key: "citizens".into(),
            delivery: pb::DataKeyDelivery::WrappedToRecipient as i32,
            recipient_key_fingerprint: "abcd".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "invalid recipient_key_fingerprint: must be 64 hex digits (SHA-256 of the key's SEC1 point)");
}

#[tokio::test]
async fn wrong_encryption_context_is_refused() {
    let (_server, x) = setup().await;
    let g = x.generate_data_key("citizens", &ctx(&[("record", "42")]), Delivery::WrappedOnly).await.unwrap();
    for wrong in [ctx(&[("record", "43")]), ctx(&[]), ctx(&[("record", "42"), ("extra", "1")]), ctx(&[("Record", "42")])] {
        let err = x.decrypt_data_key(&g.wrapped, &wrong, None, None).await.err().unwrap();
        assert_eq!(status(err), (Code::InvalidArgument, TAMPERED.into()));
    }
    assert!(x.decrypt_data_key(&g.wrapped, &ctx(&[("record", "42")]), None, None).await.is_ok());
}

#[tokio::test]
async fn tampered_blob_is_refused() {
    let (server, x) = setup().await;
    let c = ctx(&[("a", "b")]);
    let g = x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    let tax_id = server.client("officer").await.get_key("tax").await.unwrap().id;
    let flip = |i: usize| {
        let mut b = g.wrapped.clone();
        b[i] ^= 0x01;
        b
    };
    // Every byte of the wrapped key and of the MAC is covered by the HSM's check.
    for i in (32..104).step_by(7) {
        let err = x.decrypt_data_key(&flip(i), &c, None, None).await.err().unwrap();
        assert_eq!(status(err), (Code::InvalidArgument, TAMPERED.into()), "byte {i}");
    }
    // The header: magic, format version, level, key id, version, length.
    assert_eq!(status(x.decrypt_data_key(&flip(0), &c, None, None).await.err().unwrap()),
        (Code::InvalidArgument, "invalid blob: not a KMS blob (bad magic bytes)".into()));
    assert_eq!(status(x.decrypt_data_key(&flip(4), &c, None, None).await.err().unwrap()),
        (Code::InvalidArgument, "invalid blob: unsupported blob format version 0; this server reads version 1".into()));
    let mut level = g.wrapped.clone();
    level[6] = 1; // PERSONAL -> UNCLASSIFIED
    assert_eq!(status(x.decrypt_data_key(&level, &c, None, None).await.err().unwrap()),
        (Code::InvalidArgument, "the blob's classification UNCLASSIFIED does not match its key's PERSONAL".into()));
    let mut version = g.wrapped.clone();
    version[27] = 2;
    assert_eq!(status(x.decrypt_data_key(&version, &c, None, None).await.err().unwrap()),
        (Code::FailedPrecondition, "key citizens has no version 2".into()));
    let mut unknown = g.wrapped.clone();
    unknown[8] ^= 0xff;
    assert_eq!(status(x.decrypt_data_key(&unknown, &c, None, None).await.err().unwrap()).0, Code::NotFound);
    // Re-pointing the header at another existing key: the HSM refuses it.
    let mut other = g.wrapped.clone();
    other[8..24].copy_from_slice(&hex(&tax_id));
    assert_eq!(status(x.decrypt_data_key(&other, &c, None, None).await.err().unwrap()), (Code::InvalidArgument, TAMPERED.into()));
    // Truncated and extended blobs.
    assert_eq!(status(x.decrypt_data_key(&g.wrapped[..103], &c, None, None).await.err().unwrap()),
        (Code::InvalidArgument, "invalid blob: blob header declares a 72-byte body but 71 bytes follow".into()));
    assert_eq!(status(x.decrypt_data_key(&g.wrapped[..5], &c, None, None).await.err().unwrap()),
        (Code::InvalidArgument, "invalid blob: blob is 5 bytes, shorter than the 32-byte header".into()));
    // The untouched blob still works.
    assert!(x.decrypt_data_key(&g.wrapped, &c, None, None).await.is_ok());
}

#[tokio::test]
async fn blob_presented_to_another_key_is_refused() {
    let (_server, x) = setup().await;
    let g = x.generate_data_key("citizens", &ctx(&[]), Delivery::WrappedOnly).await.unwrap();
    let err = x.decrypt_data_key(&g.wrapped, &ctx(&[]), Some("tax"), None).await.err().unwrap();
    assert_eq!(status(err), (Code::InvalidArgument, "the blob belongs to a different key than tax".into()));
}

#[tokio::test]
async fn unknown_key_is_not_found() {
    let (_server, x) = setup().await;
    let err = x.generate_data_key("nope", &ctx(&[]), Delivery::PlaintextAndWrapped).await.err().unwrap();
    assert_eq!(status(err), (Code::NotFound, "no key named nope".into()));
}

#[tokio::test]
async fn malformed_requests_get_invalid_argument() {
    let (_server, x) = setup().await;
    let err = x
        .data_keys()
        .generate_data_key(pb::GenerateDataKeyRequest { key: "citizens".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "invalid delivery: must be PLAINTEXT_AND_WRAPPED, WRAPPED_ONLY or WRAPPED_TO_RECIPIENT");
    let big: std::collections::BTreeMap<String, String> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    let err = x.generate_data_key("citizens", &big, Delivery::PlaintextAndWrapped).await.err().unwrap();
    assert_eq!(status(err), (Code::InvalidArgument, "invalid encryption_context: encryption context has 65 entries; the limit is 64".into()));
    let officer = _server.client("officer").await;
    let err = officer.create_key("bad name", L::Personal, None, None).await.unwrap_err();
    assert_eq!(status(err), (Code::InvalidArgument, "invalid name: may contain only letters, digits and - _ . /".into()));
    let err = officer.create_key("citizens", L::Personal, None, None).await.unwrap_err();
    assert_eq!(status(err), (Code::AlreadyExists, "a key named citizens already exists".into()));
}

fn hex(s: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}
