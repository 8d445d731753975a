//! `kmsctl` exit codes, and how errors map onto them. Scripts branch on these numbers, so they are
//! part of the tool's interface: change them only with the help text below.
#![forbid(unsafe_code)]

use kms_client::ClientError;
use tonic::Code;

/// The command succeeded.
pub const SUCCESS: u8 = 0;
/// Any other error: I/O, internal server error, unexpected answer.
pub const OTHER: u8 = 1;
/// Usage error: bad arguments or missing connection settings (clap uses 2 as well).
pub const USAGE: u8 = 2;
/// Refused: PERMISSION_DENIED or UNAUTHENTICATED.
pub const REFUSED: u8 = 3;
/// NOT_FOUND.
pub const NOT_FOUND: u8 = 4;
/// Rejected request: INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, ALREADY_EXISTS.
pub const REJECTED: u8 = 5;
/// Service unavailable or unreachable: UNAVAILABLE, DEADLINE_EXCEEDED, TLS or connection failure.
pub const UNAVAILABLE: u8 = 6;
/// ABORTED: another request changed the key at the same time; nothing was changed, and running
/// the command again is safe. A code of its own so that scripts can retry on it alone.
pub const CONFLICT: u8 = 7;
/// `audit verify`: the audit trail was edited, truncated, extended or reordered.
pub const TAMPERED: u8 = 8;

/// The `Exit codes` section of `kmsctl --help`.
pub const HELP: &str = "\
Exit codes:
  0  success
  1  other error (I/O, internal error, unexpected answer)
  2  usage error (bad arguments, missing connection settings)
  3  refused: PERMISSION_DENIED or UNAUTHENTICATED
  4  NOT_FOUND
  5  rejected request: INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE, ALREADY_EXISTS
  6  service unavailable or unreachable: UNAVAILABLE, DEADLINE_EXCEEDED, TLS or connection failure
  7  conflict: ABORTED, the key was changed by another request at the same time; run it again
  8  audit verify: the audit trail failed verification (the first bad record is named)

A change that needs a second officer exits 0 and prints the approval request's id.
`rewrap` exits with the code of its first failed blob; its output file is still complete, with
each failed line copied unchanged.

Connection settings come from KMS_ENDPOINT, KMS_CA, KMS_CERT and KMS_KEY, or from --endpoint,
--ca, --cert and --key given before the command. For the dev server:
  set -a; . .kms-dev/kmsctl.env; set +a";

/// The exit code for a gRPC status code.
pub fn for_code(code: Code) -> u8 {
    match code {
        Code::Ok => SUCCESS,
        Code::PermissionDenied | Code::Unauthenticated => REFUSED,
        Code::NotFound => NOT_FOUND,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::AlreadyExists => REJECTED,
        Code::Unavailable | Code::DeadlineExceeded => UNAVAILABLE,
        Code::Aborted => CONFLICT,
        Code::Cancelled
        | Code::Unknown
        | Code::ResourceExhausted
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => OTHER,
    }
}

/// The exit code for a library error.
pub fn for_client_error(err: &ClientError) -> u8 {
    match err {
        ClientError::Rpc(status) => for_code(status.code()),
        ClientError::Connect { .. } | ClientError::Tls { .. } => UNAVAILABLE,
        ClientError::InvalidEndpoint { .. } | ClientError::BatchTooLarge { .. } => USAGE,
        _ => OTHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_documented_exit_codes() {
        assert_eq!(for_code(Code::PermissionDenied), 3);
        assert_eq!(for_code(Code::Unauthenticated), 3);
        assert_eq!(for_code(Code::NotFound), 4);
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::OutOfRange,
            Code::AlreadyExists,
        ] {
            assert_eq!(for_code(code), 5, "{code:?}");
        }
        assert_eq!(for_code(Code::Unavailable), 6);
        assert_eq!(for_code(Code::DeadlineExceeded), 6);
        assert_eq!(for_code(Code::Aborted), 7);
        for code in [
            Code::Internal,
            Code::Unknown,
            Code::DataLoss,
            Code::Unimplemented,
            Code::Cancelled,
        ] {
            assert_eq!(for_code(code), 1, "{code:?}");
        }
    }

    #[test]
    fn library_errors_map_to_exit_codes() {
        let rpc = ClientError::from(tonic::Status::permission_denied(
            "level 2 caller, key needs 3",
        ));
        assert_eq!(for_client_error(&rpc), REFUSED);
        let endpoint = ClientError::InvalidEndpoint {
            endpoint: "http://x".into(),
            problem: kms_client::EndpointProblem::NotHttps,
        };
        assert_eq!(for_client_error(&endpoint), USAGE);
        let io = ClientError::Io {
            what: "CA certificate",
            path: "/nope".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(for_client_error(&io), OTHER);
    }

    #[test]
    fn help_lists_every_exit_code() {
        for code in [
            SUCCESS,
            OTHER,
            USAGE,
            REFUSED,
            NOT_FOUND,
            REJECTED,
            UNAVAILABLE,
            CONFLICT,
        ] {
            assert!(
                HELP.contains(&format!("\n  {code}  ")),
                "exit code {code} missing from help"
            );
        }
    }
}
