//! Opening data keys that the server sealed to one of the caller's registered P-256 keys, so that
//! the plaintext data key never crosses the network.
//!
//! The server seals, the client opens. The format, version 2 (`docs/recipient-sealing.md` specifies
//! it for other implementations, with a test vector; the server's `recipient` module writes the
//! same bytes):
//!
//! ```text
//! sealed   = 0x02 || ephemeral public key (SEC1 uncompressed, 65 bytes) || kwp (40 bytes)
//! shared   = x-coordinate of ECDH(ephemeral secret, recipient public)
//! info     = "kms.v1 recipient-sealed data key v2" || key id (16 bytes) || key version (u32 BE)
//!            || context digest (32 bytes)
//! wrap_key = HKDF-SHA256(ikm = shared, salt = ephemeral public || recipient public, info), 32 bytes
//! kwp      = RFC 5649 AES-256 key wrap with padding of the 32-byte data key under wrap_key
//! context digest = SHA-256("kms.v1 encryption context\0" || u32 BE count || for each entry in
//!                  byte order of its key: u32 BE len || key || u32 BE len || value)
//! ```
//!
//! A recipient key is named by its fingerprint, the SHA-256 of its uncompressed SEC1 point; an
//! officer registers the public half for the caller, and only registered keys are sealed to.
//!
//! The recipient secret key, the ECDH secret, the wrap key and the opened data key live only in
//! zeroizing types; this module must never log, print or `Debug` any of them.
#![forbid(unsafe_code)]

use std::fmt;

use aes_kw::KekAes256;
use hkdf::Hkdf;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::error::{ClientError, RecipientError};

/// Length of a SEC1 uncompressed P-256 public key.
pub const PUBLIC_KEY_LEN: usize = 65;
/// Length of a data key (AES-256).
pub const DATA_KEY_LEN: usize = 32;
/// The format's version byte.
pub const FORMAT_VERSION: u8 = 2;
/// Length of a sealed 32-byte data key: the version byte, the ephemeral public key and the 40-byte
/// RFC 5649 wrap.
pub const SEALED_LEN: usize = 1 + PUBLIC_KEY_LEN + DATA_KEY_LEN + 8;
/// The start of the HKDF `info` that separates this use of the ECDH secret from any other.
pub const HKDF_INFO_PREFIX: &[u8] = b"kms.v1 recipient-sealed data key v2";
/// Domain label of the encryption context digest (the blob binding's).
const CONTEXT_LABEL: &[u8] = b"kms.v1 encryption context\0";

/// What a sealed data key is bound to: the blob's key id, key version and encryption context. The
/// answer that carries a sealed key names the key id and version; the context is the caller's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealBinding {
    pub key_id: [u8; 16],
    pub key_version: u32,
    pub context_digest: [u8; 32],
}

impl SealBinding {
    /// The binding of an answer: its hex key id and version, and the request's context.
    pub fn new(key_id_hex: &str, key_version: u32, context: &std::collections::BTreeMap<String, String>) -> Result<SealBinding, RecipientError> {
        let key_id = unhex(key_id_hex)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .ok_or_else(|| RecipientError::KeyId(key_id_hex.chars().take(40).collect()))?;
        Ok(SealBinding { key_id, key_version, context_digest: context_digest(context)? })
    }

    fn hkdf_info(&self) -> Vec<u8> {
        let mut info = Vec::with_capacity(HKDF_INFO_PREFIX.len() + 16 + 4 + 32);
        info.extend_from_slice(HKDF_INFO_PREFIX);
        info.extend_from_slice(&self.key_id);
        info.extend_from_slice(&self.key_version.to_be_bytes());
        info.extend_from_slice(&self.context_digest);
        info
    }
}

/// The canonical digest of an encryption context, as the service computes it for the blob binding
/// and the sealing (see the module docs). A `BTreeMap` of `String`s is already in byte order.
pub fn context_digest(context: &std::collections::BTreeMap<String, String>) -> Result<[u8; 32], RecipientError> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(CONTEXT_LABEL);
    let count = u32::try_from(context.len()).map_err(|_| RecipientError::Context("too many entries"))?;
    h.update(count.to_be_bytes());
    for (k, v) in context {
        for part in [k.as_bytes(), v.as_bytes()] {
            let len = u32::try_from(part.len()).map_err(|_| RecipientError::Context("an entry is too long"))?;
            h.update(len.to_be_bytes());
            h.update(part);
        }
    }
    Ok(h.finalize().into())
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// A P-256 key pair whose public half is sent with a data-key request, and whose secret half opens
/// the answer. Usually made fresh for one process (`generate`) and never stored.
#[derive(Clone)]
pub struct RecipientKey {
    secret: SecretKey,
    public_sec1: [u8; PUBLIC_KEY_LEN],
}

impl RecipientKey {
    /// A new random key pair from the operating system's generator.
    pub fn generate() -> Result<RecipientKey, ClientError> {
        // A random 32-byte string is a valid scalar except with probability ~2^-32; retry then.
        for _ in 0..16 {
            let mut bytes = Zeroizing::new([0u8; 32]);
            getrandom::getrandom(bytes.as_mut()).map_err(|_| RecipientError::Random)?;
            if let Ok(secret) = SecretKey::from_slice(bytes.as_ref()) {
                return Ok(RecipientKey::from_secret(secret));
            }
        }
        Err(RecipientError::Random.into())
    }

    /// Loads a recipient key from a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`), for
    /// callers that keep a long-lived recipient key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<RecipientKey, ClientError> {
        use p256::pkcs8::DecodePrivateKey;
        let secret = SecretKey::from_pkcs8_pem(pem).map_err(|_| RecipientError::Pem)?;
        Ok(RecipientKey::from_secret(secret))
    }

    fn from_secret(secret: SecretKey) -> RecipientKey {
        let mut public_sec1 = [0u8; PUBLIC_KEY_LEN];
        public_sec1.copy_from_slice(secret.public_key().to_encoded_point(false).as_bytes());
        RecipientKey {
            secret,
            public_sec1,
        }
    }

    /// The public key an officer registers for the caller: SEC1 uncompressed, 65 bytes.
    pub fn public_key_sec1(&self) -> Vec<u8> {
        self.public_sec1.to_vec()
    }

    /// The public key as SubjectPublicKeyInfo PEM (`kmsctl caller recipient-key add --public-key`).
    pub fn public_key_pem(&self) -> Result<String, ClientError> {
        use p256::pkcs8::{EncodePublicKey, LineEnding};
        self.secret.public_key().to_public_key_pem(LineEnding::LF).map_err(|_| RecipientError::PublicKey.into())
    }

    /// The private key as PKCS#8 PEM, to keep in a 0600 file (it opens every data key sealed to it).
    pub fn private_key_pem(&self) -> Result<Zeroizing<String>, ClientError> {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        self.secret.to_pkcs8_pem(LineEnding::LF).map(|p| Zeroizing::new(p.to_string())).map_err(|_| RecipientError::Pem.into())
    }

    /// The fingerprint a request names this key by: SHA-256 of the uncompressed SEC1 point.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(self.public_sec1).into()
    }

    /// [`RecipientKey::fingerprint`] as lowercase hex.
    pub fn fingerprint_hex(&self) -> String {
        hex(&self.fingerprint())
    }

    /// Opens a data key sealed to this key and bound to `binding`. Fails on a wrong length or
    /// version, an invalid ephemeral point, or a failed integrity check (sealed to another key,
    /// bound to another key, version or context, or tampered with).
    pub fn open(&self, sealed: &[u8], binding: &SealBinding) -> Result<Zeroizing<[u8; DATA_KEY_LEN]>, ClientError> {
        if sealed.len() != SEALED_LEN {
            return Err(RecipientError::SealedLength {
                expected: SEALED_LEN,
                actual: sealed.len(),
            }
            .into());
        }
        if sealed[0] != FORMAT_VERSION {
            return Err(RecipientError::Version { found: sealed[0] }.into());
        }
        let (ephemeral_sec1, kwp) = sealed[1..].split_at(PUBLIC_KEY_LEN);
        // Only the uncompressed form is part of the format; from_sec1_bytes alone would also take
        // a compressed point of another length, so the tag is checked first.
        if ephemeral_sec1[0] != 0x04 {
            return Err(RecipientError::EphemeralKey.into());
        }
        let ephemeral =
            PublicKey::from_sec1_bytes(ephemeral_sec1).map_err(|_| RecipientError::EphemeralKey)?;
        let wrap_key =
            derive_wrap_key(&self.secret, &ephemeral, ephemeral_sec1, &self.public_sec1, binding)?;
        let kek = KekAes256::from(*wrap_key);
        let mut data_key = Zeroizing::new([0u8; DATA_KEY_LEN]);
        let len = kek
            .unwrap_with_padding(kwp, data_key.as_mut())
            .map_err(|_| RecipientError::Unwrap)?
            .len();
        if len != DATA_KEY_LEN {
            return Err(RecipientError::DataKeyLength { actual: len }.into());
        }
        Ok(data_key)
    }
}

impl fmt::Debug for RecipientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecipientKey")
            .field("public_key", &format_args!("{}", hex(&self.public_sec1)))
            .field("secret", &format_args!("<redacted>"))
            .finish()
    }
}

/// HKDF-SHA256 over the ECDH x-coordinate, salted with both public keys (ephemeral first).
fn derive_wrap_key(
    own_secret: &SecretKey,
    peer_public: &PublicKey,
    ephemeral_sec1: &[u8],
    recipient_sec1: &[u8],
    binding: &SealBinding,
) -> Result<Zeroizing<[u8; 32]>, RecipientError> {
    // SharedSecret zeroizes itself on drop.
    let shared =
        p256::ecdh::diffie_hellman(own_secret.to_nonzero_scalar(), peer_public.as_affine());
    let mut salt = [0u8; 2 * PUBLIC_KEY_LEN];
    salt[..PUBLIC_KEY_LEN].copy_from_slice(ephemeral_sec1);
    salt[PUBLIC_KEY_LEN..].copy_from_slice(recipient_sec1);
    let hkdf = Hkdf::<Sha256>::new(Some(&salt), shared.raw_secret_bytes());
    let mut wrap_key = Zeroizing::new([0u8; 32]);
    hkdf.expand(&binding.hkdf_info(), wrap_key.as_mut())
        .map_err(|_| RecipientError::Kdf)?;
    Ok(wrap_key)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seals `data_key` to a recipient public key the way the server does. Test-only: the server has
/// its own implementation, and a client never needs to seal.
#[cfg(test)]
pub fn seal_to_recipient(
    recipient_public_sec1: &[u8],
    data_key: &[u8; DATA_KEY_LEN],
    binding: &SealBinding,
) -> Result<Vec<u8>, ClientError> {
    if recipient_public_sec1.len() != PUBLIC_KEY_LEN || recipient_public_sec1[0] != 0x04 {
        return Err(RecipientError::PublicKey.into());
    }
    let recipient =
        PublicKey::from_sec1_bytes(recipient_public_sec1).map_err(|_| RecipientError::PublicKey)?;
    let ephemeral = RecipientKey::generate()?;
    let wrap_key = derive_wrap_key(
        &ephemeral.secret,
        &recipient,
        &ephemeral.public_sec1,
        recipient_public_sec1,
        binding,
    )?;
    let kwp = KekAes256::from(*wrap_key)
        .wrap_with_padding_vec(data_key)
        .map_err(|_| RecipientError::Unwrap)?;
    let mut sealed = vec![FORMAT_VERSION];
    sealed.extend_from_slice(&ephemeral.public_key_sec1());
    sealed.extend_from_slice(&kwp);
    Ok(sealed)
}

/// Seals with a given ephemeral secret: the published test vector is made this way. Test-only.
#[cfg(test)]
fn seal_with_ephemeral(
    recipient_public_sec1: &[u8],
    ephemeral: &RecipientKey,
    data_key: &[u8; DATA_KEY_LEN],
    binding: &SealBinding,
) -> Vec<u8> {
    let recipient = PublicKey::from_sec1_bytes(recipient_public_sec1).unwrap();
    let wrap_key = derive_wrap_key(&ephemeral.secret, &recipient, &ephemeral.public_sec1, recipient_public_sec1, binding).unwrap();
    let kwp = KekAes256::from(*wrap_key).wrap_with_padding_vec(data_key).unwrap();
    [vec![FORMAT_VERSION], ephemeral.public_key_sec1(), kwp].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of `docs/recipient-sealing.md`, read from the document itself, so that the
    /// specification a third party implements from and this code cannot drift apart.
    #[test]
    fn the_published_test_vector_holds() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/recipient-sealing.md")).unwrap();
        let field = |name: &str| -> Vec<u8> {
            let line = doc.lines().find_map(|l| l.trim().strip_prefix(&format!("{name}:"))).unwrap_or_else(|| panic!("{name} is in the document"));
            super::unhex(line.trim()).unwrap_or_else(|| panic!("{name} is hex"))
        };
        let recipient = RecipientKey::from_secret(SecretKey::from_slice(&field("recipient private scalar")).unwrap());
        let ephemeral = RecipientKey::from_secret(SecretKey::from_slice(&field("ephemeral private scalar")).unwrap());
        assert_eq!(recipient.public_key_sec1(), field("recipient public key"));
        assert_eq!(recipient.fingerprint().to_vec(), field("recipient key fingerprint"));
        let mut context = std::collections::BTreeMap::new();
        context.insert("case".to_owned(), "42".to_owned());
        context.insert("agency".to_owned(), "tax".to_owned());
        let digest = context_digest(&context).unwrap();
        assert_eq!(digest.to_vec(), field("context digest"));
        let binding = SealBinding { key_id: field("key id").try_into().unwrap(), key_version: 3, context_digest: digest };
        assert_eq!(binding.hkdf_info(), field("hkdf info"));
        let data_key: [u8; 32] = field("data key").try_into().unwrap();
        let shared = p256::ecdh::diffie_hellman(ephemeral.secret.to_nonzero_scalar(), recipient.secret.public_key().as_affine());
        assert_eq!(shared.raw_secret_bytes().to_vec(), field("shared x"));
        let wrap_key = derive_wrap_key(&recipient.secret, &ephemeral.secret.public_key(), &ephemeral.public_sec1, &recipient.public_sec1, &binding).unwrap();
        assert_eq!(wrap_key.to_vec(), field("wrap key"));
        let sealed = seal_with_ephemeral(&recipient.public_key_sec1(), &ephemeral, &data_key, &binding);
        assert_eq!(hex(&sealed), hex(&field("sealed")));
        assert_eq!(*recipient.open(&sealed, &binding).unwrap(), data_key);
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn b() -> SealBinding {
        SealBinding { key_id: [3; 16], key_version: 2, context_digest: [9; 32] }
    }

    fn recipient_error(err: ClientError) -> RecipientError {
        match err {
            ClientError::Recipient(e) => e,
            other => panic!("expected a recipient error, got {other}"),
        }
    }

    #[test]
    fn sealed_data_key_opens_with_its_recipient_key() {
        let recipient = RecipientKey::generate().unwrap();
        let data_key = [0x5au8; 32];
        let sealed = seal_to_recipient(&recipient.public_key_sec1(), &data_key, &b()).unwrap();
        assert_eq!(sealed.len(), SEALED_LEN);
        assert_eq!(SEALED_LEN, 106);
        // Bound to the key id, version and context digest.
        for change in 0..3 {
            let mut other = b();
            match change {
                0 => other.key_id[0] ^= 1,
                1 => other.key_version += 1,
                _ => other.context_digest[0] ^= 1,
            }
            assert_eq!(recipient_error(recipient.open(&sealed, &other).unwrap_err()), RecipientError::Unwrap);
        }
        assert_eq!(*recipient.open(&sealed, &b()).unwrap(), data_key);
        // A fresh ephemeral key per seal.
        assert_ne!(
            seal_to_recipient(&recipient.public_key_sec1(), &data_key, &b()).unwrap(),
            sealed
        );
    }

    #[test]
    fn public_key_is_65_byte_uncompressed_sec1() {
        let recipient = RecipientKey::generate().unwrap();
        let public = recipient.public_key_sec1();
        assert_eq!(public.len(), 65);
        assert_eq!(public[0], 0x04);
        assert!(PublicKey::from_sec1_bytes(&public).is_ok());
    }

    #[test]
    fn every_tampered_byte_is_refused() {
        let recipient = RecipientKey::generate().unwrap();
        let sealed = seal_to_recipient(&recipient.public_key_sec1(), &[7u8; 32], &b()).unwrap();
        for i in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 0x01;
            let err = recipient_error(recipient.open(&tampered, &b()).unwrap_err());
            assert!(
                matches!(err, RecipientError::Unwrap | RecipientError::EphemeralKey | RecipientError::Version { .. }),
                "byte {i}: {err:?}"
            );
        }
    }

    #[test]
    fn data_key_sealed_to_another_recipient_is_refused() {
        let recipient = RecipientKey::generate().unwrap();
        let other = RecipientKey::generate().unwrap();
        let sealed = seal_to_recipient(&other.public_key_sec1(), &[1u8; 32], &b()).unwrap();
        assert_eq!(
            recipient_error(recipient.open(&sealed, &b()).unwrap_err()),
            RecipientError::Unwrap
        );
    }

    #[test]
    fn wrong_length_and_bad_point_are_refused_clearly() {
        let recipient = RecipientKey::generate().unwrap();
        let sealed = seal_to_recipient(&recipient.public_key_sec1(), &[1u8; 32], &b()).unwrap();
        assert_eq!(
            recipient_error(recipient.open(&sealed[..105], &b()).unwrap_err()),
            RecipientError::SealedLength {
                expected: 106,
                actual: 105
            }
        );
        assert_eq!(
            recipient_error(recipient.open(&[], &b()).unwrap_err()),
            RecipientError::SealedLength {
                expected: 106,
                actual: 0
            }
        );
        let mut old_version = sealed.clone();
        old_version[0] = 1;
        assert_eq!(recipient_error(recipient.open(&old_version, &b()).unwrap_err()), RecipientError::Version { found: 1 });
        let mut compressed_tag = sealed.clone();
        compressed_tag[1] = 0x02;
        assert_eq!(
            recipient_error(recipient.open(&compressed_tag, &b()).unwrap_err()),
            RecipientError::EphemeralKey
        );
        let mut off_curve = sealed.clone();
        off_curve[65] ^= 0x01;
        assert_eq!(
            recipient_error(recipient.open(&off_curve, &b()).unwrap_err()),
            RecipientError::EphemeralKey
        );
        assert_eq!(
            recipient_error(seal_to_recipient(&[4u8; 10], &[0u8; 32], &b()).unwrap_err()),
            RecipientError::PublicKey
        );
    }

    #[test]
    fn debug_never_shows_the_secret_key() {
        let recipient = RecipientKey::generate().unwrap();
        let secret_hex = hex(&recipient.secret.to_bytes());
        let debug = format!("{recipient:?}");
        assert!(debug.contains("<redacted>"));
        assert!(!debug.contains(&secret_hex));
    }

    #[test]
    fn pkcs8_pem_round_trips() {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let recipient = RecipientKey::generate().unwrap();
        let pem = recipient.secret.to_pkcs8_pem(LineEnding::LF).unwrap();
        let loaded = RecipientKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(loaded.public_key_sec1(), recipient.public_key_sec1());
        assert_eq!(
            recipient_error(RecipientKey::from_pkcs8_pem("nope").unwrap_err()),
            RecipientError::Pem
        );
    }

    /// RFC 5649 section 6: key wrap with padding, 192-bit KEK, 20-byte and 7-byte keys.
    #[test]
    fn aes_key_wrap_with_padding_matches_rfc5649_vectors() {
        let kek = aes_kw::KekAes192::from(
            <[u8; 24]>::try_from(unhex("5840df6e29b02af1 ab493b705bf16ea1 ae8338f4dcc176a8"))
                .unwrap(),
        );
        let cases = [
            (
                "c37b7e6492584340 bed1220780894115 5068f738",
                "138bdeaa9b8fa7fc 61f97742e72248ee 5ae6ae5360d1ae6a 5f54f373fa543b6a",
            ),
            ("466f7250617369", "afbeb0f07dfbf541 9200f2ccb50bb24f"),
        ];
        for (key, wrapped) in cases {
            let (key, wrapped) = (unhex(key), unhex(wrapped));
            assert_eq!(kek.wrap_with_padding_vec(&key).unwrap(), wrapped);
            assert_eq!(kek.unwrap_with_padding_vec(&wrapped).unwrap(), key);
            let mut tampered = wrapped.clone();
            tampered[0] ^= 1;
            assert!(kek.unwrap_with_padding_vec(&tampered).is_err());
        }
    }

    /// RFC 5869 appendix A.1, test case 1 (HKDF-SHA256).
    #[test]
    fn hkdf_sha256_matches_rfc5869_test_case_1() {
        let ikm = unhex("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
        let salt = unhex("000102030405060708090a0b0c");
        let info = unhex("f0f1f2f3f4f5f6f7f8f9");
        let (prk, hkdf) = Hkdf::<Sha256>::extract(Some(&salt), &ikm);
        assert_eq!(
            prk.to_vec(),
            unhex("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
        );
        let mut okm = [0u8; 42];
        hkdf.expand(&info, &mut okm).unwrap();
        assert_eq!(
            okm.to_vec(),
            unhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
        );
    }
}
