//! Seals a data key to one of a caller's registered P-256 public keys, so that the plaintext never
//! crosses the network. Only keys an officer registered for the caller are ever sealed to (the
//! caller names one by its fingerprint); the sealing is bound to the blob's key, version and
//! encryption context, so a sealed key presented for another blob does not open.
//!
//! Format, version 2 (specified for third parties in `docs/recipient-sealing.md`, with a test
//! vector; the client's `RecipientKey::open` reads the same bytes):
//!
//! ```text
//! sealed   = 0x02 || ephemeral public key (SEC1 uncompressed, 65 bytes) || kwp (40 bytes)
//! shared   = x-coordinate of ECDH(ephemeral secret, recipient public)
//! info     = "kms.v1 recipient-sealed data key v2" || key id (16) || key version (u32 BE)
//!            || context digest (32)
//! wrap_key = HKDF-SHA256(ikm = shared, salt = ephemeral public || recipient public, info), 32 bytes
//! kwp      = RFC 5649 AES-256 key wrap with padding of the 32-byte data key under wrap_key
//! ```
//!
//! The context digest is the one the blob binding uses (`crate::context::digest`). A fresh
//! ephemeral key is made for every seal. The wrap key and the ECDH secret live only in zeroizing
//! buffers (ring zeroes its shared secret itself). This module must never log or return the data key.
//!
//! The ECDH runs in `ring` (constant-time assembly, about ten times faster than the pure-Rust
//! `p256`, and already built for TLS); `p256` validates the point at parse time and, in the tests,
//! opens what `ring` sealed, as the client does.
#![forbid(unsafe_code)]

use aes_kw::KekAes256;
use hkdf::Hkdf;
use p256::PublicKey;
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
use ring::rand::SystemRandom;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::ids::KeyId;

pub const PUBLIC_KEY_LEN: usize = 65;
/// The format's version byte.
pub const FORMAT_VERSION: u8 = 2;
pub const SEALED_LEN: usize = 1 + PUBLIC_KEY_LEN + 40;
/// The start of the HKDF `info`; the binding follows it.
pub const HKDF_INFO_PREFIX: &[u8] = b"kms.v1 recipient-sealed data key v2";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecipientError {
    #[error("recipient public key must be a 65-byte uncompressed SEC1 P-256 point, got {len} bytes")]
    BadLength { len: usize },
    #[error("recipient public key is not a valid P-256 point")]
    InvalidPoint,
    #[error("the system random generator failed")]
    Random,
    #[error("sealing failed")]
    Seal,
}

/// A recipient public key that has been checked to be a valid, uncompressed P-256 point.
#[derive(Clone, Debug)]
pub struct RecipientPublicKey {
    sec1: [u8; PUBLIC_KEY_LEN],
}

impl RecipientPublicKey {
    pub fn parse(bytes: &[u8]) -> Result<RecipientPublicKey, RecipientError> {
        let sec1: [u8; PUBLIC_KEY_LEN] =
            bytes.try_into().map_err(|_| RecipientError::BadLength { len: bytes.len() })?;
        if sec1[0] != 0x04 {
            return Err(RecipientError::InvalidPoint);
        }
        PublicKey::from_sec1_bytes(&sec1).map_err(|_| RecipientError::InvalidPoint)?;
        Ok(RecipientPublicKey { sec1 })
    }
}

/// What a sealed data key is bound to: the blob's key, version and encryption context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealBinding {
    pub key_id: KeyId,
    pub key_version: u32,
    pub context_digest: [u8; 32],
}

impl SealBinding {
    /// The HKDF `info` of the format.
    pub fn hkdf_info(&self) -> Vec<u8> {
        let mut info = Vec::with_capacity(HKDF_INFO_PREFIX.len() + 16 + 4 + 32);
        info.extend_from_slice(HKDF_INFO_PREFIX);
        info.extend_from_slice(&self.key_id.0);
        info.extend_from_slice(&self.key_version.to_be_bytes());
        info.extend_from_slice(&self.context_digest);
        info
    }
}

/// Seals `data_key` to `recipient`, bound to `binding`.
pub fn seal(recipient: &RecipientPublicKey, data_key: &[u8; 32], binding: &SealBinding) -> Result<Vec<u8>, RecipientError> {
    let ephemeral = EphemeralPrivateKey::generate(&ECDH_P256, &SystemRandom::new()).map_err(|_| RecipientError::Random)?;
    let eph_pub = ephemeral.compute_public_key().map_err(|_| RecipientError::Seal)?;
    let eph_pub = eph_pub.as_ref();
    if eph_pub.len() != PUBLIC_KEY_LEN {
        return Err(RecipientError::Seal);
    }
    let mut salt = [0u8; 2 * PUBLIC_KEY_LEN];
    salt[..PUBLIC_KEY_LEN].copy_from_slice(eph_pub);
    salt[PUBLIC_KEY_LEN..].copy_from_slice(&recipient.sec1);
    let info = binding.hkdf_info();
    let peer = UnparsedPublicKey::new(&ECDH_P256, &recipient.sec1);
    // The shared secret is the x-coordinate, as in SEC 1 and the client's `p256` ECDH.
    let wrap_key = agreement::agree_ephemeral(ephemeral, &peer, |shared| {
        let mut wrap_key = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(&salt), shared).expand(&info, wrap_key.as_mut()).map(|()| wrap_key)
    })
    .map_err(|_| RecipientError::InvalidPoint)?
    .map_err(|_| RecipientError::Seal)?;
    let kwp = KekAes256::from(*wrap_key).wrap_with_padding_vec(data_key).map_err(|_| RecipientError::Seal)?;
    let mut out = Vec::with_capacity(SEALED_LEN);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(eph_pub);
    out.extend_from_slice(&kwp);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::SecretKey;

    fn random_secret_key() -> SecretKey {
        SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng)
    }

    fn binding() -> SealBinding {
        SealBinding { key_id: KeyId([9; 16]), key_version: 3, context_digest: [7; 32] }
    }

    /// Opens a sealed key the way the client does, to check the format end to end.
    fn open(recipient: &SecretKey, sealed: &[u8], binding: &SealBinding) -> Option<Vec<u8>> {
        if sealed.first() != Some(&FORMAT_VERSION) {
            return None;
        }
        let sealed = &sealed[1..];
        let eph = PublicKey::from_sec1_bytes(&sealed[..PUBLIC_KEY_LEN]).ok()?;
        let shared = p256::ecdh::diffie_hellman(recipient.to_nonzero_scalar(), eph.as_affine());
        let mut salt = sealed[..PUBLIC_KEY_LEN].to_vec();
        salt.extend_from_slice(recipient.public_key().to_encoded_point(false).as_bytes());
        let hk = Hkdf::<Sha256>::new(Some(&salt), shared.raw_secret_bytes());
        let mut wk = [0u8; 32];
        hk.expand(&binding.hkdf_info(), &mut wk).ok()?;
        KekAes256::from(wk).unwrap_with_padding_vec(&sealed[PUBLIC_KEY_LEN..]).ok()
    }

    #[test]
    fn sealed_key_opens_only_for_its_recipient_and_its_binding() {
        let sk = random_secret_key();
        let pk = RecipientPublicKey::parse(sk.public_key().to_encoded_point(false).as_bytes()).unwrap();
        let data_key = [0x42u8; 32];
        let sealed = seal(&pk, &data_key, &binding()).unwrap();
        assert_eq!(sealed.len(), SEALED_LEN);
        assert_eq!(sealed[0], 2);
        assert_eq!(open(&sk, &sealed, &binding()).as_deref(), Some(&data_key[..]));
        let other = random_secret_key();
        assert_eq!(open(&other, &sealed, &binding()), None);
        let mut tampered = sealed.clone();
        tampered[80] ^= 1;
        assert_eq!(open(&sk, &tampered, &binding()), None);
        // Bound to the key id, the version and the context digest.
        for change in 0..3 {
            let mut b = binding();
            match change {
                0 => b.key_id.0[0] ^= 1,
                1 => b.key_version += 1,
                _ => b.context_digest[31] ^= 1,
            }
            assert_eq!(open(&sk, &sealed, &b), None, "binding change {change}");
        }
        // Two seals of the same key differ (fresh ephemeral key each time).
        assert_ne!(seal(&pk, &data_key, &binding()).unwrap(), sealed);
    }

    #[test]
    fn bad_public_keys_are_refused() {
        assert_eq!(RecipientPublicKey::parse(&[4; 10]).unwrap_err(), RecipientError::BadLength { len: 10 });
        let sk = random_secret_key();
        let compressed = sk.public_key().to_encoded_point(true);
        assert_eq!(
            RecipientPublicKey::parse(compressed.as_bytes()).unwrap_err(),
            RecipientError::BadLength { len: 33 }
        );
        let mut not_on_curve = sk.public_key().to_encoded_point(false).as_bytes().to_vec();
        not_on_curve[64] ^= 1;
        assert_eq!(RecipientPublicKey::parse(&not_on_curve).unwrap_err(), RecipientError::InvalidPoint);
    }
}
