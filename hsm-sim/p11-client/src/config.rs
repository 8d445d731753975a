//! The module's configuration, read from the environment at `C_Initialize`.
//!
//! - `HSM_SIM_ENDPOINT`: `unix:/path/to.sock` or `tcp:127.0.0.1:PORT` (an IP address and port, no
//!   name lookup). Required.
//! - `HSM_SIM_TIMEOUT_MS`: the deadline of every call, connection included (default 10000, at most
//!   one hour). A call unanswered by then returns `CKR_DEVICE_ERROR` and the connection is dropped.
//!
//! Owns parsing and validation. Must never echo more than a bounded prefix of a variable's value.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const ENDPOINT_VAR: &str = "HSM_SIM_ENDPOINT";
pub const TIMEOUT_VAR: &str = "HSM_SIM_TIMEOUT_MS";
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);
const MAX_TIMEOUT_MS: u64 = 3_600_000;

/// Where the simulated HSM listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, ConfigError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ConfigError::BadEndpoint(bounded(s)));
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse().map(Endpoint::Tcp).map_err(|_| ConfigError::BadEndpoint(bounded(s)))
        } else {
            Err(ConfigError::BadEndpoint(bounded(s)))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoint: Endpoint,
    pub timeout: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    MissingEndpoint,
    BadEndpoint(String),
    BadTimeout(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::MissingEndpoint => write!(f, "{ENDPOINT_VAR} is not set (unix:/path or tcp:IP:PORT)"),
            ConfigError::BadEndpoint(v) => write!(f, "{ENDPOINT_VAR}={v:?} is neither unix:/path nor tcp:IP:PORT"),
            ConfigError::BadTimeout(v) => {
                write!(f, "{TIMEOUT_VAR}={v:?} is not a number of milliseconds from 1 to {MAX_TIMEOUT_MS}")
            }
        }
    }
}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        let endpoint = match std::env::var(ENDPOINT_VAR) {
            Ok(v) => Endpoint::parse(&v)?,
            Err(std::env::VarError::NotPresent) => return Err(ConfigError::MissingEndpoint),
            Err(std::env::VarError::NotUnicode(_)) => return Err(ConfigError::BadEndpoint("<not UTF-8>".into())),
        };
        let timeout = match std::env::var(TIMEOUT_VAR) {
            Ok(v) => parse_timeout(&v)?,
            Err(std::env::VarError::NotPresent) => DEFAULT_TIMEOUT,
            Err(std::env::VarError::NotUnicode(_)) => return Err(ConfigError::BadTimeout("<not UTF-8>".into())),
        };
        Ok(Config { endpoint, timeout })
    }
}

fn parse_timeout(v: &str) -> Result<Duration, ConfigError> {
    match v.trim().parse::<u64>() {
        Ok(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Ok(Duration::from_millis(ms)),
        _ => Err(ConfigError::BadTimeout(bounded(v))),
    }
}

/// At most 80 characters of a value, for error messages.
fn bounded(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(Endpoint::parse("unix:/tmp/x.sock"), Ok(Endpoint::Unix("/tmp/x.sock".into())));
        assert_eq!(Endpoint::parse("tcp:127.0.0.1:4000"), Ok(Endpoint::Tcp("127.0.0.1:4000".parse().unwrap())));
        assert!(Endpoint::parse("tcp:localhost:4000").is_err());
        assert!(Endpoint::parse("unix:").is_err());
        assert!(Endpoint::parse(&"x".repeat(1000)).unwrap_err().to_string().len() < 200);
        assert_eq!(parse_timeout("250"), Ok(Duration::from_millis(250)));
        assert!(parse_timeout("0").is_err());
    }
}
