//! The JSON-lines export for a SIEM: one JSON object per line, writing it (a record or a
//! checkpoint at a time, or a whole database) and reading it back, strictly, for verification.
//!
//! ```text
//! {"type":"record","seq":1,"time_unix_ms":..,"caller":"..","cert_fingerprint":"<hex>","rpc":"..","key":"..",
//!  "key_version":0,"level":"..","outcome":"ok","status_code":0,"request_id":"..","context_hash":"<hex>",
//!  "detail":"..","hash":"<hex>"}
//! {"type":"checkpoint","seq":..,"hash":"<hex>","time_unix_ms":..,"signature":"<hex>"}
//! ```
//!
//! Byte fields are lowercase hex, `""` when empty. The reader keeps records in file order (it
//! never sorts, so a reordering stays visible to verification), skips blank lines, and refuses
//! an unknown `"type"`, an unknown field or a malformed line with an error naming the line.

use std::io::{self, BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::chain::{Checkpoint, StoredRecord};
use crate::hex;
use crate::record::{AuditRecord, Outcome};
use crate::sqlite::{AuditDb, AuditDbError};

pub use crate::chain::Trail;

/// A line of the export that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    /// Reading the input failed.
    #[error("audit export line {line}: read failed: {source}")]
    Io {
        /// The 1-based line number.
        line: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The line is not a JSON object of the expected shape.
    #[error("audit export line {line}: malformed: {source}")]
    Json {
        /// The 1-based line number.
        line: u64,
        /// What serde_json objected to.
        #[source]
        source: serde_json::Error,
    },
    /// The line's `"type"` is missing or not a string.
    #[error("audit export line {line}: no \"type\" field")]
    MissingType {
        /// The 1-based line number.
        line: u64,
    },
    /// The line's `"type"` is neither `"record"` nor `"checkpoint"`.
    #[error("audit export line {line}: unknown type {found:?} (expected \"record\" or \"checkpoint\")")]
    UnknownType {
        /// The 1-based line number.
        line: u64,
        /// The type found.
        found: String,
    },
    /// A byte field is not hex of the right length.
    #[error("audit export line {line}: field {field} is not {expected}")]
    BadBytes {
        /// The 1-based line number.
        line: u64,
        /// The field's name.
        field: &'static str,
        /// What it should be.
        expected: &'static str,
    },
}

/// A failure while exporting a database.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the database failed.
    #[error(transparent)]
    Db(#[from] AuditDbError),
    /// Writing the export failed.
    #[error("writing the audit export failed: {0}")]
    Io(#[from] io::Error),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordLine {
    seq: u64,
    time_unix_ms: i64,
    caller: String,
    cert_fingerprint: String,
    rpc: String,
    key: String,
    key_version: u32,
    level: String,
    outcome: Outcome,
    status_code: i32,
    request_id: String,
    context_hash: String,
    detail: String,
    hash: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointLine {
    seq: u64,
    hash: String,
    time_unix_ms: i64,
    signature: String,
}

/// A line as written: the `"type"` tag first, then the fields.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line<'a> {
    Record(&'a RecordLine),
    Checkpoint(&'a CheckpointLine),
}

fn write_line(w: &mut impl Write, line: &Line<'_>) -> io::Result<()> {
    serde_json::to_writer(&mut *w, line).map_err(io::Error::from)?;
    w.write_all(b"\n")
}

/// Writes one record as a line.
pub fn write_record(w: &mut impl Write, r: &StoredRecord) -> io::Result<()> {
    let rec = &r.record;
    let line = RecordLine {
        seq: rec.seq,
        time_unix_ms: rec.time_unix_ms,
        caller: rec.caller.clone(),
        cert_fingerprint: hex::encode(&rec.cert_fingerprint),
        rpc: rec.rpc.clone(),
        key: rec.key.clone(),
        key_version: rec.key_version,
        level: rec.level.clone(),
        outcome: rec.outcome,
        status_code: rec.status_code,
        request_id: rec.request_id.clone(),
        context_hash: hex::encode(&rec.context_hash),
        detail: rec.detail.clone(),
        hash: hex::encode(&r.hash),
    };
    write_line(w, &Line::Record(&line))
}

/// Writes one checkpoint as a line.
pub fn write_checkpoint(w: &mut impl Write, c: &Checkpoint) -> io::Result<()> {
    let line = CheckpointLine {
        seq: c.seq,
        hash: hex::encode(&c.hash),
        time_unix_ms: c.time_unix_ms,
        signature: hex::encode(&c.signature),
    };
    write_line(w, &Line::Checkpoint(&line))
}

/// What [`export`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportCounts {
    /// Record lines written.
    pub records: u64,
    /// Checkpoint lines written.
    pub checkpoints: u64,
}

/// Exports a whole database, streaming: every record in seq order, each checkpoint right after
/// the record it covers (checkpoints beyond the last record at the end).
pub fn export(db: &AuditDb, w: &mut impl Write) -> Result<ExportCounts, ExportError> {
    let checkpoints = db.all_checkpoints()?;
    let mut pending = checkpoints.iter().peekable();
    let mut counts = ExportCounts::default();
    db.for_each_record(|r| -> Result<(), ExportError> {
        while let Some(c) = pending.next_if(|c| c.seq < r.record.seq) {
            write_checkpoint(w, c)?;
            counts.checkpoints += 1;
        }
        write_record(w, &r)?;
        counts.records += 1;
        Ok(())
    })?;
    for c in pending {
        write_checkpoint(w, c)?;
        counts.checkpoints += 1;
    }
    w.flush()?;
    Ok(counts)
}

/// Reads an export: records in file order, checkpoints in file order.
pub fn read(r: impl BufRead) -> Result<Trail, JsonlError> {
    let mut trail = Trail::default();
    for (index, text) in r.lines().enumerate() {
        let line = u64::try_from(index).unwrap_or(u64::MAX).saturating_add(1);
        let text = text.map_err(|source| JsonlError::Io { line, source })?;
        if text.trim().is_empty() {
            continue;
        }
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| JsonlError::Json { line, source })?;
        let kind = match value.as_object_mut().and_then(|o| o.remove("type")) {
            Some(serde_json::Value::String(kind)) => kind,
            _ => return Err(JsonlError::MissingType { line }),
        };
        match kind.as_str() {
            "record" => {
                let l: RecordLine =
                    serde_json::from_value(value).map_err(|source| JsonlError::Json { line, source })?;
                trail.records.push(record_from_line(l, line)?);
            }
            "checkpoint" => {
                let l: CheckpointLine =
                    serde_json::from_value(value).map_err(|source| JsonlError::Json { line, source })?;
                trail.checkpoints.push(Checkpoint {
                    seq: l.seq,
                    hash: hash32(&l.hash, line, "hash")?,
                    time_unix_ms: l.time_unix_ms,
                    signature: bytes(&l.signature, line, "signature", "hex")?,
                });
            }
            _ => return Err(JsonlError::UnknownType { line, found: kind }),
        }
    }
    Ok(trail)
}

fn record_from_line(l: RecordLine, line: u64) -> Result<StoredRecord, JsonlError> {
    let record = AuditRecord {
        seq: l.seq,
        time_unix_ms: l.time_unix_ms,
        caller: l.caller,
        cert_fingerprint: hash_or_empty(&l.cert_fingerprint, line, "cert_fingerprint")?,
        rpc: l.rpc,
        key: l.key,
        key_version: l.key_version,
        level: l.level,
        outcome: l.outcome,
        status_code: l.status_code,
        request_id: l.request_id,
        context_hash: hash_or_empty(&l.context_hash, line, "context_hash")?,
        detail: l.detail,
    };
    Ok(StoredRecord { record, hash: hash32(&l.hash, line, "hash")? })
}

fn bytes(s: &str, line: u64, field: &'static str, expected: &'static str) -> Result<Vec<u8>, JsonlError> {
    hex::decode(s).ok_or(JsonlError::BadBytes { line, field, expected })
}

fn hash32(s: &str, line: u64, field: &'static str) -> Result<[u8; 32], JsonlError> {
    const EXPECTED: &str = "64 hex digits";
    <[u8; 32]>::try_from(bytes(s, line, field, EXPECTED)?).map_err(|_| JsonlError::BadBytes {
        line,
        field,
        expected: EXPECTED,
    })
}

fn hash_or_empty(s: &str, line: u64, field: &'static str) -> Result<Vec<u8>, JsonlError> {
    const EXPECTED: &str = "64 hex digits or empty";
    let b = bytes(s, line, field, EXPECTED)?;
    if b.is_empty() || b.len() == 32 {
        Ok(b)
    } else {
        Err(JsonlError::BadBytes { line, field, expected: EXPECTED })
    }
}
