//! One pass of the rotation scheduler against a real SoftHSM token and a real SQLite file, with the
//! clock moved forward: due keys get a new primary version (object on the token, row sealed by the
//! HSM), keys not yet due are left alone, and TOP_SECRET keys, whose rotation needs two officers,
//! are not rotated: the schedule files one approval request for them (not one per pass).

mod hsm_support;

use hsm_support::TestHsm;
use kms_server::classification::Classification;
use kms_server::ids::{KeyId, KeyPurpose, ObjectId};
use kms_server::service::rotation::{rotate_due_keys, RotationPass};
use kms_server::service::approvals::SCHEDULER_IDENTITY;
use kms_server::service::AppState;
use kms_server::store::{ApprovalAction, ApprovalState, KeyRecord, KeyState, Store, VersionRecord};

const DAY: i64 = 86_400;

async fn add_key(state: &AppState, name: &str, level: Classification, period_days: u32, made_at: i64) -> KeyId {
    let id = KeyId::random().unwrap();
    let object_id = ObjectId::for_version(id, 1);
    let purpose = if level.is_state_secret() { KeyPurpose::HsmEncrypt } else { KeyPurpose::Envelope };
    state.hsm.create_key(&object_id, &format!("kms:{name}:v1"), level, purpose).await.unwrap();
    let record = KeyRecord {
        id,
        name: name.into(),
        classification: level,
        purpose,
        state: KeyState::Enabled,
        primary_version: 1,
        rotation_period_days: period_days,
        created_at: made_at,
        rotated_at: made_at,
        destroy_at: None,
        revision: 1,
        versions: vec![VersionRecord { version: 1, object_id, state: KeyState::Enabled, created_at: made_at, destroy_at: None }],
    };
    let mac = state.keyauth.seal(&record).await.unwrap();
    state.store.insert_key(&record, &mac).unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_keys_are_rotated_and_two_officer_keys_are_only_reported() {
    let token = TestHsm::new(Classification::TopSecret);
    let hsm = token.hsm().clone();
    let db = tempfile::tempdir().unwrap();
    let store = Store::open(&db.path().join("kms.db")).unwrap();
    let audit_path = db.path().join("kms.audit.db");
    let state = hsm_support::app_state(&token, &store, &audit_path, "").await;
    let t0 = 1_700_000_000;
    let weekly = add_key(&state, "weekly", Classification::Personal, 7, t0).await;
    add_key(&state, "yearly", Classification::Personal, 0, t0).await;
    add_key(&state, "secret", Classification::Secret, 0, t0).await;
    let top = add_key(&state, "top", Classification::TopSecret, 0, t0).await;

    // Six days on: nothing is due.
    assert_eq!(rotate_due_keys(&state, t0 + 6 * DAY).await.unwrap(), RotationPass::default());

    // A hundred days on: weekly (7 days) and secret (90-day default) are due; yearly is not; top is
    // due but needs two officers.
    let pass = rotate_due_keys(&state, t0 + 100 * DAY).await.unwrap();
    assert_eq!(pass.rotated, ["secret", "weekly"]);
    assert_eq!(pass.needs_approval, ["top"]);
    assert!(pass.failed.is_empty());

    let stored = store.key_by_id(weekly).unwrap().unwrap();
    let k = state.keyauth.verify(stored).await.expect("rotated row is sealed by the HSM");
    assert_eq!(k.primary_version, 2);
    assert_eq!(k.revision, 2);
    assert_eq!(k.versions.len(), 2);
    assert!(hsm.key_exists(&ObjectId::for_version(weekly, 2)).await.unwrap());
    let info = hsm.inspect_key(&ObjectId::for_version(weekly, 2)).await.unwrap();
    assert!(info.sensitive && !info.extractable && info.wrap && !info.encrypt);

    // Rotated just now (by the wall clock), so the same "now" finds nothing more due for them.
    let again = rotate_due_keys(&state, t0 + 100 * DAY).await.unwrap();
    assert_eq!(again.rotated, Vec::<String>::new());
    assert_eq!(again.needs_approval, ["top"]);

    // One request for the overdue TOP_SECRET rotation, filed by the schedule, sealed by the HSM.
    let open = store.list_approvals(false).unwrap();
    assert_eq!(open.len(), 1);
    let a = state.keyauth.verify_approval(open[0].clone()).await.expect("request sealed by the HSM");
    assert_eq!((a.key_id, a.action, a.version, a.state), (top, ApprovalAction::RotateKey, 0, ApprovalState::Pending));
    assert_eq!(a.requested_by, SCHEDULER_IDENTITY);
    let top_row = state.keyauth.verify(store.key_by_id(top).unwrap().unwrap()).await.unwrap();
    assert_eq!(top_row.primary_version, 1);

    // Each scheduled rotation is audited: `begun`, then the outcome, under the schedule's identity;
    // the overdue TOP_SECRET rotation is recorded as an approval request filed.
    let trail = kms_audit::AuditDb::open_read_only(&audit_path).unwrap().records(1, 100).unwrap();
    let seen: Vec<_> = trail
        .iter()
        .map(|r| (r.record.rpc.as_str(), r.record.key.as_str(), r.record.outcome.as_str(), r.record.caller.as_str()))
        .filter(|(rpc, ..)| *rpc == "ScheduledRotation")
        .map(|(_, key, outcome, caller)| {
            assert_eq!(caller, SCHEDULER_IDENTITY);
            (key, outcome)
        })
        .collect();
    assert_eq!(
        seen,
        [("secret", "begun"), ("secret", "ok"), ("top", "begun"), ("top", "ok"), ("weekly", "begun"), ("weekly", "ok"), ("top", "begun"), ("top", "ok")]
    );
    let filed = trail.iter().find(|r| r.record.key == "top" && r.record.outcome == kms_audit::Outcome::Ok).unwrap();
    assert_eq!(filed.record.detail, "needs a second officer: approval request filed");
}
