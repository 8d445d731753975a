//! The audit trails' anchors, one per server (keyed by `server.id`, empty for the one server of a
//! SQLite store): which trail the server writes (a random 16-byte id) and how far it reached (the sequence number and chain hash of its newest durable record), sealed with an
//! HSM MAC. It lives here, outside the audit file, so that deleting, replacing or cutting the audit
//! file is seen at start-up: the trail must hold the anchored record, with the anchored hash.
//!
//! The audit writer moves the anchor after every commit of the trail, before any request of that
//! commit is answered. One row; hostile input like every other (decoded column by column, its MAC
//! checked by the caller before it is believed).
#![forbid(unsafe_code)]

use super::db::{params, ValueRef};

use super::records::RowMac;
use super::{Store, StoreError};

/// Where the audit trail stood at its last commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditAnchor {
    /// The trail's id, made when the trail was created; also stored in the audit file.
    pub trail_id: [u8; 16],
    /// The newest durable record (0 for a trail with no record yet).
    pub seq: u64,
    /// Its chain hash (the genesis hash for seq 0).
    pub hash: [u8; 32],
    /// When the anchor was written (Unix milliseconds).
    pub time_ms: i64,
}

/// The anchor as read from the file, not yet authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredAnchor {
    pub anchor: AuditAnchor,
    pub mac: RowMac,
}

impl Store {
    /// The stored anchor of `server`'s trail, if it was ever anchored.
    pub fn audit_anchor(&self, server: &str) -> Result<Option<StoredAnchor>, StoreError> {
        self.read("read audit anchor", |conn| {
            let Some(r) = conn
                .query_opt("SELECT trail_id, seq, hash, time_ms, row_mac FROM audit_anchors WHERE server = ?1", &params![server])
                .map_err(StoreError::db("read audit anchor"))?
            else {
                return Ok(None);
            };
            let corrupt = |what| StoreError::CorruptRow { key: "audit anchor".into(), what };
            let blob = |i: usize, len: usize, what| match r.get_ref(i) {
                Ok(ValueRef::Blob(b)) if b.len() == len => Ok(b.to_vec()),
                _ => Err(corrupt(what)),
            };
            let int = |i: usize, what| match r.get_ref(i) {
                Ok(ValueRef::Integer(v)) => Ok(v),
                _ => Err(corrupt(what)),
            };
            let trail_id: [u8; 16] = blob(0, 16, "the trail id is not 16 bytes")?.try_into().map_err(|_| corrupt("trail id"))?;
            let seq =
                u64::try_from(int(1, "the sequence number is not an integer")?).map_err(|_| corrupt("the sequence number is negative"))?;
            let hash: [u8; 32] = blob(2, 32, "the hash is not 32 bytes")?.try_into().map_err(|_| corrupt("hash"))?;
            let time_ms = int(3, "the time is not an integer")?;
            let mac: [u8; 32] = blob(4, 32, "the MAC is not 32 bytes")?.try_into().map_err(|_| corrupt("mac"))?;
            Ok(Some(StoredAnchor { anchor: AuditAnchor { trail_id, seq, hash, time_ms }, mac: RowMac(mac) }))
        })
    }

    /// Replaces `server`'s anchor (one durable write).
    pub fn set_audit_anchor(&self, server: &str, anchor: &AuditAnchor, mac: &RowMac) -> Result<(), StoreError> {
        self.write("write audit anchor", |tx| {
            tx.execute(
                "INSERT INTO audit_anchors (server, trail_id, seq, hash, time_ms, row_mac) VALUES (?6, ?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (server) DO UPDATE SET trail_id = ?1, seq = ?2, hash = ?3, time_ms = ?4, row_mac = ?5",
                &params![
                    anchor.trail_id.as_slice(),
                    i64::try_from(anchor.seq).unwrap_or(i64::MAX),
                    anchor.hash.as_slice(),
                    anchor.time_ms,
                    mac.0.as_slice(),
                    server
                ],
            )
            .map_err(StoreError::db("write audit anchor"))?;
            Ok(())
        })
    }
}
