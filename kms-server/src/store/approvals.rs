//! Two-officer approval requests: the table, its domain types, and the decoding of every column.
//!
//! Like key rows, approval rows carry a MAC computed inside the HSM (see `crate::keyauth`), which
//! this module stores but never checks. A decision that changes a key is written in the same
//! transaction as the key row ([`Store::update_key_with_approval`]), so an approved change and its
//! approval are either both durable or neither.
#![forbid(unsafe_code)]

use std::fmt;

use super::db::{params, Conn, Row, ValueRef};

use super::keys::update_key_in;
use super::records::{KeyRecord, RowMac};
use super::{Store, StoreError};
use crate::ids::{hex, KeyId};

/// The 16-byte random id of an approval request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApprovalId(pub [u8; 16]);

impl ApprovalId {
    pub fn random() -> Result<ApprovalId, getrandom::Error> {
        let mut b = [0u8; 16];
        getrandom::getrandom(&mut b)?;
        Ok(ApprovalId(b))
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 32 lowercase or uppercase hex digits.
    pub fn from_hex(s: &str) -> Option<ApprovalId> {
        crate::ids::KeyId::from_hex(s).map(|k| ApprovalId(k.0))
    }
}

impl fmt::Display for ApprovalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ApprovalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApprovalId({})", self.to_hex())
    }
}

stored_text_enum! {
    /// The change an approval request stands for.
    pub enum ApprovalAction {
        RotateKey => "ROTATE_KEY",
        DisableKey => "DISABLE_KEY",
        DestroyKey => "DESTROY_KEY",
        DisableVersion => "DISABLE_VERSION",
        DestroyVersion => "DESTROY_VERSION",
        /// Re-enabling, at a level whose disabling needs two officers.
        EnableKey => "ENABLE_KEY",
        EnableVersion => "ENABLE_VERSION",
    }
}

impl ApprovalAction {
    /// Whether the action names a single version (otherwise the whole key).
    pub fn is_version_action(self) -> bool {
        matches!(self, ApprovalAction::DisableVersion | ApprovalAction::DestroyVersion | ApprovalAction::EnableVersion)
    }
}

stored_text_enum! {
    /// Where an approval request stands.
    pub enum ApprovalState {
        Pending => "PENDING",
        Approved => "APPROVED",
        Rejected => "REJECTED",
        Expired => "EXPIRED",
    }
}

/// One approval request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRecord {
    pub id: ApprovalId,
    pub key_id: KeyId,
    pub action: ApprovalAction,
    /// The version for version actions; 0 for key actions.
    pub version: u32,
    /// Certificate identity of the requesting officer.
    pub requested_by: String,
    pub requested_at: i64,
    pub expires_at: i64,
    pub state: ApprovalState,
    /// The deciding officer (APPROVED, REJECTED); `None` while PENDING and for EXPIRED.
    pub decided_by: Option<String>,
    /// When it was decided or found expired; `None` while PENDING.
    pub decided_at: Option<i64>,
}

/// An approval row as read from the file, not yet authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredApproval {
    pub record: ApprovalRecord,
    pub mac: RowMac,
}

const COLUMNS: &str =
    "id, key_id, action, version, requested_by, requested_at, expires_at, state, decided_by, decided_at, row_mac";

/// The most rows one listing returns.
pub const LIST_LIMIT: u32 = 500;

impl Store {
    /// Files a new request.
    pub fn insert_approval(&self, a: &ApprovalRecord, mac: &RowMac) -> Result<(), StoreError> {
        check(a).map_err(|what| StoreError::InvalidRecord { key: a.id.to_hex(), what })?;
        self.write("insert approval", |tx| {
            tx.execute(
                &format!("INSERT INTO approvals ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
                &params![
                    a.id.0.as_slice(),
                    a.key_id.0.as_slice(),
                    a.action.as_str(),
                    a.version,
                    a.requested_by,
                    a.requested_at,
                    a.expires_at,
                    a.state.as_str(),
                    a.decided_by,
                    a.decided_at,
                    mac.0.as_slice(),
                ],
            )
            .map_err(StoreError::db("insert approval"))?;
            Ok(())
        })
    }

    pub fn approval_by_id(&self, id: ApprovalId) -> Result<Option<StoredApproval>, StoreError> {
        self.read("read approval", |conn| {
            conn.query_opt(&format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"), &params![id.0.as_slice()])
                .map_err(StoreError::db("read approval"))?
                .map(|r| decode(&r))
                .transpose()
        })
    }

    /// The PENDING request for this change of this key, if one was filed (whether or not expired).
    pub fn pending_approval_for(
        &self,
        key_id: KeyId,
        action: ApprovalAction,
        version: u32,
    ) -> Result<Option<StoredApproval>, StoreError> {
        self.read("read pending approval", |conn| {
            conn.query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM approvals
                     WHERE key_id = ?1 AND action = ?2 AND version = ?3 AND state = 'PENDING'
                     ORDER BY requested_at DESC LIMIT 1"
                ),
                &params![key_id.0.as_slice(), action.as_str(), version],
            )
            .map_err(StoreError::db("read pending approval"))?
            .map(|r| decode(&r))
            .transpose()
        })
    }

    /// PENDING requests (oldest first), or all requests (newest first); at most [`LIST_LIMIT`].
    pub fn list_approvals(&self, include_decided: bool) -> Result<Vec<StoredApproval>, StoreError> {
        let sql = if include_decided {
            format!("SELECT {COLUMNS} FROM approvals ORDER BY requested_at DESC, id LIMIT {LIST_LIMIT}")
        } else {
            format!(
                "SELECT {COLUMNS} FROM approvals WHERE state = 'PENDING' ORDER BY requested_at, id LIMIT {LIST_LIMIT}"
            )
        };
        self.read("list approvals", |conn| {
            conn.query(&sql, &[]).map_err(StoreError::db("list approvals"))?.iter().map(decode).collect()
        })
    }

    /// Records a decision (REJECTED, EXPIRED) on a request that is still PENDING;
    /// [`StoreError::Conflict`] if someone decided it first.
    pub fn decide_approval(&self, a: &ApprovalRecord, mac: &RowMac) -> Result<(), StoreError> {
        self.write("decide approval", |tx| decide_in(tx, a, mac))
    }

    /// Writes an approved change: the key row (as [`Store::update_key`]) and the APPROVED request,
    /// in one transaction.
    pub fn update_key_with_approval(
        &self,
        key: &KeyRecord,
        key_mac: &RowMac,
        expected_revision: u64,
        approval: &ApprovalRecord,
        approval_mac: &RowMac,
    ) -> Result<(), StoreError> {
        self.write_keys("approved change", |tx| {
            update_key_in(tx, key, key_mac, expected_revision)?;
            decide_in(tx, approval, approval_mac)
        })
    }
}

fn decide_in(conn: &mut dyn Conn, a: &ApprovalRecord, mac: &RowMac) -> Result<(), StoreError> {
    check(a).map_err(|what| StoreError::InvalidRecord { key: a.id.to_hex(), what })?;
    if a.state == ApprovalState::Pending {
        return Err(StoreError::InvalidRecord { key: a.id.to_hex(), what: "a decision must leave PENDING" });
    }
    let changed = conn
        .execute(
            "UPDATE approvals SET state = ?2, decided_by = ?3, decided_at = ?4, row_mac = ?5
             WHERE id = ?1 AND state = 'PENDING' AND key_id = ?6 AND action = ?7 AND version = ?8
               AND requested_by = ?9 AND requested_at = ?10 AND expires_at = ?11",
            &params![
                a.id.0.as_slice(),
                a.state.as_str(),
                a.decided_by,
                a.decided_at,
                mac.0.as_slice(),
                a.key_id.0.as_slice(),
                a.action.as_str(),
                a.version,
                a.requested_by,
                a.requested_at,
                a.expires_at,
            ],
        )
        .map_err(StoreError::db("decide approval"))?;
    if changed != 1 {
        return Err(StoreError::Conflict { key: format!("approval request {}", a.id) });
    }
    Ok(())
}

/// The rules every approval row keeps, on writing and on reading.
fn check(a: &ApprovalRecord) -> Result<(), &'static str> {
    if a.action.is_version_action() != (a.version != 0) {
        return Err("a version is named exactly for version actions");
    }
    if a.requested_by.is_empty() {
        return Err("the requester is empty");
    }
    if a.expires_at <= a.requested_at {
        return Err("a request must expire after it was made");
    }
    match a.state {
        ApprovalState::Pending if a.decided_by.is_some() || a.decided_at.is_some() => {
            Err("a PENDING request has no decision")
        }
        ApprovalState::Approved | ApprovalState::Rejected if a.decided_by.is_none() || a.decided_at.is_none() => {
            Err("a decided request names its officer and time")
        }
        ApprovalState::Expired if a.decided_by.is_some() || a.decided_at.is_none() => {
            Err("an EXPIRED request has a time and no officer")
        }
        _ => Ok(()),
    }
}

fn decode(row: &Row) -> Result<StoredApproval, StoreError> {
    let raw = |i| row.get_ref(i).map_err(StoreError::db("read approval column"));
    let label = match raw(0)? {
        ValueRef::Blob(b) => format!("approval request {}", hex(b)),
        _ => "approval request (unreadable id)".to_owned(),
    };
    let corrupt = |what| StoreError::CorruptRow { key: label.clone(), what };
    let bytes16 = |v: ValueRef<'_>, what| match v {
        ValueRef::Blob(b) => <[u8; 16]>::try_from(b).map_err(|_| corrupt(what)),
        _ => Err(corrupt(what)),
    };
    let text = |v: ValueRef<'_>| match v {
        ValueRef::Text(t) => std::str::from_utf8(t).ok().map(str::to_owned),
        _ => None,
    };
    let int = |v: ValueRef<'_>| match v {
        ValueRef::Integer(i) => Some(i),
        _ => None,
    };
    let id = ApprovalId(bytes16(raw(0)?, "id is not 16 bytes")?);
    let key_id = KeyId(bytes16(raw(1)?, "key id is not 16 bytes")?);
    let action = text(raw(2)?).as_deref().and_then(ApprovalAction::parse).ok_or_else(|| corrupt("unknown action"))?;
    let version = int(raw(3)?).and_then(|v| u32::try_from(v).ok()).ok_or_else(|| corrupt("version out of range"))?;
    let requested_by = text(raw(4)?).ok_or_else(|| corrupt("requester is not text"))?;
    let requested_at = int(raw(5)?).ok_or_else(|| corrupt("request time is not an integer"))?;
    let expires_at = int(raw(6)?).ok_or_else(|| corrupt("expiry time is not an integer"))?;
    let state = text(raw(7)?).as_deref().and_then(ApprovalState::parse).ok_or_else(|| corrupt("unknown state"))?;
    let decided_by = match raw(8)? {
        ValueRef::Null => None,
        v => Some(text(v).ok_or_else(|| corrupt("decider is not text"))?),
    };
    let decided_at = match raw(9)? {
        ValueRef::Null => None,
        v => Some(int(v).ok_or_else(|| corrupt("decision time is not an integer"))?),
    };
    let mac = match raw(10)? {
        ValueRef::Blob(b) => RowMac(b.try_into().map_err(|_| corrupt("metadata MAC is not 32 bytes"))?),
        _ => return Err(corrupt("metadata MAC is not a blob")),
    };
    let record = ApprovalRecord {
        id,
        key_id,
        action,
        version,
        requested_by,
        requested_at,
        expires_at,
        state,
        decided_by,
        decided_at,
    };
    check(&record).map_err(corrupt)?;
    Ok(StoredApproval { record, mac })
}
