//! Key metadata authentication (invariant 5): every key row carries an HMAC computed inside
//! the HSM over a canonical encoding of the key and all its versions, and a row whose MAC does not
//! verify is refused, never used.
//!
//! The canonical encoding covers every field that decides what a key may do: id, name, level,
//! purpose, state, primary version, rotation period, times, revision, and each version's number,
//! `CKA_ID`, state and creation time. Lowering a level, re-enabling a disabled version or pointing a
//! version at another object with the sqlite3 shell all break the MAC.
//!
//! Verifying costs one HSM operation, so the last verified `(encoding, MAC)` of each key is
//! remembered by digest: a row that is byte-for-byte what was verified before is not sent to the HSM
//! again. The cache only ever skips work for exactly those bytes, so it cannot let an edited row
//! through.
//!
//! Known limit: an attacker with write access to the database could put back an *older* row with
//! its own valid MAC (a rollback). The revision number is covered by the MAC but there is no
//! monotonic counter outside the database to compare it with; the audit trail (a later issue) is the
//! place that detects it.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::authz::{Authorized, CallerAdmin};
use crate::hsm::{Hsm, HsmError};
use crate::ids::KeyId;
use crate::object_label::AdoptionRecord;
use crate::store::{
    ApprovalRecord, AuditAnchor, CallerRecord, IntentRecord, KeyRecord, KeyState, RequestRecord, RowMac, StoredAnchor,
    StoredApproval, StoredCaller, StoredIntent, StoredKey, StoredRequest, IdempotencyRecord, StoredIdempotency,
};

/// Format version of the canonical encoding; part of the MAC input.
const ENCODING_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyAuthError {
    #[error("the metadata of key {key} failed authentication: the key store was changed outside the service; the key is refused")]
    Forged { key: String },
    #[error("approval request {id} failed authentication: the key store was changed outside the service; the request is refused")]
    ForgedApproval { id: String },
    #[error("the registration of caller {identity} failed authentication: the key store was changed outside the service; the caller is refused")]
    ForgedCaller { identity: String },
    #[error("the creation intent of object {object} failed authentication: the key store was changed outside the service; it is not acted on")]
    ForgedIntent { object: String },
    #[error("the record of an idempotent request failed authentication: the key store was changed outside the service")]
    ForgedIdempotency,
    #[error("the audit anchor failed authentication: the key store was changed outside the service")]
    ForgedAnchor,
    #[error("the adoption record in the label of object {object} failed authentication: the object was not made by this service with that name, version and level")]
    ForgedLabel { object: String },
    #[error(transparent)]
    Hsm(HsmError),
}

/// Seals and verifies key rows with the HSM.
pub struct KeyAuth {
    hsm: Hsm,
    verified: Mutex<HashMap<KeyId, [u8; 32]>>,
}

impl KeyAuth {
    pub fn new(hsm: Hsm) -> KeyAuth {
        KeyAuth { hsm, verified: Mutex::new(HashMap::new()) }
    }

    /// The MAC to store with `record`.
    pub async fn seal(&self, record: &KeyRecord) -> Result<RowMac, KeyAuthError> {
        let encoded = canonical(record);
        let mac = self.hsm.mac_metadata(encoded.clone()).await.map_err(KeyAuthError::Hsm)?;
        self.remember(record.id, &encoded, &mac);
        Ok(RowMac(mac))
    }

    /// The record of `stored` if its MAC verifies inside the HSM; [`KeyAuthError::Forged`] otherwise.
    pub async fn verify(&self, stored: StoredKey) -> Result<KeyRecord, KeyAuthError> {
        let StoredKey { record, mac } = stored;
        let encoded = canonical(&record);
        let digest = cache_digest(&encoded, &mac.0);
        if self.lock().get(&record.id) == Some(&digest) {
            return Ok(record);
        }
        match self.hsm.verify_metadata(encoded, mac.0).await {
            Ok(()) => {
                self.lock().insert(record.id, digest);
                Ok(record)
            }
            Err(HsmError::IntegrityCheckFailed) => {
                tracing::error!(key = %record.name, id = %record.id, "key metadata failed authentication: the store was edited outside the service");
                Err(KeyAuthError::Forged { key: record.name })
            }
            Err(e) => Err(KeyAuthError::Hsm(e)),
        }
    }

    /// The MAC to store with an approval request.
    pub async fn seal_approval(&self, record: &ApprovalRecord) -> Result<RowMac, KeyAuthError> {
        let mac = self.hsm.mac_metadata(canonical_approval(record)).await.map_err(KeyAuthError::Hsm)?;
        Ok(RowMac(mac))
    }

    /// The request of `stored` if its MAC verifies inside the HSM (not cached: approvals are rare).
    pub async fn verify_approval(&self, stored: StoredApproval) -> Result<ApprovalRecord, KeyAuthError> {
        let StoredApproval { record, mac } = stored;
        match self.hsm.verify_metadata(canonical_approval(&record), mac.0).await {
            Ok(()) => Ok(record),
            Err(HsmError::IntegrityCheckFailed) => {
                tracing::error!(approval = %record.id, "approval request failed authentication: the store was edited outside the service");
                Err(KeyAuthError::ForgedApproval { id: record.id.to_hex() })
            }
            Err(e) => Err(KeyAuthError::Hsm(e)),
        }
    }

    /// The MAC to store with a caller's registration, for an officer authorised to manage callers:
    /// without the grant no caller row can be sealed, so none would be accepted on load.
    pub async fn seal_caller(&self, _grant: &Authorized<CallerAdmin>, record: &CallerRecord) -> Result<RowMac, KeyAuthError> {
        let mac = self.hsm.mac_metadata(canonical_caller(record)).await.map_err(KeyAuthError::Hsm)?;
        Ok(RowMac(mac))
    }

    /// The MAC for a caller the configuration seeds at start-up (the deployment's own authority;
    /// see `service::callers::load_callers`). Nothing else may call it.
    pub async fn seal_configured_caller(&self, record: &CallerRecord) -> Result<RowMac, KeyAuthError> {
        let mac = self.hsm.mac_metadata(canonical_caller(record)).await.map_err(KeyAuthError::Hsm)?;
        Ok(RowMac(mac))
    }

    /// The registration of `stored` if its MAC verifies inside the HSM. A row sealed before
    /// recipient keys existed (encoding 0xC1) still verifies while it has none; any change seals it
    /// in the current encoding.
    pub async fn verify_caller(&self, stored: StoredCaller) -> Result<CallerRecord, KeyAuthError> {
        let StoredCaller { record, mac } = stored;
        let mut result = self.hsm.verify_metadata(canonical_caller(&record), mac.0).await;
        if matches!(result, Err(HsmError::IntegrityCheckFailed)) && record.recipient_keys.is_empty() {
            result = self.hsm.verify_metadata(canonical_caller_v1(&record), mac.0).await;
        }
        match result {
            Ok(()) => Ok(record),
            Err(HsmError::IntegrityCheckFailed) => {
                tracing::error!(caller = %crate::bounded::text(&record.identity, crate::bounded::NAME), "caller registration failed authentication: the store was edited outside the service");
                Err(KeyAuthError::ForgedCaller { identity: crate::bounded::owned(&record.identity, crate::bounded::NAME) })
            }
            Err(e) => Err(KeyAuthError::Hsm(e)),
        }
    }

    /// The MAC to store with a two-officer request about a caller or a token object.
    pub async fn seal_request(&self, record: &RequestRecord) -> Result<RowMac, KeyAuthError> {
        let mac = self.hsm.mac_metadata(canonical_request(record)).await.map_err(KeyAuthError::Hsm)?;
        Ok(RowMac(mac))
    }

    /// The request of `stored` if its MAC verifies inside the HSM.
    pub async fn verify_request(&self, stored: StoredRequest) -> Result<RequestRecord, KeyAuthError> {
        let StoredRequest { record, mac } = stored;
        match self.hsm.verify_metadata(canonical_request(&record), mac.0).await {
            Ok(()) => Ok(record),
            Err(HsmError::IntegrityCheckFailed) => {
                tracing::error!(request = %record.id, "a two-officer request failed authentication: the store was edited outside the service");
                Err(KeyAuthError::ForgedApproval { id: record.id.to_hex() })
            }
            Err(e) => Err(KeyAuthError::Hsm(e)),
        }
    }

    /// The MAC to store with a creation intent.
    pub async fn seal_intent(&self, record: &IntentRecord) -> Result<RowMac, KeyAuthError> {
        let mac = self.hsm.mac_metadata(canonical_intent(record)).await.map_err(KeyAuthError::Hsm)?;
        Ok(RowMac(mac))
    }

    /// The intent of `stored` if its MAC verifies: only then may start-up act on it.
    pub async fn verify_intent(&self, stored: StoredIntent) -> Result<IntentRecord, KeyAuthError> {
        let StoredIntent { record, mac } = stored;
        match self.hsm.verify_metadata(canonical_intent(&record), mac.0).await {
            Ok(()) => Ok(record),
            Err(HsmError::IntegrityCheckFailed) => Err(KeyAuthError::ForgedIntent { object: record.object_id.to_string() }),
            Err(e) => Err(KeyAuthError::Hsm(e)),
        }
    }

    /// The MAC to store with an idempotent request's record.
    pub async fn seal_idempotency(&self, record: &IdempotencyRecord) -> Result<RowMac, KeyAuthError> {
        let mac = self.hsm.mac_metadata(canonical_idempotency(record)).await.map_err(KeyAuthError::Hsm)?;
        Ok(RowMac(mac))
    }

    /// The record of `stored` if its MAC verifies.
    pub async fn verify_idempotency(&self, stored: StoredIdempotency) -> Result<IdempotencyRecord, KeyAuthError> {
        let StoredIdempotency { record, mac } = stored;
        match self.hsm.verify_metadata(canonical_idempotency(&record), mac.0).await {
            Ok(()) => Ok(record),
            Err(HsmError::IntegrityCheckFailed) => Err(KeyAuthError::ForgedIdempotency),
            Err(e) => Err(KeyAuthError::Hsm(e)),
        }
    }

    /// The MAC to store with `server`'s audit anchor.
    pub async fn seal_anchor(&self, server: &str, anchor: &AuditAnchor) -> Result<RowMac, KeyAuthError> {
        let mac = self.hsm.mac_metadata(canonical_anchor(server, anchor)).await.map_err(KeyAuthError::Hsm)?;
        Ok(RowMac(mac))
    }

    /// The anchor of `stored` if its MAC verifies as `server`'s (an anchor moved to another
    /// server's row does not).
    pub async fn verify_anchor(&self, server: &str, stored: StoredAnchor) -> Result<AuditAnchor, KeyAuthError> {
        match self.hsm.verify_metadata(canonical_anchor(server, &stored.anchor), stored.mac.0).await {
            Ok(()) => Ok(stored.anchor),
            Err(HsmError::IntegrityCheckFailed) => Err(KeyAuthError::ForgedAnchor),
            Err(e) => Err(KeyAuthError::Hsm(e)),
        }
    }

    /// The MAC an object's label carries (see `crate::object_label`).
    pub async fn seal_adoption(&self, record: &AdoptionRecord) -> Result<[u8; 32], KeyAuthError> {
        self.hsm.mac_metadata(record.mac_input()).await.map_err(KeyAuthError::Hsm)
    }

    /// Checks, inside the HSM, the MAC an object's label carries.
    pub async fn verify_adoption(&self, record: &AdoptionRecord, mac: [u8; 32]) -> Result<(), KeyAuthError> {
        match self.hsm.verify_metadata(record.mac_input(), mac).await {
            Ok(()) => Ok(()),
            Err(HsmError::IntegrityCheckFailed) => Err(KeyAuthError::ForgedLabel { object: record.object_id().to_string() }),
            Err(e) => Err(KeyAuthError::Hsm(e)),
        }
    }

    fn remember(&self, id: KeyId, encoded: &[u8], mac: &[u8; 32]) {
        self.lock().insert(id, cache_digest(encoded, mac));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyId, [u8; 32]>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // reads), so a poisoned lock is still safe to use.
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn cache_digest(encoded: &[u8], mac: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((encoded.len() as u64).to_be_bytes());
    h.update(encoded);
    h.update(mac);
    h.finalize().into()
}

fn state_byte(s: KeyState) -> u8 {
    match s {
        KeyState::Enabled => 1,
        KeyState::Disabled => 2,
        KeyState::PendingDestruction => 3,
        KeyState::Destroyed => 4,
    }
}

/// The canonical, unambiguous encoding of a key row: fixed-width integers, length-prefixed
/// variable fields, versions in the record's order (ascending version numbers).
pub fn canonical(r: &KeyRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(96 + r.name.len() + r.versions.len() * 40);
    v.push(ENCODING_VERSION);
    v.extend_from_slice(&r.id.0);
    v.extend_from_slice(&(r.name.len() as u32).to_be_bytes());
    v.extend_from_slice(r.name.as_bytes());
    v.push(r.classification.to_byte());
    v.extend_from_slice(r.purpose.as_str().as_bytes());
    v.push(0);
    v.push(state_byte(r.state));
    v.extend_from_slice(&r.primary_version.to_be_bytes());
    v.extend_from_slice(&r.rotation_period_days.to_be_bytes());
    v.extend_from_slice(&r.created_at.to_be_bytes());
    v.extend_from_slice(&r.rotated_at.to_be_bytes());
    put_time(&mut v, r.destroy_at);
    v.extend_from_slice(&r.revision.to_be_bytes());
    v.extend_from_slice(&(r.versions.len() as u32).to_be_bytes());
    for ver in &r.versions {
        v.extend_from_slice(&ver.version.to_be_bytes());
        v.extend_from_slice(&(ver.object_id.0.len() as u32).to_be_bytes());
        v.extend_from_slice(&ver.object_id.0);
        v.push(state_byte(ver.state));
        v.extend_from_slice(&ver.created_at.to_be_bytes());
        put_time(&mut v, ver.destroy_at);
    }
    v
}

/// Tag of the approval encoding; differs from every key encoding's first byte, so a key row's MAC
/// can never pass for an approval's or the other way round.
const APPROVAL_ENCODING: u8 = 0xA1;

/// The canonical encoding of an approval request.
pub fn canonical_approval(a: &ApprovalRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(128 + a.requested_by.len());
    v.push(APPROVAL_ENCODING);
    v.extend_from_slice(&a.id.0);
    v.extend_from_slice(&a.key_id.0);
    put_str(&mut v, a.action.as_str());
    v.extend_from_slice(&a.version.to_be_bytes());
    put_str(&mut v, &a.requested_by);
    v.extend_from_slice(&a.requested_at.to_be_bytes());
    v.extend_from_slice(&a.expires_at.to_be_bytes());
    put_str(&mut v, a.state.as_str());
    match &a.decided_by {
        None => v.push(0),
        Some(d) => {
            v.push(1);
            put_str(&mut v, d);
        }
    }
    put_time(&mut v, a.decided_at);
    v
}

/// Tag of the caller encoding (see [`APPROVAL_ENCODING`]): 0xC1 before recipient keys, 0xC2 with them.
const CALLER_ENCODING_V1: u8 = 0xC1;
const CALLER_ENCODING: u8 = 0xC2;

/// The canonical encoding of a caller's registration: the version 1 fields, then the recipient
/// keys (count, then each point and the time it was added).
pub fn canonical_caller(c: &CallerRecord) -> Vec<u8> {
    let mut v = canonical_caller_v1(c);
    v[0] = CALLER_ENCODING;
    v.extend_from_slice(&(c.recipient_keys.len() as u32).to_be_bytes());
    for k in &c.recipient_keys {
        v.extend_from_slice(&k.public_key);
        v.extend_from_slice(&k.added_at.to_be_bytes());
    }
    v
}

/// The encoding rows were sealed with before recipient keys existed.
fn canonical_caller_v1(c: &CallerRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(128 + c.identity.len() + c.name.len() + c.agency.len());
    v.push(CALLER_ENCODING_V1);
    put_str(&mut v, &c.identity);
    put_str(&mut v, &c.agency);
    put_str(&mut v, &c.name);
    v.push(c.system_level);
    v.push(c.clearance.to_byte());
    v.extend_from_slice(&(c.roles.len() as u32).to_be_bytes());
    for r in &c.roles {
        put_str(&mut v, r.as_str());
    }
    v.extend_from_slice(&(c.allowed_keys.len() as u32).to_be_bytes());
    for p in &c.allowed_keys {
        put_str(&mut v, p);
    }
    v.push(u8::from(c.active));
    v.extend_from_slice(&c.created_at.to_be_bytes());
    v.extend_from_slice(&c.updated_at.to_be_bytes());
    v.extend_from_slice(&c.revision.to_be_bytes());
    v
}

/// Tag of the encoding of requests about callers and objects (see [`APPROVAL_ENCODING`]).
const REQUEST_ENCODING: u8 = 0xA2;

/// The canonical encoding of a two-officer request about a caller or a token object.
pub fn canonical_request(r: &RequestRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(128 + r.subject.len() + r.payload.len());
    v.push(REQUEST_ENCODING);
    v.extend_from_slice(&r.id.0);
    put_str(&mut v, r.kind.as_str());
    put_str(&mut v, &r.subject);
    v.extend_from_slice(&(r.payload.len() as u32).to_be_bytes());
    v.extend_from_slice(&r.payload);
    v.extend_from_slice(&r.base_revision.to_be_bytes());
    v.push(r.level.to_byte());
    put_str(&mut v, &r.requested_by);
    v.extend_from_slice(&r.requested_at.to_be_bytes());
    v.extend_from_slice(&r.expires_at.to_be_bytes());
    put_str(&mut v, r.state.as_str());
    match &r.decided_by {
        None => v.push(0),
        Some(d) => {
            v.push(1);
            put_str(&mut v, d);
        }
    }
    put_time(&mut v, r.decided_at);
    v
}

/// Tag of the intent encoding (see [`APPROVAL_ENCODING`]).
const INTENT_ENCODING: u8 = 0x1E;

/// Tag of the intent encoding of a named server (several servers on one store).
const SERVER_INTENT_ENCODING: u8 = 0x1F;

/// The canonical encoding of a creation intent. An intent of the unnamed server (a store's only
/// server) keeps the encoding intents had before servers were named.
pub fn canonical_intent(i: &IntentRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(84 + i.request_id.len() + i.server.len());
    if i.server.is_empty() {
        v.push(INTENT_ENCODING);
    } else {
        v.push(SERVER_INTENT_ENCODING);
        put_str(&mut v, &i.server);
    }
    v.extend_from_slice(&(i.object_id.0.len() as u32).to_be_bytes());
    v.extend_from_slice(&i.object_id.0);
    v.extend_from_slice(&i.key_id.0);
    v.extend_from_slice(&i.version.to_be_bytes());
    put_str(&mut v, &i.request_id);
    v.extend_from_slice(&i.audit_seq.to_be_bytes());
    v.extend_from_slice(&i.created_at.to_be_bytes());
    v
}

/// Tag of the idempotent request encoding (see [`APPROVAL_ENCODING`]).
const IDEMPOTENCY_ENCODING: u8 = 0x1D;

/// The canonical encoding of an idempotent request's record.
pub fn canonical_idempotency(r: &IdempotencyRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(96 + r.caller.len() + r.idem_key.len() + r.rpc.len());
    v.push(IDEMPOTENCY_ENCODING);
    put_str(&mut v, &r.caller);
    put_str(&mut v, &r.idem_key);
    put_str(&mut v, &r.rpc);
    v.extend_from_slice(&r.request_hash);
    v.extend_from_slice(&r.key_id.0);
    v.extend_from_slice(&r.created_at.to_be_bytes());
    v
}

/// Tag of the audit anchor encoding (see [`APPROVAL_ENCODING`]): the one server of a store.
const ANCHOR_ENCODING: u8 = 0xAA;
/// Tag of the anchor encoding of a named server (several servers on one store).
const SERVER_ANCHOR_ENCODING: u8 = 0xAB;

/// The canonical encoding of `server`'s audit anchor. The unnamed server (`""`, a store's only
/// server) keeps the encoding anchors had before servers were named, so its anchor still verifies.
pub fn canonical_anchor(server: &str, a: &AuditAnchor) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + 4 + server.len() + 16 + 8 + 32 + 8);
    if server.is_empty() {
        v.push(ANCHOR_ENCODING);
    } else {
        v.push(SERVER_ANCHOR_ENCODING);
        put_str(&mut v, server);
    }
    v.extend_from_slice(&a.trail_id);
    v.extend_from_slice(&a.seq.to_be_bytes());
    v.extend_from_slice(&a.hash);
    v.extend_from_slice(&a.time_ms.to_be_bytes());
    v
}

fn put_str(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
}

/// An optional time: a presence byte, then the value (so `None` and `Some(0)` differ).
fn put_time(v: &mut Vec<u8>, t: Option<i64>) {
    match t {
        None => v.push(0),
        Some(t) => {
            v.push(1);
            v.extend_from_slice(&t.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classification::Classification;
    use crate::ids::{KeyPurpose, ObjectId};
    use crate::store::VersionRecord;

    #[test]
    fn anchors_of_different_servers_never_share_an_encoding_and_the_unnamed_one_keeps_the_old() {
        let a = AuditAnchor { trail_id: [1; 16], seq: 7, hash: [2; 32], time_ms: 3 };
        let old = canonical_anchor("", &a);
        // The encoding anchors had before servers were named: tag, id, seq, hash, time.
        let mut expected = vec![0xAA];
        expected.extend_from_slice(&[1; 16]);
        expected.extend_from_slice(&7u64.to_be_bytes());
        expected.extend_from_slice(&[2; 32]);
        expected.extend_from_slice(&3i64.to_be_bytes());
        assert_eq!(old, expected);
        let (x, y) = (canonical_anchor("kms-a", &a), canonical_anchor("kms-b", &a));
        assert_ne!(x, y);
        assert_ne!(x, old);
        assert_eq!(x[0], 0xAB);
        // A name is length-prefixed: "kms-a" + fields can never read as "kms-" + other fields.
        assert_ne!(canonical_anchor("kms-", &a), x);
    }

    fn record() -> KeyRecord {
        let id = KeyId([3; 16]);
        KeyRecord {
            id,
            name: "citizens".into(),
            classification: Classification::Personal,
            purpose: KeyPurpose::Envelope,
            state: KeyState::Enabled,
            primary_version: 2,
            rotation_period_days: 0,
            created_at: 1_000,
            rotated_at: 2_000,
            destroy_at: None,
            revision: 2,
            versions: vec![
                VersionRecord { version: 1, object_id: ObjectId::for_version(id, 1), state: KeyState::Disabled, created_at: 1_000, destroy_at: None },
                VersionRecord { version: 2, object_id: ObjectId::for_version(id, 2), state: KeyState::Enabled, created_at: 2_000, destroy_at: None },
            ],
        }
    }

    #[test]
    fn every_field_changes_the_encoding() {
        let base = canonical(&record());
        type Edit = Box<dyn Fn(&mut KeyRecord)>;
        let edits: Vec<Edit> = vec![
            Box::new(|r| r.id.0[0] ^= 1),
            Box::new(|r| r.name.push('x')),
            Box::new(|r| r.classification = Classification::Unclassified),
            Box::new(|r| r.purpose = KeyPurpose::HsmEncrypt),
            Box::new(|r| r.state = KeyState::Disabled),
            Box::new(|r| r.primary_version = 1),
            Box::new(|r| r.rotation_period_days = 30),
            Box::new(|r| r.created_at += 1),
            Box::new(|r| r.rotated_at += 1),
            Box::new(|r| r.revision += 1),
            Box::new(|r| r.destroy_at = Some(0)),
            Box::new(|r| r.versions[0].destroy_at = Some(5)),
            Box::new(|r| r.versions[0].state = KeyState::Enabled),
            Box::new(|r| r.versions[1].object_id = ObjectId::for_version(KeyId([9; 16]), 2)),
            Box::new(|r| r.versions[1].created_at += 1),
            Box::new(|r| {
                r.versions.pop();
            }),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut r = record();
            edit(&mut r);
            assert_ne!(canonical(&r), base, "edit {i} did not change the encoding");
        }
        assert_eq!(canonical(&record()), base);
    }
}
