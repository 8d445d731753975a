//! The faults `serve` injects between clients and their backends, and its counters.
//!
//! Every request is delayed by the configured latency and, while a hang or an injected failure is
//! pending, passes [`Faults::admit`] in a task of its own: it waits while a hang lasts and may be
//! answered with an injected code instead of reaching SoftHSM. Concurrent calls are delayed
//! concurrently, never one after another: a call in a session is delayed by its backend on the
//! session's own thread, any other by a timer here. Owns the fault settings and counters. Must
//! never hold a lock across a wait.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hsm_sim::control::ServeStatus;
use hsm_sim_wire::Op;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hang {
    None,
    Until(Instant),
    Forever,
}

struct FailRule {
    remaining: u32,
    rv: u64,
    function: Option<Op>,
}

/// What happens to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Forward it; the backend waits `delay` before running it (see [`Faults::admit`]).
    Forward { delay: Duration },
    Fail(u64),
}

pub(crate) struct Faults {
    latency_us: AtomicU64,
    rules: Mutex<Vec<FailRule>>,
    /// True when no hang and no failure is pending: requests are then forwarded without a task
    /// of their own (latency included, see [`Faults::latency_of`]).
    quiet: AtomicBool,
    hang: watch::Sender<Hang>,
    delays: DelayLine,
    pub(crate) calls: AtomicU64,
    faults: AtomicU64,
    held: AtomicU64,
}

/// Precise short delays. tokio's timers tick in whole milliseconds, so `sleep(1ms)` lasts 1 to 2
/// ms; one thread waiting on a heap of deadlines with `recv_timeout` wakes within tens of
/// microseconds, and wakes every request due, so delays of concurrent requests overlap.
/// A timed wait on Linux ends up to the thread's timer slack (50 µs by default) late, and measured
/// 80-90 µs late here: delays aim that much early so that they average what was asked.
const TIMER_SLACK: Duration = Duration::from_micros(50);

/// How long to wait for a delay of `d` (see [`TIMER_SLACK`]).
pub(crate) fn aim(d: Duration) -> Duration {
    if d > 2 * TIMER_SLACK {
        d - TIMER_SLACK
    } else {
        d
    }
}

struct DelayLine {
    requests: std::sync::mpsc::Sender<(std::time::Instant, oneshot::Sender<()>)>,
}

impl DelayLine {
    fn start() -> DelayLine {
        let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, oneshot::Sender<()>)>();
        let spawned = std::thread::Builder::new().name("delay-line".into()).spawn(move || {
            let mut due: BinaryHeap<Reverse<Due>> = BinaryHeap::new();
            loop {
                let now = std::time::Instant::now();
                while due.peek().is_some_and(|Reverse(d)| d.at <= now) {
                    if let Some(Reverse(d)) = due.pop() {
                        let _ = d.done.send(());
                    }
                }
                let next = match due.peek() {
                    Some(Reverse(d)) => rx.recv_timeout(d.at.saturating_duration_since(now)),
                    None => rx.recv().map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
                };
                match next {
                    Ok((at, done)) => due.push(Reverse(Due { at, done })),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        });
        if let Err(e) = spawned {
            eprintln!("hsm-sim serve: no delay thread ({e}); latency falls back to tokio timers");
        }
        DelayLine { requests: tx }
    }

    async fn wait(&self, d: Duration) {
        let (done, wake) = oneshot::channel();
        let aim = aim(d);
        if self.requests.send((std::time::Instant::now() + aim, done)).is_err() || wake.await.is_err() {
            tokio::time::sleep(d).await;
        }
    }
}

struct Due {
    at: std::time::Instant,
    done: oneshot::Sender<()>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

/// Counts a request as held while it waits out a hang (also if its connection is dropped).
struct HeldGuard<'a>(&'a AtomicU64);

impl Drop for HeldGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Faults {
    pub(crate) fn new() -> Faults {
        Faults {
            latency_us: AtomicU64::new(0),
            rules: Mutex::new(Vec::new()),
            quiet: AtomicBool::new(true),
            hang: watch::Sender::new(Hang::None),
            delays: DelayLine::start(),
            calls: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    fn rules(&self) -> MutexGuard<'_, Vec<FailRule>> {
        self.rules.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update_quiet(&self) {
        let quiet = self.rules().is_empty() && *self.hang.borrow() == Hang::None;
        self.quiet.store(quiet, Ordering::SeqCst);
    }

    pub(crate) fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::SeqCst)
    }

    fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::SeqCst))
    }

    /// For a request forwarded on the quiet path: the delay the backend applies, or `None` if the
    /// request must take the slow path (a call without a session while latency is set: the
    /// backend runs those one at a time, so their delay is applied here).
    pub(crate) fn latency_of(&self, op: Op) -> Option<Duration> {
        let latency = self.latency();
        if op.has_session() || latency.is_zero() {
            Some(if op.has_session() { latency } else { Duration::ZERO })
        } else {
            None
        }
    }

    pub(crate) fn set_latency(&self, d: Duration) {
        self.latency_us.store(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::SeqCst);
        self.update_quiet();
    }

    pub(crate) fn fail(&self, count: u32, rv: u64, function: Option<Op>) {
        if count > 0 {
            self.rules().push(FailRule { remaining: count, rv, function });
        }
        self.update_quiet();
    }

    pub(crate) fn hang(&self, d: Option<Duration>) {
        self.hang.send_replace(match d {
            Some(d) => Hang::Until(Instant::now() + d),
            None => Hang::Forever,
        });
        self.update_quiet();
    }

    pub(crate) fn release(&self) {
        self.hang.send_replace(Hang::None);
        self.update_quiet();
    }

    pub(crate) fn reset(&self) {
        self.latency_us.store(0, Ordering::SeqCst);
        self.rules().clear();
        self.release();
    }

    /// Waits out a hang, then decides. The latency of a call in a session is left to the backend,
    /// which sleeps on the session's own thread before running it: no thread is woken only to
    /// time a delay, and sessions, each on its own thread, are delayed concurrently. Calls
    /// without a session, and injected failures, are delayed here.
    pub(crate) async fn admit(&self, op: Op) -> Verdict {
        self.wait_out_hang().await;
        let latency = self.latency();
        let failure = {
            let mut rules = self.rules();
            let hit = rules.iter_mut().find(|r| r.remaining > 0 && r.function.is_none_or(|f| f == op));
            let rv = hit.map(|r| {
                r.remaining -= 1;
                r.rv
            });
            rules.retain(|r| r.remaining > 0);
            rv
        };
        if failure.is_some() {
            self.update_quiet();
        }
        if !latency.is_zero() && (failure.is_some() || !op.has_session()) {
            self.delays.wait(latency).await;
        }
        match failure {
            Some(rv) => {
                self.faults.fetch_add(1, Ordering::SeqCst);
                Verdict::Fail(rv)
            }
            None if op.has_session() => Verdict::Forward { delay: latency },
            None => Verdict::Forward { delay: Duration::ZERO },
        }
    }

    async fn wait_out_hang(&self) {
        let mut rx = self.hang.subscribe();
        let mut held = None;
        loop {
            let state = *rx.borrow_and_update();
            let until = match state {
                Hang::None => return,
                Hang::Until(t) if Instant::now() >= t => return,
                Hang::Until(t) => Some(t),
                Hang::Forever => None,
            };
            if held.is_none() {
                self.held.fetch_add(1, Ordering::SeqCst);
                held = Some(HeldGuard(&self.held));
            }
            match until {
                Some(t) => {
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { return },
                        () = tokio::time::sleep_until(t) => {}
                    }
                }
                None => {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    pub(crate) fn status(&self, connections: u64, accepted: u64) -> ServeStatus {
        let hanging = match *self.hang.borrow() {
            Hang::None => false,
            Hang::Until(t) => Instant::now() < t,
            Hang::Forever => true,
        };
        ServeStatus {
            calls: self.calls.load(Ordering::SeqCst),
            faults: self.faults.load(Ordering::SeqCst),
            connections,
            accepted,
            held: self.held.load(Ordering::SeqCst),
            latency: Duration::from_micros(self.latency_us.load(Ordering::SeqCst)),
            hanging,
            failures_pending: self.rules().iter().map(|r| u64::from(r.remaining)).sum(),
        }
    }
}
