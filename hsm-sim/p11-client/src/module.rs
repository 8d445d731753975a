//! The module's state between `C_Initialize` and `C_Finalize`: the connection to the server, the
//! sessions, handle translation, and the two ways of making a call.
//!
//! # Connections and handles
//! The module keeps one connection ([`Connection`]) and makes a new one when a call that needs no
//! session (`C_OpenSession`, `C_GetSlotList`, ...) finds it dead. Each connection has a generation
//! number, and every handle the module gives out — session and object — is the server's handle in
//! the low 32 bits with the generation in the high 32. The server runs one SoftHSM instance per
//! connection, so after a reconnection every old session and object handle is meaningless there;
//! the generation lets the module refuse old handles instead of letting them name whatever the new
//! instance numbered the same.
//!
//! # Return codes when the server is unreachable (as network HSM modules do)
//! - a call that needs no session and cannot connect: `CKR_DEVICE_ERROR`;
//! - a call on a session of a dead connection: `CKR_SESSION_HANDLE_INVALID` (the session is gone);
//! - a call whose connection dies while it waits, or that gets no answer within the deadline:
//!   `CKR_DEVICE_ERROR` (the server may have executed it); the connection is then dead;
//! - an object handle from an earlier connection: `CKR_OBJECT_HANDLE_INVALID` (or the key-handle
//!   code of the function), which callers that cache handles treat as "find it again".
//!
//! Owns the connection, the session table and the generation rule. Must never send a request on a
//! session's behalf over a connection other than the one the session was opened on.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cryptoki_sys::*;
use hsm_sim_wire::{Reply, Request, Response};

use crate::config::Config;
use crate::connection::{Connection, LinkError};
use crate::session_state::SessionState;

/// A PKCS#11 return code, as the C ABI returns it.
pub(crate) type Rv = CK_RV;

/// How long a list answer (slots, mechanisms) serves the second call of a size query.
const LIST_CACHE_LIFETIME: Duration = Duration::from_secs(5);

/// Where the caller wants an output written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Space {
    /// A NULL buffer: the caller asks for the length.
    Query,
    /// A buffer of this many bytes (or items).
    Buffer(usize),
}

impl Space {
    /// Whether an output of `len` leaves the operation waiting for another call (a size query, or
    /// a buffer too small: PKCS#11 keeps the operation active in both cases).
    pub(crate) fn keeps(self, len: usize) -> bool {
        match self {
            Space::Query => true,
            Space::Buffer(n) => n < len,
        }
    }
}

/// The module's handle for the server's handle `remote` on connection `generation`.
pub(crate) fn local_handle(generation: u32, remote: u64) -> Result<u64, Rv> {
    if remote == 0 || remote > u64::from(u32::MAX) {
        // The server's handles are small counters; anything else is a broken server.
        return Err(CKR_DEVICE_ERROR);
    }
    Ok((u64::from(generation) << 32) | remote)
}

/// (generation, server handle) of a module handle.
pub(crate) fn split_handle(local: u64) -> (u32, u64) {
    // Lossless: the high half of a u64 fits a u32.
    ((local >> 32) as u32, local & 0xffff_ffff)
}

struct Link {
    conn: Option<Arc<Connection>>,
    generation: u32,
}

struct SessionEntry {
    slot: u64,
    state: Arc<Mutex<SessionState>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListKey {
    Slots { token_present: bool },
    Mechanisms { slot: u64 },
}

struct ListCache {
    key: ListKey,
    list: Vec<u64>,
    made: Instant,
}

/// Why an exchange failed.
enum Failure {
    Link(LinkError),
    /// The answer did not decode or answered another operation.
    Malformed,
    Rv(Rv),
}

pub(crate) struct Module {
    config: Config,
    link: Mutex<Link>,
    sessions: Mutex<HashMap<u64, SessionEntry>>,
    lists: Mutex<Option<ListCache>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Module {
    pub(crate) fn new(config: Config) -> Module {
        Module {
            config,
            link: Mutex::new(Link { conn: None, generation: 0 }),
            sessions: Mutex::new(HashMap::new()),
            lists: Mutex::new(None),
        }
    }

    /// Closes the connection (`C_Finalize`). Calls still running on other threads fail.
    pub(crate) fn shutdown(&self) {
        let conn = lock(&self.link).conn.take();
        lock(&self.sessions).clear();
        if let Some(c) = conn {
            c.close();
        }
    }

    /// The live connection, or a new one. New connections start a new generation; the sessions of
    /// the old one are forgotten (they died with it).
    fn connection(&self) -> Result<Arc<Connection>, Rv> {
        let mut link = lock(&self.link);
        if let Some(c) = &link.conn {
            if !c.is_dead() {
                return Ok(Arc::clone(c));
            }
        }
        if let Some(old) = link.conn.take() {
            let g = old.generation();
            lock(&self.sessions).retain(|h, _| split_handle(*h).0 != g);
            old.close();
        }
        let generation = match link.generation.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        let conn = Connection::open(&self.config.endpoint, self.config.timeout, generation)
            .map_err(|_| CKR_DEVICE_ERROR)?;
        link.generation = generation;
        let conn = Arc::new(conn);
        link.conn = Some(Arc::clone(&conn));
        Ok(conn)
    }

    fn exchange(&self, conn: &Connection, req: &Request) -> Result<Reply, Failure> {
        let body = conn.call(|id| req.encode(id)).map_err(Failure::Link)?;
        match Response::decode(&body) {
            Ok((h, Response { rv, reply })) if h.op == req.op() => {
                if rv == CKR_OK {
                    Ok(reply)
                } else {
                    Err(Failure::Rv(rv))
                }
            }
            _ => {
                conn.kill();
                Err(Failure::Malformed)
            }
        }
    }

    /// A call that needs no session: connects if needed, and once more if the request could not
    /// even be sent (a connection found dead only by writing to it).
    pub(crate) fn call(&self, req: Request) -> Result<Reply, Rv> {
        self.call_with_generation(req).map(|(r, _)| r)
    }

    /// [`Module::call`], also telling which connection answered (for handles made by the call).
    pub(crate) fn call_with_generation(&self, req: Request) -> Result<(Reply, u32), Rv> {
        let mut retried = false;
        loop {
            let conn = self.connection()?;
            match self.exchange(&conn, &req) {
                Ok(r) => return Ok((r, conn.generation())),
                Err(Failure::Link(LinkError::NotSent)) if !retried => retried = true,
                Err(Failure::Rv(rv)) => return Err(rv),
                Err(Failure::Link(_) | Failure::Malformed) => return Err(CKR_DEVICE_ERROR),
            }
        }
    }

    /// A call on `st`'s connection, never another.
    pub(crate) fn call_in(&self, st: &SessionState, req: Request) -> Result<Reply, Rv> {
        let conn = lock(&self.link).conn.clone();
        let conn = match conn {
            Some(c) if c.generation() == st.generation && !c.is_dead() => c,
            _ => return Err(CKR_SESSION_HANDLE_INVALID),
        };
        match self.exchange(&conn, &req) {
            Ok(r) => Ok(r),
            Err(Failure::Rv(rv)) => Err(rv),
            Err(Failure::Link(LinkError::NotSent)) => Err(CKR_SESSION_HANDLE_INVALID),
            Err(Failure::Link(LinkError::Lost | LinkError::Timeout) | Failure::Malformed) => Err(CKR_DEVICE_ERROR),
        }
    }

    /// Runs `f` with the session's state locked (one thread at a time per session), after dropping
    /// any cached result: a cache serves only the call right after the one that made it.
    pub(crate) fn with_session<T>(
        &self,
        h: CK_SESSION_HANDLE,
        f: impl FnOnce(&Module, &mut SessionState) -> Result<T, Rv>,
    ) -> Result<T, Rv> {
        self.with_session_cached(h, |m, st| {
            st.drop_cache();
            f(m, st)
        })
    }

    /// [`Module::with_session`] for the calls that may be answered from the cache: `f` takes it
    /// (or drops it) itself.
    pub(crate) fn with_session_cached<T>(
        &self,
        h: CK_SESSION_HANDLE,
        f: impl FnOnce(&Module, &mut SessionState) -> Result<T, Rv>,
    ) -> Result<T, Rv> {
        let state = lock(&self.sessions).get(&h).map(|e| Arc::clone(&e.state)).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let mut st = lock(&state);
        f(self, &mut st)
    }

    pub(crate) fn add_session(&self, local: u64, slot: u64, state: SessionState) {
        lock(&self.sessions).insert(local, SessionEntry { slot, state: Arc::new(Mutex::new(state)) });
    }

    pub(crate) fn remove_session(&self, local: u64) {
        lock(&self.sessions).remove(&local);
    }

    /// Forgets every session of `slot` and every session of an earlier connection.
    pub(crate) fn remove_sessions_of_slot(&self, slot: u64, generation: u32) {
        lock(&self.sessions).retain(|h, e| e.slot != slot && split_handle(*h).0 == generation);
    }

    /// A list answer kept for the second call of a size query.
    pub(crate) fn take_list(&self, key: ListKey) -> Option<Vec<u64>> {
        match lock(&self.lists).take() {
            Some(c) if c.key == key && c.made.elapsed() < LIST_CACHE_LIFETIME => Some(c.list),
            _ => None,
        }
    }

    pub(crate) fn keep_list(&self, key: ListKey, list: Vec<u64>) {
        *lock(&self.lists) = Some(ListCache { key, list, made: Instant::now() });
    }
}

/// The server handle of a module object handle used in session `st`; `invalid` (the function's
/// code for a bad handle) if it belongs to another connection.
pub(crate) fn remote_object(st: &SessionState, local: CK_OBJECT_HANDLE, invalid: Rv) -> Result<u64, Rv> {
    match split_handle(local) {
        (g, remote) if g == st.generation && remote != 0 => Ok(remote),
        _ => Err(invalid),
    }
}

/// The module handle of a server object handle made in session `st`.
pub(crate) fn local_object(st: &SessionState, remote: u64) -> Result<CK_OBJECT_HANDLE, Rv> {
    local_handle(st.generation, remote)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_carry_their_generation() {
        let h = local_handle(3, 17).unwrap();
        assert_eq!(split_handle(h), (3, 17));
        assert_eq!(local_handle(1, 0), Err(CKR_DEVICE_ERROR));
        assert_eq!(local_handle(1, 1 << 33), Err(CKR_DEVICE_ERROR));
        let st = SessionState::new(5, 3);
        assert_eq!(remote_object(&st, h, CKR_KEY_HANDLE_INVALID), Ok(17));
        let old = local_handle(2, 17).unwrap();
        assert_eq!(remote_object(&st, old, CKR_KEY_HANDLE_INVALID), Err(CKR_KEY_HANDLE_INVALID));
        assert_eq!(remote_object(&st, 0, CKR_OBJECT_HANDLE_INVALID), Err(CKR_OBJECT_HANDLE_INVALID));
    }

    #[test]
    fn size_queries_keep_the_result() {
        assert!(Space::Query.keeps(10));
        assert!(Space::Buffer(9).keeps(10));
        assert!(!Space::Buffer(10).keeps(10));
    }
}
