//! The audit trail's anchor in the key store: opening the trail at start-up only if it is the one
//! the store was anchored to and reaches at least as far, and moving the anchor after every commit.
//!
//! At start-up, with the anchor `(trail id, seq, hash)` authenticated by its HSM MAC:
//! - the audit file must exist (a missing one is refused: it was deleted, moved, or `audit.path`
//!   is wrong);
//! - its trail id must be the anchor's (another trail put in its place is refused);
//! - it must hold record `seq` with exactly that hash, and every record after it must chain from it
//!   (a trail cut after its last checkpoint, or rewritten, is refused).
//!
//! The operator may start a new trail instead (`--new-audit-trail`): the old file is moved aside,
//! never deleted, and the new trail's first record says so and names where the old one ended.
//! A store that was never anchored (new, or from before anchoring) anchors the trail it finds.
//!
//! Must never start a new chain silently, and never delete an audit file.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use kms_audit::{AuditDb, Chain, GENESIS};

use crate::keyauth::{KeyAuth, KeyAuthError};
use crate::store::{AuditAnchor, Store};

/// Why the trail was not opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnchorError {
    #[error(
        "the audit trail {path} is missing, but the key store's anchor says trail {trail} had {seq} records \
         (last hash {hash}): the file was deleted or moved, or audit.path is wrong. Put the trail back (restore it \
         from its backup), or fix audit.path; to start a new trail anyway (the start is recorded in it), run once \
         with --new-audit-trail"
    )]
    Missing { path: PathBuf, trail: String, seq: u64, hash: String },
    #[error(
        "the audit trail {path} is not the trail the key store is anchored to (it is {found}, the anchor names \
         {trail}): the file was replaced. Put the right trail back, or start a new one with --new-audit-trail"
    )]
    Replaced { path: PathBuf, found: String, trail: String },
    #[error(
        "the audit trail {path} ends at record {head}, but the key store's anchor says it reached record {seq}: \
         records {from}..={seq} were cut. Restore the trail from its backup, or start a new one with \
         --new-audit-trail"
    )]
    Truncated { path: PathBuf, head: u64, seq: u64, from: u64 },
    #[error(
        "the audit trail {path} does not hold record {seq} with the hash the key store's anchor names: the trail \
         was rewritten. Restore it from its backup, or start a new one with --new-audit-trail"
    )]
    Rewritten { path: PathBuf, seq: u64 },
    #[error("the audit trail {path}: record {seq} does not chain from the record before it: the trail was edited")]
    BrokenTail { path: PathBuf, seq: u64 },
    #[error("the key store's audit anchor failed authentication: the store was changed outside the service")]
    ForgedAnchor,
    #[error("cannot move the old audit trail {from} aside to {to}: {source}")]
    MoveAside { from: PathBuf, to: PathBuf, source: std::io::Error },
    #[error("audit trail {path}: {source}")]
    Db { path: PathBuf, source: kms_audit::AuditDbError },
    #[error("key store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("HSM: {0}")]
    Hsm(crate::hsm::HsmError),
    #[error("a blocking task of the audit trail's start-up failed")]
    TaskFailed,
}

impl From<KeyAuthError> for AnchorError {
    fn from(e: KeyAuthError) -> AnchorError {
        match e {
            KeyAuthError::Hsm(h) => AnchorError::Hsm(h),
            _ => AnchorError::ForgedAnchor,
        }
    }
}

/// The trail as opened at start-up.
pub struct OpenedTrail {
    pub db: AuditDb,
    pub trail_id: [u8; 16],
    pub head: Chain,
    /// When the operator asked for a new trail: what the trail's first record says about it.
    pub new_trail_note: Option<String>,
}

/// Opens the trail at `path` if the store's anchor allows it (see the module docs), or starts a
/// new one when `new_trail` is set. Blocking for the file work; the HSM checks are awaited.
pub async fn open_anchored(
    path: &Path,
    server: &str,
    store: &Store,
    keyauth: &KeyAuth,
    new_trail: bool,
) -> Result<OpenedTrail, AnchorError> {
    let (s, name) = (store.clone(), server.to_owned());
    let stored = blocking(move || s.audit_anchor(&name)).await??;
    let anchor = match stored {
        Some(a) => Some(keyauth.verify_anchor(server, a).await?),
        None => None,
    };
    let db_err = |source| AnchorError::Db { path: path.to_owned(), source };
    let exists = path.exists();
    let mut note = None;
    if new_trail {
        let previous = match anchor {
            Some(a) => format!(
                "the previous trail {} ended at record {} (hash {}) according to the key store's anchor",
                crate::ids::hex(&a.trail_id),
                a.seq,
                crate::ids::hex(&a.hash)
            ),
            None => "the key store held no anchor of a previous trail".to_owned(),
        };
        let moved = if exists {
            let aside = move_aside(path)?;
            format!("; its file was moved to {}", aside.display())
        } else {
            "; no file was found at the trail's path".to_owned()
        };
        tracing::warn!(path = %path.display(), "starting a NEW audit trail, as the operator asked (--new-audit-trail)");
        note = Some(format!("a new audit trail was started by the operator (--new-audit-trail): {previous}{moved}"));
    } else if let Some(a) = anchor {
        if !exists {
            return Err(AnchorError::Missing {
                path: path.to_owned(),
                trail: crate::ids::hex(&a.trail_id),
                seq: a.seq,
                hash: crate::ids::hex(&a.hash),
            });
        }
        let p = path.to_owned();
        let check = blocking(move || check_against(&p, &a)).await?;
        check?;
    }
    let p = path.to_owned();
    let db = blocking(move || AuditDb::open(&p)).await?.map_err(db_err)?;
    let trail_id = db.trail_id().map_err(db_err)?.ok_or_else(|| {
        db_err(kms_audit::AuditDbError::CorruptRow { seq: 0, what: "the trail has no id after opening it for writing" })
    })?;
    let head = db.head().map_err(db_err)?;
    if anchor.is_none() || note.is_some() {
        // A store never anchored (new, or from before anchoring), or a new trail: anchor what is here.
        if head.seq > 0 {
            tracing::info!(records = head.seq, "anchoring the existing audit trail in the key store");
        }
        write_anchor(store, keyauth, server, trail_id, head).await?;
    }
    Ok(OpenedTrail { db, trail_id, head, new_trail_note: note })
}

/// Seals and stores the anchor of `head` (one HSM MAC, one durable store write).
pub async fn write_anchor(store: &Store, keyauth: &KeyAuth, server: &str, trail_id: [u8; 16], head: Chain) -> Result<(), AnchorError> {
    let anchor = AuditAnchor { trail_id, seq: head.seq, hash: head.hash, time_ms: crate::audit::unix_ms() };
    let mac = keyauth.seal_anchor(server, &anchor).await?;
    let (s, name) = (store.clone(), server.to_owned());
    blocking(move || s.set_audit_anchor(&name, &anchor, &mac)).await??;
    Ok(())
}

/// The trail at `path` against the anchor, read-only (nothing is written before it passes).
fn check_against(path: &Path, a: &AuditAnchor) -> Result<(), AnchorError> {
    let db_err = |source| AnchorError::Db { path: path.to_owned(), source };
    let db = AuditDb::open_read_only(path).map_err(db_err)?;
    let found = db.trail_id().map_err(db_err)?;
    if found != Some(a.trail_id) {
        return Err(AnchorError::Replaced {
            path: path.to_owned(),
            found: found.map(|f| format!("trail {}", crate::ids::hex(&f))).unwrap_or_else(|| "a trail with no id".into()),
            trail: crate::ids::hex(&a.trail_id),
        });
    }
    let head = db.head().map_err(db_err)?;
    if head.seq < a.seq {
        return Err(AnchorError::Truncated { path: path.to_owned(), head: head.seq, seq: a.seq, from: head.seq + 1 });
    }
    let anchored = if a.seq == 0 { Some(GENESIS) } else { db.record_hash(a.seq).map_err(db_err)? };
    if anchored != Some(a.hash) {
        return Err(AnchorError::Rewritten { path: path.to_owned(), seq: a.seq });
    }
    // The records after the anchor (at most the group being written when the server stopped)
    // must chain from it.
    let mut prev = a.hash;
    let mut from = a.seq + 1;
    loop {
        let page = db.records(from, 1024).map_err(db_err)?;
        let Some(last) = page.last() else { break };
        from = last.record.seq + 1;
        for r in &page {
            if kms_audit::chain_hash(&prev, &r.record) != r.hash {
                return Err(AnchorError::BrokenTail { path: path.to_owned(), seq: r.record.seq });
            }
            prev = r.hash;
        }
    }
    Ok(())
}

/// Moves the audit file (and SQLite's `-wal` and `-shm` files beside it) to
/// `<path>.replaced-<unix ms>`, so that nothing of it is lost.
fn move_aside(path: &Path) -> Result<PathBuf, AnchorError> {
    let stamp = crate::audit::unix_ms();
    let aside = PathBuf::from(format!("{}.replaced-{stamp}", path.display()));
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        let to = PathBuf::from(format!("{}{suffix}", aside.display()));
        if from.exists() {
            std::fs::rename(&from, &to).map_err(|source| AnchorError::MoveAside { from, to, source })?;
        }
    }
    Ok(aside)
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R, AnchorError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| AnchorError::TaskFailed)
}
