//! [`NetHsm`]: a simulated network HSM (`hsm-sim serve`) run by a test as a child process, with its
//! fault-injection controls.
//!
//! The `hsm-sim` binary and the client module `libhsm_sim_p11.so` are found next to the running
//! executable, as workspace tests find `kms-server`: a test runs from `target/<profile>/deps/`, so
//! both are looked for there and one directory up (`$HSM_SIM_BIN` and `$HSM_SIM_P11_MODULE`
//! override). Build them first: `cargo build -p hsm-sim -p hsm-sim-p11`.
//!
//! The simulator's sockets, control socket and ready file live in `<token dir>/net/`. It is
//! started with `--exit-with-stdin` and a pipe on its stdin held here, so it exits when this
//! process does, however this process ends; its backends exit with it. [`NetHsm::kill`] and drop
//! kill it by pid. Must never signal a process it did not start.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use hsm_sim_wire::Op;

use crate::control::{ControlCommand, ServeStatus};
use crate::SimToken;

/// The variable the client module reads its endpoint from.
pub const ENDPOINT_VAR: &str = "HSM_SIM_ENDPOINT";
/// The variable the client module reads its per-call deadline (milliseconds) from.
pub const TIMEOUT_VAR: &str = "HSM_SIM_TIMEOUT_MS";

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetHsmError {
    #[error("{what} not found at {searched:?}; build it with `cargo build -p hsm-sim -p hsm-sim-p11` (or set {var})")]
    NotBuilt { what: &'static str, var: &'static str, searched: Vec<PathBuf> },
    #[error("cannot start {path}: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("hsm-sim serve exited before it was ready ({status})")]
    Exited { status: std::process::ExitStatus },
    #[error("hsm-sim serve was not ready within {0:?}")]
    NotReady(Duration),
    #[error("the ready file {path} is malformed")]
    BadReadyFile { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Control { path: PathBuf, source: std::io::Error },
    #[error("control command {command:?} refused: {reply}")]
    Refused { command: String, reply: String },
    #[error("hsm-sim serve is not running")]
    NotRunning,
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
}

/// A running `hsm-sim serve` on one token directory.
pub struct NetHsm {
    child: Option<Child>,
    /// Held so that the simulator sees its stdin end when this process ends.
    stdin: Option<ChildStdin>,
    exe: PathBuf,
    token_dir: PathBuf,
    socket: PathBuf,
    control: PathBuf,
    ready: PathBuf,
    /// The TCP address (a fixed port after the first start, so that a restart keeps it).
    tcp: Option<SocketAddr>,
}

impl std::fmt::Debug for NetHsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHsm")
            .field("pid", &self.pid())
            .field("socket", &self.socket)
            .field("tcp", &self.tcp)
            .finish_non_exhaustive()
    }
}

/// A built workspace artefact next to the running executable (or one directory up).
fn beside_executable(name: &str, var: &'static str, what: &'static str) -> Result<PathBuf, NetHsmError> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        return if p.exists() { Ok(p) } else { Err(NetHsmError::NotBuilt { what, var, searched: vec![p] }) };
    }
    let mut searched = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent();
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join(name);
            if candidate.exists() {
                return Ok(candidate);
            }
            searched.push(candidate);
            dir = d.parent();
        }
    }
    Err(NetHsmError::NotBuilt { what, var, searched })
}

impl NetHsm {
    /// The `hsm-sim` binary.
    pub fn binary_path() -> Result<PathBuf, NetHsmError> {
        beside_executable("hsm-sim", "HSM_SIM_BIN", "the hsm-sim binary")
    }

    /// The client module (`libhsm_sim_p11.so`), for `cryptoki::context::Pkcs11::new`.
    pub fn module_path() -> Result<PathBuf, NetHsmError> {
        beside_executable("libhsm_sim_p11.so", "HSM_SIM_P11_MODULE", "the client module libhsm_sim_p11.so")
    }

    /// Starts `hsm-sim serve` for `token`'s directory on a unix socket and on TCP loopback (a port
    /// chosen by the system), and waits until it listens.
    pub fn start(token: &SimToken) -> Result<NetHsm, NetHsmError> {
        let exe = NetHsm::binary_path()?;
        let net = token.dir().join("net");
        std::fs::create_dir_all(&net).map_err(|source| NetHsmError::Io { action: "create", path: net.clone(), source })?;
        let mut hsm = NetHsm {
            child: None,
            stdin: None,
            exe,
            token_dir: token.dir().to_owned(),
            socket: net.join("hsm.sock"),
            control: net.join("control.sock"),
            ready: net.join("ready"),
            tcp: None,
        };
        hsm.launch()?;
        Ok(hsm)
    }

    fn launch(&mut self) -> Result<(), NetHsmError> {
        let _ = std::fs::remove_file(&self.ready);
        let listen = self.tcp.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        let args: Vec<OsString> = vec![
            "serve".into(),
            "--dir".into(),
            self.token_dir.clone().into(),
            "--socket".into(),
            self.socket.clone().into(),
            "--listen".into(),
            listen.into(),
            "--control".into(),
            self.control.clone().into(),
            "--ready-file".into(),
            self.ready.clone().into(),
            "--exit-with-stdin".into(),
        ];
        let mut child = Command::new(&self.exe)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| NetHsmError::Spawn { path: self.exe.clone(), source })?;
        self.stdin = child.stdin.take();
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.ready) {
                return self.read_ready(&text);
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(NetHsmError::Exited { status });
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                self.kill();
                return Err(NetHsmError::NotReady(READY_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn read_ready(&mut self, text: &str) -> Result<(), NetHsmError> {
        let bad = || NetHsmError::BadReadyFile { path: self.ready.clone() };
        for line in text.lines() {
            if let Some(a) = line.strip_prefix("tcp=") {
                self.tcp = Some(a.parse().map_err(|_| bad())?);
            }
        }
        if self.tcp.is_none() {
            return Err(bad());
        }
        Ok(())
    }

    /// The simulator's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    pub fn control_path(&self) -> &Path {
        &self.control
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// `unix:<socket>`, the value for `HSM_SIM_ENDPOINT`.
    pub fn unix_endpoint(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// `tcp:127.0.0.1:<port>`, the value for `HSM_SIM_ENDPOINT` over TCP.
    pub fn tcp_endpoint(&self) -> Option<String> {
        self.tcp.map(|a| format!("tcp:{a}"))
    }

    /// The environment a client process needs (the unix endpoint).
    pub fn client_env(&self) -> Vec<(&'static str, String)> {
        vec![(ENDPOINT_VAR, self.unix_endpoint())]
    }

    /// Sends one control command and returns the reply line (`ok ...`).
    pub fn send(&self, command: &ControlCommand) -> Result<String, NetHsmError> {
        let io = |source| NetHsmError::Control { path: self.control.clone(), source };
        let mut s = UnixStream::connect(&self.control).map_err(io)?;
        s.set_read_timeout(Some(CONTROL_TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(CONTROL_TIMEOUT)).map_err(io)?;
        let line = command.to_line();
        s.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
        let mut reply = String::new();
        BufReader::new(s).take_line(&mut reply).map_err(io)?;
        let reply = reply.trim_end().to_owned();
        if reply == "ok" || reply.starts_with("ok ") {
            Ok(reply)
        } else {
            Err(NetHsmError::Refused { command: line, reply })
        }
    }

    /// Delays every call by `latency` (zero for none).
    pub fn set_latency(&self, latency: Duration) -> Result<(), NetHsmError> {
        self.send(&ControlCommand::Latency(latency)).map(drop)
    }

    /// Answers the next `count` calls (of `function` only, if given) with `rv`.
    pub fn fail_next(&self, count: u32, rv: u64, function: Option<Op>) -> Result<(), NetHsmError> {
        self.send(&ControlCommand::Fail { count, rv, function }).map(drop)
    }

    /// Closes every client connection now; returns after they are closed.
    pub fn drop_connections(&self) -> Result<(), NetHsmError> {
        self.send(&ControlCommand::Drop).map(drop)
    }

    /// Answers no call until [`NetHsm::release`] (or for `duration`).
    pub fn hang(&self, duration: Option<Duration>) -> Result<(), NetHsmError> {
        self.send(&ControlCommand::Hang(duration)).map(drop)
    }

    pub fn release(&self) -> Result<(), NetHsmError> {
        self.send(&ControlCommand::Release).map(drop)
    }

    /// No latency, no pending failures, no hang.
    pub fn reset(&self) -> Result<(), NetHsmError> {
        self.send(&ControlCommand::Reset).map(drop)
    }

    pub fn status(&self) -> Result<ServeStatus, NetHsmError> {
        let line = self.send(&ControlCommand::Status)?;
        ServeStatus::parse(&line).map_err(|e| NetHsmError::Refused { command: "status".into(), reply: e.to_string() })
    }

    /// Kills the simulator (SIGKILL, by pid) and waits for it. Its backends exit as their stdin
    /// closes. Harmless when it is not running.
    pub fn kill(&mut self) {
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            // `Child::kill` signals this child's pid only.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the simulator again on the same socket and TCP port (killing it first if needed).
    pub fn restart(&mut self) -> Result<(), NetHsmError> {
        self.kill();
        self.launch()
    }
}

impl Drop for NetHsm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads one line, at most 4 KiB.
trait TakeLine {
    fn take_line(self, buf: &mut String) -> std::io::Result<usize>;
}

impl<R: std::io::Read> TakeLine for BufReader<R> {
    fn take_line(self, buf: &mut String) -> std::io::Result<usize> {
        std::io::Read::take(self, 4096).read_line(buf)
    }
}
