//! The audit trail (invariant 3): every request, allowed or refused, and every change the
//! server makes by itself (scheduled rotations and destructions), becomes a record in a hash chain
//! that is durable before the answer leaves; checkpoints of the chain are signed in the HSM. The
//! format, storage and offline verification are the `kms-audit` crate's; this module decides what
//! is recorded and when.
//!
//! - [`facts`]: what the current request's record will say, filled in as the handler learns it.
//! - [`log`]: the writer (group commit, checkpoints) and the readers the `Audit` service uses.
//! - [`anchor`]: the trail's anchor in the key store, checked at start-up and moved on every commit.
//! - [`unrouted`]: the record of a request tonic answers before any handler (undecodable, unknown method).
//!
//! Fail closed: a request whose record cannot be made durable is answered `UNAVAILABLE`. A change
//! (key creation, lifecycle change, approval) writes a `begun` record before it touches the store
//! or the HSM, so that a change is never made unaudited; its final record follows. Must never
//! record an encryption context (only its digest), a key or a plaintext.
#![forbid(unsafe_code)]

pub mod anchor;
pub mod facts;
pub mod log;
pub mod unrouted;

pub use facts::RequestFacts;
pub use log::{AuditError, AuditLog, AuditSettings};

use kms_audit::{AuditRecord, Outcome};

/// Unix time in milliseconds.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The record of a request (or server action) with these facts and this outcome. Every text field
/// is bounded (see `crate::bounded`): no record grows with what a caller sends. The detail is
/// `detail` for a refusal or failure (prefixed with the request's subject when it has one), and the
/// subject for a `begun` or `ok` record when `detail` is empty.
pub fn record(facts: &RequestFacts, outcome: Outcome, status_code: i32, detail: &str) -> AuditRecord {
    use crate::bounded::{owned, MESSAGE, NAME};
    let detail = match (detail.is_empty(), facts.subject.is_empty()) {
        (true, _) => facts.subject.clone(),
        (false, true) => detail.to_owned(),
        (false, false) => format!("{}: {detail}", facts.subject),
    };
    AuditRecord {
        seq: 0,
        time_unix_ms: unix_ms(),
        caller: owned(&facts.caller, NAME),
        cert_fingerprint: facts.cert_fingerprint.clone(),
        rpc: facts.rpc.to_owned(),
        key: owned(&facts.key, NAME),
        key_version: facts.key_version,
        level: facts.level.map(|l| l.as_str().to_owned()).unwrap_or_default(),
        outcome,
        status_code,
        request_id: owned(&facts.request_id, 64),
        context_hash: facts.context_hash.clone(),
        detail: owned(&detail, MESSAGE),
    }
}

/// Writes the `begun` record of the current request before it changes anything (once per request;
/// its sequence number is noted in the request's facts); outside a request (the lifecycle task
/// writes its own) it does nothing.
pub async fn record_intent(log: &AuditLog) -> Result<(), AuditError> {
    match facts::take_intent() {
        Some(f) => {
            let seq = log.append(record(&f, Outcome::Begun, 0, "")).await?;
            facts::note_intent_seq(seq);
            Ok(())
        }
        None => Ok(()),
    }
}

/// The facts of a change the server makes by itself (`rpc` names it, e.g. "ScheduledRotation").
pub fn server_facts(rpc: &'static str, key: &str, level: crate::classification::Classification, version: u32) -> RequestFacts {
    RequestFacts {
        rpc,
        request_id: crate::service::request_id(),
        caller: crate::service::approvals::SCHEDULER_IDENTITY.to_owned(),
        key: key.to_owned(),
        level: Some(level),
        key_version: version,
        ..RequestFacts::default()
    }
}
