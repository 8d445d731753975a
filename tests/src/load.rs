//! Data-key load for the fault tests: tasks that each, in a loop, make a data key and open it
//! again from its blob, comparing the two, and count what they saw. A load reports only what the
//! real server answered; nothing is retried here but by the client itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_client::{Delivery, KmsClient};
use tonic::Code;

use crate::ctx;

/// What the load saw.
#[derive(Default)]
pub struct Tally {
    /// Correct answers (the key opened from its blob is the key that was made).
    pub ok: AtomicU64,
    /// Requests refused with `UNAVAILABLE`.
    pub unavailable: AtomicU64,
    /// Answers that were wrong (must stay 0).
    pub wrong: AtomicU64,
    /// Any other error, with its message.
    pub other: Mutex<Vec<String>>,
    /// The slowest request, in milliseconds (reset it to measure one phase).
    pub slowest_ms: AtomicU64,
    /// When the last correct answer and the last failure came, in ms since the load began.
    pub last_ok_ms: AtomicU64,
    pub last_failure_ms: AtomicU64,
    stop: AtomicBool,
}

impl Tally {
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn unavailable(&self) -> u64 {
        self.unavailable.load(Ordering::Relaxed)
    }

    pub fn wrong(&self) -> u64 {
        self.wrong.load(Ordering::Relaxed)
    }

    pub fn other(&self) -> Vec<String> {
        self.other.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// A running load; [`DataKeyLoad::stop`] ends it and waits for its tasks.
pub struct DataKeyLoad {
    pub tally: Arc<Tally>,
    /// When it began (the origin of the `*_ms` figures).
    pub started: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DataKeyLoad {
    /// Starts `in_flight` tasks on `client`, using the key `key` (PERSONAL: plaintext data keys),
    /// each pausing `pause` after every request (as a client that backs off would).
    pub fn start(client: &KmsClient, key: &str, in_flight: u64, pause: Duration) -> DataKeyLoad {
        let tally = Arc::new(Tally::default());
        let started = Instant::now();
        let tasks = (0..in_flight)
            .map(|worker| {
                let (x, t, key) = (client.clone(), Arc::clone(&tally), key.to_owned());
                tokio::spawn(async move {
                    let mut i = worker << 40;
                    while !t.stop.load(Ordering::Relaxed) {
                        one(&x, &key, i, &t, started).await;
                        i += 1;
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        DataKeyLoad { tally, started, tasks }
    }

    /// `at` in ms since the load began.
    pub fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }

    /// Waits until a correct answer comes more than 50 ms after `since`; how long after `since`
    /// it came. Fails the test after `limit`.
    pub async fn recovered(&self, since: Instant, limit: Duration) -> Duration {
        let since_ms = self.ms_at(since);
        let deadline = Instant::now() + limit;
        loop {
            let ok_at = self.tally.last_ok_ms.load(Ordering::Relaxed);
            if ok_at > since_ms + 50 {
                return Duration::from_millis(ok_at - since_ms);
            }
            assert!(Instant::now() < deadline, "service did not resume within {limit:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Ends the load and waits for every task; the tally.
    pub async fn stop(self) -> Arc<Tally> {
        self.tally.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a load task");
        }
        self.tally
    }
}

/// One request of the load: a data key, then the same key back from its blob, compared.
async fn one(x: &KmsClient, key: &str, i: u64, t: &Tally, started: Instant) {
    let c = ctx(&[("n", &i.to_string())]);
    let begun = Instant::now();
    let outcome = async {
        let g = x.generate_data_key(key, &c, Delivery::PlaintextAndWrapped).await?;
        let back = x.decrypt_data_key(&g.wrapped, &c, None, None).await?;
        Ok::<bool, kms_client::ClientError>(*back.plaintext == *g.plaintext.expect("plaintext"))
    }
    .await;
    t.slowest_ms.fetch_max(u64::try_from(begun.elapsed().as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(0);
    match outcome {
        Ok(true) => {
            t.ok.fetch_add(1, Ordering::Relaxed);
            t.last_ok_ms.fetch_max(now, Ordering::Relaxed);
        }
        Ok(false) => {
            t.wrong.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) if e.code() == Some(Code::Unavailable) => {
            t.unavailable.fetch_add(1, Ordering::Relaxed);
            t.last_failure_ms.fetch_max(now, Ordering::Relaxed);
        }
        Err(e) => {
            t.last_failure_ms.fetch_max(now, Ordering::Relaxed);
            t.other.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(e.to_string());
        }
    }
}
