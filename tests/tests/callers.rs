//! Registered callers over mutual TLS against SoftHSM (invariant 4): officers register,
//! update, list and revoke calling systems; every request is judged by the registration as it is
//! now (role, clearance, system level, allowed keys, revoked); every refusal names its rule and is
//! audited; a registration edited in the SQLite file is refused; the store, not the config, is the
//! truth once a caller is registered.

use kms_client::Delivery;
use kms_e2e::pb::{self, Classification as L};
use kms_e2e::{ctx, identity_of, made, pending, Settings, TestServer};
use kms_server::pki::Validity;
use tonic::Code;

fn code(err: kms_client::ClientError) -> (Code, String) {
    let s = err.status().unwrap_or_else(|| panic!("expected a status, got {err}"));
    (s.code(), s.message().to_owned())
}

fn registration(name: &str, roles: &[&str], allowed: &[&str], clearance: L, level: u32) -> pb::Caller {
    pb::Caller {
        identity: identity_of(name),
        agency: "Ministry of Finance".into(),
        name: format!("{name} gateway"),
        system_level: level,
        clearance: clearance as i32,
        roles: roles.iter().map(|r| r.to_string()).collect(),
        allowed_keys: allowed.iter().map(|k| k.to_string()).collect(),
        ..pb::Caller::default()
    }
}

/// The audit records of `rpc` made by `caller`: (outcome, status code, detail).
fn audited(server: &TestServer, rpc: &str, caller: &str) -> Vec<(String, i32, String)> {
    let db = kms_audit::AuditDb::open_read_only(&server.audit_path()).unwrap();
    db.records(1, 100_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.record.rpc == rpc && r.record.caller == identity_of(caller))
        .map(|r| (r.record.outcome.as_str().to_owned(), r.record.status_code, r.record.detail))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_caller_is_held_to_its_allowed_keys_clearance_and_revocation() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    for (name, level) in [("tax/returns", L::Personal), ("tax/secrets", L::Secret), ("citizens", L::Personal)] {
        officer.create_key(name, level, None, None).await.unwrap();
    }
    let registered = made(officer.register_caller(registration("taxgw", &["exchange"], &["tax/*"], L::Personal, 3)).await.unwrap());
    assert!(registered.active);
    assert_eq!(registered.allowed_keys, ["tax/*"]);
    server.issue_client("taxgw", Validity::default());
    let gw = server.client("taxgw").await;
    let c = ctx(&[("case", "9")]);

    gw.generate_data_key("tax/returns", &c, Delivery::PlaintextAndWrapped).await.unwrap();
    let (code1, m) = code(gw.generate_data_key("citizens", &c, Delivery::PlaintextAndWrapped).await.unwrap_err());
    assert_eq!(
        (code1, m.as_str()),
        (Code::PermissionDenied, "caller urn:kms:caller:test-taxgw may not use key citizens: it is not among the caller's allowed keys")
    );
    let (code2, m) = code(gw.encrypt("tax/secrets", b"x", &c).await.unwrap_err());
    assert_eq!((code2, m.as_str()), (Code::PermissionDenied, "caller urn:kms:caller:test-taxgw has system security level 3; SECRET keys need level 4 or higher"));
    let (code3, m) = code(gw.get_key("tax/returns").await.unwrap_err());
    assert_eq!((code3, m.as_str()), (Code::PermissionDenied, "caller urn:kms:caller:test-taxgw lacks the officer role"));

    // An update takes effect on the next request; raising a clearance needs a second officer.
    let mut more = registration("taxgw", &["exchange"], &["tax/*"], L::Secret, 4);
    more.agency = "Ministry of Finance (IT)".into();
    let request = pending(officer.update_caller(more).await.unwrap());
    assert_eq!(request.change, "clearance PERSONAL -> SECRET; system level 3 -> 4; agency changed");
    assert_eq!(code(gw.encrypt("tax/secrets", b"x", &c).await.unwrap_err()).0, Code::PermissionDenied, "not yet");
    let officer2 = server.client("officer2").await;
    let approved = officer2.approve(&request.id).await.unwrap();
    let updated = approved.caller.expect("the caller after the change");
    assert_eq!((updated.system_level, updated.clearance), (4, L::Secret as i32));
    gw.encrypt("tax/secrets", b"x", &c).await.unwrap();

    // Revoked: every request is refused, the registration stays listed as revoked.
    let revoked = made(officer.revoke_caller(&identity_of("taxgw")).await.unwrap());
    assert!(!revoked.active);
    let (code4, m) = code(gw.generate_data_key("tax/returns", &c, Delivery::PlaintextAndWrapped).await.unwrap_err());
    assert_eq!((code4, m.as_str()), (Code::Unauthenticated, "caller urn:kms:caller:test-taxgw was revoked"));
    let active: Vec<String> = officer.list_callers(false).await.unwrap().into_iter().map(|c| c.identity).collect();
    assert!(!active.contains(&identity_of("taxgw")) && active.contains(&identity_of("exchange")));
    let all = officer.list_callers(true).await.unwrap();
    assert!(all.iter().any(|c| c.identity == identity_of("taxgw") && !c.active));

    // Every refusal is in the audit trail with its status and rule.
    let trail = audited(&server, "GenerateDataKey", "taxgw");
    let refused: Vec<(i32, &str)> = trail.iter().filter(|r| r.0 == "refused").map(|r| (r.1, r.2.as_str())).collect();
    assert_eq!(
        refused,
        [
            (Code::PermissionDenied as i32, "caller urn:kms:caller:test-taxgw may not use key citizens: it is not among the caller's allowed keys"),
            (Code::Unauthenticated as i32, "caller urn:kms:caller:test-taxgw was revoked"),
        ]
    );
    let encrypts = audited(&server, "Encrypt", "taxgw");
    assert_eq!(
        encrypts[0],
        (
            "refused".to_owned(),
            Code::PermissionDenied as i32,
            "caller urn:kms:caller:test-taxgw has system security level 3; SECRET keys need level 4 or higher".to_owned()
        )
    );
    assert_eq!(encrypts[1].0, "refused", "refused while the update awaited its second officer");
    assert_eq!(encrypts[2].0, "ok", "allowed after the update");
    let get = audited(&server, "GetKey", "taxgw");
    assert_eq!((get[0].0.as_str(), get[0].1), ("refused", Code::PermissionDenied as i32));
    let registers = audited(&server, "RegisterCaller", "officer");
    assert_eq!(registers.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["begun", "ok"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_officers_manage_callers_and_bad_registrations_are_refused() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    let x = server.client("exchange").await;
    let (c, m) = code(x.register_caller(registration("taxgw", &["exchange"], &["*"], L::Personal, 3)).await.unwrap_err());
    assert_eq!((c, m.as_str()), (Code::PermissionDenied, "caller urn:kms:caller:test-exchange lacks the officer role"));
    let auditor = server.client("auditor").await;
    assert_eq!(code(auditor.list_callers(true).await.unwrap_err()).0, Code::PermissionDenied);

    let bad = [
        (registration("a", &[], &["*"], L::Personal, 3), "invalid roles: at least one of exchange, officer, auditor"),
        (registration("a", &["janitor"], &["*"], L::Personal, 3), "invalid roles: unknown role \"janitor\": expected exchange, officer or auditor"),
        (registration("a", &["officer", "auditor"], &["*"], L::Personal, 3), "invalid roles: an officer holds no other role: officer and auditor, and officer and exchange, are separate duties"),
        (registration("a", &["officer", "exchange"], &["*"], L::Personal, 3), "invalid roles: an officer holds no other role: officer and auditor, and officer and exchange, are separate duties"),
        (registration("a", &["exchange"], &["*"], L::Personal, 6), "invalid system_level: must be 1 to 5"),
        (registration("a", &["exchange"], &["tax/*/x"], L::Personal, 3), "invalid allowed_keys: \"tax/*/x\" may hold only letters, digits and - _ . / (starting with a letter or digit), and a final *"),
        (pb::Caller { identity: "not a uri".into(), ..registration("a", &["exchange"], &["*"], L::Personal, 3) }, "invalid identity: must be the certificate's URI SAN (1-512 bytes, no spaces), e.g. urn:kms:caller:tax-gateway"),
        (pb::Caller { clearance: 0, ..registration("a", &["exchange"], &["*"], L::Personal, 3) }, "invalid clearance: unknown or unspecified level"),
    ];
    for (reg, want) in bad {
        let (c, m) = code(officer.register_caller(reg).await.unwrap_err());
        assert_eq!((c, m.as_str()), (Code::InvalidArgument, want));
    }
    let (c, m) = code(officer.register_caller(registration("exchange", &["exchange"], &["*"], L::Personal, 3)).await.unwrap_err());
    assert_eq!((c, m.as_str()), (Code::AlreadyExists, "caller urn:kms:caller:test-exchange is already registered; use UpdateCaller"));
    let (c, m) = code(officer.update_caller(registration("nobody", &["exchange"], &["*"], L::Personal, 3)).await.unwrap_err());
    assert_eq!((c, m.as_str()), (Code::NotFound, "no caller urn:kms:caller:test-nobody is registered"));

    // No one changes their own registration, and no one locks everyone out.
    let (c, m) = code(officer.revoke_caller(&identity_of("officer")).await.unwrap_err());
    assert_eq!((c, m.as_str()), (Code::FailedPrecondition, "an officer cannot revoke their own registration"));
    let demote = registration("officer", &["exchange"], &["*"], L::Secret, 5);
    let (c, m) = code(officer.update_caller(demote).await.unwrap_err());
    assert_eq!((c, m.as_str()), (Code::PermissionDenied, "caller urn:kms:caller:test-officer cannot change its own registration; another officer must"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_active_officer_cannot_be_revoked_even_with_a_second_officer() {
    let mut settings = Settings::default();
    settings.callers.push(kms_e2e::TestCaller { name: "officer3", system_level: 5, clearance: "SECRET", roles: &["officer"] });
    let server = TestServer::start(settings);
    let (officer, officer2, officer3) = (server.client("officer").await, server.client("officer2").await, server.client("officer3").await);
    // officer files the revocation of officer2; officer3 approves it.
    let request = pending(officer.revoke_caller(&identity_of("officer2")).await.unwrap());
    assert_eq!(request.action, pb::ApprovalAction::RevokeCaller as i32);
    // The subject may not decide a request about itself.
    let (c, m) = code(officer2.approve(&request.id).await.unwrap_err());
    assert_eq!((c, m.as_str()), (Code::PermissionDenied, "caller urn:kms:caller:test-officer2 cannot change its own registration; another officer must"));
    let done = officer3.approve(&request.id).await.unwrap();
    assert!(!done.caller.unwrap().active);
    // officer files the revocation of officer3; only officer3 itself could approve it now: refused.
    let request = pending(officer.revoke_caller(&identity_of("officer3")).await.unwrap());
    let (c, _) = code(officer3.approve(&request.id).await.unwrap_err());
    assert_eq!(c, Code::PermissionDenied);
    assert_eq!(code(officer.approve(&request.id).await.unwrap_err()).0, Code::PermissionDenied, "nor its requester");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_the_truth_and_an_edited_registration_is_refused() {
    let mut server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("plans", L::Secret, None, None).await.unwrap();
    made(officer.revoke_caller(&identity_of("exchange")).await.unwrap());
    drop(officer);
    // The config still lists `exchange`; the store's revocation wins.
    server.restart(Settings::default());
    let x = server.client("exchange").await;
    assert_eq!(code(x.get_key("plans").await.unwrap_err()).0, Code::Unauthenticated);

    // Raise a caller's clearance with the sqlite3 shell: the row's MAC no longer verifies, so the
    // caller is refused as unknown, and the log names it.
    let low = server.client("personal-only").await;
    assert_eq!(code(low.encrypt("plans", b"x", &ctx(&[])).await.unwrap_err()).0, Code::PermissionDenied);
    drop((x, low));
    let db = rusqlite::Connection::open(server.store_path()).unwrap();
    let secret = 5; // Classification::Secret's stored byte
    let changed = db
        .execute("UPDATE callers SET clearance = ?1 WHERE identity = ?2", rusqlite::params![secret, identity_of("personal-only")])
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    server.restart(Settings::default());
    let low = server.client("personal-only").await;
    let (c, m) = code(low.encrypt("plans", b"x", &ctx(&[])).await.unwrap_err());
    assert_eq!((c, m.as_str()), (Code::Unauthenticated, "caller urn:kms:caller:test-personal-only is not registered"));
    assert!(server.log().contains("caller registration failed authentication"), "the log names the forged row");
    // The listing names the forged registration apart and lists the others.
    let officer = server.client("officer").await;
    let listing = officer.list_callers_full(true).await.unwrap();
    assert_eq!(
        listing.refused,
        [pb::RefusedCaller {
            identity: identity_of("personal-only"),
            reason: "its registration failed authentication: the store was changed outside the service".into()
        }]
    );
    assert!(listing.callers.iter().any(|c| c.identity == identity_of("exchange")));
    assert!(!listing.callers.iter().any(|c| c.identity == identity_of("personal-only")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmsctl_registers_lists_and_revokes_callers() {
    let server = TestServer::start(Settings::default());
    let out = server.kmsctl(
        "officer",
        &[
            "caller", "register", "--identity", "urn:kms:caller:test-health", "--agency", "Ministry of Health", "--name", "health gateway",
            "--system-level", "3", "--clearance", "SENSITIVE_PERSONAL", "--role", "exchange", "--allow-key", "health/*",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = server.kmsctl("officer", &["--output", "json", "caller", "list"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let health = list.as_array().unwrap().iter().find(|c| c["identity"] == "urn:kms:caller:test-health").expect("listed");
    assert_eq!(health["allowed_keys"], serde_json::json!(["health/*"]));
    assert_eq!(health["clearance"], "SENSITIVE_PERSONAL");
    let out = server.kmsctl("officer", &["caller", "revoke", "urn:kms:caller:test-health"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = server.kmsctl("exchange", &["caller", "list"]);
    assert_eq!(out.status.code(), Some(3), "refused: exit 3");
    assert!(String::from_utf8_lossy(&out.stderr).contains("PERMISSION_DENIED: caller urn:kms:caller:test-exchange lacks the officer role"));
}
