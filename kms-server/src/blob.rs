//! The self-describing blob format for wrapped data keys and HSM ciphertexts.
//!
//! Every blob starts with a fixed 32-byte header naming what it is and what it is bound to:
//!
//! ```text
//! offset size field
//!      0    4 magic "KMSB"
//!      4    1 format version (1)
//!      5    1 kind: 1 = wrapped data key, 2 = HSM ciphertext
//!      6    1 classification byte (1 = UNCLASSIFIED .. 6 = TOP_SECRET)
//!      7    1 reserved, 0
//!      8   16 key id
//!     24    4 key version, big-endian
//!     28    4 body length, big-endian
//!     32    - body
//! ```
//!
//! Bodies:
//! - wrapped data key: `RFC 5649 wrap (40 bytes) || HMAC-SHA256 (32 bytes)`; the MAC is computed inside
//!   the HSM over `header || wrapped || context digest` with the token's blob-binding key.
//! - HSM ciphertext: `IV (12 bytes) || AES-256-GCM ciphertext || tag (16 bytes)`; the GCM additional
//!   data is `header || context digest`, and the GCM key never leaves the HSM.
//!
//! Either way, changing the key id, version, level, body or context makes the HSM refuse the blob.
//! This module only builds and parses bytes; it must never decide that a blob is authentic.
#![forbid(unsafe_code)]

use crate::classification::Classification;
use crate::ids::KeyId;

pub const MAGIC: [u8; 4] = *b"KMSB";
pub const FORMAT_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 32;
/// RFC 5649 wrap of a 32-byte key: 32 bytes plus the 8-byte integrity block.
pub const WRAPPED_KEY_LEN: usize = 40;
pub const MAC_LEN: usize = 32;
pub const IV_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobKind {
    WrappedDataKey = 1,
    HsmCiphertext = 2,
}

impl BlobKind {
    fn from_byte(b: u8) -> Option<BlobKind> {
        match b {
            1 => Some(BlobKind::WrappedDataKey),
            2 => Some(BlobKind::HsmCiphertext),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            BlobKind::WrappedDataKey => "a wrapped data key",
            BlobKind::HsmCiphertext => "an HSM ciphertext",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlobError {
    #[error("blob is {len} bytes, shorter than the {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("not a KMS blob (bad magic bytes)")]
    BadMagic,
    #[error("unsupported blob format version {0}; this server reads version {FORMAT_VERSION}")]
    UnsupportedVersion(u8),
    #[error("unknown blob kind {0}")]
    UnknownKind(u8),
    #[error("blob is {found}, but {expected} was expected here")]
    WrongKind { found: &'static str, expected: &'static str },
    #[error("blob names an unknown classification byte {0}")]
    UnknownClassification(u8),
    #[error("blob header has a non-zero reserved byte")]
    ReservedByteSet,
    #[error("blob header declares a {declared}-byte body but {actual} bytes follow")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("blob body is {len} bytes, which is not valid for {kind}")]
    BadBodyLength { kind: &'static str, len: usize },
    #[error("key version 0 does not exist")]
    ZeroVersion,
}

/// The parsed header of a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: BlobKind,
    pub classification: Classification,
    pub key_id: KeyId,
    pub key_version: u32,
    pub body_len: u32,
}

impl Header {
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = FORMAT_VERSION;
        h[5] = self.kind as u8;
        h[6] = self.classification.to_byte();
        h[7] = 0;
        h[8..24].copy_from_slice(&self.key_id.0);
        h[24..28].copy_from_slice(&self.key_version.to_be_bytes());
        h[28..32].copy_from_slice(&self.body_len.to_be_bytes());
        h
    }

    fn parse(bytes: &[u8]) -> Result<(Header, &[u8]), BlobError> {
        if bytes.len() < HEADER_LEN {
            return Err(BlobError::TooShort { len: bytes.len() });
        }
        let (h, body) = bytes.split_at(HEADER_LEN);
        if h[0..4] != MAGIC {
            return Err(BlobError::BadMagic);
        }
        if h[4] != FORMAT_VERSION {
            return Err(BlobError::UnsupportedVersion(h[4]));
        }
        let kind = BlobKind::from_byte(h[5]).ok_or(BlobError::UnknownKind(h[5]))?;
        let classification =
            Classification::from_byte(h[6]).ok_or(BlobError::UnknownClassification(h[6]))?;
        if h[7] != 0 {
            return Err(BlobError::ReservedByteSet);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&h[8..24]);
        let key_version = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
        if key_version == 0 {
            return Err(BlobError::ZeroVersion);
        }
        let body_len = u32::from_be_bytes([h[28], h[29], h[30], h[31]]);
        if body_len as usize != body.len() {
            return Err(BlobError::LengthMismatch { declared: body_len as usize, actual: body.len() });
        }
        let header = Header { kind, classification, key_id: KeyId(id), key_version, body_len };
        Ok((header, body))
    }
}

/// A wrapped data key blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKeyBlob {
    pub header: Header,
    pub wrapped: Vec<u8>,
    pub mac: [u8; MAC_LEN],
}

impl WrappedKeyBlob {
    /// The header that a new wrapped key blob for this key version will carry; its bytes are part of
    /// the MAC input, so they are fixed before the HSM is asked.
    pub fn header_for(classification: Classification, key_id: KeyId, key_version: u32) -> Header {
        Header {
            kind: BlobKind::WrappedDataKey,
            classification,
            key_id,
            key_version,
            body_len: (WRAPPED_KEY_LEN + MAC_LEN) as u32,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.wrapped.len() + MAC_LEN);
        v.extend_from_slice(&self.header.to_bytes());
        v.extend_from_slice(&self.wrapped);
        v.extend_from_slice(&self.mac);
        v
    }

    pub fn parse(bytes: &[u8]) -> Result<WrappedKeyBlob, BlobError> {
        let (header, body) = Header::parse(bytes)?;
        if header.kind != BlobKind::WrappedDataKey {
            return Err(BlobError::WrongKind {
                found: header.kind.describe(),
                expected: BlobKind::WrappedDataKey.describe(),
            });
        }
        if body.len() != WRAPPED_KEY_LEN + MAC_LEN {
            return Err(BlobError::BadBodyLength { kind: header.kind.describe(), len: body.len() });
        }
        let (wrapped, mac) = body.split_at(WRAPPED_KEY_LEN);
        let mut m = [0u8; MAC_LEN];
        m.copy_from_slice(mac);
        Ok(WrappedKeyBlob { header, wrapped: wrapped.to_vec(), mac: m })
    }
}

/// A ciphertext made inside the HSM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CiphertextBlob {
    pub header: Header,
    pub iv: [u8; IV_LEN],
    /// Ciphertext with the 16-byte GCM tag appended.
    pub ciphertext: Vec<u8>,
}

impl CiphertextBlob {
    /// The header of a new ciphertext for a plaintext of `plaintext_len` bytes, or `None` if the
    /// result would not fit the 32-bit length field.
    pub fn header_for(
        classification: Classification,
        key_id: KeyId,
        key_version: u32,
        plaintext_len: usize,
    ) -> Option<Header> {
        let body = plaintext_len.checked_add(IV_LEN + TAG_LEN)?;
        Some(Header {
            kind: BlobKind::HsmCiphertext,
            classification,
            key_id,
            key_version,
            body_len: u32::try_from(body).ok()?,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + IV_LEN + self.ciphertext.len());
        v.extend_from_slice(&self.header.to_bytes());
        v.extend_from_slice(&self.iv);
        v.extend_from_slice(&self.ciphertext);
        v
    }

    pub fn parse(bytes: &[u8]) -> Result<CiphertextBlob, BlobError> {
        let (header, body) = Header::parse(bytes)?;
        if header.kind != BlobKind::HsmCiphertext {
            return Err(BlobError::WrongKind {
                found: header.kind.describe(),
                expected: BlobKind::HsmCiphertext.describe(),
            });
        }
        if body.len() < IV_LEN + TAG_LEN {
            return Err(BlobError::BadBodyLength { kind: header.kind.describe(), len: body.len() });
        }
        let (iv, ct) = body.split_at(IV_LEN);
        let mut i = [0u8; IV_LEN];
        i.copy_from_slice(iv);
        Ok(CiphertextBlob { header, iv: i, ciphertext: ct.to_vec() })
    }
}

/// The GCM additional data of a ciphertext: its header and the context digest.
pub fn ciphertext_aad(header: &Header, context_digest: &[u8; 32]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HEADER_LEN + 32);
    aad.extend_from_slice(&header.to_bytes());
    aad.extend_from_slice(context_digest);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_key_blob() -> WrappedKeyBlob {
        WrappedKeyBlob {
            header: WrappedKeyBlob::header_for(Classification::Personal, KeyId([7; 16]), 3),
            wrapped: vec![0xaa; WRAPPED_KEY_LEN],
            mac: [0xbb; MAC_LEN],
        }
    }

    #[test]
    fn wrapped_key_blob_round_trips_with_exact_layout() {
        let blob = sample_key_blob();
        let bytes = blob.to_bytes();
        assert_eq!(bytes.len(), 32 + 40 + 32);
        assert_eq!(&bytes[..8], b"KMSB\x01\x01\x02\x00");
        assert_eq!(&bytes[24..32], &[0, 0, 0, 3, 0, 0, 0, 72]);
        assert_eq!(WrappedKeyBlob::parse(&bytes), Ok(blob));
    }

    #[test]
    fn ciphertext_blob_round_trips() {
        let header = CiphertextBlob::header_for(Classification::Secret, KeyId([1; 16]), 1, 5).unwrap();
        let blob = CiphertextBlob { header, iv: [9; 12], ciphertext: vec![1; 5 + 16] };
        let bytes = blob.to_bytes();
        assert_eq!(bytes.len(), 32 + 12 + 21);
        assert_eq!(CiphertextBlob::parse(&bytes), Ok(blob));
    }

    #[test]
    fn malformed_blobs_are_refused_precisely() {
        let good = sample_key_blob().to_bytes();
        assert_eq!(WrappedKeyBlob::parse(&good[..10]), Err(BlobError::TooShort { len: 10 }));
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(WrappedKeyBlob::parse(&b), Err(BlobError::BadMagic));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(WrappedKeyBlob::parse(&b), Err(BlobError::UnsupportedVersion(2)));
        let mut b = good.clone();
        b[5] = 9;
        assert_eq!(WrappedKeyBlob::parse(&b), Err(BlobError::UnknownKind(9)));
        let mut b = good.clone();
        b[5] = 2;
        assert!(matches!(WrappedKeyBlob::parse(&b), Err(BlobError::WrongKind { .. })));
        let mut b = good.clone();
        b[6] = 0;
        assert_eq!(WrappedKeyBlob::parse(&b), Err(BlobError::UnknownClassification(0)));
        let mut b = good.clone();
        b[7] = 1;
        assert_eq!(WrappedKeyBlob::parse(&b), Err(BlobError::ReservedByteSet));
        let mut b = good.clone();
        b[24..28].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(WrappedKeyBlob::parse(&b), Err(BlobError::ZeroVersion));
        let mut b = good.clone();
        b.push(0);
        assert_eq!(
            WrappedKeyBlob::parse(&b),
            Err(BlobError::LengthMismatch { declared: 72, actual: 73 })
        );
        let mut b = good.clone();
        b.truncate(100);
        b[28..32].copy_from_slice(&68u32.to_be_bytes());
        assert!(matches!(WrappedKeyBlob::parse(&b), Err(BlobError::BadBodyLength { len: 68, .. })));
        let short_ct = CiphertextBlob::header_for(Classification::Secret, KeyId([1; 16]), 1, 0).unwrap();
        let mut b = short_ct.to_bytes().to_vec();
        b[28..32].copy_from_slice(&20u32.to_be_bytes());
        b.extend_from_slice(&[0; 20]);
        assert!(matches!(CiphertextBlob::parse(&b), Err(BlobError::BadBodyLength { len: 20, .. })));
    }

    #[test]
    fn aad_covers_header_and_context() {
        let h = CiphertextBlob::header_for(Classification::Secret, KeyId([1; 16]), 1, 5).unwrap();
        let aad = ciphertext_aad(&h, &[3; 32]);
        assert_eq!(&aad[..32], &h.to_bytes());
        assert_eq!(&aad[32..], &[3; 32]);
    }
}
