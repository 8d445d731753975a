//! The client's error type: what went wrong talking to the key management service.
//!
//! RPC refusals keep the server's `tonic::Status` (code and message) untouched, so that callers
//! and `kmsctl` can branch on the gRPC code. Local failures (reading a file, building TLS,
//! connecting, opening a recipient-sealed key) name the path, endpoint or reason.
//!
//! Nothing here may ever carry key material: error messages end up in logs and terminals.
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// Everything that can fail in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with a gRPC error status (or the call could not be completed, which
    /// tonic also reports as a status, e.g. `UNAVAILABLE`; a local timeout is `DEADLINE_EXCEEDED`).
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(Box<tonic::Status>),

    /// A configuration file could not be read.
    #[error("cannot read {what} from {}: {source}", path.display())]
    Io {
        /// Which file this was ("CA certificate", "client certificate", "client key").
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A configuration value was read but is not usable.
    #[error("{what} in {}: {problem}", path.display())]
    Config {
        what: &'static str,
        path: PathBuf,
        problem: ConfigProblem,
    },

    /// The endpoint is not an `https://host[:port]` URL.
    #[error("invalid endpoint {endpoint:?}: {problem}")]
    InvalidEndpoint {
        endpoint: String,
        problem: EndpointProblem,
    },

    /// tonic/rustls refused the TLS configuration (for instance an unparsable certificate or key).
    #[error("TLS configuration for {endpoint} refused: {}", error_chain(source))]
    Tls {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },

    /// The TCP connection or the TLS handshake with the server failed.
    #[error("cannot connect to {endpoint}: {}", error_chain(source))]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },

    /// A recipient-sealed data key could not be opened (or, in tests, sealed).
    #[error(transparent)]
    Recipient(#[from] RecipientError),

    /// The server's answer does not match the contract (a server bug, or not this service).
    #[error("unexpected answer from the server: {0}")]
    BadResponse(ResponseProblem),

    /// A re-wrap batch larger than the service accepts; it was not sent. Split it (see
    /// [`crate::client::MAX_REWRAP_BATCH`]).
    #[error("a re-wrap batch holds at most {max} items, got {items}")]
    BatchTooLarge { items: usize, max: usize },

    /// The system's random generator failed (for an idempotency key); nothing was sent.
    #[error("the system random generator failed; nothing was sent")]
    Random,
}

impl ClientError {
    /// The gRPC status, when the server (or the transport, on its behalf) answered with one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Rpc(status) => Some(status),
            _ => None,
        }
    }

    /// The gRPC code of [`ClientError::status`].
    pub fn code(&self) -> Option<tonic::Code> {
        self.status().map(tonic::Status::code)
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Rpc(Box::new(status))
    }
}

/// Why a configuration file was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigProblem {
    #[error("the file is empty")]
    Empty,
    #[error("no PEM block (\"-----BEGIN ...\") found")]
    NotPem,
}

/// Why an endpoint was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointProblem {
    #[error("not a URL")]
    Unparsable,
    #[error("the service requires mutual TLS, so the URL must start with https://")]
    NotHttps,
    #[error("the URL has no host name")]
    NoHost,
}

/// Why a recipient-sealed data key could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecipientError {
    #[error("a recipient-sealed data key is {expected} bytes, got {actual}")]
    SealedLength { expected: usize, actual: usize },
    #[error("the sealed key's ephemeral public key is not an uncompressed P-256 point")]
    EphemeralKey,
    #[error("the public key is not a 65-byte uncompressed P-256 point")]
    PublicKey,
    #[error(
        "the sealed data key does not open with this recipient key (wrong recipient, another key, \
         version or encryption context, or tampered)"
    )]
    Unwrap,
    #[error("the sealed data key is {actual} bytes long, expected 32")]
    DataKeyLength { actual: usize },
    #[error("the system random generator failed")]
    Random,
    #[error("HKDF output length refused")]
    Kdf,
    #[error("no PKCS#8 P-256 private key in the PEM text")]
    Pem,
    #[error("the sealed data key has format version {found}; this client opens version 2")]
    Version { found: u8 },
    #[error("the key id {0:?} in the answer is not 32 hex digits")]
    KeyId(String),
    #[error("encryption context: {0}")]
    Context(&'static str),
}

/// How a server answer broke the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseProblem {
    #[error("the plaintext data key is {actual} bytes, expected 32")]
    DataKeyLength { actual: usize },
    #[error("no plaintext data key in the answer")]
    MissingPlaintext,
    #[error("no recipient-sealed data key in the answer")]
    MissingSealedKey,
    #[error("the data key was sealed to another recipient key than the one asked for")]
    SealedToAnotherKey,
    #[error(
        "a plaintext data key was sent although it was asked sealed to a recipient or not at all"
    )]
    UnwantedPlaintext,
    #[error("the classification {value} is not a known level")]
    UnknownClassification { value: i32 },
    #[error("the answer has no {field}")]
    MissingField { field: &'static str },
    #[error("{sent} items were sent but {received} results came back")]
    BatchLength { sent: usize, received: usize },
}

/// The canonical upper-case name of a gRPC code (`NOT_FOUND`, `PERMISSION_DENIED`, ...), as in
/// the gRPC specification and in other tools' output.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `error: cause: cause ...`; tonic's transport errors say little at the top level ("transport
/// error") and put the useful part (connection refused, certificate unknown) in their sources.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_error_shows_code_name_and_server_message() {
        let err = ClientError::from(tonic::Status::not_found("key \"payroll\" does not exist"));
        assert_eq!(err.to_string(), "NOT_FOUND: key \"payroll\" does not exist");
        assert_eq!(err.code(), Some(tonic::Code::NotFound));
    }

    #[test]
    fn io_error_names_the_file() {
        let err = ClientError::Io {
            what: "client key",
            path: PathBuf::from("/etc/kms/client.key"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let text = err.to_string();
        assert!(
            text.contains("client key") && text.contains("/etc/kms/client.key"),
            "{text}"
        );
        assert_eq!(err.code(), None);
    }
}
