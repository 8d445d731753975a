//! `kmsctl token health|list|adopt|destroy`: the HSM's health (officers and auditors), and the
//! officers' commands for the HSM objects of this service
//! that no key version in the store names (kept by start-up, never used): after the store was
//! restored from an older backup, the versions made since; after it was lost, every key.
#![forbid(unsafe_code)]

use kms_client::names::{classification_name, purpose_name};
use kms_client::proto::{HsmState, UnknownObject};
use kms_client::KmsClient;
use serde_json::json;

use super::args::{OutputFormat, TokenCommand};
use super::commands::{print_json, print_stdout};
use super::output::{utc_timestamp, Table};
use super::CliError;

/// Runs a `token` command.
pub async fn run(client: &KmsClient, command: TokenCommand, format: OutputFormat) -> Result<(), CliError> {
    match command {
        TokenCommand::List => {
            let objects = client.list_unknown_objects().await?;
            match format {
                OutputFormat::Json => print_json(&json!({ "objects": objects.iter().map(object_json).collect::<Vec<_>>() })),
                OutputFormat::Table => print_stdout(objects_table(&objects).as_bytes()),
            }
        }
        TokenCommand::Adopt { object_ids, all } => {
            let ids = if all { Vec::new() } else { object_ids };
            let results = client.adopt_objects(&ids).await?;
            let failed = results.iter().filter(|r| r.code != 0).count();
            match format {
                OutputFormat::Json => print_json(&json!({ "results": results.iter().map(|r| json!({
                    "object_id": r.object_id, "code": r.code, "message": r.message, "key": r.key, "version": r.version,
                })).collect::<Vec<_>>() }))?,
                OutputFormat::Table => {
                    let mut t = Table::with_headers(&["OBJECT", "KEY", "VERSION", "RESULT"]);
                    for r in &results {
                        let result = if r.code == 0 { "adopted".to_owned() } else { r.message.clone() };
                        t.row(vec![r.object_id.clone(), dash(&r.key), version(r.version), result]);
                    }
                    let adopted = results.len() - failed;
                    print_stdout(format!("{adopted} objects adopted, {failed} refused\n\n{}", t.render()).as_bytes())?;
                }
            }
            if failed > 0 {
                // The exit code of the first refusal, as `rewrap` does.
                let first = results.iter().find(|r| r.code != 0).map(|r| r.code).unwrap_or(2);
                return Err(CliError::Client(kms_client::ClientError::from(tonic::Status::new(
                    tonic::Code::from(first),
                    format!("{failed} objects were not adopted"),
                ))));
            }
            Ok(())
        }
        TokenCommand::Health => {
            let h = client.hsm_health().await?;
            let state = match HsmState::try_from(h.state) {
                Ok(HsmState::Ready) => "READY",
                Ok(HsmState::Lost) => "LOST",
                _ => "UNKNOWN",
            };
            match format {
                OutputFormat::Json => print_json(&json!({
                    "state": state,
                    "token_label": h.token_label,
                    "token_serial": h.token_serial,
                    "generation": h.generation,
                    "reconnects": h.reconnects,
                    "last_error": h.last_error,
                    "last_error_unix": h.last_error_unix,
                    "lost_since_unix": h.lost_since_unix,
                    "pools": h.pools.iter().map(|p| json!({ "name": p.name, "sessions": p.sessions, "in_flight": p.in_flight })).collect::<Vec<_>>(),
                }))?,
                OutputFormat::Table => {
                    let when = |t: i64| if t == 0 { "-".to_owned() } else { utc_timestamp(t) };
                    let mut out = format!(
                        "state        {state}\ntoken        {} (serial {})\ngeneration   {}\nreconnects   {}\nlast error   {}\n             at {}\nlost since   {}\n\n",
                        h.token_label,
                        h.token_serial,
                        h.generation,
                        h.reconnects,
                        dash(&h.last_error),
                        when(h.last_error_unix),
                        when(h.lost_since_unix),
                    );
                    let mut t = Table::with_headers(&["POOL", "SESSIONS", "IN_FLIGHT"]);
                    for p in &h.pools {
                        t.row(vec![p.name.clone(), p.sessions.to_string(), p.in_flight.to_string()]);
                    }
                    out.push_str(&t.render());
                    print_stdout(out.as_bytes())?;
                }
            }
            if state != "READY" {
                return Err(CliError::Client(kms_client::ClientError::from(tonic::Status::unavailable(format!(
                    "the HSM is {state}: {}",
                    dash(&h.last_error)
                )))));
            }
            Ok(())
        }
        TokenCommand::Destroy { object_id } => {
            let approval = client.destroy_unknown_object(&object_id).await?;
            match format {
                OutputFormat::Json => print_json(&super::output::approval_json(&approval)),
                OutputFormat::Table => print_stdout(super::output::pending_approval_text(&approval).as_bytes()),
            }
        }
    }
}

fn object_json(o: &UnknownObject) -> serde_json::Value {
    json!({
        "object_id": o.object_id,
        "label": o.label,
        "adoptable": o.adoptable,
        "key_id": o.key_id,
        "key": o.key,
        "version": o.version,
        "classification": classification_name(o.classification),
        "purpose": purpose_name(o.purpose),
        "created_at_unix": o.created_at_unix,
        "not_adoptable_reason": o.not_adoptable_reason,
    })
}

fn objects_table(objects: &[UnknownObject]) -> String {
    if objects.is_empty() {
        return "every key object of this service on the token is named by a key version in the store\n".to_owned();
    }
    let mut t = Table::with_headers(&["OBJECT", "KEY", "VERSION", "LEVEL", "CREATED", "ADOPTABLE"]);
    for o in objects {
        let adoptable = if o.adoptable { "yes".to_owned() } else { format!("no: {}", o.not_adoptable_reason) };
        t.row(vec![
            o.object_id.clone(),
            dash(&o.key),
            version(o.version),
            if o.adoptable { classification_name(o.classification) } else { "-".into() },
            if o.adoptable { utc_timestamp(o.created_at_unix) } else { "-".into() },
            adoptable,
        ]);
    }
    t.render()
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn version(v: u32) -> String {
    if v == 0 {
        "-".into()
    } else {
        v.to_string()
    }
}
