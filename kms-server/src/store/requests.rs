//! Two-officer requests about something other than a key row: registering a caller with the officer
//! or auditor role, granting such a role or raising a clearance, revoking an officer or auditor, and
//! destroying a token object that no key version names. (Key changes have their own table,
//! [`super::approvals`], whose rows are tied to a key row.)
//!
//! A request carries what it would do: the proposed registration (as the `kms.v1.Caller` protobuf
//! encoding, validated again when it is approved), the caller's revision it was based on (a request
//! outdated by another change is refused, not applied), and the level a deciding officer must be
//! cleared for. Rows are sealed by the HSM like every other (`crate::keyauth`), and decoded column
//! by column. Must never hold key material.
#![forbid(unsafe_code)]

use super::db::{params, Conn, Row, ValueRef};

use super::approvals::{ApprovalId, ApprovalState};
use super::records::RowMac;
use super::{Store, StoreError};
use crate::classification::Classification;
use crate::ids::hex;

stored_text_enum! {
    /// What a request would do.
    pub enum RequestKind {
        RegisterCaller => "REGISTER_CALLER",
        UpdateCaller => "UPDATE_CALLER",
        RevokeCaller => "REVOKE_CALLER",
        DestroyObject => "DESTROY_UNKNOWN_OBJECT",
    }
}

/// One request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub id: ApprovalId,
    pub kind: RequestKind,
    /// The caller's identity, or the object's hex `CKA_ID`.
    pub subject: String,
    /// The proposed registration (register, update); empty otherwise.
    pub payload: Vec<u8>,
    /// The caller's revision the request was made against (update, revoke); 0 otherwise.
    pub base_revision: u64,
    /// The level a deciding officer must be cleared for.
    pub level: Classification,
    pub requested_by: String,
    pub requested_at: i64,
    pub expires_at: i64,
    pub state: ApprovalState,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
}

/// A request row as read from the file, not yet authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRequest {
    pub record: RequestRecord,
    pub mac: RowMac,
}

const COLUMNS: &str = "id, kind, subject, payload, base_revision, level, requested_by, requested_at, expires_at, state, \
                       decided_by, decided_at, row_mac";

/// The largest proposed registration a request may carry.
const MAX_PAYLOAD: usize = 64 * 1024;

impl Store {
    pub fn insert_request(&self, r: &RequestRecord, mac: &RowMac) -> Result<(), StoreError> {
        check(r).map_err(|what| StoreError::InvalidRecord { key: format!("request {}", r.id), what })?;
        self.write("insert request", |tx| {
            tx.execute(
                &format!("INSERT INTO requests ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                &params![
                    r.id.0.as_slice(),
                    r.kind.as_str(),
                    r.subject,
                    r.payload,
                    i64::try_from(r.base_revision).unwrap_or(i64::MAX),
                    r.level.to_byte(),
                    r.requested_by,
                    r.requested_at,
                    r.expires_at,
                    r.state.as_str(),
                    r.decided_by,
                    r.decided_at,
                    mac.0.as_slice(),
                ],
            )
            .map_err(StoreError::db("insert request"))?;
            Ok(())
        })
    }

    pub fn request_by_id(&self, id: ApprovalId) -> Result<Option<StoredRequest>, StoreError> {
        self.read("read request", |conn| {
            conn.query_opt(&format!("SELECT {COLUMNS} FROM requests WHERE id = ?1"), &params![id.0.as_slice()])
                .map_err(StoreError::db("read request"))?
                .map(|r| decode(&r))
                .transpose()
        })
    }

    /// The PENDING request of this kind for this subject, if one was filed (expired or not).
    pub fn pending_request_for(&self, kind: RequestKind, subject: &str) -> Result<Option<StoredRequest>, StoreError> {
        self.read("read pending request", |conn| {
            conn.query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM requests WHERE kind = ?1 AND subject = ?2 AND state = 'PENDING'
                     ORDER BY requested_at DESC LIMIT 1"
                ),
                &params![kind.as_str(), subject],
            )
            .map_err(StoreError::db("read pending request"))?
            .map(|r| decode(&r))
            .transpose()
        })
    }

    /// PENDING requests (oldest first), or all (newest first); at most `limit`.
    pub fn list_requests(&self, include_decided: bool, limit: u32) -> Result<Vec<StoredRequest>, StoreError> {
        let sql = if include_decided {
            format!("SELECT {COLUMNS} FROM requests ORDER BY requested_at DESC, id LIMIT ?1")
        } else {
            format!("SELECT {COLUMNS} FROM requests WHERE state = 'PENDING' ORDER BY requested_at, id LIMIT ?1")
        };
        self.read("list requests", |conn| {
            conn.query(&sql, &params![limit]).map_err(StoreError::db("list requests"))?.iter().map(decode).collect()
        })
    }

    /// Records a decision on a request that is still PENDING; [`StoreError::Conflict`] if someone
    /// decided it first.
    pub fn decide_request(&self, r: &RequestRecord, mac: &RowMac) -> Result<(), StoreError> {
        self.write("decide request", |tx| decide_request_in(tx, r, mac))
    }
}

/// [`Store::decide_request`] inside the caller's transaction.
pub(super) fn decide_request_in(conn: &mut dyn Conn, r: &RequestRecord, mac: &RowMac) -> Result<(), StoreError> {
    check(r).map_err(|what| StoreError::InvalidRecord { key: format!("request {}", r.id), what })?;
    if r.state == ApprovalState::Pending {
        return Err(StoreError::InvalidRecord { key: format!("request {}", r.id), what: "a decision must leave PENDING" });
    }
    let changed = conn
        .execute(
            "UPDATE requests SET state = ?2, decided_by = ?3, decided_at = ?4, row_mac = ?5
             WHERE id = ?1 AND state = 'PENDING' AND kind = ?6 AND subject = ?7 AND requested_by = ?8",
            &params![
                r.id.0.as_slice(),
                r.state.as_str(),
                r.decided_by,
                r.decided_at,
                mac.0.as_slice(),
                r.kind.as_str(),
                r.subject,
                r.requested_by,
            ],
        )
        .map_err(StoreError::db("decide request"))?;
    if changed != 1 {
        return Err(StoreError::Conflict { key: format!("request {}", r.id) });
    }
    Ok(())
}

fn check(r: &RequestRecord) -> Result<(), &'static str> {
    if r.subject.is_empty() || r.subject.len() > 512 {
        return Err("the subject must be 1 to 512 bytes");
    }
    if r.payload.len() > MAX_PAYLOAD {
        return Err("the proposed change is too large");
    }
    if r.requested_by.is_empty() {
        return Err("the requester is empty");
    }
    if r.expires_at <= r.requested_at {
        return Err("a request must expire after it was made");
    }
    match r.state {
        ApprovalState::Pending if r.decided_by.is_some() || r.decided_at.is_some() => Err("a PENDING request has no decision"),
        ApprovalState::Approved | ApprovalState::Rejected if r.decided_by.is_none() || r.decided_at.is_none() => {
            Err("a decided request names its officer and time")
        }
        ApprovalState::Expired if r.decided_by.is_some() || r.decided_at.is_none() => {
            Err("an EXPIRED request has a time and no officer")
        }
        _ => Ok(()),
    }
}

fn decode(row: &Row) -> Result<StoredRequest, StoreError> {
    let raw = |i| row.get_ref(i).map_err(StoreError::db("read request column"));
    let label = match raw(0)? {
        ValueRef::Blob(b) => format!("request {}", hex(b)),
        _ => "request (unreadable id)".to_owned(),
    };
    let corrupt = |what| StoreError::CorruptRow { key: label.clone(), what };
    let text = |v: ValueRef<'_>| match v {
        ValueRef::Text(t) => std::str::from_utf8(t).ok().map(str::to_owned),
        _ => None,
    };
    let int = |v: ValueRef<'_>| match v {
        ValueRef::Integer(i) => Some(i),
        _ => None,
    };
    let id = match raw(0)? {
        ValueRef::Blob(b) => ApprovalId(<[u8; 16]>::try_from(b).map_err(|_| corrupt("id is not 16 bytes"))?),
        _ => return Err(corrupt("id is not a blob")),
    };
    let kind = text(raw(1)?).as_deref().and_then(RequestKind::parse).ok_or_else(|| corrupt("unknown kind"))?;
    let subject = text(raw(2)?).ok_or_else(|| corrupt("subject is not text"))?;
    let payload = match raw(3)? {
        ValueRef::Blob(b) => b.to_vec(),
        _ => return Err(corrupt("payload is not a blob")),
    };
    let base_revision =
        int(raw(4)?).and_then(|v| u64::try_from(v).ok()).ok_or_else(|| corrupt("base revision out of range"))?;
    let level = int(raw(5)?)
        .and_then(|v| u8::try_from(v).ok())
        .and_then(Classification::from_byte)
        .ok_or_else(|| corrupt("unknown level"))?;
    let requested_by = text(raw(6)?).ok_or_else(|| corrupt("requester is not text"))?;
    let requested_at = int(raw(7)?).ok_or_else(|| corrupt("request time is not an integer"))?;
    let expires_at = int(raw(8)?).ok_or_else(|| corrupt("expiry time is not an integer"))?;
    let state = text(raw(9)?).as_deref().and_then(ApprovalState::parse).ok_or_else(|| corrupt("unknown state"))?;
    let decided_by = match raw(10)? {
        ValueRef::Null => None,
        v => Some(text(v).ok_or_else(|| corrupt("decider is not text"))?),
    };
    let decided_at = match raw(11)? {
        ValueRef::Null => None,
        v => Some(int(v).ok_or_else(|| corrupt("decision time is not an integer"))?),
    };
    let mac = match raw(12)? {
        ValueRef::Blob(b) => RowMac(b.try_into().map_err(|_| corrupt("metadata MAC is not 32 bytes"))?),
        _ => return Err(corrupt("metadata MAC is not a blob")),
    };
    let record = RequestRecord {
        id,
        kind,
        subject,
        payload,
        base_revision,
        level,
        requested_by,
        requested_at,
        expires_at,
        state,
        decided_by,
        decided_at,
    };
    check(&record).map_err(corrupt)?;
    Ok(StoredRequest { record, mac })
}
