//! Classification levels and the rules each level carries (the level table: README, "What each level allows").
//!
//! `Classification` is an ordered enum: `a < b` means `b` is more protected. The per-level numbers
//! (minimum caller system level, rotation period, two-officer rule) are configurable defaults held in
//! [`LevelRules`]; whether a level may release a data key in plaintext is not configurable and lives
//! only in [`Classification::data_key_release`].
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use kms_proto::v1 as pb;

/// A classification level. The discriminant is the byte stored in blobs and in the database; it must
/// never be renumbered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Classification {
    Unclassified = 1,
    Personal = 2,
    SensitivePersonal = 3,
    /// State secret, "Mật".
    Confidential = 4,
    /// State secret, "Tối mật".
    Secret = 5,
    /// State secret, "Tuyệt mật".
    TopSecret = 6,
}

/// How a level allows a data key to leave the service. Fixed by law, not by configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataKeyRelease {
    /// The plaintext data key may be returned to the caller.
    Plaintext,
    /// Only sealed to the caller's public key, so that the plaintext never crosses the network.
    SealedToRecipientOnly,
    /// Never: data of this level is encrypted inside the HSM.
    Never,
}

impl Classification {
    pub const ALL: [Classification; 6] = [
        Classification::Unclassified,
        Classification::Personal,
        Classification::SensitivePersonal,
        Classification::Confidential,
        Classification::Secret,
        Classification::TopSecret,
    ];

    /// The name used in configuration files, the CLI and error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Unclassified => "UNCLASSIFIED",
            Classification::Personal => "PERSONAL",
            Classification::SensitivePersonal => "SENSITIVE_PERSONAL",
            Classification::Confidential => "CONFIDENTIAL",
            Classification::Secret => "SECRET",
            Classification::TopSecret => "TOP_SECRET",
        }
    }

    pub fn to_byte(self) -> u8 {
        self as u8
    }

    pub fn from_byte(b: u8) -> Option<Classification> {
        Classification::ALL.into_iter().find(|c| c.to_byte() == b)
    }

    /// State-secret levels (CONFIDENTIAL and above).
    pub fn is_state_secret(self) -> bool {
        self >= Classification::Confidential
    }

    /// Whether and how a data key of this level may leave the service. Not configurable.
    pub fn data_key_release(self) -> DataKeyRelease {
        match self {
            Classification::Unclassified | Classification::Personal => DataKeyRelease::Plaintext,
            Classification::SensitivePersonal => DataKeyRelease::SealedToRecipientOnly,
            Classification::Confidential | Classification::Secret | Classification::TopSecret => {
                DataKeyRelease::Never
            }
        }
    }

    pub fn from_proto(value: i32) -> Option<Classification> {
        match pb::Classification::try_from(value).ok()? {
            pb::Classification::Unspecified => None,
            pb::Classification::Unclassified => Some(Classification::Unclassified),
            pb::Classification::Personal => Some(Classification::Personal),
            pb::Classification::SensitivePersonal => Some(Classification::SensitivePersonal),
            pb::Classification::Confidential => Some(Classification::Confidential),
            pb::Classification::Secret => Some(Classification::Secret),
            pb::Classification::TopSecret => Some(Classification::TopSecret),
        }
    }

    pub fn to_proto(self) -> pb::Classification {
        match self {
            Classification::Unclassified => pb::Classification::Unclassified,
            Classification::Personal => pb::Classification::Personal,
            Classification::SensitivePersonal => pb::Classification::SensitivePersonal,
            Classification::Confidential => pb::Classification::Confidential,
            Classification::Secret => pb::Classification::Secret,
            Classification::TopSecret => pb::Classification::TopSecret,
        }
    }
}

impl fmt::Display for Classification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown classification {0:?}: expected one of UNCLASSIFIED, PERSONAL, SENSITIVE_PERSONAL, CONFIDENTIAL, SECRET, TOP_SECRET")]
pub struct UnknownClassification(pub String);

impl FromStr for Classification {
    type Err = UnknownClassification;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_uppercase().replace('-', "_");
        Classification::ALL
            .into_iter()
            .find(|c| c.as_str() == norm)
            .ok_or_else(|| UnknownClassification(s.to_owned()))
    }
}

impl serde::Serialize for Classification {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Classification {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The configurable numbers of one level (the level table gives the defaults).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelRule {
    /// The lowest approved system security level (Decree 85/2016, 1-5) a caller needs to use the level.
    pub min_system_level: u8,
    /// Default rotation period in days.
    pub rotation_days: u32,
    /// Destroy and disable need a second officer's approval.
    pub two_officer_destroy: bool,
    /// Rotation needs a second officer's approval.
    pub two_officer_rotate: bool,
}

/// The rules of every level. Built from the level table's defaults, then overridden by configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LevelRules {
    rules: [LevelRule; 6],
}

impl Default for LevelRules {
    fn default() -> Self {
        let rule = |min_system_level, rotation_days, two_destroy, two_rotate| LevelRule {
            min_system_level,
            rotation_days,
            two_officer_destroy: two_destroy,
            two_officer_rotate: two_rotate,
        };
        LevelRules {
            rules: [
                rule(1, 365, false, false),
                rule(2, 365, false, false),
                rule(3, 180, true, false),
                rule(3, 180, true, false),
                rule(4, 90, true, false),
                rule(5, 90, true, true),
            ],
        }
    }
}

impl LevelRules {
    pub fn get(&self, level: Classification) -> &LevelRule {
        &self.rules[usize::from(level.to_byte() - 1)]
    }

    pub fn set(&mut self, level: Classification, rule: LevelRule) {
        self.rules[usize::from(level.to_byte() - 1)] = rule;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_by_protection() {
        for pair in Classification::ALL.windows(2) {
            assert!(pair[0] < pair[1], "{} must be below {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn byte_and_name_round_trip() {
        for c in Classification::ALL {
            assert_eq!(Classification::from_byte(c.to_byte()), Some(c));
            assert_eq!(c.as_str().parse::<Classification>(), Ok(c));
            assert_eq!(Classification::from_proto(c.to_proto() as i32), Some(c));
        }
        assert_eq!(Classification::from_byte(0), None);
        assert_eq!(Classification::from_byte(7), None);
        assert_eq!(Classification::from_proto(0), None);
        assert_eq!(Classification::from_proto(99), None);
        assert_eq!("secret".parse::<Classification>(), Ok(Classification::Secret));
        assert_eq!("top-secret".parse::<Classification>(), Ok(Classification::TopSecret));
        assert!("MAT".parse::<Classification>().is_err());
    }

    #[test]
    fn only_low_levels_release_plaintext() {
        use DataKeyRelease::*;
        let got: Vec<_> = Classification::ALL.iter().map(|c| c.data_key_release()).collect();
        assert_eq!(
            got,
            [Plaintext, Plaintext, SealedToRecipientOnly, Never, Never, Never]
        );
    }

    #[test]
    fn defaults_follow_the_spec_table() {
        let r = LevelRules::default();
        let mins: Vec<u8> = Classification::ALL.iter().map(|c| r.get(*c).min_system_level).collect();
        assert_eq!(mins, [1, 2, 3, 3, 4, 5]);
        let days: Vec<u32> = Classification::ALL.iter().map(|c| r.get(*c).rotation_days).collect();
        assert_eq!(days, [365, 365, 180, 180, 90, 90]);
        assert!(r.get(Classification::TopSecret).two_officer_rotate);
        assert!(!r.get(Classification::Secret).two_officer_rotate);
        assert!(!r.get(Classification::Personal).two_officer_destroy);
        assert!(r.get(Classification::SensitivePersonal).two_officer_destroy);
    }
}
