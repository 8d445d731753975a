//! Envelope data keys: generate, wrap, bind, verify, unwrap; every tampering is refused.

mod hsm_support;

use hsm_support::{new_object_id, TestHsm};
use kms_server::classification::Classification;
use kms_server::hsm::{BindingInput, GenerateDataKey, GeneratedDataKey, HsmError, UnwrapDataKey};
use kms_server::ids::{KeyPurpose, ObjectId};

fn binding() -> BindingInput {
    BindingInput { header: b"KMS1-header-bytes".to_vec(), context_digest: [7u8; 32] }
}

async fn kek(t: &TestHsm, level: Classification) -> ObjectId {
    let id = new_object_id();
    t.hsm().create_key(&id, "kek", level, KeyPurpose::Envelope).await.expect("create kek");
    id
}

async fn generate(t: &TestHsm, kek: &ObjectId, level: Classification, extract: bool) -> Result<GeneratedDataKey, HsmError> {
    t.hsm()
        .generate_data_key(GenerateDataKey { kek: kek.clone(), level, extract_plaintext: extract, binding: binding() })
        .await
}

fn unwrap_req(kek: &ObjectId, g: &GeneratedDataKey) -> UnwrapDataKey {
    UnwrapDataKey {
        kek: kek.clone(),
        level: Classification::Personal,
        wrapped: g.wrapped.clone(),
        binding: binding(),
        mac: g.mac,
    }
}

#[tokio::test]
async fn generated_data_key_unwraps_to_the_same_32_bytes() {
    let t = TestHsm::new(Classification::Personal);
    let k = kek(&t, Classification::Personal).await;
    let g = generate(&t, &k, Classification::Personal, true).await.expect("generate");
    assert_eq!(g.wrapped.len(), 40, "KWP of a 32-byte key");
    let plaintext = g.plaintext.as_ref().expect("plaintext asked for");
    assert_eq!(format!("{plaintext:?}"), "DataKey(<redacted>)");
    let back = t.hsm().unwrap_data_key(unwrap_req(&k, &g)).await.expect("unwrap");
    assert_eq!(back.expose(), plaintext.expose());
    // Wrapped-only generation returns no plaintext and still unwraps.
    let g2 = generate(&t, &k, Classification::Personal, false).await.expect("generate wrapped only");
    assert!(g2.plaintext.is_none());
    assert_ne!(g2.wrapped, g.wrapped);
    t.hsm().unwrap_data_key(unwrap_req(&k, &g2)).await.expect("unwrap wrapped-only key");
}

#[tokio::test]
async fn any_flipped_bit_in_wrapped_header_digest_or_mac_fails_the_integrity_check() {
    let t = TestHsm::new(Classification::Personal);
    let k = kek(&t, Classification::Personal).await;
    let g = generate(&t, &k, Classification::Personal, false).await.expect("generate");
    let mut cases = Vec::new();
    for i in [0, 17, 39] {
        let mut r = unwrap_req(&k, &g);
        r.wrapped[i] ^= 0x01;
        cases.push(("wrapped", r));
    }
    let mut r = unwrap_req(&k, &g);
    r.binding.header[3] ^= 0x80;
    cases.push(("header", r));
    let mut r = unwrap_req(&k, &g);
    r.binding.context_digest[31] ^= 0x01;
    cases.push(("context digest", r));
    let mut r = unwrap_req(&k, &g);
    r.mac[0] ^= 0x01;
    cases.push(("mac", r));
    let mut r = unwrap_req(&k, &g);
    r.wrapped.truncate(32);
    cases.push(("truncated wrapped", r));
    for (what, req) in cases {
        let err = t.hsm().unwrap_data_key(req).await.expect_err(what);
        assert!(matches!(err, HsmError::IntegrityCheckFailed), "{what}: {err}");
    }
}

#[tokio::test]
async fn a_blob_presented_to_another_kek_fails_the_integrity_check() {
    let t = TestHsm::new(Classification::Personal);
    let k1 = kek(&t, Classification::Personal).await;
    let k2 = kek(&t, Classification::Personal).await;
    let g = generate(&t, &k1, Classification::Personal, false).await.expect("generate");
    let err = t.hsm().unwrap_data_key(unwrap_req(&k2, &g)).await.expect_err("other kek");
    assert!(matches!(err, HsmError::IntegrityCheckFailed), "{err}");
}

#[tokio::test]
async fn levels_above_the_approval_are_refused_before_any_hsm_work() {
    let t = TestHsm::new(Classification::Personal);
    let k = kek(&t, Classification::Personal).await;
    let err = generate(&t, &k, Classification::SensitivePersonal, false).await.expect_err("above approval");
    assert!(
        matches!(err, HsmError::NotApproved { level: Classification::SensitivePersonal, approved: Classification::Personal, .. }),
        "{err}"
    );
    let g = generate(&t, &k, Classification::Personal, false).await.expect("generate");
    let mut r = unwrap_req(&k, &g);
    r.level = Classification::SensitivePersonal;
    let err = t.hsm().unwrap_data_key(r).await.expect_err("above approval");
    assert!(matches!(err, HsmError::NotApproved { .. }), "{err}");
}

#[tokio::test]
async fn state_secret_levels_never_get_a_data_key() {
    let t = TestHsm::new(Classification::TopSecret);
    let k = kek(&t, Classification::Confidential).await;
    for extract in [true, false] {
        for level in [Classification::Confidential, Classification::Secret, Classification::TopSecret] {
            let err = generate(&t, &k, level, extract).await.expect_err("never");
            assert!(matches!(err, HsmError::ReleaseForbidden { level: l } if l == level), "{err}");
        }
    }
    // Sensitive-personal keys may be generated with the plaintext (the server seals it).
    let sp = kek(&t, Classification::SensitivePersonal).await;
    let g = generate(&t, &sp, Classification::SensitivePersonal, true).await.expect("sensitive personal");
    let mut r = unwrap_req(&sp, &g);
    r.level = Classification::Confidential;
    let err = t.hsm().unwrap_data_key(r).await.expect_err("never");
    assert!(matches!(err, HsmError::ReleaseForbidden { level: Classification::Confidential }), "{err}");
}

#[tokio::test]
async fn no_data_key_object_remains_after_generate_or_unwrap() {
    let t = TestHsm::new(Classification::Personal);
    let k = kek(&t, Classification::Personal).await;
    assert_eq!(t.object_count(), 4, "the KEK, the binding key and the audit signing key pair");
    // The first use makes the session copies of the KEK and the binding key, and nothing else.
    let g = generate(&t, &k, Classification::Personal, true).await.expect("generate");
    assert_eq!(t.hsm().session_copies(), 2);
    let before = t.object_count();
    assert_eq!(before, 4 + 2);
    generate(&t, &k, Classification::Personal, false).await.expect("generate");
    t.hsm().unwrap_data_key(unwrap_req(&k, &g)).await.expect("unwrap");
    let mut bad = unwrap_req(&k, &g);
    bad.wrapped[5] ^= 1;
    bad.mac = g.mac;
    let _ = t.hsm().unwrap_data_key(bad).await;
    assert_eq!(t.object_count(), before);
    assert_eq!(t.hsm().session_copies(), 2);
}

#[tokio::test]
async fn an_unknown_kek_is_object_not_found() {
    let t = TestHsm::new(Classification::Personal);
    let err = generate(&t, &new_object_id(), Classification::Personal, false).await.expect_err("unknown");
    assert!(matches!(err, HsmError::ObjectNotFound { .. }), "{err}");
}
