//! Reading and writing keys and their versions, and the decoding of every column read back.
//!
//! The database is hostile input: a row is decoded column by column from its raw SQLite value, and
//! anything unexpected (a wrong type, an unknown level, purpose or state, an id of the wrong length,
//! a version out of range, a version whose `CKA_ID` is not the one its key and number imply, a
//! primary version that is not among the versions) is a [`StoreError::CorruptRow`] naming the key.
#![forbid(unsafe_code)]

use super::db::{params, Conn, DbErrorKind, Row, ValueRef};
use super::records::{KeyFilter, KeyListing, KeyRecord, KeyState, RowMac, StoredKey, UnreadableKey, VersionRecord};
use super::intents::delete_intent;
use super::{Store, StoreError};
use crate::classification::Classification;
use crate::ids::{hex, KeyId, KeyPurpose, ObjectId};

const KEY_COLUMNS: &str = "id, name, classification, purpose, state, primary_version, rotation_period_days, created_at, \
                           rotated_at, destroy_at, revision, row_mac";

impl Store {
    /// Inserts a key and all its versions in one transaction.
    ///
    /// Fails with [`StoreError::DuplicateName`] if the name is taken, and with
    /// [`StoreError::InvalidRecord`] if the record breaks a rule that reading enforces.
    pub fn insert_key(&self, key: &KeyRecord, mac: &RowMac) -> Result<(), StoreError> {
        self.insert_key_then(key, mac, |_| Ok(()))
    }

    /// [`Store::insert_key`], and `then` in the same transaction (committed only if both succeed).
    pub(super) fn insert_key_then(
        &self,
        key: &KeyRecord,
        mac: &RowMac,
        then: impl FnOnce(&mut dyn Conn) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        check_record(key)?;
        let revision = revision_param(key)?;
        self.write_keys("insert key", |tx| {
            // With SQLite the one writer holds the write lock, so this check cannot race; with
            // PostgreSQL two servers may both pass it, and the name's unique index refuses the
            // second insert (mapped to the same error below).
            let taken = tx
                .query_one("SELECT EXISTS (SELECT 1 FROM keys WHERE name = ?1)", &params![key.name])
                .and_then(|r| r.int(0))
                .map_err(StoreError::db("insert key"))?;
            if taken != 0 {
                return Err(StoreError::DuplicateName { name: key.name.clone() });
            }
            let inserted = tx.execute(
                &format!("INSERT INTO keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
                &params![
                    key.id.0.as_slice(),
                    key.name,
                    key.classification.to_byte(),
                    key.purpose.as_str(),
                    key.state.as_str(),
                    key.primary_version,
                    key.rotation_period_days,
                    key.created_at,
                    key.rotated_at,
                    key.destroy_at,
                    revision,
                    mac.0.as_slice(),
                ],
            );
            match inserted {
                Ok(_) => {}
                Err(e) if e.kind == DbErrorKind::UniqueViolation => {
                    return Err(StoreError::DuplicateName { name: key.name.clone() })
                }
                Err(e) => return Err(StoreError::db("insert key")(e)),
            }
            for v in &key.versions {
                insert_version(tx, key, v)?;
                // The row now names the object: its creation intent is fulfilled.
                delete_intent(tx, &v.object_id)?;
            }
            then(tx)
        })
    }

    /// Replaces the mutable part of a key row (state, primary version, schedule, times, revision,
    /// MAC, and the versions' states) in one transaction, if the stored row is still at
    /// `expected_revision`; otherwise [`StoreError::Conflict`]. New versions are added; versions
    /// are never removed, and a key's id, name, level, purpose and creation time never change
    /// ([`StoreError::InvalidRecord`] if the record tries).
    pub fn update_key(&self, key: &KeyRecord, mac: &RowMac, expected_revision: u64) -> Result<(), StoreError> {
        self.write_keys("update key", |tx| update_key_in(tx, key, mac, expected_revision))
    }

    /// The key with this name, if any.
    pub fn key_by_name(&self, name: &str) -> Result<Option<StoredKey>, StoreError> {
        self.read("read key by name", |conn| {
            let row = conn
                .query_opt(&format!("SELECT {KEY_COLUMNS} FROM keys WHERE name = ?1"), &params![name])
                .map_err(StoreError::db("read key by name"))?;
            row.map(|r| decode_key(&r).and_then(|k| with_versions(conn, k))).transpose()
        })
    }

    /// The key with this id, if any.
    pub fn key_by_id(&self, id: KeyId) -> Result<Option<StoredKey>, StoreError> {
        self.read("read key by id", |conn| {
            let row = conn
                .query_opt(&format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1"), &params![id.0.as_slice()])
                .map_err(StoreError::db("read key by id"))?;
            row.map(|r| decode_key(&r).and_then(|k| with_versions(conn, k))).transpose()
        })
    }

    /// The keys that match `filter`, ordered by name. A row that does not decode (edited or damaged)
    /// is listed apart, naming the key, and never stops the others from being listed.
    pub fn list_keys(&self, filter: &KeyFilter) -> Result<KeyListing, StoreError> {
        self.read("list keys", |conn| {
            // The prefix is compared with substr, not LIKE: LIKE would treat `%` and `_` as
            // wildcards and fold ASCII case. The casts tell PostgreSQL the parameters' types.
            let sql = format!(
                "SELECT {KEY_COLUMNS} FROM keys
                 WHERE (CAST(?1 AS BIGINT) IS NULL OR classification = ?1)
                   AND (CAST(?2 AS TEXT) IS NULL OR substr(name, 1, length(?2)) = ?2)
                 ORDER BY name"
            );
            let rows = conn
                .query(&sql, &params![filter.classification.map(Classification::to_byte), filter.name_prefix])
                .map_err(StoreError::db("list keys"))?;
            let mut listing = KeyListing::default();
            for row in rows {
                match decode_key(&row).and_then(|k| with_versions(conn, k)) {
                    Ok(k) => listing.keys.push(k),
                    Err(StoreError::CorruptRow { key, what }) => listing.unreadable.push(UnreadableKey { key, what }),
                    Err(e) => return Err(e),
                }
            }
            Ok(listing)
        })
    }

    /// Whether the store answers: one trivial read (for readiness checks).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.read("ping", |conn| {
            conn.query_one("SELECT 1", &[]).map_err(StoreError::db("ping"))?;
            Ok(())
        })
    }

    /// How many key rows the store holds (tombstones included, readable or not).
    pub fn key_count(&self) -> Result<u64, StoreError> {
        self.read("count keys", |conn| {
            let n = conn.query_one("SELECT count(*) FROM keys", &[]).and_then(|r| r.int(0)).map_err(StoreError::db("count keys"))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    /// The `CKA_ID` of every key version the store knows, in every state and whether or not its
    /// key row decodes or authenticates (for reconciliation with the token at start-up: an object a
    /// row names, even a forged one, is never treated as the store's debris).
    pub fn all_version_object_ids(&self) -> Result<Vec<ObjectId>, StoreError> {
        self.read("list version object ids", |conn| {
            let rows = conn
                .query("SELECT key_id, object_id FROM key_versions ORDER BY key_id, version", &[])
                .map_err(StoreError::db("list version object ids"))?;
            let mut ids = Vec::new();
            for row in rows {
                let key = match row.get_ref(0) {
                    Ok(ValueRef::Blob(b)) => hex(b),
                    _ => "(unreadable id)".to_owned(),
                };
                match row.get_ref(1) {
                    Ok(ValueRef::Blob(b)) if !b.is_empty() => ids.push(ObjectId(b.to_vec())),
                    // It names no object; the key's row is refused when it is read.
                    _ => tracing::error!(key = %key, "a version row's object id is not a non-empty blob"),
                }
            }
            Ok(ids)
        })
    }
}

/// [`Store::update_key`] inside a transaction the caller holds (and commits).
pub(super) fn update_key_in(
    tx: &mut dyn Conn,
    key: &KeyRecord,
    mac: &RowMac,
    expected_revision: u64,
) -> Result<(), StoreError> {
    check_record(key)?;
    let invalid = |what| StoreError::InvalidRecord { key: key.name.clone(), what };
    if key.revision != expected_revision.wrapping_add(1) {
        return Err(invalid("the new revision must be the expected revision plus one"));
    }
    let current = tx
        .query_opt(
            "SELECT revision, name, classification, purpose, created_at FROM keys WHERE id = ?1",
            &params![key.id.0.as_slice()],
        )
        .and_then(|r| r.map(|r| Ok((r.int(0)?, r.text(1)?, r.int(2)?, r.text(3)?, r.int(4)?))).transpose())
        .map_err(StoreError::db("update key"))?
        .ok_or_else(|| invalid("the key does not exist"))?;
    let (revision, name, level, purpose, created_at) = current;
    if u64::try_from(revision).ok() != Some(expected_revision) {
        return Err(StoreError::Conflict { key: key.name.clone() });
    }
    if name != key.name
        || level != i64::from(key.classification.to_byte())
        || purpose != key.purpose.as_str()
        || created_at != key.created_at
    {
        return Err(invalid("a key's name, level, purpose and creation time never change"));
    }
    let changed = tx
        .execute(
            "UPDATE keys SET state = ?2, primary_version = ?3, rotation_period_days = ?4, rotated_at = ?5,
                    destroy_at = ?6, revision = ?7, row_mac = ?8
             WHERE id = ?1 AND revision = ?9",
            &params![
                key.id.0.as_slice(),
                key.state.as_str(),
                key.primary_version,
                key.rotation_period_days,
                key.rotated_at,
                key.destroy_at,
                revision_param(key)?,
                mac.0.as_slice(),
                revision,
            ],
        )
        .map_err(StoreError::db("update key"))?;
    if changed != 1 {
        return Err(StoreError::Conflict { key: key.name.clone() });
    }
    let stored: Vec<(u32, Vec<u8>, i64)> = tx
        .query("SELECT version, object_id, created_at FROM key_versions WHERE key_id = ?1 ORDER BY version", &params![key.id.0.as_slice()])
        .and_then(|rows| {
            rows.iter()
                .map(|r| {
                    let n = u32::try_from(r.int(0)?).map_err(|_| super::db::DbError::other("a version number is out of range".into()))?;
                    Ok((n, r.blob(1)?, r.int(2)?))
                })
                .collect()
        })
        .map_err(StoreError::db("update key"))?;
    for (number, object_id, created) in &stored {
        match key.version(*number) {
            None => return Err(invalid("versions are never removed")),
            Some(v) if v.object_id.as_bytes() != object_id.as_slice() || v.created_at != *created => {
                return Err(invalid("a version's object id and creation time never change"));
            }
            Some(_) => {}
        }
    }
    for v in &key.versions {
        if stored.iter().any(|(n, _, _)| *n == v.version) {
            tx.execute(
                "UPDATE key_versions SET state = ?3, destroy_at = ?4 WHERE key_id = ?1 AND version = ?2",
                &params![key.id.0.as_slice(), v.version, v.state.as_str(), v.destroy_at],
            )
            .map_err(StoreError::db("update key version"))?;
        } else {
            insert_version(tx, key, v)?;
            delete_intent(tx, &v.object_id)?;
        }
    }
    Ok(())
}

/// The rules that reading enforces, applied before writing so that the store never holds a row it
/// would refuse.
fn check_record(key: &KeyRecord) -> Result<(), StoreError> {
    let invalid = |what| Err(StoreError::InvalidRecord { key: key.name.clone(), what });
    if key.name.is_empty() {
        return invalid("the name is empty");
    }
    if key.versions.is_empty() {
        return invalid("a key needs at least one version");
    }
    for v in &key.versions {
        if v.version == 0 {
            return invalid("version numbers start at 1");
        }
        if v.object_id != ObjectId::for_version(key.id, v.version) {
            return invalid("a version's object id must be the key id followed by the version number");
        }
    }
    if !key.versions.windows(2).all(|w| w[0].version < w[1].version) {
        return invalid("versions must be in ascending order without repeats");
    }
    match state_rules(key) {
        Ok(()) => Ok(()),
        Err(what) => invalid(what),
    }
}

/// The lifecycle rules every row keeps, checked on writing and on reading.
fn state_rules(key: &KeyRecord) -> Result<(), &'static str> {
    let primary = key.primary().ok_or("the primary version is not among the versions")?;
    if matches!(key.state, KeyState::Enabled | KeyState::Disabled) && primary.state != KeyState::Enabled {
        return Err("the primary version of a key in use must be ENABLED");
    }
    if (key.state == KeyState::PendingDestruction) != key.destroy_at.is_some() && key.state != KeyState::Destroyed {
        return Err("a destruction time is set exactly when the key is PENDING_DESTRUCTION");
    }
    if key.state == KeyState::Destroyed && key.versions.iter().any(|v| v.state != KeyState::Destroyed) {
        return Err("every version of a DESTROYED key is DESTROYED");
    }
    for v in &key.versions {
        if (v.state == KeyState::PendingDestruction) != v.destroy_at.is_some() && v.state != KeyState::Destroyed {
            return Err("a version's destruction time is set exactly when it is PENDING_DESTRUCTION");
        }
    }
    Ok(())
}

fn revision_param(key: &KeyRecord) -> Result<i64, StoreError> {
    i64::try_from(key.revision)
        .ok()
        .filter(|&r| r >= 1)
        .ok_or_else(|| StoreError::InvalidRecord { key: key.name.clone(), what: "revision out of range" })
}

fn insert_version(tx: &mut dyn Conn, key: &KeyRecord, v: &VersionRecord) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO key_versions (key_id, version, object_id, state, created_at, destroy_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        &params![key.id.0.as_slice(), v.version, v.object_id.as_bytes(), v.state.as_str(), v.created_at, v.destroy_at],
    )
    .map_err(StoreError::db("insert key version"))?;
    Ok(())
}

/// Decodes the key columns of a row (without versions).
fn decode_key(row: &Row) -> Result<StoredKey, StoreError> {
    let raw = |i| row.get_ref(i).map_err(StoreError::db("read key column"));
    // Name the key in errors by name if the name decodes, else by the id's hex.
    let name = match raw(1)? {
        ValueRef::Text(t) => std::str::from_utf8(t).ok().filter(|s| !s.is_empty()).map(str::to_owned),
        _ => None,
    };
    let id_hex = match raw(0)? {
        ValueRef::Blob(b) => hex(b),
        _ => "(unreadable id)".to_owned(),
    };
    let label = name.clone().unwrap_or_else(|| id_hex.clone());
    let corrupt = |what| StoreError::CorruptRow { key: label.clone(), what };

    let id = match raw(0)? {
        ValueRef::Blob(b) => KeyId(b.try_into().map_err(|_| corrupt("key id is not 16 bytes"))?),
        _ => return Err(corrupt("key id is not a blob")),
    };
    let name = name.ok_or_else(|| corrupt("name is not non-empty UTF-8 text"))?;
    let classification = integer(raw(2)?)
        .and_then(|b| u8::try_from(b).ok())
        .and_then(Classification::from_byte)
        .ok_or_else(|| corrupt("unknown classification"))?;
    let purpose = text(raw(3)?).and_then(KeyPurpose::parse).ok_or_else(|| corrupt("unknown purpose"))?;
    let state = text(raw(4)?).and_then(KeyState::parse).ok_or_else(|| corrupt("unknown key state"))?;
    let primary_version = version_number(raw(5)?).ok_or_else(|| corrupt("primary version out of range"))?;
    let rotation_period_days =
        integer(raw(6)?).and_then(|d| u32::try_from(d).ok()).ok_or_else(|| corrupt("rotation period out of range"))?;
    let created_at = integer(raw(7)?).ok_or_else(|| corrupt("creation time is not an integer"))?;
    let rotated_at = integer(raw(8)?).ok_or_else(|| corrupt("rotation time is not an integer"))?;
    let destroy_at = match raw(9)? {
        ValueRef::Null => None,
        ValueRef::Integer(t) => Some(t),
        _ => return Err(corrupt("destruction time is not an integer")),
    };
    let revision = integer(raw(10)?)
        .filter(|&r| r >= 1)
        .and_then(|r| u64::try_from(r).ok())
        .ok_or_else(|| corrupt("revision out of range"))?;
    let mac = match raw(11)? {
        ValueRef::Blob(b) => RowMac(b.try_into().map_err(|_| corrupt("metadata MAC is not 32 bytes"))?),
        ValueRef::Null => {
            return Err(corrupt(
                "the row has no metadata MAC (it was written before schema version 2, or the MAC was \
                 removed); it cannot be authenticated and is refused",
            ))
        }
        _ => return Err(corrupt("metadata MAC is not a blob")),
    };
    let record = KeyRecord {
        id,
        name,
        classification,
        purpose,
        state,
        primary_version,
        rotation_period_days,
        created_at,
        rotated_at,
        destroy_at,
        revision,
        versions: Vec::new(),
    };
    Ok(StoredKey { record, mac })
}

/// Loads and checks the versions of a decoded key.
fn with_versions(conn: &mut dyn Conn, stored: StoredKey) -> Result<StoredKey, StoreError> {
    let StoredKey { record: mut key, mac } = stored;
    let rows = conn
        .query(
            "SELECT version, object_id, state, created_at, destroy_at FROM key_versions WHERE key_id = ?1 ORDER BY version",
            &params![key.id.0.as_slice()],
        )
        .map_err(StoreError::db("read key versions"))?;
    for row in rows {
        key.versions.push(decode_version(&row, key.id, &key.name)?);
    }
    if let Err(what) = state_rules(&key) {
        return Err(StoreError::CorruptRow { key: key.name, what });
    }
    Ok(StoredKey { record: key, mac })
}

fn decode_version(row: &Row, key: KeyId, name: &str) -> Result<VersionRecord, StoreError> {
    let raw = |i| row.get_ref(i).map_err(StoreError::db("read key version column"));
    let corrupt = |what| StoreError::CorruptRow { key: name.to_owned(), what };
    let version = version_number(raw(0)?).ok_or_else(|| corrupt("version number out of range"))?;
    let object_id = match raw(1)? {
        ValueRef::Blob(b) => ObjectId(b.to_vec()),
        _ => return Err(corrupt("version object id is not a blob")),
    };
    // A version must point at its own HSM object: a row edited to point at another key's object
    // would otherwise let one key's blobs be opened with another key's level and permissions.
    if object_id != ObjectId::for_version(key, version) {
        return Err(corrupt("version object id does not match its key id and version"));
    }
    let state = text(raw(2)?).and_then(KeyState::parse).ok_or_else(|| corrupt("unknown version state"))?;
    let created_at = integer(raw(3)?).ok_or_else(|| corrupt("version creation time is not an integer"))?;
    let destroy_at = match raw(4)? {
        ValueRef::Null => None,
        ValueRef::Integer(t) => Some(t),
        _ => return Err(corrupt("version destruction time is not an integer")),
    };
    Ok(VersionRecord { version, object_id, state, created_at, destroy_at })
}

fn integer(v: ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Integer(i) => Some(i),
        _ => None,
    }
}

fn text(v: ValueRef<'_>) -> Option<&str> {
    match v {
        ValueRef::Text(t) => std::str::from_utf8(t).ok(),
        _ => None,
    }
}

/// Version numbers are 1..=u32::MAX.
fn version_number(v: ValueRef<'_>) -> Option<u32> {
    integer(v).and_then(|i| u32::try_from(i).ok()).filter(|&n| n >= 1)
}
