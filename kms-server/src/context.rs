//! The caller's encryption context: validation and the canonical digest that binds it to blobs.
//!
//! The context may hold personal data (a citizen id, a case number), so this module turns it into a
//! SHA-256 digest as early as possible; the context itself is never stored or logged, and error
//! messages name the offending entry by position, never by content.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

/// At most this many entries in one context.
pub const MAX_ENTRIES: usize = 64;
/// At most this many bytes in one context key.
pub const MAX_KEY_BYTES: usize = 256;
/// At most this many bytes in one context value.
pub const MAX_VALUE_BYTES: usize = 4096;

/// Domain separation for the digest, so that it can never collide with another use of SHA-256.
const DIGEST_LABEL: &[u8] = b"kms.v1 encryption context\0";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContextError {
    #[error("encryption context has {count} entries; the limit is {MAX_ENTRIES}")]
    TooManyEntries { count: usize },
    #[error("encryption context has an entry with an empty key")]
    EmptyKey,
    #[error("encryption context key number {index} (in sorted order) is {len} bytes; the limit is {MAX_KEY_BYTES}")]
    KeyTooLong { index: usize, len: usize },
    #[error("encryption context value number {index} (in sorted key order) is {len} bytes; the limit is {MAX_VALUE_BYTES}")]
    ValueTooLong { index: usize, len: usize },
}

/// A validated encryption context, reduced to its digest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ContextDigest(pub [u8; 32]);

impl std::fmt::Debug for ContextDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ContextDigest({})", crate::ids::hex(&self.0))
    }
}

/// Validates a context from the wire and returns its canonical digest.
///
/// Canonical form: entries sorted by key bytes; `u32 count`, then for each entry `u32 len || key ||
/// u32 len || value`, all big-endian, prefixed by a domain label. An empty context is allowed and has
/// a digest of its own.
pub fn digest(context: &HashMap<String, String>) -> Result<ContextDigest, ContextError> {
    if context.len() > MAX_ENTRIES {
        return Err(ContextError::TooManyEntries { count: context.len() });
    }
    let sorted: BTreeMap<&[u8], &[u8]> = context
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect();
    let mut h = Sha256::new();
    h.update(DIGEST_LABEL);
    h.update((sorted.len() as u32).to_be_bytes());
    for (index, (k, v)) in sorted.into_iter().enumerate() {
        if k.is_empty() {
            return Err(ContextError::EmptyKey);
        }
        if k.len() > MAX_KEY_BYTES {
            return Err(ContextError::KeyTooLong { index, len: k.len() });
        }
        if v.len() > MAX_VALUE_BYTES {
            return Err(ContextError::ValueTooLong { index, len: v.len() });
        }
        // Lengths fit in u32: both are bounded above.
        h.update((k.len() as u32).to_be_bytes());
        h.update(k);
        h.update((v.len() as u32).to_be_bytes());
        h.update(v);
    }
    Ok(ContextDigest(h.finalize().into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn digest_ignores_order_but_not_content() {
        let a = digest(&ctx(&[("a", "1"), ("b", "2")])).unwrap();
        let b = digest(&ctx(&[("b", "2"), ("a", "1")])).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, digest(&ctx(&[("a", "1"), ("b", "3")])).unwrap());
        assert_ne!(a, digest(&ctx(&[("a", "1")])).unwrap());
        assert_ne!(digest(&ctx(&[])).unwrap(), digest(&ctx(&[("a", "")])).unwrap());
    }

    #[test]
    fn length_prefixes_prevent_ambiguous_splits() {
        // Without length prefixes these two would hash the same bytes "ab" + "c".
        let one = digest(&ctx(&[("ab", "c")])).unwrap();
        let two = digest(&ctx(&[("a", "bc")])).unwrap();
        assert_ne!(one, two);
    }

    #[test]
    fn limits_are_enforced_without_echoing_content() {
        let many: HashMap<_, _> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(digest(&many), Err(ContextError::TooManyEntries { count: 65 }));
        assert_eq!(digest(&ctx(&[("", "x")])), Err(ContextError::EmptyKey));
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(
            digest(&ctx(&[(&long_key, "x")])),
            Err(ContextError::KeyTooLong { index: 0, len: MAX_KEY_BYTES + 1 })
        );
        let secret_value = "citizen-0123456789".repeat(300);
        let err = digest(&ctx(&[("a", "1"), ("id", &secret_value)])).unwrap_err();
        assert_eq!(err, ContextError::ValueTooLong { index: 1, len: secret_value.len() });
        assert!(!err.to_string().contains("citizen"));
    }
}
