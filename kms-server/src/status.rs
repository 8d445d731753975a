//! The one mapping from the server's errors to gRPC statuses.
//!
//! | error | status |
//! |---|---|
//! | unknown caller, no usable client certificate | `UNAUTHENTICATED` |
//! | role, system level or clearance too low | `PERMISSION_DENIED` |
//! | level rule (release, token approval, TOP_SECRET network), wrong purpose, key or version state | `FAILED_PRECONDITION` |
//! | malformed or tampered blob, wrong context, blob for another key, bad field | `INVALID_ARGUMENT` |
//! | unknown key | `NOT_FOUND` |
//! | duplicate key name | `ALREADY_EXISTS` |
//! | HSM worker pool closed | `UNAVAILABLE` |
//! | key row whose MAC does not verify (edited outside the service) | `DATA_LOSS` |
//! | key changed by another request in between | `ABORTED` (retry) |
//! | a rule whose mechanism is not built yet (two-officer approval) | `UNIMPLEMENTED` |
//! | anything else from the HSM or the store | `INTERNAL`, with details only in the server log |
//!
//! Messages name the rule or the field; they never carry key bytes, PINs or the encryption context.
//! Internal details (PKCS#11 function and CKR code, SQLite error) are logged with the request id and
//! the caller sees only the request id.
#![forbid(unsafe_code)]

use tonic::{Code, Status};

use crate::authz::{Denied, DeniedClass};
use crate::blob::BlobError;
use crate::context::ContextError;
use crate::hsm::HsmError;
use crate::identity::IdentityError;
use crate::recipient::RecipientError;
use crate::store::StoreError;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("a key named {0} already exists")]
    AlreadyExists(String),
    /// Something other than a key already exists; the message names it.
    #[error("{0}")]
    Exists(String),
    #[error("invalid blob: {0}")]
    Blob(#[from] BlobError),
    #[error("invalid encryption_context: {0}")]
    Context(#[from] ContextError),
    #[error("recipient key: {0}")]
    Recipient(#[from] RecipientError),
    #[error("the blob belongs to a different key than {named}")]
    BlobForAnotherKey { named: String },
    #[error("the blob's classification {in_blob} does not match its key's {of_key}")]
    BlobLevelMismatch { in_blob: crate::classification::Classification, of_key: crate::classification::Classification },
    #[error(transparent)]
    Hsm(#[from] HsmError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    KeyAuth(#[from] crate::keyauth::KeyAuthError),
    /// A part of the API that this build does not implement yet; the message says which.
    #[error("{0}")]
    NotBuilt(&'static str),
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The audit record of the request could not be made durable: nothing was done.
    #[error("the audit trail cannot be written")]
    AuditUnavailable,
}

impl From<crate::audit::AuditError> for ApiError {
    fn from(e: crate::audit::AuditError) -> ApiError {
        match e {
            crate::audit::AuditError::Unavailable => ApiError::AuditUnavailable,
            _ => ApiError::Internal("the audit trail cannot be read"),
        }
    }
}

impl ApiError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> ApiError {
        ApiError::InvalidArgument { field, reason: reason.into() }
    }

    /// The status for this error. `request_id` is quoted in internal errors so that an operator can
    /// find the logged details. The message is bounded (`crate::bounded::MESSAGE`): a name or value
    /// a caller sent is never echoed at any length (gRPC also limits the size of its metadata).
    pub fn to_status(&self, request_id: &str) -> Status {
        let status = self.unbounded_status(request_id);
        match crate::bounded::text(status.message(), crate::bounded::MESSAGE) {
            std::borrow::Cow::Borrowed(_) => status,
            std::borrow::Cow::Owned(short) => Status::new(status.code(), short),
        }
    }

    fn unbounded_status(&self, request_id: &str) -> Status {
        match self {
            ApiError::Denied(d) => {
                let code = match d.class() {
                    DeniedClass::Unauthenticated => Code::Unauthenticated,
                    DeniedClass::PermissionDenied => Code::PermissionDenied,
                    DeniedClass::FailedPrecondition => Code::FailedPrecondition,
                };
                Status::new(code, d.to_string())
            }
            ApiError::Identity(e) => Status::unauthenticated(e.to_string()),
            ApiError::InvalidArgument { .. }
            | ApiError::Blob(_)
            | ApiError::Context(_)
            | ApiError::Recipient(_)
            | ApiError::BlobForAnotherKey { .. }
            | ApiError::BlobLevelMismatch { .. } => Status::invalid_argument(self.to_string()),
            ApiError::NotFound(m) => Status::not_found(m.clone()),
            ApiError::AlreadyExists(_) | ApiError::Exists(_) => Status::already_exists(self.to_string()),
            ApiError::Hsm(e) => hsm_status(e, request_id),
            ApiError::Store(StoreError::DuplicateName { name }) => {
                Status::already_exists(format!("a key named {name} already exists"))
            }
            ApiError::Store(StoreError::Conflict { key }) => {
                Status::aborted(format!("key {key} was changed by another request; retry"))
            }
            ApiError::Precondition(m) => Status::failed_precondition(m.clone()),
            ApiError::NotBuilt(m) => Status::unimplemented(*m),
            ApiError::AuditUnavailable => Status::unavailable(format!(
                "the audit trail cannot be written, so nothing was done (request {request_id}); retry later"
            )),
            // Names the key and the broken rule, never a value.
            ApiError::Store(StoreError::CorruptRow { .. }) => Status::data_loss(self.to_string()),
            ApiError::KeyAuth(crate::keyauth::KeyAuthError::Forged { .. })
            | ApiError::KeyAuth(crate::keyauth::KeyAuthError::ForgedApproval { .. })
            | ApiError::KeyAuth(crate::keyauth::KeyAuthError::ForgedCaller { .. })
            | ApiError::KeyAuth(crate::keyauth::KeyAuthError::ForgedIntent { .. })
            | ApiError::KeyAuth(crate::keyauth::KeyAuthError::ForgedIdempotency)
            | ApiError::KeyAuth(crate::keyauth::KeyAuthError::ForgedAnchor)
            | ApiError::KeyAuth(crate::keyauth::KeyAuthError::ForgedLabel { .. }) => Status::data_loss(self.to_string()),
            ApiError::KeyAuth(crate::keyauth::KeyAuthError::Hsm(e)) => hsm_status(e, request_id),
            ApiError::Store(e) if e.is_unavailable() => Status::unavailable(format!(
                "the key store cannot be reached; nothing was done, retry shortly (request {request_id})"
            )),
            ApiError::Store(e) if e.is_contention() => Status::aborted(format!(
                "the key store was busy with a conflicting change; nothing was done, retry (request {request_id})"
            )),
            ApiError::Store(_) | ApiError::Internal(_) => {
                Status::internal(format!("internal error (request {request_id}; details in the server log)"))
            }
        }
    }

    /// Whether the details belong in the server log at error level (faults, not refusals).
    pub fn is_fault(&self) -> bool {
        match self {
            ApiError::Hsm(HsmError::IntegrityCheckFailed)
            | ApiError::Hsm(HsmError::NotApproved { .. })
            | ApiError::Hsm(HsmError::ReleaseForbidden { .. }) => false,
            ApiError::Hsm(_) | ApiError::Internal(_) | ApiError::AuditUnavailable => true,
            ApiError::Store(StoreError::DuplicateName { .. }) | ApiError::Store(StoreError::Conflict { .. }) => false,
            ApiError::KeyAuth(_) | ApiError::Store(StoreError::CorruptRow { .. }) => true,
            ApiError::Store(_) => true,
            _ => false,
        }
    }
}

fn hsm_status(e: &HsmError, request_id: &str) -> Status {
    match e {
        HsmError::IntegrityCheckFailed => Status::invalid_argument(
            "blob failed authentication: it was altered, or its key, version, classification or \
             encryption context differs from the one it was made with",
        ),
        HsmError::NotApproved { .. } | HsmError::ReleaseForbidden { .. } => {
            Status::failed_precondition(e.to_string())
        }
        HsmError::PoolClosed => Status::unavailable("the HSM is shutting down"),
        HsmError::Unavailable { .. } | HsmError::Timeout { .. } => {
            Status::unavailable(format!("{e}; nothing was done, retry shortly (request {request_id})"))
        }
        _ if e.is_connection_loss() => Status::unavailable(format!(
            "the HSM is unreachable ({e}); nothing was done, retry shortly (request {request_id})"
        )),
        _ => Status::internal(format!("HSM operation failed (request {request_id}; details in the server log)")),
    }
}
