//! `kmsctl` against the real server: the commands officers and exchange services use, JSON output for
//! scripts, and exit codes that tell a refusal from an error.

use kms_e2e::{Settings, TestServer};

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "kmsctl failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test]
async fn officer_and_exchange_workflow_with_json_output() {
    let server = TestServer::start(Settings::default());
    let created = json(&server.kmsctl("officer", &["key", "create", "--name", "citizens", "--level", "personal", "--output", "json"]));
    assert_eq!(created["name"], "citizens");
    assert_eq!(created["classification"], "PERSONAL");
    assert_eq!(created["purpose"], "ENVELOPE");
    json(&server.kmsctl("officer", &["key", "create", "--name", "plans", "--level", "SECRET", "--output", "json"]));
    let listed = json(&server.kmsctl("officer", &["key", "list", "--output", "json"]));
    let names: Vec<&str> = listed["keys"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["citizens", "plans"]);
    let table = server.kmsctl("officer", &["key", "list"]);
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("citizens") && table.contains("PERSONAL") && table.contains("SECRET"), "{table}");

    let g = json(&server.kmsctl("exchange", &["datakey", "generate", "--key", "citizens", "--context", "case=42", "--output", "json"]));
    let wrapped = g["wrapped_data_key"].as_str().unwrap().to_owned();
    let plaintext = g["plaintext_data_key"].as_str().unwrap().to_owned();
    let d = json(&server.kmsctl("exchange", &["datakey", "decrypt", "--wrapped", &wrapped, "--context", "case=42", "--output", "json"]));
    assert_eq!(d["plaintext_data_key"].as_str().unwrap(), plaintext);

    // Wrong context: a rejected request, exit code 5.
    let bad = server.kmsctl("exchange", &["datakey", "decrypt", "--wrapped", &wrapped, "--context", "case=43"]);
    assert_eq!(bad.status.code(), Some(5), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("INVALID_ARGUMENT"));

    // In-HSM encryption of a file.
    let input = server.path("plan.txt");
    std::fs::write(&input, b"cross the river at dawn").unwrap();
    let sealed = server.path("plan.kms");
    let out = server.path("plan.out");
    let enc = server.kmsctl("exchange", &["encrypt", "--key", "plans", "--in", input.to_str().unwrap(), "--out", sealed.to_str().unwrap(), "--context", "doc=7"]);
    assert!(enc.status.success(), "{}", String::from_utf8_lossy(&enc.stderr));
    let dec = server.kmsctl("exchange", &["decrypt", "--in", sealed.to_str().unwrap(), "--out", out.to_str().unwrap(), "--context", "doc=7"]);
    assert!(dec.status.success(), "{}", String::from_utf8_lossy(&dec.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), b"cross the river at dawn");

    // The HSM's health, for officers and auditors; an exchange service may not read it.
    for who in ["officer", "auditor"] {
        let h = json(&server.kmsctl(who, &["token", "health", "--output", "json"]));
        assert_eq!(h["state"], "READY", "{h}");
        assert_eq!(h["token_label"], "kms-test");
        assert_eq!((h["generation"].as_u64(), h["reconnects"].as_u64(), h["last_error"].as_str()), (Some(1), Some(0), Some("")));
        let pools: Vec<(&str, u64)> =
            h["pools"].as_array().unwrap().iter().map(|p| (p["name"].as_str().unwrap(), p["sessions"].as_u64().unwrap())).collect();
        let sessions = if kms_e2e::HsmMode::from_env() == kms_e2e::HsmMode::Network { 16 } else { 1 };
        assert_eq!(pools, [("request", sessions), ("admin", 1)]);
    }
    let table = server.kmsctl("officer", &["token", "health"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("state        READY\n") && table.contains("reconnects   0\n"), "{table}");
    let refused = server.kmsctl("exchange", &["token", "health"]);
    assert_eq!(refused.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("caller urn:kms:caller:test-exchange lacks the officer or auditor role"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[tokio::test]
async fn exit_codes_tell_refusal_from_not_found_from_rejection() {
    let server = TestServer::start(Settings::default());
    json(&server.kmsctl("officer", &["key", "create", "--name", "conf", "--level", "CONFIDENTIAL", "--output", "json"]));
    // Refused by policy: exit 3.
    let denied = server.kmsctl("exchange", &["key", "create", "--name", "x", "--level", "PERSONAL"]);
    assert_eq!(denied.status.code(), Some(3), "{}", String::from_utf8_lossy(&denied.stderr));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("PERMISSION_DENIED"));
    // Unknown key: exit 4.
    let missing = server.kmsctl("officer", &["key", "get", "nope"]);
    assert_eq!(missing.status.code(), Some(4));
    // A level rule: exit 5, and the message names the rule.
    let never = server.kmsctl("exchange", &["datakey", "generate", "--key", "conf"]);
    assert_eq!(never.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&never.stderr).contains("CONFIDENTIAL data keys never leave the HSM"));
    // Usage error: exit 2.
    let usage = server.kmsctl("officer", &["key", "create", "--name", "x", "--level", "MAT"]);
    assert_eq!(usage.status.code(), Some(2));
}
