//! Readiness: `grpc.health.v1.Health`, answered from what this server can do now.
//!
//! A server is SERVING only while all three of its parts work: its HSM (the HSM layer is not
//! lost: its sessions answer), its key store (a trivial read answers within [`STORE_DEADLINE`]),
//! and its audit trail (the writer runs and its last group was made durable and anchored, see
//! `AuditLog::is_writable`). Otherwise it is NOT_SERVING, overall (service `""`) and for every
//! service it offers (`kms.v1.DataKeys`, ...): every one of them needs all three, since nothing is
//! done that is not audited. The checks run every [`CHECK_EVERY`] on a task of their own, so that
//! a health check itself costs nothing and never waits for a stalled part; a change of state is
//! logged with its reason.
//!
//! Served on the mutual-TLS port (a probe needs a client certificate the server trusts), and, if
//! `server.health_listen` is set, on a plain-text local port that serves nothing else: it exposes
//! only the serving state of each service name, never a reason, a caller or a key. Health checks
//! are not audited: they carry no request and would fill the trail with one record per probe.
#![forbid(unsafe_code)]

use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::service::AppState;

/// How often the parts are checked.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);
/// How long the store's trivial read may take before the store counts as not answering.
pub const STORE_DEADLINE: Duration = Duration::from_secs(2);

/// The gRPC service names whose serving state is reported (besides `""`, the whole server).
pub const SERVICES: &[&str] = &["kms.v1.KeyAdmin", "kms.v1.DataKeys", "kms.v1.HsmCrypto", "kms.v1.Approvals", "kms.v1.Callers", "kms.v1.Audit"];

/// What is wrong, if anything: `None` when every part works.
pub async fn check(state: &AppState) -> Option<String> {
    let mut wrong = Vec::new();
    let hsm = state.hsm.health();
    if hsm.state != crate::hsm::HsmState::Ready {
        wrong.push(format!(
            "the HSM is lost ({})",
            crate::bounded::text(hsm.last_error.as_deref().unwrap_or("no error recorded"), 200)
        ));
    }
    let store = state.store.clone();
    match tokio::time::timeout(STORE_DEADLINE, tokio::task::spawn_blocking(move || store.ping())).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => wrong.push(format!("the key store does not answer ({})", crate::bounded::text(&e.to_string(), 200))),
        Ok(Err(_)) => wrong.push("the key store check failed".to_owned()),
        Err(_) => wrong.push(format!("the key store did not answer within {STORE_DEADLINE:?}")),
    }
    if !state.audit.is_writable() {
        wrong.push("the audit trail cannot be written".to_owned());
    }
    (!wrong.is_empty()).then(|| wrong.join("; "))
}

/// Sets every reported name to `status`.
async fn report(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in SERVICES {
        reporter.set_service_status(*name, status).await;
    }
}

/// Checks once (before the server listens, so that its first answer is already true), then keeps
/// the reporter up to date every [`CHECK_EVERY`] until aborted.
pub async fn spawn(state: AppState, reporter: HealthReporter) -> tokio::task::JoinHandle<()> {
    let mut wrong = check(&state).await;
    report(&reporter, if wrong.is_none() { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
    if let Some(why) = &wrong {
        tracing::warn!(reason = %why, "readiness: NOT_SERVING");
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = check(&state).await;
            if now != wrong {
                match &now {
                    None => {
                        tracing::info!("readiness: SERVING again");
                        report(&reporter, ServingStatus::Serving).await;
                    }
                    Some(why) => {
                        tracing::warn!(reason = %why, "readiness: NOT_SERVING");
                        report(&reporter, ServingStatus::NotServing).await;
                    }
                }
                wrong = now;
            }
        }
    })
}
