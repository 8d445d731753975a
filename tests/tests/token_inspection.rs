//! Inspects the SoftHSM token from outside the server with `pkcs11-tool` (package opensc): every key
//! the service made is sensitive and non-extractable, carries only its purpose's usage flags, cannot
//! be read, and no data key is ever left behind as a token object (invariant 1).

use std::process::Command;

use kms_client::Delivery;
use kms_e2e::pb::{self, Classification as L};
use kms_e2e::{ctx, Settings, TestServer};
use secrecy::ExposeSecret;

struct SecretKeyObject {
    label: String,
    usage: Vec<String>,
    access: Vec<String>,
}

fn pkcs11_tool(server: &TestServer, args: &[&str]) -> std::process::Output {
    let token = server.token();
    Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", token.conf_path())
        .arg("--module")
        .arg(token.module_path())
        .args(["--token-label", token.label(), "--login", "--pin", token.user_pin().expose_secret()])
        .args(args)
        .output()
        .expect("pkcs11-tool (package opensc) must be installed")
}

fn list_secret_keys(server: &TestServer) -> Vec<SecretKeyObject> {
    let out = pkcs11_tool(server, &["--list-objects", "--type", "secrkey"]);
    assert!(out.status.success(), "pkcs11-tool failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut objects = Vec::new();
    for block in text.split("Secret Key Object").skip(1) {
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
                .unwrap_or_default()
        };
        let list = |v: String| v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
        objects.push(SecretKeyObject { label: field("label:"), usage: list(field("Usage:")), access: list(field("Access:")) });
    }
    objects
}

#[tokio::test]
async fn every_key_on_the_token_is_sensitive_non_extractable_and_no_data_key_is_left_behind() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("citizens", L::Personal, None, None).await.unwrap();
    officer.create_key("health", L::SensitivePersonal, None, None).await.unwrap();
    officer.create_key("plans", L::Secret, None, None).await.unwrap();
    officer.create_key("memos", L::Confidential, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let r = server.register_recipient("exchange").await;
    for i in 0..10 {
        let c = ctx(&[("i", &i.to_string())]);
        let g = x.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap();
        x.decrypt_data_key(&g.wrapped, &c, None, None).await.unwrap();
        let s = x.generate_data_key("health", &c, Delivery::ToRecipient(&r)).await.unwrap();
        x.decrypt_data_key(&s.wrapped, &c, None, Some(&r)).await.unwrap();
        x.generate_data_key("citizens", &c, Delivery::WrappedOnly).await.unwrap();
        let e = x.encrypt("plans", b"payload", &c).await.unwrap();
        x.decrypt(&e.ciphertext, &c, None).await.unwrap();
        // Re-wrap unwraps a data key into a session object and decrypts a payload inside the HSM.
        let rewrap = |blob: &[u8], to: &str| pb::ReWrapRequest {
            blob: blob.to_vec(),
            encryption_context: c.clone().into_iter().collect(),
            destination_key: to.into(),
        };
        x.data_keys().re_wrap(rewrap(&g.wrapped, "health")).await.unwrap();
        let items = vec![rewrap(&s.wrapped, ""), rewrap(&e.ciphertext, "")];
        let batch = x.data_keys().re_wrap_batch(pb::ReWrapBatchRequest { items }).await.unwrap().into_inner();
        assert!(batch.results.iter().all(|r| r.code == 0), "{:?}", batch.results);
    }

    let objects = list_secret_keys(&server);
    // A key version's label is `kms:<name>:v<version>` and then its adoption record (level,
    // purpose, creation time and the HSM's MAC over them).
    let short = |label: &str| label.split(' ').next().unwrap_or_default().to_owned();
    let mut labels: Vec<String> = objects.iter().map(|o| if o.label.starts_with("kms:") { short(&o.label) } else { o.label.clone() }).collect();
    labels.sort();
    // Four key versions and the blob-binding MAC key: nothing else, so no data key was left behind.
    assert_eq!(
        labels,
        ["kms blob-binding MAC v1", "kms:citizens:v1", "kms:health:v1", "kms:memos:v1", "kms:plans:v1"]
    );
    for o in &objects {
        assert!(o.access.iter().any(|a| a == "sensitive"), "{} is not sensitive: {:?}", o.label, o.access);
        assert!(o.access.iter().any(|a| a == "never extractable"), "{} was extractable once: {:?}", o.label, o.access);
        assert!(!o.access.iter().any(|a| a == "extractable"), "{} is extractable: {:?}", o.label, o.access);
        if let Some(rest) = o.label.strip_prefix("kms:") {
            let fields: Vec<&str> = rest.split(' ').collect();
            assert_eq!(fields.len(), 5, "{} lacks its adoption record", o.label);
            let want_level = match fields[0] {
                "citizens:v1" => "PERSONAL",
                "health:v1" => "SENSITIVE_PERSONAL",
                "plans:v1" => "SECRET",
                _ => fields[1],
            };
            assert_eq!(fields[1], want_level, "{}", o.label);
            assert_eq!(fields[4].len(), 64, "{}: the MAC is 32 bytes of hex", o.label);
        }
        let expected: &[&str] = match short(&o.label).as_str() {
            "kms:citizens:v1" | "kms:health:v1" => &["wrap", "unwrap"],
            "kms:plans:v1" | "kms:memos:v1" => &["encrypt", "decrypt"],
            // pkcs11-tool prints no "sign" for secret keys; the HSM tests read CKA_SIGN directly.
            _ => &["verify"],
        };
        assert_eq!(o.usage, expected, "{} has usage {:?}", o.label, o.usage);
    }

    // The audit signing key: its private half is sensitive, never extractable and can only sign.
    let out = pkcs11_tool(&server, &["--list-objects", "--type", "privkey"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let blocks: Vec<&str> = text.split("Private Key Object").skip(1).collect();
    assert_eq!(blocks.len(), 1, "one private key on the token: {text}");
    let block = blocks[0];
    assert!(block.contains("EC_POINT 256 bits") || block.contains("EC"), "{block}");
    assert!(block.contains("kms audit checkpoint signing v1"), "{block}");
    let field = |name: &str| block.lines().find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned())).unwrap_or_default();
    assert_eq!(field("Usage:"), "sign", "{block}");
    let access = field("Access:");
    assert!(access.contains("sensitive") && access.contains("never extractable") && !access.starts_with("extractable"), "{block}");
    let out = pkcs11_tool(&server, &["--read-object", "--type", "privkey", "--label", "kms audit checkpoint signing v1"]);
    // (pkcs11-tool may exit 0 for a private key it cannot export; what matters is that no key comes out.)
    assert!(out.stdout.is_empty(), "the audit private key could be read: {} bytes", out.stdout.len());

    // Reading a key's value from outside is refused by the token.
    let full = |name: &str| objects.iter().find(|o| short(&o.label) == name).map(|o| o.label.clone()).unwrap_or_else(|| name.to_owned());
    for label in [full("kms:citizens:v1"), full("kms:plans:v1"), "kms blob-binding MAC v1".to_owned()] {
        let out = pkcs11_tool(&server, &["--read-object", "--type", "secrkey", "--label", &label]);
        assert!(!out.status.success(), "{label} could be read: {}", String::from_utf8_lossy(&out.stdout));
    }
}
