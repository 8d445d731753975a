//! Payload encryption inside the HSM (AES-256-GCM) for state-secret levels.

mod hsm_support;

use hsm_support::{new_object_id, TestHsm};
use kms_server::classification::Classification;
use kms_server::hsm::{DecryptPayload, EncryptPayload, HsmError};
use kms_server::ids::{KeyPurpose, ObjectId};
use zeroize::Zeroizing;

const IV: [u8; 12] = [9; 12];

async fn gcm_key(t: &TestHsm) -> ObjectId {
    let id = new_object_id();
    t.hsm().create_key(&id, "gcm", Classification::Secret, KeyPurpose::HsmEncrypt).await.expect("create");
    id
}

async fn encrypt(t: &TestHsm, key: &ObjectId, plaintext: &[u8]) -> Result<Vec<u8>, HsmError> {
    t.hsm()
        .encrypt(EncryptPayload {
            key: key.clone(),
            level: Classification::Secret,
            iv: IV,
            aad: b"context".to_vec(),
            plaintext: Zeroizing::new(plaintext.to_vec()),
        })
        .await
}

fn decrypt_req(key: &ObjectId, ciphertext: &[u8]) -> DecryptPayload {
    DecryptPayload {
        key: key.clone(),
        level: Classification::Secret,
        iv: IV,
        aad: b"context".to_vec(),
        ciphertext: ciphertext.to_vec(),
    }
}

#[tokio::test]
async fn gcm_round_trip_appends_a_16_byte_tag() {
    let t = TestHsm::new(Classification::Secret);
    let k = gcm_key(&t).await;
    let msg = b"state secret payload".repeat(50);
    let ct = encrypt(&t, &k, &msg).await.expect("encrypt");
    assert_eq!(ct.len(), msg.len() + 16);
    let pt = t.hsm().decrypt(decrypt_req(&k, &ct)).await.expect("decrypt");
    assert_eq!(pt.as_slice(), msg.as_slice());
    let empty = encrypt(&t, &k, b"").await.expect("encrypt empty");
    assert_eq!(empty.len(), 16);
    assert!(t.hsm().decrypt(decrypt_req(&k, &empty)).await.expect("decrypt empty").is_empty());
}

#[tokio::test]
async fn tampered_ciphertext_tag_aad_or_iv_fail_the_integrity_check() {
    let t = TestHsm::new(Classification::Secret);
    let k = gcm_key(&t).await;
    let ct = encrypt(&t, &k, b"attack at dawn").await.expect("encrypt");
    let mut cases = Vec::new();
    let mut r = decrypt_req(&k, &ct);
    r.ciphertext[0] ^= 1;
    cases.push(("ciphertext", r));
    let mut r = decrypt_req(&k, &ct);
    let last = r.ciphertext.len() - 1;
    r.ciphertext[last] ^= 1;
    cases.push(("tag", r));
    let mut r = decrypt_req(&k, &ct);
    r.aad = b"contexu".to_vec();
    cases.push(("aad", r));
    let mut r = decrypt_req(&k, &ct);
    r.iv[11] ^= 1;
    cases.push(("iv", r));
    for (what, req) in cases {
        let err = t.hsm().decrypt(req).await.expect_err(what);
        assert!(matches!(err, HsmError::IntegrityCheckFailed), "{what}: {err}");
    }
    // The worker's session is still usable afterwards.
    t.hsm().decrypt(decrypt_req(&k, &ct)).await.expect("still works");
}

#[tokio::test]
async fn payload_levels_above_the_approval_are_refused() {
    let t = TestHsm::new(Classification::Secret);
    let k = gcm_key(&t).await;
    let err = t
        .hsm()
        .encrypt(EncryptPayload {
            key: k.clone(),
            level: Classification::TopSecret,
            iv: IV,
            aad: Vec::new(),
            plaintext: Zeroizing::new(b"x".to_vec()),
        })
        .await
        .expect_err("above approval");
    assert!(matches!(err, HsmError::NotApproved { level: Classification::TopSecret, .. }), "{err}");
    let mut r = decrypt_req(&k, &[0u8; 32]);
    r.level = Classification::TopSecret;
    let err = t.hsm().decrypt(r).await.expect_err("above approval");
    assert!(matches!(err, HsmError::NotApproved { .. }), "{err}");
}

#[tokio::test]
async fn an_envelope_key_cannot_encrypt_payloads() {
    let t = TestHsm::new(Classification::Secret);
    let id = new_object_id();
    t.hsm().create_key(&id, "kek", Classification::Secret, KeyPurpose::Envelope).await.expect("create");
    let err = encrypt(&t, &id, b"x").await.expect_err("wrong purpose");
    assert_eq!(err.pkcs11_code().map(|c| c.name()).as_deref(), Some("CKR_KEY_FUNCTION_NOT_PERMITTED"), "{err}");
}
