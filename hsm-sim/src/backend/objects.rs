//! The backend's table of object handles: every `ObjectHandle` SoftHSM gave this client, by its
//! number on the wire.
//!
//! `cryptoki` makes an `ObjectHandle` only from SoftHSM's answers (turning a number into one is
//! `unsafe`), so the table is also the check that a client names only objects it was shown: an
//! unknown number is an invalid handle, never passed to SoftHSM. It also remembers which objects
//! are session objects this client made, and of which session, so that a session's objects leave
//! the table when it closes and destroying them needs no token write lock. Must never grow past
//! [`MAX_OBJECTS`] entries.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use cryptoki::object::ObjectHandle;
use cryptoki_sys::CKR_DEVICE_MEMORY;

use super::convert::Ckr;

/// Most handles one client may hold (each is a few dozen bytes here; SoftHSM holds the objects).
pub(super) const MAX_OBJECTS: usize = 1 << 20;

#[derive(Default)]
pub(super) struct ObjectTable {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    handles: HashMap<u64, ObjectHandle>,
    /// Session objects made by this client, by the session that made them.
    by_session: HashMap<u64, HashSet<u64>>,
    /// The session that made each of those.
    session_of: HashMap<u64, u64>,
}

impl ObjectTable {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn get(&self, wire: u64) -> Option<ObjectHandle> {
        self.inner().handles.get(&wire).copied()
    }

    /// Records a handle SoftHSM answered with; `made_in` is the session of a session object this
    /// client just made (`None` for token objects and for objects found by a search).
    pub(super) fn add(&self, h: ObjectHandle, made_in: Option<u64>) -> Result<u64, Ckr> {
        let wire = h.handle();
        let mut t = self.inner();
        if !t.handles.contains_key(&wire) && t.handles.len() >= MAX_OBJECTS {
            return Err(CKR_DEVICE_MEMORY);
        }
        t.handles.insert(wire, h);
        if let Some(s) = made_in {
            t.by_session.entry(s).or_default().insert(wire);
            t.session_of.insert(wire, s);
        }
        Ok(wire)
    }

    /// Whether `wire` is a session object this client made (so certainly not a token object).
    pub(super) fn is_own_session_object(&self, wire: u64) -> bool {
        self.inner().session_of.contains_key(&wire)
    }

    pub(super) fn remove(&self, wire: u64) {
        let mut t = self.inner();
        t.handles.remove(&wire);
        if let Some(s) = t.session_of.remove(&wire) {
            if let Some(set) = t.by_session.get_mut(&s) {
                set.remove(&wire);
            }
        }
    }

    /// Forgets the session objects of a closed session (SoftHSM destroyed them).
    pub(super) fn session_closed(&self, session: u64) {
        let mut t = self.inner();
        if let Some(set) = t.by_session.remove(&session) {
            for wire in set {
                t.handles.remove(&wire);
                t.session_of.remove(&wire);
            }
        }
    }
}
