//! `kmsctl`: command-line client of the key management service. See `kmsctl --help`.
//!
//! The binary is a thin shell: parse, run on a single-threaded runtime, print the error and map
//! it to a documented exit code.
#![forbid(unsafe_code)]

// The CLI modules live in `src/cli/` but belong to this binary, not to the library's API.
#[path = "../cli/mod.rs"]
mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // clap prints usage errors itself and exits with 2 (`cli::exit::USAGE`).
    let args = cli::args::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("kmsctl: cannot start the async runtime: {err}");
            return ExitCode::from(cli::exit::OTHER);
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => ExitCode::from(cli::exit::SUCCESS),
        Err(err) => {
            eprintln!("kmsctl: {}", err.message());
            ExitCode::from(err.exit_code())
        }
    }
}
