//! One audit record: what a single gRPC request was and what became of it, its canonical byte
//! encoding, and the hash that stands in for a request's encryption context.
//!
//! # Canonical encoding, version 1
//!
//! [`AuditRecord::encode`] is the input to the hash chain, so it is fixed for "v1" and never
//! changes; a new layout needs a new tag. The bytes are, in this order:
//!
//! 1. the ASCII tag `kms-audit-record-v1` (19 bytes, no length prefix);
//! 2. `seq` as u64, big-endian, 8 bytes;
//! 3. `time_unix_ms` as i64, big-endian (two's complement), 8 bytes;
//! 4. `caller`, `cert_fingerprint`, `rpc`, `key`, each as a u32 big-endian length then the bytes;
//! 5. `key_version` as u32, big-endian, 4 bytes;
//! 6. `level`, then `outcome` as its string ([`Outcome::as_str`]), each length-prefixed;
//! 7. `status_code` as i32, big-endian, 4 bytes;
//! 8. `request_id`, `context_hash`, `detail`, each length-prefixed.
//!
//! Strings are encoded as their UTF-8 bytes. Nothing here ever holds key material, and the
//! encryption context itself is never recorded: only [`context_hash`] of it.
//!
//! # Context hash, version 1
//!
//! SHA-256 over the ASCII tag `kms-audit-context-v1`, then for every `(k, v)` in `BTreeMap` order:
//! u32 BE length of `k`, the bytes of `k`, u32 BE length of `v`, the bytes of `v`. An empty map
//! hashes like any other (to the hash of the tag alone).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// The domain-separation tag that starts every encoded record.
pub const RECORD_TAG: &[u8] = b"kms-audit-record-v1";

/// The domain-separation tag that starts the hashed form of an encryption context.
pub const CONTEXT_TAG: &[u8] = b"kms-audit-context-v1";

/// What became of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The request succeeded.
    Ok,
    /// The request was refused (authentication, authorisation or validation).
    Refused,
    /// The request was allowed but failed while being carried out.
    Failed,
    /// The request was started; its result is recorded separately (used for long operations).
    Begun,
}

impl Outcome {
    /// Every outcome, in declaration order.
    pub const ALL: [Outcome; 4] = [Outcome::Ok, Outcome::Refused, Outcome::Failed, Outcome::Begun];

    /// The outcome's stable name: `"ok"`, `"refused"`, `"failed"` or `"begun"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
            Outcome::Begun => "begun",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not the name of an [`Outcome`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{found:?} is not an audit outcome (expected ok, refused, failed or begun)")]
pub struct OutcomeParseError {
    /// The string that was given.
    pub found: String,
}

impl FromStr for Outcome {
    type Err = OutcomeParseError;

    fn from_str(s: &str) -> Result<Outcome, OutcomeParseError> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s).ok_or_else(|| OutcomeParseError { found: s.to_owned() })
    }
}

/// One request, as the audit trail records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// Position in the trail: 1, 2, 3, ... assigned by [`crate::Chain::seal`].
    pub seq: u64,
    /// When the request was received, in milliseconds since the Unix epoch.
    pub time_unix_ms: i64,
    /// The caller's certificate identity (URI SAN), `""` if none.
    pub caller: String,
    /// SHA-256 of the DER leaf certificate (32 bytes), or empty.
    pub cert_fingerprint: Vec<u8>,
    /// The gRPC method, e.g. `"GenerateDataKey"`.
    pub rpc: String,
    /// The key name, or `""`.
    pub key: String,
    /// The key version, 0 if none.
    pub key_version: u32,
    /// The classification level, e.g. `"PERSONAL"`, or `""`.
    pub level: String,
    /// What became of the request.
    pub outcome: Outcome,
    /// The gRPC status code answered, 0 = OK.
    pub status_code: i32,
    /// The request id.
    pub request_id: String,
    /// [`context_hash`] of the request's encryption context (32 bytes), or empty.
    pub context_hash: Vec<u8>,
    /// The refusal or failure message, `""` on success.
    pub detail: String,
}

impl AuditRecord {
    /// The canonical v1 encoding described in the module documentation.
    pub fn encode(&self) -> Vec<u8> {
        let variable = self.caller.len()
            + self.cert_fingerprint.len()
            + self.rpc.len()
            + self.key.len()
            + self.level.len()
            + self.outcome.as_str().len()
            + self.request_id.len()
            + self.context_hash.len()
            + self.detail.len();
        let mut out = Vec::with_capacity(RECORD_TAG.len() + 24 + 9 * 4 + variable);
        out.extend_from_slice(RECORD_TAG);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time_unix_ms.to_be_bytes());
        put_bytes(&mut out, self.caller.as_bytes());
        put_bytes(&mut out, &self.cert_fingerprint);
        put_bytes(&mut out, self.rpc.as_bytes());
        put_bytes(&mut out, self.key.as_bytes());
        out.extend_from_slice(&self.key_version.to_be_bytes());
        put_bytes(&mut out, self.level.as_bytes());
        put_bytes(&mut out, self.outcome.as_str().as_bytes());
        out.extend_from_slice(&self.status_code.to_be_bytes());
        put_bytes(&mut out, self.request_id.as_bytes());
        put_bytes(&mut out, &self.context_hash);
        put_bytes(&mut out, self.detail.as_bytes());
        out
    }
}

/// Appends a u32 big-endian length and the bytes.
///
/// A field longer than `u32::MAX` bytes cannot come from a gRPC request (messages are far smaller);
/// should one ever appear, its length saturates, which still binds every byte into the hash since
/// the bytes themselves follow in full.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The v1 hash of an encryption context (see the module documentation). The context itself is
/// never stored; this hash lets an auditor check a context they are shown.
pub fn context_hash(context: &BTreeMap<String, String>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CONTEXT_TAG);
    for (k, v) in context {
        for part in [k.as_bytes(), v.as_bytes()] {
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            h.update(len.to_be_bytes());
            h.update(part);
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_round_trip() {
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>(), Ok(o));
            assert_eq!(serde_json::to_string(&o).unwrap(), format!("\"{}\"", o.as_str()));
        }
        let err = "OK".parse::<Outcome>().unwrap_err();
        assert_eq!(err.found, "OK");
        assert!(err.to_string().contains("not an audit outcome"));
    }

    #[test]
    fn encoding_layout_is_as_documented() {
        let r = AuditRecord {
            seq: 2,
            time_unix_ms: -1,
            caller: "a".into(),
            cert_fingerprint: vec![0xAB],
            rpc: "R".into(),
            key: String::new(),
            key_version: 7,
            level: "L".into(),
            outcome: Outcome::Refused,
            status_code: 7,
            request_id: "id".into(),
            context_hash: vec![],
            detail: "d".into(),
        };
        let mut want = b"kms-audit-record-v1".to_vec();
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2]);
        want.extend_from_slice(&[0xFF; 8]);
        want.extend_from_slice(&[0, 0, 0, 1, b'a']);
        want.extend_from_slice(&[0, 0, 0, 1, 0xAB]);
        want.extend_from_slice(&[0, 0, 0, 1, b'R']);
        want.extend_from_slice(&[0, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 7]);
        want.extend_from_slice(&[0, 0, 0, 1, b'L']);
        want.extend_from_slice(&[0, 0, 0, 7]);
        want.extend_from_slice(b"refused");
        want.extend_from_slice(&[0, 0, 0, 7]);
        want.extend_from_slice(&[0, 0, 0, 2, b'i', b'd']);
        want.extend_from_slice(&[0, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 1, b'd']);
        assert_eq!(r.encode(), want);
    }

    #[test]
    fn context_hash_is_length_prefixed_and_ordered() {
        let mut a = BTreeMap::new();
        a.insert("ab".to_owned(), "c".to_owned());
        let mut b = BTreeMap::new();
        b.insert("a".to_owned(), "bc".to_owned());
        assert_ne!(context_hash(&a), context_hash(&b));

        let mut manual = Sha256::new();
        manual.update(b"kms-audit-context-v1");
        manual.update([0, 0, 0, 2]);
        manual.update(b"ab");
        manual.update([0, 0, 0, 1]);
        manual.update(b"c");
        assert_eq!(context_hash(&a), <[u8; 32]>::from(manual.finalize()));

        let empty: [u8; 32] = Sha256::digest(b"kms-audit-context-v1").into();
        assert_eq!(context_hash(&BTreeMap::new()), empty);
    }
}
