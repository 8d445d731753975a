//! The lifecycle task: every `rotation_check_seconds` it rotates every ENABLED key whose rotation
//! period has passed since its primary version was made, and destroys the keys and versions whose
//! destruction waiting period is over. A rotation that needs two officers (TOP_SECRET by default)
//! is not done by the task: it files an approval request (requested by the schedule itself, so any
//! officer can approve it) and logs the key as overdue until the request is decided.
#![forbid(unsafe_code)]

use std::time::Duration;

use kms_audit::Outcome;

use super::key_admin::effective_rotation_days;
use super::approvals::{file_approval, SCHEDULER_IDENTITY};
use super::key_lifecycle::{destroy_due, rotate_key, unix_now};
use super::AppState;
use crate::store::ApprovalAction;
use crate::classification::LevelRules;
use crate::store::{KeyFilter, KeyRecord, KeyState};

/// Whether `key` is due for rotation at `now` (unix seconds).
pub fn is_due(key: &KeyRecord, rules: &LevelRules, now: i64) -> bool {
    key.state == KeyState::Enabled
        && now >= key.rotated_at.saturating_add(i64::from(effective_rotation_days(key, rules)) * 86_400)
}

/// What one pass of the scheduler did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotationPass {
    pub rotated: Vec<String>,
    pub needs_approval: Vec<String>,
    pub failed: Vec<String>,
}

/// Rotates every key due at `now`. Errors on single keys are logged and do not stop the pass.
pub async fn rotate_due_keys(state: &AppState, now: i64) -> Result<RotationPass, crate::status::ApiError> {
    let rules = state.policy.rules();
    let mut pass = RotationPass::default();
    let listing = state.keys(KeyFilter::default()).await?;
    for refused in &listing.refused {
        // Judged on its own: the other keys' rotations go ahead.
        tracing::error!(key = %crate::bounded::text(&refused.key, crate::bounded::NAME), reason = %refused.reason, "key skipped by the rotation schedule");
    }
    for key in listing.keys {
        let key = key.danger_open_for_server_task();
        if !is_due(&key, rules, now) {
            continue;
        }
        let name = key.name.clone();
        // Audited like a request: `begun` before anything changes (skipped if that cannot be
        // written), then the outcome.
        let facts = crate::audit::server_facts("ScheduledRotation", &name, key.classification, key.primary_version);
        let begun = match state.audit.append(crate::audit::record(&facts, Outcome::Begun, 0, "")).await {
            Ok(seq) => seq,
            Err(e) => {
                tracing::error!(key = %name, error = %e, "scheduled rotation skipped: its audit record cannot be written");
                pass.failed.push(name);
                continue;
            }
        };
        let outcome = |error: Option<&crate::status::ApiError>| match error {
            None => crate::audit::record(&facts, Outcome::Ok, 0, ""),
            Some(e) => {
                let status = e.to_status(&facts.request_id);
                crate::audit::record(&facts, Outcome::Failed, status.code() as i32, status.message())
            }
        };
        if rules.get(key.classification).two_officer_rotate {
            let filed = file_approval(state, &key, ApprovalAction::RotateKey, 0, SCHEDULER_IDENTITY).await;
            match &filed {
                Ok(a) => tracing::warn!(key = %name, level = %key.classification, approval = %a.id, "key is due for rotation, which needs an officer's approval; request filed"),
                Err(e) => tracing::error!(key = %name, error = %e, "could not file the approval request of a due rotation"),
            }
            let mut record = outcome(filed.as_ref().err());
            if record.outcome == Outcome::Ok {
                record.detail = "needs a second officer: approval request filed".to_owned();
            }
            let _ = state.audit.append(record).await;
            pass.needs_approval.push(name);
            continue;
        }
        let origin = super::key_lifecycle::Origin { request_id: facts.request_id.clone(), audit_seq: begun };
        let rotated = rotate_key(state, key.id, origin).await;
        let mut record = outcome(rotated.as_ref().err());
        match rotated {
            Ok(k) => {
                tracing::info!(key = %name, version = k.primary_version, by = "schedule", "key rotated");
                record.key_version = k.primary_version;
                pass.rotated.push(name);
            }
            Err(e) => {
                tracing::error!(key = %name, error = %e, "scheduled rotation failed");
                pass.failed.push(name);
            }
        }
        if let Err(e) = state.audit.append(record).await {
            tracing::error!(error = %e, "the outcome record of a scheduled rotation could not be written; its begun record stands");
        }
    }
    Ok(pass)
}

/// Runs [`rotate_due_keys`] and [`destroy_due`] every `interval` until the handle is aborted.
pub fn spawn(state: AppState, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One server at a time runs the passes (with a shared PostgreSQL store; with SQLite the
        // lease is always held): two servers rotating one key would both make version v+1.
        let mut lease = Some(state.store.lifecycle_lease());
        let mut held_before = None;
        loop {
            tick.tick().await;
            let Some(mut l) = lease.take() else { return };
            let Ok((l, held)) = tokio::task::spawn_blocking(move || {
                let held = l.hold();
                (l, held)
            })
            .await
            else {
                tracing::error!("the lifecycle lease check panicked; the lifecycle task stops");
                return;
            };
            lease = Some(l);
            match held {
                Ok(true) => {
                    if held_before != Some(true) {
                        tracing::info!("this server holds the lifecycle lease: it runs rotations, destructions and sweeps");
                    }
                    held_before = Some(true);
                }
                Ok(false) => {
                    if held_before != Some(false) {
                        tracing::info!("another server holds the lifecycle lease: this one runs no lifecycle passes until it is free");
                    }
                    held_before = Some(false);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot tell whether this server holds the lifecycle lease; this pass is skipped");
                    held_before = None;
                    continue;
                }
            }
            let rotated = match rotate_due_keys(&state, unix_now()).await {
                Ok(pass) => pass.rotated.len(),
                Err(e) => {
                    tracing::error!(error = %e, "scheduled rotation pass failed");
                    0
                }
            };
            let destroyed = match destroy_due(&state, unix_now()).await {
                Ok(keys) => keys.len(),
                Err(e) => {
                    tracing::error!(error = %e, "scheduled destruction pass failed");
                    0
                }
            };
            // The debris of creations that failed while the HSM was lost, once their requests are
            // answered (the same proof start-up uses).
            if let Err(e) = crate::reconcile::sweep_abandoned(&state.store, &state.hsm, &state.keyauth, &state.audit, None).await {
                tracing::warn!(error = %e, "sweeping the debris of failed creations failed; the next pass tries again");
            }
            tracing::debug!(rotated, destroyed, "lifecycle pass done");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classification::Classification;
    use crate::ids::{KeyId, KeyPurpose};

    fn key(level: Classification, period: u32, rotated_at: i64, state: KeyState) -> KeyRecord {
        KeyRecord {
            id: KeyId([1; 16]),
            name: "k".into(),
            classification: level,
            purpose: KeyPurpose::Envelope,
            state,
            primary_version: 1,
            rotation_period_days: period,
            created_at: 0,
            rotated_at,
            destroy_at: None,
            revision: 1,
            versions: vec![],
        }
    }

    #[test]
    fn due_after_the_keys_own_period_or_its_levels_default() {
        let rules = LevelRules::default();
        let day = 86_400;
        let own = key(Classification::Personal, 7, 1_000, KeyState::Enabled);
        assert!(!is_due(&own, &rules, 1_000 + 7 * day - 1));
        assert!(is_due(&own, &rules, 1_000 + 7 * day));
        let default = key(Classification::Secret, 0, 0, KeyState::Enabled);
        assert!(!is_due(&default, &rules, 90 * day - 1));
        assert!(is_due(&default, &rules, 90 * day));
        let disabled = key(Classification::Personal, 1, 0, KeyState::Disabled);
        assert!(!is_due(&disabled, &rules, 100 * day));
    }
}
