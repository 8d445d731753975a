//! Crash consistency (invariant 6), with the real server binary, a real SoftHSM token and a
//! real SQLite file.
//!
//! Each round: clients create, rotate, use and schedule the destruction of PERSONAL keys (waiting
//! period 1 s, lifecycle task every second, so the server destroys keys and versions on its own
//! too) until the server is killed with SIGKILL at a random moment; half the kills are aimed at the
//! lifecycle task's next pass. Then, with the server down, the store must hold every acknowledged
//! operation; after the restart (whose reconciliation must find no forged row and no missing
//! object), the store and the token must agree (every live version has its object, every object has
//! a version, nothing destroyed came back), and every data key issued before any kill must decrypt
//! to the same bytes, or be refused with FAILED_PRECONDITION exactly when its key or version is on
//! its way to destruction.
//!
//! The suite runs 200 rounds. `KMS_CRASH_ROUNDS` sets another number (`scripts/crash-soak` runs a
//! long one) and `KMS_CRASH_SEED` replays a run: the seed is printed at the start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_client::{ClientError, Delivery, KmsClient};
use kms_e2e::pb::Classification as L;
use kms_e2e::{ctx, object_id, Settings, TestServer};
use tonic::Code;

const SUITE_ROUNDS: u32 = 200;
/// Concurrent clients in each round.
const WORKERS: usize = 4;
/// Live (not destroyed) keys the workers aim to keep.
const LIVE_KEYS: usize = 4;

/// splitmix64: small, seedable, good enough to pick operations and moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }
}

/// What the clients were told: only acknowledged operations are recorded.
#[derive(Default)]
struct Model {
    keys: BTreeMap<String, KeyModel>,
    blobs: Vec<Blob>,
    next_key: u64,
    /// Key versions seen DESTROYED in the store: nothing may bring them back.
    destroyed: BTreeSet<(String, u32)>,
}

#[derive(Clone, Debug, Default)]
struct KeyModel {
    /// Hex key id.
    id: String,
    /// The highest version whose creation (by CreateKey or RotateKey) was acknowledged.
    acked_version: u32,
    destruction_acked: bool,
    version_destruction_acked: BTreeSet<u32>,
}

#[derive(Clone)]
struct Blob {
    key: String,
    version: u32,
    wrapped: Vec<u8>,
    context: BTreeMap<String, String>,
    plaintext: Vec<u8>,
    round: u32,
}

/// One key row and its version rows, as read from the store.
#[derive(Clone, Debug)]
struct Row {
    id: String,
    state: String,
    primary: u32,
    versions: BTreeMap<u32, String>,
}

/// The store, read from outside the server (one snapshot of the SQLite file, or of the
/// PostgreSQL database): name -> row.
fn read_store(server: &TestServer) -> BTreeMap<String, Row> {
    // (id, name, state, primary) and (key id, version, object id, state).
    let (keys, versions): (Vec<(Vec<u8>, String, String, u32)>, Vec<(Vec<u8>, u32, Vec<u8>, String)>) = match server.pg_store() {
        None => {
            let db = rusqlite::Connection::open_with_flags(server.store_path(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .expect("open the store read-only");
            let tx = db.unchecked_transaction().expect("one snapshot");
            let mut q = tx.prepare("SELECT id, name, state, primary_version FROM keys").unwrap();
            let keys = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).unwrap().map(Result::unwrap).collect();
            let mut q = tx.prepare("SELECT key_id, version, object_id, state FROM key_versions").unwrap();
            let versions = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).unwrap().map(Result::unwrap).collect();
            (keys, versions)
        }
        // On a thread of its own: the blocking PostgreSQL client cannot run on the test's runtime.
        Some(pg) => std::thread::scope(|scope| scope.spawn(|| {
            let mut client = pg.connect();
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .expect("one snapshot");
            let keys = tx
                .query("SELECT id, name, state, primary_version FROM keys", &[])
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), u32::try_from(r.get::<_, i64>(3)).unwrap()))
                .collect();
            let versions = tx
                .query("SELECT key_id, version, object_id, state FROM key_versions", &[])
                .unwrap()
                .iter()
                .map(|r| (r.get(0), u32::try_from(r.get::<_, i64>(1)).unwrap(), r.get(2), r.get(3)))
                .collect();
            (keys, versions)
        }).join().expect("read the PostgreSQL store")),
    };
    let mut rows = BTreeMap::new();
    let mut by_id = HashMap::new();
    for (id, name, state, primary) in keys {
        let id = hex(&id);
        by_id.insert(id.clone(), name.clone());
        rows.insert(name, Row { id, state, primary, versions: BTreeMap::new() });
    }
    for (key_id, version, object, state) in versions {
        let (key_id, object) = (hex(&key_id), hex(&object));
        assert_eq!(object, object_id(&key_id, version), "a version row names another key's object");
        let name = by_id.get(&key_id).unwrap_or_else(|| panic!("version {version} of unknown key {key_id}"));
        rows.get_mut(name).expect("key row").versions.insert(version, state);
    }
    rows
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn settings() -> Settings {
    Settings { destruction_wait_seconds: 1, lifecycle_check_seconds: 1, ..Settings::default() }
}

/// Whether an error seen before the kill is one the operation may legitimately meet: the key or
/// version on its way to destruction (after an unacknowledged destruction), a version that is the
/// primary after an unacknowledged rotation, or two officers changing one key at once.
fn expected_refusal(e: &ClientError) -> bool {
    matches!(e.status().map(|s| s.code()), Some(Code::FailedPrecondition | Code::Aborted))
}

struct Shared {
    model: Mutex<Model>,
    killed: AtomicBool,
    /// Errors that no kill explains, for the round to report.
    surprises: Mutex<Vec<String>>,
}

impl Shared {
    fn refused(&self, what: &str, e: &ClientError) {
        if !self.killed.load(Ordering::SeqCst) && !expected_refusal(e) {
            self.surprises.lock().unwrap().push(format!("{what}: {e}"));
        }
    }
}

async fn worker(shared: Arc<Shared>, officer: KmsClient, exchange: KmsClient, seed: u64, round: u32) {
    let mut rng = Rng(seed);
    while !shared.killed.load(Ordering::SeqCst) {
        let (live, name_for_new) = {
            let mut m = shared.model.lock().unwrap();
            let live: Vec<(String, u32)> = m
                .keys
                .iter()
                .filter(|(_, k)| !k.destruction_acked)
                .map(|(n, k)| (n.clone(), k.acked_version))
                .collect();
            m.next_key += 1;
            (live, format!("r{round}-k{}", m.next_key))
        };
        // A short pause between operations: the point is to be killed in the middle of them, not
        // to pile up thousands of keys.
        tokio::time::sleep(Duration::from_millis(rng.below(8))).await;
        let roll = rng.below(100);
        if live.len() < LIVE_KEYS || roll < 3 {
            match officer.create_key(&name_for_new, L::Personal, None, None).await {
                Ok(k) => {
                    let mut m = shared.model.lock().unwrap();
                    m.keys.insert(
                        name_for_new,
                        KeyModel { id: k.id, acked_version: k.primary_version, ..KeyModel::default() },
                    );
                }
                Err(e) => shared.refused(&format!("create {name_for_new}"), &e),
            }
            continue;
        }
        let (name, acked) = rng.pick(&live).cloned().expect("live keys");
        match roll {
            3..=54 => {
                let context = ctx(&[("record", &rng.next().to_string())]);
                match exchange.generate_data_key(&name, &context, Delivery::PlaintextAndWrapped).await {
                    Ok(dk) => {
                        let plaintext = dk.plaintext.as_ref().expect("plaintext asked for").to_vec();
                        shared.model.lock().unwrap().blobs.push(Blob {
                            key: name,
                            version: dk.key_version,
                            wrapped: dk.wrapped,
                            context,
                            plaintext,
                            round,
                        });
                    }
                    Err(e) => shared.refused(&format!("generate under {name}"), &e),
                }
            }
            55..=95 if roll < 85 || acked < 2 => match officer.rotate_key(&name).await {
                Ok(outcome) => {
                    let v = outcome.key().primary_version;
                    assert!(outcome.pending_approval().is_none(), "PERSONAL rotation needs one officer");
                    let mut m = shared.model.lock().unwrap();
                    let k = m.keys.get_mut(&name).expect("known key");
                    k.acked_version = k.acked_version.max(v);
                }
                Err(e) => shared.refused(&format!("rotate {name}"), &e),
            },
            85..=95 => {
                let v = 1 + rng.below(u64::from(acked - 1)) as u32;
                let nz = std::num::NonZeroU32::new(v).expect("v >= 1");
                match officer.schedule_version_destruction(&name, nz).await {
                    Ok(_) => {
                        let mut m = shared.model.lock().unwrap();
                        m.keys.get_mut(&name).expect("known key").version_destruction_acked.insert(v);
                    }
                    Err(e) => shared.refused(&format!("destroy {name} v{v}"), &e),
                }
            }
            _ => match officer.schedule_key_destruction(&name).await {
                Ok(_) => {
                    shared.model.lock().unwrap().keys.get_mut(&name).expect("known key").destruction_acked = true;
                }
                Err(e) => shared.refused(&format!("destroy {name}"), &e),
            },
        }
    }
}

/// With the server down: every acknowledged operation is in the store, and nothing destroyed came
/// back. Keys whose creation was not acknowledged but did commit are adopted.
fn check_acknowledged(model: &mut Model, store: &BTreeMap<String, Row>, round: u32) {
    for (name, k) in &model.keys {
        let row = store.get(name).unwrap_or_else(|| panic!("round {round}: acknowledged key {name} is not in the store"));
        assert_eq!(row.id, k.id, "round {round}: key {name} has another id");
        for v in 1..=k.acked_version {
            assert!(row.versions.contains_key(&v), "round {round}: acknowledged version {v} of {name} is missing: {row:?}");
        }
        assert!(row.primary >= k.acked_version, "round {round}: {name} primary {} < acknowledged {}", row.primary, k.acked_version);
        if k.destruction_acked {
            assert!(
                row.state == "PENDING_DESTRUCTION" || row.state == "DESTROYED",
                "round {round}: acknowledged destruction of {name} undone: {row:?}"
            );
        }
        for v in &k.version_destruction_acked {
            let state = &row.versions[v];
            assert!(
                state == "PENDING_DESTRUCTION" || state == "DESTROYED",
                "round {round}: acknowledged destruction of {name} v{v} undone: {row:?}"
            );
        }
    }
    for (name, version) in &model.destroyed {
        let row = &store[name];
        assert_eq!(row.versions[version], "DESTROYED", "round {round}: destroyed {name} v{version} came back");
    }
    for (name, row) in store {
        if row.state == "DESTROYED" {
            assert!(row.versions.values().all(|s| s == "DESTROYED"), "round {round}: destroyed key {name} has live versions: {row:?}");
        }
        for (v, s) in &row.versions {
            if s == "DESTROYED" {
                model.destroyed.insert((name.clone(), *v));
            }
        }
        model.keys.entry(name.clone()).or_insert_with(|| KeyModel { id: row.id.clone(), ..KeyModel::default() });
    }
}

fn lifecycle_passes(log: &str) -> usize {
    log.matches("lifecycle pass done").count()
}

/// Waits until the server's lifecycle task has finished a pass since the log had `before` of them.
fn wait_for_lifecycle_pass(server: &TestServer, before: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while lifecycle_passes(&server.log()) <= before {
        assert!(Instant::now() < deadline, "the lifecycle task did not finish a pass within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The last start-up reconciliation report in the log, as field -> count.
fn last_reconciliation(log: &str) -> BTreeMap<String, u64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("start-up reconciliation of store and token done"))
        .expect("the server logs its reconciliation");
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// After the restart: the store and the token agree. Reads the store, the token, the store again:
/// a version live in both reads must have had its object all along (objects are made before their
/// row commits and destroyed only after their tombstone does), and no client is running, so every
/// object must have a row. Versions destroyed before the restart must be gone from the token.
fn check_agreement(server: &TestServer, before_restart: &BTreeMap<String, Row>, round: u32) -> BTreeMap<String, Row> {
    let first = read_store(server);
    // Key versions have 20-byte ids and `kms:` labels; the server's own binding key has a named id.
    let objects = server.token_objects();
    let strays: Vec<_> = objects.iter().filter(|o| o.id.len() != 40 && o.kind != "Secret Key Object; Generic secret length 32").collect();
    assert!(strays.is_empty(), "round {round}: objects that are no key version, left on the token: {strays:?}");
    let token: BTreeSet<String> = objects.into_iter().filter(|o| o.id.len() == 40).map(|o| o.id).collect();
    let second = read_store(server);
    for (name, row) in &first {
        for (v, s) in &row.versions {
            let live_then = s != "DESTROYED";
            let live_now = second[name].versions[v] != "DESTROYED";
            if live_then && live_now {
                assert!(token.contains(&object_id(&row.id, *v)), "round {round}: {name} v{v} is {s} in the store but not on the token");
            }
        }
    }
    let known: BTreeMap<String, (String, u32)> = second
        .iter()
        .flat_map(|(name, row)| row.versions.keys().map(move |v| (object_id(&row.id, *v), (name.clone(), *v))))
        .collect();
    for object in &token {
        let (name, v) = known
            .get(object)
            .unwrap_or_else(|| panic!("round {round}: token object {object} belongs to no key version (an orphan)"));
        if let Some(row) = before_restart.get(name) {
            assert_ne!(
                row.versions.get(v).map(String::as_str),
                Some("DESTROYED"),
                "round {round}: {name} v{v} was DESTROYED before the restart but its object is still on the token"
            );
        }
    }
    second
}

/// Every blob decrypts to its bytes while its key and version are ENABLED, and is refused with
/// FAILED_PRECONDITION once either is on its way to destruction. Checks the blobs of the last round
/// and a sample of older ones (all of them when `all`).
async fn check_blobs(blobs: &[Blob], store: &BTreeMap<String, Row>, exchange: &KmsClient, round: u32, rng: &mut Rng, all: bool) -> usize {
    let mut picked: Vec<&Blob> = blobs.iter().filter(|b| all || b.round + 1 >= round).collect();
    if !all && !blobs.is_empty() {
        for _ in 0..16 {
            picked.push(&blobs[rng.below(blobs.len() as u64) as usize]);
        }
    }
    for b in &picked {
        let row = &store[&b.key];
        let version_state = row.versions.get(&b.version).map(String::as_str);
        let usable = row.state == "ENABLED" && version_state == Some("ENABLED");
        match exchange.decrypt_data_key(&b.wrapped, &b.context, None, None).await {
            Ok(dk) => {
                assert!(usable, "round {round}: a blob of {} v{} decrypted while {} / {version_state:?}", b.key, b.version, row.state);
                assert_eq!(dk.plaintext.as_slice(), b.plaintext.as_slice(), "round {round}: a blob of {} decrypted to other bytes", b.key);
                assert_eq!(dk.key_version, b.version);
            }
            Err(e) => {
                let code = e.status().map(|s| s.code());
                assert!(
                    !usable && code == Some(Code::FailedPrecondition),
                    "round {round}: a blob of {} v{} ({} / {version_state:?}) was refused: {e}",
                    b.key,
                    b.version,
                    row.state
                );
            }
        }
    }
    picked.len()
}

fn seed() -> u64 {
    match std::env::var("KMS_CRASH_SEED") {
        Ok(s) => s.parse().expect("KMS_CRASH_SEED must be a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    }
}

fn rounds(default: u32) -> u32 {
    std::env::var("KMS_CRASH_ROUNDS").ok().map(|r| r.parse().expect("KMS_CRASH_ROUNDS must be a number")).unwrap_or(default)
}

#[derive(Default, Debug)]
struct Tally {
    acked_creates: usize,
    blobs: usize,
    decrypts_checked: usize,
    destroyed_versions: usize,
    debris_destroyed: u64,
    leftovers_destroyed: u64,
    incomplete_destroyed: u64,
    kills_during_startup_pass: u32,
    /// Wall time spent restarting, checking, and working until the kill.
    restarting: Duration,
    checking: Duration,
    working: Duration,
}

async fn crash_loop(rounds: u32) -> Tally {
    let seed = seed();
    eprintln!("crash loop: {rounds} rounds, KMS_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let mut server = TestServer::start(settings());
    let shared = Arc::new(Shared { model: Mutex::new(Model::default()), killed: AtomicBool::new(false), surprises: Mutex::new(vec![]) });
    let mut tally = Tally::default();
    let mut before_restart = BTreeMap::new();
    let mut passes_before = 0;
    for round in 1..=rounds {
        // The restart: reconciliation repaired what the kill left, and found nothing it could not.
        let report = last_reconciliation(&server.log());
        assert_eq!((report["forged_rows"], report["missing_objects"]), (0, 0), "round {round}: {report:?}");
        // Nothing the kill left is beyond proof: every object no row names is named by an intent
        // of a request the trail shows unacknowledged, so none is kept as unknown.
        assert_eq!(
            (report["unknown_objects"], report["undecided"], report["forged_intents"], report["incomplete_kept"]),
            (0, 0, 0, 0),
            "round {round}: {report:?}"
        );
        tally.debris_destroyed += report["debris_destroyed"];
        tally.leftovers_destroyed += report["leftovers_destroyed"];
        tally.incomplete_destroyed += report["incomplete_destroyed"];

        let workers;
        let kill_at;
        if rng.below(4) == 0 {
            // A kill during start-up: the lifecycle task's first pass is destroying what came due
            // while the server was down. No checks this round; the next restart is checked.
            tally.kills_during_startup_pass += 1;
            workers = Vec::new();
            kill_at = Instant::now() + Duration::from_millis(rng.below(15));
        } else {
            let checks_began = Instant::now();
            let officer = server.client("officer").await;
            let exchange = server.client("exchange").await;
            // The token is read from outside once the first lifecycle pass is over, not while
            // SoftHSM rewrites object files, which another process may see half-written.
            wait_for_lifecycle_pass(&server, passes_before);
            let store = check_agreement(&server, &before_restart, round);
            let blobs = shared.model.lock().unwrap().blobs.clone();
            tally.decrypts_checked += check_blobs(&blobs, &store, &exchange, round, &mut rng, false).await;
            tally.checking += checks_began.elapsed();

            // Work until the kill, at a random moment.
            shared.killed.store(false, Ordering::SeqCst);
            workers = (0..WORKERS)
                .map(|_| tokio::spawn(worker(shared.clone(), officer.clone(), exchange.clone(), rng.next(), round)))
                .collect();
            kill_at = Instant::now() + Duration::from_millis(rng.below(400));
        }
        let work_began = Instant::now();
        tokio::time::sleep_until(kill_at.into()).await;
        tally.working += work_began.elapsed();
        shared.killed.store(true, Ordering::SeqCst);
        server.kill();
        for w in workers {
            tokio::time::timeout(Duration::from_secs(30), w).await.expect("a worker hung after the kill").expect("worker");
        }
        let surprises = std::mem::take(&mut *shared.surprises.lock().unwrap());
        if !surprises.is_empty() {
            let log = server.log();
            let lines: Vec<&str> = log.lines().collect();
            let errors: Vec<&str> = (0..lines.len())
                .filter(|&i| lines[i].contains("ERROR"))
                .flat_map(|i| lines[i.saturating_sub(8)..=i].iter().copied())
                .collect();
            panic!("round {round} (KMS_CRASH_SEED={seed}): unexpected refusals before the kill: {surprises:#?}\nserver errors:\n{}", errors.join("\n"));
        }

        // The server is down: the store must hold everything acknowledged.
        before_restart = read_store(&server);
        check_acknowledged(&mut shared.model.lock().unwrap(), &before_restart, round);
        let restart_began = Instant::now();
        passes_before = lifecycle_passes(&server.log());
        server.restart(settings());
        tally.restarting += restart_began.elapsed();
    }

    // A last, complete check: every blob ever issued.
    let exchange = server.client("exchange").await;
    wait_for_lifecycle_pass(&server, passes_before);
    let store = check_agreement(&server, &before_restart, rounds + 1);
    let blobs = shared.model.lock().unwrap().blobs.clone();
    tally.decrypts_checked += check_blobs(&blobs, &store, &exchange, rounds + 1, &mut rng, true).await;
    let model = shared.model.lock().unwrap();
    tally.acked_creates = model.keys.values().filter(|k| k.acked_version > 0).count();
    tally.blobs = model.blobs.len();
    tally.destroyed_versions = model.destroyed.len();
    eprintln!("crash loop done (KMS_CRASH_SEED={seed}): {tally:?}");
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_operation_survives_sigkill() {
    let rounds = rounds(SUITE_ROUNDS);
    let tally = crash_loop(rounds).await;
    // The loop must have done real work, or it proves nothing: keys made, data keys issued,
    // versions destroyed by the lifecycle task, and kills that left something to repair.
    assert!(tally.acked_creates >= rounds as usize / 10, "{tally:?}");
    assert!(tally.blobs >= rounds as usize, "{tally:?}");
    assert!(tally.destroyed_versions > 0, "{tally:?}");
    assert!(tally.debris_destroyed + tally.leftovers_destroyed + tally.incomplete_destroyed > 0, "no kill ever interrupted a creation or destruction: {tally:?}");
}
