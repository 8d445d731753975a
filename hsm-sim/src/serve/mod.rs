//! `hsm-sim serve`: a simulated network HSM. It serves one SoftHSM token directory (made by
//! `SimToken`) to PKCS#11 clients (`libhsm_sim_p11.so`) over a unix socket and/or TCP on loopback,
//! with fault injection driven by a control socket ([`hsm_sim::control`]).
//!
//! # Design: a backend process per client connection
//! Each accepted connection gets its own `hsm-sim backend` child ([`crate::backend`]) with its own
//! SoftHSM instance; this process only relays frames ([`relay`]) and injects faults ([`faults`]).
//! The alternative, one SoftHSM instance multiplexing every client, cannot keep login state per
//! client: SoftHSM's login is per process (one client's logout would log every client out, and the
//! SO could not log in while any client is logged in as user), and session objects would be shared
//! between clients. A backend costs a process start and a `C_Initialize` on the first call of each
//! connection (measured 5-7 ms median, 11-17 ms at worst, with a small token on tmpfs; a client
//! keeps its connection for its whole life) and about 10 MB of memory (RSS, plus SoftHSM's ~9 KiB
//! per token object); this process stays at about 4.5 MB. Relaying costs each call 27-45 µs over a
//! unix socket when the machine's CPUs are busy, and up to about 200 µs on an idle 2-vCPU VM, where
//! each of the call's thread hops (client, relay, backend, and back) wakes a halted vCPU. Token
//! writes are made atomic across backends by a file lock (see `backend::token_lock`).
//!
//! # Lifetimes
//! Backends never outlive this process: each reads its requests from a pipe whose other end is
//! held here, and exits when it closes; this process also kills its backends by pid when it
//! drops them. With `--exit-with-stdin` this process itself exits when its stdin ends, which is how
//! a test harness that dies takes the simulator with it. Must never listen on a non-loopback
//! address and never print a frame's contents.

mod control;
mod faults;
mod relay;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hsm_sim::SimToken;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;

use faults::Faults;

/// What `serve` was asked to do.
pub struct ServeArgs {
    pub dir: PathBuf,
    pub socket: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub control: Option<PathBuf>,
    pub ready_file: Option<PathBuf>,
    pub exit_with_stdin: bool,
}

/// What every connection and the control socket share.
pub(crate) struct Shared {
    exe: PathBuf,
    token_dir: PathBuf,
    pub(crate) faults: Faults,
    connections: Mutex<HashMap<u64, Arc<Notify>>>,
    /// Notified whenever a connection ends.
    connection_ended: Notify,
    next_connection: AtomicU64,
}

impl Shared {
    fn connections(&self) -> MutexGuard<'_, HashMap<u64, Arc<Notify>>> {
        self.connections.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open_connections(&self) -> u64 {
        self.connections().len() as u64
    }

    fn accepted(&self) -> u64 {
        self.next_connection.load(Ordering::SeqCst)
    }

    fn new_connection(&self) -> (u64, Arc<Notify>) {
        let id = self.next_connection.fetch_add(1, Ordering::SeqCst) + 1;
        let dropped = Arc::new(Notify::new());
        self.connections().insert(id, Arc::clone(&dropped));
        (id, dropped)
    }

    pub(crate) fn forget_connection(&self, id: u64) {
        self.connections().remove(&id);
        self.connection_ended.notify_waiters();
    }

    /// Closes every client connection and waits (at most 5 s) until they are closed. Returns how
    /// many there were.
    pub(crate) async fn drop_connections(&self) -> usize {
        let ids: Vec<u64> = {
            let conns = self.connections();
            for n in conns.values() {
                n.notify_one();
            }
            conns.keys().copied().collect()
        };
        let wait = async {
            loop {
                let ended = self.connection_ended.notified();
                if !ids.iter().any(|id| self.connections().contains_key(id)) {
                    return;
                }
                ended.await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        ids.len()
    }
}

pub fn run(args: ServeArgs) -> ExitCode {
    if args.socket.is_none() && args.listen.is_none() {
        eprintln!("hsm-sim serve: give --socket PATH and/or --listen 127.0.0.1:PORT");
        return ExitCode::FAILURE;
    }
    if let Some(addr) = args.listen {
        if !addr.ip().is_loopback() {
            eprintln!("hsm-sim serve: --listen {addr} is not a loopback address; the simulator has no authentication");
            return ExitCode::FAILURE;
        }
    }
    let token = match SimToken::open(&args.dir) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("hsm-sim serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("hsm-sim serve: cannot find its own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hsm-sim serve: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shared = Arc::new(Shared {
        exe,
        token_dir: token.dir().to_owned(),
        faults: Faults::new(),
        connections: Mutex::new(HashMap::new()),
        connection_ended: Notify::new(),
        next_connection: AtomicU64::new(0),
    });
    let result = runtime.block_on(serve(&args, shared));
    // Dropping the runtime drops every connection task, and with them the backends (killed by
    // pid); their stdin pipes close too.
    drop(runtime);
    for path in [&args.socket, &args.control].into_iter().flatten() {
        let _ = std::fs::remove_file(path);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsm-sim serve: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Binds a unix socket at `path`, replacing a stale socket file (a killed predecessor's, which no
/// longer accepts connections) but nothing else: never a socket another process serves.
fn bind_unix(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!("another process listens on {}; stop it first", path.display()));
            }
            std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
        } else {
            return Err(format!("{} exists and is not a socket", path.display()));
        }
    }
    UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))
}

async fn serve(args: &ServeArgs, shared: Arc<Shared>) -> Result<(), String> {
    let unix = args.socket.as_deref().map(bind_unix).transpose()?;
    let tcp = match args.listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?),
        None => None,
    };
    let control = args.control.as_deref().map(bind_unix).transpose()?;
    let tcp_addr = tcp.as_ref().map(|l| l.local_addr()).transpose().map_err(|e| e.to_string())?;

    if let Some(l) = unix {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        let (id, dropped) = shared.new_connection();
                        let (r, w) = s.into_split();
                        tokio::spawn(relay::serve_connection(id, r, w, Arc::clone(&shared), dropped));
                    }
                    Err(e) => {
                        eprintln!("hsm-sim serve: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    if let Some(l) = tcp {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        let (id, dropped) = shared.new_connection();
                        let (r, w) = s.into_split();
                        tokio::spawn(relay::serve_connection(id, r, w, Arc::clone(&shared), dropped));
                    }
                    Err(e) => {
                        eprintln!("hsm-sim serve: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    if let Some(l) = control {
        tokio::spawn(control::serve(l, Arc::clone(&shared)));
    }
    if let Some(ready) = &args.ready_file {
        write_ready_file(ready, args, tcp_addr)?;
    }
    eprintln!(
        "hsm-sim serve: serving {} on{}{}",
        shared.token_dir.display(),
        args.socket.as_ref().map(|p| format!(" unix:{}", p.display())).unwrap_or_default(),
        tcp_addr.map(|a| format!(" tcp:{a}")).unwrap_or_default()
    );
    wait_for_exit(args.exit_with_stdin).await;
    Ok(())
}

/// `unix=`, `tcp=`, `control=` and `pid=` lines, written whole (renamed into place).
fn write_ready_file(path: &Path, args: &ServeArgs, tcp: Option<SocketAddr>) -> Result<(), String> {
    let mut text = String::new();
    if let Some(s) = &args.socket {
        text.push_str(&format!("unix={}\n", s.display()));
    }
    if let Some(a) = tcp {
        text.push_str(&format!("tcp={a}\n"));
    }
    if let Some(c) = &args.control {
        text.push_str(&format!("control={}\n", c.display()));
    }
    text.push_str(&format!("pid={}\n", std::process::id()));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

async fn wait_for_exit(exit_with_stdin: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    let stdin_closed = async {
        if !exit_with_stdin {
            return std::future::pending::<()>().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        loop {
            match tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = stdin_closed => {}
        () = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
