//! Creation intents: the durable promise, written *before* an HSM key object is made, that names
//! the object's `CKA_ID` and the request that makes it. It is what lets start-up prove that an
//! object no row names is the debris of an operation the service never acknowledged (and so may
//! be destroyed), instead of guessing (invariant 9).
//!
//! Life of an intent: [`Store::record_intent`] (sealed by the HSM, `synchronous=FULL`) → the HSM
//! object is made → the row that names the object is committed, and the intent is deleted *in the
//! same transaction* ([`Store::insert_key`], [`Store::update_key`]). A failure after the object was
//! made destroys the object and then deletes the intent ([`Store::forget_intent`]). Whatever is left
//! (a crash in between) is judged at start-up.
//!
//! The table is hostile input like every other: an intent's MAC is checked before it is acted on,
//! and a row that does not decode is reported, never trusted. Must never hold key material.
#![forbid(unsafe_code)]

use super::db::{params, Conn, DbErrorKind, Row, ValueRef};

use super::records::RowMac;
use super::{Store, StoreError};
use crate::ids::{hex, KeyId, ObjectId};

/// An object about to be made: which key version, for which request, and where that request's
/// `begun` audit record is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntentRecord {
    /// The `CKA_ID` the object will have: `ObjectId::for_version(key_id, version)`.
    pub object_id: ObjectId,
    pub key_id: KeyId,
    pub version: u32,
    /// The request (or server task) that makes it; its audit records carry the same id.
    pub request_id: String,
    /// The sequence number of the request's `begun` audit record (0 when it has none): the
    /// outcome record, if the request was ever acknowledged, comes after it.
    pub audit_seq: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// The server that records it (`server.id`; empty for a store's only server): the one whose
    /// trail holds `audit_seq`, and the only one that may judge it.
    pub server: String,
}

/// An intent as read from the file: not yet authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredIntent {
    pub record: IntentRecord,
    pub mac: RowMac,
}

/// An intent row that does not decode (named by the hex of its object id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadableIntent {
    pub object: String,
    pub what: &'static str,
}

impl Store {
    /// Records, durably, that the object of `intent` is about to be made. Refuses a second intent
    /// for the same object ([`StoreError::InvalidRecord`]).
    pub fn record_intent(&self, intent: &IntentRecord, mac: &RowMac) -> Result<(), StoreError> {
        check(intent).map_err(|what| StoreError::InvalidRecord { key: format!("object {}", intent.object_id), what })?;
        let inserted = self.write("record intent", |tx| {
            tx.execute(
                "INSERT INTO object_intents (object_id, key_id, version, request_id, audit_seq, created_at, row_mac, server)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                &params![
                    intent.object_id.as_bytes(),
                    intent.key_id.0.as_slice(),
                    intent.version,
                    intent.request_id,
                    i64::try_from(intent.audit_seq).unwrap_or(i64::MAX),
                    intent.created_at,
                    mac.0.as_slice(),
                    intent.server,
                ],
            )
            .map_err(StoreError::db("record intent"))
        });
        match inserted {
            Ok(_) => Ok(()),
            Err(StoreError::Database { source, .. }) if source.kind == DbErrorKind::UniqueViolation => {
                Err(StoreError::InvalidRecord { key: format!("object {}", intent.object_id), what: "an intent for this object is already recorded" })
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes the intent of `object` (after the object was destroyed again, or judged at
    /// start-up). Deleting an intent that is not there is not an error.
    pub fn forget_intent(&self, object: &ObjectId) -> Result<(), StoreError> {
        self.write("delete intent", |tx| delete_intent(tx, object))
    }

    /// Every intent, in object-id order; rows that do not decode are listed apart.
    pub fn list_intents(&self) -> Result<(Vec<StoredIntent>, Vec<UnreadableIntent>), StoreError> {
        self.read("list intents", |conn| {
            let rows = conn
                .query("SELECT object_id, key_id, version, request_id, audit_seq, created_at, row_mac, server FROM object_intents ORDER BY object_id", &[])
                .map_err(StoreError::db("list intents"))?;
            let (mut good, mut bad) = (Vec::new(), Vec::new());
            for row in rows {
                match decode(&row) {
                    Ok(i) => good.push(i),
                    Err(u) => bad.push(u),
                }
            }
            Ok((good, bad))
        })
    }
}

/// Deletes the intent of `object` inside the caller's connection or transaction.
pub(super) fn delete_intent(conn: &mut dyn Conn, object: &ObjectId) -> Result<(), StoreError> {
    conn.execute("DELETE FROM object_intents WHERE object_id = ?1", &params![object.as_bytes()])
        .map_err(StoreError::db("delete intent"))?;
    Ok(())
}

fn check(i: &IntentRecord) -> Result<(), &'static str> {
    if i.version == 0 {
        return Err("version numbers start at 1");
    }
    if i.object_id != ObjectId::for_version(i.key_id, i.version) {
        return Err("the object id must be the key id followed by the version number");
    }
    if i.request_id.is_empty() || i.request_id.len() > 64 {
        return Err("the request id must be 1 to 64 bytes");
    }
    if i.server.len() > 64 {
        return Err("the server id is at most 64 bytes");
    }
    Ok(())
}

fn decode(row: &Row) -> Result<StoredIntent, UnreadableIntent> {
    let object = match row.get_ref(0) {
        Ok(ValueRef::Blob(b)) => hex(b),
        _ => "(unreadable object id)".to_owned(),
    };
    let bad = |what| UnreadableIntent { object: object.clone(), what };
    let raw = |i| row.get_ref(i).map_err(|_| bad("a column cannot be read"));
    let object_id = match raw(0)? {
        ValueRef::Blob(b) if b.len() == 20 => ObjectId(b.to_vec()),
        _ => return Err(bad("the object id is not 20 bytes")),
    };
    let key_id = match raw(1)? {
        ValueRef::Blob(b) => KeyId(b.try_into().map_err(|_| bad("the key id is not 16 bytes"))?),
        _ => return Err(bad("the key id is not a blob")),
    };
    let int = |v: ValueRef<'_>, what| match v {
        ValueRef::Integer(i) => Ok(i),
        _ => Err(bad(what)),
    };
    let version = u32::try_from(int(raw(2)?, "the version is not an integer")?).map_err(|_| bad("the version is out of range"))?;
    let request_id = match raw(3)? {
        ValueRef::Text(t) => std::str::from_utf8(t).map(str::to_owned).map_err(|_| bad("the request id is not UTF-8"))?,
        _ => return Err(bad("the request id is not text")),
    };
    let audit_seq = u64::try_from(int(raw(4)?, "the audit sequence number is not an integer")?)
        .map_err(|_| bad("the audit sequence number is negative"))?;
    let created_at = int(raw(5)?, "the creation time is not an integer")?;
    let mac = match raw(6)? {
        ValueRef::Blob(b) => RowMac(b.try_into().map_err(|_| bad("the MAC is not 32 bytes"))?),
        _ => return Err(bad("the MAC is not a blob")),
    };
    let server = match raw(7)? {
        ValueRef::Text(t) => std::str::from_utf8(t).map(str::to_owned).map_err(|_| bad("the server is not UTF-8"))?,
        _ => return Err(bad("the server is not text")),
    };
    let record = IntentRecord { object_id, key_id, version, request_id, audit_seq, created_at, server };
    check(&record).map_err(bad)?;
    Ok(StoredIntent { record, mac })
}
