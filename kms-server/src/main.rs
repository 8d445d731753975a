//! `kms-server`: `serve --config FILE` for deployments, `dev [--dir DIR]` for a self-provisioned
//! development server on SoftHSM.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kms_server::config::Config;
use kms_server::dev::DevNetworkHsm;
use kms_server::server::{self, RunOptions};

#[derive(Parser)]
#[command(name = "kms-server", version, about = "Hardware-backed key management service (gRPC over mutual TLS, PKCS#11 HSMs)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a configuration file (see deploy/kms-server.example.toml).
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// Write the bound address to this file once listening.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        #[command(flatten)]
        recovery: Recovery,
    },
    /// Provision (first run) or reuse a development setup in DIR and serve it: a SoftHSM token, a dev
    /// CA with server and client certificates, a config and a SQLite store.
    Dev {
        #[arg(long, default_value = ".kms-dev")]
        dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// How the server reaches the dev token: SoftHSM loaded in-process, or `network`: the
        /// token served by `hsm-sim serve` in its own process, reached through the workspace's
        /// client module as a vendor's network HSM would be (build it first: `cargo build
        /// --workspace`, or run `scripts/dev --hsm network`).
        #[arg(long, value_enum, default_value_t = DevHsmArg::InProcess)]
        hsm: DevHsmArg,
        /// With `--hsm network`: milliseconds added to every HSM call (a network round trip).
        #[arg(long, default_value_t = 0, requires = "hsm")]
        hsm_latency_ms: u64,
        /// Run this many servers on one PostgreSQL store (started beside the dev directory, in
        /// `<dir>-pg`) and the network HSM (implies `--hsm network`), on consecutive ports from
        /// `--listen`. Use a directory of its own: a token made for a SQLite store is refused by
        /// a new PostgreSQL store.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        servers: u16,
        #[command(flatten)]
        recovery: Recovery,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DevHsmArg {
    InProcess,
    Network,
}

/// What the operator explicitly accepts at start-up (each is refused otherwise).
#[derive(clap::Args, Clone, Copy, Debug, Default)]
struct Recovery {
    /// Start with a new, empty key store even though the token holds this service's keys (a lost or
    /// moved store). The keys are kept on the token, never used until officers adopt them
    /// (`kmsctl token adopt`).
    #[arg(long)]
    new_store: bool,
    /// Start a new audit trail even though the key store is anchored to another one (a lost, cut or
    /// replaced trail). The old file is moved aside, never deleted, and the new trail's first record
    /// says so.
    #[arg(long)]
    new_audit_trail: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut network_hsm = None;
    let mut dev_servers = 1u16;
    let mut dev_layout = None;
    // Held for the life of the process.
    let mut _dev_lock = None;
    let (config_path, mut ready_file, recovery) = match cli.command {
        Command::Serve { config, ready_file, recovery } => (config, ready_file, recovery),
        Command::Dev { dir, listen, ready_file, hsm, hsm_latency_ms, servers, recovery } => {
            let hsm = if servers > 1 { DevHsmArg::Network } else { hsm };
            dev_servers = servers;
            if hsm == DevHsmArg::InProcess && hsm_latency_ms != 0 {
                eprintln!("kms-server dev: --hsm-latency-ms needs --hsm network");
                return ExitCode::FAILURE;
            }
            match kms_server::dev::provision(&dir, listen) {
                Ok(layout) => {
                    match kms_server::dev::lock(&layout) {
                        Ok(l) => _dev_lock = Some(l),
                        Err(e) => {
                            eprintln!("kms-server dev: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                    let verb = if layout.created { "provisioned" } else { "reusing" };
                    eprintln!("kms-server dev: {verb} {}", layout.dir.display());
                    eprintln!("  officer CLI:   set -a; . {}; set +a", layout.officer_env.display());
                    eprintln!("  exchange CLI:  set -a; . {}; set +a", layout.exchange_env.display());
                    if hsm == DevHsmArg::Network {
                        network_hsm = Some((layout.clone(), Duration::from_millis(hsm_latency_ms)));
                    }
                    dev_layout = Some(layout.clone());
                    (layout.config_path, ready_file, recovery)
                }
                Err(e) => {
                    eprintln!("kms-server dev: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let mut config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kms-server: {}: {e}", config_path.display());
            return ExitCode::FAILURE;
        }
    };
    init_logging(config.server.log_level.as_str());
    // Held until the server has stopped; dropping it stops the simulator.
    let _network_hsm = match network_hsm {
        None => None,
        Some((layout, latency)) => match DevNetworkHsm::start(&layout, &mut config, latency) {
            Ok(h) => {
                eprintln!("  network HSM:   hsm-sim serve, control socket {}", h.hsm().control_path().display());
                Some(h)
            }
            Err(e) => {
                eprintln!("kms-server dev: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    // Dropped before the network HSM (declared after it): the other servers stop first.
    let _dev_cluster = match (&_network_hsm, &dev_layout) {
        (Some(net), Some(layout)) if dev_servers > 1 => match kms_server::dev::DevCluster::start(
            layout,
            &mut config,
            net,
            dev_servers,
            ready_file.get_or_insert_with(|| layout.dir.join("ready-1")),
        ) {
            Ok(c) => {
                eprintln!("  {dev_servers} servers:     KMS_ENDPOINT={}", c.endpoints());
                Some(c)
            }
            Err(e) => {
                eprintln!("kms-server dev: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kms-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(server::run(
        config,
        RunOptions { ready_file, new_store: recovery.new_store, new_audit_trail: recovery.new_audit_trail },
        shutdown_signal(),
    ));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("kms-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    let level = std::env::var("KMS_LOG").ok().unwrap_or_else(|| level.to_owned());
    let filter = level.parse::<tracing::level_filters::LevelFilter>().unwrap_or(tracing::level_filters::LevelFilter::INFO);
    // Colours only on a terminal: a log file or journal must not fill with escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
