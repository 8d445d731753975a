//! Idempotent key creation: the record that a caller's request with an idempotency key made a key,
//! written in the same transaction as the key row (so a creation is recorded exactly when it
//! happened), sealed by the HSM like every row, decoded column by column. A retry of the same
//! request (same caller, same idempotency key, same fields: `request_hash`) is answered with the
//! key it made; another request under the same idempotency key is refused.
#![forbid(unsafe_code)]

use super::db::{params, Row, ValueRef};
use super::records::{KeyRecord, RowMac};
use super::{Store, StoreError};
use crate::ids::KeyId;

/// The longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 64;

/// What one idempotent request did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The caller's identity (each caller has its own idempotency keys).
    pub caller: String,
    pub idem_key: String,
    /// The RPC (`CreateKey`).
    pub rpc: String,
    /// SHA-256 of the request's fields (without the idempotency key).
    pub request_hash: [u8; 32],
    /// The key it made.
    pub key_id: KeyId,
    /// Unix seconds.
    pub created_at: i64,
}

/// A record as read back, not yet authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredIdempotency {
    pub record: IdempotencyRecord,
    pub mac: RowMac,
}

impl Store {
    /// Inserts `key` (as [`Store::insert_key`]) and the record of the idempotent request that made
    /// it, in one transaction. A record already there for this caller and key makes it fail with
    /// [`StoreError::DuplicateName`] naming the idempotency key (nothing is written).
    pub fn insert_key_idempotent(
        &self,
        key: &KeyRecord,
        mac: &RowMac,
        idem: &IdempotencyRecord,
        idem_mac: &RowMac,
    ) -> Result<(), StoreError> {
        check(idem).map_err(|what| StoreError::InvalidRecord { key: key.name.clone(), what })?;
        self.insert_key_then(key, mac, |tx| {
            let inserted = tx.execute(
                "INSERT INTO idempotency (caller, idem_key, rpc, request_hash, key_id, created_at, row_mac)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                &params![
                    idem.caller,
                    idem.idem_key,
                    idem.rpc,
                    idem.request_hash.as_slice(),
                    idem.key_id.0.as_slice(),
                    idem.created_at,
                    idem_mac.0.as_slice()
                ],
            );
            match inserted {
                Ok(_) => Ok(()),
                Err(e) if e.kind == super::db::DbErrorKind::UniqueViolation => {
                    Err(StoreError::DuplicateName { name: format!("idempotency key {}", idem.idem_key) })
                }
                Err(e) => Err(StoreError::db("record idempotent request")(e)),
            }
        })
    }

    /// The record of `caller`'s request under `idem_key`, if one was made.
    pub fn idempotency_record(&self, caller: &str, idem_key: &str) -> Result<Option<StoredIdempotency>, StoreError> {
        self.read("read idempotent request", |conn| {
            conn.query_opt(
                "SELECT caller, idem_key, rpc, request_hash, key_id, created_at, row_mac FROM idempotency
                 WHERE caller = ?1 AND idem_key = ?2",
                &params![caller, idem_key],
            )
            .map_err(StoreError::db("read idempotent request"))?
            .map(|r| decode(&r))
            .transpose()
        })
    }
}

fn check(r: &IdempotencyRecord) -> Result<(), &'static str> {
    if r.idem_key.is_empty() || r.idem_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err("an idempotency key is 1 to 64 bytes");
    }
    if r.caller.is_empty() || r.caller.len() > 512 || r.rpc.is_empty() || r.rpc.len() > 64 {
        return Err("the caller or the RPC of an idempotent request is out of bounds");
    }
    Ok(())
}

fn decode(row: &Row) -> Result<StoredIdempotency, StoreError> {
    let corrupt = |what| StoreError::CorruptRow { key: "idempotent request".into(), what };
    let raw = |i| row.get_ref(i).map_err(StoreError::db("read idempotent request column"));
    let text = |v: ValueRef<'_>, what| match v {
        ValueRef::Text(t) => std::str::from_utf8(t).map(str::to_owned).map_err(|_| corrupt(what)),
        _ => Err(corrupt(what)),
    };
    let caller = text(raw(0)?, "the caller is not text")?;
    let idem_key = text(raw(1)?, "the idempotency key is not text")?;
    let rpc = text(raw(2)?, "the RPC is not text")?;
    let request_hash: [u8; 32] = match raw(3)? {
        ValueRef::Blob(b) => b.try_into().map_err(|_| corrupt("the request hash is not 32 bytes"))?,
        _ => return Err(corrupt("the request hash is not a blob")),
    };
    let key_id = match raw(4)? {
        ValueRef::Blob(b) => KeyId(b.try_into().map_err(|_| corrupt("the key id is not 16 bytes"))?),
        _ => return Err(corrupt("the key id is not a blob")),
    };
    let created_at = match raw(5)? {
        ValueRef::Integer(i) => i,
        _ => return Err(corrupt("the creation time is not an integer")),
    };
    let mac = match raw(6)? {
        ValueRef::Blob(b) => RowMac(b.try_into().map_err(|_| corrupt("the MAC is not 32 bytes"))?),
        _ => return Err(corrupt("the MAC is not a blob")),
    };
    let record = IdempotencyRecord { caller, idem_key, rpc, request_hash, key_id, created_at };
    check(&record).map_err(corrupt)?;
    Ok(StoredIdempotency { record, mac })
}
