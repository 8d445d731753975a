//! Reading the audit database: the head, pages of records and checkpoints, a streaming iterator
//! over the whole trail, and the decoding of every column. Rows are checked value by value: a
//! value of the wrong type, range or length is a `CorruptRow`/`CorruptCheckpoint` naming the row.

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, Params, Row};

use super::{AuditDb, AuditDbError};
use crate::chain::{Chain, Checkpoint, StoredRecord, Trail};
use crate::record::{AuditRecord, Outcome};
use crate::verify::VerifyReport;

const RECORD_COLUMNS: &str = "seq, time_ms, caller, cert_fingerprint, rpc, key, key_version, level, outcome, \
                              status_code, request_id, context_hash, detail, hash";
const CHECKPOINT_COLUMNS: &str = "seq, hash, time_ms, signature";

/// How many records the streaming iterator fetches at a time.
const PAGE: u32 = 1024;

/// Reads the values of one row, attributing every defect to the row's seq.
struct Cols<'a, 'r> {
    row: &'a Row<'r>,
    seq: i64,
    corrupt: fn(i64, &'static str) -> AuditDbError,
}

impl<'a, 'r> Cols<'a, 'r> {
    fn new(row: &'a Row<'r>, corrupt: fn(i64, &'static str) -> AuditDbError) -> Result<Self, AuditDbError> {
        // Column 0 is always `seq`, an INTEGER PRIMARY KEY (so always an integer in SQLite, but a
        // view in a hostile file could give anything).
        let seq = match row.get_ref(0).map_err(AuditDbError::sqlite("read row"))? {
            ValueRef::Integer(i) => i,
            _ => return Err(corrupt(i64::MIN, "seq is not an integer")),
        };
        Ok(Cols { row, seq, corrupt })
    }

    fn bad(&self, what: &'static str) -> AuditDbError {
        (self.corrupt)(self.seq, what)
    }

    fn value(&self, idx: usize) -> Result<ValueRef<'a>, AuditDbError> {
        self.row.get_ref(idx).map_err(AuditDbError::sqlite("read row"))
    }

    /// `seq` as a positive sequence number.
    fn seq(&self) -> Result<u64, AuditDbError> {
        u64::try_from(self.seq).ok().filter(|s| *s > 0).ok_or_else(|| self.bad("seq is not a positive number"))
    }

    fn int(&self, idx: usize, what: &'static str) -> Result<i64, AuditDbError> {
        match self.value(idx)? {
            ValueRef::Integer(i) => Ok(i),
            _ => Err(self.bad(what)),
        }
    }

    fn text(&self, idx: usize, what: &'static str) -> Result<String, AuditDbError> {
        match self.value(idx)? {
            ValueRef::Text(t) => std::str::from_utf8(t).map(str::to_owned).map_err(|_| self.bad(what)),
            _ => Err(self.bad(what)),
        }
    }

    fn blob(&self, idx: usize, what: &'static str) -> Result<&'a [u8], AuditDbError> {
        match self.value(idx)? {
            ValueRef::Blob(b) => Ok(b),
            _ => Err(self.bad(what)),
        }
    }

    /// A 32-byte blob.
    fn hash(&self, idx: usize, what: &'static str) -> Result<[u8; 32], AuditDbError> {
        <[u8; 32]>::try_from(self.blob(idx, what)?).map_err(|_| self.bad(what))
    }

    /// A 32-byte or empty blob.
    fn hash_or_empty(&self, idx: usize, what: &'static str) -> Result<Vec<u8>, AuditDbError> {
        let b = self.blob(idx, what)?;
        if b.is_empty() || b.len() == 32 {
            Ok(b.to_vec())
        } else {
            Err(self.bad(what))
        }
    }
}

fn corrupt_record(seq: i64, what: &'static str) -> AuditDbError {
    AuditDbError::CorruptRow { seq, what }
}

fn corrupt_checkpoint(seq: i64, what: &'static str) -> AuditDbError {
    AuditDbError::CorruptCheckpoint { seq, what }
}

/// Decodes a row selected with `RECORD_COLUMNS`.
fn decode_record(row: &Row<'_>) -> Result<StoredRecord, AuditDbError> {
    let c = Cols::new(row, corrupt_record)?;
    let record = AuditRecord {
        seq: c.seq()?,
        time_unix_ms: c.int(1, "time_ms is not an integer")?,
        caller: c.text(2, "caller is not UTF-8 text")?,
        cert_fingerprint: c.hash_or_empty(3, "cert_fingerprint is not a 32-byte or empty blob")?,
        rpc: c.text(4, "rpc is not UTF-8 text")?,
        key: c.text(5, "key is not UTF-8 text")?,
        key_version: u32::try_from(c.int(6, "key_version is not an integer")?)
            .map_err(|_| c.bad("key_version is out of range"))?,
        level: c.text(7, "level is not UTF-8 text")?,
        outcome: c
            .text(8, "outcome is not text")?
            .parse::<Outcome>()
            .map_err(|_| c.bad("outcome is not ok, refused, failed or begun"))?,
        status_code: i32::try_from(c.int(9, "status_code is not an integer")?)
            .map_err(|_| c.bad("status_code is out of range"))?,
        request_id: c.text(10, "request_id is not UTF-8 text")?,
        context_hash: c.hash_or_empty(11, "context_hash is not a 32-byte or empty blob")?,
        detail: c.text(12, "detail is not UTF-8 text")?,
    };
    let hash = c.hash(13, "hash is not a 32-byte blob")?;
    Ok(StoredRecord { record, hash })
}

/// Decodes a row selected with `CHECKPOINT_COLUMNS`. The signature may have any length:
/// verification judges it.
fn decode_checkpoint(row: &Row<'_>) -> Result<Checkpoint, AuditDbError> {
    let c = Cols::new(row, corrupt_checkpoint)?;
    let seq = u64::try_from(c.seq).map_err(|_| c.bad("seq is negative"))?;
    Ok(Checkpoint {
        seq,
        hash: c.hash(1, "hash is not a 32-byte blob")?,
        time_unix_ms: c.int(2, "time_ms is not an integer")?,
        signature: c.blob(3, "signature is not a blob")?.to_vec(),
    })
}

/// Runs a query and decodes every row with `decode`.
fn query<T, P: Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    decode: fn(&Row<'_>) -> Result<T, AuditDbError>,
) -> Result<Vec<T>, AuditDbError> {
    let mut stmt = conn.prepare_cached(sql).map_err(AuditDbError::sqlite("prepare query"))?;
    let mut rows = stmt.query(params).map_err(AuditDbError::sqlite("query"))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(AuditDbError::sqlite("read rows"))? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// The stored head: the last record's seq and stored hash, or the empty chain.
pub(super) fn head_of(conn: &Connection) -> Result<Chain, AuditDbError> {
    let sql = format!("SELECT {RECORD_COLUMNS} FROM audit_records ORDER BY seq DESC LIMIT 1");
    let last = query(conn, &sql, [], decode_record)?;
    Ok(last.first().map_or_else(Chain::new, |s| Chain { seq: s.record.seq, hash: s.hash }))
}

/// A `u64` lower bound as SQLite's `i64`, `None` when no row can reach it.
fn lower_bound(from_seq: u64) -> Option<i64> {
    i64::try_from(from_seq).ok()
}

impl AuditDb {
    /// The last record's seq and STORED hash; [`Chain::new`] if there are no records.
    pub fn head(&self) -> Result<Chain, AuditDbError> {
        head_of(&self.conn)
    }

    /// The checkpoint with the highest seq, if any.
    pub fn last_checkpoint(&self) -> Result<Option<Checkpoint>, AuditDbError> {
        let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY seq DESC LIMIT 1");
        Ok(query(&self.conn, &sql, [], decode_checkpoint)?.into_iter().next())
    }

    /// Up to `limit` records with seq >= `from_seq`, ascending.
    pub fn records(&self, from_seq: u64, limit: u32) -> Result<Vec<StoredRecord>, AuditDbError> {
        let Some(from) = lower_bound(from_seq) else { return Ok(Vec::new()) };
        self.records_from(from, limit)
    }

    fn records_from(&self, from: i64, limit: u32) -> Result<Vec<StoredRecord>, AuditDbError> {
        let sql = format!("SELECT {RECORD_COLUMNS} FROM audit_records WHERE seq >= ?1 ORDER BY seq LIMIT ?2");
        query(&self.conn, &sql, params![from, i64::from(limit)], decode_record)
    }

    /// The last `n` records, ascending.
    pub fn last_records(&self, n: u32) -> Result<Vec<StoredRecord>, AuditDbError> {
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM (SELECT {RECORD_COLUMNS} FROM audit_records ORDER BY seq DESC LIMIT ?1) \
             ORDER BY seq"
        );
        query(&self.conn, &sql, [i64::from(n)], decode_record)
    }

    /// Up to `limit` checkpoints with seq >= `from_seq`, ascending.
    pub fn checkpoints(&self, from_seq: u64, limit: u32) -> Result<Vec<Checkpoint>, AuditDbError> {
        let Some(from) = lower_bound(from_seq) else { return Ok(Vec::new()) };
        self.checkpoints_from(from, i64::from(limit))
    }

    fn checkpoints_from(&self, from: i64, limit: i64) -> Result<Vec<Checkpoint>, AuditDbError> {
        let sql = format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE seq >= ?1 ORDER BY seq LIMIT ?2");
        query(&self.conn, &sql, params![from, limit], decode_checkpoint)
    }

    /// Every checkpoint, ascending (a row with a bad seq is an error, not skipped).
    pub fn all_checkpoints(&self) -> Result<Vec<Checkpoint>, AuditDbError> {
        self.checkpoints_from(i64::MIN, -1)
    }

    /// The trail's id (schema version 2); `None` for a version 1 file never opened for writing.
    /// An id that is not 16 bytes, or more than one, is a corrupt file.
    pub fn trail_id(&self) -> Result<Option<[u8; 16]>, AuditDbError> {
        let exists: bool = self
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_trail')", [], |r| r.get(0))
            .map_err(AuditDbError::sqlite("inspect schema"))?;
        if !exists {
            return Ok(None);
        }
        let mut stmt = self.conn.prepare_cached("SELECT trail_id FROM audit_trail").map_err(AuditDbError::sqlite("read trail id"))?;
        let mut rows = stmt.query([]).map_err(AuditDbError::sqlite("read trail id"))?;
        let mut found = None;
        while let Some(row) = rows.next().map_err(AuditDbError::sqlite("read trail id"))? {
            let id = match row.get_ref(0).map_err(AuditDbError::sqlite("read trail id"))? {
                ValueRef::Blob(b) => <[u8; 16]>::try_from(b).map_err(|_| AuditDbError::CorruptRow { seq: 0, what: "the trail id is not 16 bytes" })?,
                _ => return Err(AuditDbError::CorruptRow { seq: 0, what: "the trail id is not a blob" }),
            };
            if found.replace(id).is_some() {
                return Err(AuditDbError::CorruptRow { seq: 0, what: "the file holds more than one trail id" });
            }
        }
        Ok(found)
    }

    /// The stored hash of record `seq`, if the trail holds it.
    pub fn record_hash(&self, seq: u64) -> Result<Option<[u8; 32]>, AuditDbError> {
        let Some(from) = lower_bound(seq) else { return Ok(None) };
        Ok(self.records_from(from, 1)?.into_iter().find(|r| r.record.seq == seq).map(|r| r.hash))
    }

    /// The outcomes recorded for `request_id` in records from `from_seq` on, in order (a request
    /// has a `begun` record and then its outcome; most have only the outcome). Scans forward from
    /// `from_seq`: the caller gives the sequence number of the request's first record when known.
    pub fn outcomes_of(&self, request_id: &str, from_seq: u64) -> Result<Vec<Outcome>, AuditDbError> {
        let Some(from) = lower_bound(from_seq) else { return Ok(Vec::new()) };
        let mut stmt = self
            .conn
            .prepare_cached("SELECT outcome FROM audit_records WHERE seq >= ?1 AND request_id = ?2 ORDER BY seq")
            .map_err(AuditDbError::sqlite("look up a request's records"))?;
        let mut rows = stmt.query(params![from, request_id]).map_err(AuditDbError::sqlite("look up a request's records"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(AuditDbError::sqlite("look up a request's records"))? {
            let outcome = match row.get_ref(0).map_err(AuditDbError::sqlite("look up a request's records"))? {
                ValueRef::Text(t) => std::str::from_utf8(t).ok().and_then(|t| t.parse::<Outcome>().ok()),
                _ => None,
            };
            out.push(outcome.ok_or(AuditDbError::CorruptRow { seq: from, what: "outcome is not ok, refused, failed or begun" })?);
        }
        Ok(out)
    }

    /// How many record rows the file holds.
    pub fn record_count(&self) -> Result<u64, AuditDbError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM audit_records", [], |r| r.get(0))
            .map_err(AuditDbError::sqlite("count records"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Streams every record in seq order, a page at a time, without loading the trail. A row
    /// with a bad seq (zero or negative) is yielded as an error, not skipped; the iterator ends
    /// after the first error.
    pub fn iter_records(&self) -> RecordIter<'_> {
        RecordIter { db: self, next_from: Some(i64::MIN), page: Vec::new().into_iter() }
    }

    /// Calls `f` with every record in seq order, streaming (see [`AuditDb::iter_records`]); stops at
    /// the first error, of the database or of `f`.
    pub fn for_each_record<E, F>(&self, mut f: F) -> Result<(), E>
    where
        E: From<AuditDbError>,
        F: FnMut(StoredRecord) -> Result<(), E>,
    {
        for r in self.iter_records() {
            f(r?)?;
        }
        Ok(())
    }

    /// The whole trail in memory: records in seq order, checkpoints in seq order.
    pub fn trail(&self) -> Result<Trail, AuditDbError> {
        let records = self.iter_records().collect::<Result<Vec<_>, _>>()?;
        Ok(Trail { records, checkpoints: self.all_checkpoints()? })
    }

    /// Verifies the stored trail against the checkpoint signing key, streaming the records (see
    /// [`crate::verify()`]). A row that cannot be decoded is an error rather than a report.
    pub fn verify(&self, key: &p256::ecdsa::VerifyingKey) -> Result<VerifyReport, AuditDbError> {
        let checkpoints = self.all_checkpoints()?;
        let mut failure = None;
        let records = self.iter_records().map_while(|r| match r {
            Ok(s) => Some(s),
            Err(e) => {
                failure = Some(e);
                None
            }
        });
        let report = crate::verify::verify(records, &checkpoints, key);
        match failure {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}

/// Streams the records of an [`AuditDb`] in seq order (see [`AuditDb::iter_records`]).
#[derive(Debug)]
pub struct RecordIter<'a> {
    db: &'a AuditDb,
    /// The lowest seq of the next page; `None` once finished.
    next_from: Option<i64>,
    page: std::vec::IntoIter<StoredRecord>,
}

impl Iterator for RecordIter<'_> {
    type Item = Result<StoredRecord, AuditDbError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(r) = self.page.next() {
            return Some(Ok(r));
        }
        let from = self.next_from?;
        match self.db.records_from(from, PAGE) {
            Err(e) => {
                self.next_from = None;
                Some(Err(e))
            }
            Ok(page) => {
                self.next_from = match page.last() {
                    Some(last) => i64::try_from(last.record.seq).ok().and_then(|s| s.checked_add(1)),
                    None => None,
                };
                self.page = page.into_iter();
                self.page.next().map(Ok)
            }
        }
    }
}
