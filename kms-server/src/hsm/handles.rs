//! The cache from `CKA_ID` to object handle, shared by all workers (token-object handles are valid in
//! every session of the process), the evict-find-retry-once rule for stale handles, and the session
//! copies of keys that requests work with.
//!
//! `C_FindObjects` runs only on a cache miss, so never on the request path after warm-up. Must never
//! cache a session object's handle as a token object's, and never retry more than once.
//!
//! **Session copies.** SoftHSM reads a token key's file again on every use (a file open, lock, read
//! and close per wrap, MAC or GCM operation); a session copy (`C_CopyObject` with `CKA_TOKEN=false`)
//! lives in memory, and measured 40-60% more requests per second end to end. The copy keeps every
//! security attribute of its token key: sensitive, non-extractable (neither can be undone), the same
//! usage flags, the same token. It exists only in this process and dies with its session, so a
//! crash leaves nothing behind. Destroying a key destroys its copy first, under the same lock that
//! makes copies, so no copy outlives its token object. Keys made before copies were allowed
//! (`CKA_COPYABLE` or `CKA_MODIFIABLE` false: SoftHSM refuses to change `CKA_TOKEN` in a copy of a
//! non-modifiable object) are used in place. At most [`MAX_COPIES`] copies exist at once.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use cryptoki::error::RvError;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;

use super::error::HsmError;
use super::templates;
use crate::ids::ObjectId;

/// Most session copies at once: each holds a key's attributes in SoftHSM's memory (a few KiB), so
/// the working set is bounded; past it, every copy is destroyed and copies are made again on use.
pub(crate) const MAX_COPIES: usize = 1024;

#[derive(Default)]
pub(crate) struct HandleCache {
    // Keyed by the raw CKA_ID bytes so that a lookup needs no allocation.
    map: RwLock<HashMap<Vec<u8>, ObjectHandle>>,
    /// The handle requests work with, by token object `CKA_ID`: a session copy, or the token
    /// object itself for a key that cannot be copied.
    working: RwLock<HashMap<Vec<u8>, Working>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Working {
    Copy(ObjectHandle),
    InPlace(ObjectHandle),
}

impl Working {
    fn handle(self) -> ObjectHandle {
        match self {
            Working::Copy(h) | Working::InPlace(h) => h,
        }
    }
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

    /// Runs `op` with the handle of the key's session copy (made on first use) or, for a key that
    /// cannot be copied, of the token object; a stale handle is forgotten, and the copy made again,
    /// once. For cryptography with a key; never for changing or destroying it.
    pub(crate) fn with_working_copy<T>(
        &self,
        session: &Session,
        id: &[u8],
        mut op: impl FnMut(ObjectHandle) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let working = self.working_handle(session, id)?;
        match op(working.handle()) {
            Err(e) if e.is_stale_handle() => {
                tracing::debug!(id = %crate::ids::hex(id), "stale working handle: making it again");
                self.forget_working(session, id, working);
                let working = self.working_handle(session, id)?;
                op(working.handle())
            }
            other => other,
        }
    }

    fn working_handle(&self, session: &Session, id: &[u8]) -> Result<Working, HsmError> {
        if let Some(w) = self.working.read().unwrap_or_else(PoisonError::into_inner).get(id) {
            return Ok(*w);
        }
        // Made under the write lock, which destruction also holds: a copy is never made of an
        // object that is being destroyed, nor kept after it.
        let mut working = self.working.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = working.get(id) {
            return Ok(*w);
        }
        let made = match copy_or_in_place(session, self.resolve(session, id)?) {
            // The cached token handle is stale: find the object again, once.
            Err(e) if e.is_stale_handle() => {
                self.evict(id);
                copy_or_in_place(session, self.resolve(session, id)?)?
            }
            other => other?,
        };
        if working.len() >= MAX_COPIES {
            destroy_copies(session, working.drain().map(|(_, w)| w));
        }
        working.insert(id.to_vec(), made);
        Ok(made)
    }

    /// Forgets a working handle that turned out stale (destroying it if it is a copy) and the token
    /// handle it came from.
    fn forget_working(&self, session: &Session, id: &[u8], stale: Working) {
        let mut working = self.working.write().unwrap_or_else(PoisonError::into_inner);
        if working.get(id) == Some(&stale) {
            working.remove(id);
            destroy_copies(session, [stale]);
        }
        self.evict(id);
    }

    /// Runs `destroy_token_object` with the token object's handle after destroying the key's
    /// session copy, all under the lock that copies are made under.
    pub(crate) fn destroy_with_copy(
        &self,
        session: &Session,
        id: &[u8],
        destroy_token_object: impl FnMut(ObjectHandle) -> Result<(), HsmError>,
    ) -> Result<(), HsmError> {
        let mut working = self.working.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = working.remove(id) {
            destroy_copies(session, [w]);
        }
        let result = self.with_object(session, id, destroy_token_object);
        self.evict(id);
        drop(working);
        result
    }

    /// Test hook: makes `stale` (a handle that is no longer valid) the cached token handle and the
    /// working handle of `id`.
    pub(crate) fn poison_for_tests(&self, id: &[u8], stale: ObjectHandle) {
        self.working.write().unwrap_or_else(PoisonError::into_inner).insert(id.to_vec(), Working::Copy(stale));
        self.insert(id, stale);
    }

    /// Whether `handle` is one of the keys' session copies.
    pub(crate) fn is_copy(&self, handle: ObjectHandle) -> bool {
        self.working.read().unwrap_or_else(PoisonError::into_inner).values().any(|w| *w == Working::Copy(handle))
    }

    /// How many session copies exist (for tests and diagnostics).
    pub(crate) fn copies(&self) -> usize {
        self.working.read().unwrap_or_else(PoisonError::into_inner).values().filter(|w| matches!(w, Working::Copy(_))).count()
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

/// A session copy of the token object `token`, or the object itself if the token refuses to copy it
/// (a key made before copies were allowed).
fn copy_or_in_place(session: &Session, token: ObjectHandle) -> Result<Working, HsmError> {
    match session.copy_object(token, &[Attribute::Token(false)]) {
        Ok(copy) => Ok(Working::Copy(copy)),
        Err(e) => {
            let e = HsmError::from(e);
            if e.is_failure_of(cryptoki::context::Function::CopyObject, &[RvError::ActionProhibited, RvError::AttributeReadOnly]) {
                Ok(Working::InPlace(token))
            } else {
                Err(e)
            }
        }
    }
}

/// Destroys the session copies among `working` (a copy already gone is fine).
fn destroy_copies(session: &Session, working: impl IntoIterator<Item = Working>) {
    for w in working {
        if let Working::Copy(h) = w {
            if let Err(e) = session.destroy_object(h) {
                let e = HsmError::from(e);
                if !e.is_stale_handle() {
                    tracing::warn!(error = %e, "could not destroy a key's session copy");
                }
            }
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
