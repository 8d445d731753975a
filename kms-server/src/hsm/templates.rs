//! Attribute templates for every object the service creates or unwraps.
//!
//! SoftHSM's defaults are permissive (a key made with only `CKA_VALUE_LEN` is not sensitive and may
//! encrypt, wrap, sign, be copied and be modified), so every template here states every security
//! attribute. Must never produce a template that makes a token key extractable or readable.

use cryptoki::object::{Attribute, KeyType, ObjectClass};

use crate::ids::{KeyPurpose, ObjectId};

/// `CKA_ID` of the per-token blob-binding MAC key.
pub(crate) const BINDING_KEY_ID: &[u8] = b"kms/blob-binding/v1";
pub(crate) const BINDING_KEY_LABEL: &str = "kms blob-binding MAC v1";
/// AES-256 and HMAC-SHA256 key length.
pub(crate) const KEY_LEN: u64 = 32;

/// A key-encryption key (Envelope: wrap/unwrap) or payload key (HsmEncrypt: encrypt/decrypt), as a
/// sensitive, non-extractable token object. It may be copied into a session object (which keeps
/// those attributes: neither can be undone), and so must be modifiable; nothing in the service ever
/// calls `C_SetAttributeValue`.
pub(crate) fn token_key(id: &ObjectId, label: &str, purpose: KeyPurpose) -> Vec<Attribute> {
    let (wrap, crypt) = match purpose {
        KeyPurpose::Envelope => (true, false),
        KeyPurpose::HsmEncrypt => (false, true),
    };
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(KEY_LEN.into()),
        Attribute::Id(id.as_bytes().to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        // Copyable, and so modifiable (SoftHSM refuses CKA_TOKEN=false in a copy of a
        // non-modifiable object): requests work with a session copy; see `handles`.
        Attribute::Modifiable(true),
        Attribute::Copyable(true),
        Attribute::Derive(false),
        Attribute::Wrap(wrap),
        Attribute::Unwrap(wrap),
        Attribute::Encrypt(crypt),
        Attribute::Decrypt(crypt),
        Attribute::Sign(false),
        Attribute::Verify(false),
    ]
}

/// The blob-binding HMAC-SHA256 key: a generic secret that can only sign and verify (copyable into
/// a session object, as [`token_key`]).
pub(crate) fn binding_key() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(KEY_LEN.into()),
        Attribute::Id(BINDING_KEY_ID.to_vec()),
        Attribute::Label(BINDING_KEY_LABEL.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(true),
        Attribute::Copyable(true),
        Attribute::Derive(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
    ]
}

/// A fresh data key: a session object, extractable so that it can be wrapped; sensitive unless its
/// value is to be read for the caller. It can do nothing itself.
pub(crate) fn session_data_key(readable: bool) -> [Attribute; 15] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(KEY_LEN.into()),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(!readable),
        Attribute::Extractable(true),
        Attribute::Copyable(false),
        Attribute::Derive(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
    ]
}

/// An unwrapped data key: a readable session object (its value goes back to the caller), which is
/// destroyed as soon as it has been read.
pub(crate) fn unwrapped_data_key() -> [Attribute; 14] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::Copyable(false),
        Attribute::Derive(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
    ]
}

/// A data key unwrapped only to be wrapped again (re-wrap): a session object that is sensitive, so
/// its value can never be read, and extractable only so that `C_WrapKey` can take it. It can do
/// nothing itself and is destroyed in the same worker job. (No `CKA_MODIFIABLE=false`: SoftHSM 2.6.1
/// refuses it in `C_UnwrapKey` with `CKR_ATTRIBUTE_READ_ONLY`; a sensitive key cannot be made
/// non-sensitive anyway.)
pub(crate) fn rewrapped_data_key() -> [Attribute; 14] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Copyable(false),
        Attribute::Derive(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
    ]
}

/// Finds the token object with this `CKA_ID` (any class).
pub(crate) fn find_by_id(id: &[u8]) -> [Attribute; 2] {
    [Attribute::Token(true), Attribute::Id(id.to_vec())]
}

/// `CKA_ID`s of the audit checkpoint signing key pair (ECDSA P-256). Two ids, not one shared as
/// PKCS#11 allows, so that a find by id is never ambiguous.
pub(crate) const AUDIT_SIGNING_KEY_ID: &[u8] = b"kms/audit-signing/v1";
pub(crate) const AUDIT_PUBLIC_KEY_ID: &[u8] = b"kms/audit-signing/v1.pub";
const AUDIT_KEY_LABEL: &str = "kms audit checkpoint signing v1";
/// DER of the OID prime256v1 (1.2.840.10045.3.1.7), the `CKA_EC_PARAMS` of P-256.
pub(crate) const P256_EC_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The audit signing key's public half: a token object that can only verify.
pub(crate) fn audit_public_key() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::EcParams(P256_EC_PARAMS.to_vec()),
        Attribute::Id(AUDIT_PUBLIC_KEY_ID.to_vec()),
        Attribute::Label(AUDIT_KEY_LABEL.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Modifiable(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
    ]
}

/// The audit signing key's private half: sensitive, non-extractable, and able only to sign.
pub(crate) fn audit_private_key() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Id(AUDIT_SIGNING_KEY_ID.to_vec()),
        Attribute::Label(AUDIT_KEY_LABEL.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Copyable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrapped_data_key_is_an_unreadable_session_object() {
        let t = rewrapped_data_key();
        for wanted in [
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Extractable(true),
            Attribute::Copyable(false),
            Attribute::Wrap(false),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
        ] {
            assert!(t.contains(&wanted), "missing {wanted:?}");
        }
    }
}
