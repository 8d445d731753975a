//! kms-bench: measures the service against the HSM's own limit, on one SoftHSM token, in one run.
//!
//! 1. End to end: the real `kms-server` (mutual TLS, authorisation, durable audit) driven over gRPC
//!    at 1, 8 and 64 requests in flight for each request kind; requests per second, p50 / p99 / max
//!    latency, the ratio to the raw figure, and the server's peak RSS.
//! 2. Raw: the HSM work of each request (the server's own `Hsm` layer, in this process on the same
//!    token, with as many sessions as the server uses: generate and wrap a data key and MAC its
//!    binding, unwrap, GCM encrypt 4 KiB, re-wrap) at 64 jobs in flight, measured just before and
//!    just after each kind's end-to-end rows (the better run is the ceiling); and the rate of
//!    creating token keys.
//! 3. Scaling: GenerateDataKey latency with 1, 1,000 and 10,000 keys in the store and on the token,
//!    and the key creation rate against the raw rate.
//!
//! `kms-bench [--seconds S] [--keys 1,1000,10000] [--only KINDS] [--in-flight 1,8,64]
//! [--hsm-workers N] [--smoke]`. Build in release mode first: `scripts/bench` does both. The token
//! lives under /dev/shm (SoftHSM waits on the disk for every token object it writes). It prints
//! figures; it is not a test (`--smoke` runs it briefly, and the test suite does that to keep it
//! working).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_client::Delivery;
use kms_e2e::pb::Classification as L;
use kms_e2e::{ctx, Settings, TestServer};
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
    /// HSM sessions, in the raw measurement and in the server alike.
    hsm_workers: usize,
}

fn args() -> Args {
    let mut a = Args { seconds: 3.0, keys: vec![1, 1000, 10_000], ops: OPS.to_vec(),
        in_flight: IN_FLIGHT.to_vec(),
        hsm_workers: kms_server::config::DEFAULT_HSM_WORKERS,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--smoke" => {
                a.seconds = 0.2;
                a.keys = vec![1, 20];
            }
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
            "--hsm-workers" => {
                a.hsm_workers = it.next().and_then(|s| s.parse().ok()).expect("--hsm-workers takes a number")
            }
            "--in-flight" => {
                a.in_flight = it
                    .next()
                    .map(|s| s.split(',').map(|k| k.parse().expect("--in-flight takes numbers like 1,8,64")).collect())
                    .expect("--in-flight takes a list")
            }
            "--seconds" => a.seconds = it.next().and_then(|s| s.parse().ok()).expect("--seconds takes a number"),
            "--keys" => {
                a.keys = it
                    .next()
                    .map(|s| s.split(',').filter(|k| !k.is_empty()).map(|k| k.parse().expect("--keys takes numbers like 1,1000,10000")).collect())
                    .expect("--keys takes a list")
            }
            "-h" | "--help" => {
                println!(
                    "kms-bench [--seconds S] [--keys 1,1000,10000] [--only KINDS] [--in-flight 1,8,64] [--hsm-workers N] [--smoke]\n\
                     KINDS: a comma-separated list of {}\n\
                     --keys '' skips the scaling and key-creation part. See the README, section Benchmark.",
                    OPS.iter().map(|op| op.flag()).collect::<Vec<_>>().join(", ")
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other:?}; see --help"),
        }
    }
    a
}

/// Latencies of one run and its wall time.
struct Run {
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
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
                loop {
                    let began = Instant::now();
                    if began >= deadline {
                        break;
                    }
                    op(i).await;
                    if began >= measure_from {
                        last_end = Instant::now();
                        lat.push(last_end - began);
                    }
                    i += in_flight as u64;
                }
                (lat, last_end)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut end = measure_from;
    for t in tasks {
        let (lat, last_end) = t.await.expect("bench task");
        latencies.extend(lat);
        end = end.max(last_end);
    }
    Run { latencies, wall: end - measure_from }
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
    /// The best rate measured per request kind (the ceiling).
    rate: BTreeMap<&'static str, f64>,
}

/// Ids of another length than the service's (20 bytes), destroyed at the end.
fn raw_id(n: u8) -> ObjectId {
    ObjectId(vec![0xBE, 0x4C, n, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
}

fn binding(level: Classification, id: KeyId, version: u32) -> BindingInput {
    BindingInput { header: WrappedKeyBlob::header_for(level, id, version).to_bytes().to_vec(), context_digest: [7; 32] }
}

impl RawBench {
    async fn open(server: &TestServer, args: &Args) -> RawBench {
        let token = server.token();
        let hsm = Hsm::open(HsmConfig {
            module: token.module_path().to_owned(),
            token_label: token.label().to_owned(),
            pin: token.user_pin().clone(),
            approved_up_to: Classification::Secret,
            workers: args.hsm_workers,
            softhsm_conf: Some(token.conf_path().to_owned()),
            module_env: Vec::new(),
            call_timeout: std::time::Duration::from_secs(10),
            admin_timeout: std::time::Duration::from_secs(10),
        })
        .expect("open the token in-process");
        let (kek, kek2, payload_key) = (raw_id(1), raw_id(2), raw_id(3));
        hsm.create_key(&kek, "bench kek", Classification::Personal, KeyPurpose::Envelope).await.unwrap();
        hsm.create_key(&kek2, "bench kek 2", Classification::Personal, KeyPurpose::Envelope).await.unwrap();
        hsm.create_key(&payload_key, "bench payload", Classification::Secret, KeyPurpose::HsmEncrypt).await.unwrap();
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

    /// Measures the HSM work of `op` at 64 jobs in flight; keeps the best rate seen for it.
    async fn measure(&mut self, op: Op, seconds: f64) -> f64 {
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
        let run = drive(64, seconds, move |_| {
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
        let best = self.rate.entry(op.name()).or_insert(0.0);
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

    async fn close(self) {
        for id in [&self.kek, &self.kek2, &self.payload_key] {
            self.hsm.destroy_key(id).await.unwrap();
        }
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

async fn e2e_phase(server: &TestServer, raw: &mut RawBench, args: &Args) {
    let seconds = args.seconds;
    let officer = server.client("officer").await;
    officer.create_key("bench/personal", L::Personal, None, None).await.unwrap();
    officer.create_key("bench/personal2", L::Personal, None, None).await.unwrap();
    officer.create_key("bench/sensitive", L::SensitivePersonal, None, None).await.unwrap();
    officer.create_key("bench/secret", L::Secret, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[("bench", "1")]);
    let sample = x.generate_data_key("bench/personal", &c, Delivery::WrappedOnly).await.unwrap().wrapped;
    let recipient = Arc::new(server.register_recipient("exchange").await);
    let payload = vec![0x5A; PAYLOAD];

    println!();
    println!(
        "{:<36} {:>9} {:>10} {:>8} {:>8} {:>8} {:>10} {:>8} {:>8}",
        "request (end to end, mTLS + authz + audit)", "in flight", "req/s", "p50 ms", "p99 ms", "max ms", "raw req/s", "e2e/raw", "RSS MiB"
    );
    for op in args.ops.iter().copied() {
        // The raw rate is measured just before and just after this kind's end-to-end rows (the
        // server idle meanwhile), and the better of the two is the ceiling: the ratio then
        // compares figures taken within a few seconds of each other on a machine whose speed drifts.
        raw.measure(op, seconds).await;
        let mut rows = Vec::new();
        for n in args.in_flight.iter().copied() {
            let (x, c, sample, recipient, payload) = (x.clone(), c.clone(), sample.clone(), Arc::clone(&recipient), payload.clone());
            let run = drive(n, seconds, move |_| {
                let (x, c, sample, recipient, payload) = (x.clone(), c.clone(), sample.clone(), Arc::clone(&recipient), payload.clone());
                async move {
                    match op {
                        Op::GeneratePlaintext => x.generate_data_key("bench/personal", &c, Delivery::PlaintextAndWrapped).await.map(drop),
                        Op::GenerateWrappedOnly => x.generate_data_key("bench/personal", &c, Delivery::WrappedOnly).await.map(drop),
                        Op::GenerateToRecipient => {
                            x.generate_data_key("bench/sensitive", &c, Delivery::ToRecipient(&recipient)).await.map(drop)
                        }
                        Op::DecryptDataKey => x.decrypt_data_key(&sample, &c, None, None).await.map(drop),
                        Op::Encrypt4k => x.encrypt("bench/secret", &payload, &c).await.map(drop),
                        Op::ReWrap => x.re_wrap(&sample, &c, Some("bench/personal2")).await.map(drop),
                    }
                    .unwrap_or_else(|e| panic!("{}: {e}", op.name()))
                }
            })
            .await;
            rows.push((n, run, rss_column(server)));
        }
        let raw_rate = raw.measure(op, seconds).await;
        for (n, run, rss) in rows {
            println!(
                "{:<36} {:>9} {:>10.0} {:>8} {:>8} {:>8} {:>10.0} {:>7.0}% {:>8}",
                op.name(),
                n,
                run.rate(),
                ms(run.percentile(0.5)),
                ms(run.percentile(0.99)),
                ms(run.percentile(1.0)),
                raw_rate,
                100.0 * run.rate() / raw_rate,
                rss
            );
        }
    }
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    // The server as deployed: its own default log level (tests run it at debug).
    let settings = Settings { log_level: None, hsm_workers: Some(args.hsm_workers), ..Settings::default() };
    let mut server = TestServer::provision(&settings);
    println!("kms-bench: SoftHSM token under {}, {} s per measurement", server.path("").display(), args.seconds);
    server.restart(settings);
    let pid = server.pid().expect("server running");
    let mut raw = RawBench::open(&server, &args).await;
    e2e_phase(&server, &mut raw, &args).await;
    println!();
    println!("{:<36} {:>10}", "raw HSM work, 64 in flight, in-process", "ops/s (best run)");
    for op in args.ops.iter().copied() {
        println!("{:<36} {:>10.0}", op.name(), raw.rate[op.name()]);
    }
    if !args.keys.is_empty() {
        creation_and_scaling(&server, &raw, &args.keys, args.seconds).await;
    }
    raw.close().await;
    println!();
    match peak_rss_mib(pid) {
        Some(mib) => println!("server peak RSS: {mib:.1} MiB"),
        None => println!("server peak RSS: not available (no /proc)"),
    }
    server.stop();
}
