//! Connection settings: which server, which CA to trust, and which client certificate to present.
//!
//! The service authenticates every caller with a client certificate (mutual TLS), so a
//! configuration always holds a CA bundle, a certificate chain and its private key. The private key
//! is kept in a zeroizing buffer and never shown by `Debug`.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

use crate::error::{ClientError, ConfigProblem};

/// The default deadline for connecting and for each call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach and authenticate to the key management service.
#[derive(Clone)]
pub struct ClientConfig {
    /// `https://host:port`; the host is also the name checked in the server certificate.
    pub endpoint: String,
    /// PEM CA certificate(s) that issued the server certificate.
    pub ca_pem: Vec<u8>,
    /// PEM client certificate (chain) presented to the server.
    pub cert_pem: Vec<u8>,
    /// PEM private key of the client certificate.
    pub key_pem: Zeroizing<Vec<u8>>,
    /// Deadline for connecting and for each call.
    pub timeout: Duration,
}

impl ClientConfig {
    /// Reads the CA, certificate and key PEM files. Fails with the path of the first file that
    /// cannot be read or holds no PEM block.
    pub fn from_files(
        endpoint: impl Into<String>,
        ca_path: impl AsRef<Path>,
        cert_path: impl AsRef<Path>,
        key_path: impl AsRef<Path>,
    ) -> Result<ClientConfig, ClientError> {
        Ok(ClientConfig {
            endpoint: endpoint.into(),
            ca_pem: read_pem("CA certificate", ca_path.as_ref())?.to_vec(),
            cert_pem: read_pem("client certificate", cert_path.as_ref())?.to_vec(),
            key_pem: read_pem("client key", key_path.as_ref())?,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same configuration with another deadline for connecting and for each call.
    pub fn with_timeout(self, timeout: Duration) -> ClientConfig {
        ClientConfig { timeout, ..self }
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoint", &self.endpoint)
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &format_args!("<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Reads a PEM file into a zeroizing buffer (the same function serves the private key, so that
/// its bytes never sit in a plain `Vec`).
fn read_pem(what: &'static str, path: &Path) -> Result<Zeroizing<Vec<u8>>, ClientError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| ClientError::Io {
        what,
        path: path.to_path_buf(),
        source,
    })?);
    let problem = if bytes.iter().all(u8::is_ascii_whitespace) {
        Some(ConfigProblem::Empty)
    } else if !contains(&bytes, b"-----BEGIN ") {
        Some(ConfigProblem::NotPem)
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ClientError::Config {
            what,
            path: PathBuf::from(path),
            problem,
        }),
        None => Ok(bytes),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAKE_PEM: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn from_files_reads_all_three_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.path().join(name), FAKE_PEM).unwrap();
        }
        let cfg = ClientConfig::from_files(
            "https://kms.local:7443",
            dir.path().join("ca.pem"),
            dir.path().join("cert.pem"),
            dir.path().join("key.pem"),
        )
        .unwrap();
        assert_eq!(cfg.ca_pem, FAKE_PEM);
        assert_eq!(&cfg.key_pem[..], FAKE_PEM);
        assert_eq!(cfg.timeout, DEFAULT_TIMEOUT);
        let debug = format!("{cfg:?}");
        assert!(
            debug.contains("<redacted>") && !debug.contains("MIIB"),
            "{debug}"
        );
    }

    #[test]
    fn missing_or_non_pem_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), FAKE_PEM).unwrap();
        std::fs::write(dir.path().join("cert.der"), [0x30u8, 0x82, 0x01]).unwrap();
        let missing = dir.path().join("nope.pem");
        let err =
            ClientConfig::from_files("https://h", dir.path().join("ca.pem"), &missing, &missing)
                .unwrap_err();
        assert!(
            matches!(&err, ClientError::Io { what: "client certificate", path, .. } if *path == missing)
        );
        let err = ClientConfig::from_files(
            "https://h",
            dir.path().join("ca.pem"),
            dir.path().join("cert.der"),
            dir.path().join("ca.pem"),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Config {
                    problem: ConfigProblem::NotPem,
                    ..
                }
            ),
            "{err}"
        );
    }
}
