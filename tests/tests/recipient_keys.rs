//! SENSITIVE_PERSONAL data keys are sealed only to a recipient key an officer registered for the
//! caller, with kmsctl end to end: the exchange service makes a key pair, an officer registers its
//! public half, data keys are sealed to it (the audit record names its fingerprint) and opened from
//! the private key file; rotating the recipient key retires the old one; a key the caller sends
//! itself is never sealed to.

use kms_e2e::pb::Classification as L;
use kms_e2e::{identity_of, Settings, TestServer};

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmsctl_registers_rotates_and_uses_recipient_keys() {
    let server = TestServer::start(Settings::default());
    server.client("officer").await.create_key("health", L::SensitivePersonal, None, None).await.unwrap();
    let path = |f: &str| server.path(f).to_str().unwrap().to_owned();
    let made = json(&server.kmsctl("exchange", &["--output", "json", "recipient-key", "generate", "--out", &path("r1.pem"), "--public-out", &path("r1.pub")]));
    let fpr1 = made["fingerprint"].as_str().unwrap().to_owned();

    // Before registration: refused.
    let out = server.kmsctl("exchange", &["datakey", "generate", "--key", "health", "--context", "case=1", "--recipient-key", &path("r1.pem")]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("recipient key {fpr1} is not registered for caller {}", identity_of("exchange"))));

    // The officer registers it; the exchange service can now have data keys sealed to it.
    let caller = json(&server.kmsctl("officer", &["--output", "json", "caller", "recipient-key", "add", &identity_of("exchange"), "--public-key", &path("r1.pub")]));
    assert_eq!(caller["recipient_keys"][0]["fingerprint"], fpr1);
    let generated = json(&server.kmsctl(
        "exchange",
        &["--output", "json", "datakey", "generate", "--key", "health", "--context", "case=1", "--recipient-key", &path("r1.pem")],
    ));
    let key = generated["plaintext_data_key"].as_str().unwrap().to_owned();
    let wrapped = generated["wrapped_data_key"].as_str().unwrap().to_owned();
    let decrypted = json(&server.kmsctl(
        "exchange",
        &["--output", "json", "datakey", "decrypt", "--wrapped", &wrapped, "--context", "case=1", "--recipient-key", &path("r1.pem")],
    ));
    assert_eq!(decrypted["plaintext_data_key"], key.as_str());
    // The audit record names the recipient key.
    let db = kms_audit::AuditDb::open_read_only(&server.audit_path()).unwrap();
    let sealed: Vec<String> = db
        .records(1, 100_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.record.rpc == "GenerateDataKey" && r.record.outcome == kms_audit::Outcome::Ok)
        .map(|r| r.record.detail)
        .collect();
    assert_eq!(sealed, [format!("sealed to recipient key {fpr1}")]);

    // Rotation: a new key in, the old one out; the old one is refused from then on.
    let made2 = json(&server.kmsctl("exchange", &["--output", "json", "recipient-key", "generate", "--out", &path("r2.pem"), "--public-out", &path("r2.pub")]));
    let fpr2 = made2["fingerprint"].as_str().unwrap().to_owned();
    let caller = json(&server.kmsctl(
        "officer",
        &["--output", "json", "caller", "recipient-key", "rotate", &identity_of("exchange"), "--public-key", &path("r2.pub"), "--remove", &fpr1],
    ));
    assert_eq!(caller["recipient_keys"].as_array().unwrap().len(), 1);
    assert_eq!(caller["recipient_keys"][0]["fingerprint"], fpr2);
    let out = server.kmsctl("exchange", &["datakey", "decrypt", "--wrapped", &wrapped, "--context", "case=1", "--recipient-key", &path("r1.pem")]);
    assert_eq!(out.status.code(), Some(3), "the retired key is refused");
    let again = json(&server.kmsctl(
        "exchange",
        &["--output", "json", "datakey", "decrypt", "--wrapped", &wrapped, "--context", "case=1", "--recipient-key", &path("r2.pem")],
    ));
    assert_eq!(again["plaintext_data_key"], key.as_str());

    // The exchange service cannot register keys for itself (nor for anyone).
    let out = server.kmsctl("exchange", &["caller", "recipient-key", "add", &identity_of("exchange"), "--public-key", &path("r1.pub")]);
    assert_eq!(out.status.code(), Some(3));
}
