//! The gRPC services, one file per service: [`key_admin`] for officers, [`data_keys`] and
//! [`hsm_crypto`] for exchange services.
//!
//! Every handler follows the same steps: identify the caller from its certificate, validate the
//! request, load the key, obtain an [`Authorized`](crate::authz::Authorized) value from the policy,
//! and only then touch the HSM. Store calls run on the blocking pool; HSM calls go through the HSM
//! worker pool. Nothing here calls `cryptoki` or SQLite directly.
#![forbid(unsafe_code)]

pub mod approvals;
pub mod audit;
pub mod callers;
pub mod data_keys;
pub mod hsm_crypto;
pub mod key_admin;
pub mod key_lifecycle;
pub mod rewrap;
pub mod rotation;
pub mod token_objects;

use std::sync::Arc;

use tonic::{Request, Status};

use crate::audit::{AuditLog, RequestFacts};
use crate::authz::{Caller, LoadedKey, Policy};
use crate::hsm::Hsm;
use crate::ids::KeyId;
use crate::key_cache::{KeyCache, Lookup};
use crate::keyauth::KeyAuth;
use crate::status::ApiError;
use crate::store::{KeyFilter, KeyRecord, Store};

/// Request size limits enforced by the handlers (the transport enforces the message limit).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_payload_bytes: usize,
}

/// The lifecycle timings of the deployment (seconds).
#[derive(Clone, Copy, Debug)]
pub struct LifecycleSettings {
    pub destruction_wait_seconds: i64,
    pub approval_ttl_seconds: i64,
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub policy: Arc<Policy>,
    pub hsm: Hsm,
    pub store: Store,
    /// Seals and verifies key rows: every key this state hands out has passed its MAC check.
    pub keyauth: Arc<KeyAuth>,
    pub limits: Limits,
    pub lifecycle: LifecycleSettings,
    /// Held by every lifecycle change (read-modify-write of a key row and its HSM objects), so that
    /// two changes of this process never interleave; other processes sharing the store are kept
    /// apart by the row revision.
    pub lifecycle_lock: Arc<tokio::sync::Mutex<()>>,
    /// Every request's record goes here before its answer leaves.
    pub audit: AuditLog,
    /// Authenticated key rows, served while the store is unchanged.
    pub key_cache: Arc<KeyCache>,
}

impl AppState {
    /// Identifies the caller of a request.
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Caller, ApiError> {
        let peer = crate::identity::from_request(request)?;
        Ok(self.policy.authenticate(&peer)?)
    }

    /// Runs a store call on the blocking pool.
    pub async fn store<R, F>(&self, f: F) -> Result<R, ApiError>
    where
        F: FnOnce(&Store) -> Result<R, crate::store::StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|_| ApiError::Internal("store task panicked"))?
            .map_err(ApiError::from)
    }

    /// The key named `name`, its row authenticated by the HSM; only the policy opens it. A name
    /// that could not be a key's is refused before anything is looked up.
    pub async fn key_by_name(&self, name: &str) -> Result<LoadedKey, ApiError> {
        validate_key_name(name)?;
        let n = name.to_owned();
        self.load_key(self.key_cache.by_name(name), move |s| s.key_by_name(&n), || format!("no key named {name}")).await
    }

    /// The key with this id, its row authenticated by the HSM; only the policy opens it.
    pub async fn key_by_id(&self, id: KeyId) -> Result<LoadedKey, ApiError> {
        self.load_key(self.key_cache.by_id(id), move |s| s.key_by_id(id), || {
            format!("no key with id {id} (it may have been destroyed)")
        })
        .await
    }

    /// A key from the cache while the store is unchanged, otherwise read and authenticated (and
    /// then cached).
    async fn load_key<F>(&self, cached: Lookup, read: F, missing: impl FnOnce() -> String) -> Result<LoadedKey, ApiError>
    where
        F: FnOnce(&Store) -> Result<Option<crate::store::StoredKey>, crate::store::StoreError> + Send + 'static,
    {
        let key = match cached {
            Lookup::Hit(record) => KeyRecord::clone(&record),
            Lookup::Miss(seen) => {
                let stored = self.store(read).await?.ok_or_else(|| ApiError::NotFound(missing()))?;
                let key = self.keyauth.verify(stored).await?;
                self.key_cache.insert(seen, Arc::new(key.clone()));
                key
            }
        };
        crate::audit::facts::note_key(&key.name, key.classification);
        Ok(LoadedKey::new(key))
    }

    /// The keys matching `filter`, every row authenticated by the HSM. A row that does not decode
    /// or fails authentication is refused on its own (listed in [`KeyListing::refused`], and
    /// logged): it never hides or stops the other keys.
    pub async fn keys(&self, filter: KeyFilter) -> Result<KeyListing, ApiError> {
        let stored = self.store(move |s| s.list_keys(&filter)).await?;
        let mut out = KeyListing { keys: Vec::with_capacity(stored.keys.len()), refused: Vec::new() };
        for bad in stored.unreadable {
            tracing::error!(key = %crate::bounded::text(&bad.key, 80), what = bad.what, "key row does not decode; the key is refused");
            out.refused.push(RefusedKey { key: bad.key, reason: format!("its stored row is corrupt: {}", bad.what) });
        }
        for s in stored.keys {
            let name = s.record.name.clone();
            match self.keyauth.verify(s).await {
                Ok(k) => out.keys.push(LoadedKey::new(k)),
                Err(crate::keyauth::KeyAuthError::Forged { .. }) => out.refused.push(RefusedKey {
                    key: name,
                    reason: "its metadata failed authentication: the store was changed outside the service".to_owned(),
                }),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }
}

/// What [`AppState::keys`] found: the keys whose rows authenticate, and those refused.
#[derive(Debug, Default)]
pub struct KeyListing {
    pub keys: Vec<LoadedKey>,
    pub refused: Vec<RefusedKey>,
}

/// A key whose row is refused (corrupt, or edited outside the service). Its name comes from an
/// unauthenticated row: it is only ever shown, never acted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedKey {
    pub key: String,
    pub reason: String,
}

impl AppState {
    /// The one wrapper every RPC goes through: runs the handler body with the request's audit facts
    /// in scope, makes the audit record durable (invariant 3: allowed or refused, before the
    /// answer leaves; `UNAVAILABLE` and no answer if it cannot), logs the outcome with the presented
    /// certificate identity and a request id, and maps an error to its status.
    pub async fn respond<Req, T, Fut>(
        &self,
        rpc: &'static str,
        key: Option<String>,
        request: Request<Req>,
        body: impl FnOnce(Request<Req>) -> Fut,
    ) -> Result<tonic::Response<T>, Status>
    where
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let rid = request_id();
        if let Some(marker) = request.extensions().get::<crate::audit::unrouted::Recorded>() {
            marker.set();
        }
        // The identity the certificate claims is recorded even when it is not trusted.
        let peer = crate::identity::presented(&request);
        // The one door: no handler runs for a connection whose certificate is not trusted.
        let trusted = crate::identity::from_request(&request).map(|_| ());
        let facts = RequestFacts {
            rpc,
            request_id: rid.clone(),
            caller: peer.as_ref().map(|p| p.uri.clone()).unwrap_or_default(),
            cert_fingerprint: peer.as_ref().map(|p| p.fingerprint.to_vec()).unwrap_or_default(),
            key: key.unwrap_or_default(),
            ..RequestFacts::default()
        };
        let (result, facts) = match trusted {
            Ok(()) => crate::audit::facts::scope(facts, body(request)).await,
            Err(e) => (Err(ApiError::Identity(e)), facts),
        };
        let (outcome, code, detail) = match &result {
            Ok(_) => (kms_audit::Outcome::Ok, 0, String::new()),
            Err(e) => {
                let status = e.to_status(&rid);
                let outcome = if e.is_fault() { kms_audit::Outcome::Failed } else { kms_audit::Outcome::Refused };
                (outcome, status.code() as i32, status.message().to_owned())
            }
        };
        let record = crate::audit::record(&facts, outcome, code, &detail);
        let result = match self.audit.append(record).await {
            Ok(_) => result,
            // The answer (a data key, a plaintext) is dropped, zeroised, unsent.
            Err(_) => Err(ApiError::AuditUnavailable),
        };
        let caller = crate::bounded::text(&facts.caller, crate::bounded::NAME);
        let key = crate::bounded::text(&facts.key, crate::bounded::NAME);
        let caller = (!caller.is_empty()).then_some(&*caller);
        let key = (!key.is_empty()).then_some(&*key);
        finish(rpc, &rid, caller, key, result)
    }
}

/// A short random id that ties a request's log lines to an error the caller sees.
pub fn request_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        return "unavailable".into();
    }
    crate::ids::hex(&b)
}

/// Logs the outcome of a request and turns an error into its status. Refusals are logged at info
/// and failures at error; a request that succeeded only at debug (`KMS_LOG=debug`): the audit
/// trail already holds every request, and a line per request would cost a busy server a write per
/// answer.
fn finish<T>(
    rpc: &'static str,
    request_id: &str,
    caller: Option<&str>,
    key: Option<&str>,
    result: Result<T, ApiError>,
) -> Result<tonic::Response<T>, Status> {
    let caller = caller.unwrap_or("-");
    let key = key.unwrap_or("-");
    match result {
        Ok(v) => {
            tracing::debug!(rpc, request_id, caller, key, outcome = "ok", "request");
            Ok(tonic::Response::new(v))
        }
        Err(e) => {
            let status = e.to_status(request_id);
            if e.is_fault() {
                tracing::error!(rpc, request_id, caller, key, error = %e, "request failed");
            } else {
                tracing::info!(rpc, request_id, caller, key, outcome = ?status.code(), reason = %status.message(), "request refused");
            }
            Err(status)
        }
    }
}

/// Validates a key name: 1-64 characters of `A-Z a-z 0-9 - _ . /`, starting with a letter or digit.
pub fn validate_key_name(name: &str) -> Result<(), ApiError> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > 64 {
        Some("must be at most 64 characters")
    } else if !name.as_bytes()[0].is_ascii_alphanumeric() {
        Some("must start with a letter or digit")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)) {
        Some("may contain only letters, digits and - _ . /")
    } else {
        None
    };
    match reason {
        Some(r) => Err(ApiError::invalid("name", r)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_are_validated() {
        for ok in ["a", "tax/records-2026", "A.b_c", &"x".repeat(64)] {
            assert!(validate_key_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "/a", "a b", "a\u{0}", "khóa", &"x".repeat(65)] {
            assert!(validate_key_name(bad).is_err(), "{bad:?}");
        }
    }
}
