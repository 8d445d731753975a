//! Human names for the proto enums: parsing what users type (`top-secret`, `Personal`,
//! `hsm-encrypt`) and printing the canonical proto names (`TOP_SECRET`, `HSM_ENCRYPT`).
//!
//! Parsing is strict: the `*_UNSPECIFIED` values are never accepted from a user, so a parsed value
//! is always a real level or purpose.
#![forbid(unsafe_code)]

use kms_proto::v1::{ApprovalAction, ApprovalState, Classification, KeyPurpose, KeyState};

/// A name that is not one of the accepted values; the message lists them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {given:?}; expected one of: {expected}")]
pub struct UnknownName {
    pub kind: &'static str,
    pub given: String,
    pub expected: &'static str,
}

/// The accepted level names, in order.
pub const LEVEL_NAMES: &str =
    "UNCLASSIFIED, PERSONAL, SENSITIVE_PERSONAL, CONFIDENTIAL, SECRET, TOP_SECRET";

/// Parses a classification level, ignoring case and accepting '-' for '_'.
pub fn parse_classification(name: &str) -> Result<Classification, UnknownName> {
    match Classification::from_str_name(&normalise(name)) {
        Some(Classification::Unspecified) | None => Err(UnknownName {
            kind: "classification level",
            given: name.to_owned(),
            expected: LEVEL_NAMES,
        }),
        Some(level) => Ok(level),
    }
}

/// Parses a key purpose (`envelope`, `hsm-encrypt`), ignoring case and accepting '-' for '_'.
pub fn parse_purpose(name: &str) -> Result<KeyPurpose, UnknownName> {
    match KeyPurpose::from_str_name(&normalise(name)) {
        Some(KeyPurpose::Unspecified) | None => Err(UnknownName {
            kind: "key purpose",
            given: name.to_owned(),
            expected: "envelope, hsm-encrypt",
        }),
        Some(purpose) => Ok(purpose),
    }
}

fn normalise(name: &str) -> String {
    name.trim().replace('-', "_").to_ascii_uppercase()
}

/// The proto name of a classification held as its wire value, or `UNKNOWN(n)` for a value this
/// client does not know (a newer server).
pub fn classification_name(value: i32) -> String {
    enum_name(
        Classification::try_from(value)
            .ok()
            .map(|c| c.as_str_name()),
        value,
    )
}

/// The proto name of a key purpose held as its wire value.
pub fn purpose_name(value: i32) -> String {
    enum_name(
        KeyPurpose::try_from(value).ok().map(|p| p.as_str_name()),
        value,
    )
}

/// The proto name of a key state held as its wire value.
pub fn key_state_name(value: i32) -> String {
    enum_name(
        KeyState::try_from(value).ok().map(|s| s.as_str_name()),
        value,
    )
}

/// The proto name of an approval request's action held as its wire value.
pub fn approval_action_name(value: i32) -> String {
    enum_name(
        ApprovalAction::try_from(value)
            .ok()
            .map(|a| a.as_str_name()),
        value,
    )
}

/// The proto name of an approval request's state held as its wire value.
pub fn approval_state_name(value: i32) -> String {
    enum_name(
        ApprovalState::try_from(value).ok().map(|s| s.as_str_name()),
        value,
    )
}

fn enum_name(name: Option<&'static str>, value: i32) -> String {
    match name {
        Some(name) => name.to_owned(),
        None => format!("UNKNOWN({value})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_case_insensitively_with_dashes_or_underscores() {
        assert_eq!(
            parse_classification("top-secret"),
            Ok(Classification::TopSecret)
        );
        assert_eq!(
            parse_classification("TOP_SECRET"),
            Ok(Classification::TopSecret)
        );
        assert_eq!(
            parse_classification("Sensitive-Personal"),
            Ok(Classification::SensitivePersonal)
        );
        assert_eq!(
            parse_classification("unclassified"),
            Ok(Classification::Unclassified)
        );
        assert_eq!(
            parse_classification("personal"),
            Ok(Classification::Personal)
        );
        assert_eq!(
            parse_classification("confidential"),
            Ok(Classification::Confidential)
        );
        assert_eq!(parse_classification("Secret"), Ok(Classification::Secret));
    }

    #[test]
    fn unknown_and_unspecified_levels_are_refused() {
        for bad in [
            "",
            "topsecret",
            "CLASSIFICATION_UNSPECIFIED",
            "5",
            "secret!",
        ] {
            let err = parse_classification(bad).unwrap_err();
            assert!(err.to_string().contains("TOP_SECRET"), "{err}");
        }
    }

    #[test]
    fn purposes_parse() {
        assert_eq!(parse_purpose("envelope"), Ok(KeyPurpose::Envelope));
        assert_eq!(parse_purpose("hsm-encrypt"), Ok(KeyPurpose::HsmEncrypt));
        assert_eq!(parse_purpose("HSM_ENCRYPT"), Ok(KeyPurpose::HsmEncrypt));
        assert!(parse_purpose("KEY_PURPOSE_UNSPECIFIED").is_err());
        assert!(parse_purpose("signing").is_err());
    }

    #[test]
    fn wire_values_print_as_proto_names() {
        assert_eq!(classification_name(6), "TOP_SECRET");
        assert_eq!(classification_name(42), "UNKNOWN(42)");
        assert_eq!(purpose_name(2), "HSM_ENCRYPT");
        assert_eq!(key_state_name(3), "PENDING_DESTRUCTION");
        assert_eq!(approval_action_name(5), "DESTROY_VERSION");
        assert_eq!(approval_state_name(1), "PENDING");
        assert_eq!(approval_state_name(9), "UNKNOWN(9)");
    }
}
