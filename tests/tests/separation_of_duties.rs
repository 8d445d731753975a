//! No single person holds every power (invariant 10), end to end over mutual TLS: an officer allowed
//! only `tax/*` and cleared for PERSONAL cannot raise its own registration, grant more than it holds,
//! make a second officer alone, approve its own requests or revoke other officers; granting the
//! officer or auditor role needs a second officer; a request whose filer was revoked cannot be
//! approved; officers see keys and callers only within what they hold.

use kms_e2e::pb::{self, Classification as L};
use kms_e2e::{identity_of, made, pending, Settings, TestServer};
use kms_server::pki::Validity;
use tonic::Code;

fn code(err: kms_client::ClientError) -> (Code, String) {
    let s = err.status().unwrap_or_else(|| panic!("expected a status, got {err}"));
    (s.code(), s.message().to_owned())
}

fn caller(name: &str, roles: &[&str], clearance: L, level: u32, allowed: &[&str]) -> pb::Caller {
    pb::Caller {
        identity: identity_of(name),
        agency: "Ministry of Finance".into(),
        name: name.into(),
        system_level: level,
        clearance: clearance as i32,
        roles: roles.iter().map(|r| r.to_string()).collect(),
        allowed_keys: allowed.iter().map(|k| k.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_officer_holds_no_power_beyond_its_own_and_none_alone() {
    let server = TestServer::start(Settings::default());
    let (officer, officer2) = (server.client("officer").await, server.client("officer2").await);
    for (name, level) in [("tax/returns", L::Personal), ("tax/secret", L::Secret), ("health", L::Personal)] {
        officer.create_key(name, level, None, None).await.unwrap();
    }

    // Making an officer needs two officers, and the requester cannot be the second.
    let limited = caller("taxofficer", &["officer"], L::Personal, 3, &["tax/*"]);
    let request = pending(officer.register_caller(limited.clone()).await.unwrap());
    assert_eq!((request.action, request.subject.as_str()), (pb::ApprovalAction::RegisterCaller as i32, identity_of("taxofficer").as_str()));
    assert_eq!(request.change, "register with roles officer, clearance PERSONAL, system level 3");
    let (c, m) = code(officer.approve(&request.id).await.unwrap_err());
    assert_eq!(
        (c, m.as_str()),
        (Code::PermissionDenied, "officer urn:kms:caller:test-officer filed this request and cannot decide it; a different officer must approve or reject it")
    );
    assert!(officer2.approve(&request.id).await.unwrap().caller.unwrap().active);
    server.issue_client("taxofficer", Validity::default());
    let tax = server.client("taxofficer").await;

    // Not its own registration.
    let (c, m) = code(tax.update_caller(caller("taxofficer", &["officer"], L::TopSecret, 5, &["*"])).await.unwrap_err());
    assert_eq!((c, m.as_str()), (Code::PermissionDenied, "caller urn:kms:caller:test-taxofficer cannot change its own registration; another officer must"));
    // Nothing beyond what it holds.
    for (reg, why) in [
        (caller("helper", &["exchange"], L::Secret, 3, &["tax/*"]), "its clearance SECRET is above the officer's PERSONAL"),
        (caller("helper", &["exchange"], L::Personal, 5, &["tax/*"]), "its system level 5 is above the officer's 3"),
        (caller("helper", &["exchange"], L::Personal, 3, &["*"]), "its allowed keys include \"*\", which the officer's do not cover"),
        (caller("helper", &["exchange"], L::Personal, 3, &["health"]), "its allowed keys include \"health\", which the officer's do not cover"),
    ] {
        let (c, m) = code(tax.register_caller(reg).await.unwrap_err());
        assert_eq!((c, m), (Code::PermissionDenied, format!("officer urn:kms:caller:test-taxofficer may not register caller urn:kms:caller:test-helper: {why}")));
    }
    // Within what it holds, an exchange caller is registered at once.
    made(tax.register_caller(caller("helper", &["exchange"], L::Personal, 3, &["tax/returns"])).await.unwrap());
    // A second officer identity is only a request, which it cannot approve itself.
    let sidekick = pending(tax.register_caller(caller("sidekick", &["officer"], L::Personal, 3, &["tax/*"])).await.unwrap());
    assert_eq!(code(tax.approve(&sidekick.id).await.unwrap_err()).0, Code::PermissionDenied);
    // Other officers are beyond it.
    for other in ["officer", "officer2"] {
        let (c, m) = code(tax.revoke_caller(&identity_of(other)).await.unwrap_err());
        assert_eq!(c, Code::PermissionDenied, "{m}");
        assert!(m.contains("its clearance SECRET is above the officer's PERSONAL"), "{m}");
    }

    // It sees keys only within its allowed keys and clearance, and callers only within its scope.
    let keys: Vec<String> = tax.list_keys(&Default::default()).await.unwrap().into_iter().map(|k| k.name).collect();
    assert_eq!(keys, ["tax/returns"]);
    assert_eq!(
        code(tax.get_key("tax/secret").await.unwrap_err()),
        (Code::PermissionDenied, "caller urn:kms:caller:test-taxofficer is cleared up to PERSONAL; the key is SECRET".into())
    );
    assert_eq!(code(tax.get_key("health").await.unwrap_err()).0, Code::PermissionDenied);
    let mut seen: Vec<String> = tax.list_callers(true).await.unwrap().into_iter().map(|c| c.identity).collect();
    seen.sort();
    assert_eq!(seen, [identity_of("helper"), identity_of("taxofficer")]);
    let approvals: Vec<String> = tax.list_approvals(false).await.unwrap().into_iter().map(|a| a.subject).collect();
    assert_eq!(approvals, [identity_of("sidekick")], "requests above its clearance are not listed");

    // The filer of a request is checked again when it is decided: revoke taxofficer (two officers),
    // and its pending request can no longer be approved, only rejected.
    let revoke = pending(officer.revoke_caller(&identity_of("taxofficer")).await.unwrap());
    assert!(!officer2.approve(&revoke.id).await.unwrap().caller.unwrap().active);
    let (c, m) = code(officer2.approve(&sidekick.id).await.unwrap_err());
    assert_eq!(
        (c, m.as_str()),
        (Code::FailedPrecondition, "the request was filed by urn:kms:caller:test-taxofficer, who is no longer an active officer; it can only be rejected")
    );
    officer2.reject(&sidekick.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditor_role_and_a_raised_clearance_need_a_second_officer_and_roles_stay_separate() {
    let server = TestServer::start(Settings::default());
    let (officer, officer2) = (server.client("officer").await, server.client("officer2").await);
    // exchange -> exchange + auditor: a request.
    let granted = caller("exchange", &["exchange", "auditor"], L::Secret, 5, &["*"]);
    let request = pending(officer.update_caller(granted).await.unwrap());
    assert_eq!(request.change, "roles exchange -> exchange,auditor; agency changed");
    let x = server.client("exchange").await;
    assert_eq!(code(x.list_audit_records(1, 10).await.unwrap_err()).0, Code::PermissionDenied, "not before the approval");
    officer2.approve(&request.id).await.unwrap();
    assert!(x.list_audit_records(1, 10).await.is_ok(), "an exchange system may also audit");
    // An officer holds no other role, whoever asks.
    let (c, m) = code(officer.update_caller(caller("officer2", &["officer", "auditor"], L::Secret, 5, &["*"])).await.unwrap_err());
    assert_eq!(
        (c, m.as_str()),
        (Code::InvalidArgument, "invalid roles: an officer holds no other role: officer and auditor, and officer and exchange, are separate duties")
    );
    // A lowered clearance is one officer's decision; raising it back needs two.
    let lower = caller("personal-only", &["exchange"], L::Unclassified, 5, &["*"]);
    made(officer.update_caller(lower).await.unwrap());
    let raise = caller("personal-only", &["exchange"], L::Personal, 5, &["*"]);
    let request = pending(officer.update_caller(raise).await.unwrap());
    assert_eq!(request.classification, L::Personal as i32);
    officer2.approve(&request.id).await.unwrap();
}
