//! `kmsctl audit`: `tail` and `export` read the trail over the API (role `auditor`), `public-key`
//! fetches the key that verifies its checkpoints, and `verify` checks a trail offline, from an
//! exported file or a copy of the server's audit database, with that public key alone.
//!
//! `verify` needs no connection and trusts nothing but the public key: it recomputes the hash chain
//! from the records' fields and checks every checkpoint signature (invariant 3).
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use kms_audit::{AuditDb, Checkpoint, StoredRecord, Trail, VerifyReport};
use kms_client::proto::AuditRecord as WireRecord;
use kms_client::KmsClient;
use serde_json::{json, Value};

use super::args::{AuditCommand, OutputFormat};
use super::atomic_output::AtomicOutput;
use super::{output, CliError};

/// Records or checkpoints asked for per call while exporting.
const PAGE: u32 = 1000;

/// A trail that failed verification: the report has been printed; the exit code says so.
#[derive(Debug, thiserror::Error)]
#[error("the audit trail failed verification: {first}")]
pub struct Tampered {
    pub first: String,
}

/// Runs an `audit` command that talks to the server.
pub async fn online(client: &KmsClient, command: AuditCommand, format: OutputFormat) -> Result<(), CliError> {
    match command {
        AuditCommand::Tail { lines } => tail(client, lines, format).await,
        AuditCommand::Export { out, from } => export(client, &out, from).await,
        AuditCommand::PublicKey { out } => public_key(client, out.as_deref()).await,
        AuditCommand::Anchor => anchor(client, format).await,
        // `super::run` runs it before connecting; here it needs the connection no more than there.
        AuditCommand::Verify { db, file, public_key, anchor } => verify_all(&db, file.as_deref(), &public_key, &anchor, format),
    }
}

async fn anchor(client: &KmsClient, format: OutputFormat) -> Result<(), CliError> {
    let a = client.audit_anchor().await?;
    let hash: String = a.hash.iter().map(|b| format!("{b:02x}")).collect();
    let text = match format {
        OutputFormat::Json => serde_json::to_string_pretty(&json!({
            "trail_id": a.trail_id,
            "seq": a.seq,
            "hash": hash,
            "time_unix_ms": a.time_unix_ms,
            "anchor": format!("{}:{hash}", a.seq),
        }))
        .map_err(CliError::Json)?,
        OutputFormat::Table => format!(
            "trail {} reached record {} at {}\nanchor: {}:{hash}\n(verify a copy of the trail with: kmsctl audit verify --db COPY --public-key audit.pem --anchor {}:{hash})",
            a.trail_id,
            a.seq,
            output::utc_timestamp(a.time_unix_ms.div_euclid(1000)),
            a.seq,
            a.seq
        ),
    };
    println!("{text}");
    Ok(())
}

async fn tail(client: &KmsClient, lines: u32, format: OutputFormat) -> Result<(), CliError> {
    let page = client.last_audit_records(lines).await?;
    let records: Vec<StoredRecord> = page.records.into_iter().map(from_wire).collect::<Result<_, _>>()?;
    let text = match format {
        OutputFormat::Json => serde_json::to_string_pretty(&json!({
            "head_seq": page.head_seq,
            "records": records.iter().map(record_json).collect::<Vec<_>>(),
        }))
        .map_err(CliError::Json)?,
        OutputFormat::Table => records_table(&records),
    };
    println!("{text}");
    Ok(())
}

async fn export(client: &KmsClient, out: &Path, from: u64) -> Result<(), CliError> {
    let mut records = Vec::new();
    let mut next = from.max(1);
    loop {
        let page = client.list_audit_records(next, PAGE).await?;
        let got = page.records.len();
        for r in page.records {
            let r = from_wire(r)?;
            next = r.record.seq + 1;
            records.push(r);
        }
        if got < PAGE as usize {
            break;
        }
    }
    let mut checkpoints = Vec::new();
    let mut next = 0;
    loop {
        let page = client.list_audit_checkpoints(next, PAGE).await?;
        let got = page.checkpoints.len();
        for c in page.checkpoints {
            next = c.seq + 1;
            checkpoints.push(Checkpoint {
                seq: c.seq,
                hash: bytes32(&c.hash, "checkpoint hash")?,
                time_unix_ms: c.time_unix_ms,
                signature: c.signature,
            });
        }
        if got < PAGE as usize {
            break;
        }
    }
    let write = |w: &mut dyn Write| -> std::io::Result<()> {
        for r in &records {
            kms_audit::jsonl::write_record(&mut &mut *w, r)?;
        }
        for c in &checkpoints {
            kms_audit::jsonl::write_checkpoint(&mut &mut *w, c)?;
        }
        w.flush()
    };
    let io = |source| CliError::Io { what: "write", path: out.to_path_buf(), source };
    if out == Path::new("-") {
        write(&mut std::io::stdout().lock()).map_err(io)?;
    } else {
        let mut file = AtomicOutput::create(out)?;
        write(&mut file).map_err(io)?;
        file.commit()?;
        eprintln!("exported {} records and {} checkpoints to {}", records.len(), checkpoints.len(), out.display());
    }
    Ok(())
}

async fn public_key(client: &KmsClient, out: Option<&Path>) -> Result<(), CliError> {
    let key = client.audit_public_key().await?;
    match out {
        None => print!("{}", key.pem),
        Some(path) => {
            let mut file = AtomicOutput::create(path)?;
            file.write_all(key.pem.as_bytes())
                .map_err(|source| CliError::Io { what: "write", path: path.to_path_buf(), source })?;
            file.commit()?;
        }
    }
    Ok(())
}

/// `kmsctl audit verify`: offline, from `--db` or `--file`, with `--public-key`.
/// `kmsctl audit verify`: one trail (`--db` or `--file`, as [`verify`]), or the trails of several
/// servers (`--db` repeated), each against its own anchor; exits 8 if any of them fails, naming
/// the file.
pub fn verify_all(dbs: &[PathBuf], file: Option<&Path>, public_key: &Path, anchors: &[String], format: OutputFormat) -> Result<(), CliError> {
    if dbs.len() <= 1 {
        if anchors.len() > 1 {
            return Err(CliError::Usage(super::UsageError::AnchorsPerTrail { trails: dbs.len().max(1), anchors: anchors.len() }));
        }
        return verify(dbs.first().map(PathBuf::as_path), file, public_key, anchors.first().map(String::as_str), format);
    }
    if !anchors.is_empty() && anchors.len() != dbs.len() {
        return Err(CliError::Usage(super::UsageError::AnchorsPerTrail { trails: dbs.len(), anchors: anchors.len() }));
    }
    let mut first_failure = None;
    for (i, db) in dbs.iter().enumerate() {
        if i > 0 && format == OutputFormat::Table {
            println!();
        }
        match verify(Some(db), None, public_key, anchors.get(i).map(String::as_str), format) {
            Ok(()) => {}
            Err(CliError::Tampered(t)) => {
                first_failure.get_or_insert(Tampered { first: format!("{}: {}", db.display(), t.first) });
            }
            Err(e) => return Err(e),
        }
    }
    match first_failure {
        None => Ok(()),
        Some(t) => Err(CliError::Tampered(t)),
    }
}

pub fn verify(
    db: Option<&Path>,
    file: Option<&Path>,
    public_key: &Path,
    anchor: Option<&str>,
    format: OutputFormat,
) -> Result<(), CliError> {
    let anchor = anchor.map(parse_anchor).transpose()?;
    let pem = std::fs::read_to_string(public_key)
        .map_err(|source| CliError::Io { what: "read", path: public_key.to_path_buf(), source })?;
    let key = kms_audit::verifying_key_from_pem(&pem).map_err(|e| CliError::Io {
        what: "use the public key",
        path: public_key.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    })?;
    let (source, report) = match (db, file) {
        (Some(path), None) => {
            let invalid = |e: kms_audit::AuditDbError| CliError::Io {
                what: "read the audit database",
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            };
            let db = AuditDb::open_read_only(path).map_err(invalid)?;
            let mut report = db.verify(&key).map_err(invalid)?;
            if let Some((seq, hash)) = anchor {
                report.check_anchor(seq, &hash, db.record_hash(seq).map_err(invalid)?);
            }
            (path, report)
        }
        (None, Some(path)) => {
            let f = std::fs::File::open(path).map_err(|source| CliError::Io { what: "open", path: path.to_path_buf(), source })?;
            let trail: Trail = kms_audit::jsonl::read(std::io::BufReader::new(f)).map_err(|e| CliError::Io {
                what: "read the export",
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?;
            let mut report = trail.verify(&key);
            if let Some((seq, hash)) = anchor {
                let at = trail.records.iter().find(|r| r.record.seq == seq).map(|r| r.hash);
                report.check_anchor(seq, &hash, at);
            }
            (path, report)
        }
        // clap requires exactly one of them.
        _ => return Err(CliError::Usage(super::UsageError::AuditSource)),
    };
    let text = match format {
        OutputFormat::Json => serde_json::to_string_pretty(&report_json(&report)).map_err(CliError::Json)?,
        OutputFormat::Table => report_text(source, &report),
    };
    println!("{text}");
    match report.first_problem() {
        None => Ok(()),
        Some(p) => Err(CliError::Tampered(Tampered { first: p.message.clone() })),
    }
}

/// `SEQ:HASH` (hash in hex), as `kmsctl audit anchor` prints it.
fn parse_anchor(text: &str) -> Result<(u64, [u8; 32]), CliError> {
    let bad = || CliError::Usage(super::UsageError::Anchor(text.chars().take(100).collect()));
    let (seq, hash) = text.trim().split_once(':').ok_or_else(bad)?;
    let seq = seq.parse::<u64>().map_err(|_| bad())?;
    if hash.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hash[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok((seq, out))
}

fn report_json(report: &VerifyReport) -> Value {
    let mut v = serde_json::to_value(report).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("intact".into(), Value::Bool(report.is_intact()));
    }
    v
}

fn report_text(source: &Path, report: &VerifyReport) -> String {
    let mut out = format!(
        "{}: {} records, {} checkpoints ({} with a valid signature)\n",
        source.display(),
        report.records,
        report.checkpoints,
        report.valid_checkpoints
    );
    if report.is_intact() {
        out.push_str("INTACT: the chain and every checkpoint signature verify");
    } else {
        out.push_str("TAMPERED:");
        for p in &report.problems {
            out.push_str(&format!("\n  record {}: {}", p.seq, p.message));
        }
    }
    // Only meaningful for an intact trail: otherwise the problems say what is wrong.
    if let (true, Some((first, last))) = (report.is_intact(), report.uncovered) {
        out.push_str(&format!(
            "\nwarning: records {first}..={last} are not covered by a signed checkpoint yet (the server signs one every N records or T seconds)"
        ));
    }
    out
}

fn records_table(records: &[StoredRecord]) -> String {
    let mut t = output::Table::with_headers(&["SEQ", "TIME", "CALLER", "RPC", "KEY", "VERSION", "LEVEL", "OUTCOME", "CODE", "DETAIL"]);
    for s in records {
        let r = &s.record;
        t.row(vec![
            r.seq.to_string(),
            output::utc_timestamp(r.time_unix_ms.div_euclid(1000)),
            dash(&r.caller),
            r.rpc.clone(),
            dash(&r.key),
            if r.key_version == 0 { "-".into() } else { r.key_version.to_string() },
            dash(&r.level),
            r.outcome.as_str().to_owned(),
            kms_client::error::code_name(tonic::Code::from(r.status_code)).to_owned(),
            dash(&r.detail),
        ]);
    }
    t.render()
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

fn record_json(s: &StoredRecord) -> Value {
    let mut line = Vec::new();
    // The same object as an export line, so that scripts see one format.
    let _ = kms_audit::jsonl::write_record(&mut line, s);
    serde_json::from_slice(&line).unwrap_or(Value::Null)
}

fn from_wire(r: WireRecord) -> Result<StoredRecord, CliError> {
    let outcome = r.outcome.parse().map_err(|_| bad_answer("an audit record with an unknown outcome"))?;
    Ok(StoredRecord {
        hash: bytes32(&r.hash, "record hash")?,
        record: kms_audit::AuditRecord {
            seq: r.seq,
            time_unix_ms: r.time_unix_ms,
            caller: r.caller,
            cert_fingerprint: r.cert_fingerprint,
            rpc: r.rpc,
            key: r.key,
            key_version: r.key_version,
            level: r.level,
            outcome,
            status_code: r.status_code,
            request_id: r.request_id,
            context_hash: r.context_hash,
            detail: r.detail,
        },
    })
}

fn bytes32(b: &[u8], what: &'static str) -> Result<[u8; 32], CliError> {
    b.try_into().map_err(|_| bad_answer(what))
}

fn bad_answer(what: &'static str) -> CliError {
    CliError::Io {
        what: "understand the server's answer",
        path: PathBuf::from(what),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what} is malformed")),
    }
}
