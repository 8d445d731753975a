//! Start-up reconciliation of the key store with the token, and the officers' inventory of the
//! token's objects that no key version names.
//!
//! What start-up may destroy, and nothing else (invariants 6 and 9):
//! - the object of a version whose authenticated row says DESTROYED (a destruction was interrupted
//!   after its tombstone was committed: the officers' decision is on record);
//! - an object no row names, whose creation intent (sealed by the HSM) names it, when the audit
//!   trail shows that the request that made it was never answered with success (a creation or
//!   rotation interrupted before its row was committed: nobody was ever told it exists, so no blob
//!   can refer to it);
//! - as many objects with neither `CKA_ID` nor `CKA_LABEL` as there are such intents whose object is
//!   missing (SoftHSM writes a new object in steps; a kill inside `C_GenerateKey` leaves that shape).
//!
//! Everything else is kept: an object the store does not know and no intent names (a store restored
//! from an older backup, a store moved aside) is reported, never used, and can be adopted back into
//! the store from its label ([`adopt`]) or destroyed by two officers; an object whose intent cannot
//! be judged (the trail unreadable) is kept; another application's objects (without the service's
//! `kms:` label and 20-byte `CKA_ID`) are never considered at all; a forged row's objects are never
//! touched.
//!
//! Assumes it is the only process changing this token's service objects while it runs (one server
//! per token; see ARCHITECTURE.md).
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::audit::AuditLog;
use crate::classification::Classification;
use crate::hsm::{Hsm, HsmError, KeyObjectInfo};
use crate::ids::{hex, KeyPurpose, ObjectId};
use crate::keyauth::{KeyAuth, KeyAuthError};
use crate::object_label::{self, AdoptionRecord, ParsedLabel};
use crate::store::{IntentRecord, KeyFilter, KeyRecord, KeyState, Store, StoreError};

/// Why reconciliation (or an inventory) could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    #[error("key store: {0}")]
    Store(#[from] StoreError),
    #[error(
        "HSM object of key {key} version {version} is not a sensitive, non-extractable token key (sensitive={sensitive}, \
         extractable={extractable}, token={token}); refusing to serve"
    )]
    Readable { key: String, version: u32, sensitive: bool, extractable: bool, token: bool },
    #[error("a blocking task failed")]
    TaskFailed,
}

impl From<KeyAuthError> for ReconcileError {
    fn from(e: KeyAuthError) -> ReconcileError {
        match e {
            KeyAuthError::Hsm(h) => ReconcileError::Hsm(h),
            // The callers only pass errors of the HSM kind here; any other is a bug, reported as one.
            _ => ReconcileError::TaskFailed,
        }
    }
}

/// What start-up reconciliation found, did and left alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub keys: usize,
    /// Key rows that do not decode or whose MAC fails; refused, their objects untouched.
    pub forged_rows: usize,
    /// Live versions whose object is missing (never "repaired": that would hide data loss).
    pub missing_objects: usize,
    /// Objects of DESTROYED versions, destroyed.
    pub leftovers_destroyed: usize,
    /// Objects of creations that were never acknowledged (intent + trail), destroyed.
    pub debris_destroyed: usize,
    /// Objects with neither id nor label, destroyed (at most one per intent whose object is missing).
    pub incomplete_destroyed: usize,
    /// Objects with neither id nor label that no intent accounts for, kept.
    pub incomplete_kept: usize,
    /// The service's objects that no row names: kept, reported, never used.
    pub unknown_objects: usize,
    /// Of those, how many an intent names whose request was acknowledged (the row is lost: the store
    /// is older than the token).
    pub acknowledged_unrecorded: usize,
    /// Intents whose object could not be judged (the trail could not be read), kept with their objects.
    pub undecided: usize,
    /// Intents that failed authentication or do not decode; nothing was done on their account.
    pub forged_intents: usize,
    /// Objects without the service's marks, never considered.
    pub foreign_objects: usize,
    /// Intents fulfilled or judged, deleted.
    pub intents_cleared: usize,
    /// Intents of other servers sharing the store (creations they may still be making), and
    /// their objects: left to the server that recorded them.
    pub other_servers_intents: usize,
}

/// A service object on the token that no key version names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownObject {
    pub object_id: ObjectId,
    /// As the token reports it, bounded.
    pub label: String,
    /// The adoption record, when the label carries one and the HSM vouches for it.
    pub adoption: Option<AdoptionRecord>,
    /// Why it cannot be adopted, when it cannot.
    pub not_adoptable: Option<String>,
}

/// Counts the service's objects (its marks: a `kms:` label and a 20-byte `CKA_ID`) and the
/// distinct keys they belong to, without changing anything.
pub async fn count_service_objects(hsm: &Hsm) -> Result<(usize, usize), HsmError> {
    let objects = hsm.list_key_objects().await?;
    let ours: Vec<_> = objects.iter().filter(|o| object_label::is_service_object(&o.id, &o.label)).collect();
    let keys: HashSet<&[u8]> = ours.iter().map(|o| &o.id[..16]).collect();
    Ok((ours.len(), keys.len()))
}

/// Reconciles the store with the token before serving (see the module docs) and logs what it
/// found, one line per thing kept or destroyed and one summary line.
pub async fn at_startup(store: &Store, hsm: &Hsm, keyauth: &KeyAuth, audit: &AuditLog) -> Result<Report, ReconcileError> {
    let mut report = Report::default();
    let s = store.clone();
    let listing = blocking(move || s.list_keys(&KeyFilter::default())).await??;
    report.keys = listing.keys.len() + listing.unreadable.len();
    for bad in &listing.unreadable {
        report.forged_rows += 1;
        tracing::error!(key = %crate::bounded::text(&bad.key, crate::bounded::NAME), what = bad.what, "key row does not decode; the key is refused and its objects are left alone");
    }
    let mut keys = Vec::with_capacity(listing.keys.len());
    for row in listing.keys {
        match keyauth.verify(row).await {
            Ok(k) => keys.push(k),
            Err(KeyAuthError::Forged { key }) => {
                report.forged_rows += 1;
                tracing::error!(key = %crate::bounded::text(&key, crate::bounded::NAME), "key row failed authentication at start-up; the key is refused and its objects are left alone");
            }
            Err(e) => return Err(e.into()),
        }
    }

    let listed = hsm.list_key_objects().await?;
    let mut on_token: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    for o in listed {
        if object_label::is_service_object(&o.id, &o.label) {
            on_token.insert(o.id, crate::bounded::owned(&String::from_utf8_lossy(&o.label), crate::bounded::MESSAGE));
        } else {
            report.foreign_objects += 1;
        }
    }

    for key in &keys {
        if key.classification > hsm.approved_up_to() {
            tracing::error!(
                key = %key.name, level = %key.classification, approved_up_to = %hsm.approved_up_to(),
                "key's level is above the token's approval: every use of it will be refused"
            );
        }
        for v in &key.versions {
            let present = on_token.contains_key(v.object_id.as_bytes());
            if v.state == KeyState::Destroyed {
                if present {
                    match hsm.destroy_key(&v.object_id).await {
                        Ok(()) | Err(HsmError::ObjectNotFound { .. }) => {
                            report.leftovers_destroyed += 1;
                            tracing::warn!(key = %key.name, version = v.version, "repaired: destroyed the HSM object of a DESTROYED version (a destruction was interrupted)");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                continue;
            }
            if !present {
                report.missing_objects += 1;
                tracing::error!(key = %key.name, version = v.version, state = %v.state, "HSM object of key version is missing from the token");
                continue;
            }
            let info = hsm.inspect_key(&v.object_id).await?;
            if !info.sensitive || info.extractable || !info.token {
                return Err(ReconcileError::Readable {
                    key: key.name.clone(),
                    version: v.version,
                    sensitive: info.sensitive,
                    extractable: info.extractable,
                    token: info.token,
                });
            }
        }
    }

    // Every version row, authenticated or not, so that a forged row's objects are never destroyed.
    let s = store.clone();
    let known: HashSet<Vec<u8>> = blocking(move || s.all_version_object_ids()).await??.into_iter().map(|o| o.0).collect();
    let s = store.clone();
    let (stored_intents, unreadable_intents) = blocking(move || s.list_intents()).await??;
    for bad in &unreadable_intents {
        report.forged_intents += 1;
        tracing::error!(object = %bad.object, what = bad.what, "a creation intent does not decode; nothing is done on its account");
    }
    // Only this server's intents are judged: another server's may be a creation it is making
    // right now, recorded in a trail this server cannot read.
    let me = audit.server().to_owned();
    let mut intents: HashMap<Vec<u8>, IntentRecord> = HashMap::new();
    let mut others: HashMap<Vec<u8>, IntentRecord> = HashMap::new();
    for stored in stored_intents {
        match keyauth.verify_intent(stored).await {
            Ok(i) if i.server != me => {
                report.other_servers_intents += 1;
                others.insert(i.object_id.0.clone(), i);
            }
            Ok(i) => {
                intents.insert(i.object_id.0.clone(), i);
            }
            Err(KeyAuthError::ForgedIntent { object }) => {
                report.forged_intents += 1;
                tracing::error!(object = %object, "a creation intent failed authentication (the store was edited outside the service); nothing is done on its account");
            }
            Err(e) => return Err(e.into()),
        }
    }

    // Objects no row names: debris of an unacknowledged creation (destroyed), or unknown (kept).
    for (id, label) in &on_token {
        if known.contains(id) {
            continue;
        }
        let object = ObjectId(id.clone());
        if let Some(other) = others.get(id) {
            tracing::info!(object = %object, server = %crate::bounded::text(&other.server, 64), request = %other.request_id, "kept: another server's creation, left to that server to commit or judge");
            continue;
        }
        match intents.get(id) {
            Some(intent) => match audit.acknowledged(&intent.request_id, intent.audit_seq).await {
                Ok(false) => {
                    match hsm.destroy_key(&object).await {
                        Ok(()) | Err(HsmError::ObjectNotFound { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                    forget_intent(store, &object, &mut report).await?;
                    report.debris_destroyed += 1;
                    tracing::warn!(object = %object, request = %intent.request_id, "repaired: destroyed the object of a creation that was never acknowledged (its request was interrupted before its row was committed)");
                }
                Ok(true) => {
                    report.unknown_objects += 1;
                    report.acknowledged_unrecorded += 1;
                    tracing::error!(object = %object, label = %label, request = %intent.request_id, "kept: an object whose creation was acknowledged is missing from the key store (is the store older than the token?); adopt it with `kmsctl token adopt`");
                }
                Err(e) => {
                    report.unknown_objects += 1;
                    report.undecided += 1;
                    tracing::error!(object = %object, error = %e, "kept: cannot tell from the audit trail whether this object's creation was acknowledged");
                }
            },
            None => {
                report.unknown_objects += 1;
                tracing::warn!(object = %object, label = %label, "kept: a key object of this service that the key store does not know (never used; adopt it with `kmsctl token adopt`, or have two officers destroy it)");
            }
        }
    }

    // Intents whose object is not on the token, or is named by a row: nothing left to judge.
    let mut missing_creations = 0usize;
    for (id, intent) in &intents {
        if on_token.contains_key(id) && !known.contains(id) {
            continue; // judged above (destroyed, or kept with its object)
        }
        if !on_token.contains_key(id) && !known.contains(id) {
            // A creation that never reached the token, or was killed inside C_GenerateKey.
            if let Ok(false) = audit.acknowledged(&intent.request_id, intent.audit_seq).await {
                missing_creations += 1;
            }
        }
        forget_intent(store, &intent.object_id, &mut report).await?;
    }
    let mut incomplete = hsm.count_incomplete_objects().await?;
    if incomplete > 0 && missing_creations > 0 && !me.is_empty() {
        // Servers may share the token: an object with neither id nor label may be one that
        // another server is making this instant (SoftHSM writes an object in steps, within one
        // C_GenerateKey). Such an object is whole well within an HSM call's deadline; what is
        // still incomplete after INCOMPLETE_SETTLE is debris of an interrupted generation.
        tokio::time::sleep(INCOMPLETE_SETTLE).await;
        incomplete = incomplete.min(hsm.count_incomplete_objects().await?);
    }
    if incomplete > 0 {
        let destroyed = hsm.destroy_incomplete_objects(incomplete.min(missing_creations)).await?;
        report.incomplete_destroyed = destroyed;
        report.incomplete_kept = incomplete - destroyed;
        if destroyed > 0 {
            tracing::warn!(objects = destroyed, "repaired: destroyed token objects with neither id nor label left by a key generation that was interrupted half-way");
        }
        if report.incomplete_kept > 0 {
            tracing::warn!(objects = report.incomplete_kept, "kept: secret-key objects with neither id nor label that no interrupted creation of this service accounts for");
        }
    }

    tracing::info!(
        keys = report.keys,
        forged_rows = report.forged_rows,
        missing_objects = report.missing_objects,
        leftovers_destroyed = report.leftovers_destroyed,
        debris_destroyed = report.debris_destroyed,
        incomplete_destroyed = report.incomplete_destroyed,
        unknown_objects = report.unknown_objects,
        acknowledged_unrecorded = report.acknowledged_unrecorded,
        undecided = report.undecided,
        forged_intents = report.forged_intents,
        other_servers_intents = report.other_servers_intents,
        incomplete_kept = report.incomplete_kept,
        foreign_objects = report.foreign_objects,
        "start-up reconciliation of store and token done"
    );
    Ok(report)
}

/// How long a named server (one that may share its token) waits before it counts objects with
/// neither id nor label again (longer than any HSM call's deadline).
const INCOMPLETE_SETTLE: std::time::Duration = std::time::Duration::from_secs(3);

/// While serving: destroys the objects of creations that were answered with a failure but could
/// not destroy their object themselves (an HSM lost in the middle), and deletes their intents. Only
/// intents whose request has a final, unsuccessful record in the trail are judged: a creation still
/// running has only its `begun` record, and is left alone. `only` limits the sweep to one object.
/// Returns how many objects it destroyed.
pub async fn sweep_abandoned(
    store: &Store,
    hsm: &Hsm,
    keyauth: &KeyAuth,
    audit: &AuditLog,
    only: Option<&ObjectId>,
) -> Result<usize, ReconcileError> {
    let s = store.clone();
    let (intents, _) = blocking(move || s.list_intents()).await??;
    if intents.is_empty() {
        return Ok(0);
    }
    let s = store.clone();
    let known: HashSet<Vec<u8>> = blocking(move || s.all_version_object_ids()).await??.into_iter().map(|o| o.0).collect();
    let mut destroyed = 0;
    let mut report = Report::default();
    for stored in intents {
        if only.is_some_and(|o| *o != stored.record.object_id) {
            continue;
        }
        let Ok(intent) = keyauth.verify_intent(stored).await else { continue };
        if intent.server != audit.server() {
            // Another server's: its own sweep judges it against its own trail.
            continue;
        }
        if known.contains(intent.object_id.as_bytes()) {
            forget_intent(store, &intent.object_id, &mut report).await?;
            continue;
        }
        // Only a final, unsuccessful record decides; anything else (still running, or the trail
        // unreadable now) waits for the next pass.
        if let Ok(Some(kms_audit::Outcome::Failed | kms_audit::Outcome::Refused)) =
            audit.final_outcome(&intent.request_id, intent.audit_seq).await
        {
            let existed = match hsm.destroy_key(&intent.object_id).await {
                Ok(()) => true,
                Err(HsmError::ObjectNotFound { .. }) => false,
                Err(e) => return Err(e.into()),
            };
            forget_intent(store, &intent.object_id, &mut report).await?;
            if existed {
                destroyed += 1;
                tracing::warn!(object = %intent.object_id, request = %intent.request_id, "repaired: a creation that failed left its object behind; destroyed");
            } else {
                tracing::info!(object = %intent.object_id, request = %intent.request_id, "a creation that failed before its object was made: its intent is cleared");
            }
        }
    }
    Ok(destroyed)
}

async fn forget_intent(store: &Store, object: &ObjectId, report: &mut Report) -> Result<(), ReconcileError> {
    let s = store.clone();
    let id = object.clone();
    blocking(move || s.forget_intent(&id)).await??;
    report.intents_cleared += 1;
    Ok(())
}

/// The service's objects on the token that no key version names, with what their labels say
/// (checked by the HSM) and whether they can be adopted.
pub async fn unknown_objects(store: &Store, hsm: &Hsm, keyauth: &KeyAuth) -> Result<Vec<UnknownObject>, ReconcileError> {
    let s = store.clone();
    let known: HashSet<Vec<u8>> = blocking(move || s.all_version_object_ids()).await??.into_iter().map(|o| o.0).collect();
    let mut out = Vec::new();
    for o in hsm.list_key_objects().await? {
        if !object_label::is_service_object(&o.id, &o.label) || known.contains(&o.id) {
            continue;
        }
        let object_id = ObjectId(o.id.clone());
        let label = crate::bounded::owned(&String::from_utf8_lossy(&o.label), crate::bounded::MESSAGE);
        let (adoption, not_adoptable) = match judge_label(hsm, keyauth, &object_id, &o.label).await? {
            Ok(record) => (Some(record), None),
            Err(why) => (None, Some(why)),
        };
        out.push(UnknownObject { object_id, label, adoption, not_adoptable });
    }
    Ok(out)
}

/// The adoption record of an object, if its label carries one that the HSM vouches for and the
/// object is what the record says (a sensitive, non-extractable token key of that purpose).
async fn judge_label(
    hsm: &Hsm,
    keyauth: &KeyAuth,
    object_id: &ObjectId,
    label: &[u8],
) -> Result<Result<AdoptionRecord, String>, ReconcileError> {
    let Ok(label) = std::str::from_utf8(label) else { return Ok(Err("its label is not UTF-8".into())) };
    let (record, mac) = match object_label::parse(object_id.as_bytes(), label) {
        Ok(ParsedLabel::Adoptable { record, mac }) => (record, mac),
        Ok(ParsedLabel::Legacy { .. }) => {
            return Ok(Err("it was made before objects carried adoption records; restore the key store from a backup that has it".into()))
        }
        Err(e) => return Ok(Err(format!("its label is not one of this service's: {e}"))),
    };
    match keyauth.verify_adoption(&record, mac).await {
        Ok(()) => {}
        Err(KeyAuthError::ForgedLabel { .. }) => {
            return Ok(Err("its label's adoption record fails the HSM's check: it was not made by this service as labelled".into()))
        }
        Err(e) => return Err(e.into()),
    }
    let info = hsm.inspect_key(object_id).await?;
    if let Some(why) = unsafe_to_adopt(&info, record.purpose) {
        return Ok(Err(why));
    }
    Ok(Ok(record))
}

fn unsafe_to_adopt(info: &KeyObjectInfo, purpose: KeyPurpose) -> Option<String> {
    if !info.sensitive || info.extractable || !info.token || info.value_readable {
        return Some("it is not a sensitive, non-extractable token key".into());
    }
    let fits = match purpose {
        KeyPurpose::Envelope => info.wrap && info.unwrap && !info.encrypt && !info.decrypt,
        KeyPurpose::HsmEncrypt => info.encrypt && info.decrypt && !info.wrap && !info.unwrap,
    };
    (!fits || info.sign || info.verify).then(|| format!("its usage flags do not fit its purpose {purpose}"))
}

/// The outcome of adopting one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adopted {
    /// Added to a key the store knows (as an ENABLED version) or as a new key.
    Done { key: String, version: u32, new_key: bool },
    Refused { object: ObjectId, reason: String },
}

/// Adopts `records` (already vouched for by [`unknown_objects`]) into the store, grouped by key:
/// a version the store lacks is added to its key as ENABLED (and becomes the primary if it is newer
/// than the key's primary: rotations only move the primary forward); a key the store lacks is made
/// from its versions' records, ENABLED, with its level's default rotation period. Refused: a key
/// that is DESTROYED or not ENABLED/DISABLED, a name already taken by another key, a record whose
/// level or purpose differs from the stored key's.
pub fn plan_adoption(existing: Option<&KeyRecord>, records: &[AdoptionRecord], now: i64) -> Result<KeyRecord, String> {
    let first = records.first().ok_or("nothing to adopt")?;
    let mut key = match existing {
        Some(k) => {
            if !matches!(k.state, KeyState::Enabled | KeyState::Disabled) {
                return Err(format!("key {} is {}; versions are adopted only into keys in use", k.name, k.state));
            }
            k.clone()
        }
        None => KeyRecord {
            id: first.key_id,
            name: first.name.clone(),
            classification: first.level,
            purpose: first.purpose,
            state: KeyState::Enabled,
            primary_version: 0,
            rotation_period_days: 0,
            created_at: records.iter().map(|r| r.created_at).min().unwrap_or(now),
            rotated_at: 0,
            destroy_at: None,
            revision: 0,
            versions: Vec::new(),
        },
    };
    for r in records {
        if r.key_id != key.id || r.name != key.name || r.level != key.classification || r.purpose != key.purpose {
            return Err(format!(
                "object {} says key {} ({}, {}), which does not match the stored key {} ({}, {})",
                r.object_id(),
                r.name,
                r.level,
                r.purpose,
                key.name,
                key.classification,
                key.purpose
            ));
        }
        if key.version(r.version).is_some() {
            return Err(format!("key {} already has version {}", key.name, r.version));
        }
        key.versions.push(crate::store::VersionRecord {
            version: r.version,
            object_id: r.object_id(),
            state: KeyState::Enabled,
            created_at: r.created_at,
            destroy_at: None,
        });
    }
    key.versions.sort_by_key(|v| v.version);
    let newest = records.iter().max_by_key(|r| r.version).ok_or("nothing to adopt")?;
    if newest.version > key.primary_version {
        key.primary_version = newest.version;
        key.rotated_at = newest.created_at;
    }
    key.revision += 1;
    Ok(key)
}

/// The level of an adoption, for the caller's authorisation before anything is changed.
pub fn adoption_level(records: &[AdoptionRecord]) -> Option<Classification> {
    records.iter().map(|r| r.level).max()
}

/// Groups vouched-for records by key id, in key-id order.
pub fn by_key(records: Vec<AdoptionRecord>) -> Vec<Vec<AdoptionRecord>> {
    let mut groups: BTreeMap<[u8; 16], Vec<AdoptionRecord>> = BTreeMap::new();
    for r in records {
        groups.entry(r.key_id.0).or_default().push(r);
    }
    groups.into_values().collect()
}

/// For log lines: the hex of an id.
pub fn id_hex(id: &[u8]) -> String {
    hex(id)
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R, ReconcileError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| ReconcileError::TaskFailed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::KeyId;

    fn rec(version: u32, created_at: i64) -> AdoptionRecord {
        AdoptionRecord {
            key_id: KeyId([5; 16]),
            version,
            name: "tax".into(),
            level: Classification::Personal,
            purpose: KeyPurpose::Envelope,
            created_at,
        }
    }

    #[test]
    fn a_lost_key_is_rebuilt_from_its_objects_with_the_newest_version_primary() {
        let key = plan_adoption(None, &[rec(2, 20), rec(1, 10)], 99).unwrap();
        assert_eq!(key.name, "tax");
        assert_eq!(key.versions.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2]);
        assert!(key.versions.iter().all(|v| v.state == KeyState::Enabled));
        assert_eq!((key.primary_version, key.rotated_at, key.created_at, key.revision), (2, 20, 10, 1));
    }

    #[test]
    fn versions_made_after_a_backup_join_their_key() {
        let mut stored = plan_adoption(None, &[rec(1, 10)], 99).unwrap();
        stored.versions[0].state = KeyState::Enabled;
        let key = plan_adoption(Some(&stored), &[rec(3, 30), rec(2, 20)], 99).unwrap();
        assert_eq!(key.versions.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!((key.primary_version, key.revision), (3, stored.revision + 1));
        assert!(plan_adoption(Some(&key), &[rec(2, 20)], 99).unwrap_err().contains("already has version 2"));
        let mut other = rec(4, 40);
        other.level = Classification::Secret;
        assert!(plan_adoption(Some(&key), &[other], 99).unwrap_err().contains("does not match"));
        let mut destroyed = key.clone();
        destroyed.state = KeyState::Destroyed;
        assert!(plan_adoption(Some(&destroyed), &[rec(4, 40)], 99).unwrap_err().contains("DESTROYED"));
    }
}
