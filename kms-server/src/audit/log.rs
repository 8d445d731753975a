//! The audit log: appends records to the hash chain in the audit database, durably, before the
//! request's answer leaves (invariant 3), and signs checkpoints of the chain head with the
//! token's audit key.
//!
//! One writer thread (a long-lived task on the blocking pool) owns the chain head and the audit
//! database. Requests hand it a record and wait; the writer takes every record that is waiting,
//! seals them onto a copy of the head, writes them in one SQLite transaction (one fsync for the
//! whole group: group commit), adopts the new head only if the commit succeeded, and answers each
//! request with its sequence number or an error. Owning a thread, it hands nothing on: a record
//! costs one wake-up of the writer and one of the request. A request whose record is not
//! durable is answered `UNAVAILABLE` by its caller ([`crate::service::AppState::respond`]).
//! Checkpoints are signed every N records or T seconds, whichever comes first, and once more at
//! shutdown.
//!
//! Must never block the async runtime on SQLite (the writer and reads run on the blocking pool), never
//! advance the head past a record that is not committed, and never record a context, key or
//! plaintext.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kms_audit::{AuditDb, AuditDbError, AuditRecord, Chain, Checkpoint, StoredRecord};
use tokio::sync::{mpsc, oneshot};

use crate::authz::{AuditRead, Authorized};
use crate::hsm::Hsm;
use crate::keyauth::KeyAuth;
use crate::store::{AuditAnchor, RowMac, Store};

/// The identity the audit trail records for what the operator asked at start-up.
pub const OPERATOR_IDENTITY: &str = "urn:kms:server:operator";

/// Most records written in one transaction.
const MAX_GROUP: usize = 4096;
/// Records that may wait for the writer before appending callers wait for room.
const QUEUE: usize = 16 * 1024;

/// Where the trail is and how often it is signed.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    pub path: PathBuf,
    /// The server's id (`server.id`): whose anchor in the store this trail moves. Empty for the one
    /// server of a store.
    pub server: String,
    pub checkpoint_every_records: u64,
    pub checkpoint_every: Duration,
    /// Start a new trail even though the store is anchored to another (the operator's explicit
    /// `--new-audit-trail`; recorded as the new trail's first record).
    pub new_trail: bool,
}

/// See [`AuditLog::is_writable`].
pub const WRITABLE_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// Why the audit log failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("cannot open the audit trail {path}: {source}")]
    Open { path: PathBuf, source: AuditDbError },
    #[error(transparent)]
    Anchor(#[from] super::anchor::AnchorError),
    /// The record could not be made durable (or the writer has stopped). The request must not be
    /// carried out.
    #[error("the audit trail cannot be written")]
    Unavailable,
    #[error("cannot read the audit trail: {0}")]
    Read(AuditDbError),
    #[error("the token's audit public key is not a P-256 point")]
    PublicKey,
}

struct Pending {
    record: AuditRecord,
    done: oneshot::Sender<Result<u64, AuditError>>,
}

/// What the writer is sent: a record to append, or the checkpoint timer's tick. (Not boxed: ticks
/// are rare, and a box would cost every request an allocation.)
#[allow(clippy::large_enum_variant)]
enum Message {
    Record(Pending),
    Tick,
}

/// A handle on the audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    /// When the writer last failed to make a group durable (or to move its anchor), in Unix ms;
    /// 0 if it never did or succeeded since.
    last_failure_ms: Arc<std::sync::atomic::AtomicI64>,
    reader: Arc<Mutex<AuditDb>>,
    server: Arc<str>,
    public_key_pem: Arc<str>,
    public_key_sec1: Arc<[u8]>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (or creates) the trail, refusing one that is not the trail the store is anchored to or
    /// is shorter than the anchor (see [`super::anchor`]), and starts the writer, which moves the
    /// anchor after every commit. The returned handle ends when every [`AuditLog`] clone is dropped,
    /// after a last checkpoint; await it before closing the HSM.
    pub async fn start(
        settings: AuditSettings,
        hsm: Hsm,
        store: Store,
        keyauth: Arc<KeyAuth>,
    ) -> Result<(AuditLog, tokio::task::JoinHandle<()>), AuditError> {
        let opened = super::anchor::open_anchored(&settings.path, &settings.server, &store, &keyauth, settings.new_trail).await?;
        let reader = AuditDb::open_read_only(&settings.path)
            .map_err(|source| AuditError::Open { path: settings.path.clone(), source })?;
        let head = opened.head;
        let last_checkpoint = opened
            .db
            .last_checkpoint()
            .map_err(|source| AuditError::Open { path: settings.path.clone(), source })?
            .map(|c| c.seq)
            .unwrap_or(0);
        let public = p256::PublicKey::from_sec1_bytes(hsm.audit_public_key()).map_err(|_| AuditError::PublicKey)?;
        let pem = p256::pkcs8::EncodePublicKey::to_public_key_pem(&public, p256::pkcs8::LineEnding::LF)
            .map_err(|_| AuditError::PublicKey)?;
        tracing::info!(path = %settings.path.display(), trail = %crate::ids::hex(&opened.trail_id), records = head.seq, last_checkpoint, "audit trail opened");
        let (tx, rx) = mpsc::channel(QUEUE);
        // The timer holds a weak sender, so that the writer stops once every AuditLog is dropped.
        let ticker = tx.downgrade();
        let every = settings.checkpoint_every;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(tx) = ticker.upgrade() else { break };
                if tx.send(Message::Tick).await.is_err() {
                    break;
                }
            }
        });
        let runtime = tokio::runtime::Handle::current();
        let server: Arc<str> = settings.server.as_str().into();
        let last_failure_ms = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let writer = Writer {
            last_failure_ms: Arc::clone(&last_failure_ms),
            db: opened.db,
            hsm: hsm.clone(),
            runtime,
            settings,
            head,
            last_checkpoint,
            store,
            keyauth,
            trail_id: opened.trail_id,
        };
        let task = tokio::task::spawn_blocking(move || writer.run(rx));
        let log = AuditLog {
            tx,
            last_failure_ms,
            reader: Arc::new(Mutex::new(reader)),
            server,
            public_key_pem: pem.into(),
            public_key_sec1: hsm.audit_public_key().into(),
        };
        if let Some(note) = opened.new_trail_note {
            let facts = super::RequestFacts {
                rpc: "NewAuditTrail",
                request_id: crate::service::request_id(),
                caller: OPERATOR_IDENTITY.to_owned(),
                ..Default::default()
            };
            log.append(super::record(&facts, kms_audit::Outcome::Ok, 0, &note)).await?;
        }
        Ok((log, task))
    }

    /// What the trail says became of `request_id` (records from `from_seq` on): `Some(Ok)` if it was
    /// answered with success, `Some(Failed)` or `Some(Refused)` if it was answered otherwise, `None`
    /// while it has only its `begun` record (it is still running, or the server died under it).
    pub async fn final_outcome(&self, request_id: &str, from_seq: u64) -> Result<Option<kms_audit::Outcome>, AuditError> {
        use kms_audit::Outcome;
        let id = request_id.to_owned();
        self.read(move |db| {
            let outcomes = db.outcomes_of(&id, from_seq)?;
            Ok(if outcomes.contains(&Outcome::Ok) {
                Some(Outcome::Ok)
            } else {
                outcomes.into_iter().find(|o| *o != Outcome::Begun)
            })
        })
        .await
    }

    /// Whether the trail, from record `from_seq` on, shows `request_id` answered with success (an
    /// `ok` record: the answer of a request leaves only after that record is durable). Start-up
    /// reconciliation asks it before destroying an object that an intent names.
    pub async fn acknowledged(&self, request_id: &str, from_seq: u64) -> Result<bool, AuditError> {
        let id = request_id.to_owned();
        self.read(move |db| Ok(db.outcomes_of(&id, from_seq)?.contains(&kms_audit::Outcome::Ok))).await
    }

    /// Appends `record` (its `seq` is assigned here) and waits until it is durable; returns its
    /// sequence number.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let (done, answer) = oneshot::channel();
        self.tx.send(Message::Record(Pending { record, done })).await.map_err(|_| AuditError::Unavailable)?;
        answer.await.map_err(|_| AuditError::Unavailable)?
    }

    /// A handle for records nobody waits for (refused TLS handshakes): it does not keep the log
    /// open at shutdown, and a record it cannot deliver is dropped (and logged).
    pub fn detached(&self) -> DetachedRecorder {
        DetachedRecorder { tx: self.tx.downgrade() }
    }

    /// The audit public key as SubjectPublicKeyInfo PEM.
    pub fn public_key_pem(&self) -> &str {
        &self.public_key_pem
    }

    /// Whether the trail can be written, as far as its writer knows: the writer runs, and its
    /// last group was made durable and anchored, or its last failure is more than
    /// [`WRITABLE_AGAIN_AFTER`] old (then the next request finds out again; with no request, a
    /// failure long past would otherwise keep the server unready for ever).
    pub fn is_writable(&self) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        let failed = self.last_failure_ms.load(std::sync::atomic::Ordering::Acquire);
        failed == 0 || crate::audit::unix_ms().saturating_sub(failed) > WRITABLE_AGAIN_AFTER.as_millis() as i64
    }

    /// The server id whose anchor this trail moves (empty for a store's only server).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The audit public key as an uncompressed SEC1 point.
    pub fn public_key_sec1(&self) -> &[u8] {
        &self.public_key_sec1
    }

    /// Records from `from_seq` (or the last `limit` when `last`), and the newest sequence number.
    /// An auditor's grant is needed: the trail is read for auditors only.
    pub async fn records(
        &self,
        _grant: &Authorized<AuditRead>,
        from_seq: u64,
        limit: u32,
        last: bool,
    ) -> Result<(Vec<StoredRecord>, u64), AuditError> {
        self.read(move |db| {
            let records = if last { db.last_records(limit)? } else { db.records(from_seq, limit)? };
            Ok((records, db.head()?.seq))
        })
        .await
    }

    /// Checkpoints from `from_seq`.
    pub async fn checkpoints(&self, _grant: &Authorized<AuditRead>, from_seq: u64, limit: u32) -> Result<Vec<Checkpoint>, AuditError> {
        self.read(move |db| db.checkpoints(from_seq, limit)).await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&AuditDb) -> Result<T, AuditDbError> + Send + 'static,
    ) -> Result<T, AuditError> {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || f(&reader.lock().unwrap_or_else(PoisonError::into_inner)))
            .await
            .map_err(|_| AuditError::Unavailable)?
            .map_err(AuditError::Read)
    }
}

/// See [`AuditLog::detached`].
#[derive(Clone)]
pub struct DetachedRecorder {
    tx: mpsc::WeakSender<Message>,
}

impl DetachedRecorder {
    /// Queues `record` without waiting for it to be durable.
    pub fn record(&self, record: AuditRecord) {
        let Some(tx) = self.tx.upgrade() else { return };
        tokio::spawn(async move {
            let (done, answer) = oneshot::channel();
            if tx.send(Message::Record(Pending { record, done })).await.is_err() || !matches!(answer.await, Ok(Ok(_))) {
                tracing::error!("the audit record of a refused TLS handshake could not be written");
            }
        });
    }
}

struct Writer {
    last_failure_ms: Arc<std::sync::atomic::AtomicI64>,
    db: AuditDb,
    hsm: Hsm,
    /// Where the anchor goes after every commit, and what seals it.
    store: Store,
    keyauth: Arc<KeyAuth>,
    trail_id: [u8; 16],
    /// To wait for the HSM's checkpoint signature from this (blocking) thread.
    runtime: tokio::runtime::Handle,
    settings: AuditSettings,
    head: Chain,
    last_checkpoint: u64,
}

impl Writer {
    /// Runs on a thread of its own until every sender is gone, then signs a last checkpoint.
    fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = Vec::new();
            let mut tick = false;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Record(p) => group.push(p),
                    Message::Tick => tick = true,
                }
                if group.len() < MAX_GROUP {
                    next = rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.write_group(group);
            }
            let due = self.head.seq - self.last_checkpoint >= self.settings.checkpoint_every_records;
            if due || (tick && self.head.seq > self.last_checkpoint) {
                self.checkpoint();
            }
        }
        if self.head.seq > self.last_checkpoint {
            self.checkpoint();
        }
        tracing::info!(records = self.head.seq, last_checkpoint = self.last_checkpoint, "audit log closed");
    }

    /// Seals the group onto a copy of the head, commits it in one transaction, and answers each
    /// request; the head moves only if the commit succeeded.
    fn write_group(&mut self, group: Vec<Pending>) {
        let mut next = self.head;
        let (sealed, done): (Vec<StoredRecord>, Vec<_>) =
            group.into_iter().map(|p| (next.seal(p.record), p.done)).unzip();
        // The anchor's MAC is computed in the HSM while the group is made durable: the round trip
        // to the HSM overlaps the fsync instead of following it.
        let anchor = AuditAnchor { trail_id: self.trail_id, seq: next.seq, hash: next.hash, time_ms: crate::audit::unix_ms() };
        let keyauth = Arc::clone(&self.keyauth);
        let server = self.settings.server.clone();
        let mac = self.runtime.spawn(async move { keyauth.seal_anchor(&server, &anchor).await });
        match self.db.append(&sealed) {
            Ok(()) => {
                self.head = next;
                // The anchor moves before any request of the group is answered, so that every
                // answered request's record is covered by it.
                if let Err(e) = self.anchor(&anchor, mac) {
                    self.last_failure_ms.store(crate::audit::unix_ms(), std::sync::atomic::Ordering::Release);
                    tracing::error!(records = done.len(), error = %e, "the audit anchor could not be moved; the group's requests are refused");
                    for d in done {
                        let _ = d.send(Err(AuditError::Unavailable));
                    }
                    return;
                }
                self.last_failure_ms.store(0, std::sync::atomic::Ordering::Release);
                for (done, stored) in done.into_iter().zip(&sealed) {
                    let _ = done.send(Ok(stored.record.seq));
                }
            }
            Err(e) => {
                mac.abort();
                self.last_failure_ms.store(crate::audit::unix_ms(), std::sync::atomic::Ordering::Release);
                tracing::error!(records = done.len(), error = %e, "audit records could not be made durable; their requests are refused");
                for d in done {
                    let _ = d.send(Err(AuditError::Unavailable));
                }
            }
        }
    }

    /// Waits for the anchor's MAC and writes the anchor to the key store.
    fn anchor(&self, anchor: &AuditAnchor, mac: tokio::task::JoinHandle<Result<RowMac, crate::keyauth::KeyAuthError>>) -> Result<(), String> {
        let mac = self
            .runtime
            .block_on(mac)
            .map_err(|_| "the task computing the anchor's MAC failed".to_owned())?
            .map_err(|e| e.to_string())?;
        self.store.set_audit_anchor(&self.settings.server, anchor, &mac).map_err(|e| e.to_string())
    }

    /// Signs the head in the HSM and stores the checkpoint. A failure is logged and retried at the
    /// next occasion: the records themselves are already durable.
    fn checkpoint(&mut self) {
        let head = self.head;
        let time = crate::audit::unix_ms();
        let digest = kms_audit::checkpoint_digest(head.seq, &head.hash, time);
        let signature = match self.runtime.block_on(self.hsm.sign_audit_digest(digest)) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, seq = head.seq, "could not sign an audit checkpoint");
                return;
            }
        };
        let checkpoint = Checkpoint { seq: head.seq, hash: head.hash, time_unix_ms: time, signature };
        match self.db.insert_checkpoint(&checkpoint) {
            Ok(()) => {
                self.last_checkpoint = head.seq;
                tracing::debug!(seq = head.seq, "audit checkpoint signed");
            }
            Err(e) => tracing::error!(error = %e, seq = head.seq, "could not store an audit checkpoint"),
        }
    }
}
