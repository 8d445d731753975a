//! Keys and randomness: `C_GenerateKey`, `C_GenerateKeyPair`, `C_WrapKey`, `C_UnwrapKey`,
//! `C_DeriveKey`, `C_SeedRandom`, `C_GenerateRandom`.
//!
//! `C_WrapKey`'s size query and the call after it are one request: the wrapped key is cached for
//! the next call with the same mechanism and handles.

use cryptoki_sys::*;
use hsm_sim_wire::{Attribute, Blob, Mechanism, Reply, Request};

use super::expect;
use crate::module::{local_object, remote_object, Module, Rv, Space};
use crate::session_state::{CallKey, Cached};

impl Module {
    pub(crate) fn generate_key(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: Mechanism,
        template: Vec<Attribute>,
    ) -> Result<CK_OBJECT_HANDLE, Rv> {
        self.with_session(h, |m, st| {
            let reply = m.call_in(st, Request::GenerateKey { session: st.remote, mechanism, template })?;
            let key = expect(reply, |r| match r {
                Reply::Object(o) => Some(o),
                _ => None,
            })?;
            local_object(st, key)
        })
    }

    pub(crate) fn generate_key_pair(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: Mechanism,
        public_template: Vec<Attribute>,
        private_template: Vec<Attribute>,
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE), Rv> {
        self.with_session(h, |m, st| {
            let req = Request::GenerateKeyPair { session: st.remote, mechanism, public_template, private_template };
            let (public, private) = expect(m.call_in(st, req)?, |r| match r {
                Reply::KeyPair { public, private } => Some((public, private)),
                _ => None,
            })?;
            Ok((local_object(st, public)?, local_object(st, private)?))
        })
    }

    pub(crate) fn wrap_key(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: Mechanism,
        wrapping_key: CK_OBJECT_HANDLE,
        key: CK_OBJECT_HANDLE,
        space: Space,
    ) -> Result<Blob, Rv> {
        self.with_session_cached(h, |m, st| {
            let (wrapping_key, key) = match (
                remote_object(st, wrapping_key, CKR_WRAPPING_KEY_HANDLE_INVALID),
                remote_object(st, key, CKR_KEY_HANDLE_INVALID),
            ) {
                (Ok(w), Ok(k)) => (w, k),
                (Err(rv), _) | (_, Err(rv)) => {
                    st.drop_cache();
                    return Err(rv);
                }
            };
            let call = CallKey::Wrap { mechanism: mechanism.clone(), wrapping_key, key };
            let out = match st.take_output(&call) {
                Some(out) => out,
                None => {
                    let reply = m.call_in(st, Request::WrapKey { session: st.remote, mechanism, wrapping_key, key })?;
                    expect(reply, |r| match r {
                        Reply::Data(d) => Some(d),
                        _ => None,
                    })?
                }
            };
            if space.keeps(out.len()) {
                st.cached = Some(Cached::output(call, out.clone()));
            }
            Ok(out)
        })
    }

    pub(crate) fn unwrap_key(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: Mechanism,
        unwrapping_key: CK_OBJECT_HANDLE,
        wrapped: Blob,
        template: Vec<Attribute>,
    ) -> Result<CK_OBJECT_HANDLE, Rv> {
        self.with_session(h, |m, st| {
            let unwrapping_key = remote_object(st, unwrapping_key, CKR_UNWRAPPING_KEY_HANDLE_INVALID)?;
            let req = Request::UnwrapKey { session: st.remote, mechanism, unwrapping_key, wrapped, template };
            let key = expect(m.call_in(st, req)?, |r| match r {
                Reply::Object(o) => Some(o),
                _ => None,
            })?;
            local_object(st, key)
        })
    }

    pub(crate) fn derive_key(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: Mechanism,
        base_key: CK_OBJECT_HANDLE,
        template: Vec<Attribute>,
    ) -> Result<CK_OBJECT_HANDLE, Rv> {
        self.with_session(h, |m, st| {
            let base_key = remote_object(st, base_key, CKR_OBJECT_HANDLE_INVALID)?;
            let req = Request::DeriveKey { session: st.remote, mechanism, base_key, template };
            let key = expect(m.call_in(st, req)?, |r| match r {
                Reply::Object(o) => Some(o),
                _ => None,
            })?;
            local_object(st, key)
        })
    }

    pub(crate) fn seed_random(&self, h: CK_SESSION_HANDLE, seed: Blob) -> Result<(), Rv> {
        self.with_session(h, |m, st| m.call_in(st, Request::SeedRandom { session: st.remote, seed }).map(drop))
    }

    pub(crate) fn generate_random(&self, h: CK_SESSION_HANDLE, len: usize) -> Result<Blob, Rv> {
        let len32 = u32::try_from(len).ok().filter(|l| *l as usize <= hsm_sim_wire::MAX_RANDOM).ok_or(CKR_DATA_LEN_RANGE)?;
        self.with_session(h, |m, st| {
            let reply = m.call_in(st, Request::GenerateRandom { session: st.remote, len: len32 })?;
            let out = expect(reply, |r| match r {
                Reply::Data(d) => Some(d),
                _ => None,
            })?;
            if out.len() != len {
                return Err(CKR_DEVICE_ERROR);
            }
            Ok(out)
        })
    }
}
