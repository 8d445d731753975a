//! What the audit record of the request being served will say: set by [`crate::service::AppState::respond`]
//! for the request's task, and filled in by the handler as it learns them (the key's level and
//! version, the context digest). A task-local, so that no handler signature changes and no handler can
//! forget to pass it on.
//!
//! Must never hold a context, a key or a plaintext: only names, numbers and digests.
#![forbid(unsafe_code)]

use std::cell::RefCell;

use crate::classification::Classification;

/// The audit-relevant facts of one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub rpc: &'static str,
    pub request_id: String,
    pub caller: String,
    pub cert_fingerprint: Vec<u8>,
    pub key: String,
    pub key_version: u32,
    pub level: Option<Classification>,
    pub context_hash: Vec<u8>,
    /// Whether the request's `begun` record is written (one per request, however many steps).
    pub intent_recorded: bool,
    /// The sequence number of that `begun` record, once written (0 before).
    pub intent_seq: u64,
    /// What a change acts on besides the key, in words (the destination of a re-wrap, the caller
    /// changed and how, the approval request decided): the detail of its `begun` and `ok` records,
    /// and the prefix of a refusal's.
    pub subject: String,
}

tokio::task_local! {
    static FACTS: RefCell<RequestFacts>;
}

/// Runs `fut` with `facts` as the current request's facts and returns its output and the facts as
/// the handler left them.
pub async fn scope<F: std::future::Future>(facts: RequestFacts, fut: F) -> (F::Output, RequestFacts) {
    FACTS
        .scope(RefCell::new(facts), async {
            let out = fut.await;
            let facts = FACTS.with(|f| f.take());
            (out, facts)
        })
        .await
}

/// The current request's facts, if a request is being served on this task.
pub fn current() -> Option<RequestFacts> {
    FACTS.try_with(|f| f.borrow().clone()).ok()
}

/// The current request's facts if its `begun` record is still to be written, marking it written.
pub fn take_intent() -> Option<RequestFacts> {
    FACTS
        .try_with(|f| {
            let mut f = f.borrow_mut();
            if f.intent_recorded {
                None
            } else {
                f.intent_recorded = true;
                Some(f.clone())
            }
        })
        .ok()
        .flatten()
}

/// Notes what the request acts on besides its key (see [`RequestFacts::subject`]); bounded.
pub fn note_subject(subject: &str) {
    let _ = FACTS.try_with(|f| f.borrow_mut().subject = crate::bounded::owned(subject, crate::bounded::MESSAGE));
}

/// Notes the sequence number of the request's `begun` record.
pub fn note_intent_seq(seq: u64) {
    let _ = FACTS.try_with(|f| f.borrow_mut().intent_seq = seq);
}

/// Notes the key the request acts on (first one wins: a re-wrap's source key is the one named).
pub fn note_key(name: &str, level: Classification) {
    let _ = FACTS.try_with(|f| {
        let mut f = f.borrow_mut();
        if f.key.is_empty() || f.key == name {
            f.key = name.to_owned();
            f.level = Some(level);
        }
    });
}

/// Notes the key version the request uses.
pub fn note_version(version: u32) {
    let _ = FACTS.try_with(|f| {
        let mut f = f.borrow_mut();
        if f.key_version == 0 {
            f.key_version = version;
        }
    });
}

/// Notes the digest of the request's encryption context (SHA-256 of its canonical form, the value
/// the blob binding uses; never the context itself).
pub fn note_context(digest: &[u8; 32]) {
    let _ = FACTS.try_with(|f| f.borrow_mut().context_hash = digest.to_vec());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notes_reach_the_scope_and_nothing_leaks_outside_it() {
        let start = RequestFacts { rpc: "GenerateDataKey", ..RequestFacts::default() };
        let ((), facts) = scope(start, async {
            note_key("a", Classification::Personal);
            note_key("b", Classification::Secret);
            note_version(3);
            note_version(4);
            note_context(&[9; 32]);
        })
        .await;
        assert_eq!(facts.key, "a");
        assert_eq!(facts.level, Some(Classification::Personal));
        assert_eq!(facts.key_version, 3);
        assert_eq!(facts.context_hash, vec![9; 32]);
        // Outside a request: no-ops, no panic.
        note_key("x", Classification::Personal);
        assert_eq!(current(), None);
    }
}
