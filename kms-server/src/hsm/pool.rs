//! The bounded pool of worker threads that run every PKCS#11 call, each owning one R/W session.
//!
//! Async callers wait (asynchronously) for one of a bounded number of permits, queue a job, and get the
//! answer through a tokio oneshot. Must never run PKCS#11 on the async runtime and never block a
//! runtime thread: the only blocking calls here are in the worker threads and in [`Pool::close`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use cryptoki::session::Session;
use tokio::sync::{oneshot, Semaphore};

use super::error::HsmError;
use super::handles::HandleCache;

/// What a job sees: its worker's session and the shared handle cache.
pub(crate) struct Worker {
    pub(crate) session: Session,
    pub(crate) handles: Arc<HandleCache>,
    /// Held while a job creates or destroys a token object. SoftHSM 2.6 corrupts concurrent writes
    /// to its file-backed object store: two sessions generating token keys at once sometimes fail
    /// with `CKR_GENERAL_ERROR` or `CKR_TEMPLATE_INCONSISTENT` (SoftHSMv2 issue #573, measured
    /// here by the crash-consistency test). Token writes are rare (key creation, rotation,
    /// destruction); cryptography with existing keys and session objects is not serialised.
    token_writes: Arc<Mutex<()>>,
}

impl Worker {
    /// Serialises token-object writes across the pool; see the field's comment.
    pub(crate) fn token_write_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.token_writes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// See [`HandleCache::with_working_copy`]: for cryptography with a key.
    pub(crate) fn with_key<T>(
        &self,
        id: &[u8],
        op: impl FnMut(cryptoki::object::ObjectHandle) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        self.handles.with_working_copy(&self.session, id, op)
    }

    /// See [`HandleCache::with_object`]: the token object itself.
    pub(crate) fn with_object<T>(
        &self,
        id: &[u8],
        op: impl FnMut(cryptoki::object::ObjectHandle) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        self.handles.with_object(&self.session, id, op)
    }
}

type Job = Box<dyn FnOnce(&Worker) + Send>;

pub(crate) struct Pool {
    // `None` once closed. A std channel: sending never blocks (the semaphore bounds the queue).
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    permits: Arc<Semaphore>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Set by [`Pool::abandon`]: workers drop the jobs still queued instead of running them.
    abandoned: Arc<std::sync::atomic::AtomicBool>,
}

impl Pool {
    /// Starts one thread per session, named `<name>-<i>`. At most `queue_bound` jobs are queued or
    /// running at once. Pools of one token share `handles` and `token_writes`.
    pub(crate) fn start(
        name: &str,
        sessions: Vec<Session>,
        handles: Arc<HandleCache>,
        token_writes: Arc<Mutex<()>>,
        queue_bound: usize,
    ) -> Result<Pool, HsmError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let abandoned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::with_capacity(sessions.len());
        for (i, session) in sessions.into_iter().enumerate() {
            let (rx, abandoned) = (Arc::clone(&rx), Arc::clone(&abandoned));
            let worker = Worker { session, handles: Arc::clone(&handles), token_writes: Arc::clone(&token_writes) };
            let t = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || run_worker(worker, &rx, &abandoned))
                .map_err(|e| HsmError::Library { detail: format!("cannot start an HSM worker thread: {e}") })?;
            threads.push(t);
        }
        Ok(Pool {
            queue: Mutex::new(Some(tx)),
            permits: Arc::new(Semaphore::new(queue_bound)),
            threads: Mutex::new(threads),
            abandoned,
        })
    }

    /// Runs `job` on a worker and returns its result. Waits asynchronously while the queue is full.
    pub(crate) async fn run<T, F>(&self, job: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&Worker) -> Result<T, HsmError> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits).acquire_owned().await.map_err(|_| HsmError::PoolClosed)?;
        let (reply, answer) = oneshot::channel();
        let boxed: Job = Box::new(move |w: &Worker| {
            let result = job(w);
            drop(permit);
            // The caller may have gone away (cancelled request); the work is done either way.
            let _ = reply.send(result);
        });
        {
            let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = queue.as_ref().ok_or(HsmError::PoolClosed)?;
            tx.send(boxed).map_err(|_| HsmError::PoolClosed)?;
        }
        // A dropped reply means the pool closed before the job ran, or the job panicked.
        answer.await.map_err(|_| HsmError::PoolClosed)?
    }

    /// Refuses new jobs and lets the workers go without waiting for them: one may be stuck in a
    /// call to a hung HSM. Each ends after its current job (its session closing as it exits), and
    /// jobs still queued are dropped, their callers answered `PoolClosed`. Idempotent.
    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, std::sync::atomic::Ordering::Release);
        self.permits.close();
        drop(self.queue.lock().unwrap_or_else(PoisonError::into_inner).take());
        drop(std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner)));
    }

    /// Jobs queued or running now (for the health report).
    pub(crate) fn in_flight(&self, bound: usize) -> usize {
        bound.saturating_sub(self.permits.available_permits())
    }

    /// Refuses new jobs, lets the workers finish the queued ones, and joins them (their sessions close
    /// as they exit). Blocking; idempotent.
    pub(crate) fn close(&self) {
        self.permits.close();
        drop(self.queue.lock().unwrap_or_else(PoisonError::into_inner).take());
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for t in threads {
            if t.join().is_err() {
                tracing::error!("an HSM worker thread panicked");
            }
        }
    }
}

fn run_worker(worker: Worker, rx: &Mutex<mpsc::Receiver<Job>>, abandoned: &std::sync::atomic::AtomicBool) {
    loop {
        // Only one idle worker waits in recv at a time; the others wait for the lock.
        let job = match rx.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(mpsc::RecvError) => break, // closed and drained
        };
        if abandoned.load(std::sync::atomic::Ordering::Acquire) {
            // Its caller gets `PoolClosed` (the reply is dropped) and retries on the new generation.
            drop(job);
            continue;
        }
        if catch_unwind(AssertUnwindSafe(|| job(&worker))).is_err() {
            tracing::error!("an HSM job panicked; the worker continues");
        }
    }
    let Worker { session, .. } = worker;
    if let Err(e) = session.close() {
        if abandoned.load(std::sync::atomic::Ordering::Acquire) {
            // The HSM was lost: its sessions are gone with it.
            tracing::debug!(error = %HsmError::from(e), "closing a session of a lost HSM failed");
        } else {
            tracing::warn!(error = %HsmError::from(e), "closing a worker session failed");
        }
    }
}
