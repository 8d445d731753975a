//! The `CKA_LABEL` of a key-version object: the service's mark, a name a person can read in
//! `pkcs11-tool`, and an adoption record sealed by the HSM, so that an object whose row was lost
//! (a store restored from an older backup, a store moved aside) can be brought back with its name,
//! version, level and purpose, and nothing else can be passed off as one of ours.
//!
//! ```text
//! kms:<key name>:v<version> <LEVEL> <PURPOSE> <created unix seconds> <mac>
//! kms:citizens/records:v2 PERSONAL ENVELOPE 1764892800 6f1c0e2a…(64 hex digits)
//! ```
//!
//! `<mac>` is the HMAC-SHA256 (64 hex digits) the HSM computes with the token's blob-binding key
//! over [`AdoptionRecord::mac_input`], and checks again inside the HSM before an adoption; the `CKA_ID` (key id ‖ version)
//! is part of that input, so a label copied onto another object does not verify. The service's
//! marks are the `kms:` prefix of the label and a 20-byte `CKA_ID`; an object without both is
//! another application's, and the service never touches it. Objects made before adoption records
//! existed carry only `kms:<name>:v<version>` ([`ParsedLabel::Legacy`]): they are recognised as the
//! service's, but cannot be adopted.
//!
//! Pure format code: no HSM, no store. Must never parse a label into anything but a candidate that
//! the HSM still has to vouch for.
#![forbid(unsafe_code)]

use crate::classification::Classification;
use crate::ids::{hex, unhex, KeyId, KeyPurpose, ObjectId};

/// The prefix every label of a service key-version object starts with.
pub const LABEL_PREFIX: &str = "kms:";
/// First byte of the MAC input: distinct from the key-row (1), approval (0xA1), caller (0xC1),
/// intent (0x1E) and anchor (0xAA) encodings that the same HSM key authenticates.
const ADOPTION_ENCODING: u8 = 0x0B;
/// Bytes of the HMAC kept in the label (all of it: the HSM checks it with `C_Verify`).
pub const LABEL_MAC_LEN: usize = 32;

/// What an object's label says about the key version it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptionRecord {
    pub key_id: KeyId,
    pub version: u32,
    pub name: String,
    pub level: Classification,
    pub purpose: KeyPurpose,
    /// Unix seconds.
    pub created_at: i64,
}

impl AdoptionRecord {
    /// The object's `CKA_ID`.
    pub fn object_id(&self) -> ObjectId {
        ObjectId::for_version(self.key_id, self.version)
    }

    /// What the HSM MACs (with the key-metadata domain tag in front, see `hsm::binding`).
    pub fn mac_input(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.name.len());
        v.push(ADOPTION_ENCODING);
        v.extend_from_slice(&self.key_id.0);
        v.extend_from_slice(&self.version.to_be_bytes());
        v.push(self.level.to_byte());
        v.extend_from_slice(self.purpose.as_str().as_bytes());
        v.push(0);
        v.extend_from_slice(&self.created_at.to_be_bytes());
        v.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        v.extend_from_slice(self.name.as_bytes());
        v
    }

    /// The label, given the HSM's MAC over [`AdoptionRecord::mac_input`].
    pub fn label(&self, mac: &[u8; LABEL_MAC_LEN]) -> String {
        format!(
            "{LABEL_PREFIX}{}:v{} {} {} {} {}",
            self.name,
            self.version,
            self.level.as_str(),
            self.purpose.as_str(),
            self.created_at,
            hex(mac)
        )
    }
}

/// A label read from the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParsedLabel {
    /// A full adoption record and the MAC the label carries (still to be checked by the HSM).
    Adoptable { record: AdoptionRecord, mac: [u8; LABEL_MAC_LEN] },
    /// `kms:<name>:v<version>`, made before adoption records: the service's, not adoptable.
    Legacy { name: String, version: u32 },
}

/// Why a label is not one of the service's well-formed labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("the label does not start with {LABEL_PREFIX:?}")]
    NotOurs,
    #[error("the CKA_ID is not 20 bytes (key id and version)")]
    IdShape,
    #[error("the label is malformed")]
    Malformed,
    #[error("the label's version is not the one in the CKA_ID")]
    VersionMismatch,
}

/// Whether an object carries the service's marks: a `kms:` label and a 20-byte `CKA_ID`.
pub fn is_service_object(id: &[u8], label: &[u8]) -> bool {
    id.len() == 20 && label.starts_with(LABEL_PREFIX.as_bytes())
}

/// Parses the label of the object with `CKA_ID` `id`.
pub fn parse(id: &[u8], label: &str) -> Result<ParsedLabel, LabelError> {
    let rest = label.strip_prefix(LABEL_PREFIX).ok_or(LabelError::NotOurs)?;
    if id.len() != 20 {
        return Err(LabelError::IdShape);
    }
    let key_id = KeyId(id[..16].try_into().map_err(|_| LabelError::IdShape)?);
    let id_version = u32::from_be_bytes(id[16..].try_into().map_err(|_| LabelError::IdShape)?);
    let mut fields = rest.split(' ');
    let head = fields.next().ok_or(LabelError::Malformed)?;
    let (name, version) = head.rsplit_once(":v").ok_or(LabelError::Malformed)?;
    let version: u32 = version.parse().map_err(|_| LabelError::Malformed)?;
    if crate::service::validate_key_name(name).is_err() || version == 0 {
        return Err(LabelError::Malformed);
    }
    if version != id_version {
        return Err(LabelError::VersionMismatch);
    }
    let tail: Vec<&str> = fields.collect();
    if tail.is_empty() {
        return Ok(ParsedLabel::Legacy { name: name.to_owned(), version });
    }
    let [level, purpose, created, mac] = tail.as_slice() else { return Err(LabelError::Malformed) };
    let level = Classification::ALL.into_iter().find(|c| c.as_str() == *level).ok_or(LabelError::Malformed)?;
    let purpose = KeyPurpose::parse(purpose).ok_or(LabelError::Malformed)?;
    let created_at: i64 = created.parse().map_err(|_| LabelError::Malformed)?;
    let mac: [u8; LABEL_MAC_LEN] = unhex(mac).and_then(|m| m.try_into().ok()).ok_or(LabelError::Malformed)?;
    let record = AdoptionRecord { key_id, version, name: name.to_owned(), level, purpose, created_at };
    Ok(ParsedLabel::Adoptable { record, mac })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AdoptionRecord {
        AdoptionRecord {
            key_id: KeyId([7; 16]),
            version: 3,
            name: "citizens/records".into(),
            level: Classification::Personal,
            purpose: KeyPurpose::Envelope,
            created_at: 1_764_892_800,
        }
    }

    #[test]
    fn a_label_round_trips_and_names_the_key_for_people() {
        let r = record();
        let mut mac = [0u8; LABEL_MAC_LEN];
        mac[0] = 0xab;
        let label = r.label(&mac);
        assert_eq!(label, format!("kms:citizens/records:v3 PERSONAL ENVELOPE 1764892800 ab{}", "0".repeat(62)));
        assert_eq!(parse(r.object_id().as_bytes(), &label), Ok(ParsedLabel::Adoptable { record: r, mac }));
    }

    #[test]
    fn legacy_labels_are_ours_but_not_adoptable() {
        let id = ObjectId::for_version(KeyId([1; 16]), 2);
        assert_eq!(parse(id.as_bytes(), "kms:tax:v2"), Ok(ParsedLabel::Legacy { name: "tax".into(), version: 2 }));
    }

    #[test]
    fn foreign_and_malformed_labels_are_refused() {
        let id = ObjectId::for_version(KeyId([1; 16]), 2);
        assert_eq!(parse(id.as_bytes(), "other-app key"), Err(LabelError::NotOurs));
        assert_eq!(parse(&[1, 2, 3], "kms:tax:v2"), Err(LabelError::IdShape));
        assert_eq!(parse(id.as_bytes(), "kms:tax:v3"), Err(LabelError::VersionMismatch));
        for bad in [
            "kms:tax",
            "kms:tax:v0",
            "kms:ta x:v2",
            "kms:tax:v2 PERSONAL",
            "kms:tax:v2 SECRETISH ENVELOPE 1 0000000000000000000000000000000000000000000000000000000000000000",
            "kms:tax:v2 PERSONAL SIGN 1 0000000000000000000000000000000000000000000000000000000000000000",
            "kms:tax:v2 PERSONAL ENVELOPE x 0000000000000000000000000000000000000000000000000000000000000000",
            "kms:tax:v2 PERSONAL ENVELOPE 1 0000",
            "kms:tax:v2 PERSONAL ENVELOPE 1 0000000000000000000000000000000000000000000000000000000000000000 extra",
        ] {
            assert_eq!(parse(id.as_bytes(), bad), Err(LabelError::Malformed), "{bad}");
        }
        assert!(is_service_object(id.as_bytes(), b"kms:tax:v2"));
        assert!(!is_service_object(id.as_bytes(), b"tax"));
        assert!(!is_service_object(b"kms/blob-binding/v1", b"kms:x:v1"));
    }

    #[test]
    fn the_mac_input_binds_every_field() {
        let base = record().mac_input();
        let mut variants = Vec::new();
        for f in 0..6 {
            let mut r = record();
            match f {
                0 => r.key_id = KeyId([8; 16]),
                1 => r.version = 4,
                2 => r.name = "citizens/record".into(),
                3 => r.level = Classification::Secret,
                4 => r.purpose = KeyPurpose::HsmEncrypt,
                _ => r.created_at += 1,
            }
            variants.push(r.mac_input());
        }
        for v in variants {
            assert_ne!(v, base);
        }
    }
}
