//! Two-officer approvals over mutual TLS: for the levels whose row in the level table says so, disabling,
//! destroying (and at TOP_SECRET rotating) files a request instead of acting; a second, different
//! officer approves (the change happens) or rejects it (nothing happens); the requester cannot
//! decide their own request; requests expire; a request row edited in the database is refused.

use std::time::Duration;

use kms_e2e::pb::{self, ApprovalAction as A, ApprovalState as AS, Classification as L, KeyState as S};
use kms_e2e::{ctx, identity_of, Settings, TestCaller, TestServer};
use tonic::Code;

fn req(id: &str) -> pb::DecideApprovalRequest {
    pb::DecideApprovalRequest { id: id.into() }
}

async fn disable(officer: &kms_client::KmsClient, name: &str) -> pb::KeyChangeResponse {
    officer.key_admin().disable_key(pb::SetKeyStateRequest { name: name.into() }).await.unwrap().into_inner()
}

async fn list(officer: &kms_client::KmsClient, include_decided: bool) -> Vec<pb::Approval> {
    officer.approvals().list_approvals(pb::ListApprovalsRequest { include_decided }).await.unwrap().into_inner().approvals
}

fn own_request(officer: &str) -> String {
    format!("officer {} filed this request and cannot decide it; a different officer must approve or reject it", identity_of(officer))
}

#[tokio::test]
async fn disabling_a_sensitive_key_waits_for_a_second_officer() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    let officer2 = server.client("officer2").await;
    officer.create_key("health", L::SensitivePersonal, None, None).await.unwrap();

    let answer = disable(&officer, "health").await;
    let a = answer.pending_approval.expect("a pending request");
    assert_eq!(answer.key.unwrap().state, S::Enabled as i32, "nothing changes before approval");
    assert_eq!((a.key.as_str(), a.action, a.state, a.version), ("health", A::DisableKey as i32, AS::Pending as i32, 0));
    assert_eq!((a.requested_by.as_str(), a.classification), (identity_of("officer").as_str(), L::SensitivePersonal as i32));
    assert_eq!(a.expires_at_unix - a.requested_at_unix, 86_400);
    assert_eq!(a.id.len(), 32);
    // Asking again returns the same open request.
    assert_eq!(disable(&officer, "health").await.pending_approval.unwrap().id, a.id);
    assert_eq!(officer.get_key("health").await.unwrap().state, S::Enabled as i32);

    // The requester can neither approve nor reject; an exchange service cannot decide at all.
    let err = officer.approvals().approve(req(&a.id)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::PermissionDenied, own_request("officer").as_str()));
    let err = officer.approvals().reject(req(&a.id)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::PermissionDenied, own_request("officer").as_str()));
    let x = server.client("exchange").await;
    assert_eq!(x.approvals().approve(req(&a.id)).await.unwrap_err().code(), Code::PermissionDenied);
    assert_eq!(officer.get_key("health").await.unwrap().state, S::Enabled as i32);

    // A second officer approves: the change is made.
    let done = officer2.approvals().approve(req(&a.id)).await.unwrap().into_inner();
    let approved = done.approval.unwrap();
    assert_eq!((approved.state, approved.decided_by.as_str()), (AS::Approved as i32, identity_of("officer2").as_str()));
    assert_eq!(done.key.unwrap().state, S::Disabled as i32);
    assert_eq!(officer.get_key("health").await.unwrap().state, S::Disabled as i32);
    let err = officer2.approvals().approve(req(&a.id)).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message().to_owned()),
        (Code::FailedPrecondition, format!("approval request {} is already APPROVED by {}", a.id, identity_of("officer2")))
    );
    assert!(list(&officer, false).await.is_empty());
    let all = list(&officer, true).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state, AS::Approved as i32);
    // Re-enabling at a level whose disabling needed two officers needs two as well.
    let answer = officer.key_admin().enable_key(pb::SetKeyStateRequest { name: "health".into() }).await.unwrap().into_inner();
    let request = answer.pending_approval.expect("a request for a second officer");
    assert_eq!(request.action, pb::ApprovalAction::EnableKey as i32);
    assert_eq!(answer.key.unwrap().state, S::Disabled as i32, "unchanged until approved");
    let approved = officer2.approvals().approve(req(&request.id)).await.unwrap().into_inner();
    assert_eq!(approved.key.unwrap().state, S::Enabled as i32);
}

#[tokio::test]
async fn a_rejected_destruction_changes_nothing() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    let officer2 = server.client("officer2").await;
    officer.create_key("plans", L::Secret, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[]);
    let ct = x.encrypt("plans", b"keep me", &c).await.unwrap();

    let a = officer
        .key_admin()
        .schedule_key_destruction(pb::KeyTarget { name: "plans".into(), version: 0 })
        .await
        .unwrap()
        .into_inner()
        .pending_approval
        .unwrap();
    assert_eq!(a.action, A::DestroyKey as i32);
    let pending = list(&officer2, false).await;
    assert_eq!(pending.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), [a.id.as_str()]);
    let rejected = officer2.approvals().reject(req(&a.id)).await.unwrap().into_inner();
    assert_eq!((rejected.state, rejected.decided_by.as_str()), (AS::Rejected as i32, identity_of("officer2").as_str()));
    assert_eq!(officer.get_key("plans").await.unwrap().state, S::Enabled as i32);
    assert_eq!(&x.decrypt(&ct.ciphertext, &c, None).await.unwrap().plaintext[..], b"keep me");
    let err = officer2.approvals().approve(req(&a.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // A change that could never be approved is refused at once, without a request.
    let err = officer
        .key_admin()
        .disable_key_version(pb::SetKeyVersionStateRequest { name: "plans".into(), version: 1 })
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::FailedPrecondition, "version 1 is the primary version of key plans; rotate the key first"));
    assert!(list(&officer, false).await.is_empty());
    // Unknown and malformed ids.
    let err = officer2.approvals().approve(req(&"ab".repeat(16))).await.unwrap_err();
    assert_eq!((err.code(), err.message().to_owned()), (Code::NotFound, format!("no approval request {}", "ab".repeat(16))));
    let err = officer2.approvals().approve(req("xyz")).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "invalid id: must be 32 hex digits"));
}

#[tokio::test]
async fn an_expired_request_cannot_be_approved() {
    let server = TestServer::start(Settings { approval_ttl_seconds: 1, ..Settings::default() });
    let officer = server.client("officer").await;
    let officer2 = server.client("officer2").await;
    officer.create_key("health", L::SensitivePersonal, None, None).await.unwrap();
    let a = disable(&officer, "health").await.pending_approval.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let listed = list(&officer, true).await;
    assert_eq!(listed[0].state, AS::Expired as i32, "shown as expired once past its time");
    let err = officer2.approvals().approve(req(&a.id)).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message().to_owned()),
        (
            Code::FailedPrecondition,
            format!("approval request {} expired at {} (unix time) without a decision; file the change again", a.id, a.expires_at_unix)
        )
    );
    assert_eq!(officer.get_key("health").await.unwrap().state, S::Enabled as i32);
    let err = officer2.approvals().approve(req(&a.id)).await.unwrap_err();
    assert_eq!(err.message(), format!("approval request {} is already EXPIRED", a.id));
    // Filing again makes a new request.
    let again = disable(&officer, "health").await.pending_approval.unwrap();
    assert_ne!(again.id, a.id);
}

#[tokio::test]
async fn top_secret_rotation_needs_two_officers() {
    let officers = vec![
        TestCaller { name: "officer", system_level: 5, clearance: "TOP_SECRET", roles: &["officer"] },
        TestCaller { name: "officer2", system_level: 5, clearance: "TOP_SECRET", roles: &["officer"] },
        // Cleared only up to SECRET: may not decide a TOP_SECRET request.
        TestCaller { name: "officer3", system_level: 5, clearance: "SECRET", roles: &["officer"] },
    ];
    let settings = Settings { approved_up_to: "TOP_SECRET", isolated_network: true, callers: officers, ..Settings::default() };
    let server = TestServer::start(settings);
    let officer = server.client("officer").await;
    officer.create_key("codes", L::TopSecret, None, None).await.unwrap();
    officer.create_key("plans", L::Secret, None, None).await.unwrap();
    // SECRET rotation needs one officer.
    let r = officer.key_admin().rotate_key(pb::RotateKeyRequest { name: "plans".into() }).await.unwrap().into_inner();
    assert!(r.pending_approval.is_none());
    assert_eq!(r.key.unwrap().primary_version, 2);

    let r = officer.key_admin().rotate_key(pb::RotateKeyRequest { name: "codes".into() }).await.unwrap().into_inner();
    let a = r.pending_approval.expect("TOP_SECRET rotation waits for a second officer");
    assert_eq!((a.action, r.key.unwrap().primary_version), (A::RotateKey as i32, 1));
    let officer3 = server.client("officer3").await;
    let err = officer3.approvals().approve(req(&a.id)).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::PermissionDenied, "caller urn:kms:caller:test-officer3 is cleared up to SECRET; the key is TOP_SECRET"));
    let officer2 = server.client("officer2").await;
    let done = officer2.approvals().approve(req(&a.id)).await.unwrap().into_inner();
    assert_eq!(done.key.unwrap().primary_version, 2);
    assert_eq!(officer.get_key("codes").await.unwrap().versions.len(), 2);
}

#[tokio::test]
async fn an_approval_row_edited_in_the_database_is_refused() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("health", L::SensitivePersonal, None, None).await.unwrap();
    let a = disable(&officer, "health").await.pending_approval.unwrap();
    // Make the request look filed by someone else, so that its requester could approve it.
    let db = rusqlite::Connection::open(server.store_path()).unwrap();
    let n = db.execute("UPDATE approvals SET requested_by = ?1", [identity_of("officer2")]).unwrap();
    assert_eq!(n, 1);
    let err = officer.approvals().approve(req(&a.id)).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message().to_owned()),
        (
            Code::DataLoss,
            format!("approval request {} failed authentication: the key store was changed outside the service; the request is refused", a.id)
        )
    );
    assert_eq!(officer.get_key("health").await.unwrap().state, S::Enabled as i32);
    assert_eq!(officer.approvals().list_approvals(pb::ListApprovalsRequest { include_decided: true }).await.unwrap_err().code(), Code::DataLoss);
}
