//! The store's domain types: a key, its versions, their lifecycle state, and the list filter.
//!
//! These are plain values; this file never touches SQLite. A [`KeyRecord`] read from the store has
//! passed every check in `keys.rs` (known level, purpose and states; ids of the right length; the
//! primary version among the versions).
#![forbid(unsafe_code)]

use std::fmt;

use crate::classification::Classification;
use crate::ids::{KeyId, KeyPurpose, ObjectId};

stored_text_enum! {
    /// The lifecycle state of a key or of one of its versions.
    pub enum KeyState {
        Enabled => "ENABLED",
        Disabled => "DISABLED",
        PendingDestruction => "PENDING_DESTRUCTION",
        Destroyed => "DESTROYED",
    }
}

/// One version of a key: exactly one HSM object, found by its `CKA_ID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionRecord {
    /// 1, 2, ...; never reused.
    pub version: u32,
    /// The `CKA_ID` of the HSM object: `ObjectId::for_version(key id, version)`.
    pub object_id: ObjectId,
    pub state: KeyState,
    /// Unix seconds.
    pub created_at: i64,
    /// When a `PENDING_DESTRUCTION` version is destroyed (Unix seconds); `None` in other states.
    pub destroy_at: Option<i64>,
}

/// A key and all its versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: KeyId,
    /// Unique; a label for people. Blobs carry the id, not the name.
    pub name: String,
    /// Fixed at creation.
    pub classification: Classification,
    pub purpose: KeyPurpose,
    pub state: KeyState,
    /// The version used for new encryptions; always one of `versions`.
    pub primary_version: u32,
    /// Days between automatic rotations; 0 means the level's default.
    pub rotation_period_days: u32,
    /// Unix seconds.
    pub created_at: i64,
    /// When the primary version was last made (Unix seconds): the creation time, then each
    /// rotation's. The rotation schedule counts from here.
    pub rotated_at: i64,
    /// When a `PENDING_DESTRUCTION` key is destroyed (Unix seconds); `None` in other states.
    pub destroy_at: Option<i64>,
    /// Incremented by every change; a write names the revision it read, so two concurrent changes
    /// cannot both succeed (optimistic concurrency), and the metadata MAC covers it.
    pub revision: u64,
    /// Ordered by version number.
    pub versions: Vec<VersionRecord>,
}

impl KeyRecord {
    /// The version with this number, if the key has it.
    pub fn version(&self, version: u32) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// The primary version. `None` only for a record built by hand that breaks the store's rule.
    pub fn primary(&self) -> Option<&VersionRecord> {
        self.version(self.primary_version)
    }
}

/// The metadata MAC stored with a key row (invariant 5), computed inside the HSM over the
/// canonical encoding of the record (see `crate::keyauth`). The store keeps it but never checks it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RowMac(pub [u8; 32]);

impl fmt::Debug for RowMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RowMac({})", crate::ids::hex(&self.0))
    }
}

/// A key row as read from the file: the record and the MAC stored with it, not yet authenticated.
/// Only `crate::keyauth` turns it into a [`KeyRecord`] the service may act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredKey {
    pub record: KeyRecord,
    pub mac: RowMac,
}

/// Which keys [`Store::list_keys`](super::Store::list_keys) returns. The default returns all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyFilter {
    /// Only keys of exactly this level.
    pub classification: Option<Classification>,
    /// Only keys whose name starts with this text (case-sensitive; `%` and `_` are literal).
    pub name_prefix: Option<String>,
}

/// What [`Store::list_keys`](super::Store::list_keys) found: the rows that decode, and the rows
/// that do not (each names its key, by name or by the hex of its id, and what is wrong with it).
/// One bad row never hides the others.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyListing {
    pub keys: Vec<StoredKey>,
    pub unreadable: Vec<UnreadableKey>,
}

/// A key row that does not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadableKey {
    /// The key's name if it decodes, else the hex of its id.
    pub key: String,
    pub what: &'static str,
}
