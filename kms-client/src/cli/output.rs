//! What `kmsctl` prints: aligned text tables for people and one JSON document for scripts.
//!
//! JSON fields are named like the proto fields (snake_case), enums appear as their proto names and
//! bytes as standard base64. Data keys are rendered only when the command was asked for them; the
//! callers decide that, this module never adds a secret on its own.
#![forbid(unsafe_code)]

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use kms_client::names::{
    approval_action_name, approval_state_name, classification_name, key_state_name, purpose_name,
};
use kms_client::proto::{Approval, ApprovalAction, Key};
use kms_client::KeyChangeOutcome;
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
        "versions": versions_json_array(key),
        "created_at_unix": key.created_at_unix,
        "rotation_period_days": key.rotation_period_days,
        "rotated_at_unix": key.rotated_at_unix,
        "next_rotation_at_unix": key.next_rotation_at_unix,
        "destroy_at_unix": key.destroy_at_unix,
    })
}

fn versions_json_array(key: &Key) -> Vec<Value> {
    key.versions
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "state": key_state_name(v.state),
                "created_at_unix": v.created_at_unix,
                "destroy_at_unix": v.destroy_at_unix,
            })
        })
        .collect()
}

/// `key version list` as JSON: the key's name, its primary version and its versions.
pub fn versions_json(key: &Key) -> Value {
    json!({
        "name": key.name,
        "primary_version": key.primary_version,
        "versions": versions_json_array(key),
    })
}

/// A key's versions as a table, the primary one marked.
pub fn versions_table(key: &Key) -> String {
    let mut versions = Table::with_headers(&["VERSION", "STATE", "CREATED", "DESTROY_AT"]);
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
            utc_timestamp(v.destroy_at_unix),
        ]);
    }
    versions.render()
}

/// A change that may need two officers, as JSON shaped like `KeyChangeResponse`: `key`, and
/// `pending_approval` only when the change awaits a second officer.
pub fn key_change_json(outcome: &KeyChangeOutcome) -> Value {
    object(vec![
        ("key", Some(key_json(outcome.key()))),
        (
            "pending_approval",
            outcome.pending_approval().map(approval_json),
        ),
    ])
}

/// One approval request as JSON, fields named like the proto message.
pub fn approval_json(approval: &Approval) -> Value {
    json!({
        "id": approval.id,
        "key": approval.key,
        "version": approval.version,
        "action": approval_action_name(approval.action),
        "state": approval_state_name(approval.state),
        "classification": classification_name(approval.classification),
        "requested_by": approval.requested_by,
        "requested_at_unix": approval.requested_at_unix,
        "expires_at_unix": approval.expires_at_unix,
        "decided_by": approval.decided_by,
        "decided_at_unix": approval.decided_at_unix,
        "subject": approval.subject,
        "change": approval.change,
    })
}

/// `approval list` as JSON: `{"approvals": [...]}` like `ListApprovalsResponse`.
pub fn approval_list_json(approvals: &[Approval]) -> Value {
    json!({ "approvals": approvals.iter().map(approval_json).collect::<Vec<_>>() })
}

/// `approval list` as a table, one request per line.
pub fn approval_list_table(approvals: &[Approval]) -> String {
    let mut table = Table::with_headers(&[
        "ID",
        "STATE",
        "ACTION",
        "KEY_OR_SUBJECT",
        "VERSION",
        "LEVEL",
        "REQUESTED_BY",
        "EXPIRES",
        "DECIDED_BY",
    ]);
    for a in approvals {
        table.row(vec![
            a.id.clone(),
            approval_state_name(a.state),
            approval_action_name(a.action),
            if a.key.is_empty() { a.subject.clone() } else { a.key.clone() },
            version_text(a.version),
            classification_name(a.classification),
            a.requested_by.clone(),
            utc_timestamp(a.expires_at_unix),
            dash_if_empty(&a.decided_by),
        ]);
    }
    table.render()
}

/// One approval request as a `field  value` table.
pub fn approval_table(a: &Approval) -> String {
    let mut table = Table::fields();
    table
        .row(vec!["id".into(), a.id.clone()])
        .row(vec!["state".into(), approval_state_name(a.state)])
        .row(vec!["action".into(), approval_action_name(a.action)])
        .row(vec!["key".into(), dash_if_empty(&a.key)])
        .row(vec!["version".into(), version_text(a.version)])
        .row(vec!["subject".into(), dash_if_empty(&a.subject)])
        .row(vec!["change".into(), dash_if_empty(&a.change)])
        .row(vec![
            "classification".into(),
            classification_name(a.classification),
        ])
        .row(vec!["requested_by".into(), a.requested_by.clone()])
        .row(vec![
            "requested_at".into(),
            utc_timestamp(a.requested_at_unix),
        ])
        .row(vec!["expires_at".into(), utc_timestamp(a.expires_at_unix)])
        .row(vec!["decided_by".into(), dash_if_empty(&a.decided_by)])
        .row(vec!["decided_at".into(), utc_timestamp(a.decided_at_unix)]);
    table.render()
}

/// What an approval request would do, for sentences: "disabling key health version 2".
pub fn approval_subject(a: &Approval) -> String {
    let verb = match ApprovalAction::try_from(a.action) {
        Ok(ApprovalAction::RotateKey) => "rotating",
        Ok(ApprovalAction::DisableKey | ApprovalAction::DisableVersion) => "disabling",
        Ok(ApprovalAction::DestroyKey | ApprovalAction::DestroyVersion) => "destroying",
        Ok(ApprovalAction::EnableKey | ApprovalAction::EnableVersion) => "enabling",
        Ok(ApprovalAction::RegisterCaller) => return format!("registering caller {} ({})", a.subject, a.change),
        Ok(ApprovalAction::UpdateCaller) => return format!("changing caller {} ({})", a.subject, a.change),
        Ok(ApprovalAction::RevokeCaller) => return format!("revoking caller {}", a.subject),
        Ok(ApprovalAction::DestroyUnknownObject) => return format!("destroying the unknown HSM object {}", a.subject),
        Ok(ApprovalAction::Unspecified) | Err(_) => "changing",
    };
    if a.version == 0 {
        format!("{verb} key {}", a.key)
    } else {
        format!("{verb} key {} version {}", a.key, a.version)
    }
}

/// The table text of a change that awaits a second officer: what was filed, its id, and the
/// commands another officer runs. Nothing about the key changed, so the key is not shown.
pub fn pending_approval_text(a: &Approval) -> String {
    let mut text = format!(
        "awaiting a second officer: {} needs another officer's approval; nothing has changed yet\n\n",
        approval_subject(a)
    );
    text.push_str(&approval_table(a));
    text.push_str(&format!(
        "\nAnother officer approves it before {} with:\n  kmsctl approval approve {id}\n\
         or rejects it with:\n  kmsctl approval reject {id}\n",
        utc_timestamp(a.expires_at_unix),
        id = a.id,
    ));
    text
}

fn version_text(version: u32) -> String {
    if version == 0 {
        "-".to_owned()
    } else {
        version.to_string()
    }
}

fn dash_if_empty(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
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
        ])
        .row(vec![
            "rotated_at".into(),
            utc_timestamp(key.rotated_at_unix),
        ])
        .row(vec![
            "next_rotation".into(),
            utc_timestamp(key.next_rotation_at_unix),
        ]);
    if key.destroy_at_unix != 0 {
        fields.row(vec![
            "destroy_at".into(),
            utc_timestamp(key.destroy_at_unix),
        ]);
    }
    format!("{}\n{}", fields.render(), versions_table(key))
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
    use kms_client::proto::{ApprovalState, Classification, KeyPurpose, KeyState, KeyVersion};

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
                    state: KeyState::PendingDestruction.into(),
                    created_at_unix: 1_751_328_000,
                    destroy_at_unix: 1_752_019_200,
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

    fn sample_approval() -> Approval {
        Approval {
            id: "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
            key: "health".into(),
            version: 0,
            action: ApprovalAction::DisableKey.into(),
            state: ApprovalState::Pending.into(),
            requested_by: "urn:kms:caller:alice".into(),
            requested_at_unix: 1_751_328_000,
            expires_at_unix: 1_751_414_400,
            decided_by: String::new(),
            decided_at_unix: 0,
            classification: Classification::SensitivePersonal.into(),
            subject: String::new(),
            change: String::new(),
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
        assert_eq!(value["versions"][0]["state"], "PENDING_DESTRUCTION");
        assert_eq!(value["versions"][0]["destroy_at_unix"], 1_752_019_200);
        assert_eq!(value["versions"][1]["created_at_unix"], 1_751_414_400);
        assert_eq!(value["next_rotation_at_unix"], 1_766_966_400);
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "classification",
            "created_at_unix",
            "destroy_at_unix",
            "id",
            "name",
            "next_rotation_at_unix",
            "primary_version",
            "purpose",
            "rotated_at_unix",
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
            one.contains("next_rotation    2025-12-29T00:00:00Z\n"),
            "{one}"
        );
        assert!(!one.contains("destroy_at "), "unset: not shown\n{one}");
        assert!(
            one.ends_with(
                "VERSION      STATE                CREATED               DESTROY_AT\n\
             1            PENDING_DESTRUCTION  2025-07-01T00:00:00Z  2025-07-09T00:00:00Z\n\
             2 (primary)  ENABLED              2025-07-02T00:00:00Z  -\n"
            ),
            "{one}"
        );
        assert_eq!(
            versions_json(&sample_key()),
            json!({
                "name": "citizens",
                "primary_version": 2,
                "versions": [
                    {"version": 1, "state": "PENDING_DESTRUCTION", "created_at_unix": 1_751_328_000, "destroy_at_unix": 1_752_019_200},
                    {"version": 2, "state": "ENABLED", "created_at_unix": 1_751_414_400, "destroy_at_unix": 0},
                ],
            })
        );
    }

    #[test]
    fn a_change_awaiting_approval_shows_the_request_and_how_to_decide_it() {
        let pending = KeyChangeOutcome::AwaitingApproval {
            key: sample_key(),
            approval: sample_approval(),
        };
        let value = key_change_json(&pending);
        assert_eq!(
            value["pending_approval"]["id"],
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
        );
        assert_eq!(value["pending_approval"]["action"], "DISABLE_KEY");
        assert_eq!(value["pending_approval"]["state"], "PENDING");
        assert_eq!(value["key"]["name"], "citizens");
        let made = key_change_json(&KeyChangeOutcome::Made(sample_key()));
        assert!(made.get("pending_approval").is_none(), "{made}");

        assert_eq!(
            pending_approval_text(&sample_approval()),
            "awaiting a second officer: disabling key health needs another officer's approval; \
             nothing has changed yet\n\
             \n\
             id              0f1e2d3c4b5a69788796a5b4c3d2e1f0\n\
             state           PENDING\n\
             action          DISABLE_KEY\n\
             key             health\n\
             version         -\n\
             subject         -\n\
             change          -\n\
             classification  SENSITIVE_PERSONAL\n\
             requested_by    urn:kms:caller:alice\n\
             requested_at    2025-07-01T00:00:00Z\n\
             expires_at      2025-07-02T00:00:00Z\n\
             decided_by      -\n\
             decided_at      -\n\
             \n\
             Another officer approves it before 2025-07-02T00:00:00Z with:\n\
             \x20 kmsctl approval approve 0f1e2d3c4b5a69788796a5b4c3d2e1f0\n\
             or rejects it with:\n\
             \x20 kmsctl approval reject 0f1e2d3c4b5a69788796a5b4c3d2e1f0\n"
        );
    }

    #[test]
    fn approval_lists_name_actions_states_and_versions() {
        let mut decided = sample_approval();
        decided.action = ApprovalAction::DestroyVersion.into();
        decided.version = 3;
        decided.state = ApprovalState::Approved.into();
        decided.decided_by = "urn:kms:caller:bob".into();
        assert_eq!(
            approval_subject(&decided),
            "destroying key health version 3"
        );
        let table = approval_list_table(&[sample_approval(), decided.clone()]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "ID                                STATE     ACTION           KEY_OR_SUBJECT  VERSION  LEVEL               \
             REQUESTED_BY          EXPIRES               DECIDED_BY"
        );
        assert!(lines[1].ends_with("2025-07-02T00:00:00Z  -"), "{table}");
        assert!(
            lines[2].contains("APPROVED  DESTROY_VERSION  health          3 ")
                && lines[2].ends_with("urn:kms:caller:bob"),
            "{table}"
        );
        let value = approval_list_json(&[decided]);
        assert_eq!(value["approvals"][0]["version"], 3);
        assert_eq!(
            value["approvals"][0]["classification"],
            "SENSITIVE_PERSONAL"
        );
        assert_eq!(value["approvals"][0]["decided_by"], "urn:kms:caller:bob");
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
