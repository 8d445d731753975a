//! the level table, enforced on every call: caller levels and clearance, roles, plaintext
//! release, token approval and the isolated-network rule for TOP_SECRET.

use kms_client::{Delivery, RecipientKey};
use kms_e2e::pb::{Classification as L, KeyPurpose};
use kms_e2e::{ctx, Settings, TestServer};
use tonic::Code;

async fn create(server: &TestServer, name: &str, level: L) {
    server.client("officer").await.create_key(name, level, None, None).await.unwrap();
}

fn refusal(err: kms_client::ClientError) -> (Code, String) {
    let s = err.status().unwrap_or_else(|| panic!("expected a status, got {err}"));
    (s.code(), s.message().to_owned())
}

#[tokio::test]
async fn caller_below_the_levels_minimum_system_level_is_refused() {
    let server = TestServer::start(Settings::default());
    create(&server, "sp", L::SensitivePersonal).await;
    create(&server, "p", L::Personal).await;
    let low = server.client("level2").await;
    let r = RecipientKey::generate().unwrap();
    let err = low.generate_data_key("sp", &ctx(&[]), Delivery::ToRecipient(&r)).await.err().unwrap();
    assert_eq!(
        refusal(err),
        (
            Code::PermissionDenied,
            "caller urn:kms:caller:test-level2 has system security level 2; SENSITIVE_PERSONAL keys need level 3 or higher".into()
        )
    );
    // The same caller may use a PERSONAL key (minimum level 2).
    assert!(low.generate_data_key("p", &ctx(&[]), Delivery::PlaintextAndWrapped).await.is_ok());
}

#[tokio::test]
async fn caller_above_its_clearance_is_refused() {
    let server = TestServer::start(Settings::default());
    create(&server, "sp", L::SensitivePersonal).await;
    create(&server, "secret", L::Secret).await;
    let limited = server.client("personal-only").await;
    let err = limited.encrypt("secret", b"x", &ctx(&[])).await.unwrap_err();
    assert_eq!(
        refusal(err),
        (Code::PermissionDenied, "caller urn:kms:caller:test-personal-only is cleared up to PERSONAL; the key is SECRET".into())
    );
    let r = RecipientKey::generate().unwrap();
    let err = limited.generate_data_key("sp", &ctx(&[]), Delivery::ToRecipient(&r)).await.err().unwrap();
    assert_eq!(refusal(err).0, Code::PermissionDenied);
}

#[tokio::test]
async fn roles_separate_officers_from_exchange_services() {
    let server = TestServer::start(Settings::default());
    create(&server, "p", L::Personal).await;
    let exchange = server.client("exchange").await;
    let err = exchange.create_key("x", L::Personal, None, None).await.unwrap_err();
    assert_eq!(refusal(err), (Code::PermissionDenied, "caller urn:kms:caller:test-exchange lacks the officer role".into()));
    let err = exchange.list_keys(&Default::default()).await.unwrap_err();
    assert_eq!(refusal(err).0, Code::PermissionDenied);
    let officer = server.client("officer").await;
    let err = officer.generate_data_key("p", &ctx(&[]), Delivery::PlaintextAndWrapped).await.err().unwrap();
    assert_eq!(refusal(err), (Code::PermissionDenied, "caller urn:kms:caller:test-officer lacks the exchange role".into()));
}

#[tokio::test]
async fn state_secret_keys_never_give_a_data_key() {
    let server = TestServer::start(Settings::default());
    create(&server, "conf", L::Confidential).await;
    let exchange = server.client("exchange").await;
    let r = RecipientKey::generate().unwrap();
    for delivery in [Delivery::PlaintextAndWrapped, Delivery::WrappedOnly, Delivery::ToRecipient(&r)] {
        let err = exchange.generate_data_key("conf", &ctx(&[]), delivery).await.err().unwrap();
        assert_eq!(
            refusal(err),
            (
                Code::FailedPrecondition,
                "CONFIDENTIAL data keys never leave the HSM: encrypt state-secret data with HsmCrypto.Encrypt".into()
            )
        );
    }
    // An officer cannot even make an ENVELOPE key at a state-secret level.
    let officer = server.client("officer").await;
    let err = officer.create_key("conf-env", L::Secret, Some(KeyPurpose::Envelope), None).await.unwrap_err();
    assert_eq!(
        refusal(err),
        (Code::FailedPrecondition, "SECRET keys may not have purpose ENVELOPE: state-secret data keys never leave the HSM".into())
    );
}

#[tokio::test]
async fn sensitive_personal_data_keys_are_only_sealed_to_the_caller() {
    let server = TestServer::start(Settings::default());
    create(&server, "sp", L::SensitivePersonal).await;
    let exchange = server.client("exchange").await;
    let err = exchange.generate_data_key("sp", &ctx(&[]), Delivery::PlaintextAndWrapped).await.err().unwrap();
    assert_eq!(refusal(err).0, Code::FailedPrecondition);
    // Only a key an officer registered for the caller is sealed to: not one the caller brings.
    let stranger = RecipientKey::generate().unwrap();
    let err = exchange.generate_data_key("sp", &ctx(&[("case", "9")]), Delivery::ToRecipient(&stranger)).await.err().unwrap();
    assert_eq!(
        refusal(err),
        (
            Code::PermissionDenied,
            format!(
                "recipient key {} is not registered for caller urn:kms:caller:test-exchange: data keys are sealed only to keys an officer registered",
                stranger.fingerprint_hex()
            )
        )
    );
    let r = server.register_recipient("exchange").await;
    let generated = exchange.generate_data_key("sp", &ctx(&[("case", "9")]), Delivery::ToRecipient(&r)).await.unwrap();
    let sealed_key = generated.plaintext.clone().unwrap();
    // Wrapped-only is allowed: no key leaves.
    let wrapped_only = exchange.generate_data_key("sp", &ctx(&[]), Delivery::WrappedOnly).await.unwrap();
    assert!(wrapped_only.plaintext.is_none());
    // Decrypting in plaintext is refused; sealed to another recipient gives the same key.
    let err = exchange.decrypt_data_key(&generated.wrapped, &ctx(&[("case", "9")]), None, None).await.err().unwrap();
    assert_eq!(
        refusal(err),
        (
            Code::FailedPrecondition,
            "SENSITIVE_PERSONAL data keys are only released sealed to a registered recipient key of the caller (WRAPPED_TO_RECIPIENT, or DecryptDataKey with sealed)".into()
        )
    );
    let other = server.register_recipient("exchange").await;
    let back = exchange
        .decrypt_data_key(&generated.wrapped, &ctx(&[("case", "9")]), Some("sp"), Some(&other))
        .await
        .unwrap();
    assert_eq!(*back.plaintext, *sealed_key);
    assert_eq!(back.classification, L::SensitivePersonal);

    // Sealed for a registered key and handed on unopened: only the holder of the private key opens it.
    let c = ctx(&[("case", "10")]);
    let handed = exchange.generate_data_key("sp", &c, Delivery::SealedFor(other.fingerprint())).await.unwrap();
    assert!(handed.plaintext.is_none());
    let sealed = handed.recipient_sealed.expect("sealed bytes");
    assert_eq!(sealed.len(), 106);
    let binding = kms_client::SealBinding::new(&handed.key_id, handed.key_version, &c).unwrap();
    let opened = other.open(&sealed, &binding).unwrap();
    assert!(r.open(&sealed, &binding).is_err(), "sealed to `other`, not to `r`");
    let back = exchange.decrypt_data_key(&handed.wrapped, &c, Some("sp"), Some(&r)).await.unwrap();
    assert_eq!(*back.plaintext, *opened);
    let err = exchange.generate_data_key("sp", &c, Delivery::SealedFor(stranger.fingerprint())).await.err().unwrap();
    assert_eq!(refusal(err).0, Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_used_only_on_a_token_approved_for_their_level() {
    let mut server = TestServer::start(Settings::default());
    create(&server, "secret", L::Secret).await;
    let exchange = server.client("exchange").await;
    let ct = exchange.encrypt("secret", b"plan", &ctx(&[])).await.unwrap().ciphertext;

    // The same token, now approved only up to PERSONAL (the default for any token).
    server.restart(Settings { approved_up_to: "PERSONAL", ..Settings::default() });
    let log = server.log();
    assert!(log.contains("key's level is above the token's approval"), "{log}");
    let exchange = server.client("exchange").await;
    let expected = (
        Code::FailedPrecondition,
        "token kms-test is approved up to PERSONAL; SECRET keys may not be used on it".to_owned(),
    );
    assert_eq!(refusal(exchange.encrypt("secret", b"plan", &ctx(&[])).await.unwrap_err()), expected);
    assert_eq!(refusal(exchange.decrypt(&ct, &ctx(&[]), None).await.err().unwrap()), expected);
    let officer = server.client("officer").await;
    let err = officer.create_key("sp", L::SensitivePersonal, None, None).await.unwrap_err();
    assert_eq!(
        refusal(err),
        (Code::FailedPrecondition, "token kms-test is approved up to PERSONAL; SENSITIVE_PERSONAL keys may not be used on it".into())
    );
}

#[tokio::test]
async fn softhsm_approved_above_personal_is_announced_loudly() {
    let server = TestServer::start(Settings::default());
    let log = server.log();
    assert!(log.contains("SoftHSM token kms-test is approved up to SECRET"), "{log}");
    assert!(log.contains("NOT approved hardware"), "{log}");
}

#[tokio::test]
async fn top_secret_is_refused_without_an_isolated_network() {
    let mut callers = kms_e2e::default_callers();
    callers.push(kms_e2e::TestCaller { name: "ts-officer", system_level: 5, clearance: "TOP_SECRET", roles: &["officer"] });
    let server = TestServer::start(Settings { approved_up_to: "TOP_SECRET", callers, ..Settings::default() });
    let officer = server.client("ts-officer").await;
    let err = officer.create_key("ts", L::TopSecret, None, None).await.unwrap_err();
    assert_eq!(
        refusal(err),
        (Code::FailedPrecondition, "TOP_SECRET keys are refused: the deployment does not declare an isolated network".into())
    );
}

#[tokio::test]
async fn top_secret_works_on_an_isolated_network_for_cleared_callers() {
    let mut callers = kms_e2e::default_callers();
    callers.push(kms_e2e::TestCaller { name: "ts-officer", system_level: 5, clearance: "TOP_SECRET", roles: &["officer"] });
    callers.push(kms_e2e::TestCaller { name: "ts-exchange", system_level: 5, clearance: "TOP_SECRET", roles: &["exchange"] });
    let server = TestServer::start(Settings { approved_up_to: "TOP_SECRET", isolated_network: true, callers, ..Settings::default() });
    server.client("ts-officer").await.create_key("ts", L::TopSecret, None, None).await.unwrap();
    // The SECRET-cleared officer may not create one.
    let err = server.client("officer").await.create_key("ts2", L::TopSecret, None, None).await.unwrap_err();
    assert_eq!(refusal(err).0, Code::PermissionDenied);
    let x = server.client("ts-exchange").await;
    let ct = x.encrypt("ts", b"top", &ctx(&[("d", "1")])).await.unwrap().ciphertext;
    assert_eq!(&x.decrypt(&ct, &ctx(&[("d", "1")]), Some("ts")).await.unwrap().plaintext[..], b"top");
}
