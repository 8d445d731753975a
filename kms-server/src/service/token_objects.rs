//! `KeyAdmin` for the token's objects that no key version names (kept by start-up, never used):
//! listing them, adopting them back into the store from their labels' adoption records, and having
//! two officers destroy one.
//!
//! Adoption is how a store restored from an older backup, or a lost store, gets its keys back: the
//! HSM vouches for each label (an HMAC with the binding key over key id, version, name, level,
//! purpose and creation time), the object must be the sensitive, non-extractable key its purpose
//! says, and the officer needs the rights of creating such a key. Destroying one always needs a
//! second officer: it may be the only copy of a key that blobs depend on. Must never destroy an
//! object that a version row names, and never adopt one the HSM does not vouch for.
#![forbid(unsafe_code)]

use std::collections::HashSet;

use kms_proto::v1 as pb;
use tonic::Request;

use super::approvals::{file_request, request_to_proto};
use super::key_admin::KeyAdminService;
use super::key_lifecycle::unix_now;
use super::AppState;
use crate::authz::AdminAction;
use crate::classification::Classification;
use crate::hsm::HsmError;
use crate::ids::{unhex, ObjectId};
use crate::object_label::AdoptionRecord;
use crate::reconcile::{self, UnknownObject};
use crate::status::ApiError;
use crate::store::{RequestKind, StoreError};

impl KeyAdminService {
    pub(super) async fn list_unknown(&self, request: Request<pb::ListUnknownObjectsRequest>) -> Result<pb::ListUnknownObjectsResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let grant = self.state.policy.authorize_admin(&caller, AdminAction::ReadKeys, None)?;
        let objects = unknown(&self.state).await?;
        Ok(pb::ListUnknownObjectsResponse {
            objects: objects
                .iter()
                // An object whose label the HSM does not vouch for names no key the officer could
                // be refused; one that names a key is shown only within the officer's keys.
                .filter(|o| o.adoption.as_ref().is_none_or(|a| grant.allows_key(&a.name) && a.level <= caller.profile().clearance))
                .map(object_to_proto)
                .collect(),
        })
    }

    pub(super) async fn adopt(&self, request: Request<pb::AdoptObjectsRequest>) -> Result<pb::AdoptObjectsResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        self.state.policy.authorize_admin(&caller, AdminAction::ReadKeys, None)?;
        let req = request.into_inner();
        if req.all != req.object_ids.is_empty() {
            return Err(ApiError::invalid("object_ids", "name the objects to adopt, or set all (not both)"));
        }
        if req.object_ids.len() > 1000 {
            return Err(ApiError::invalid("object_ids", "at most 1000 at once"));
        }
        let mut wanted = HashSet::new();
        for id in &req.object_ids {
            wanted.insert(parse_object_id(id)?);
        }
        let _lock = self.state.lifecycle_lock.lock().await;
        let objects = unknown(&self.state).await?;
        let mut results = Vec::new();
        let mut adoptable = Vec::new();
        for o in &objects {
            if !req.all && !wanted.contains(&o.object_id) {
                continue;
            }
            wanted.remove(&o.object_id);
            match &o.adoption {
                Some(a) => adoptable.push(a.clone()),
                None if !req.all => results.push(refused(&o.object_id, tonic::Code::FailedPrecondition, o.not_adoptable.clone().unwrap_or_default())),
                None => {}
            }
        }
        for missing in wanted {
            results.push(refused(&missing, tonic::Code::NotFound, "no such unknown object on the token (a key version may already name it)".into()));
        }
        let mut noted = Vec::new();
        for group in reconcile::by_key(adoptable) {
            match self.adopt_key(&caller, &group).await {
                Ok(()) => {
                    for r in &group {
                        noted.push(format!("{} v{}", r.name, r.version));
                        results.push(pb::AdoptResult {
                            object_id: r.object_id().to_string(),
                            code: 0,
                            message: String::new(),
                            key: r.name.clone(),
                            version: r.version,
                        });
                    }
                }
                Err(e) => {
                    let status = e.to_status("-");
                    for r in &group {
                        let mut res = refused(&r.object_id(), status.code(), status.message().to_owned());
                        res.key = r.name.clone();
                        res.version = r.version;
                        results.push(res);
                    }
                }
            }
        }
        noted.sort();
        crate::audit::facts::note_subject(&format!("adopted {}", if noted.is_empty() { "nothing".to_owned() } else { noted.join(", ") }));
        Ok(pb::AdoptObjectsResponse { results })
    }

    /// Adopts the objects of one key (all or none).
    async fn adopt_key(&self, caller: &crate::authz::Caller, group: &[AdoptionRecord]) -> Result<(), ApiError> {
        let first = group.first().ok_or(ApiError::Internal("an empty adoption group"))?;
        let level = reconcile::adoption_level(group).unwrap_or(Classification::TopSecret);
        self.state
            .policy
            .authorize_admin(caller, AdminAction::CreateKey { level, purpose: first.purpose }, Some(&first.name))?;
        let key_id = first.key_id;
        let existing = match self.state.key_by_id(key_id).await {
            Ok(k) => Some(k.danger_open_for_server_task()),
            Err(ApiError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        if existing.is_none() {
            let name = first.name.clone();
            if self.state.store(move |s| s.key_by_name(&name)).await?.is_some() {
                return Err(ApiError::Precondition(format!(
                    "the name {} is taken by another key in the store; the object cannot be adopted under it",
                    first.name
                )));
            }
        }
        let next = reconcile::plan_adoption(existing.as_ref(), group, unix_now()).map_err(ApiError::Precondition)?;
        crate::audit::record_intent(&self.state.audit).await?;
        let mac = self.state.keyauth.seal(&next).await?;
        let row = next.clone();
        match existing {
            None => self.state.store(move |s| s.insert_key(&row, &mac)).await.map_err(|e| match e {
                ApiError::Store(StoreError::DuplicateName { name }) => ApiError::AlreadyExists(name),
                other => other,
            })?,
            Some(k) => {
                let expected = k.revision;
                self.state.store(move |s| s.update_key(&row, &mac, expected)).await?
            }
        }
        tracing::warn!(key = %next.name, versions = ?group.iter().map(|r| r.version).collect::<Vec<_>>(), by = caller.identity(), "key versions adopted from the token into the store");
        Ok(())
    }

    pub(super) async fn destroy_unknown_request(
        &self,
        request: Request<pb::DestroyUnknownObjectRequest>,
    ) -> Result<pb::KeyChangeResponse, ApiError> {
        let caller = self.state.caller(&request)?;
        let object = parse_object_id(&request.get_ref().object_id)?;
        crate::audit::facts::note_subject(&format!("object {object}: destruction requested"));
        let objects = unknown(&self.state).await?;
        let o = objects
            .iter()
            .find(|o| o.object_id == object)
            .ok_or_else(|| ApiError::NotFound(format!("no unknown object {object} on the token (a key version may name it)")))?;
        // An object whose label the HSM does not vouch for is treated as the highest level.
        let (level, name) = match &o.adoption {
            Some(a) => (a.level, Some(a.name.as_str())),
            None => (Classification::TopSecret, None),
        };
        let grant = self.state.policy.authorize_admin(&caller, AdminAction::ReadKeys, name)?;
        let p = caller.profile();
        if level > p.clearance {
            return Err(crate::authz::Denied::ClearanceTooLow { identity: p.identity.clone(), clearance: p.clearance, level }.into());
        }
        let filed = file_request(&self.state, RequestKind::DestroyObject, &object.to_string(), Vec::new(), 0, level, grant.caller().identity()).await?;
        tracing::info!(request = %filed.id, object = %object, by = caller.identity(), "destruction of an unknown object filed for a second officer");
        Ok(pb::KeyChangeResponse { key: None, pending_approval: Some(request_to_proto(&filed, None)) })
    }
}

/// Destroys an object that no version row names (the second officer approved). Under the lifecycle
/// lock, the object is checked again to be unknown.
pub async fn destroy_unknown(state: &AppState, object: &ObjectId) -> Result<(), ApiError> {
    let _lock = state.lifecycle_lock.lock().await;
    let known: HashSet<Vec<u8>> = state.store(|s| s.all_version_object_ids()).await?.into_iter().map(|o| o.0).collect();
    if known.contains(object.as_bytes()) {
        return Err(ApiError::Precondition(format!("object {object} is now named by a key version (it was adopted); it is not destroyed")));
    }
    match state.hsm.destroy_key(object).await {
        Ok(()) | Err(HsmError::ObjectNotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn unknown(state: &AppState) -> Result<Vec<UnknownObject>, ApiError> {
    reconcile::unknown_objects(&state.store, &state.hsm, &state.keyauth).await.map_err(|e| match e {
        reconcile::ReconcileError::Hsm(h) => ApiError::Hsm(h),
        reconcile::ReconcileError::Store(s) => ApiError::Store(s),
        _ => ApiError::Internal("the token's inventory failed"),
    })
}

fn parse_object_id(s: &str) -> Result<ObjectId, ApiError> {
    unhex(s)
        .filter(|b| b.len() == 20)
        .map(ObjectId)
        .ok_or_else(|| ApiError::invalid("object_id", "must be 40 hex digits (a key version's CKA_ID)"))
}

fn refused(object: &ObjectId, code: tonic::Code, message: String) -> pb::AdoptResult {
    pb::AdoptResult { object_id: object.to_string(), code: code as i32, message, key: String::new(), version: 0 }
}

fn object_to_proto(o: &UnknownObject) -> pb::UnknownObject {
    let mut out = pb::UnknownObject {
        object_id: o.object_id.to_string(),
        label: o.label.clone(),
        adoptable: o.adoption.is_some(),
        not_adoptable_reason: o.not_adoptable.clone().unwrap_or_default(),
        ..Default::default()
    };
    if let Some(a) = &o.adoption {
        out.key_id = a.key_id.to_hex();
        out.key = a.name.clone();
        out.version = a.version;
        out.classification = a.level.to_proto() as i32;
        out.purpose = a.purpose.to_proto() as i32;
        out.created_at_unix = a.created_at;
    }
    out
}
