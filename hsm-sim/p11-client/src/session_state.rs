//! What the module remembers about one session between calls: the crypto operation begun by an
//! `Init` call (sent to the server only when the operation completes), the answer of a running
//! `C_FindObjects` search, and the cached result of a size query.
//!
//! Owns the rules of those three states. Must never answer a call from a cached result made for
//! different arguments, and never keep a cached result past the next call on the session.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hsm_sim_wire::{AttrResult, Blob, Mechanism};

/// A size-query answer is reused only this soon after it was made.
const CACHE_LIFETIME: Duration = Duration::from_secs(5);

/// Longest data a multi-part operation may accumulate (it is sent in one frame at `Final`).
pub(crate) const MAX_PARTS: usize = hsm_sim_wire::MAX_FRAME - 64 * 1024;

/// The crypto operations the module runs (multi-part encryption and decryption are not supported).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CryptoKind {
    Encrypt,
    Decrypt,
    Sign,
    Verify,
    Digest,
}

/// An operation begun by `C_xxxInit` and not yet completed.
#[derive(Debug)]
pub(crate) struct ActiveOp {
    pub(crate) kind: CryptoKind,
    pub(crate) mechanism: Mechanism,
    /// The server's key handle (none for digests).
    pub(crate) key: u64,
    /// Data of `C_xxxUpdate` calls, sent at `C_xxxFinal`; `None` until the first update.
    pub(crate) parts: Option<Blob>,
}

/// What a cached result answers: the call that will ask for it again.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CallKey {
    /// `C_Encrypt`/`C_Decrypt`/`C_Sign`/`C_Digest` with this input.
    Single { kind: CryptoKind, input: Blob },
    /// `C_SignFinal`/`C_DigestFinal`.
    Final { kind: CryptoKind },
    /// `C_WrapKey` with these arguments (server handles).
    Wrap { mechanism: Mechanism, wrapping_key: u64, key: u64 },
}

#[derive(Debug)]
pub(crate) enum Cached {
    Output { call: CallKey, output: Blob, made: Instant },
    Attributes { object: u64, results: Vec<(u64, AttrResult)>, made: Instant },
}

impl Cached {
    pub(crate) fn output(call: CallKey, output: Blob) -> Cached {
        Cached::Output { call, output, made: Instant::now() }
    }

    pub(crate) fn fresh(&self) -> bool {
        let made = match self {
            Cached::Output { made, .. } | Cached::Attributes { made, .. } => *made,
        };
        made.elapsed() < CACHE_LIFETIME
    }
}

#[derive(Debug)]
pub(crate) struct SessionState {
    /// The server's handle of this session.
    pub(crate) remote: u64,
    /// The connection the session lives on.
    pub(crate) generation: u32,
    pub(crate) active: Option<ActiveOp>,
    pub(crate) find: Option<VecDeque<u64>>,
    pub(crate) cached: Option<Cached>,
}

impl SessionState {
    pub(crate) fn new(remote: u64, generation: u32) -> SessionState {
        SessionState { remote, generation, active: None, find: None, cached: None }
    }

    /// Takes the cached output if it answers `call` and is fresh; any other cached result is
    /// dropped (a cache lives until the next call on the session).
    pub(crate) fn take_output(&mut self, call: &CallKey) -> Option<Blob> {
        match self.cached.take() {
            Some(Cached::Output { call: c, output, made }) if c == *call && made.elapsed() < CACHE_LIFETIME => {
                Some(output)
            }
            _ => None,
        }
    }

    /// Takes the cached attribute answers if they cover every type of `types` for `object`.
    pub(crate) fn take_attributes(&mut self, object: u64, types: &[u64]) -> Option<Vec<AttrResult>> {
        match self.cached.take() {
            Some(c @ Cached::Attributes { .. }) if c.fresh() => {
                let Cached::Attributes { object: o, results, .. } = c else { return None };
                if o != object {
                    return None;
                }
                types
                    .iter()
                    .map(|t| results.iter().find(|(rt, _)| rt == t).map(|(_, r)| r.clone()))
                    .collect()
            }
            _ => None,
        }
    }

    /// Forgets the cached result (every call that uses none).
    pub(crate) fn drop_cache(&mut self) {
        self.cached = None;
    }
}
