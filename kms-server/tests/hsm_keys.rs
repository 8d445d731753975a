//! Key-version objects on the token: templates, refusals, the handle cache, the binding key.

mod hsm_support;

use cryptoki::object::{Attribute, AttributeInfo, AttributeType};
use hsm_support::{new_object_id, TestHsm};
use kms_server::classification::Classification;
use kms_server::hsm::HsmError;
use kms_server::ids::{KeyPurpose, ObjectId};

const BINDING_ID: &[u8] = b"kms/blob-binding/v1";

#[tokio::test]
async fn kek_is_sensitive_non_extractable_and_its_value_cannot_be_read() {
    let t = TestHsm::new(Classification::Secret);
    let id = new_object_id();
    t.hsm().create_key(&id, "kek", Classification::Secret, KeyPurpose::Envelope).await.expect("create");
    let info = t.hsm().inspect_key(&id).await.expect("inspect");
    assert!(info.token && info.private && info.sensitive && info.always_sensitive && info.never_extractable);
    // Copyable into a session object, and so modifiable (SoftHSM will not change CKA_TOKEN in a
    // copy of a non-modifiable object); see kms_server::hsm::handles.
    assert!(!info.extractable && info.modifiable && info.copyable && !info.value_readable);
    assert!(info.wrap && info.unwrap);
    assert!(!info.encrypt && !info.decrypt && !info.sign && !info.verify);
    let (value_info, attrs) = t.try_read_value(&id);
    assert!(matches!(value_info, AttributeInfo::Sensitive), "{value_info:?}");
    assert!(!attrs.iter().any(|a| matches!(a, Attribute::Value(_))), "CKA_VALUE must not be returned");
    // Modifiable does not mean weaker: the token refuses to make it extractable or readable.
    let s = t.raw_rw_session();
    let h = t.raw_find(id.as_bytes())[0];
    for attempt in [Attribute::Extractable(true), Attribute::Sensitive(false)] {
        let err = s.update_attributes(h, std::slice::from_ref(&attempt)).expect_err("refused");
        assert!(err.to_string().contains("read-only") || err.to_string().contains("ATTRIBUTE_READ_ONLY") || err.to_string().contains("may not be modified"), "{attempt:?}: {err}");
    }
    let info = t.hsm().inspect_key(&id).await.expect("inspect");
    assert!(info.sensitive && !info.extractable && !info.value_readable);
}

async fn generate_with(t: &TestHsm, kek: &ObjectId) -> Result<kms_server::hsm::GeneratedDataKey, HsmError> {
    t.hsm()
        .generate_data_key(kms_server::hsm::GenerateDataKey {
            kek: kek.clone(),
            level: Classification::Personal,
            extract_plaintext: false,
            binding: kms_server::hsm::BindingInput { header: b"h".to_vec(), context_digest: [0; 32] },
        })
        .await
}

#[tokio::test]
async fn requests_use_a_session_copy_that_keeps_the_keys_protection_and_dies_with_it() {
    let t = TestHsm::new(Classification::Personal);
    let id = new_object_id();
    t.hsm().create_key(&id, "kek", Classification::Personal, KeyPurpose::Envelope).await.expect("create");
    assert_eq!(t.hsm().session_copies(), 0);
    generate_with(&t, &id).await.expect("generate");
    assert_eq!(t.hsm().session_copies(), 2, "the KEK and the binding key");

    // The copy is a session object with the token key's id and every protection of the key.
    let s = t.raw_session();
    let found = t.raw_find(id.as_bytes());
    assert_eq!(found.len(), 2, "the token object and its session copy");
    let mut tokens = Vec::new();
    for h in found {
        let attrs = s
            .get_attributes(h, &[AttributeType::Token, AttributeType::Sensitive, AttributeType::Extractable, AttributeType::NeverExtractable, AttributeType::Wrap, AttributeType::Encrypt])
            .expect("attributes");
        assert!(attrs.contains(&Attribute::Sensitive(true)) && attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
        assert!(attrs.contains(&Attribute::NeverExtractable(true)) && attrs.contains(&Attribute::Wrap(true)), "{attrs:?}");
        assert!(attrs.contains(&Attribute::Encrypt(false)), "{attrs:?}");
        tokens.push(attrs.contains(&Attribute::Token(true)));
        let info = s.get_attribute_info(h, &[AttributeType::Value]).expect("info").remove(0);
        assert!(matches!(info, AttributeInfo::Sensitive), "{info:?}");
    }
    tokens.sort();
    assert_eq!(tokens, [false, true]);
    // Listing the token (reconciliation) names the key once: the copy is not a key object.
    let listed: Vec<Vec<u8>> = t.hsm().list_key_objects().await.expect("list").into_iter().map(|o| o.id).collect();
    assert_eq!(listed, std::slice::from_ref(&id.0));

    // Destroying the key destroys its copy first: nothing of it is left, and it cannot be used.
    t.hsm().destroy_key(&id).await.expect("destroy");
    assert_eq!(t.hsm().session_copies(), 1, "only the binding key's copy");
    assert!(t.raw_find(id.as_bytes()).is_empty());
    let err = generate_with(&t, &id).await.expect_err("destroyed");
    assert!(matches!(err, HsmError::ObjectNotFound { .. }), "{err}");
}

#[tokio::test]
async fn a_key_made_before_copies_were_allowed_is_used_in_place() {
    let t = TestHsm::new(Classification::Personal);
    let id = new_object_id();
    // The template of earlier versions: not modifiable, not copyable.
    let s = t.raw_rw_session();
    s.generate_key(
        &cryptoki::mechanism::Mechanism::AesKeyGen,
        &[
            Attribute::Class(cryptoki::object::ObjectClass::SECRET_KEY),
            Attribute::KeyType(cryptoki::object::KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Id(id.as_bytes().to_vec()),
            Attribute::Label(b"legacy".to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Modifiable(false),
            Attribute::Copyable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
        ],
    )
    .expect("legacy key");
    let g = generate_with(&t, &id).await.expect("generate with a key that cannot be copied");
    assert_eq!(g.wrapped.len(), 40);
    assert_eq!(t.hsm().session_copies(), 1, "the binding key only");
    assert_eq!(t.raw_find(id.as_bytes()).len(), 1, "no copy of the legacy key");
    t.hsm().destroy_key(&id).await.expect("destroy");
    assert!(t.raw_find(id.as_bytes()).is_empty());
    assert!(matches!(generate_with(&t, &id).await.expect_err("destroyed"), HsmError::ObjectNotFound { .. }));
}

#[tokio::test]
async fn hsm_encrypt_key_can_only_encrypt_and_decrypt() {
    let t = TestHsm::new(Classification::TopSecret);
    let id = new_object_id();
    t.hsm().create_key(&id, "gcm", Classification::TopSecret, KeyPurpose::HsmEncrypt).await.expect("create");
    let info = t.hsm().inspect_key(&id).await.expect("inspect");
    assert!(info.encrypt && info.decrypt);
    assert!(!info.wrap && !info.unwrap && !info.sign && !info.verify);
    assert!(info.sensitive && !info.extractable && !info.value_readable);
}

#[tokio::test]
async fn create_refuses_an_existing_id_and_an_unapproved_level() {
    let t = TestHsm::new(Classification::Personal);
    let id = new_object_id();
    t.hsm().create_key(&id, "k", Classification::Personal, KeyPurpose::Envelope).await.expect("create");
    let err = t.hsm().create_key(&id, "k", Classification::Personal, KeyPurpose::Envelope).await.expect_err("dup");
    assert!(matches!(err, HsmError::ObjectExists { .. }), "{err}");
    let other = new_object_id();
    let err = t
        .hsm()
        .create_key(&other, "k", Classification::Confidential, KeyPurpose::HsmEncrypt)
        .await
        .expect_err("above approval");
    assert!(
        matches!(err, HsmError::NotApproved { level: Classification::Confidential, approved: Classification::Personal, .. }),
        "{err}"
    );
    assert!(!t.hsm().key_exists(&other).await.expect("exists"));
    // The binding key's id is taken too.
    let err = t
        .hsm()
        .create_key(&ObjectId(BINDING_ID.to_vec()), "k", Classification::Personal, KeyPurpose::Envelope)
        .await
        .expect_err("binding id");
    assert!(matches!(err, HsmError::ObjectExists { .. }), "{err}");
}

#[tokio::test]
async fn destroyed_key_is_gone_and_reported_as_not_found() {
    let t = TestHsm::new(Classification::Personal);
    let id = new_object_id();
    t.hsm().create_key(&id, "k", Classification::Personal, KeyPurpose::Envelope).await.expect("create");
    assert!(t.hsm().key_exists(&id).await.expect("exists"));
    t.hsm().destroy_key(&id).await.expect("destroy");
    assert!(!t.hsm().key_exists(&id).await.expect("exists"));
    assert!(t.raw_find(id.as_bytes()).is_empty());
    let err = t.hsm().inspect_key(&id).await.expect_err("gone");
    assert!(matches!(err, HsmError::ObjectNotFound { .. }), "{err}");
    let err = t.hsm().destroy_key(&id).await.expect_err("gone");
    assert!(matches!(err, HsmError::ObjectNotFound { .. }), "{err}");
}

#[tokio::test]
async fn stale_cached_handle_is_evicted_found_again_and_retried_once() {
    let t = TestHsm::new(Classification::Personal);
    let id = new_object_id();
    t.hsm().create_key(&id, "k", Classification::Personal, KeyPurpose::Envelope).await.expect("create");
    t.hsm().danger_poison_handle_cache_for_tests(&id).await.expect("poison");
    let info = t.hsm().inspect_key(&id).await.expect("recovered after eviction");
    assert!(info.wrap);
    // The binding key's handle recovers the same way (used by every data-key request).
    t.hsm().danger_poison_handle_cache_for_tests(&ObjectId(BINDING_ID.to_vec())).await.expect("poison");
    t.hsm().danger_poison_handle_cache_for_tests(&id).await.expect("poison");
    let g = generate_with(&t, &id).await.expect("generate after poisoning both handles");
    assert_eq!(g.wrapped.len(), 40);
}

#[tokio::test]
async fn binding_key_is_created_once_and_reused_after_reopen() {
    let mut t = TestHsm::new(Classification::Personal);
    assert_eq!(t.raw_find(BINDING_ID).len(), 1);
    t.reopen(Classification::Personal);
    t.reopen(Classification::Personal);
    assert_eq!(t.raw_find(BINDING_ID).len(), 1);
}

#[tokio::test]
async fn listing_names_key_versions_with_their_labels_but_not_the_binding_key() {
    let t = TestHsm::new(Classification::Secret);
    let a = new_object_id();
    let b = new_object_id();
    t.hsm().create_key(&a, "kms:a:v1", Classification::Personal, KeyPurpose::Envelope).await.expect("a");
    t.hsm().create_key(&b, "kms:b:v1", Classification::Secret, KeyPurpose::HsmEncrypt).await.expect("b");
    let mut want = vec![
        kms_server::hsm::ListedObject { id: a.0.clone(), label: b"kms:a:v1".to_vec() },
        kms_server::hsm::ListedObject { id: b.0.clone(), label: b"kms:b:v1".to_vec() },
    ];
    want.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(t.hsm().list_key_objects().await.expect("list"), want);
}

#[tokio::test]
async fn token_info_and_shutdown_close_the_pool_for_every_clone() {
    let mut t = TestHsm::new(Classification::Personal);
    let hsm = t.hsm.take().expect("open");
    assert!(hsm.token().is_softhsm());
    assert_eq!(hsm.token().label, "kms-hsm-test");
    let clone = hsm.clone();
    hsm.shutdown();
    let err = clone.key_exists(&new_object_id()).await.expect_err("closed");
    assert!(matches!(err, HsmError::PoolClosed), "{err}");
    drop(clone);
}

#[tokio::test]
async fn objects_with_neither_id_nor_label_are_destroyed_only_as_many_as_asked_and_nothing_else_is() {
    use cryptoki::mechanism::Mechanism;
    let t = TestHsm::new(Classification::Secret);
    let kept = new_object_id();
    t.hsm().create_key(&kept, "kept", Classification::Personal, KeyPurpose::Envelope).await.expect("create");
    let raw = t.raw_rw_session();
    let base = vec![Attribute::Token(true), Attribute::Private(true), Attribute::ValueLen(32.into())];
    let with = |extra: Attribute| base.iter().cloned().chain([extra]).collect::<Vec<_>>();
    // What an interrupted C_GenerateKey leaves: no id, no label.
    raw.generate_key(&Mechanism::AesKeyGen, &base).expect("debris");
    raw.generate_key(&Mechanism::AesKeyGen, &base).expect("debris");
    // Someone else's objects: labelled, or with an id the service does not use. Kept.
    raw.generate_key(&Mechanism::AesKeyGen, &with(Attribute::Label(b"someone else".to_vec()))).expect("labelled");
    raw.generate_key(&Mechanism::AesKeyGen, &with(Attribute::Id(b"foreign".to_vec()))).expect("foreign id");
    let before = t.object_count();

    assert_eq!(t.hsm().count_incomplete_objects().await.expect("count"), 2);
    assert_eq!(t.hsm().destroy_incomplete_objects(0).await.expect("none asked"), 0);
    assert_eq!(t.object_count(), before);
    assert_eq!(t.hsm().destroy_incomplete_objects(1).await.expect("one asked"), 1);
    assert_eq!(t.object_count(), before - 1);
    assert_eq!(t.hsm().destroy_incomplete_objects(5).await.expect("the rest"), 1);
    assert_eq!(t.object_count(), before - 2);
    assert_eq!(t.hsm().destroy_incomplete_objects(5).await.expect("again"), 0);
    assert_eq!(t.raw_find(b"foreign").len(), 1);
    assert_eq!(t.raw_find(BINDING_ID).len(), 1);
    let mut listed: Vec<Vec<u8>> = t.hsm().list_key_objects().await.expect("list").into_iter().map(|o| o.id).collect();
    listed.sort();
    let mut want = vec![kept.0.clone(), b"foreign".to_vec()];
    want.sort();
    assert_eq!(listed, want, "ids listed: the service's versions and foreign ids, never the binding key");
}

#[tokio::test]
async fn audit_signing_key_is_made_once_signs_digests_and_cannot_be_read() {
    use p256::ecdsa::signature::Verifier;
    use sha2::{Digest, Sha256};
    let mut t = TestHsm::new(Classification::Personal);
    let public = t.hsm().audit_public_key().to_vec();
    assert_eq!(public.len(), 65);
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&public).expect("a P-256 point");
    let message = b"checkpoint 42";
    let digest: [u8; 32] = Sha256::digest(message).into();
    let sig = t.hsm().sign_audit_digest(digest).await.expect("sign");
    assert_eq!(sig.len(), 64);
    let sig = p256::ecdsa::Signature::from_slice(&sig).expect("r || s");
    let sig = sig.normalize_s().unwrap_or(sig);
    key.verify(message, &sig).expect("verifies with the public half alone");
    assert!(key.verify(b"checkpoint 43", &sig).is_err());

    // The private half is sensitive and not extractable; a reopen finds the same pair.
    let private = t.raw_find(b"kms/audit-signing/v1");
    assert_eq!(private.len(), 1);
    let attrs = t
        .raw_session()
        .get_attributes(private[0], &[cryptoki::object::AttributeType::Sensitive, cryptoki::object::AttributeType::Extractable])
        .expect("attributes");
    assert_eq!(attrs, vec![Attribute::Sensitive(true), Attribute::Extractable(false)]);
    t.reopen(Classification::Personal);
    assert_eq!(t.hsm().audit_public_key(), public.as_slice());
    assert_eq!(t.raw_find(b"kms/audit-signing/v1").len(), 1);
}
