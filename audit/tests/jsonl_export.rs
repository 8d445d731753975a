//! The JSON-lines export: its exact shape, a lossless round trip, attacks on an export file, and
//! the reader's refusals, each naming the line.

mod common;

use common::{trail, verifying_key};
use kms_audit::jsonl::{self, JsonlError};
use kms_audit::{AuditDb, ProblemKind, Trail};

fn export(path: &std::path::Path) -> String {
    let db = AuditDb::open_read_only(path).unwrap();
    let mut out = Vec::new();
    let counts = jsonl::export(&db, &mut out).unwrap();
    assert_eq!(counts.records, db.record_count().unwrap());
    String::from_utf8(out).unwrap()
}

fn read(text: &str) -> Result<Trail, JsonlError> {
    jsonl::read(text.as_bytes())
}

#[test]
fn export_round_trips_exactly() {
    let (_dir, path) = trail(53);
    let text = export(&path);
    let db_trail = AuditDb::open_read_only(&path).unwrap().trail().unwrap();
    let read_back = read(&text).unwrap();
    assert_eq!(read_back, db_trail);
    assert_eq!(read_back.records.len(), 53);
    assert_eq!(read_back.checkpoints.len(), 5);

    let report = read_back.verify(&verifying_key());
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.uncovered, Some((51, 53)));

    // Writing record by record gives the same lines as the whole-database export, checkpoints
    // following the record they cover.
    let mut manual = Vec::new();
    for r in &db_trail.records {
        jsonl::write_record(&mut manual, r).unwrap();
        if let Some(c) = db_trail.checkpoints.iter().find(|c| c.seq == r.record.seq) {
            jsonl::write_checkpoint(&mut manual, c).unwrap();
        }
    }
    assert_eq!(String::from_utf8(manual).unwrap(), text);
}

#[test]
fn lines_have_the_documented_shape() {
    let (_dir, path) = trail(10);
    let text = export(&path);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 11);
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let keys: Vec<&str> = first.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 15);
    assert!(lines[0].starts_with(r#"{"type":"record","seq":1,"time_unix_ms":1700000001000,"caller":"spiffe://"#));
    assert_eq!(first["outcome"], "refused");
    assert_eq!(first["cert_fingerprint"], "01".repeat(32));
    assert_eq!(first["detail"], "refused: rule 1 \"quoted\" ü");
    // Record 5 has no certificate: empty hex.
    let fifth: serde_json::Value = serde_json::from_str(lines[4]).unwrap();
    assert_eq!(fifth["cert_fingerprint"], "");
    assert_eq!(fifth["caller"], "");
    let hash = first["hash"].as_str().unwrap();
    assert_eq!(hash.len(), 64);
    assert!(hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));

    let cp: serde_json::Value = serde_json::from_str(lines[10]).unwrap();
    assert!(lines[10].starts_with(r#"{"type":"checkpoint","seq":10,"hash":""#));
    assert_eq!(cp.as_object().unwrap().len(), 5);
    assert_eq!(cp["signature"].as_str().unwrap().len(), 128);
    assert_eq!(cp["hash"], serde_json::from_str::<serde_json::Value>(lines[9]).unwrap()["hash"]);
}

/// Swaps the lines holding records `a` and `b`.
fn swap_records(text: &str, a: u64, b: u64) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    let find = |seq: u64| {
        let prefix = format!(r#"{{"type":"record","seq":{seq},"#);
        lines.iter().position(|l| l.starts_with(&prefix)).unwrap()
    };
    let (ia, ib) = (find(a), find(b));
    lines.swap(ia, ib);
    lines.join("\n") + "\n"
}

#[test]
fn swapped_lines_are_named() {
    let (_dir, path) = trail(53);
    let text = export(&path);

    let report = read(&swap_records(&text, 17, 18)).unwrap().verify(&verifying_key());
    let p = report.first_problem().unwrap();
    assert_eq!((p.seq, p.kind), (17, ProblemKind::OutOfOrder));
    assert_eq!(p.message, "record 17 appears after record 18: inserted, duplicated or reordered");
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.records, 53);

    let report = read(&swap_records(&text, 17, 25)).unwrap().verify(&verifying_key());
    let p = report.first_problem().unwrap();
    assert_eq!((p.seq, p.kind), (17, ProblemKind::OutOfOrder));
    assert_eq!(p.message, "record 17 appears after record 24: inserted, duplicated or reordered");
}

#[test]
fn deleted_duplicated_and_edited_lines_are_named() {
    let (_dir, path) = trail(53);
    let text = export(&path);
    let lines: Vec<&str> = text.lines().collect();
    let line_of = |seq: u64| {
        let prefix = format!(r#"{{"type":"record","seq":{seq},"#);
        lines.iter().position(|l| l.starts_with(&prefix)).unwrap()
    };

    let mut deleted = lines.clone();
    deleted.remove(line_of(30));
    let report = read(&deleted.join("\n")).unwrap().verify(&verifying_key());
    let p = report.first_problem().unwrap();
    assert_eq!((p.seq, p.kind), (30, ProblemKind::Missing));

    let mut duplicated = lines.clone();
    duplicated.insert(line_of(30) + 1, lines[line_of(30)]);
    let report = read(&duplicated.join("\n")).unwrap().verify(&verifying_key());
    let p = report.first_problem().unwrap();
    assert_eq!((p.seq, p.kind), (30, ProblemKind::OutOfOrder));
    assert_eq!(p.message, "record 30 appears after record 30: inserted, duplicated or reordered");

    let mut edited = lines.clone();
    let changed = lines[line_of(42)].replace(r#""key":"key-0""#, r#""key":"key-9""#);
    assert_ne!(changed, lines[line_of(42)]);
    edited[line_of(42)] = &changed;
    let report = read(&edited.join("\n")).unwrap().verify(&verifying_key());
    let p = report.first_problem().unwrap();
    assert_eq!((p.seq, p.kind), (42, ProblemKind::HashMismatch));
}

#[test]
fn reader_refuses_bad_lines_naming_them() {
    let (_dir, path) = trail(3);
    let text = export(&path);
    let good: Vec<&str> = text.lines().collect();

    let with_third = |bad: &str| format!("{}\n{}\n{bad}\n", good[0], good[1]);
    let err = read(&with_third(r#"{"type":"heartbeat","seq":3}"#)).unwrap_err();
    assert!(matches!(&err, JsonlError::UnknownType { line: 3, found } if found == "heartbeat"), "{err:?}");
    assert!(err.to_string().contains("line 3"));

    assert!(matches!(read(&with_third("{not json")), Err(JsonlError::Json { line: 3, .. })));
    assert!(matches!(read(&with_third(r#"{"seq":3}"#)), Err(JsonlError::MissingType { line: 3 })));
    assert!(matches!(read(&with_third("[1,2]")), Err(JsonlError::MissingType { line: 3 })));

    let extra = good[2].replacen(r#"{"type":"record","#, r#"{"type":"record","note":"x","#, 1);
    assert!(matches!(read(&with_third(&extra)), Err(JsonlError::Json { line: 3, .. })));
    let no_detail = good[2].replacen(r#","detail":"#, r#","detail_":"#, 1);
    assert!(matches!(read(&with_third(&no_detail)), Err(JsonlError::Json { line: 3, .. })));
    let bad_outcome = good[2].replacen(r#""outcome":"begun""#, r#""outcome":"BEGUN""#, 1);
    assert_ne!(bad_outcome, good[2]);
    assert!(matches!(read(&with_third(&bad_outcome)), Err(JsonlError::Json { line: 3, .. })));

    let set = |field: &str, value: &str| {
        let mut v: serde_json::Value = serde_json::from_str(good[2]).unwrap();
        v[field] = serde_json::Value::String(value.to_owned());
        with_third(&v.to_string())
    };
    assert!(matches!(read(&set("hash", "abcd")), Err(JsonlError::BadBytes { line: 3, field: "hash", .. })));
    assert!(matches!(read(&set("hash", "")), Err(JsonlError::BadBytes { line: 3, field: "hash", .. })));
    assert!(matches!(
        read(&set("cert_fingerprint", "x")),
        Err(JsonlError::BadBytes { line: 3, field: "cert_fingerprint", .. })
    ));
    assert!(matches!(
        read(&set("context_hash", "00")),
        Err(JsonlError::BadBytes { line: 3, field: "context_hash", .. })
    ));
    // Key order does not matter to the reader, and upper-case hex is accepted.
    let upper = set(
        "hash",
        &serde_json::from_str::<serde_json::Value>(good[2]).unwrap()["hash"].as_str().unwrap().to_uppercase(),
    );
    assert_eq!(read(&upper).unwrap(), read(&text).unwrap());

    // Blank lines are skipped, and still counted.
    let spaced = format!("{}\n\n{}\n{{\"type\":\"x\"}}\n", good[0], good[1]);
    assert!(matches!(read(&spaced), Err(JsonlError::UnknownType { line: 4, .. })));
    assert_eq!(read("").unwrap(), Trail::default());
}
