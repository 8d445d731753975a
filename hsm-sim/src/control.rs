//! The fault-injection control protocol of `hsm-sim serve`: one command per line on the control
//! socket, one reply line each (`ok ...` or `err ...`).
//!
//! | command | effect |
//! |---|---|
//! | `latency 1ms` | delay every call by this much (`0` for none; `us`, `ms`, `s`), concurrently |
//! | `fail N CKR_DEVICE_ERROR [C_WrapKey]` | answer the next N calls (of that function) with the code |
//! | `drop` | close every client connection now (their backends stop) |
//! | `hang [500ms]` | answer no call until `release` (or for the duration); held calls then run |
//! | `release` | end a hang |
//! | `reset` | no latency, no pending failures, no hang |
//! | `status` | `ok calls=.. faults=.. connections=.. accepted=.. held=.. latency_us=.. hanging=0/1 failures_pending=..` |
//!
//! A code is a `CKR_` name or a number (`0x30`). A function is a PKCS#11 name; the `Init`,
//! `Update` and `Final` calls of an operation count as the operation (`C_EncryptInit` is
//! `C_Encrypt`), since the module sends each operation as one request. Calls the client module
//! answers itself (a size query's second call) never reach the server and are not counted.
//!
//! Owns parsing and formatting of both sides. Must never echo more than a bounded prefix of a line.

use std::fmt;
use std::time::Duration;

use hsm_sim_wire::{rv_from_name, rv_name, Op};

/// Longest command line accepted.
pub const MAX_LINE: usize = 256;

/// A control command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlCommand {
    Latency(Duration),
    Fail { count: u32, rv: u64, function: Option<Op> },
    Drop,
    Hang(Option<Duration>),
    Release,
    Reset,
    Status,
}

/// Why a line is not a command. Carries at most a short prefix of the offending word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlError(String);

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ControlError {}

fn bounded(s: &str) -> String {
    s.chars().take(40).collect()
}

fn err(what: &str, word: &str) -> ControlError {
    ControlError(format!("{what}: {:?}", bounded(word)))
}

/// `250us`, `1ms`, `2s`, or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, ControlError> {
    let bad = || err("not a duration (like 250us, 1ms, 2s)", s);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let (num, unit): (&str, fn(u64) -> Duration) = if let Some(n) = s.strip_suffix("us") {
        (n, Duration::from_micros)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, Duration::from_millis)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, Duration::from_secs)
    } else {
        return Err(bad());
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = unit(n);
    if d > Duration::from_secs(3600) {
        return Err(err("longer than an hour", s));
    }
    Ok(d)
}

/// A duration as the protocol writes it.
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us == 0 {
        "0".into()
    } else if us.is_multiple_of(1_000_000) {
        format!("{}s", us / 1_000_000)
    } else if us.is_multiple_of(1000) {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

impl ControlCommand {
    pub fn parse(line: &str) -> Result<ControlCommand, ControlError> {
        if line.len() > MAX_LINE {
            return Err(ControlError(format!("line longer than {MAX_LINE} bytes")));
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["latency", d] => Ok(ControlCommand::Latency(parse_duration(d)?)),
            ["fail", n, code, rest @ ..] if rest.len() <= 1 => {
                let count = n.parse().map_err(|_| err("not a count", n))?;
                let rv = rv_from_name(code).ok_or_else(|| err("not a CKR_ code", code))?;
                let function = match rest.first() {
                    Some(f) => Some(Op::from_function_name(f).ok_or_else(|| err("not a forwarded PKCS#11 function", f))?),
                    None => None,
                };
                Ok(ControlCommand::Fail { count, rv, function })
            }
            ["drop"] => Ok(ControlCommand::Drop),
            ["hang"] => Ok(ControlCommand::Hang(None)),
            ["hang", d] => Ok(ControlCommand::Hang(Some(parse_duration(d)?))),
            ["release"] => Ok(ControlCommand::Release),
            ["reset"] => Ok(ControlCommand::Reset),
            ["status"] => Ok(ControlCommand::Status),
            [first, ..] => Err(err("unknown command or arguments", first)),
            [] => Err(ControlError("empty line".into())),
        }
    }

    /// The line that [`ControlCommand::parse`] reads back as `self` (no newline).
    pub fn to_line(&self) -> String {
        match self {
            ControlCommand::Latency(d) => format!("latency {}", format_duration(*d)),
            ControlCommand::Fail { count, rv, function } => {
                let code = rv_name(*rv).map(str::to_owned).unwrap_or_else(|| format!("{rv:#x}"));
                match function {
                    Some(f) => format!("fail {count} {code} {}", f.name()),
                    None => format!("fail {count} {code}"),
                }
            }
            ControlCommand::Drop => "drop".into(),
            ControlCommand::Hang(None) => "hang".into(),
            ControlCommand::Hang(Some(d)) => format!("hang {}", format_duration(*d)),
            ControlCommand::Release => "release".into(),
            ControlCommand::Reset => "reset".into(),
            ControlCommand::Status => "status".into(),
        }
    }
}

/// What `status` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServeStatus {
    /// Calls answered by a backend (SoftHSM).
    pub calls: u64,
    /// Calls answered with an injected failure.
    pub faults: u64,
    /// Client connections open now.
    pub connections: u64,
    /// Client connections accepted since start.
    pub accepted: u64,
    /// Calls held by a hang right now.
    pub held: u64,
    pub latency: Duration,
    pub hanging: bool,
    /// Injected failures still to come (all rules together).
    pub failures_pending: u64,
}

impl ServeStatus {
    pub fn to_line(&self) -> String {
        format!(
            "ok calls={} faults={} connections={} accepted={} held={} latency_us={} hanging={} failures_pending={}",
            self.calls,
            self.faults,
            self.connections,
            self.accepted,
            self.held,
            self.latency.as_micros(),
            u8::from(self.hanging),
            self.failures_pending
        )
    }

    pub fn parse(line: &str) -> Result<ServeStatus, ControlError> {
        let rest = line.strip_prefix("ok ").ok_or_else(|| err("not a status line", line))?;
        let mut s = ServeStatus::default();
        for field in rest.split_whitespace() {
            let (k, v) = field.split_once('=').ok_or_else(|| err("not key=value", field))?;
            let n: u64 = v.parse().map_err(|_| err("not a number", v))?;
            match k {
                "calls" => s.calls = n,
                "faults" => s.faults = n,
                "connections" => s.connections = n,
                "accepted" => s.accepted = n,
                "held" => s.held = n,
                "latency_us" => s.latency = Duration::from_micros(n),
                "hanging" => s.hanging = n != 0,
                "failures_pending" => s.failures_pending = n,
                _ => {}
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        for c in [
            ControlCommand::Latency(Duration::from_millis(1)),
            ControlCommand::Latency(Duration::from_micros(250)),
            ControlCommand::Fail { count: 5, rv: 0x30, function: None },
            ControlCommand::Fail { count: 1, rv: 0xB3, function: Some(Op::WrapKey) },
            ControlCommand::Drop,
            ControlCommand::Hang(None),
            ControlCommand::Hang(Some(Duration::from_secs(2))),
            ControlCommand::Release,
            ControlCommand::Reset,
            ControlCommand::Status,
        ] {
            assert_eq!(ControlCommand::parse(&c.to_line()), Ok(c));
        }
        assert_eq!(
            ControlCommand::parse("fail 2 CKR_SESSION_HANDLE_INVALID C_SignInit"),
            Ok(ControlCommand::Fail { count: 2, rv: 0xB3, function: Some(Op::Sign) })
        );
        assert!(ControlCommand::parse("fail x CKR_DEVICE_ERROR").is_err());
        assert!(ControlCommand::parse("latency 5 parsecs").is_err());
        assert!(ControlCommand::parse(&"x".repeat(1000)).unwrap_err().to_string().len() < 100);
    }

    #[test]
    fn status_round_trips() {
        let s = ServeStatus { calls: 3, faults: 1, connections: 2, accepted: 4, held: 0, latency: Duration::from_millis(1), hanging: true, failures_pending: 7 };
        assert_eq!(ServeStatus::parse(&s.to_line()), Ok(s));
    }
}
