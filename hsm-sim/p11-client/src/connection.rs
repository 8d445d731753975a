//! One connection to `hsm-sim serve`, multiplexed by request id.
//!
//! Any number of threads call [`Connection::call`] at once: each registers its request id, writes its
//! frame under the write lock and waits for its own answer, which a reader thread hands over. So
//! calls on different sessions proceed in parallel over one stream, and the server sees one client
//! (one login state, one handle space), as PKCS#11 requires.
//!
//! A connection that fails once is dead for good: a write error, an end of stream, a malformed
//! frame or a call past its deadline shuts the socket down, wakes every waiter and leaves reconnection
//! to [`crate::module`]. Owns the socket and the reader thread. Must never block a caller beyond
//! its deadline, and never hand one caller another's answer.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hsm_sim_wire::{peek_header, read_frame, write_frame, Blob, Frame, FrameKind};

use crate::config::Endpoint;

/// Why a call got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkError {
    /// The request was never sent: the connection was already dead, or the write failed.
    NotSent,
    /// The connection died after the request was sent: the server may have executed it.
    Lost,
    /// No answer within the deadline; the connection is now dead.
    Timeout,
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn connect(endpoint: &Endpoint, timeout: Duration) -> io::Result<Stream> {
        let s = match endpoint {
            Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            Endpoint::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, timeout)?;
                // Requests are small and latency-bound: never wait to coalesce them.
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        match &s {
            Stream::Unix(u) => u.set_write_timeout(Some(timeout))?,
            Stream::Tcp(t) => t.set_write_timeout(Some(timeout))?,
        }
        Ok(s)
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        // Already shut down or reset: nothing more to do.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// What the reader thread and the callers share.
struct Shared {
    dead: AtomicBool,
    pending: Mutex<Pending>,
    /// A handle on the socket for shutting it down from any thread.
    control: Stream,
}

struct Pending {
    next_id: u32,
    waiting: HashMap<u32, SyncSender<Blob>>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the connection dead, shuts the socket down (the reader thread wakes and exits) and
    /// wakes every waiter (their senders are dropped).
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.control.shutdown();
        self.pending().waiting.clear();
    }
}

pub(crate) struct Connection {
    generation: u32,
    timeout: Duration,
    writer: Mutex<Stream>,
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Connection {
    /// Connects and starts the reader thread.
    pub(crate) fn open(endpoint: &Endpoint, timeout: Duration, generation: u32) -> io::Result<Connection> {
        let stream = Stream::connect(endpoint, timeout)?;
        let mut reading = stream.try_clone()?;
        let shared = Arc::new(Shared {
            dead: AtomicBool::new(false),
            pending: Mutex::new(Pending { next_id: 1, waiting: HashMap::new() }),
            control: stream.try_clone()?,
        });
        let for_reader = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("hsm-sim-p11-reader".into())
            .spawn(move || read_answers(&mut reading, &for_reader))?;
        Ok(Connection { generation, timeout, writer: Mutex::new(stream), shared, reader: Mutex::new(Some(reader)) })
    }

    /// Which connection of the module this is (handles carry it, see [`crate::module`]).
    pub(crate) fn generation(&self) -> u32 {
        self.generation
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    /// Sends the frame `encode(id)` builds and waits for the answer's body, at most the deadline.
    pub(crate) fn call(&self, encode: impl FnOnce(u32) -> Frame) -> Result<Blob, LinkError> {
        let deadline = Instant::now() + self.timeout;
        if self.is_dead() {
            return Err(LinkError::NotSent);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let id = {
            let mut p = self.shared.pending();
            let mut id = p.next_id;
            // Skip ids still waiting (only possible after 2^32 calls with one stuck).
            while p.waiting.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            p.next_id = id.wrapping_add(1);
            p.waiting.insert(id, tx);
            id
        };
        let frame = encode(id);
        let written = {
            let mut w = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            // Checked again under the write lock: a kill between the first check and here must not
            // let a request out after the connection was declared dead.
            if self.is_dead() {
                Err(io::ErrorKind::NotConnected.into())
            } else {
                write_frame(&mut *w, &frame)
            }
        };
        drop(frame);
        if written.is_err() {
            self.shared.pending().waiting.remove(&id);
            self.shared.kill();
            return Err(LinkError::NotSent);
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(body) => Ok(body),
            Err(RecvTimeoutError::Timeout) => {
                self.shared.pending().waiting.remove(&id);
                self.shared.kill();
                Err(LinkError::Timeout)
            }
            Err(RecvTimeoutError::Disconnected) => Err(LinkError::Lost),
        }
    }

    /// Declares the connection dead (a malformed answer, `C_Finalize`).
    pub(crate) fn kill(&self) {
        self.shared.kill();
    }

    /// Kills the connection and waits for the reader thread to exit.
    pub(crate) fn close(&self) {
        self.kill();
        if let Some(t) = self.reader.lock().unwrap_or_else(PoisonError::into_inner).take() {
            // The reader never panics on input; a panic would already have killed the connection.
            let _ = t.join();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close();
    }
}

/// The reader thread: hands each answer to the caller waiting for its id, until the stream fails.
fn read_answers(stream: &mut Stream, shared: &Shared) {
    loop {
        let body = match read_frame(stream) {
            Ok(Some(body)) => body,
            Ok(None) | Err(_) => break,
        };
        let header = match peek_header(&body) {
            Ok(h) if h.kind == FrameKind::Response => h,
            // A peer that sends garbage is not trusted with the rest of the stream.
            _ => break,
        };
        let waiter = shared.pending().waiting.remove(&header.id);
        if let Some(tx) = waiter {
            // The waiter may have timed out just now; its answer is then dropped.
            let _ = tx.send(body);
        }
        // An answer nobody waits for (its caller timed out earlier) is dropped.
    }
    shared.kill();
}
