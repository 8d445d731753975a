//! One client connection: its backend process, and the frames between them.
//!
//! Requests are read from the client, checked only as far as their header (version, kind, id,
//! operation), put through the faults, and forwarded unchanged to the backend's stdin, each after
//! the delay the backend is to apply (`for_backend`); the backend's answers go back unchanged.
//! The backend decodes every request fully and exits on a malformed one, which closes the
//! client's connection here. With no hang or failure pending a request is forwarded inline
//! (latency included); otherwise each gets a task, so hangs and failures apply to every call
//! independently.
//!
//! Owns the backend process: it is started for the connection and stopped with it (its stdin
//! closes, so it finishes the calls in progress and exits; it is killed by pid if it has not
//! within [`BACKEND_EXIT_WAIT`], and killed at once if this process drops it). Must never forward
//! a frame it could not read whole, nor answer a request that was forwarded.

use std::io;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hsm_sim_wire::{peek_header, Blob, Encoder, Frame, FrameKind, Response, MAX_FRAME};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::Command;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use super::faults::Verdict;
use super::Shared;

/// How long a backend may take to finish its calls once its connection is gone.
const BACKEND_EXIT_WAIT: Duration = Duration::from_secs(6);
/// Frames queued towards one peer before readers wait.
const QUEUE: usize = 1024;

/// Reads one frame body; `None` at a clean end of stream. Refuses lengths over [`MAX_FRAME`].
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Blob>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame over the size limit"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(Blob::new(body)))
}

/// A request as the backend reads it: the delay to apply before running it, in microseconds (4
/// bytes, big-endian), then the client's frame unchanged.
fn for_backend(body: &[u8], delay: Duration) -> Frame {
    let mut e = Encoder::new();
    e.u32(u32::try_from(super::faults::aim(delay).as_micros()).unwrap_or(u32::MAX));
    e.raw(body);
    e.finish()
}

/// Writes queued frames, flushing whenever the queue runs empty.
async fn write_frames<W: AsyncWrite + Unpin>(w: W, mut frames: mpsc::Receiver<Frame>) -> io::Result<()> {
    let mut w = BufWriter::new(w);
    while let Some(f) = frames.recv().await {
        w.write_all(f.as_bytes()).await?;
        if frames.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await
}

/// Serves one client connection until it ends, its backend ends, or `dropped` is notified.
pub(crate) async fn serve_connection<R, W>(id: u64, reader: R, writer: W, shared: Arc<Shared>, dropped: Arc<Notify>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let child = Command::new(&shared.exe)
        .arg("backend")
        .arg("--dir")
        .arg(&shared.token_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hsm-sim serve: connection {id}: cannot start a backend: {e}");
            return;
        }
    };
    let (Some(backend_in), Some(backend_out)) = (child.stdin.take(), child.stdout.take()) else {
        eprintln!("hsm-sim serve: connection {id}: backend without pipes");
        return;
    };
    let (to_client, client_queue) = mpsc::channel::<Frame>(QUEUE);
    let (to_backend, backend_queue) = mpsc::channel::<Frame>(QUEUE);
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        let _ = write_frames(writer, client_queue).await;
    });
    tasks.spawn(async move {
        let _ = write_frames(backend_in, backend_queue).await;
    });
    let answers = {
        let to_client = to_client.clone();
        let shared = Arc::clone(&shared);
        async move {
            let mut from_backend = BufReader::new(backend_out);
            while let Ok(Some(body)) = read_frame(&mut from_backend).await {
                let Ok(frame) = Frame::from_body(&body) else { break };
                shared.faults.calls.fetch_add(1, Ordering::Relaxed);
                if to_client.send(frame).await.is_err() {
                    break;
                }
            }
        }
    };
    let requests = relay_requests(id, BufReader::new(reader), to_client, to_backend, Arc::clone(&shared));
    tokio::select! {
        () = requests => {}
        () = answers => {}
        () = dropped.notified() => {}
    }
    // The client's connection closes here (its writer and reader go), then the backend's stdin.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    shared.forget_connection(id);
    match tokio::time::timeout(BACKEND_EXIT_WAIT, child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            eprintln!("hsm-sim serve: connection {id}: backend still running; killing it");
            let _ = child.kill().await;
        }
    }
}

async fn relay_requests<R: AsyncRead + Unpin>(
    id: u64,
    mut reader: R,
    to_client: mpsc::Sender<Frame>,
    to_backend: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
) {
    // Requests waiting out faults; dropped (aborted) with the connection.
    let mut waiting = JoinSet::new();
    loop {
        while waiting.try_join_next().is_some() {}
        let body = match read_frame(&mut reader).await {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                eprintln!("hsm-sim serve: connection {id}: {e}; closing it");
                return;
            }
        };
        let header = match peek_header(&body) {
            Ok(h) if h.kind == FrameKind::Request => h,
            Ok(_) => {
                eprintln!("hsm-sim serve: connection {id}: a response from a client; closing it");
                return;
            }
            Err(e) => {
                eprintln!("hsm-sim serve: connection {id}: malformed frame ({e}); closing it");
                return;
            }
        };
        if shared.faults.is_quiet() {
            if let Some(delay) = shared.faults.latency_of(header.op) {
                if to_backend.send(for_backend(&body, delay)).await.is_err() {
                    return;
                }
                continue;
            }
        }
        let (shared, to_client, to_backend) = (Arc::clone(&shared), to_client.clone(), to_backend.clone());
        waiting.spawn(async move {
            match shared.faults.admit(header.op).await {
                Verdict::Forward { delay } => {
                    let _ = to_backend.send(for_backend(&body, delay)).await;
                }
                Verdict::Fail(rv) => {
                    let _ = to_client.send(Response::error(rv).encode(header.id, header.op)).await;
                }
            }
        });
    }
}
