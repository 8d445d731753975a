//! `hsm-sim`: make a disposable SoftHSM token, or print the environment line that points at one.
//! Never prints a PIN (only the path of the 0600 file holding it).
#![forbid(unsafe_code)]

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
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
