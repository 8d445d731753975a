//! Objects: `C_CreateObject`, `C_CopyObject`, `C_DestroyObject`, `C_GetAttributeValue`,
//! `C_SetAttributeValue`, and the search `C_FindObjectsInit`/`C_FindObjects`/`C_FindObjectsFinal`.
//!
//! A search is one request at `C_FindObjectsInit` that returns every match; `C_FindObjects` hands
//! them out from the session's state. `C_GetAttributeValue` keeps its answer for the call right
//! after it when the caller asked for lengths first.

use std::collections::VecDeque;

use cryptoki_sys::*;
use hsm_sim_wire::{AttrResult, Attribute, Reply, Request};

use super::expect;
use crate::module::{local_object, remote_object, Module, Rv};
use crate::session_state::{Cached, SessionState};

fn object_reply(st: &SessionState, reply: Reply) -> Result<CK_OBJECT_HANDLE, Rv> {
    let remote = expect(reply, |r| match r {
        Reply::Object(o) => Some(o),
        _ => None,
    })?;
    local_object(st, remote)
}

impl Module {
    pub(crate) fn create_object(&self, h: CK_SESSION_HANDLE, template: Vec<Attribute>) -> Result<CK_OBJECT_HANDLE, Rv> {
        self.with_session(h, |m, st| {
            let reply = m.call_in(st, Request::CreateObject { session: st.remote, template })?;
            object_reply(st, reply)
        })
    }

    pub(crate) fn copy_object(
        &self,
        h: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: Vec<Attribute>,
    ) -> Result<CK_OBJECT_HANDLE, Rv> {
        self.with_session(h, |m, st| {
            let object = remote_object(st, object, CKR_OBJECT_HANDLE_INVALID)?;
            let reply = m.call_in(st, Request::CopyObject { session: st.remote, object, template })?;
            object_reply(st, reply)
        })
    }

    pub(crate) fn destroy_object(&self, h: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE) -> Result<(), Rv> {
        self.with_session(h, |m, st| {
            let object = remote_object(st, object, CKR_OBJECT_HANDLE_INVALID)?;
            m.call_in(st, Request::DestroyObject { session: st.remote, object }).map(drop)
        })
    }

    /// The answers for `types`, in order; `fill` writes them into the caller's template and says
    /// whether the caller will probably ask again (it asked for lengths, or a buffer was short),
    /// in which case the answers are kept for that next call.
    pub(crate) fn get_attribute_values<T>(
        &self,
        h: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        types: Vec<u64>,
        fill: impl FnOnce(&[AttrResult]) -> (T, bool),
    ) -> Result<T, Rv> {
        self.with_session_cached(h, |m, st| {
            let remote = match remote_object(st, object, CKR_OBJECT_HANDLE_INVALID) {
                Ok(r) => r,
                Err(rv) => {
                    st.drop_cache();
                    return Err(rv);
                }
            };
            let results = match st.take_attributes(remote, &types) {
                Some(r) => r,
                None => {
                    let reply = m.call_in(
                        st,
                        Request::GetAttributeValue { session: st.remote, object: remote, types: types.clone() },
                    )?;
                    let r = expect(reply, |r| match r {
                        Reply::Attributes(a) => Some(a),
                        _ => None,
                    })?;
                    if r.len() != types.len() {
                        return Err(CKR_DEVICE_ERROR);
                    }
                    r
                }
            };
            let (out, again) = fill(&results);
            if again {
                st.cached = Some(Cached::Attributes {
                    object: remote,
                    results: types.into_iter().zip(results).collect(),
                    made: std::time::Instant::now(),
                });
            }
            Ok(out)
        })
    }

    pub(crate) fn set_attribute_values(
        &self,
        h: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: Vec<Attribute>,
    ) -> Result<(), Rv> {
        self.with_session(h, |m, st| {
            let object = remote_object(st, object, CKR_OBJECT_HANDLE_INVALID)?;
            m.call_in(st, Request::SetAttributeValue { session: st.remote, object, template }).map(drop)
        })
    }

    pub(crate) fn find_init(&self, h: CK_SESSION_HANDLE, template: Vec<Attribute>) -> Result<(), Rv> {
        self.with_session(h, |m, st| {
            if st.find.is_some() {
                return Err(CKR_OPERATION_ACTIVE);
            }
            let reply = m.call_in(st, Request::FindObjects { session: st.remote, template })?;
            let found = expect(reply, |r| match r {
                Reply::Objects(o) => Some(o),
                _ => None,
            })?;
            let found = found.into_iter().map(|o| local_object(st, o)).collect::<Result<VecDeque<_>, _>>()?;
            st.find = Some(found);
            Ok(())
        })
    }

    /// Up to `max` more handles of the running search.
    pub(crate) fn find_next(&self, h: CK_SESSION_HANDLE, max: usize) -> Result<Vec<CK_OBJECT_HANDLE>, Rv> {
        self.with_session(h, |_, st| {
            let found = st.find.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
            let n = max.min(found.len());
            Ok(found.drain(..n).collect())
        })
    }

    pub(crate) fn find_final(&self, h: CK_SESSION_HANDLE) -> Result<(), Rv> {
        self.with_session(h, |_, st| st.find.take().map(drop).ok_or(CKR_OPERATION_NOT_INITIALIZED))
    }
}
