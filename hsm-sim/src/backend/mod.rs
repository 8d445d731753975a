//! `hsm-sim backend`: one SoftHSM instance serving one client connection of `hsm-sim serve`,
//! speaking the wire format on its stdin (requests, each frame's body prefixed with the delay to
//! wait before running it: `serve`'s injected latency) and stdout (responses, unchanged).
//!
//! # Why one process per client
//! SoftHSM keeps login state per process: in one process, one client's `C_Logout` would log every
//! client out, and an SO login would be refused while another client is logged in as user. A
//! network HSM keeps login per application, so `serve` starts one backend per connection, and
//! every client gets its own SoftHSM instance, sessions, login state and object handles, over the
//! one token directory. Token objects one client makes appear to the others at their next search
//! (SoftHSM rereads the directory); the token write lock ([`token_lock`]) makes writes atomic to
//! every other process.
//!
//! # Threads
//! The main thread reads requests and hands each to the thread of its session (one per open
//! session, owning its `cryptoki::Session`: sessions run in parallel, each in order), or to the
//! general thread for calls without a session. Responses are written whole under one lock.
//!
//! The backend exits when its stdin ends (its `serve` closed the connection, or died): it lets the
//! calls in progress finish for up to [`DRAIN_TIMEOUT`], finalises SoftHSM and exits. A malformed
//! frame ends it at once (its `serve` then closes the client's connection). Must never outlive its
//! stdin, never print a request's contents, and never give a client a handle of another's.

mod convert;
mod exec;
mod nested;
mod objects;
mod token_lock;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::MechanismType;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use hsm_sim::SimToken;
use hsm_sim_wire::{read_frame_up_to, write_frame, Op, Reply, Request, Response, WireError, MAX_FRAME};

use convert::{rv, Ckr};
use objects::ObjectTable;
use token_lock::{Access, TokenLock};

/// How long calls in progress may run once the backend has been told to stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Most sessions one client may hold open.
const MAX_SESSIONS: usize = 1024;

enum Job {
    /// A request, and how long to wait before running it (the latency `serve` injects).
    Run(u32, Request, Duration),
    /// Close the session without answering anyone (`C_CloseAllSessions`), then acknowledge.
    Close(mpsc::SyncSender<()>),
}

struct SessionEntry {
    slot: u64,
    jobs: Sender<Job>,
    thread: JoinHandle<()>,
}

struct Backend {
    pkcs11: Pkcs11,
    token_dir: PathBuf,
    objects: ObjectTable,
    /// Our stdout as a plain file: `io::Stdout` is line-buffered, and would split a binary frame at
    /// every newline byte into several writes.
    out: Mutex<File>,
    sessions: Mutex<HashMap<u64, SessionEntry>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Backend {
    fn respond(&self, id: u32, op: Op, result: Result<Reply, Ckr>) {
        let response = match result {
            Ok(reply) => Response::ok(reply),
            Err(code) => Response::error(code),
        };
        let frame = response.encode(id, op);
        let mut out = lock(&self.out);
        if write_frame(&mut *out, &frame).is_err() {
            // Nobody reads our answers any more: `serve` is gone.
            std::process::exit(0);
        }
    }

    fn dispatch(self: &Arc<Self>, id: u32, req: Request, delay: Duration, general: &Sender<(u32, Request, Duration)>) {
        let op = req.op();
        let Some(session) = req.session() else {
            if general.send((id, req, delay)).is_err() {
                self.respond(id, op, Err(CKR_GENERAL_ERROR));
            }
            return;
        };
        // Sent under the table lock: a worker that leaves the table first can then drain its
        // queue knowing nothing more arrives.
        let sessions = lock(&self.sessions);
        let sent = match sessions.get(&session) {
            Some(e) => e.jobs.send(Job::Run(id, req, delay)).is_ok(),
            None => false,
        };
        drop(sessions);
        if !sent {
            self.respond(id, op, Err(CKR_SESSION_HANDLE_INVALID));
        }
    }

    /// The calls without a session, one at a time.
    fn run_general(self: &Arc<Self>, jobs: Receiver<(u32, Request, Duration)>) {
        while let Ok((id, req, delay)) = jobs.recv() {
            wait(delay);
            let op = req.op();
            let result = self.general(req);
            self.respond(id, op, result);
        }
    }

    fn general(self: &Arc<Self>, req: Request) -> Result<Reply, Ckr> {
        let p = &self.pkcs11;
        let slot = |s: u64| Slot::try_from(s).map_err(|_| CKR_SLOT_ID_INVALID);
        match req {
            Request::GetSlotList { token_present } => {
                let slots = if token_present { p.get_slots_with_token() } else { p.get_all_slots() }.map_err(rv)?;
                Ok(Reply::SlotList(slots.into_iter().map(|s| s.id()).collect()))
            }
            Request::GetSlotInfo { slot: s } => Ok(Reply::SlotInfo(convert::slot_info(&p.get_slot_info(slot(s)?).map_err(rv)?))),
            Request::GetTokenInfo { slot: s } => {
                let lock = TokenLock::open(&self.token_dir).map_err(|_| CKR_DEVICE_ERROR)?;
                let _r = lock.hold(Access::Scan);
                Ok(Reply::TokenInfo(convert::token_info(&p.get_token_info(slot(s)?).map_err(rv)?)))
            }
            Request::GetMechanismList { slot: s } => {
                // Only what SoftHSM offers and requests can carry (cryptoki already leaves out the
                // mechanisms it does not know).
                let list = p.get_mechanism_list(slot(s)?).map_err(rv)?;
                Ok(Reply::MechanismList(list.into_iter().map(|m| *m).filter(|m| convert::forwarded(*m)).collect()))
            }
            Request::GetMechanismInfo { slot: s, mechanism } => {
                if !convert::forwarded(mechanism) {
                    return Err(CKR_MECHANISM_INVALID);
                }
                let m = MechanismType::try_from(mechanism).map_err(|_| CKR_MECHANISM_INVALID)?;
                Ok(Reply::MechanismInfo(convert::mechanism_info(&p.get_mechanism_info(slot(s)?, m).map_err(rv)?)))
            }
            Request::InitToken { slot: s, so_pin, label } => {
                let pin = so_pin.ok_or(CKR_ARGUMENTS_BAD)?;
                let pin = AuthPin::from(std::str::from_utf8(&pin).map_err(|_| CKR_PIN_INVALID)?.to_owned());
                let label = std::str::from_utf8(&label).map_err(|_| CKR_ARGUMENTS_BAD)?.trim_end_matches(' ');
                let lock = TokenLock::open(&self.token_dir).map_err(|_| CKR_DEVICE_ERROR)?;
                let _w = lock.hold(Access::Write);
                p.init_token(slot(s)?, &pin, label).map_err(rv)?;
                Ok(Reply::None)
            }
            Request::OpenSession { slot: s, flags } => self.open_session(slot(s)?, flags),
            Request::CloseAllSessions { slot: s } => {
                let closing: Vec<SessionEntry> = {
                    let mut sessions = lock(&self.sessions);
                    let ids: Vec<u64> = sessions.iter().filter(|(_, e)| e.slot == s).map(|(id, _)| *id).collect();
                    ids.into_iter().filter_map(|id| sessions.remove(&id)).collect()
                };
                for e in closing {
                    let (ack, done) = mpsc::sync_channel(1);
                    if e.jobs.send(Job::Close(ack)).is_ok() {
                        let _ = done.recv();
                    }
                    let _ = e.thread.join();
                }
                Ok(Reply::None)
            }
            _ => Err(CKR_GENERAL_ERROR),
        }
    }

    fn open_session(self: &Arc<Self>, slot: Slot, flags: u64) -> Result<Reply, Ckr> {
        if lock(&self.sessions).len() >= MAX_SESSIONS {
            return Err(CKR_SESSION_COUNT);
        }
        let lock_file = TokenLock::open(&self.token_dir).map_err(|_| CKR_DEVICE_ERROR)?;
        let session = if flags & CKF_RW_SESSION != 0 {
            self.pkcs11.open_rw_session(slot)
        } else {
            self.pkcs11.open_ro_session(slot)
        }
        .map_err(rv)?;
        let id = session.handle();
        let (tx, rx) = mpsc::channel();
        let me = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name(format!("session-{id}"))
            .spawn(move || me.run_session(session, id, lock_file, rx))
            .map_err(|_| CKR_HOST_MEMORY)?;
        lock(&self.sessions).insert(id, SessionEntry { slot: slot.id(), jobs: tx, thread });
        Ok(Reply::Session(id))
    }

    /// A session's thread: its requests in order, until it is closed.
    fn run_session(self: Arc<Self>, session: Session, id: u64, token_lock: TokenLock, jobs: Receiver<Job>) {
        loop {
            match jobs.recv() {
                Ok(Job::Run(rid, Request::CloseSession { .. }, delay)) => {
                    wait(delay);
                    // Out of the table first, so that nothing more is queued; then drain.
                    lock(&self.sessions).remove(&id);
                    let closed = session.close().map(|()| Reply::None).map_err(rv);
                    self.objects.session_closed(id);
                    self.respond(rid, Op::CloseSession, closed);
                    self.refuse_queued(&jobs);
                    return;
                }
                Ok(Job::Run(rid, req, delay)) => {
                    wait(delay);
                    let op = req.op();
                    let ctx = exec::Context { session: &session, id, objects: &self.objects, lock: &token_lock };
                    let result = exec::run(&ctx, req);
                    self.respond(rid, op, result);
                }
                Ok(Job::Close(ack)) => {
                    let _ = session.close();
                    self.objects.session_closed(id);
                    let _ = ack.send(());
                    self.refuse_queued(&jobs);
                    return;
                }
                // The backend is stopping; dropping the session closes it.
                Err(_) => return,
            }
        }
    }

    fn refuse_queued(&self, jobs: &Receiver<Job>) {
        while let Ok(job) = jobs.try_recv() {
            match job {
                Job::Run(rid, req, _) => self.respond(rid, req.op(), Err(CKR_SESSION_HANDLE_INVALID)),
                Job::Close(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    }
}

/// Runs the backend for the token directory `dir` until stdin ends.
pub fn run(dir: &Path) -> ExitCode {
    let token = match SimToken::open(dir) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("hsm-sim backend: {e}");
            return ExitCode::FAILURE;
        }
    };
    let pkcs11 = match Pkcs11::new(token.module_path()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hsm-sim backend: cannot load {}: {e}", token.module_path().display());
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        eprintln!("hsm-sim backend: C_Initialize failed: {e}");
        return ExitCode::FAILURE;
    }
    let out = match io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => File::from(fd),
        Err(e) => {
            eprintln!("hsm-sim backend: no stdout: {e}");
            return ExitCode::FAILURE;
        }
    };
    let backend = Arc::new(Backend {
        pkcs11,
        token_dir: token.dir().to_owned(),
        objects: ObjectTable::default(),
        out: Mutex::new(out),
        sessions: Mutex::new(HashMap::new()),
    });
    let (general_tx, general_rx) = mpsc::channel();
    let general = {
        let b = Arc::clone(&backend);
        std::thread::Builder::new().name("general".into()).spawn(move || b.run_general(general_rx))
    };
    let general = match general {
        Ok(g) => g,
        Err(e) => {
            eprintln!("hsm-sim backend: cannot start a thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut input = io::stdin().lock();
    let code = loop {
        match read_frame_up_to(&mut input, MAX_FRAME + 4) {
            Ok(Some(body)) => match split_delay(&body).and_then(|(delay, req)| Ok((delay, Request::decode(req)?))) {
                Ok((delay, (id, req))) => backend.dispatch(id, req, delay, &general_tx),
                Err(e) => {
                    eprintln!("hsm-sim backend: malformed request ({e}); closing the connection");
                    break ExitCode::from(2);
                }
            },
            Ok(None) => break ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hsm-sim backend: reading requests failed: {e}");
                break ExitCode::FAILURE;
            }
        }
    };
    stop(&backend, general_tx, general);
    code
}

/// A request from `serve`: the delay before running it (microseconds, 4 bytes big-endian), then
/// the client's frame body.
fn split_delay(body: &[u8]) -> Result<(Duration, &[u8]), WireError> {
    match body.split_first_chunk::<4>() {
        Some((delay, rest)) => Ok((Duration::from_micros(u64::from(u32::from_be_bytes(*delay))), rest)),
        None => Err(WireError::Truncated { field: "delay" }),
    }
}

/// Sleeps `delay` (the latency `serve` injects) on the calling thread: the session's own, so that
/// sessions are delayed concurrently and no other thread is woken to time it.
fn wait(delay: Duration) {
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
}

/// Lets the calls in progress finish (at most [`DRAIN_TIMEOUT`]), then finalises SoftHSM.
fn stop(backend: &Arc<Backend>, general_tx: Sender<(u32, Request, Duration)>, general: JoinHandle<()>) {
    std::thread::spawn(|| {
        std::thread::sleep(DRAIN_TIMEOUT);
        eprintln!("hsm-sim backend: calls still running after {DRAIN_TIMEOUT:?}; exiting anyway");
        let _ = io::stderr().flush();
        std::process::exit(3);
    });
    drop(general_tx);
    let _ = general.join();
    let sessions: Vec<SessionEntry> = lock(&backend.sessions).drain().map(|(_, e)| e).collect();
    for e in sessions {
        drop(e.jobs);
        let _ = e.thread.join();
    }
    // Every session is closed; nothing else holds the context.
    let _ = backend.pkcs11.clone().finalize();
}
