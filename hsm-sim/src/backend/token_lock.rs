//! The token write lock, shared by every backend process of a token directory: an advisory file
//! lock (`flock`) on `<token dir>/hsm-sim.lock`.
//!
//! SoftHSM 2.6 corrupts concurrent token-object writes (SoftHSMv2 issue 573: two sessions creating
//! token objects at once sometimes fail with `CKR_GENERAL_ERROR` or `CKR_TEMPLATE_INCONSISTENT`),
//! and a search in one process can see another process's half-written object file. A real HSM's
//! writes are atomic; here a token write takes the lock exclusively and a search (the only call
//! that scans the token directory for new files) shares it, so searches never see half an object
//! and writes never overlap. Every other call takes no lock. Each session worker opens its own
//! descriptor, because `flock` locks belong to an open file description: threads of one process
//! then exclude each other as processes do. The kernel releases the lock of a killed process.
//!
//! Must never be held across anything but the one SoftHSM call it protects.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

pub(super) const LOCK_FILE: &str = "hsm-sim.lock";

pub(super) struct TokenLock {
    file: File,
}

/// Held for one SoftHSM call; unlocks when dropped.
pub(super) struct Held<'a>(Option<&'a File>);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.0 {
            // Closing the descriptor (or the process dying) also releases it.
            let _ = f.unlock();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    /// A token-object write.
    Write,
    /// A search of the token's objects.
    Scan,
    /// Anything else: no lock.
    None,
}

impl TokenLock {
    pub(super) fn open(token_dir: &Path) -> io::Result<TokenLock> {
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(token_dir.join(LOCK_FILE))?;
        Ok(TokenLock { file })
    }

    /// Takes the lock for `access`. A lock that cannot be taken (an I/O error) is not held: the
    /// call then runs as it would in process, unprotected, rather than failing.
    pub(super) fn hold(&self, access: Access) -> Held<'_> {
        let taken = match access {
            Access::Write => self.file.lock(),
            Access::Scan => self.file.lock_shared(),
            Access::None => return Held(None),
        };
        Held(taken.ok().map(|()| &self.file))
    }
}
