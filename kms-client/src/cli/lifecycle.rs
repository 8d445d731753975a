//! The officers' lifecycle commands: `key rotate|schedule|enable|disable|destroy|cancel-destroy`,
//! `key version ...` and `approval ...`.
//!
//! A change that the key's level reserves for two officers is not an error: the server files it as
//! an approval request and the command prints that request (its id, and what another officer runs)
//! and exits 0. Table output starts with one sentence saying what happened, then the key; JSON
//! output is the answer shaped like the proto message and nothing else.
#![forbid(unsafe_code)]

use kms_client::names::key_state_name;
use kms_client::proto::Key;
use kms_client::{KeyChangeOutcome, KmsClient};

use super::args::{ApprovalCommand, KeyLifecycleCommand, OutputFormat, VersionCommand};
use super::commands::{print_json, print_stdout};
use super::output::{self, utc_timestamp};
use super::CliError;

/// Runs a lifecycle `key` command.
pub async fn key(
    client: &KmsClient,
    command: KeyLifecycleCommand,
    format: OutputFormat,
) -> Result<(), CliError> {
    match command {
        KeyLifecycleCommand::Rotate { name } => {
            let outcome = client.rotate_key(&name).await?;
            print_change(&outcome, format, |key| {
                format!(
                    "key {} rotated: version {} is the primary version",
                    key.name, key.primary_version
                )
            })
        }
        KeyLifecycleCommand::Schedule { name, days } => {
            let key = client.set_rotation_schedule(&name, days).await?;
            print_key_with(&key, format, schedule_sentence(&key))
        }
        KeyLifecycleCommand::Enable { name } => {
            let outcome = client.enable_key(&name).await?;
            print_change(&outcome, format, |key| format!("key {} is {}", key.name, key_state_name(key.state)))
        }
        KeyLifecycleCommand::Disable { name } => {
            let outcome = client.disable_key(&name).await?;
            print_change(&outcome, format, |key| {
                format!(
                    "key {} is {}: it does no cryptography until it is enabled again",
                    key.name,
                    key_state_name(key.state)
                )
            })
        }
        KeyLifecycleCommand::Destroy { name } => {
            let outcome = client.schedule_key_destruction(&name).await?;
            print_change(&outcome, format, |key| {
                format!(
                    "key {name} will be destroyed at {at}; until then it does no cryptography, \
                     and `kmsctl key cancel-destroy {name}` takes it back to DISABLED",
                    name = key.name,
                    at = utc_timestamp(key.destroy_at_unix),
                )
            })
        }
        KeyLifecycleCommand::CancelDestroy { name } => {
            let key = client.cancel_key_destruction(&name).await?;
            let sentence = format!(
                "destruction of key {} cancelled: the key is {}",
                key.name,
                key_state_name(key.state)
            );
            print_key_with(&key, format, sentence)
        }
        KeyLifecycleCommand::Version(command) => version(client, command, format).await,
    }
}

async fn version(
    client: &KmsClient,
    command: VersionCommand,
    format: OutputFormat,
) -> Result<(), CliError> {
    match command {
        VersionCommand::List { name } => {
            let key = client.get_key(&name).await?;
            match format {
                OutputFormat::Json => print_json(&output::versions_json(&key)),
                OutputFormat::Table => print_stdout(output::versions_table(&key).as_bytes()),
            }
        }
        VersionCommand::Enable { name, version } => {
            let outcome = client.enable_key_version(&name, version.get()).await?;
            print_change(&outcome, format, |key| {
                format!("key {} version {version} is {}", key.name, version_state(key, version.get()))
            })
        }
        VersionCommand::Disable { name, version } => {
            let outcome = client.disable_key_version(&name, version.get()).await?;
            print_change(&outcome, format, |key| {
                format!(
                    "key {} version {version} is {}: blobs made with it do not decrypt until it \
                     is enabled again",
                    key.name,
                    version_state(key, version.get())
                )
            })
        }
        VersionCommand::Destroy { name, version } => {
            let outcome = client.schedule_version_destruction(&name, version).await?;
            print_change(&outcome, format, |key| {
                let at = key
                    .versions
                    .iter()
                    .find(|v| v.version == version.get())
                    .map_or(0, |v| v.destroy_at_unix);
                format!(
                    "key {name} version {version} will be destroyed at {at}; until then it \
                     decrypts nothing, and `kmsctl key version cancel-destroy {name} {version}` \
                     takes it back to DISABLED",
                    name = key.name,
                    at = utc_timestamp(at),
                )
            })
        }
        VersionCommand::CancelDestroy { name, version } => {
            let key = client.cancel_version_destruction(&name, version).await?;
            let sentence = format!(
                "destruction of key {} version {version} cancelled: the version is {}",
                key.name,
                version_state(&key, version.get())
            );
            print_key_with(&key, format, sentence)
        }
    }
}

/// Runs an `approval` command.
pub async fn approval(
    client: &KmsClient,
    command: ApprovalCommand,
    format: OutputFormat,
) -> Result<(), CliError> {
    match command {
        ApprovalCommand::List { all } => {
            let approvals = client.list_approvals(all).await?;
            match format {
                OutputFormat::Json => print_json(&output::approval_list_json(&approvals)),
                OutputFormat::Table => {
                    print_stdout(output::approval_list_table(&approvals).as_bytes())
                }
            }
        }
        ApprovalCommand::Approve { id } => {
            let approved = client.approve(&id).await?;
            match format {
                OutputFormat::Json => print_json(&output::object(vec![
                    ("approval", Some(output::approval_json(&approved.approval))),
                    ("key", approved.key.as_ref().map(output::key_json)),
                    ("caller", approved.caller.as_ref().map(super::callers::caller_json)),
                ])),
                OutputFormat::Table => {
                    let after = match (&approved.key, &approved.caller) {
                        (Some(key), _) => output::key_table(key),
                        (None, Some(caller)) => super::callers::caller_table(caller),
                        (None, None) => output::approval_table(&approved.approval),
                    };
                    let text = format!(
                        "request {} approved: {} is done\n\n{after}",
                        approved.approval.id,
                        output::approval_subject(&approved.approval),
                    );
                    print_stdout(text.as_bytes())
                }
            }
        }
        ApprovalCommand::Reject { id } => {
            let approval = client.reject(&id).await?;
            match format {
                OutputFormat::Json => print_json(&output::approval_json(&approval)),
                OutputFormat::Table => {
                    let text = format!(
                        "request {} rejected: {} will not happen\n\n{}",
                        approval.id,
                        output::approval_subject(&approval),
                        output::approval_table(&approval)
                    );
                    print_stdout(text.as_bytes())
                }
            }
        }
    }
}

/// The answer to a change that may await a second officer: the sentence and the key when it was
/// made, the approval request when it was not.
fn print_change(
    outcome: &KeyChangeOutcome,
    format: OutputFormat,
    made: impl FnOnce(&Key) -> String,
) -> Result<(), CliError> {
    match (format, outcome) {
        (OutputFormat::Json, _) => print_json(&output::key_change_json(outcome)),
        (OutputFormat::Table, KeyChangeOutcome::Made(key)) => {
            let sentence = made(key);
            print_stdout(with_key(&sentence, key).as_bytes())
        }
        (OutputFormat::Table, KeyChangeOutcome::AwaitingApproval { approval, .. }) => {
            print_stdout(output::pending_approval_text(approval).as_bytes())
        }
    }
}

fn print_key_with(key: &Key, format: OutputFormat, sentence: String) -> Result<(), CliError> {
    match format {
        OutputFormat::Json => print_json(&output::key_json(key)),
        OutputFormat::Table => print_stdout(with_key(&sentence, key).as_bytes()),
    }
}

fn with_key(sentence: &str, key: &Key) -> String {
    format!("{sentence}\n\n{}", output::key_table(key))
}

fn schedule_sentence(key: &Key) -> String {
    let period = if key.rotation_period_days == 0 {
        "on its level's default period".to_owned()
    } else {
        format!("every {} days", key.rotation_period_days)
    };
    if key.next_rotation_at_unix == 0 {
        format!(
            "key {} rotates {period}; no rotation is scheduled while it is {}",
            key.name,
            key_state_name(key.state)
        )
    } else {
        format!(
            "key {} rotates {period}; next rotation at {}",
            key.name,
            utc_timestamp(key.next_rotation_at_unix)
        )
    }
}

fn version_state(key: &Key, version: u32) -> String {
    key.versions
        .iter()
        .find(|v| v.version == version)
        .map_or_else(|| "not listed".to_owned(), |v| key_state_name(v.state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_client::proto::KeyState;

    #[test]
    fn schedule_sentence_names_the_period_and_the_next_rotation() {
        let mut key = Key {
            name: "citizens".into(),
            rotation_period_days: 30,
            next_rotation_at_unix: 1_751_328_000,
            state: KeyState::Enabled.into(),
            ..Default::default()
        };
        assert_eq!(
            schedule_sentence(&key),
            "key citizens rotates every 30 days; next rotation at 2025-07-01T00:00:00Z"
        );
        key.rotation_period_days = 0;
        key.next_rotation_at_unix = 0;
        key.state = KeyState::Disabled.into();
        assert_eq!(
            schedule_sentence(&key),
            "key citizens rotates on its level's default period; no rotation is scheduled while \
             it is DISABLED"
        );
    }
}
