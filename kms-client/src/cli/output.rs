//! What `kmsctl` prints: aligned text tables for people and one JSON document for scripts.
//!
//! JSON fields are named like the proto fields (snake_case), enums appear as their proto names and
//! bytes as standard base64. Data keys are rendered only when the command was asked for them; the
//! callers decide that, this module never adds a secret on its own.
#![forbid(unsafe_code)]

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use kms_client::names::{classification_name, key_state_name, purpose_name};
use kms_client::proto::Key;
use serde_json::{json, Map, Value};

/// A text table: columns padded to their widest cell, two spaces apart, no trailing spaces.
#[derive(Debug, Default)]
pub struct Table {
    headers: Option<Vec<String>>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with a header line.
    pub fn with_headers(headers: &[&str]) -> Table {
        Table {
            headers: Some(headers.iter().map(|h| (*h).to_owned()).collect()),
            rows: Vec::new(),
        }
    }

    /// A two-column `field  value` table without a header.
    pub fn fields() -> Table {
        Table::default()
    }

    pub fn row(&mut self, cells: Vec<String>) -> &mut Table {
        self.rows.push(cells);
        self
    }

    pub fn render(&self) -> String {
        let lines: Vec<&Vec<String>> = self.headers.iter().chain(self.rows.iter()).collect();
        let columns = lines.iter().map(|l| l.len()).max().unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for line in &lines {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in lines {
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                text.extend(std::iter::repeat_n(' ', widths[i] - cell.chars().count()));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

pub fn base64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// One key as JSON, fields named like the proto message.
pub fn key_json(key: &Key) -> Value {
    json!({
        "id": key.id,
        "name": key.name,
        "classification": classification_name(key.classification),
        "purpose": purpose_name(key.purpose),
        "state": key_state_name(key.state),
        "primary_version": key.primary_version,
        "versions": key.versions.iter().map(|v| json!({
            "version": v.version,
            "state": key_state_name(v.state),
            "created_at_unix": v.created_at_unix,
        })).collect::<Vec<_>>(),
        "created_at_unix": key.created_at_unix,
        "rotation_period_days": key.rotation_period_days,
    })
}

/// `key list` as JSON: `{"keys": [...]}` like `ListKeysResponse`.
pub fn key_list_json(keys: &[Key]) -> Value {
    json!({ "keys": keys.iter().map(key_json).collect::<Vec<_>>() })
}

/// `key list` as a table, one key per line.
pub fn key_list_table(keys: &[Key]) -> String {
    let mut table = Table::with_headers(&[
        "NAME", "LEVEL", "PURPOSE", "STATE", "PRIMARY", "ROTATION", "ID",
    ]);
    for key in keys {
        table.row(vec![
            key.name.clone(),
            classification_name(key.classification),
            purpose_name(key.purpose),
            key_state_name(key.state),
            key.primary_version.to_string(),
            rotation_text(key.rotation_period_days),
            key.id.clone(),
        ]);
    }
    table.render()
}

/// `key get`/`key create` as a table: the fields, then the versions.
pub fn key_table(key: &Key) -> String {
    let mut fields = Table::fields();
    fields
        .row(vec!["name".into(), key.name.clone()])
        .row(vec!["id".into(), key.id.clone()])
        .row(vec![
            "classification".into(),
            classification_name(key.classification),
        ])
        .row(vec!["purpose".into(), purpose_name(key.purpose)])
        .row(vec!["state".into(), key_state_name(key.state)])
        .row(vec![
            "primary_version".into(),
            key.primary_version.to_string(),
        ])
        .row(vec![
            "rotation_period".into(),
            rotation_text(key.rotation_period_days),
        ])
        .row(vec![
            "created_at".into(),
            utc_timestamp(key.created_at_unix),
        ]);
    let mut versions = Table::with_headers(&["VERSION", "STATE", "CREATED"]);
    for v in &key.versions {
        let marker = if v.version == key.primary_version {
            " (primary)"
        } else {
            ""
        };
        versions.row(vec![
            format!("{}{marker}", v.version),
            key_state_name(v.state),
            utc_timestamp(v.created_at_unix),
        ]);
    }
    format!("{}\n{}", fields.render(), versions.render())
}

/// A JSON object from `(field, value)` pairs, skipping `None`s (serde_json sorts the fields).
pub fn object(fields: Vec<(&str, Option<Value>)>) -> Value {
    let mut map = Map::new();
    for (name, value) in fields {
        if let Some(value) = value {
            map.insert(name.to_owned(), value);
        }
    }
    Value::Object(map)
}

/// The same pairs as a `field  value` table; JSON strings are shown without quotes.
pub fn object_table(fields: &[(&str, Option<Value>)]) -> String {
    let mut table = Table::fields();
    for (name, value) in fields {
        if let Some(value) = value {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            table.row(vec![(*name).to_owned(), text]);
        }
    }
    table.render()
}

fn rotation_text(days: u32) -> String {
    if days == 0 {
        "level default".to_owned()
    } else {
        format!("{days} days")
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (proleptic Gregorian, UTC); "-" for 0 (unset).
pub fn utc_timestamp(unix: i64) -> String {
    if unix == 0 {
        return "-".to_owned();
    }
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_client::proto::{Classification, KeyPurpose, KeyState, KeyVersion};

    fn sample_key() -> Key {
        Key {
            id: "00112233445566778899aabbccddeeff".into(),
            name: "citizens".into(),
            classification: Classification::SensitivePersonal.into(),
            purpose: KeyPurpose::Envelope.into(),
            state: KeyState::Enabled.into(),
            primary_version: 2,
            versions: vec![
                KeyVersion {
                    version: 1,
                    state: KeyState::Disabled.into(),
                    created_at_unix: 1_751_328_000,
                    destroy_at_unix: 0,
                },
                KeyVersion {
                    version: 2,
                    state: KeyState::Enabled.into(),
                    created_at_unix: 1_751_414_400,
                    destroy_at_unix: 0,
                },
            ],
            created_at_unix: 1_751_328_000,
            rotation_period_days: 0,
            rotated_at_unix: 1_751_414_400,
            next_rotation_at_unix: 1_766_966_400,
            destroy_at_unix: 0,
        }
    }

    #[test]
    fn table_columns_are_aligned_without_trailing_spaces() {
        let mut table = Table::with_headers(&["NAME", "LEVEL"]);
        table
            .row(vec!["a".into(), "SECRET".into()])
            .row(vec!["longer-name".into(), "PERSONAL".into()]);
        assert_eq!(
            table.render(),
            "NAME         LEVEL\na            SECRET\nlonger-name  PERSONAL\n"
        );
    }

    #[test]
    fn table_pads_by_characters_not_bytes() {
        let mut table = Table::fields();
        table
            .row(vec!["Mật".into(), "x".into()])
            .row(vec!["abcd".into(), "y".into()]);
        assert_eq!(table.render(), "Mật   x\nabcd  y\n");
    }

    #[test]
    fn key_json_uses_proto_field_names_and_level_names() {
        let value = key_json(&sample_key());
        assert_eq!(value["classification"], "SENSITIVE_PERSONAL");
        assert_eq!(value["purpose"], "ENVELOPE");
        assert_eq!(value["state"], "ENABLED");
        assert_eq!(value["primary_version"], 2);
        assert_eq!(value["rotation_period_days"], 0);
        assert_eq!(value["versions"][0]["state"], "DISABLED");
        assert_eq!(value["versions"][1]["created_at_unix"], 1_751_414_400);
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "classification",
            "created_at_unix",
            "id",
            "name",
            "primary_version",
            "purpose",
            "rotation_period_days",
            "state",
            "versions",
        ];
        expected.sort();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort();
        assert_eq!(keys_sorted, expected);
        assert_eq!(
            key_list_json(&[sample_key()])["keys"][0]["name"],
            "citizens"
        );
    }

    #[test]
    fn key_tables_show_names_and_versions() {
        let list = key_list_table(&[sample_key()]);
        assert!(
            list.starts_with("NAME      LEVEL               PURPOSE   STATE    PRIMARY  ROTATION"),
            "{list}"
        );
        assert!(
            list.contains(
                "citizens  SENSITIVE_PERSONAL  ENVELOPE  ENABLED  2        level default"
            ),
            "{list}"
        );
        let one = key_table(&sample_key());
        assert!(
            one.contains("classification   SENSITIVE_PERSONAL\n"),
            "{one}"
        );
        assert!(
            one.contains("2 (primary)  ENABLED   2025-07-02T00:00:00Z"),
            "{one}"
        );
    }

    #[test]
    fn objects_skip_absent_fields_and_encode_bytes_in_standard_base64() {
        let fields = vec![
            ("key_id", Some(json!("ab"))),
            ("key_version", Some(json!(3))),
            ("wrapped_data_key", Some(json!(base64(&[0xfb, 0xff])))),
            ("plaintext_data_key", None),
        ];
        assert_eq!(
            object_table(&fields),
            "key_id            ab\nkey_version       3\nwrapped_data_key  +/8=\n"
        );
        assert_eq!(
            object(fields).to_string(),
            r#"{"key_id":"ab","key_version":3,"wrapped_data_key":"+/8="}"#
        );
    }

    #[test]
    fn unix_times_print_as_utc() {
        assert_eq!(utc_timestamp(1), "1970-01-01T00:00:01Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_751_328_000), "2025-07-01T00:00:00Z");
        assert_eq!(utc_timestamp(-1), "1969-12-31T23:59:59Z");
        assert_eq!(utc_timestamp(0), "-");
    }
}
