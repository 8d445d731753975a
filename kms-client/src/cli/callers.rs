//! `kmsctl caller register|update|list|revoke`: the officers' commands for the registry of calling
//! systems.
//!
//! `update` reads the registration first (revoked callers included) and sends it back with only
//! the fields given on the command line replaced, because `UpdateCaller` replaces every field.
//! Roles and allowed-key patterns are sent as typed; the server decides whether they are valid.
//! Table output of a single caller starts with one sentence saying what happened; JSON output is
//! the caller alone.
#![forbid(unsafe_code)]

use kms_client::names::classification_name;
use kms_client::proto::Caller;
use kms_client::{CallerChange, ClientError, KmsClient};
use serde_json::{json, Value};

use super::args::{CallerCommand, CallerRegisterArgs, CallerUpdateArgs, OutputFormat, RecipientKeyCommand};
use super::commands::{print_json, print_stdout};
use super::output::{utc_timestamp, Table};
use super::CliError;

/// Runs a `caller` command.
pub async fn run(
    client: &KmsClient,
    command: CallerCommand,
    format: OutputFormat,
) -> Result<(), CliError> {
    match command {
        CallerCommand::Register(args) => {
            let change = client.register_caller(registration(args)).await?;
            print_change(&change, format, |c| format!("caller {} registered", c.identity))
        }
        CallerCommand::Update(changes) => {
            let callers = client.list_callers(true).await?;
            let existing = find_caller(callers, &changes.identity)?;
            let change = client
                .update_caller(merge_update(existing, &changes))
                .await?;
            print_change(&change, format, |c| format!("caller {} updated", c.identity))
        }
        CallerCommand::List { all } => {
            let callers = client.list_callers(all).await?;
            match format {
                OutputFormat::Json => print_json(&caller_list_json(&callers)),
                OutputFormat::Table => print_stdout(caller_list_table(&callers).as_bytes()),
            }
        }
        CallerCommand::Revoke { identity } => {
            let change = client.revoke_caller(&identity).await?;
            print_change(&change, format, |c| {
                format!("caller {} revoked: every request it makes is refused", c.identity)
            })
        }
        CallerCommand::RecipientKey(command) => recipient_key(client, command, format).await,
    }
}

/// `kmsctl caller recipient-key add|rotate|remove`.
async fn recipient_key(client: &KmsClient, command: RecipientKeyCommand, format: OutputFormat) -> Result<(), CliError> {
    let read_pem = |path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|source| CliError::Io { what: "read the public key", path: path.to_owned(), source })
    };
    match command {
        RecipientKeyCommand::Add { identity, public_key } => {
            let caller = client.add_recipient_key(&identity, &read_pem(&public_key)?).await?;
            let newest = caller.recipient_keys.last().map(|k| k.fingerprint.clone()).unwrap_or_default();
            print_caller(&caller, format, &format!("recipient key {newest} registered for {}", caller.identity))
        }
        RecipientKeyCommand::Rotate { identity, public_key, remove } => {
            let added = client.add_recipient_key(&identity, &read_pem(&public_key)?).await?;
            let newest = added.recipient_keys.last().map(|k| k.fingerprint.clone()).unwrap_or_default();
            let caller = client.remove_recipient_key(&identity, &remove).await?;
            print_caller(&caller, format, &format!("recipient key {newest} registered for {} in place of {remove}", caller.identity))
        }
        RecipientKeyCommand::Remove { identity, fingerprint } => {
            let caller = client.remove_recipient_key(&identity, &fingerprint).await?;
            print_caller(&caller, format, &format!("recipient key {fingerprint} removed from {}", caller.identity))
        }
    }
}

/// A caller change: the sentence and the caller when it was made, the approval request when it
/// awaits a second officer.
fn print_change(change: &CallerChange, format: OutputFormat, made: impl FnOnce(&Caller) -> String) -> Result<(), CliError> {
    match (format, change) {
        (OutputFormat::Json, CallerChange::Made(c)) => print_json(&json!({ "caller": caller_json(c), "pending_approval": Value::Null })),
        (OutputFormat::Json, CallerChange::AwaitingApproval { caller, approval }) => print_json(&json!({
            "caller": caller.as_ref().map(caller_json),
            "pending_approval": super::output::approval_json(approval),
        })),
        (OutputFormat::Table, CallerChange::Made(c)) => print_caller(c, format, &made(c)),
        (OutputFormat::Table, CallerChange::AwaitingApproval { approval, .. }) => {
            print_stdout(super::output::pending_approval_text(approval).as_bytes())
        }
    }
}

/// The `Caller` message that `caller register` sends.
fn registration(args: CallerRegisterArgs) -> Caller {
    Caller {
        identity: args.identity,
        agency: args.agency,
        name: args.name,
        system_level: args.system_level,
        clearance: args.clearance.into(),
        roles: args.roles,
        allowed_keys: args.allowed_keys,
        ..Default::default()
    }
}

/// The registered caller `identity` among `callers`, or `NOT_FOUND` (exit code 4).
fn find_caller(callers: Vec<Caller>, identity: &str) -> Result<Caller, CliError> {
    callers
        .into_iter()
        .find(|c| c.identity == identity)
        .ok_or_else(|| {
            CliError::Client(ClientError::from(tonic::Status::not_found(format!(
                "no caller {identity} is registered"
            ))))
        })
}

/// `existing` with the fields given in `changes` replaced: a scalar when it is set, a list when
/// it was given at least once (`--no-allowed-keys` empties the allowed keys). The identity, the
/// state and the times are kept.
pub fn merge_update(existing: Caller, changes: &CallerUpdateArgs) -> Caller {
    let mut caller = existing;
    if let Some(agency) = &changes.agency {
        caller.agency.clone_from(agency);
    }
    if let Some(name) = &changes.name {
        caller.name.clone_from(name);
    }
    if let Some(level) = changes.system_level {
        caller.system_level = level;
    }
    if let Some(clearance) = changes.clearance {
        caller.clearance = clearance.into();
    }
    if !changes.roles.is_empty() {
        caller.roles.clone_from(&changes.roles);
    }
    if changes.no_allowed_keys {
        caller.allowed_keys.clear();
    } else if !changes.allowed_keys.is_empty() {
        caller.allowed_keys.clone_from(&changes.allowed_keys);
    }
    caller
}

fn print_caller(caller: &Caller, format: OutputFormat, sentence: &str) -> Result<(), CliError> {
    match format {
        OutputFormat::Json => print_json(&caller_json(caller)),
        OutputFormat::Table => {
            print_stdout(format!("{sentence}\n\n{}", caller_table(caller)).as_bytes())
        }
    }
}

/// One caller as JSON: the proto field names, the clearance by name, and each time both as a Unix
/// number and as a UTC timestamp (`null` when unset).
pub fn caller_json(c: &Caller) -> Value {
    json!({
        "identity": c.identity,
        "agency": c.agency,
        "name": c.name,
        "system_level": c.system_level,
        "clearance": classification_name(c.clearance),
        "roles": c.roles,
        "allowed_keys": c.allowed_keys,
        "active": c.active,
        "created_unix": c.created_unix,
        "created_utc": utc_json(c.created_unix),
        "updated_unix": c.updated_unix,
        "updated_utc": utc_json(c.updated_unix),
        "recipient_keys": c.recipient_keys.iter().map(|k| json!({
            "fingerprint": k.fingerprint,
            "added_unix": k.added_unix,
        })).collect::<Vec<_>>(),
    })
}

/// `caller list` as JSON: an array of callers.
pub fn caller_list_json(callers: &[Caller]) -> Value {
    Value::Array(callers.iter().map(caller_json).collect())
}

/// `caller list` as a table, one caller per line.
pub fn caller_list_table(callers: &[Caller]) -> String {
    let mut table = Table::with_headers(&[
        "IDENTITY",
        "AGENCY",
        "NAME",
        "LEVEL",
        "CLEARANCE",
        "ROLES",
        "ALLOWED KEYS",
        "STATE",
    ]);
    for c in callers {
        table.row(vec![
            c.identity.clone(),
            c.agency.clone(),
            c.name.clone(),
            c.system_level.to_string(),
            classification_name(c.clearance),
            joined(&c.roles),
            joined(&c.allowed_keys),
            state(c).to_owned(),
        ]);
    }
    table.render()
}

/// One caller as a `field  value` table.
pub fn caller_table(c: &Caller) -> String {
    let mut table = Table::fields();
    table
        .row(vec!["identity".into(), c.identity.clone()])
        .row(vec!["agency".into(), c.agency.clone()])
        .row(vec!["name".into(), c.name.clone()])
        .row(vec!["system_level".into(), c.system_level.to_string()])
        .row(vec!["clearance".into(), classification_name(c.clearance)])
        .row(vec!["roles".into(), joined(&c.roles)])
        .row(vec!["allowed_keys".into(), joined(&c.allowed_keys)])
        .row(vec!["state".into(), state(c).to_owned()])
        .row(vec!["created".into(), utc_timestamp(c.created_unix)])
        .row(vec!["updated".into(), utc_timestamp(c.updated_unix)])
        .row(vec![
            "recipient_keys".into(),
            joined(&c.recipient_keys.iter().map(|k| k.fingerprint.clone()).collect::<Vec<_>>()),
        ]);
    table.render()
}

fn state(c: &Caller) -> &'static str {
    if c.active {
        "active"
    } else {
        "revoked"
    }
}

/// The items separated by commas, or "-" for none.
fn joined(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

fn utc_json(unix: i64) -> Value {
    if unix == 0 {
        Value::Null
    } else {
        Value::String(utc_timestamp(unix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_client::proto::Classification;

    use super::super::exit;

    fn tax_gateway() -> Caller {
        Caller {
            identity: "urn:kms:caller:tax-gateway".into(),
            agency: "Tax Department".into(),
            name: "Tax gateway".into(),
            system_level: 3,
            clearance: Classification::SensitivePersonal.into(),
            roles: vec!["exchange".into()],
            allowed_keys: vec!["tax/*".into(), "citizens".into()],
            active: true,
            created_unix: 1_751_328_000,
            updated_unix: 1_751_414_400,
            recipient_keys: Vec::new(),
        }
    }

    fn changes() -> CallerUpdateArgs {
        CallerUpdateArgs {
            identity: "urn:kms:caller:tax-gateway".into(),
            ..Default::default()
        }
    }

    #[test]
    fn merge_replaces_only_the_scalars_given() {
        let merged = merge_update(
            tax_gateway(),
            &CallerUpdateArgs {
                name: Some("Tax gateway 2".into()),
                system_level: Some(4),
                ..changes()
            },
        );
        assert_eq!(
            merged,
            Caller {
                name: "Tax gateway 2".into(),
                system_level: 4,
                ..tax_gateway()
            }
        );
        let merged = merge_update(
            tax_gateway(),
            &CallerUpdateArgs {
                agency: Some("Finance".into()),
                clearance: Some(Classification::Secret),
                ..changes()
            },
        );
        assert_eq!(
            merged,
            Caller {
                agency: "Finance".into(),
                clearance: Classification::Secret.into(),
                ..tax_gateway()
            }
        );
        assert_eq!(merge_update(tax_gateway(), &changes()), tax_gateway());
    }

    #[test]
    fn merge_replaces_whole_lists_and_clears_the_allowed_keys_on_request() {
        let merged = merge_update(
            tax_gateway(),
            &CallerUpdateArgs {
                roles: vec!["officer".into(), "auditor".into()],
                ..changes()
            },
        );
        assert_eq!(merged.roles, ["officer", "auditor"]);
        assert_eq!(
            merged.allowed_keys,
            ["tax/*", "citizens"],
            "not given: kept"
        );

        let merged = merge_update(
            tax_gateway(),
            &CallerUpdateArgs {
                allowed_keys: vec!["*".into()],
                ..changes()
            },
        );
        assert_eq!(merged.allowed_keys, ["*"]);
        assert_eq!(merged.roles, ["exchange"], "not given: kept");

        let merged = merge_update(
            tax_gateway(),
            &CallerUpdateArgs {
                no_allowed_keys: true,
                ..changes()
            },
        );
        assert!(merged.allowed_keys.is_empty());
        assert_eq!(
            (merged.identity.as_str(), merged.active, merged.created_unix),
            ("urn:kms:caller:tax-gateway", true, 1_751_328_000)
        );
    }

    #[test]
    fn registration_sends_the_flags_and_an_empty_allowed_list_when_none_is_given() {
        let args = CallerRegisterArgs {
            identity: "urn:kms:caller:auditor-1".into(),
            agency: "Inspectorate".into(),
            name: "Audit desk".into(),
            system_level: 2,
            clearance: Classification::Personal,
            roles: vec!["auditor".into()],
            allowed_keys: Vec::new(),
        };
        assert_eq!(
            registration(args),
            Caller {
                identity: "urn:kms:caller:auditor-1".into(),
                agency: "Inspectorate".into(),
                name: "Audit desk".into(),
                system_level: 2,
                clearance: Classification::Personal.into(),
                roles: vec!["auditor".into()],
                allowed_keys: Vec::new(),
                active: false,
                created_unix: 0,
                updated_unix: 0,
                recipient_keys: Vec::new(),
            }
        );
    }

    #[test]
    fn an_unknown_identity_is_not_found() {
        let err = find_caller(vec![tax_gateway()], "urn:kms:caller:nobody").unwrap_err();
        assert_eq!(err.exit_code(), exit::NOT_FOUND);
        assert_eq!(
            err.message(),
            "NOT_FOUND: no caller urn:kms:caller:nobody is registered"
        );
        let found = find_caller(vec![tax_gateway()], "urn:kms:caller:tax-gateway").unwrap();
        assert_eq!(found, tax_gateway());
    }

    #[test]
    fn a_revoked_caller_renders_as_revoked() {
        let revoked = Caller {
            active: false,
            allowed_keys: Vec::new(),
            ..tax_gateway()
        };
        assert_eq!(
            caller_table(&revoked),
            "identity        urn:kms:caller:tax-gateway\n\
             agency          Tax Department\n\
             name            Tax gateway\n\
             system_level    3\n\
             clearance       SENSITIVE_PERSONAL\n\
             roles           exchange\n\
             allowed_keys    -\n\
             state           revoked\n\
             created         2025-07-01T00:00:00Z\n\
             updated         2025-07-02T00:00:00Z\n\
             recipient_keys  -\n"
        );
        let list = caller_list_table(&[tax_gateway(), revoked]);
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(
            lines,
            [
                "IDENTITY                    AGENCY          NAME         LEVEL  \
                 CLEARANCE           ROLES     ALLOWED KEYS    STATE",
                "urn:kms:caller:tax-gateway  Tax Department  Tax gateway  3      \
                 SENSITIVE_PERSONAL  exchange  tax/*,citizens  active",
                "urn:kms:caller:tax-gateway  Tax Department  Tax gateway  3      \
                 SENSITIVE_PERSONAL  exchange  -               revoked",
            ]
        );
    }

    #[test]
    fn caller_json_uses_proto_field_names_level_names_and_utc_times() {
        let mut caller = tax_gateway();
        caller.updated_unix = 0;
        assert_eq!(
            caller_list_json(&[caller]),
            json!([{
                "identity": "urn:kms:caller:tax-gateway",
                "agency": "Tax Department",
                "name": "Tax gateway",
                "system_level": 3,
                "clearance": "SENSITIVE_PERSONAL",
                "roles": ["exchange"],
                "allowed_keys": ["tax/*", "citizens"],
                "active": true,
                "created_unix": 1_751_328_000,
                "created_utc": "2025-07-01T00:00:00Z",
                "updated_unix": 0,
                "updated_utc": null,
                "recipient_keys": [],
            }])
        );
        assert_eq!(caller_list_json(&[]), json!([]));
    }
}
