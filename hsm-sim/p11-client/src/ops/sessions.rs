//! Sessions and login: `C_OpenSession`, `C_CloseSession`, `C_CloseAllSessions`,
//! `C_GetSessionInfo`, `C_Login`, `C_Logout`, `C_InitPIN`, `C_SetPIN`.
//!
//! Login state lives on the server (per connection, as it is per application in PKCS#11); after a
//! reconnection the application logs in again, as after an HSM restart.

use cryptoki_sys::*;
use hsm_sim_wire::{Blob, Reply, Request, SessionInfo};

use super::expect;
use crate::module::{local_handle, Module, Rv};
use crate::session_state::SessionState;

impl Module {
    pub(crate) fn open_session(&self, slot: u64, flags: u64) -> Result<CK_SESSION_HANDLE, Rv> {
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        let (reply, generation) = self.call_with_generation(Request::OpenSession { slot, flags })?;
        let remote = expect(reply, |r| match r {
            Reply::Session(s) => Some(s),
            _ => None,
        })?;
        let local = local_handle(generation, remote)?;
        self.add_session(local, slot, SessionState::new(remote, generation));
        Ok(local)
    }

    /// Closes the session on the server and forgets it here whatever the server answers (a
    /// session on a dead connection is gone already).
    pub(crate) fn close_session(&self, h: CK_SESSION_HANDLE) -> Result<(), Rv> {
        let result = self.with_session(h, |m, st| m.call_in(st, Request::CloseSession { session: st.remote }));
        self.remove_session(h);
        result.map(drop)
    }

    pub(crate) fn close_all_sessions(&self, slot: u64) -> Result<(), Rv> {
        let (_, generation) = self.call_with_generation(Request::CloseAllSessions { slot })?;
        self.remove_sessions_of_slot(slot, generation);
        Ok(())
    }

    pub(crate) fn session_info(&self, h: CK_SESSION_HANDLE) -> Result<SessionInfo, Rv> {
        self.with_session(h, |m, st| {
            expect(m.call_in(st, Request::GetSessionInfo { session: st.remote })?, |r| match r {
                Reply::SessionInfo(i) => Some(i),
                _ => None,
            })
        })
    }

    pub(crate) fn login(&self, h: CK_SESSION_HANDLE, user_type: u64, pin: Option<Blob>) -> Result<(), Rv> {
        self.with_session(h, |m, st| m.call_in(st, Request::Login { session: st.remote, user_type, pin }).map(drop))
    }

    pub(crate) fn logout(&self, h: CK_SESSION_HANDLE) -> Result<(), Rv> {
        self.with_session(h, |m, st| m.call_in(st, Request::Logout { session: st.remote }).map(drop))
    }

    pub(crate) fn init_pin(&self, h: CK_SESSION_HANDLE, pin: Option<Blob>) -> Result<(), Rv> {
        self.with_session(h, |m, st| m.call_in(st, Request::InitPin { session: st.remote, pin }).map(drop))
    }

    pub(crate) fn set_pin(&self, h: CK_SESSION_HANDLE, old_pin: Option<Blob>, new_pin: Option<Blob>) -> Result<(), Rv> {
        self.with_session(h, |m, st| {
            m.call_in(st, Request::SetPin { session: st.remote, old_pin, new_pin }).map(drop)
        })
    }
}
