//! Re-wrap (`DataKeys.ReWrap` and `ReWrapBatch`): a blob moves to the primary version of its key,
//! or to a key of the same or a higher level, without its data key or payload changing, bound to
//! the same encryption context; and every rule that guards decryption and encryption guards it too.

use std::collections::BTreeMap;

use kms_client::{Delivery, KmsClient};
use kms_e2e::pb::{self, Classification as L};
use kms_e2e::{ctx, Settings, TestServer};
use tonic::Code;

const TAMPERED: &str = "blob failed authentication: it was altered, or its key, version, classification or encryption context differs from the one it was made with";

/// A server with one key of each kind the tests move blobs between.
async fn setup() -> (TestServer, KmsClient, KmsClient) {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    for (name, level) in [
        ("public", L::Unclassified),
        ("citizens", L::Personal),
        ("tax", L::Personal),
        ("health", L::SensitivePersonal),
        ("memos", L::Confidential),
        ("plans", L::Secret),
    ] {
        officer.create_key(name, level, None, None).await.unwrap();
    }
    let exchange = server.client("exchange").await;
    (server, officer, exchange)
}

fn request(blob: &[u8], c: &BTreeMap<String, String>, destination: &str) -> pb::ReWrapRequest {
    pb::ReWrapRequest {
        blob: blob.to_vec(),
        encryption_context: c.clone().into_iter().collect(),
        destination_key: destination.into(),
    }
}

async fn re_wrap(
    x: &KmsClient,
    blob: &[u8],
    c: &BTreeMap<String, String>,
    destination: &str,
) -> Result<pb::ReWrapResponse, (Code, String)> {
    x.data_keys()
        .re_wrap(request(blob, c, destination))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| (s.code(), s.message().to_owned()))
}

async fn re_wrap_batch(x: &KmsClient, items: Vec<pb::ReWrapRequest>) -> Result<Vec<pb::ReWrapResult>, (Code, String)> {
    x.data_keys()
        .re_wrap_batch(pb::ReWrapBatchRequest { items })
        .await
        .map(|r| r.into_inner().results)
        .map_err(|s| (s.code(), s.message().to_owned()))
}

async fn rotate(officer: &KmsClient, name: &str) -> pb::Key {
    let changed = officer
        .key_admin()
        .rotate_key(pb::RotateKeyRequest { name: name.into() })
        .await
        .unwrap_or_else(|e| panic!("rotate {name}: {e}"))
        .into_inner();
    assert!(changed.pending_approval.is_none(), "rotating {name} should not need approval");
    changed.key.unwrap()
}

async fn key_id(officer: &KmsClient, name: &str) -> String {
    officer.get_key(name).await.unwrap().id
}

fn status(err: kms_client::ClientError) -> (Code, String) {
    let s = err.status().unwrap_or_else(|| panic!("expected a status, got {err}"));
    (s.code(), s.message().to_owned())
}

fn refused(code: Code, message: &str) -> Result<pb::ReWrapResponse, (Code, String)> {
    Err((code, message.to_owned()))
}

fn version_of(blob: &[u8]) -> u32 {
    u32::from_be_bytes(blob[24..28].try_into().unwrap())
}

#[tokio::test]
async fn rewrap_after_rotation_moves_a_data_key_to_the_primary_version_unchanged() {
    let (_server, officer, x) = setup().await;
    let c = ctx(&[("record", "42"), ("agency", "tax")]);
    let old = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    assert_eq!(old.key_version, 1);
    assert_eq!(rotate(&officer, "citizens").await.primary_version, 2);

    let r = re_wrap(&x, &old.wrapped, &c, "").await.unwrap();
    assert_eq!((r.key_version, r.source_key_version), (2, 1));
    assert_eq!((&r.key_id, &r.source_key_id), (&old.key_id, &old.key_id));
    assert_eq!(r.blob.len(), 104);
    assert_eq!(&r.blob[..24], &old.wrapped[..24], "same magic, kind, level and key id");
    assert_eq!(version_of(&r.blob), 2);
    assert_ne!(r.blob[32..], old.wrapped[32..], "wrapped under another KEK");

    // The v2 blob opens to the very same data key, under the same context only.
    let back = x.decrypt_data_key(&r.blob, &c, Some("citizens"), None).await.unwrap();
    assert_eq!(back.key_version, 2);
    assert_eq!(*back.plaintext, *old.plaintext.clone().unwrap());
    let err = x.decrypt_data_key(&r.blob, &ctx(&[("record", "42")]), None, None).await.err().unwrap();
    assert_eq!(status(err), (Code::InvalidArgument, TAMPERED.into()));
    // The v1 blob still works, and a blob already at the primary version re-wraps to itself.
    let v1 = x.decrypt_data_key(&old.wrapped, &c, None, None).await.unwrap();
    assert_eq!((v1.key_version, *v1.plaintext), (1, *old.plaintext.unwrap()));
    let again = re_wrap(&x, &r.blob, &c, "citizens").await.unwrap();
    assert_eq!((again.key_version, again.source_key_version), (2, 2));
    assert_eq!(again.blob, r.blob);
}

#[tokio::test]
async fn rewrap_after_rotation_moves_an_hsm_ciphertext_and_keeps_the_payload() {
    let (_server, officer, x) = setup().await;
    let c = ctx(&[("doc", "7")]);
    let msg = b"memo: the convoy leaves at six".to_vec();
    let old = x.encrypt("memos", &msg, &c).await.unwrap();
    assert_eq!(rotate(&officer, "memos").await.primary_version, 2);

    let r = re_wrap(&x, &old.ciphertext, &c, "").await.unwrap();
    assert_eq!((r.key_version, r.source_key_version), (2, 1));
    assert_eq!((&r.key_id, &r.source_key_id), (&old.key_id, &old.key_id));
    assert_eq!(r.blob.len(), old.ciphertext.len());
    assert_eq!(&r.blob[..24], &old.ciphertext[..24]);
    assert_eq!(r.blob[6], 4, "level byte is CONFIDENTIAL");
    assert_eq!(version_of(&r.blob), 2);
    assert_ne!(r.blob[32..44], old.ciphertext[32..44], "a fresh IV");
    assert!(!r.blob.windows(8).any(|w| w == &msg[..8]), "plaintext visible in the new ciphertext");

    let d = x.decrypt(&r.blob, &c, Some("memos")).await.unwrap();
    assert_eq!((d.key_version, &d.plaintext[..]), (2, &msg[..]));
    assert_eq!(status(x.decrypt(&r.blob, &ctx(&[("doc", "8")]), None).await.err().unwrap()), (Code::InvalidArgument, TAMPERED.into()));
    assert_eq!(&x.decrypt(&old.ciphertext, &c, None).await.unwrap().plaintext[..], &msg[..]);
}

#[tokio::test]
async fn rewrap_to_a_higher_level_key_works_and_to_a_lower_level_key_is_refused() {
    let (server, officer, x) = setup().await;
    let c = ctx(&[("case", "9")]);
    let (citizens, health, memos, plans) = (
        key_id(&officer, "citizens").await,
        key_id(&officer, "health").await,
        key_id(&officer, "memos").await,
        key_id(&officer, "plans").await,
    );

    // PERSONAL data key -> SENSITIVE_PERSONAL key: same data key, now under that level's rules.
    let g = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    let up = re_wrap(&x, &g.wrapped, &c, "health").await.unwrap();
    assert_eq!((&up.key_id, up.key_version, &up.source_key_id, up.source_key_version), (&health, 1, &citizens, 1));
    assert_eq!(up.blob[6], 3, "level byte is SENSITIVE_PERSONAL");
    let r = server.register_recipient("exchange").await;
    let sealed = x.decrypt_data_key(&up.blob, &c, Some("health"), Some(&r)).await.unwrap();
    assert_eq!((sealed.classification, *sealed.plaintext), (L::SensitivePersonal, *g.plaintext.unwrap()));
    assert_eq!(
        status(x.decrypt_data_key(&up.blob, &c, None, None).await.err().unwrap()),
        (Code::FailedPrecondition, "SENSITIVE_PERSONAL data keys are only released sealed to a registered recipient key of the caller (WRAPPED_TO_RECIPIENT, or DecryptDataKey with sealed)".into())
    );
    // Same level, another key.
    let g2 = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    let side = re_wrap(&x, &g2.wrapped, &c, "tax").await.unwrap();
    assert_eq!(*x.decrypt_data_key(&side.blob, &c, Some("tax"), None).await.unwrap().plaintext, *g2.plaintext.unwrap());

    // Down is refused, naming both levels.
    assert_eq!(
        re_wrap(&x, &up.blob, &c, "citizens").await,
        refused(Code::FailedPrecondition, "key citizens is PERSONAL, below the blob's level SENSITIVE_PERSONAL: a re-wrap keeps or raises a classification, never lowers it")
    );
    assert_eq!(
        re_wrap(&x, &g.wrapped, &c, "public").await,
        refused(Code::FailedPrecondition, "key public is UNCLASSIFIED, below the blob's level PERSONAL: a re-wrap keeps or raises a classification, never lowers it")
    );

    // CONFIDENTIAL ciphertext -> SECRET key, and not back.
    let msg = b"troop movements".to_vec();
    let e = x.encrypt("memos", &msg, &c).await.unwrap();
    let secret = re_wrap(&x, &e.ciphertext, &c, "plans").await.unwrap();
    assert_eq!((&secret.key_id, &secret.source_key_id), (&plans, &memos));
    assert_eq!(secret.blob[6], 5, "level byte is SECRET");
    assert_eq!(&x.decrypt(&secret.blob, &c, Some("plans")).await.unwrap().plaintext[..], &msg[..]);
    assert_eq!(
        re_wrap(&x, &secret.blob, &c, "memos").await,
        refused(Code::FailedPrecondition, "key memos is CONFIDENTIAL, below the blob's level SECRET: a re-wrap keeps or raises a classification, never lowers it")
    );

    // A data key never reaches a state-secret level, where data keys do not exist.
    assert_eq!(
        re_wrap(&x, &g.wrapped, &c, "memos").await,
        refused(Code::FailedPrecondition, "CONFIDENTIAL data keys never leave the HSM: encrypt state-secret data with HsmCrypto.Encrypt")
    );
    // The blob's kind fixes the purpose of the destination; unknown keys are not found.
    officer.create_key("citizens-payloads", L::Personal, Some(pb::KeyPurpose::HsmEncrypt), None).await.unwrap();
    assert_eq!(
        re_wrap(&x, &g.wrapped, &c, "citizens-payloads").await,
        refused(Code::FailedPrecondition, "key citizens-payloads has purpose HSM_ENCRYPT; this operation needs purpose ENVELOPE")
    );
    assert_eq!(
        re_wrap(&x, &e.ciphertext, &c, "health").await,
        refused(Code::FailedPrecondition, "key health has purpose ENVELOPE; this operation needs purpose HSM_ENCRYPT")
    );
    assert_eq!(re_wrap(&x, &g.wrapped, &c, "nope").await, refused(Code::NotFound, "no key named nope"));
}

#[tokio::test]
async fn wrong_encryption_context_is_refused_and_nothing_is_returned() {
    let (_server, _officer, x) = setup().await;
    let c = ctx(&[("record", "42")]);
    let g = x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    let e = x.encrypt("memos", b"payload", &c).await.unwrap();
    for wrong in [ctx(&[("record", "43")]), ctx(&[]), ctx(&[("record", "42"), ("extra", "1")])] {
        for (blob, other_key) in [(&g.wrapped, "tax"), (&e.ciphertext, "plans")] {
            assert_eq!(re_wrap(&x, blob, &wrong, "").await, refused(Code::InvalidArgument, TAMPERED));
            assert_eq!(re_wrap(&x, blob, &wrong, other_key).await, refused(Code::InvalidArgument, TAMPERED));
        }
    }
    // In a batch the refused item carries no blob.
    let results = re_wrap_batch(&x, vec![request(&g.wrapped, &ctx(&[]), "tax")]).await.unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!((results[0].code, results[0].message.as_str()), (Code::InvalidArgument as i32, TAMPERED));
    assert_eq!(results[0].result, None);
}

#[tokio::test]
async fn tampered_blobs_are_refused() {
    let (_server, _officer, x) = setup().await;
    let c = ctx(&[("a", "b")]);
    let g = x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    let e = x.encrypt("plans", b"secret words", &c).await.unwrap();
    let flip = |blob: &[u8], i: usize| {
        let mut b = blob.to_vec();
        b[i] ^= 0x01;
        b
    };
    // Every byte of the wrapped key and of the MAC, and of the IV, ciphertext and tag.
    for i in (32..104).step_by(9) {
        assert_eq!(re_wrap(&x, &flip(&g.wrapped, i), &c, "").await, refused(Code::InvalidArgument, TAMPERED), "byte {i}");
        assert_eq!(re_wrap(&x, &flip(&g.wrapped, i), &c, "tax").await, refused(Code::InvalidArgument, TAMPERED), "byte {i}");
    }
    for i in [32, 40, 44, 50, e.ciphertext.len() - 1] {
        assert_eq!(re_wrap(&x, &flip(&e.ciphertext, i), &c, "").await, refused(Code::InvalidArgument, TAMPERED), "byte {i}");
    }
    // The header.
    assert_eq!(re_wrap(&x, &flip(&g.wrapped, 0), &c, "").await, refused(Code::InvalidArgument, "invalid blob: not a KMS blob (bad magic bytes)"));
    let mut level = g.wrapped.clone();
    level[6] = 3; // PERSONAL -> SENSITIVE_PERSONAL: a way up that must not open.
    assert_eq!(
        re_wrap(&x, &level, &c, "health").await,
        refused(Code::InvalidArgument, "the blob's classification SENSITIVE_PERSONAL does not match its key's PERSONAL")
    );
    let mut kind = e.ciphertext.clone();
    kind[5] = 9;
    assert_eq!(re_wrap(&x, &kind, &c, "").await, refused(Code::InvalidArgument, "invalid blob: unknown blob kind 9"));
    assert_eq!(
        re_wrap(&x, &g.wrapped[..103], &c, "").await,
        refused(Code::InvalidArgument, "invalid blob: blob header declares a 72-byte body but 71 bytes follow")
    );
    // The untouched blobs still re-wrap.
    assert!(re_wrap(&x, &g.wrapped, &c, "").await.is_ok());
    assert!(re_wrap(&x, &e.ciphertext, &c, "").await.is_ok());
}

#[tokio::test]
async fn disabled_source_version_or_destination_key_is_refused_naming_it() {
    let (_server, officer, x) = setup().await;
    let c = ctx(&[]);
    let g = x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    rotate(&officer, "citizens").await;
    let disabled = officer
        .key_admin()
        .disable_key_version(pb::SetKeyVersionStateRequest { name: "citizens".into(), version: 1 })
        .await
        .unwrap()
        .into_inner();
    assert!(disabled.pending_approval.is_none());
    assert_eq!(
        re_wrap(&x, &g.wrapped, &c, "").await,
        refused(Code::FailedPrecondition, "key citizens version 1 is DISABLED; only ENABLED versions may be used")
    );
    officer
        .key_admin()
        .enable_key_version(pb::SetKeyVersionStateRequest { name: "citizens".into(), version: 1 })
        .await
        .unwrap();
    assert_eq!(re_wrap(&x, &g.wrapped, &c, "").await.unwrap().key_version, 2);

    let off = officer.key_admin().disable_key(pb::SetKeyStateRequest { name: "tax".into() }).await.unwrap().into_inner();
    assert!(off.pending_approval.is_none());
    assert_eq!(
        re_wrap(&x, &g.wrapped, &c, "tax").await,
        refused(Code::FailedPrecondition, "key tax is DISABLED; only ENABLED keys may be used")
    );
}

#[tokio::test]
async fn callers_without_clearance_level_or_role_for_either_end_are_denied() {
    let (server, officer, x) = setup().await;
    let c = ctx(&[("k", "v")]);
    let personal_only = server.client("personal-only").await;
    let g = personal_only.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    assert_eq!(
        re_wrap(&personal_only, &g.wrapped, &c, "health").await,
        refused(Code::PermissionDenied, "caller urn:kms:caller:test-personal-only is cleared up to PERSONAL; the key is SENSITIVE_PERSONAL")
    );
    // Cleared for the source only: what it may decrypt, it may still not move up.
    assert!(re_wrap(&personal_only, &g.wrapped, &c, "tax").await.is_ok());
    let level2 = server.client("level2").await;
    assert_eq!(
        re_wrap(&level2, &g.wrapped, &c, "health").await,
        refused(Code::PermissionDenied, "caller urn:kms:caller:test-level2 has system security level 2; SENSITIVE_PERSONAL keys need level 3 or higher")
    );
    // Not cleared for the source: refused before the destination is looked at.
    let up = re_wrap(&x, &g.wrapped, &c, "health").await.unwrap();
    assert_eq!(
        re_wrap(&personal_only, &up.blob, &c, "").await,
        refused(Code::PermissionDenied, "caller urn:kms:caller:test-personal-only is cleared up to PERSONAL; the key is SENSITIVE_PERSONAL")
    );
    assert_eq!(
        re_wrap(&officer, &g.wrapped, &c, "").await,
        refused(Code::PermissionDenied, "caller urn:kms:caller:test-officer lacks the exchange role")
    );
}

#[tokio::test]
async fn batch_answers_each_item_in_order_and_one_bad_item_fails_alone() {
    let (_server, officer, x) = setup().await;
    let (c1, c2) = (ctx(&[("i", "1")]), ctx(&[("i", "2")]));
    let g = x.generate_data_key("citizens", &c1, Delivery::PlaintextAndWrapped).await.unwrap();
    let msg = b"two kinds in one batch".to_vec();
    let e = x.encrypt("memos", &msg, &c2).await.unwrap();
    rotate(&officer, "citizens").await;
    let mut tampered = g.wrapped.clone();
    tampered[60] ^= 0x40;

    let results = re_wrap_batch(
        &x,
        vec![request(&g.wrapped, &c1, ""), request(&tampered, &c1, ""), request(&e.ciphertext, &c2, "plans")],
    )
    .await
    .unwrap();
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    assert_eq!(codes, [Code::Ok as i32, Code::InvalidArgument as i32, Code::Ok as i32]);
    assert_eq!(results[1].message, TAMPERED);
    assert_eq!(results[1].result, None);
    assert!(results[0].message.is_empty() && results[2].message.is_empty());

    let first = results[0].result.as_ref().unwrap();
    assert_eq!((first.key_version, first.source_key_version), (2, 1));
    let back = x.decrypt_data_key(&first.blob, &c1, Some("citizens"), None).await.unwrap();
    assert_eq!(*back.plaintext, *g.plaintext.unwrap());
    let third = results[2].result.as_ref().unwrap();
    assert_eq!(third.key_id, key_id(&officer, "plans").await);
    assert_eq!(&x.decrypt(&third.blob, &c2, Some("plans")).await.unwrap().plaintext[..], &msg[..]);
}

#[tokio::test]
async fn batch_reports_every_kind_of_refusal_per_item() {
    let (_server, _officer, x) = setup().await;
    let c = ctx(&[]);
    let g = x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    let mut unknown_key = g.wrapped.clone();
    unknown_key[8] ^= 0xff;
    let results = re_wrap_batch(
        &x,
        vec![
            request(&g.wrapped, &c, "nope"),
            request(&[1, 2, 3], &c, ""),
            request(&g.wrapped, &c, "public"),
            request(&unknown_key, &c, ""),
            request(&g.wrapped, &c, "health"),
        ],
    )
    .await
    .unwrap();
    let got: Vec<(Code, &str)> = results.iter().map(|r| (Code::from(r.code), r.message.as_str())).collect();
    let unknown_id: String = unknown_key[8..24].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        got,
        [
            (Code::NotFound, "no key named nope"),
            (Code::InvalidArgument, "invalid blob: blob is 3 bytes, shorter than the 32-byte header"),
            (
                Code::FailedPrecondition,
                "key public is UNCLASSIFIED, below the blob's level PERSONAL: a re-wrap keeps or raises a classification, never lowers it"
            ),
            (Code::NotFound, format!("no key with id {unknown_id} (it may have been destroyed)").as_str()),
            (Code::Ok, ""),
        ]
    );
    assert!(results[..4].iter().all(|r| r.result.is_none()));
}

#[tokio::test]
async fn batch_size_is_bounded() {
    let (_server, _officer, x) = setup().await;
    let c = ctx(&[("n", "1")]);
    let g = x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
    assert_eq!(
        re_wrap_batch(&x, vec![request(&g.wrapped, &c, ""); 1001]).await,
        Err((Code::InvalidArgument, "invalid items: holds 1001 items; a batch holds at most 1000".into()))
    );
    assert_eq!(
        re_wrap_batch(&x, vec![]).await,
        Err((Code::InvalidArgument, "invalid items: is empty; send at least one blob to re-wrap".into()))
    );
    // 1000 is allowed, and every item answers in its place.
    let results = re_wrap_batch(&x, vec![request(&g.wrapped, &c, "tax"); 1000]).await.unwrap();
    assert_eq!(results.len(), 1000);
    assert!(results.iter().all(|r| r.code == 0 && r.result.as_ref().is_some_and(|r| r.blob.len() == 104)));
}
