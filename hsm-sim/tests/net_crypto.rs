//! The client module against a real `hsm-sim serve` on a real SoftHSM token: the cryptography the
//! service uses gives the same bytes and the same codes as SoftHSM in process, each cryptoki
//! operation is one round trip, and a second client sees the first one's token objects.
//!
//! Run with cargo-nextest (one process per test); see `common` for why.

#![forbid(unsafe_code)]

mod common;

use std::process::Command;

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use cryptoki::error::RvError;
use cryptoki::session::Session;
use secrecy::ExposeSecret;

use common::{code, find_by_label, in_process, known_session_key, token_kek, Endpoint, Net};

const DATA_KEY: [u8; 32] = [
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x01, 0x23, 0x45,
    0x67, 0x89, 0xab, 0xcd, 0xef, 0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10,
];

fn unwrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

fn value(s: &Session, h: cryptoki::object::ObjectHandle) -> Vec<u8> {
    match s.get_attributes(h, &[AttributeType::Value]).expect("C_GetAttributeValue").pop() {
        Some(Attribute::Value(v)) => v,
        other => panic!("no CKA_VALUE: {other:?}"),
    }
}

fn gcm<'a>(iv: &'a mut [u8; 12], aad: &'a [u8]) -> Mechanism<'a> {
    Mechanism::AesGcm(GcmParams::new(iv, aad, 128.into()).expect("GCM parameters"))
}

fn calls(net: &Net) -> u64 {
    net.hsm.status().expect("status").calls
}

#[test]
fn a_data_key_wrapped_with_kwp_over_the_network_is_byte_identical_to_softhsm_in_process() {
    let net = Net::start();
    let s = net.user_session();
    let kek = token_kek(&s, "kek");
    let dk = known_session_key(&s, &DATA_KEY);

    let before = calls(&net);
    let wrapped = s.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk).expect("C_WrapKey");
    assert_eq!(calls(&net) - before, 1, "a wrap and its size query are one round trip");
    assert_eq!(wrapped.len(), 40, "RFC 5649 of 32 bytes");

    let back = s.unwrap_key(&Mechanism::AesKeyWrapPad, kek, &wrapped, &unwrap_template()).expect("C_UnwrapKey");
    assert_eq!(value(&s, back), DATA_KEY);
    let mut tampered = wrapped.clone();
    tampered[5] ^= 1;
    // SoftHSM's code for a wrapping that does not unwrap.
    assert_eq!(code(s.unwrap_key(&Mechanism::AesKeyWrapPad, kek, &tampered, &unwrap_template())), RvError::GeneralError);

    // The same token KEK, used by SoftHSM in this process.
    let (local, slot) = in_process(&net.token);
    {
        let ls = local.open_rw_session(slot).expect("session");
        ls.login(cryptoki::session::UserType::User, Some(net.token.user_pin())).expect("login");
        let lkek = *find_by_label(&ls, "kek").first().expect("the KEK made over the network is on the token");
        let ldk = known_session_key(&ls, &DATA_KEY);
        assert_eq!(ls.wrap_key(&Mechanism::AesKeyWrapPad, lkek, ldk).expect("in-process wrap"), wrapped);
        let lback = ls.unwrap_key(&Mechanism::AesKeyWrapPad, lkek, &wrapped, &unwrap_template()).expect("unwrap");
        assert_eq!(value(&ls, lback), DATA_KEY);
        let plain = ls.wrap_key(&Mechanism::AesKeyWrap, lkek, ldk).expect("in-process AES key wrap");
        assert_eq!(s.wrap_key(&Mechanism::AesKeyWrap, kek, dk).expect("C_WrapKey CKM_AES_KEY_WRAP"), plain);
    }
    local.finalize().expect("finalize SoftHSM");
}

#[test]
fn the_value_of_a_sensitive_non_extractable_key_is_unavailable() {
    let net = Net::start();
    let s = net.user_session();
    let kek = token_kek(&s, "kek");
    let info = s.get_attribute_info(kek, &[AttributeType::Value]).expect("info");
    assert!(matches!(info.as_slice(), [AttributeInfo::Sensitive]), "{info:?}");
    // cryptoki leaves a sensitive attribute out rather than failing.
    assert!(s.get_attributes(kek, &[AttributeType::Value]).expect("get").is_empty());
    let before = calls(&net);
    let attrs = s
        .get_attributes(kek, &[AttributeType::Label, AttributeType::Sensitive, AttributeType::Extractable, AttributeType::ValueLen])
        .expect("C_GetAttributeValue");
    assert_eq!(calls(&net) - before, 1, "lengths and values of a template are one round trip");
    assert_eq!(
        attrs,
        [Attribute::Label(b"kek".to_vec()), Attribute::Sensitive(true), Attribute::Extractable(false), Attribute::ValueLen(32.into())]
    );
    // Wrapping a non-extractable key is refused with SoftHSM's code.
    let other = token_kek(&s, "other");
    assert_eq!(code(s.wrap_key(&Mechanism::AesKeyWrapPad, kek, other)), RvError::KeyUnextractable);
}

#[test]
fn aes_gcm_with_aad_matches_softhsm_and_a_tampered_tag_fails() {
    let net = Net::start();
    let s = net.user_session();
    let key = known_session_key(&s, &DATA_KEY);
    let (mut iv, aad, plaintext) = ([7u8; 12], b"header and context digest".to_vec(), b"attack at dawn, bring snacks".to_vec());

    let before = calls(&net);
    let ct = s.encrypt(&gcm(&mut iv, &aad), key, &plaintext).expect("C_Encrypt");
    assert_eq!(calls(&net) - before, 1, "EncryptInit, the size query and Encrypt are one round trip");
    assert_eq!(ct.len(), plaintext.len() + 16);
    let pt = s.decrypt(&gcm(&mut iv, &aad), key, &ct).expect("C_Decrypt");
    assert_eq!(pt, plaintext);

    let mut tag_flipped = ct.clone();
    *tag_flipped.last_mut().expect("tag") ^= 0x80;
    assert_eq!(code(s.decrypt(&gcm(&mut iv, &aad), key, &tag_flipped)), RvError::GeneralError);
    assert_eq!(code(s.decrypt(&gcm(&mut iv, b"other aad"), key, &ct)), RvError::GeneralError);
    // The session is still usable after a failed tag (as in process).
    assert_eq!(s.decrypt(&gcm(&mut iv, &aad), key, &ct).expect("decrypt again"), plaintext);

    let (local, slot) = in_process(&net.token);
    {
        let ls = local.open_rw_session(slot).expect("session");
        ls.login(cryptoki::session::UserType::User, Some(net.token.user_pin())).expect("login");
        let lkey = known_session_key(&ls, &DATA_KEY);
        assert_eq!(ls.encrypt(&gcm(&mut iv, &aad), lkey, &plaintext).expect("in-process GCM"), ct);
    }
    local.finalize().expect("finalize SoftHSM");
}

#[test]
fn hmac_sha256_signs_and_verifies_like_softhsm_and_rejects_a_wrong_mac() {
    let net = Net::start();
    let s = net.user_session();
    let mac_key = s
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Value(DATA_KEY.to_vec()),
            Attribute::Token(false),
            Attribute::Sign(true),
            Attribute::Verify(true),
        ])
        .expect("C_CreateObject HMAC key");
    let before = calls(&net);
    let mac = s.sign(&Mechanism::Sha256Hmac, mac_key, b"record").expect("C_Sign");
    assert_eq!(calls(&net) - before, 1, "SignInit, the size query and Sign are one round trip");
    assert_eq!(mac.len(), 32);
    s.verify(&Mechanism::Sha256Hmac, mac_key, b"record", &mac).expect("C_Verify");
    let mut wrong = mac.clone();
    wrong[0] ^= 1;
    assert_eq!(code(s.verify(&Mechanism::Sha256Hmac, mac_key, b"record", &wrong)), RvError::SignatureInvalid);

    // Multi-part signing gives the same MAC (the parts are sent at C_SignFinal).
    s.sign_init(&Mechanism::Sha256Hmac, mac_key).expect("C_SignInit");
    s.sign_update(b"rec").expect("C_SignUpdate");
    s.sign_update(b"ord").expect("C_SignUpdate");
    assert_eq!(s.sign_final().expect("C_SignFinal"), mac);

    let aes = |sign: bool| {
        s.create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Value(DATA_KEY.to_vec()),
            Attribute::Token(false),
            Attribute::Sign(sign),
        ])
        .expect("C_CreateObject AES key")
    };
    assert_eq!(s.sign(&Mechanism::AesCMac, aes(true), b"record").expect("CMAC").len(), 16);
    // A key without CKA_SIGN may not MAC: SoftHSM refuses at C_SignInit, which the module sends
    // with the data, so the code arrives at C_Sign.
    assert_eq!(code(s.sign(&Mechanism::AesCMac, aes(false), b"record")), RvError::KeyFunctionNotPermitted);

    let (local, slot) = in_process(&net.token);
    {
        let ls = local.open_rw_session(slot).expect("session");
        ls.login(cryptoki::session::UserType::User, Some(net.token.user_pin())).expect("login");
        let lkey = ls
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Value(DATA_KEY.to_vec()),
                Attribute::Token(false),
                Attribute::Sign(true),
                Attribute::Verify(true),
            ])
            .expect("in-process HMAC key");
        assert_eq!(ls.sign(&Mechanism::Sha256Hmac, lkey, b"record").expect("in-process HMAC"), mac);
    }
    local.finalize().expect("finalize SoftHSM");
}

#[test]
fn ecdsa_p256_signs_a_sha256_digest_and_ecdh_derives_a_shared_secret() {
    let net = Net::start();
    let s = net.user_session();
    let digest = s.digest(&Mechanism::Sha256, b"abc").expect("C_Digest");
    assert_eq!(
        digest,
        [
            0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23, 0xb0, 0x03,
            0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad
        ]
    );
    let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let pair = |label: &str| {
        s.generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[Attribute::EcParams(p256.clone()), Attribute::Token(false), Attribute::Verify(true), Attribute::Label(label.into())],
            &[Attribute::Token(false), Attribute::Sensitive(true), Attribute::Sign(true), Attribute::Derive(true)],
        )
        .expect("C_GenerateKeyPair")
    };
    let (public, private) = pair("a");
    let sig = s.sign(&Mechanism::Ecdsa, private, &digest).expect("C_Sign ECDSA");
    assert_eq!(sig.len(), 64, "r || s");
    s.verify(&Mechanism::Ecdsa, public, &digest, &sig).expect("C_Verify ECDSA");
    let mut bad = sig.clone();
    bad[10] ^= 1;
    assert_eq!(code(s.verify(&Mechanism::Ecdsa, public, &digest, &bad)), RvError::SignatureInvalid);
    let point = match s.get_attributes(public, &[AttributeType::EcPoint]).expect("CKA_EC_POINT").pop() {
        Some(Attribute::EcPoint(p)) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(&point[..3], &[0x04, 0x41, 0x04], "a DER-wrapped uncompressed point");

    // ECDH with CK_ECDH1_DERIVE_PARAMS: both sides derive the same secret.
    let (public_b, private_b) = pair("b");
    let point_b = match s.get_attributes(public_b, &[AttributeType::EcPoint]).expect("CKA_EC_POINT").pop() {
        Some(Attribute::EcPoint(p)) => p,
        other => panic!("{other:?}"),
    };
    let derived = |base, peer: &[u8]| {
        let params = cryptoki::mechanism::elliptic_curve::Ecdh1DeriveParams::new(
            cryptoki::mechanism::elliptic_curve::EcKdf::null(),
            peer,
        );
        let k = s
            .derive_key(
                &Mechanism::Ecdh1Derive(params),
                base,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                ],
            )
            .expect("C_DeriveKey ECDH1");
        value(&s, k)
    };
    assert_eq!(derived(private, &point_b), derived(private_b, &point));
}

#[test]
fn an_unwrap_template_on_a_trusted_so_key_is_enforced_by_the_token() {
    let net = Net::start();
    // The SO makes a public, trusted wrapping key whose unwrap template forces what it unwraps to
    // be sensitive and non-extractable (the nested CK_ATTRIBUTE array must reach SoftHSM intact).
    let so_pin = std::fs::read_to_string(net.dir().join("so.pin")).expect("SO PIN");
    let so = net.p11().open_rw_session(net.slot).expect("session");
    so.login(cryptoki::session::UserType::So, Some(&secrecy::SecretString::from(so_pin.trim().to_owned()))).expect("SO login");
    // cryptoki 0.12 has no nested-template attribute either; raw bytes are how an application
    // passes one through cryptoki, so the test builds the C array itself.
    let inner = [
        (Attribute::Sensitive(true), vec![1u8]),
        (Attribute::Extractable(false), vec![0u8]),
    ];
    let mut array = Vec::new();
    for (a, v) in &inner {
        let t: u64 = a.attribute_type().into();
        array.extend_from_slice(&t.to_ne_bytes());
        array.extend_from_slice(&(v.as_ptr() as usize).to_ne_bytes());
        array.extend_from_slice(&(v.len() as u64).to_ne_bytes());
    }
    let nested = Attribute::VendorDefined((AttributeType::VendorDefined(cryptoki_sys::CKA_UNWRAP_TEMPLATE), array));
    let domain = so
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Label(b"domain".to_vec()),
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Trusted(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
                Attribute::Modifiable(false),
                Attribute::Destroyable(false),
                nested,
            ],
        )
        .expect("C_GenerateKey with CKA_UNWRAP_TEMPLATE");
    let info = so.get_attribute_info(domain, &[AttributeType::Trusted]).expect("info");
    assert!(matches!(info.as_slice(), [AttributeInfo::Available(1)]), "{info:?}");
    so.logout().expect("SO logout");
    so.close().expect("close");

    let s = net.user_session();
    let domain = *find_by_label(&s, "domain").first().expect("the SO's key");
    let dk = known_session_key(&s, &DATA_KEY);
    let wrapped = s.wrap_key(&Mechanism::AesKeyWrapPad, domain, dk).expect("wrap under the domain key");
    // SoftHSM requires the caller's template to state the key's unwrap template: asking for a
    // readable key, or leaving the attributes out, is refused.
    assert_eq!(
        code(s.unwrap_key(&Mechanism::AesKeyWrapPad, domain, &wrapped, &unwrap_template())),
        RvError::TemplateInconsistent
    );
    let base = [Attribute::Class(ObjectClass::SECRET_KEY), Attribute::KeyType(KeyType::AES), Attribute::Token(false)];
    assert_eq!(code(s.unwrap_key(&Mechanism::AesKeyWrapPad, domain, &wrapped, &base)), RvError::TemplateInconsistent);
    let mut stated = base.to_vec();
    stated.extend([Attribute::Sensitive(true), Attribute::Extractable(false)]);
    let forced = s.unwrap_key(&Mechanism::AesKeyWrapPad, domain, &wrapped, &stated).expect("unwrap under the template");
    let got = s.get_attributes(forced, &[AttributeType::Sensitive, AttributeType::Extractable]).expect("attributes");
    assert_eq!(got, [Attribute::Sensitive(true), Attribute::Extractable(false)]);
}

#[test]
fn a_second_client_process_sees_token_objects_the_first_made_and_the_other_way_round() {
    let net = Net::start();
    let s = net.user_session();
    token_kek(&s, "made-over-cryptoki");
    let module = hsm_sim::NetHsm::module_path().expect("module");
    let pin = net.token.user_pin().expose_secret().to_owned();
    let tool = |args: &[&str]| {
        let out = Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&module)
            .args(["--token-label", common::LABEL, "-l", "--pin", &pin])
            .args(args)
            .envs(net.hsm.client_env())
            .output()
            .expect("run pkcs11-tool");
        assert!(out.status.success(), "pkcs11-tool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listing = tool(&["-O"]);
    assert!(listing.contains("label:      made-over-cryptoki"), "{listing}");
    assert!(listing.contains("Secret Key Object; AES length 32"), "{listing}");

    tool(&["--keygen", "--key-type", "AES:32", "--label", "made-by-pkcs11-tool", "--id", "42"]);
    let found = find_by_label(&s, "made-by-pkcs11-tool");
    assert_eq!(found.len(), 1, "a new search sees the other client's object");
    let attrs = s.get_attributes(found[0], &[AttributeType::Id, AttributeType::ValueLen]).expect("attributes");
    assert_eq!(attrs, [Attribute::Id(vec![0x42]), Attribute::ValueLen(32.into())]);
}

#[test]
fn each_client_has_its_own_login_state() {
    let net = Net::start();
    let s = net.user_session();
    let kek = token_kek(&s, "private-kek");
    let info = s.get_session_info().expect("C_GetSessionInfo");
    assert_eq!(info.session_state(), cryptoki::session::SessionState::RwUser);
    // Another client logs in as the SO while this one is logged in as the user (one SoftHSM
    // instance would refuse: CKR_USER_ANOTHER_ALREADY_LOGGED_IN), sets the user PIN (to the same
    // value) and logs out.
    let so_pin = std::fs::read_to_string(net.dir().join("so.pin")).expect("SO PIN");
    let user_pin = net.token.user_pin().expose_secret().to_owned();
    let out = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(hsm_sim::NetHsm::module_path().expect("module"))
        .args(["--token-label", common::LABEL, "--login", "--login-type", "so", "--so-pin", so_pin.trim()])
        .args(["--init-pin", "--new-pin", &user_pin])
        .envs(net.hsm.client_env())
        .output()
        .expect("pkcs11-tool");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // This client is still logged in: its private key still works.
    let dk = known_session_key(&s, &DATA_KEY);
    assert_eq!(s.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk).expect("still logged in").len(), 40);
    assert_eq!(s.get_session_info().expect("info").session_state(), cryptoki::session::SessionState::RwUser);
}

#[test]
fn two_clients_creating_token_keys_at_once_lose_none() {
    let net = Net::start();
    let s = net.user_session();
    let module = hsm_sim::NetHsm::module_path().expect("module");
    let pin = net.token.user_pin().expose_secret().to_owned();
    // Another client (another backend process) creates keys while this one does.
    let other = std::thread::spawn({
        let env = net.hsm.client_env();
        move || {
            for i in 0..8 {
                let out = Command::new("pkcs11-tool")
                    .arg("--module")
                    .arg(&module)
                    .args(["--token-label", common::LABEL, "-l", "--pin", &pin, "--keygen", "--key-type", "AES:32"])
                    .args(["--label", &format!("other-{i}")])
                    .envs(env.clone())
                    .output()
                    .expect("pkcs11-tool");
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            }
        }
    });
    for i in 0..40 {
        token_kek(&s, &format!("mine-{i}"));
    }
    other.join().expect("other client");
    let all = s.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Token(true)]).expect("find");
    assert_eq!(all.len(), 48);
    for h in all {
        let label = s.get_attributes(h, &[AttributeType::Label]).expect("every object is whole");
        assert_eq!(label.len(), 1);
    }
}

#[test]
fn the_module_works_over_tcp_loopback() {
    let net = Net::start_with(Endpoint::Tcp, None);
    let s = net.user_session();
    let kek = token_kek(&s, "kek");
    let dk = known_session_key(&s, &DATA_KEY);
    let wrapped = s.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk).expect("wrap over TCP");
    let back = s.unwrap_key(&Mechanism::AesKeyWrapPad, kek, &wrapped, &unwrap_template()).expect("unwrap over TCP");
    assert_eq!(value(&s, back), DATA_KEY);
    let random = s.generate_random_vec(64).expect("C_GenerateRandom");
    assert_eq!(random.len(), 64);
}

#[test]
fn sessions_on_several_threads_run_in_parallel_with_shared_handles() {
    let net = Net::start();
    let s = net.user_session();
    let kek = token_kek(&s, "kek");
    let p11 = net.p11().clone();
    let slot = net.slot;
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let p11 = p11.clone();
            std::thread::spawn(move || {
                let s = p11.open_rw_session(slot).expect("session");
                let mut value = DATA_KEY;
                value[0] = i;
                for _ in 0..50 {
                    let dk = known_session_key(&s, &value);
                    let w = s.wrap_key(&Mechanism::AesKeyWrapPad, kek, dk).expect("wrap with a handle from another session");
                    let back = s.unwrap_key(&Mechanism::AesKeyWrapPad, kek, &w, &unwrap_template()).expect("unwrap");
                    assert_eq!(value32(&s, back), value);
                    s.destroy_object(dk).expect("destroy");
                    s.destroy_object(back).expect("destroy");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
}

fn value32(s: &Session, h: cryptoki::object::ObjectHandle) -> [u8; 32] {
    value(s, h).try_into().expect("32 bytes")
}
