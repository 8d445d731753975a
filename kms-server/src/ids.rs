//! Identifiers shared by the layers: the key id that blobs carry, key versions, and the `CKA_ID` of
//! the HSM object behind a key version.
//!
//! The store keeps `CKA_ID`s, never PKCS#11 handles: handles are per-process and only the HSM layer
//! turns an [`ObjectId`] into one.
#![forbid(unsafe_code)]

use std::fmt;

use kms_proto::v1 as pb;

/// A key's 16-byte random id, fixed at creation. Blobs carry it; the name is only a label.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    /// A fresh random id from the operating system's generator.
    pub fn random() -> Result<KeyId, getrandom::Error> {
        let mut b = [0u8; 16];
        getrandom::getrandom(&mut b)?;
        Ok(KeyId(b))
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Option<KeyId> {
        let v = unhex(s)?;
        Some(KeyId(v.try_into().ok()?))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The `CKA_ID` of an HSM object. For key versions it is `key id (16 bytes) || version (u32, big
/// endian)`; service objects (the blob-binding MAC key) use fixed ASCII ids.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ObjectId(pub Vec<u8>);

impl ObjectId {
    pub fn for_version(key: KeyId, version: u32) -> ObjectId {
        let mut v = Vec::with_capacity(20);
        v.extend_from_slice(&key.0);
        v.extend_from_slice(&version.to_be_bytes());
        ObjectId(v)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", hex(&self.0))
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

/// What a key is for; each key version is exactly one HSM object of this kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyPurpose {
    /// An AES-256 key-encryption key (wrap/unwrap only) for envelope data keys.
    Envelope,
    /// An AES-256-GCM key (encrypt/decrypt only) for payloads encrypted inside the HSM.
    HsmEncrypt,
}

impl KeyPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyPurpose::Envelope => "ENVELOPE",
            KeyPurpose::HsmEncrypt => "HSM_ENCRYPT",
        }
    }

    pub fn parse(s: &str) -> Option<KeyPurpose> {
        match s {
            "ENVELOPE" => Some(KeyPurpose::Envelope),
            "HSM_ENCRYPT" => Some(KeyPurpose::HsmEncrypt),
            _ => None,
        }
    }

    pub fn to_proto(self) -> pb::KeyPurpose {
        match self {
            KeyPurpose::Envelope => pb::KeyPurpose::Envelope,
            KeyPurpose::HsmEncrypt => pb::KeyPurpose::HsmEncrypt,
        }
    }
}

impl fmt::Display for KeyPurpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lower-case hex of some bytes (ids and digests only; never key material).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Parses lower- or upper-case hex; `None` on odd length or a non-hex character.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_id_is_key_id_then_big_endian_version() {
        let id = ObjectId::for_version(KeyId([0xab; 16]), 0x0102_0304);
        assert_eq!(&id.0[..16], &[0xab; 16]);
        assert_eq!(&id.0[16..], &[1, 2, 3, 4]);
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let k = KeyId([0, 1, 2, 0xfe, 0xff, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0x10]);
        assert_eq!(k.to_hex(), "000102feff09080706050403020100 10".replace(' ', ""));
        assert_eq!(KeyId::from_hex(&k.to_hex()), Some(k));
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
        assert_eq!(KeyId::from_hex("00"), None);
    }
}
