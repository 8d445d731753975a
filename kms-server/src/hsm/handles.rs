//! The cache from `CKA_ID` to object handle, shared by all workers (token-object handles are valid in
//! every session of the process), and the evict-find-retry-once rule for stale handles.
//!
//! `C_FindObjects` runs only on a cache miss, so never on the request path after warm-up. Must never
//! cache a handle for a session object, and never retry more than once.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use super::error::HsmError;
use super::templates;
use crate::ids::ObjectId;

#[derive(Default)]
pub(crate) struct HandleCache {
    // Keyed by the raw CKA_ID bytes so that a lookup needs no allocation.
    map: RwLock<HashMap<Vec<u8>, ObjectHandle>>,
}

impl HandleCache {
    pub(crate) fn get(&self, id: &[u8]) -> Option<ObjectHandle> {
        self.map.read().unwrap_or_else(PoisonError::into_inner).get(id).copied()
    }

    pub(crate) fn insert(&self, id: &[u8], handle: ObjectHandle) {
        self.map.write().unwrap_or_else(PoisonError::into_inner).insert(id.to_vec(), handle);
    }

    pub(crate) fn evict(&self, id: &[u8]) {
        self.map.write().unwrap_or_else(PoisonError::into_inner).remove(id);
    }

    /// The handle of the token object with this `CKA_ID`: from the cache, or found and cached.
    pub(crate) fn resolve(&self, session: &Session, id: &[u8]) -> Result<ObjectHandle, HsmError> {
        if let Some(h) = self.get(id) {
            return Ok(h);
        }
        match find(session, id)? {
            Some(h) => {
                self.insert(id, h);
                Ok(h)
            }
            None => Err(HsmError::ObjectNotFound { id: ObjectId(id.to_vec()) }),
        }
    }

    /// Runs `op` with the object's handle; if the handle turns out stale (the object was destroyed and
    /// recreated, or the handle is bogus), evicts it, finds the object again and retries once.
    pub(crate) fn with_object<T>(
        &self,
        session: &Session,
        id: &[u8],
        mut op: impl FnMut(ObjectHandle) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let handle = self.resolve(session, id)?;
        match op(handle) {
            Err(e) if e.is_stale_handle() => {
                tracing::debug!(id = %crate::ids::hex(id), "stale object handle: evicting and finding again");
                self.evict(id);
                let handle = self.resolve(session, id)?;
                op(handle)
            }
            other => other,
        }
    }
}

/// `C_FindObjects` for the token object with this `CKA_ID`: `None` if absent, an error if ambiguous.
pub(crate) fn find(session: &Session, id: &[u8]) -> Result<Option<ObjectHandle>, HsmError> {
    let found = session.find_objects(&templates::find_by_id(id))?;
    match found.as_slice() {
        [] => Ok(None),
        [h] => Ok(Some(*h)),
        more => Err(HsmError::DuplicateObjects { id: ObjectId(id.to_vec()), count: more.len() }),
    }
}
