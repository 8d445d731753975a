//! `kmsctl`: the officers' and exchange services' command-line client, built on `kms_client`.
//!
//! Code map: [`args`] parses the command line, [`commands`] runs a command and prints the result
//! through [`output`] ([`lifecycle`] for key lifecycle and approval commands, [`rewrap`] for
//! re-wrapping files of blobs, with its [`progress`] bar and [`atomic_output`] file, [`callers`]
//! for the caller registry), and [`exit`] owns the documented exit codes. Errors go to stderr as
//! `kmsctl: <gRPC code name>: <server message>`; stdout only ever holds the command's result.
//!
//! This module is compiled into the binary only (`#[path]` from `src/bin/kmsctl.rs`), so the
//! library's public API stays free of CLI types.
#![forbid(unsafe_code)]

pub mod args;
pub mod atomic_output;
pub mod audit;
pub mod callers;
pub mod commands;
pub mod exit;
pub mod lifecycle;
pub mod output;
pub mod progress;
pub mod rewrap;
pub mod token;

use std::path::PathBuf;
use std::time::Duration;

use kms_client::error::code_name;
use kms_client::{ClientConfig, ClientError, KmsClient};

use args::{Cli, ConnectionArgs, DuplicateContextKey};

/// Everything that can make `kmsctl` fail.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot render JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// `rewrap` wrote its output, but some blobs were not re-wrapped.
    #[error(transparent)]
    ItemsFailed(Box<rewrap::ItemsFailed>),
    /// `audit verify` found the trail tampered with (the report is already printed).
    #[error(transparent)]
    Tampered(audit::Tampered),
}

/// Mistakes in the command line that clap cannot see by itself.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(
        "missing connection settings: {}; set the environment variables or pass the flags \
         (for the dev server: set -a; . .kms-dev/kmsctl.env; set +a)",
        .0.join(", ")
    )]
    MissingConnection(Vec<&'static str>),
    #[error(transparent)]
    DuplicateContextKey(#[from] DuplicateContextKey),
    #[error("--wrapped is not standard base64: {0}")]
    WrappedNotBase64(#[source] base64::DecodeError),
    #[error("give the wrapped blob with --wrapped or --in")]
    NoWrappedBlob,
    #[error("give the trail to verify with --db or --file")]
    AuditSource,
    #[error("{anchors} --anchor for {trails} trail(s): give one per --db, in the same order, or none")]
    AnchorsPerTrail { trails: usize, anchors: usize },
    #[error("--anchor {0:?} is not SEQ:HASH (a record number, a colon and 64 hex digits), as `kmsctl audit anchor` prints it")]
    Anchor(String),
}

impl From<DuplicateContextKey> for CliError {
    fn from(err: DuplicateContextKey) -> Self {
        CliError::Usage(err.into())
    }
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Client(err) => exit::for_client_error(err),
            CliError::Usage(_) => exit::USAGE,
            CliError::Io { .. } | CliError::Json(_) => exit::OTHER,
            CliError::ItemsFailed(failed) => failed.exit_code(),
            CliError::Tampered(_) => exit::TAMPERED,
        }
    }

    /// The line printed on stderr after `kmsctl: `. RPC errors already read
    /// `<CODE>: <server message>`; connection failures are prefixed with `UNAVAILABLE` so that
    /// every exit-6 message starts the same way.
    pub fn message(&self) -> String {
        match self {
            CliError::Client(err @ (ClientError::Connect { .. } | ClientError::Tls { .. })) => {
                format!("{}: {err}", code_name(tonic::Code::Unavailable))
            }
            other => other.to_string(),
        }
    }
}

/// Parses nothing (clap already did); connects and runs the command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    // Offline: checks a trail with the public key alone, whatever the connection settings.
    if let args::Command::Audit(args::AuditCommand::Verify { db, file, public_key, anchor }) = &cli.command {
        return audit::verify_all(db, file.as_deref(), public_key, anchor, cli.output);
    }
    if let Some(done) = commands::offline(&cli.command, cli.output) {
        return done;
    }
    let config = connection_config(&cli.connection)?;
    let client = KmsClient::connect(config).await?;
    commands::run(&client, cli.command, cli.output).await
}

/// The connection settings, or one error naming every missing variable.
fn connection_config(args: &ConnectionArgs) -> Result<ClientConfig, CliError> {
    let mut missing = Vec::new();
    if args.endpoint.is_none() {
        missing.push("KMS_ENDPOINT (--endpoint)");
    }
    if args.ca.is_none() {
        missing.push("KMS_CA (--ca)");
    }
    if args.cert.is_none() {
        missing.push("KMS_CERT (--cert)");
    }
    if args.client_key.is_none() {
        missing.push("KMS_KEY (--key)");
    }
    match (&args.endpoint, &args.ca, &args.cert, &args.client_key) {
        (Some(endpoint), Some(ca), Some(cert), Some(key)) => {
            Ok(ClientConfig::from_files(endpoint.clone(), ca, cert, key)?
                .with_timeout(Duration::from_secs(args.timeout.max(1))))
        }
        _ => Err(UsageError::MissingConnection(missing).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_connection() -> ConnectionArgs {
        ConnectionArgs {
            endpoint: None,
            ca: None,
            cert: None,
            client_key: None,
            timeout: 30,
        }
    }

    #[test]
    fn missing_settings_are_all_named_with_the_dev_hint() {
        let args = ConnectionArgs {
            endpoint: Some("https://kms:7443".into()),
            ..no_connection()
        };
        let err = connection_config(&args).unwrap_err();
        let text = err.message();
        assert!(
            text.contains("KMS_CA") && text.contains("KMS_CERT") && text.contains("KMS_KEY"),
            "{text}"
        );
        assert!(!text.contains("KMS_ENDPOINT"), "{text}");
        assert!(
            text.contains("set -a; . .kms-dev/kmsctl.env; set +a"),
            "{text}"
        );
        assert_eq!(err.exit_code(), exit::USAGE);
    }

    #[test]
    fn rpc_errors_print_code_name_and_server_message() {
        let err = CliError::from(ClientError::from(tonic::Status::failed_precondition(
            "key \"citizens\" is SENSITIVE_PERSONAL: the data key is only delivered wrapped to a recipient",
        )));
        assert_eq!(
            format!("kmsctl: {}", err.message()),
            "kmsctl: FAILED_PRECONDITION: key \"citizens\" is SENSITIVE_PERSONAL: the data key is only delivered \
             wrapped to a recipient"
        );
        assert_eq!(err.exit_code(), exit::REJECTED);
    }

    #[tokio::test]
    async fn unusable_tls_material_exits_6_with_unavailable() {
        // PEM-shaped but not a certificate: tonic refuses the TLS configuration before connecting.
        // (A refused handshake against a live server is covered in tests/mtls_stub_server.rs.)
        let dir = tempfile::tempdir().unwrap();
        let pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        for name in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        let args = ConnectionArgs {
            endpoint: Some("https://127.0.0.1:1".into()),
            ca: Some(dir.path().join("ca.pem")),
            cert: Some(dir.path().join("cert.pem")),
            client_key: Some(dir.path().join("key.pem")),
            timeout: 5,
        };
        let config = connection_config(&args).unwrap();
        let err = CliError::from(KmsClient::connect(config).await.unwrap_err());
        assert!(
            matches!(err, CliError::Client(ClientError::Tls { .. })),
            "{err}"
        );
        assert_eq!(err.exit_code(), exit::UNAVAILABLE, "{err}");
        assert!(
            err.message().starts_with("UNAVAILABLE: "),
            "{}",
            err.message()
        );
    }
}
