//! Single- and multi-part cryptography: `C_EncryptInit`/`C_Encrypt`, `C_DecryptInit`/`C_Decrypt`,
//! `C_SignInit`/`C_Sign`/`C_SignUpdate`/`C_SignFinal`, the same for `Verify`, and `C_DigestInit`/
//! `C_Digest`/`C_DigestUpdate`/`C_DigestFinal`.
//!
//! `Init` only records the operation; the call that completes it sends one request with the
//! mechanism, key and data, so errors an HSM reports at `Init` (a key that may not sign, a
//! mechanism it lacks) are reported by the completing call here. `Update` data is collected and
//! sent at `Final` (so a mechanism the token runs only single-part works multi-part here).
//! Multi-part encryption and decryption are not supported.

use cryptoki_sys::*;
use hsm_sim_wire::{Blob, Mechanism, Reply, Request};

use super::expect;
use crate::module::{remote_object, Module, Rv, Space};
use crate::session_state::{ActiveOp, CallKey, Cached, CryptoKind, SessionState, MAX_PARTS};

impl Module {
    /// `C_xxxInit`: remembers the operation (`key` is `None` for digests).
    pub(crate) fn crypto_init(
        &self,
        h: CK_SESSION_HANDLE,
        kind: CryptoKind,
        mechanism: Mechanism,
        key: Option<CK_OBJECT_HANDLE>,
    ) -> Result<(), Rv> {
        self.with_session(h, |_, st| {
            if st.active.is_some() {
                return Err(CKR_OPERATION_ACTIVE);
            }
            // SoftHSM's code for a bad key handle at Init.
            let key = match key {
                Some(k) => remote_object(st, k, CKR_OBJECT_HANDLE_INVALID)?,
                None => 0,
            };
            st.active = Some(ActiveOp { kind, mechanism, key, parts: None });
            Ok(())
        })
    }

    /// `C_Encrypt`, `C_Decrypt`, `C_Sign`, `C_Digest`: the whole output (which the caller writes
    /// into `space` if it fits). A size query or a short buffer keeps the operation active and the
    /// output cached for the next call with the same input.
    pub(crate) fn crypto_single(
        &self,
        h: CK_SESSION_HANDLE,
        kind: CryptoKind,
        data: &[u8],
        space: Space,
    ) -> Result<Blob, Rv> {
        self.with_session_cached(h, |m, st| {
            let call = CallKey::Single { kind, input: Blob::from_slice(data) };
            if let Some(out) = st.take_output(&call) {
                return Ok(deliver(st, call, out, space));
            }
            let op = active(st, kind)?;
            if op.parts.is_some() {
                // Single-part after C_xxxUpdate: the operation is multi-part now.
                return Err(CKR_OPERATION_ACTIVE);
            }
            let req = request(st.remote, op, Blob::from_slice(data), None);
            complete(m, st, req, call, space)
        })
    }

    /// `C_Verify`.
    pub(crate) fn verify_single(&self, h: CK_SESSION_HANDLE, data: &[u8], signature: &[u8]) -> Result<(), Rv> {
        self.with_session(h, |m, st| {
            let op = active(st, CryptoKind::Verify)?;
            if op.parts.is_some() {
                return Err(CKR_OPERATION_ACTIVE);
            }
            let req = request(st.remote, op, Blob::from_slice(data), Some(Blob::from_slice(signature)));
            st.active = None;
            m.call_in(st, req).map(drop)
        })
    }

    /// `C_SignUpdate`, `C_VerifyUpdate`, `C_DigestUpdate`: collects the data.
    pub(crate) fn crypto_update(&self, h: CK_SESSION_HANDLE, kind: CryptoKind, part: &[u8]) -> Result<(), Rv> {
        self.with_session(h, |_, st| {
            let op = st.active.as_mut().filter(|op| op.kind == kind).ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
            let mut parts = op.parts.take().map(|b| b.to_vec()).unwrap_or_default();
            if parts.len() + part.len() > MAX_PARTS {
                st.active = None;
                return Err(CKR_DATA_LEN_RANGE);
            }
            parts.extend_from_slice(part);
            op.parts = Some(Blob::new(parts));
            Ok(())
        })
    }

    /// `C_SignFinal`, `C_DigestFinal`.
    pub(crate) fn crypto_final(&self, h: CK_SESSION_HANDLE, kind: CryptoKind, space: Space) -> Result<Blob, Rv> {
        self.with_session_cached(h, |m, st| {
            let call = CallKey::Final { kind };
            if let Some(out) = st.take_output(&call) {
                return Ok(deliver(st, call, out, space));
            }
            let op = active(st, kind)?;
            let data = op.parts.clone().unwrap_or_default();
            let req = request(st.remote, op, data, None);
            complete(m, st, req, call, space)
        })
    }

    /// `C_VerifyFinal`.
    pub(crate) fn verify_final(&self, h: CK_SESSION_HANDLE, signature: &[u8]) -> Result<(), Rv> {
        self.with_session(h, |m, st| {
            let op = active(st, CryptoKind::Verify)?;
            let data = op.parts.clone().unwrap_or_default();
            let req = request(st.remote, op, data, Some(Blob::from_slice(signature)));
            st.active = None;
            m.call_in(st, req).map(drop)
        })
    }
}

fn active(st: &SessionState, kind: CryptoKind) -> Result<&ActiveOp, Rv> {
    match &st.active {
        Some(op) if op.kind == kind => Ok(op),
        _ => Err(CKR_OPERATION_NOT_INITIALIZED),
    }
}

/// The one request that runs `op` on `data` from start to end.
fn request(session: u64, op: &ActiveOp, data: Blob, signature: Option<Blob>) -> Request {
    let mechanism = op.mechanism.clone();
    let key = op.key;
    match op.kind {
        CryptoKind::Encrypt => Request::Encrypt { session, mechanism, key, data },
        CryptoKind::Decrypt => Request::Decrypt { session, mechanism, key, data },
        CryptoKind::Sign => Request::Sign { session, mechanism, key, data },
        CryptoKind::Verify => Request::Verify { session, mechanism, key, data, signature: signature.unwrap_or_default() },
        CryptoKind::Digest => Request::Digest { session, mechanism, data },
    }
}

/// Sends the operation; a failure ends it (as in PKCS#11), a result is delivered.
fn complete(m: &Module, st: &mut SessionState, req: Request, call: CallKey, space: Space) -> Result<Blob, Rv> {
    let reply = m.call_in(st, req);
    let out = match reply.and_then(|r| {
        expect(r, |r| match r {
            Reply::Data(d) => Some(d),
            _ => None,
        })
    }) {
        Ok(out) => out,
        Err(rv) => {
            st.active = None;
            return Err(rv);
        }
    };
    Ok(deliver(st, call, out, space))
}

/// Ends the operation if `out` fits `space`; otherwise keeps it active and caches `out`.
fn deliver(st: &mut SessionState, call: CallKey, out: Blob, space: Space) -> Blob {
    if space.keeps(out.len()) {
        st.cached = Some(Cached::output(call, out.clone()));
    } else {
        st.active = None;
    }
    out
}
