//! `hsm-sim`: make a disposable SoftHSM token, print the environment line that points at one, or
//! serve one as a simulated network HSM (`serve`, see [`serve`]; its per-connection `backend`
//! processes are [`backend`]). Never prints a PIN (only the path of the 0600 file holding it).
#![forbid(unsafe_code)]

mod backend;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hsm_sim::SimToken;

#[derive(Parser)]
#[command(name = "hsm-sim", about = "Disposable SoftHSMv2 tokens for tests and the dev server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a token in DIR (its own softhsm2.conf, token store and PIN files).
    Create {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        label: String,
    },
    /// Print `export SOFTHSM2_CONF=...` for the token in DIR.
    Env {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve the token in DIR as a network HSM (clients load libhsm_sim_p11.so).
    Serve {
        #[arg(long)]
        dir: PathBuf,
        /// Listen on this unix socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Listen on this loopback TCP address (port 0: any free port; see --ready-file).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Accept fault-injection commands on this unix socket.
        #[arg(long)]
        control: Option<PathBuf>,
        /// Once listening, write the bound addresses and the pid here (`key=value` lines).
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Exit when stdin ends (a parent that holds a pipe takes the server with it when it dies).
        #[arg(long)]
        exit_with_stdin: bool,
    },
    /// Send one fault-injection command to a running `serve` (e.g. `latency 1ms`, `fail 3
    /// CKR_DEVICE_ERROR C_WrapKey`, `drop`, `hang 2s`, `release`, `reset`, `status`).
    Control {
        /// The `serve --control` socket.
        #[arg(long)]
        socket: PathBuf,
        #[arg(required = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// One client connection's SoftHSM instance, speaking the wire format on stdin/stdout
    /// (started by `serve`).
    #[command(hide = true)]
    Backend {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { dir, socket, listen, control, ready_file, exit_with_stdin } => {
            return serve::run(serve::ServeArgs { dir, socket, listen, control, ready_file, exit_with_stdin });
        }
        Command::Backend { dir } => return backend::run(&dir),
        Command::Control { socket, command } => return control(&socket, &command.join(" ")),
        Command::Create { dir, label } => SimToken::create(&dir, &label).map(|t| {
            println!("conf: {}", t.conf_path().display());
            println!("label: {}", t.label());
            println!("user PIN file: {}", t.user_pin_file().display());
            println!("{}", t.env_line());
        }),
        Command::Env { dir } => SimToken::open(&dir).map(|t| println!("{}", t.env_line())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsm-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sends one control line and prints the reply; fails unless it starts with `ok`.
fn control(socket: &std::path::Path, line: &str) -> ExitCode {
    use std::io::{BufRead, BufReader, Read, Write};
    let command = match hsm_sim::control::ControlCommand::parse(line) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hsm-sim control: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = (|| {
        let mut s = std::os::unix::net::UnixStream::connect(socket)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        s.write_all(format!("{}\n", command.to_line()).as_bytes())?;
        let mut reply = String::new();
        BufReader::new(s).take(4096).read_line(&mut reply)?;
        Ok::<_, std::io::Error>(reply)
    })();
    match result {
        Ok(reply) => {
            println!("{}", reply.trim_end());
            if reply.starts_with("ok") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("hsm-sim control: {}: {e}", socket.display());
            ExitCode::FAILURE
        }
    }
}
