//! Surviving the HSM: when a call finds it lost, the generation is abandoned and a task reopens the
//! token (finalising and initialising the module again when this process is its only user), logs in,
//! restarts the workers and refills the handle cache, retrying with a growing pause until the HSM
//! answers; and the health that readiness checks and operators read.
//!
//! While the HSM is lost, requests are answered `UNAVAILABLE` within their deadline (never
//! `INTERNAL`), naming how long it has been lost and the last error. When it answers again, service
//! resumes by itself and a log line says so.
//!
//! Must never re-create a service key (the binding or audit key) on a reopened token, and never
//! accept a different token that happens to carry the label.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::error::HsmError;
use super::generation::{self, Generation};
use super::{context, Inner};

/// The pause between attempts to reopen the HSM during the first seconds: an HSM that answers
/// errors quickly (a restart under way, a burst of device errors) is reopened as soon as it can be.
const QUICK_PAUSE: Duration = Duration::from_millis(50);
/// How long attempts follow each other quickly before the pause grows.
const QUICK_FOR: Duration = Duration::from_secs(5);
/// The longest pause between two attempts.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Whether the HSM answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HsmState {
    Ready,
    /// A call found it lost; a recovery is reopening it.
    Lost,
}

/// The health of the HSM layer, as readiness checks and operators see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HsmHealth {
    pub state: HsmState,
    /// 1 at start-up, one more per recovery.
    pub generation: u64,
    /// How many times the HSM was reopened after being lost.
    pub reconnects: u64,
    /// The last error that took the HSM for lost (PKCS#11 function and code, or the deadline).
    pub last_error: Option<String>,
    pub last_error_unix: Option<i64>,
    /// Since when it is lost, while it is.
    pub lost_since_unix: Option<i64>,
    /// Request-path sessions, and jobs queued or running on them and on the admin session.
    pub request_sessions: usize,
    pub request_in_flight: usize,
    pub admin_in_flight: usize,
}

#[derive(Default)]
pub(crate) struct Recovery {
    state: Mutex<State>,
    running: AtomicBool,
}

#[derive(Default)]
struct State {
    lost_since: Option<(Instant, SystemTime)>,
    last_error: Option<(String, SystemTime)>,
    reconnects: u64,
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

impl Recovery {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The error a request gets while the HSM is lost.
    pub(crate) fn unavailable(&self, error: &str) -> HsmError {
        let state = self.lock();
        let for_ms = state.lost_since.map(|(at, _)| at.elapsed().as_millis()).unwrap_or(0);
        let last = if error.is_empty() { state.last_error.as_ref().map(|(e, _)| e.clone()).unwrap_or_default() } else { error.to_owned() };
        HsmError::Unavailable { for_ms: u64::try_from(for_ms).unwrap_or(u64::MAX), last_error: last }
    }

    pub(crate) fn health(&self, current: &Generation, workers: usize) -> HsmHealth {
        let state = self.lock();
        HsmHealth {
            state: if current.is_broken() { HsmState::Lost } else { HsmState::Ready },
            generation: current.number,
            reconnects: state.reconnects,
            last_error: state.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_unix: state.last_error.as_ref().map(|(_, at)| unix(*at)),
            lost_since_unix: if current.is_broken() { state.lost_since.map(|(_, at)| unix(at)) } else { None },
            request_sessions: workers,
            request_in_flight: current.pool.in_flight(workers * super::QUEUE_PER_WORKER),
            admin_in_flight: current.admin.in_flight(super::QUEUE_PER_WORKER),
        }
    }

    fn record_error(&self, error: &str) {
        let mut state = self.lock();
        state.last_error = Some((crate::bounded::owned(error, crate::bounded::MESSAGE), SystemTime::now()));
        state.lost_since.get_or_insert((Instant::now(), SystemTime::now()));
    }
}

impl Inner {
    /// A call of `generation` found the HSM lost: mark it, and start a recovery if none runs.
    pub(super) fn lost(self: &Arc<Self>, generation: &Arc<Generation>, error: &str) {
        if !generation.mark_broken() {
            return;
        }
        self.recovery.record_error(error);
        tracing::error!(generation = generation.number, error = %crate::bounded::text(error, crate::bounded::MESSAGE), "the HSM is lost; requests are answered UNAVAILABLE while it is reopened");
        if self.recovery.running.swap(true, Ordering::AcqRel) || self.closed.load(Ordering::Acquire) {
            return;
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            inner.recover().await;
        });
    }

    async fn recover(self: Arc<Self>) {
        let started = Instant::now();
        let mut pause = QUICK_PAUSE;
        let mut attempts = 0u64;
        while !self.closed.load(Ordering::Acquire) {
            attempts += 1;
            let inner = Arc::clone(&self);
            let reopened = tokio::task::spawn_blocking(move || inner.reopen()).await;
            let error = match reopened {
                Ok(Ok(generation)) => match tokio::time::timeout(self.cfg.admin_timeout, generation.fill_handle_cache()).await {
                    Ok(Ok(objects)) => {
                        self.install(generation, started, attempts, objects);
                        break;
                    }
                    Ok(Err(e)) => {
                        generation.abandon();
                        e.to_string()
                    }
                    Err(_) => {
                        generation.abandon();
                        "listing the token's objects after reopening it timed out".to_owned()
                    }
                },
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the reopening task failed".to_owned(),
            };
            self.recovery.record_error(&error);
            if attempts == 1 || attempts.is_multiple_of(100) {
                tracing::warn!(attempts, error = %crate::bounded::text(&error, crate::bounded::MESSAGE), "the HSM cannot be reopened yet; trying again");
            }
            tokio::time::sleep(pause).await;
            if started.elapsed() > QUICK_FOR {
                pause = (pause * 2).min(MAX_PAUSE);
            }
        }
        self.recovery.running.store(false, Ordering::Release);
    }

    /// Abandons the lost generation and opens the next one (blocking).
    fn reopen(&self) -> Result<Generation, HsmError> {
        let old = self.generation();
        old.abandon();
        let pkcs11 = context::restart(&self.cfg.module, self.cfg.softhsm_conf.as_deref(), &self.cfg.module_env)?;
        let opened = Generation::open(&pkcs11, &self.cfg, old.number + 1, generation::Keys::MustExist)?;
        if opened.token.serial != self.token.serial {
            opened.generation.abandon();
            return Err(HsmError::TokenChanged { label: self.token.label.clone() });
        }
        Ok(opened.generation)
    }

    fn install(&self, generation: Generation, started: Instant, attempts: u64, objects: usize) {
        let number = generation.number;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(generation);
        let last = {
            let mut state = self.recovery.lock();
            state.reconnects += 1;
            state.lost_since = None;
            state.last_error.as_ref().map(|(e, _)| e.clone()).unwrap_or_default()
        };
        self.installed.send_replace(number);
        tracing::warn!(
            generation = number,
            after_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            attempts,
            key_objects = objects,
            last_error = %last,
            "the HSM answers again: reopened, logged in and serving"
        );
    }
}
