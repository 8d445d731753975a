//! kms-bench: measures the service against the HSM's own limit, on one token, in one run.
//!
//! 1. End to end: the real `kms-server` (mutual TLS, authorisation, durable audit) driven over gRPC
//!    at 1, 8 and 64 requests in flight for each request kind; requests per second, p50 / p99 / max
//!    latency, the ratio to the raw figure at as many in flight, the server's CPU time per request
//!    (all of it, on its HSM worker threads, and outside them) and its peak RSS; on the network
//!    HSM also the PKCS#11 calls per request.
//! 2. Raw: the HSM work of each request (the server's own `Hsm` layer, in this process on the same
//!    token through the same module, with as many sessions as the server uses: generate and wrap a
//!    data key and MAC its binding, unwrap, GCM encrypt 4 KiB, re-wrap) at as many jobs in flight
//!    as the end-to-end row, measured just before and just after it (the better run is the
//!    ceiling); and the rate of creating token keys.
//! 3. Sessions (`--sessions`, the network HSM's default): GenerateDataKey at 64 in flight, raw and
//!    end to end, with 1, 4, 16 and 64 request-path sessions.
//! 4. Scaling: GenerateDataKey latency with 1, 1,000 and 10,000 keys in the store and on the token,
//!    and the key creation rate against the raw rate.
//!
//! `kms-bench [--seconds S] [--keys 1,1000,10000] [--only KINDS] [--in-flight 1,8,64]
//! [--hsm in-process|network] [--hsm-latency-ms D] [--hsm-workers N] [--sessions 1,4,16,64]
//! [--smoke]`. Build in release mode first: `scripts/bench` does both. The token lives under
//! /dev/shm (SoftHSM waits on the disk for every token object it writes). It prints figures; it is
//! not a test (`--smoke` runs it briefly, and the test suite does that to keep it working).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_client::Delivery;
use kms_e2e::pb::Classification as L;
use kms_e2e::{ctx, HsmMode, Settings, StoreMode, TestServer};
use kms_server::blob::{CiphertextBlob, WrappedKeyBlob};
use kms_server::classification::Classification;
use kms_server::hsm::{BindingInput, EncryptPayload, GenerateDataKey, Hsm, HsmConfig, ReWrapDataKey, UnwrapDataKey};
use kms_server::ids::{KeyId, KeyPurpose, ObjectId};
use zeroize::Zeroizing;

const IN_FLIGHT: [usize; 3] = [1, 8, 64];
const PAYLOAD: usize = 4096;

struct Args {
    seconds: f64,
    keys: Vec<usize>,
    /// The request kinds to measure (all by default); `--only` narrows it, for profiling one.
    ops: Vec<Op>,
    in_flight: Vec<usize>,
    /// HSM sessions, in the raw measurement and in the server alike (the module's default if unset).
    hsm_workers: Option<usize>,
    hsm: HsmMode,
    /// Added to every call of the network HSM.
    latency: Duration,
    /// Session counts of the sessions curve (empty: no curve).
    sessions: Vec<usize>,
    /// Client connections the requests in flight are spread over.
    connections: usize,
    /// `--store` / `--servers`: the store backends and server counts to compare (GenerateDataKey
    /// only); empty: the usual run.
    stores: Vec<(StoreMode, usize)>,
}

impl Args {
    fn workers(&self) -> usize {
        self.hsm_workers.unwrap_or(match self.hsm {
            HsmMode::InProcess => kms_server::config::DEFAULT_HSM_WORKERS,
            HsmMode::Network => kms_server::config::DEFAULT_NETWORK_HSM_WORKERS,
        })
    }
}

fn list(flag: &str, value: Option<String>) -> Vec<usize> {
    let value = value.unwrap_or_else(|| panic!("{flag} takes a list like 1,8,64"));
    value.split(',').filter(|k| !k.is_empty()).map(|k| k.parse().unwrap_or_else(|_| panic!("{flag} takes numbers like 1,8,64"))).collect()
}

fn args() -> Args {
    let mut a = Args {
        seconds: 3.0,
        keys: vec![1, 1000, 10_000],
        ops: OPS.to_vec(),
        in_flight: IN_FLIGHT.to_vec(),
        hsm_workers: None,
        hsm: HsmMode::InProcess,
        latency: Duration::ZERO,
        sessions: Vec::new(),
        connections: 1,
        stores: Vec::new(),
    };
    let (mut store, mut servers, mut compare) = (None, None, false);
    let mut sessions = None;
    let mut smoke = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--smoke" => smoke = true,
            "--only" => {
                let names = it.next().expect("--only takes a list of request kinds");
                a.ops = names
                    .split(',')
                    .map(|n| {
                        OPS.into_iter().find(|op| op.flag() == n).unwrap_or_else(|| {
                            let known: Vec<_> = OPS.iter().map(|op| op.flag()).collect();
                            panic!("unknown request kind {n:?}; known: {}", known.join(", "))
                        })
                    })
                    .collect();
            }
            "--hsm" => {
                a.hsm = match it.next().as_deref() {
                    Some("in-process") => HsmMode::InProcess,
                    Some("network") => HsmMode::Network,
                    other => panic!("--hsm takes in-process or network, not {other:?}"),
                }
            }
            "--hsm-latency-ms" => {
                let ms: f64 = it.next().and_then(|s| s.parse().ok()).expect("--hsm-latency-ms takes a number");
                a.latency = Duration::from_secs_f64(ms / 1000.0);
            }
            "--hsm-workers" => {
                a.hsm_workers = Some(it.next().and_then(|s| s.parse().ok()).expect("--hsm-workers takes a number"))
            }
            "--sessions" => sessions = Some(list("--sessions", it.next())),
            "--connections" => a.connections = it.next().and_then(|s| s.parse().ok()).expect("--connections takes a number"),
            "--in-flight" => a.in_flight = list("--in-flight", it.next()),
            "--seconds" => a.seconds = it.next().and_then(|s| s.parse().ok()).expect("--seconds takes a number"),
            "--keys" => a.keys = list("--keys", it.next()),
            "--store" => {
                store = Some(match it.next().as_deref() {
                    Some("sqlite") => StoreMode::Sqlite,
                    Some("postgres") => StoreMode::Postgres,
                    other => panic!("--store takes sqlite or postgres, not {other:?}"),
                })
            }
            "--servers" => servers = Some(it.next().and_then(|s| s.parse().ok()).expect("--servers takes a number")),
            "--compare-stores" => compare = true,
            "-h" | "--help" => {
                println!(
                    "kms-bench [--seconds S] [--keys 1,1000,10000] [--only KINDS] [--in-flight 1,8,64]\n\
                     \x20         [--hsm in-process|network] [--hsm-latency-ms D] [--hsm-workers N] [--sessions 1,4,16,64] [--smoke]\n\
                     kms-bench --compare-stores | --store sqlite|postgres [--servers N]   (GenerateDataKey only)\n\
                     KINDS: a comma-separated list of {}\n\
                     --keys '' skips the scaling and key-creation part; --sessions '' the sessions curve (the\n\
                     network HSM's default is 1,4,16,64). See the README, section Benchmark.",
                    OPS.iter().map(|op| op.flag()).collect::<Vec<_>>().join(", ")
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other:?}; see --help"),
        }
    }
    if compare {
        a.stores = vec![(StoreMode::Sqlite, 1), (StoreMode::Postgres, 1), (StoreMode::Postgres, 2)];
    } else if store.is_some() || servers.is_some() {
        let (store, servers) = (store.unwrap_or(StoreMode::Postgres), servers.unwrap_or(1));
        if servers > 1 && store == StoreMode::Sqlite {
            panic!("--servers {servers} needs --store postgres (servers share a PostgreSQL store)");
        }
        a.stores = vec![(store, servers)];
    }
    if !a.stores.is_empty() {
        // Several servers share one HSM: the network HSM, for every row alike.
        a.hsm = HsmMode::Network;
    }
    if a.hsm == HsmMode::InProcess && !a.latency.is_zero() {
        panic!("--hsm-latency-ms needs --hsm network");
    }
    let sessions_given = sessions.is_some();
    a.sessions = sessions.unwrap_or(match a.hsm {
        HsmMode::InProcess => Vec::new(),
        HsmMode::Network => vec![1, 4, 16, 64],
    });
    if smoke {
        a.seconds = 0.2;
        a.keys = vec![1, 20];
        if a.hsm == HsmMode::Network && !sessions_given {
            // One session at 64 in flight through the simulator needs more than a smoke run's
            // fraction of a second to answer anything.
            a.sessions = vec![4, 16];
        }
    }
    a
}

/// Latencies of one run and its wall time.
struct Run {
    latencies: Vec<Duration>,
    wall: Duration,
    /// Requests made, the warm-up's included (what the process counters of the row saw).
    all: usize,
}

impl Run {
    fn rate(&self) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l[((l.len() - 1) as f64 * p).round() as usize]
    }
}

/// Runs `op` from `in_flight` tasks for `seconds`, after a warm-up of a fifth of that (at most
/// one second) whose requests are not counted: connections, caches and the CPU settle first.
async fn drive<F, Fut>(in_flight: usize, seconds: f64, op: F) -> Run
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let warm_up = Duration::from_secs_f64((seconds / 5.0).min(1.0));
    let measure_from = Instant::now() + warm_up;
    let deadline = measure_from + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..in_flight)
        .map(|t| {
            let op = Arc::clone(&op);
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut last_end = measure_from;
                let mut i = t as u64;
                let mut all = 0;
                loop {
                    let began = Instant::now();
                    if began >= deadline {
                        break;
                    }
                    op(i).await;
                    all += 1;
                    if began >= measure_from {
                        last_end = Instant::now();
                        lat.push(last_end - began);
                    }
                    i += in_flight as u64;
                }
                (lat, last_end, all)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut end = measure_from;
    let mut all = 0;
    for t in tasks {
        let (lat, last_end, n) = t.await.expect("bench task");
        latencies.extend(lat);
        end = end.max(last_end);
        all += n;
    }
    Run { latencies, wall: end - measure_from, all }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// The kinds of request measured, with the raw HSM work each does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    GeneratePlaintext,
    GenerateWrappedOnly,
    GenerateToRecipient,
    DecryptDataKey,
    Encrypt4k,
    ReWrap,
}

const OPS: [Op; 6] = [Op::GeneratePlaintext, Op::GenerateWrappedOnly, Op::GenerateToRecipient, Op::DecryptDataKey, Op::Encrypt4k, Op::ReWrap];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::GeneratePlaintext => "GenerateDataKey plaintext+wrapped",
            Op::GenerateWrappedOnly => "GenerateDataKey wrapped only",
            Op::GenerateToRecipient => "GenerateDataKey to recipient",
            Op::DecryptDataKey => "DecryptDataKey",
            Op::Encrypt4k => "Encrypt 4 KiB (in HSM)",
            Op::ReWrap => "ReWrap data key",
        }
    }

    /// Its name on the command line (`--only`).
    fn flag(self) -> &'static str {
        match self {
            Op::GeneratePlaintext => "generate-plaintext",
            Op::GenerateWrappedOnly => "generate-wrapped",
            Op::GenerateToRecipient => "generate-recipient",
            Op::DecryptDataKey => "decrypt",
            Op::Encrypt4k => "encrypt",
            Op::ReWrap => "rewrap",
        }
    }
}

/// The raw side: the server's own HSM layer opened in this process on the server's token (the
/// server is idle while it runs), with keys of its own.
struct RawBench {
    hsm: Hsm,
    kek: ObjectId,
    kek2: ObjectId,
    payload_key: ObjectId,
    key_id: KeyId,
    aad: Vec<u8>,
    /// The best rate measured per request kind and number in flight (the ceiling).
    rate: BTreeMap<(&'static str, usize), f64>,
}

/// Ids of another length than the service's (20 bytes), destroyed at the end.
fn raw_id(n: u8) -> ObjectId {
    ObjectId(vec![0xBE, 0x4C, n, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
}

fn binding(level: Classification, id: KeyId, version: u32) -> BindingInput {
    BindingInput { header: WrappedKeyBlob::header_for(level, id, version).to_bytes().to_vec(), context_digest: [7; 32] }
}

/// The server's HSM configuration as the benchmark's own process opens it: the same module, token
/// and sessions.
fn raw_hsm_config(server: &TestServer, workers: usize) -> HsmConfig {
    let token = server.token();
    let (module, softhsm_conf, module_env) = match server.net_hsm() {
        None => (token.module_path().to_owned(), Some(token.conf_path().to_owned()), Vec::new()),
        Some(net) => (
            hsm_sim::NetHsm::module_path().expect("the network HSM's client module is built"),
            None,
            vec![
                (hsm_sim::net::ENDPOINT_VAR.to_owned(), net.tcp_endpoint().expect("the network HSM listens on TCP")),
                (hsm_sim::net::TIMEOUT_VAR.to_owned(), "20000".to_owned()),
            ],
        ),
    };
    HsmConfig {
        module,
        token_label: token.label().to_owned(),
        pin: token.user_pin().clone(),
        approved_up_to: Classification::Secret,
        workers,
        softhsm_conf,
        module_env,
        call_timeout: Duration::from_secs(10),
        admin_timeout: Duration::from_secs(10),
    }
}

impl RawBench {
    /// Opens the token in this process and makes the raw keys.
    async fn open(server: &TestServer, workers: usize) -> RawBench {
        let raw = RawBench::reopen(server, workers).await;
        raw.hsm.create_key(&raw.kek, "bench kek", Classification::Personal, KeyPurpose::Envelope).await.unwrap();
        raw.hsm.create_key(&raw.kek2, "bench kek 2", Classification::Personal, KeyPurpose::Envelope).await.unwrap();
        raw.hsm.create_key(&raw.payload_key, "bench payload", Classification::Secret, KeyPurpose::HsmEncrypt).await.unwrap();
        raw
    }

    /// Opens the token in this process with `workers` sessions, on the raw keys made before.
    async fn reopen(server: &TestServer, workers: usize) -> RawBench {
        let config = raw_hsm_config(server, workers);
        let hsm = tokio::task::spawn_blocking(move || Hsm::open(config)).await.unwrap().expect("open the token in the benchmark's process");
        let (kek, kek2, payload_key) = (raw_id(1), raw_id(2), raw_id(3));
        let key_id = KeyId([9; 16]);
        let header = CiphertextBlob::header_for(Classification::Secret, key_id, 1, PAYLOAD).expect("header");
        let aad = kms_server::blob::ciphertext_aad(&header, &[7; 32]);
        RawBench { hsm, kek, kek2, payload_key, key_id, aad, rate: BTreeMap::new() }
    }

    fn generate(&self, extract: bool) -> GenerateDataKey {
        GenerateDataKey {
            kek: self.kek.clone(),
            level: Classification::Personal,
            extract_plaintext: extract,
            binding: binding(Classification::Personal, self.key_id, 1),
        }
    }

    /// Measures the HSM work of `op` at `in_flight` jobs in flight; keeps the best rate seen for it.
    async fn measure(&mut self, op: Op, in_flight: usize, seconds: f64) -> f64 {
        let sample = self.hsm.generate_data_key(self.generate(false)).await.unwrap();
        let unwrap = UnwrapDataKey {
            kek: self.kek.clone(),
            level: Classification::Personal,
            wrapped: sample.wrapped.clone(),
            binding: binding(Classification::Personal, self.key_id, 1),
            mac: sample.mac,
        };
        let hsm = self.hsm.clone();
        let key_id = self.key_id;
        let (g, u, k2, pk, aad) =
            (self.generate(op != Op::GenerateWrappedOnly), unwrap, self.kek2.clone(), self.payload_key.clone(), self.aad.clone());
        let run = drive(in_flight, seconds, move |_| {
            let (hsm, g, u, k2, pk, aad) = (hsm.clone(), g.clone(), u.clone(), k2.clone(), pk.clone(), aad.clone());
            async move {
                match op {
                    Op::GeneratePlaintext | Op::GenerateWrappedOnly | Op::GenerateToRecipient => {
                        hsm.generate_data_key(g).await.map(drop).unwrap()
                    }
                    Op::DecryptDataKey => hsm.unwrap_data_key(u).await.map(drop).unwrap(),
                    Op::Encrypt4k => hsm
                        .encrypt(EncryptPayload {
                            key: pk,
                            level: Classification::Secret,
                            iv: [3; 12],
                            aad,
                            plaintext: Zeroizing::new(vec![0x5A; PAYLOAD]),
                        })
                        .await
                        .map(drop)
                        .unwrap(),
                    Op::ReWrap => hsm
                        .rewrap_data_key(ReWrapDataKey {
                            source: u,
                            destination_kek: k2,
                            destination_level: Classification::Personal,
                            destination_binding: binding(Classification::Personal, key_id, 2),
                        })
                        .await
                        .map(drop)
                        .unwrap(),
                }
            }
        })
        .await;
        let best = self.rate.entry((op.name(), in_flight)).or_insert(0.0);
        *best = best.max(run.rate());
        *best
    }

    /// Creates `n` token keys one at a time (as officers create keys) and destroys them again;
    /// returns the creation rate.
    async fn creation(&self, n: u32) -> f64 {
        let id = |i: u32| {
            let mut id = raw_id(9).0;
            id.extend_from_slice(&i.to_be_bytes());
            ObjectId(id)
        };
        let started = Instant::now();
        for i in 0..n {
            self.hsm.create_key(&id(i), "bench creation", Classification::Personal, KeyPurpose::Envelope).await.unwrap();
        }
        let rate = f64::from(n) / started.elapsed().as_secs_f64();
        for i in 0..n {
            self.hsm.destroy_key(&id(i)).await.unwrap();
        }
        rate
    }

    /// Destroys the raw keys and closes the token.
    async fn close(self) {
        for id in [&self.kek, &self.kek2, &self.payload_key] {
            self.hsm.destroy_key(id).await.unwrap();
        }
        self.shut().await;
    }

    /// Closes the token, keeping the raw keys.
    async fn shut(self) {
        let hsm = self.hsm;
        tokio::task::spawn_blocking(move || hsm.shutdown()).await.unwrap();
    }
}

/// The server's peak RSS so far, for a table column.
fn rss_column(server: &TestServer) -> String {
    server.pid().and_then(peak_rss_mib).map_or_else(|| "n/a".to_owned(), |m| format!("{m:.0}"))
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU time a process has used, in all and on its HSM worker threads (named `hsm-...`).
#[derive(Clone, Copy, Default)]
struct Cpu {
    total: Duration,
    hsm_threads: Duration,
}

/// Clock ticks per second of `/proc`'s CPU counters.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a `/proc/.../stat` line (fields 14 and 15, after the parenthesised name).
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn cpu_of(pid: u32) -> Option<Cpu> {
    let ticks = |t: u64| Duration::from_secs_f64(t as f64 / clock_ticks());
    let total = stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let mut hsm = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("hsm-") {
            hsm += std::fs::read_to_string(task.path().join("stat")).ok().as_deref().and_then(stat_ticks).unwrap_or(0);
        }
    }
    Some(Cpu { total: ticks(total), hsm_threads: ticks(hsm) })
}

/// The server's counters that a row reads before and after: CPU time, and on the network HSM the
/// PKCS#11 calls it served.
#[derive(Clone, Copy, Default)]
struct Counters {
    cpu: Cpu,
    hsm_calls: Option<u64>,
    /// CPU time of the network HSM's processes (`hsm-sim serve` and its backends).
    hsm_side: Option<Duration>,
}

/// CPU time (utime + stime, children that exited included) of `pid` and of the processes whose
/// parent it is.
fn process_tree_cpu(pid: u32) -> Option<Duration> {
    let ticks = |stat: &str| -> Option<(u64, u32)> {
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let own = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        let reaped = f.get(13)?.parse::<u64>().ok()? + f.get(14)?.parse::<u64>().ok()?;
        Some((own + reaped, f.get(1)?.parse().ok()?))
    };
    let mut total = ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?.0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if let Some((t, parent)) = std::fs::read_to_string(format!("/proc/{child}/stat")).ok().as_deref().and_then(ticks) {
            if parent == pid {
                total += t;
            }
        }
    }
    Some(Duration::from_secs_f64(total as f64 / clock_ticks()))
}

fn counters(server: &TestServer) -> Counters {
    Counters {
        cpu: server.pid().and_then(cpu_of).unwrap_or_default(),
        hsm_calls: server.net_hsm().and_then(|n| n.status().ok()).map(|s| s.calls),
        hsm_side: server.net_hsm().and_then(|n| n.pid()).and_then(process_tree_cpu),
    }
}

/// Per-request figures of a row: server CPU µs (all, on the HSM threads, outside them), HSM
/// calls and the network HSM's CPU µs, as table cells.
fn per_request(before: Counters, after: Counters, requests: usize) -> [String; 5] {
    let n = requests.max(1) as f64;
    let us = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e6 / n);
    let total = after.cpu.total.saturating_sub(before.cpu.total);
    let hsm = after.cpu.hsm_threads.saturating_sub(before.cpu.hsm_threads);
    let calls = match (before.hsm_calls, after.hsm_calls) {
        (Some(b), Some(a)) => format!("{:.1}", a.saturating_sub(b) as f64 / n),
        _ => "-".to_owned(),
    };
    let hsm_side = match (before.hsm_side, after.hsm_side) {
        (Some(b), Some(a)) => us(a.saturating_sub(b)),
        _ => "-".to_owned(),
    };
    [us(total), us(hsm), us(total.saturating_sub(hsm)), calls, hsm_side]
}

/// One end-to-end request of kind `op`.
#[derive(Clone)]
struct Requester {
    /// One client (one mutual-TLS connection) per `--connections`; request task `t` uses
    /// connection `t % connections`, as several exchange services would.
    clients: Vec<kms_client::KmsClient>,
    c: std::collections::BTreeMap<String, String>,
    sample: Vec<u8>,
    recipient: Arc<kms_client::RecipientKey>,
    payload: Vec<u8>,
}

impl Requester {
    async fn new(server: &TestServer, connections: usize) -> Requester {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(server.client("exchange").await);
        }
        let c = ctx(&[("bench", "1")]);
        let sample = clients[0].generate_data_key("bench/personal", &c, Delivery::WrappedOnly).await.unwrap().wrapped;
        let recipient = Arc::new(server.register_recipient("exchange").await);
        Requester { clients, c, sample, recipient, payload: vec![0x5A; PAYLOAD] }
    }

    async fn call(&self, op: Op, task: usize) {
        let (x, c) = (&self.clients[task % self.clients.len()], &self.c);
        match op {
            Op::GeneratePlaintext => x.generate_data_key("bench/personal", c, Delivery::PlaintextAndWrapped).await.map(drop),
            Op::GenerateWrappedOnly => x.generate_data_key("bench/personal", c, Delivery::WrappedOnly).await.map(drop),
            // Sealed by the server and not opened here: opening is the exchange service's own
            // work on its own host (`open_cost` below measures it), and on a shared two-core
            // machine it would take CPU from the server under test.
            Op::GenerateToRecipient => {
                x.generate_data_key("bench/sensitive", c, Delivery::SealedFor(self.recipient.fingerprint())).await.map(drop)
            }
            Op::DecryptDataKey => x.decrypt_data_key(&self.sample, c, None, None).await.map(drop),
            Op::Encrypt4k => x.encrypt("bench/secret", &self.payload, c).await.map(drop),
            Op::ReWrap => x.re_wrap(&self.sample, c, Some("bench/personal2")).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{}: {e}", op.name()))
    }

    async fn drive(&self, op: Op, in_flight: usize, seconds: f64) -> Run {
        let me = self.clone();
        drive(in_flight, seconds, move |i| {
            let me = me.clone();
            async move { me.call(op, (i % in_flight as u64) as usize).await }
        })
        .await
    }
}

async fn e2e_phase(server: &TestServer, raw: &mut RawBench, args: &Args) {
    let seconds = args.seconds;
    let officer = server.client("officer").await;
    officer.create_key("bench/personal", L::Personal, None, None).await.unwrap();
    officer.create_key("bench/personal2", L::Personal, None, None).await.unwrap();
    officer.create_key("bench/sensitive", L::SensitivePersonal, None, None).await.unwrap();
    officer.create_key("bench/secret", L::Secret, None, None).await.unwrap();
    let requester = Requester::new(server, args.connections).await;

    println!();
    println!(
        "{:<36} {:>9} {:>9} {:>7} {:>7} {:>7} {:>9} {:>7} {:>8} {:>8} {:>8} {:>6} {:>7} {:>7}",
        "request (end to end, mTLS+authz+audit)",
        "in flight",
        "req/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "raw op/s",
        "e2e/raw",
        "CPU us",
        "hsm thr",
        "outside",
        "calls",
        "HSM us",
        "RSS MiB"
    );
    for op in args.ops.iter().copied() {
        for n in args.in_flight.iter().copied() {
            // The raw rate at as many in flight is measured just before and just after the
            // end-to-end row (the server idle meanwhile), and the better of the two is the
            // ceiling: the ratio then compares figures taken within seconds of each other on a
            // machine whose speed drifts.
            raw.measure(op, n, seconds).await;
            let before = counters(server);
            let run = requester.drive(op, n, seconds).await;
            let after = counters(server);
            let rss = rss_column(server);
            let raw_rate = raw.measure(op, n, seconds).await;
            let [cpu, hsm, outside, calls, hsm_side] = per_request(before, after, run.all);
            println!(
                "{:<36} {:>9} {:>9.0} {:>7} {:>7} {:>7} {:>9.0} {:>6.0}% {:>8} {:>8} {:>8} {:>6} {:>7} {:>7}",
                op.name(),
                n,
                run.rate(),
                ms(run.percentile(0.5)),
                ms(run.percentile(0.99)),
                ms(run.percentile(1.0)),
                raw_rate,
                100.0 * run.rate() / raw_rate,
                cpu,
                hsm,
                outside,
                calls,
                hsm_side,
                rss
            );
        }
    }
    println!(
        "  CPU us: the server's CPU time per request, all of it; hsm thr: on its HSM worker threads (in-process: \
         SoftHSM's own work; network: the client module); outside: the rest (TLS, HTTP/2, authorisation, audit). \
         calls: PKCS#11 calls per request that reached the network HSM; HSM us: the network HSM's own CPU time per \
         request (hsm-sim serve and its SoftHSM backends, on the same cores)."
    );
}

/// GenerateDataKey at 64 in flight, raw and end to end, with each number of request-path
/// sessions: the server restarted with `hsm.workers = s`, the raw side opened with `s` sessions.
async fn sessions_curve(server: &mut TestServer, settings: &Settings, args: &Args) {
    let op = Op::GeneratePlaintext;
    println!();
    println!(
        "{:<36} {:>9} {:>10} {:>10} {:>8} {:>8} {:>7}",
        "GenerateDataKey, 64 in flight, with", "raw op/s", "e2e req/s", "e2e/raw", "p50 ms", "p99 ms", "calls"
    );
    for &s in &args.sessions {
        server.restart(Settings { hsm_workers: Some(s), ..settings.clone() });
        let requester = Requester::new(server, args.connections).await;
        let mut raw = RawBench::reopen(server, s).await;
        raw.measure(op, 64, args.seconds).await;
        let before = counters(server);
        let run = requester.drive(op, 64, args.seconds).await;
        let after = counters(server);
        let raw_rate = raw.measure(op, 64, args.seconds).await;
        raw.shut().await;
        let [_, _, _, calls, _] = per_request(before, after, run.all);
        println!(
            "{:<36} {:>9.0} {:>10.0} {:>9.0}% {:>8} {:>8} {:>7}",
            format!("{s} sessions"),
            raw_rate,
            run.rate(),
            100.0 * run.rate() / raw_rate,
            ms(run.percentile(0.5)),
            ms(run.percentile(0.99)),
            calls
        );
    }
    server.restart(settings.clone());
}

async fn creation_and_scaling(server: &TestServer, raw: &RawBench, keys: &[usize], seconds: f64) {
    let officer = server.client("officer").await;
    let x = server.client("exchange").await;
    let c = ctx(&[("bench", "1")]);
    let mut made = 0usize;
    let mut creation_rate = None;
    println!();
    println!(
        "{:<36} {:>10} {:>8} {:>8} {:>10} {:>13} {:>10} {:>8}",
        "GenerateDataKey, 1 in flight, with", "req/s", "p50 ms", "p99 ms", "p50 vs 1", "any key p50", "p99", "RSS MiB"
    );
    let mut first_p50 = None;
    let mut raw_creation = None;
    for &target in keys {
        let batch = target.saturating_sub(made);
        // The raw rate of creating as many token keys, from as many objects on the token, just
        // before: SoftHSM's token writes slow down with every object on the token.
        if raw_creation.is_none() && batch >= 10 {
            raw_creation = Some(raw.creation(u32::try_from(batch).expect("key count")).await);
        }
        let began = Instant::now();
        let before = made;
        // Officers create keys one at a time; so does this.
        for i in 0..batch {
            officer.create_key(&format!("scale/{:05}", made + i), L::Personal, None, None).await.unwrap();
        }
        made = made.max(target);
        if creation_rate.is_none() && made - before >= 10 {
            creation_rate = Some((made - before) as f64 / began.elapsed().as_secs_f64());
        }
        // The same key every time (what the number of keys alone costs), then a different key
        // every time (each request also meets a key the HSM has not used lately).
        let (x2, c2) = (x.clone(), c.clone());
        let same = drive(1, seconds / 2.0, move |_| {
            let (x, c) = (x2.clone(), c2.clone());
            async move { x.generate_data_key("scale/00000", &c, Delivery::WrappedOnly).await.map(drop).unwrap() }
        })
        .await;
        let (x2, c2) = (x.clone(), c.clone());
        let count = made;
        let spread = drive(1, seconds / 2.0, move |i| {
            let (x, c) = (x2.clone(), c2.clone());
            async move {
                let name = format!("scale/{:05}", (i as usize * 7919) % count);
                x.generate_data_key(&name, &c, Delivery::WrappedOnly).await.map(drop).unwrap();
            }
        })
        .await;
        let p50 = same.percentile(0.5);
        let base = *first_p50.get_or_insert(p50);
        println!(
            "{:<36} {:>10.0} {:>8} {:>8} {:>9.0}% {:>13} {:>10} {:>8}",
            format!("{target} keys"),
            same.rate(),
            ms(p50),
            ms(same.percentile(0.99)),
            100.0 * p50.as_secs_f64() / base.as_secs_f64(),
            ms(spread.percentile(0.5)),
            ms(spread.percentile(0.99)),
            rss_column(server)
        );
    }
    if let (Some(rate), Some(raw_rate)) = (creation_rate, raw_creation) {
        println!();
        println!(
            "key creation: {rate:.0}/s end to end (store row, HSM MAC, two audit records), {raw_rate:.0}/s raw token keys: {:.0}%",
            100.0 * rate / raw_rate
        );
    }
}

/// GenerateDataKey (plaintext and wrapped) end to end at each in flight, for each store backend and
/// server count of `--store`/`--servers`/`--compare-stores`, on the network HSM (several servers
/// share one): one client, its load spread over the servers by its endpoint list.
async fn compare_stores(args: &Args) {
    println!(
        "kms-bench: GenerateDataKey plaintext+wrapped end to end; network HSM with {:.1} ms added per call, {} s per measurement",
        args.latency.as_secs_f64() * 1000.0,
        args.seconds
    );
    println!("{:<28} {:>9} {:>10} {:>9} {:>9}", "store, servers", "in flight", "req/s", "p50 ms", "p99 ms");
    let mut baseline: std::collections::HashMap<usize, f64> = std::collections::HashMap::new();
    for &(store, servers) in &args.stores {
        let settings = Settings { log_level: None, hsm_workers: Some(args.workers()), hsm: HsmMode::Network, store, ..Settings::default() };
        let server = TestServer::start(settings.clone());
        if let Some(net) = server.net_hsm() {
            net.set_latency(args.latency).expect("set the network HSM's latency");
        }
        let peers: Vec<_> = (2..=servers as u32).map(|n| server.start_peer(&settings, n)).collect();
        let officer = server.client("officer").await;
        officer.create_key("bench/personal", kms_e2e::pb::Classification::Personal, None, None).await.unwrap();
        let mut endpoints = vec![server.endpoint()];
        endpoints.extend(peers.iter().map(|p| p.endpoint()));
        let x = kms_client::KmsClient::connect_with_files(endpoints.join(","), server.ca_path(), server.path("exchange.crt"), server.path("exchange.key"))
            .await
            .expect("connect to the servers");
        let c = ctx(&[("bench", "1")]);
        let label = format!("{}, {servers}", if store == StoreMode::Sqlite { "SQLite" } else { "PostgreSQL" });
        for &n in &args.in_flight {
            let (x, c) = (x.clone(), c.clone());
            let run = drive(n, args.seconds, move |_| {
                let (x, c) = (x.clone(), c.clone());
                async move {
                    x.generate_data_key("bench/personal", &c, Delivery::PlaintextAndWrapped).await.expect("GenerateDataKey");
                }
            })
            .await;
            let rate = run.rate();
            let ratio = match baseline.get(&n) {
                None => {
                    baseline.insert(n, rate);
                    String::new()
                }
                Some(b) => format!("  {:.0}% of the first row", rate / b * 100.0),
            };
            println!("{label:<28} {n:>9} {rate:>10.0} {:>9} {:>9}{ratio}", ms(run.percentile(0.5)), ms(run.percentile(0.99)));
        }
        drop(peers);
        drop(server);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    if !args.stores.is_empty() {
        compare_stores(&args).await;
        return;
    }
    // The server as deployed: its own default log level (tests run it at debug).
    let settings = Settings { log_level: None, hsm_workers: Some(args.workers()), hsm: args.hsm, ..Settings::default() };
    let mut server = TestServer::provision(&settings);
    match server.net_hsm() {
        None => println!(
            "kms-bench: SoftHSM in-process, token under {}, {} request-path sessions, {} s per measurement",
            server.path("").display(),
            args.workers(),
            args.seconds
        ),
        Some(net) => {
            net.set_latency(args.latency).expect("set the network HSM's latency");
            println!(
                "kms-bench: network HSM (hsm-sim serve, pid {}) on {}, {:.1} ms added per call, {} request-path sessions, {} s per measurement",
                net.pid().unwrap_or(0),
                net.tcp_endpoint().unwrap_or_default(),
                args.latency.as_secs_f64() * 1000.0,
                args.workers(),
                args.seconds
            )
        }
    }
    server.restart(settings.clone());
    let pid = server.pid().expect("server running");
    let mut raw = RawBench::open(&server, args.workers()).await;
    e2e_phase(&server, &mut raw, &args).await;
    println!();
    println!("{:<36} {:>30}", "raw HSM work, in this process", "ops/s at each in flight (best run)");
    for op in args.ops.iter().copied() {
        let rates: Vec<String> = args.in_flight.iter().map(|n| format!("{n}: {:.0}", raw.rate[&(op.name(), *n)])).collect();
        println!("{:<36} {:>30}", op.name(), rates.join("  "));
    }
    if !args.sessions.is_empty() {
        // The raw side's sessions are closed while the curve opens its own.
        let workers = args.workers();
        raw.shut().await;
        sessions_curve(&mut server, &settings, &args).await;
        raw = RawBench::reopen(&server, workers).await;
    }
    if !args.keys.is_empty() {
        creation_and_scaling(&server, &raw, &args.keys, args.seconds).await;
    }
    raw.close().await;
    println!();
    // After a sessions curve the server was restarted: its peak is that of the last process.
    match server.pid().and_then(peak_rss_mib) {
        Some(mib) => println!("server peak RSS: {mib:.1} MiB{}", if server.pid() == Some(pid) { "" } else { " (since the last restart)" }),
        None => println!("server peak RSS: not available (no /proc)"),
    }
    server.stop();
}
