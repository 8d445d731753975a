//! `kmsctl`'s key lifecycle, approval and re-wrap commands against the real server: what an officer
//! sees after each change, how a change that needs two officers is filed and decided, and how a
//! file of blobs moves to a new key version with its failures reported by line.

use std::process::Output;

use kms_e2e::{identity_of, Settings, TestServer};
use serde_json::Value;

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs kmsctl and insists on exit code 0; returns stdout.
fn ok(server: &TestServer, who: &str, args: &[&str]) -> String {
    let out = server.kmsctl(who, args);
    assert_eq!(out.status.code(), Some(0), "kmsctl {args:?} as {who}: {}", stderr(&out));
    stdout(&out)
}

fn json(server: &TestServer, who: &str, args: &[&str]) -> Value {
    let args: Vec<&str> = args.iter().copied().chain(["--output", "json"]).collect();
    let text = ok(server, who, &args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// The value of a `field  value` row of a kmsctl table.
fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(name).filter(|rest| rest.starts_with(' ')).map(str::trim))
        .unwrap_or_else(|| panic!("no {name} row in:\n{text}"))
}

/// `YYYY-MM-DDTHH:MM:SSZ`, written here independently of kmsctl's own formatter.
fn utc(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (mut year, mut day) = (1970, days);
    loop {
        let len = if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 { 366 } else { 365 };
        if day < len {
            break;
        }
        day -= len;
        year += 1;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let months = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 0;
    while day >= months[month] {
        day -= months[month];
        month += 1;
    }
    format!("{year:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", month + 1, day + 1, secs / 3600, secs / 60 % 60, secs % 60)
}

fn versions(key: &Value) -> Vec<(u64, String)> {
    key["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_u64().unwrap(), v["state"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn rotate_makes_version_2_primary_and_version_list_shows_both() {
    let server = TestServer::start(Settings::default());
    ok(&server, "officer", &["key", "create", "--name", "citizens", "--level", "PERSONAL"]);

    let rotated = ok(&server, "officer", &["key", "rotate", "citizens"]);
    assert_eq!(first_line(&rotated), "key citizens rotated: version 2 is the primary version");
    assert_eq!(field(&rotated, "primary_version"), "2");

    let listed = json(&server, "officer", &["key", "version", "list", "citizens"]);
    assert_eq!(listed["name"], "citizens");
    assert_eq!(listed["primary_version"], 2);
    assert_eq!(versions(&listed), [(1, "ENABLED".to_owned()), (2, "ENABLED".to_owned())]);
    let (v1, v2) = (listed["versions"][0]["created_at_unix"].as_i64().unwrap(), listed["versions"][1]["created_at_unix"].as_i64().unwrap());

    let table = ok(&server, "officer", &["key", "version", "list", "citizens"]);
    assert_eq!(
        table,
        format!(
            "VERSION      STATE    CREATED               DESTROY_AT\n\
             1            ENABLED  {}  -\n\
             2 (primary)  ENABLED  {}  -\n",
            utc(v1),
            utc(v2)
        )
    );

    // JSON is shaped like KeyChangeResponse: the key, and no pending approval.
    let again = json(&server, "officer", &["key", "rotate", "citizens"]);
    assert_eq!(again["key"]["primary_version"], 3);
    assert!(again.get("pending_approval").is_none(), "{again}");
}

#[tokio::test]
async fn disable_and_enable_keys_and_versions() {
    let server = TestServer::start(Settings::default());
    ok(&server, "officer", &["key", "create", "--name", "citizens", "--level", "PERSONAL"]);
    ok(&server, "officer", &["key", "rotate", "citizens"]);

    let out = ok(&server, "officer", &["key", "version", "disable", "citizens", "1"]);
    assert_eq!(
        first_line(&out),
        "key citizens version 1 is DISABLED: blobs made with it do not decrypt until it is enabled again"
    );
    let listed = json(&server, "officer", &["key", "version", "list", "citizens"]);
    assert_eq!(versions(&listed), [(1, "DISABLED".to_owned()), (2, "ENABLED".to_owned())]);

    let primary = server.kmsctl("officer", &["key", "version", "disable", "citizens", "2"]);
    assert_eq!(primary.status.code(), Some(5));
    assert_eq!(
        stderr(&primary),
        "kmsctl: FAILED_PRECONDITION: version 2 is the primary version of key citizens; rotate the key first\n"
    );
    let missing = server.kmsctl("officer", &["key", "version", "enable", "citizens", "9"]);
    assert_eq!(missing.status.code(), Some(4));
    assert_eq!(stderr(&missing), "kmsctl: NOT_FOUND: key citizens has no version 9\n");

    let out = ok(&server, "officer", &["key", "version", "enable", "citizens", "1"]);
    assert_eq!(first_line(&out), "key citizens version 1 is ENABLED");

    let out = ok(&server, "officer", &["key", "disable", "citizens"]);
    assert_eq!(first_line(&out), "key citizens is DISABLED: it does no cryptography until it is enabled again");
    assert_eq!(field(&out, "state"), "DISABLED");
    assert_eq!(field(&out, "next_rotation"), "-");
    let refused = server.kmsctl("exchange", &["datakey", "generate", "--key", "citizens"]);
    assert_eq!(refused.status.code(), Some(5));
    assert_eq!(stderr(&refused), "kmsctl: FAILED_PRECONDITION: key citizens is DISABLED; only ENABLED keys may be used\n");

    let out = ok(&server, "officer", &["key", "enable", "citizens"]);
    assert_eq!(first_line(&out), "key citizens is ENABLED");
    ok(&server, "exchange", &["datakey", "generate", "--key", "citizens"]);

    let scheduled = json(&server, "officer", &["key", "schedule", "citizens", "--days", "30"]);
    assert_eq!(scheduled["rotation_period_days"], 30);
    let next = scheduled["next_rotation_at_unix"].as_i64().unwrap();
    assert_eq!(next, scheduled["rotated_at_unix"].as_i64().unwrap() + 30 * 86_400);
    let out = ok(&server, "officer", &["key", "schedule", "citizens", "--days", "0"]);
    let default = json(&server, "officer", &["key", "get", "citizens"])["next_rotation_at_unix"].as_i64().unwrap();
    assert_eq!(
        first_line(&out),
        format!("key citizens rotates on its level's default period; next rotation at {}", utc(default))
    );

    // Exchange services cannot change keys.
    let denied = server.kmsctl("exchange", &["key", "disable", "citizens"]);
    assert_eq!(denied.status.code(), Some(3), "{}", stderr(&denied));
}

#[tokio::test]
async fn destroying_a_personal_key_is_pending_until_cancelled_back_to_disabled() {
    let server = TestServer::start(Settings::default());
    ok(&server, "officer", &["key", "create", "--name", "citizens", "--level", "PERSONAL"]);

    let out = ok(&server, "officer", &["key", "destroy", "citizens"]);
    let key = json(&server, "officer", &["key", "get", "citizens"]);
    assert_eq!(key["state"], "PENDING_DESTRUCTION");
    let at = key["destroy_at_unix"].as_i64().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((now + 7 * 86_400 - 60..=now + 7 * 86_400).contains(&at), "destroy_at {at}, now {now}");
    assert_eq!(
        first_line(&out),
        format!(
            "key citizens will be destroyed at {}; until then it does no cryptography, and \
             `kmsctl key cancel-destroy citizens` takes it back to DISABLED",
            utc(at)
        )
    );
    assert_eq!(field(&out, "state"), "PENDING_DESTRUCTION");
    assert_eq!(field(&out, "destroy_at"), utc(at));
    let refused = server.kmsctl("exchange", &["datakey", "generate", "--key", "citizens"]);
    assert_eq!(refused.status.code(), Some(5), "{}", stderr(&refused));

    let out = ok(&server, "officer", &["key", "cancel-destroy", "citizens"]);
    assert_eq!(first_line(&out), "destruction of key citizens cancelled: the key is DISABLED");
    let key = json(&server, "officer", &["key", "get", "citizens"]);
    assert_eq!((key["state"].as_str(), key["destroy_at_unix"].as_i64()), (Some("DISABLED"), Some(0)));

    let again = server.kmsctl("officer", &["key", "cancel-destroy", "citizens"]);
    assert_eq!(again.status.code(), Some(5));
    assert_eq!(
        stderr(&again),
        "kmsctl: FAILED_PRECONDITION: key citizens is DISABLED, not PENDING_DESTRUCTION; there is nothing to cancel\n"
    );

    // A version: the same path with a version number.
    ok(&server, "officer", &["key", "enable", "citizens"]);
    ok(&server, "officer", &["key", "rotate", "citizens"]);
    let out = ok(&server, "officer", &["key", "version", "destroy", "citizens", "1"]);
    let listed = json(&server, "officer", &["key", "version", "list", "citizens"]);
    let v1_at = listed["versions"][0]["destroy_at_unix"].as_i64().unwrap();
    assert_eq!(
        first_line(&out),
        format!(
            "key citizens version 1 will be destroyed at {}; until then it decrypts nothing, and \
             `kmsctl key version cancel-destroy citizens 1` takes it back to DISABLED",
            utc(v1_at)
        )
    );
    assert_eq!(versions(&listed), [(1, "PENDING_DESTRUCTION".to_owned()), (2, "ENABLED".to_owned())]);
    let out = ok(&server, "officer", &["key", "version", "cancel-destroy", "citizens", "1"]);
    assert_eq!(first_line(&out), "destruction of key citizens version 1 cancelled: the version is DISABLED");
}

#[tokio::test]
async fn a_two_officer_change_waits_for_a_different_officer() {
    let server = TestServer::start(Settings::default());
    ok(&server, "officer", &["key", "create", "--name", "health", "--level", "SENSITIVE_PERSONAL"]);

    let out = ok(&server, "officer", &["key", "disable", "health"]);
    assert_eq!(
        first_line(&out),
        "awaiting a second officer: disabling key health needs another officer's approval; nothing has changed yet"
    );
    let id = field(&out, "id").to_owned();
    assert_eq!(id.len(), 32, "{out}");
    assert_eq!(field(&out, "state"), "PENDING");
    assert_eq!(field(&out, "action"), "DISABLE_KEY");
    assert_eq!(field(&out, "requested_by"), identity_of("officer"));
    assert!(out.ends_with(&format!("  kmsctl approval approve {id}\nor rejects it with:\n  kmsctl approval reject {id}\n")), "{out}");
    // Asking again returns the same open request.
    let again = json(&server, "officer", &["key", "disable", "health"]);
    assert_eq!(again["pending_approval"]["id"], id.as_str());
    assert_eq!(again["key"]["state"], "ENABLED");

    let listed = json(&server, "officer2", &["approval", "list"]);
    let approvals = listed["approvals"].as_array().unwrap();
    assert_eq!(approvals.len(), 1, "{listed}");
    assert_eq!(
        (approvals[0]["id"].as_str(), approvals[0]["action"].as_str(), approvals[0]["state"].as_str(), approvals[0]["classification"].as_str()),
        (Some(id.as_str()), Some("DISABLE_KEY"), Some("PENDING"), Some("SENSITIVE_PERSONAL"))
    );

    // The requester cannot approve their own request: refused, exit 3.
    let own = server.kmsctl("officer", &["approval", "approve", &id]);
    assert_eq!(own.status.code(), Some(3));
    assert_eq!(
        stderr(&own),
        format!(
            "kmsctl: PERMISSION_DENIED: officer {} filed this request and cannot decide it; a different officer must \
             approve or reject it\n",
            identity_of("officer")
        )
    );
    assert_eq!(json(&server, "officer", &["key", "get", "health"])["state"], "ENABLED");

    // A second officer approves: the change is made.
    let out = ok(&server, "officer2", &["approval", "approve", &id]);
    assert_eq!(first_line(&out), format!("request {id} approved: disabling key health is done"));
    assert_eq!(field(&out, "state"), "DISABLED");
    assert_eq!(json(&server, "officer", &["key", "get", "health"])["state"], "DISABLED");
    assert_eq!(json(&server, "officer", &["approval", "list"])["approvals"], Value::Array(vec![]));
    let all = json(&server, "officer", &["approval", "list", "--all"]);
    assert_eq!(all["approvals"][0]["state"], "APPROVED");
    assert_eq!(all["approvals"][0]["decided_by"], identity_of("officer2"));
    let twice = server.kmsctl("officer2", &["approval", "approve", &id]);
    assert_eq!(twice.status.code(), Some(5), "{}", stderr(&twice));
}

#[tokio::test]
async fn a_second_officer_can_reject_a_version_change() {
    let server = TestServer::start(Settings::default());
    ok(&server, "officer", &["key", "create", "--name", "plans", "--level", "SECRET"]);
    ok(&server, "officer", &["key", "rotate", "plans"]);
    let filed = json(&server, "officer", &["key", "version", "disable", "plans", "1"]);
    let id = filed["pending_approval"]["id"].as_str().unwrap().to_owned();
    assert_eq!(filed["pending_approval"]["action"], "DISABLE_VERSION");
    assert_eq!(filed["pending_approval"]["version"], 1);

    let out = ok(&server, "officer2", &["approval", "reject", &id]);
    assert_eq!(first_line(&out), format!("request {id} rejected: disabling key plans version 1 will not happen"));
    assert_eq!(field(&out, "state"), "REJECTED");
    assert_eq!(field(&out, "decided_by"), identity_of("officer2"));
    let listed = json(&server, "officer", &["key", "version", "list", "plans"]);
    assert_eq!(versions(&listed), [(1, "ENABLED".to_owned()), (2, "ENABLED".to_owned())]);
}

#[tokio::test]
async fn rewrap_moves_blobs_to_the_new_version_and_reports_a_corrupted_line() {
    let server = TestServer::start(Settings::default());
    ok(&server, "officer", &["key", "create", "--name", "citizens", "--level", "PERSONAL"]);
    let generated: Vec<Value> =
        (0..3).map(|_| json(&server, "exchange", &["datakey", "generate", "--key", "citizens", "--context", "case=42"])).collect();
    let key_id = generated[0]["key_id"].as_str().unwrap().to_owned();
    let old: Vec<String> = generated.iter().map(|g| g["wrapped_data_key"].as_str().unwrap().to_owned()).collect();
    assert!(generated.iter().all(|g| g["key_version"] == 1));
    ok(&server, "officer", &["key", "rotate", "citizens"]);

    // Line 3 is a blob with one bit of its MAC flipped: valid base64, refused by the service.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut corrupted = b64.decode(&old[2]).unwrap();
    *corrupted.last_mut().unwrap() ^= 1;
    let corrupted = b64.encode(&corrupted);
    let input = server.path("blobs.txt");
    let output = server.path("blobs.new");
    std::fs::write(&input, format!("{}\n{}\n{corrupted}\n{}\n", old[0], old[1], old[2])).unwrap();
    let (input_s, output_s) = (input.to_str().unwrap(), output.to_str().unwrap());

    let out = server.kmsctl("exchange", &["rewrap", "--in", input_s, "--out", output_s, "--context", "case=42", "--batch-size", "2"]);
    assert_eq!(out.status.code(), Some(5), "{}\nserver log:\n{}", stderr(&out), server.log());
    let reason = "INVALID_ARGUMENT: blob failed authentication: it was altered, or its key, version, classification \
                  or encryption context differs from the one it was made with";
    assert_eq!(
        stdout(&out),
        format!(
            "in         {input_s}\n\
             out        {output_s}\n\
             total      4\n\
             rewrapped  3\n\
             failed     1\n\
             \n\
             KEY_ID                            VERSION  BLOBS\n\
             {key_id}  2        3\n\
             \n\
             failed lines (copied unchanged):\n\
             \x20 line 3: {reason}\n"
        )
    );
    assert_eq!(
        stderr(&out),
        format!(
            "kmsctl: 1 of 4 blobs were not re-wrapped and their lines were copied unchanged to {output_s} \
             (first: line 3: {reason})\n"
        )
    );

    let written = std::fs::read_to_string(&output).unwrap();
    let lines: Vec<&str> = written.lines().collect();
    assert_eq!(lines.len(), 4, "{written}");
    assert_eq!(lines[2], corrupted, "the failed line is copied unchanged");
    for (line, (new, g)) in [lines[0], lines[1], lines[3]].into_iter().zip(&generated).enumerate() {
        assert_ne!(new, g["wrapped_data_key"].as_str().unwrap(), "blob {line} was re-wrapped");
        let d = json(&server, "exchange", &["datakey", "decrypt", "--wrapped", new, "--context", "case=42"]);
        assert_eq!(d["key_version"], 2);
        assert_eq!(d["key_id"], key_id.as_str());
        assert_eq!(d["plaintext_data_key"], g["plaintext_data_key"], "blob {line} holds the same data key");
    }

    // The clean lines alone re-wrap with exit 0; a JSON summary for scripts.
    std::fs::write(&input, format!("{}\n{}\n", old[0], old[1])).unwrap();
    let summary = json(&server, "exchange", &["rewrap", "--in", input_s, "--out", output_s, "--context", "case=42"]);
    assert_eq!((summary["total"].as_u64(), summary["rewrapped"].as_u64(), summary["failed"].as_u64()), (Some(2), Some(2), Some(0)));
    assert_eq!(summary["rewrapped_to"][0]["key_version"], 2);
    assert_eq!(summary["failures"], Value::Array(vec![]));

    // The wrong context fails every line with the context rule.
    let wrong = server.kmsctl("exchange", &["rewrap", "--in", input_s, "--out", output_s, "--context", "case=43"]);
    assert_eq!(wrong.status.code(), Some(5), "{}", stderr(&wrong));
    assert_eq!(field(&stdout(&wrong), "failed"), "2");
}
