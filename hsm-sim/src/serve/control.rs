//! The control socket: reads [`ControlCommand`] lines, applies them, answers one line each.
//!
//! Owns nothing but the socket; the faults live in [`super::faults`]. Must never read a line past
//! [`MAX_LINE`] bytes (a longer line closes that control connection).

use std::sync::Arc;

use hsm_sim::control::{ControlCommand, MAX_LINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::Shared;

pub(crate) async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(session(s, Arc::clone(&shared)));
            }
            Err(e) => {
                eprintln!("hsm-sim serve: control accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn session(stream: UnixStream, shared: Arc<Shared>) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut line = Vec::new();
        match (&mut r).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.last() != Some(&b'\n') {
            let _ = w.write_all(b"err line too long or unterminated\n").await;
            return;
        }
        let reply = match std::str::from_utf8(&line) {
            Ok(text) => match ControlCommand::parse(text.trim_end()) {
                Ok(cmd) => apply(cmd, &shared).await,
                Err(e) => format!("err {e}"),
            },
            Err(_) => "err not UTF-8".to_owned(),
        };
        if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn apply(cmd: ControlCommand, shared: &Shared) -> String {
    let f = &shared.faults;
    match cmd {
        ControlCommand::Latency(d) => f.set_latency(d),
        ControlCommand::Fail { count, rv, function } => f.fail(count, rv, function),
        ControlCommand::Drop => return format!("ok dropped={}", shared.drop_connections().await),
        ControlCommand::Hang(d) => f.hang(d),
        ControlCommand::Release => f.release(),
        ControlCommand::Reset => f.reset(),
        ControlCommand::Status => return f.status(shared.open_connections(), shared.accepted()).to_line(),
    }
    "ok".to_owned()
}
