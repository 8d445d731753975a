//! `kmsctl rewrap`: re-wraps a file of blobs, one per line, in `ReWrapBatch` calls.
//!
//! The line format is the one `kmsctl` prints blobs in everywhere: standard base64, as in
//! `datakey generate --output json`'s `wrapped_data_key`. The output has exactly one line per input
//! line, in the same order, so that line N of the output always belongs to line N of the input:
//!
//! - a re-wrapped blob is written in base64;
//! - a line that failed (not base64, or refused by the service) is copied unchanged, and the
//!   summary names it by its line number; its old blob is still as good as it was;
//! - a blank line is copied unchanged and not counted.
//!
//! The output file is written under a temporary name next to it and renamed when every line is
//! done, so a run that stops half-way (the service went away) never leaves a truncated file where
//! a complete one is expected; `--out` may even be `--in`. A call that fails as a whole ends the
//! run with that call's error; item failures do not.
//!
//! Blobs are not secret (they can only be opened by the service), so nothing here is zeroized.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use kms_client::error::code_name;
use kms_client::proto::ReWrapResponse;
use kms_client::{ClientError, KmsClient, ReWrapItem, ResponseProblem};
use serde_json::{json, Value};

use super::args::{OutputFormat, RewrapArgs};
use super::atomic_output::AtomicOutput;
use super::commands::{is_stdio, print_json, print_stdout};
use super::output::Table;
use super::progress::Progress;
use super::{exit, CliError};

/// How many failures the summary lists (all are counted).
pub const FAILURES_SHOWN: usize = 10;

/// Runs `kmsctl rewrap`.
pub async fn run(
    client: &KmsClient,
    args: RewrapArgs,
    format: OutputFormat,
) -> Result<(), CliError> {
    let context = args.context.to_map()?;
    let service = Service {
        client,
        context: &context,
        destination_key: args.destination_key.as_deref(),
    };
    let show_progress = std::io::stderr().is_terminal();
    // Counting needs a second read, so only for a file and only when someone watches the bar.
    let total = if show_progress && !is_stdio(&args.in_file) {
        Some(count_blob_lines(&args.in_file)?)
    } else {
        None
    };
    let mut progress = Progress::new(show_progress, total);
    let mut output = AtomicOutput::create(&args.out_file)?;
    let result = {
        let input = open_input(&args.in_file)?;
        rewrap_lines(
            input,
            &mut output,
            usize::from(args.batch_size),
            &service,
            &mut |summary| progress.update(summary.total, summary.failed),
        )
        .await
    };
    progress.finish();
    let summary = result.map_err(|err| err.into_cli(&args.in_file, &args.out_file))?;
    output.commit()?;
    print_summary(&summary, &args.in_file, &args.out_file, format)?;
    summary.into_result(&args.out_file)
}

/// One `ReWrapBatch` call: the service, or a stand-in in tests.
pub trait BatchReWrapper {
    /// One result per blob, in order; the outer error is the call's.
    async fn re_wrap_batch(
        &self,
        blobs: &[&[u8]],
    ) -> Result<Vec<Result<ReWrapResponse, ClientError>>, ClientError>;
}

/// The service, with the context and destination that every blob of the run shares.
struct Service<'a> {
    client: &'a KmsClient,
    context: &'a BTreeMap<String, String>,
    destination_key: Option<&'a str>,
}

impl BatchReWrapper for Service<'_> {
    async fn re_wrap_batch(
        &self,
        blobs: &[&[u8]],
    ) -> Result<Vec<Result<ReWrapResponse, ClientError>>, ClientError> {
        let items: Vec<ReWrapItem<'_>> = blobs
            .iter()
            .map(|blob| ReWrapItem {
                blob,
                context: self.context,
                destination_key: self.destination_key,
            })
            .collect();
        self.client.re_wrap_batch(&items).await
    }
}

/// Why one line was not re-wrapped.
#[derive(Debug)]
pub enum ItemError {
    /// The line is not standard base64; it was not sent.
    NotBase64(base64::DecodeError),
    /// The service refused the blob (or answered for it out of contract).
    Service(ClientError),
}

impl ItemError {
    /// The gRPC code, when there is one; a line that is not base64 counts as INVALID_ARGUMENT, as
    /// the service would have answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ItemError::NotBase64(_) => Some(tonic::Code::InvalidArgument),
            ItemError::Service(err) => err.code(),
        }
    }

    pub fn message(&self) -> String {
        match self {
            ItemError::NotBase64(err) => format!("not standard base64: {err}"),
            ItemError::Service(ClientError::Rpc(status)) => status.message().to_owned(),
            ItemError::Service(other) => other.to_string(),
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            ItemError::NotBase64(_) => exit::REJECTED,
            ItemError::Service(err) => exit::for_client_error(err),
        }
    }
}

impl fmt::Display for ItemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code() {
            Some(code) => write!(f, "{}: {}", code_name(code), self.message()),
            None => f.write_str(&self.message()),
        }
    }
}

/// A line that was copied unchanged, by its 1-based number in the input.
#[derive(Debug)]
pub struct Failure {
    pub line: usize,
    pub error: ItemError,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Non-blank lines read.
    pub total: usize,
    pub rewrapped: usize,
    pub failed: usize,
    /// The first [`FAILURES_SHOWN`] failures.
    pub failures: Vec<Failure>,
    /// How many blobs went to each (key id, version).
    pub rewrapped_to: BTreeMap<(String, u32), usize>,
}

impl Summary {
    fn record_failure(&mut self, line: usize, error: ItemError) {
        self.failed += 1;
        if self.failures.len() < FAILURES_SHOWN {
            self.failures.push(Failure { line, error });
        }
    }

    fn record_success(&mut self, response: &ReWrapResponse) {
        self.rewrapped += 1;
        *self
            .rewrapped_to
            .entry((response.key_id.clone(), response.key_version))
            .or_default() += 1;
    }

    /// `Ok` when every blob was re-wrapped; otherwise the error that sets the exit code (the
    /// first failure's).
    fn into_result(self, out: &Path) -> Result<(), CliError> {
        let total = self.total;
        let failed = self.failed;
        match self.failures.into_iter().next() {
            None => Ok(()),
            Some(first) => Err(CliError::ItemsFailed(Box::new(ItemsFailed {
                failed,
                total,
                out: out.to_path_buf(),
                first,
            }))),
        }
    }
}

/// Some blobs were not re-wrapped; the output file was still written.
#[derive(Debug, thiserror::Error)]
#[error(
    "{failed} of {total} blobs were not re-wrapped and their lines were copied unchanged to {} \
     (first: line {}: {})",
    out.display(), first.line, first.error
)]
pub struct ItemsFailed {
    pub failed: usize,
    pub total: usize,
    pub out: PathBuf,
    pub first: Failure,
}

impl ItemsFailed {
    pub fn exit_code(&self) -> u8 {
        self.first.error.exit_code()
    }
}

/// One input line, without its line terminator.
struct Line {
    number: usize,
    text: Vec<u8>,
    kind: LineKind,
}

enum LineKind {
    Blank,
    NotBase64(base64::DecodeError),
    Blob(Vec<u8>),
}

/// What stops a run before its end.
#[derive(Debug)]
pub enum RunError {
    Read(std::io::Error),
    Write(std::io::Error),
    /// A whole `ReWrapBatch` call failed.
    Call(ClientError),
}

impl RunError {
    fn into_cli(self, in_file: &Path, out_file: &Path) -> CliError {
        match self {
            RunError::Read(source) => CliError::Io {
                what: "read",
                path: in_file.to_path_buf(),
                source,
            },
            RunError::Write(source) => CliError::Io {
                what: "write",
                path: out_file.to_path_buf(),
                source,
            },
            RunError::Call(err) => err.into(),
        }
    }
}

/// Re-wraps every line of `input` into `output` in calls of at most `batch_size` lines, calling
/// `progress` after each call. Returns the summary, or the first error that stops the run (a
/// failed call, or I/O).
pub async fn rewrap_lines<R: BufRead, W: Write>(
    mut input: R,
    output: &mut W,
    batch_size: usize,
    service: &impl BatchReWrapper,
    progress: &mut impl FnMut(&Summary),
) -> Result<Summary, RunError> {
    let mut summary = Summary::default();
    let mut read = 0usize;
    progress(&summary);
    loop {
        let chunk = read_chunk(&mut input, &mut read, batch_size.max(1))?;
        if chunk.is_empty() {
            break;
        }
        let blobs: Vec<&[u8]> = chunk
            .iter()
            .filter_map(|line| match &line.kind {
                LineKind::Blob(blob) => Some(blob.as_slice()),
                _ => None,
            })
            .collect();
        let sent = blobs.len();
        let results = service
            .re_wrap_batch(&blobs)
            .await
            .map_err(RunError::Call)?;
        if results.len() != sent {
            return Err(RunError::Call(ClientError::BadResponse(
                ResponseProblem::BatchLength {
                    sent,
                    received: results.len(),
                },
            )));
        }
        let mut results = results.into_iter();
        let mut text = Vec::new();
        for line in chunk {
            text.clear();
            match line.kind {
                LineKind::Blank => text.extend_from_slice(&line.text),
                LineKind::NotBase64(err) => {
                    summary.total += 1;
                    summary.record_failure(line.number, ItemError::NotBase64(err));
                    text.extend_from_slice(&line.text);
                }
                LineKind::Blob(_) => {
                    summary.total += 1;
                    // Invariant: one result per blob, checked above.
                    let result = results.next().expect("one result per blob");
                    match result {
                        Ok(response) => {
                            summary.record_success(&response);
                            text.extend_from_slice(BASE64.encode(&response.blob).as_bytes());
                        }
                        Err(err) => {
                            summary.record_failure(line.number, ItemError::Service(err));
                            text.extend_from_slice(&line.text);
                        }
                    }
                }
            }
            text.push(b'\n');
            output.write_all(&text).map_err(RunError::Write)?;
        }
        progress(&summary);
    }
    output.flush().map_err(RunError::Write)?;
    Ok(summary)
}

/// Up to `lines` lines; `read` counts the lines read so far (for 1-based line numbers).
fn read_chunk(
    input: &mut impl BufRead,
    read: &mut usize,
    lines: usize,
) -> Result<Vec<Line>, RunError> {
    let mut chunk = Vec::new();
    while chunk.len() < lines {
        let mut text = Vec::new();
        let n = input.read_until(b'\n', &mut text).map_err(RunError::Read)?;
        if n == 0 {
            break;
        }
        *read += 1;
        if text.last() == Some(&b'\n') {
            text.pop();
            if text.last() == Some(&b'\r') {
                text.pop();
            }
        }
        let trimmed = text.trim_ascii();
        let kind = if trimmed.is_empty() {
            LineKind::Blank
        } else {
            match BASE64.decode(trimmed) {
                Ok(blob) => LineKind::Blob(blob),
                Err(err) => LineKind::NotBase64(err),
            }
        };
        chunk.push(Line {
            number: *read,
            text,
            kind,
        });
    }
    Ok(chunk)
}

fn open_input(path: &Path) -> Result<Box<dyn BufRead>, CliError> {
    if is_stdio(path) {
        return Ok(Box::new(std::io::stdin().lock()));
    }
    let file = File::open(path).map_err(|source| CliError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Box::new(BufReader::new(file)))
}

/// The non-blank lines of a file, for the progress bar's total.
fn count_blob_lines(path: &Path) -> Result<usize, CliError> {
    let io_error = |source| CliError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    };
    let mut input = BufReader::new(File::open(path).map_err(io_error)?);
    let mut count = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line).map_err(io_error)? == 0 {
            return Ok(count);
        }
        if !line.trim_ascii().is_empty() {
            count += 1;
        }
    }
}

fn print_summary(
    summary: &Summary,
    in_file: &Path,
    out_file: &Path,
    format: OutputFormat,
) -> Result<(), CliError> {
    match format {
        OutputFormat::Json => print_json(&summary_json(summary, in_file, out_file)),
        OutputFormat::Table => print_stdout(summary_table(summary, in_file, out_file).as_bytes()),
    }
}

pub fn summary_json(summary: &Summary, in_file: &Path, out_file: &Path) -> Value {
    json!({
        "in": in_file.display().to_string(),
        "out": out_file.display().to_string(),
        "total": summary.total,
        "rewrapped": summary.rewrapped,
        "failed": summary.failed,
        "rewrapped_to": summary.rewrapped_to.iter().map(|((key_id, version), blobs)| json!({
            "key_id": key_id,
            "key_version": version,
            "blobs": blobs,
        })).collect::<Vec<_>>(),
        "failures": summary.failures.iter().map(|f| json!({
            "line": f.line,
            "code": f.error.code().map(code_name),
            "message": f.error.message(),
        })).collect::<Vec<_>>(),
    })
}

pub fn summary_table(summary: &Summary, in_file: &Path, out_file: &Path) -> String {
    let mut fields = Table::fields();
    fields
        .row(vec!["in".into(), in_file.display().to_string()])
        .row(vec!["out".into(), out_file.display().to_string()])
        .row(vec!["total".into(), summary.total.to_string()])
        .row(vec!["rewrapped".into(), summary.rewrapped.to_string()])
        .row(vec!["failed".into(), summary.failed.to_string()]);
    let mut text = fields.render();
    if !summary.rewrapped_to.is_empty() {
        let mut to = Table::with_headers(&["KEY_ID", "VERSION", "BLOBS"]);
        for ((key_id, version), blobs) in &summary.rewrapped_to {
            to.row(vec![key_id.clone(), version.to_string(), blobs.to_string()]);
        }
        text.push('\n');
        text.push_str(&to.render());
    }
    if summary.failed > 0 {
        text.push_str("\nfailed lines (copied unchanged):\n");
        for f in &summary.failures {
            text.push_str(&format!("  line {}: {}\n", f.line, f.error));
        }
        let more = summary.failed - summary.failures.len();
        if more > 0 {
            text.push_str(&format!("  ... and {more} more\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Re-wraps `b"old:X"` into `b"new:X"` at version 2 and refuses anything else, recording the
    /// size of each call.
    #[derive(Default)]
    struct Fake {
        calls: RefCell<Vec<usize>>,
    }

    impl BatchReWrapper for Fake {
        async fn re_wrap_batch(
            &self,
            blobs: &[&[u8]],
        ) -> Result<Vec<Result<ReWrapResponse, ClientError>>, ClientError> {
            self.calls.borrow_mut().push(blobs.len());
            Ok(blobs
                .iter()
                .map(|blob| match blob.strip_prefix(b"old:") {
                    Some(rest) => Ok(ReWrapResponse {
                        blob: [b"new:".as_slice(), rest].concat(),
                        key_id: "00ff".into(),
                        key_version: 2,
                        ..Default::default()
                    }),
                    None => Err(tonic::Status::invalid_argument("invalid blob: bad magic").into()),
                })
                .collect())
        }
    }

    fn b64(bytes: &[u8]) -> String {
        BASE64.encode(bytes)
    }

    async fn run_on(
        input: &str,
        batch: usize,
        fake: &Fake,
    ) -> (String, Summary, Vec<(usize, usize)>) {
        let mut out = Vec::new();
        let mut seen = Vec::new();
        let summary = rewrap_lines(
            input.as_bytes(),
            &mut out,
            batch,
            fake,
            &mut |s: &Summary| seen.push((s.total, s.failed)),
        )
        .await
        .unwrap();
        (String::from_utf8(out).unwrap(), summary, seen)
    }

    #[tokio::test]
    async fn output_has_one_line_per_input_line_in_order_with_failures_copied() {
        let input = format!(
            "{}\n{}\r\nnot base64!\n\n{}\n  {}  \n",
            b64(b"old:a"),
            b64(b"old:b"),
            b64(b"corrupt"),
            b64(b"old:c")
        );
        let fake = Fake::default();
        let (out, summary, _) = run_on(&input, 100, &fake).await;
        assert_eq!(
            out,
            format!(
                "{}\n{}\nnot base64!\n\n{}\n{}\n",
                b64(b"new:a"),
                b64(b"new:b"),
                b64(b"corrupt"),
                b64(b"new:c")
            )
        );
        assert_eq!(
            (summary.total, summary.rewrapped, summary.failed),
            (5, 3, 2)
        );
        let failures: Vec<(usize, String)> = summary
            .failures
            .iter()
            .map(|f| (f.line, f.error.to_string()))
            .collect();
        assert_eq!(failures[0].0, 3);
        assert!(
            failures[0]
                .1
                .starts_with("INVALID_ARGUMENT: not standard base64: "),
            "{}",
            failures[0].1
        );
        assert_eq!(
            failures[1],
            (5, "INVALID_ARGUMENT: invalid blob: bad magic".to_owned())
        );
        assert_eq!(
            summary.rewrapped_to,
            BTreeMap::from([(("00ff".to_owned(), 2), 3)])
        );
        // Only blobs are sent: the bad line and the blank one are not.
        assert_eq!(*fake.calls.borrow(), [4]);
    }

    #[tokio::test]
    async fn lines_are_sent_in_batches_and_progress_follows() {
        let input: String = (0..7)
            .map(|i| b64(format!("old:{i}").as_bytes()) + "\n")
            .collect();
        let fake = Fake::default();
        let (out, summary, seen) = run_on(&input, 3, &fake).await;
        assert_eq!(*fake.calls.borrow(), [3, 3, 1]);
        assert_eq!(out.lines().count(), 7);
        assert_eq!(out.lines().last(), Some(b64(b"new:6").as_str()));
        assert_eq!(seen, [(0, 0), (3, 0), (6, 0), (7, 0)]);
        assert_eq!(summary.failed, 0);
        assert!(summary.into_result(Path::new("out")).is_ok());
    }

    #[tokio::test]
    async fn a_last_line_without_newline_and_an_empty_input_work() {
        let fake = Fake::default();
        let (out, summary, _) = run_on(&b64(b"old:z"), 10, &fake).await;
        assert_eq!(out, format!("{}\n", b64(b"new:z")));
        assert_eq!(summary.total, 1);
        let (out, summary, _) = run_on("", 10, &fake).await;
        assert_eq!((out.as_str(), summary.total), ("", 0));
        assert_eq!(fake.calls.borrow().len(), 1, "no call for an empty input");
    }

    #[tokio::test]
    async fn failures_set_the_exit_code_and_the_summary_lists_the_first_ones() {
        let input: String = (0..13).map(|_| b64(b"corrupt") + "\n").collect();
        let (_, summary, _) = run_on(&input, 5, &Fake::default()).await;
        assert_eq!(
            (summary.failed, summary.failures.len()),
            (13, FAILURES_SHOWN)
        );
        let table = summary_table(&summary, Path::new("in.txt"), Path::new("out.txt"));
        assert!(
            table.starts_with("in         in.txt\nout        out.txt\ntotal      13\nrewrapped  0\nfailed     13\n"),
            "{table}"
        );
        assert!(
            table.contains("\nfailed lines (copied unchanged):\n  line 1: INVALID_ARGUMENT: invalid blob: bad magic\n"),
            "{table}"
        );
        assert!(
            table.ends_with(
                "  line 10: INVALID_ARGUMENT: invalid blob: bad magic\n  ... and 3 more\n"
            ),
            "{table}"
        );
        let json = summary_json(&summary, Path::new("in.txt"), Path::new("out.txt"));
        assert_eq!(json["failed"], 13);
        assert_eq!(
            json["failures"][0],
            json!({"line": 1, "code": "INVALID_ARGUMENT", "message": "invalid blob: bad magic"})
        );
        let err = summary.into_result(Path::new("out.txt")).unwrap_err();
        assert_eq!(err.exit_code(), exit::REJECTED);
        assert_eq!(
            err.message(),
            "13 of 13 blobs were not re-wrapped and their lines were copied unchanged to out.txt \
             (first: line 1: INVALID_ARGUMENT: invalid blob: bad magic)"
        );
    }

    #[tokio::test]
    async fn a_failed_call_stops_the_run() {
        struct Down;
        impl BatchReWrapper for Down {
            async fn re_wrap_batch(
                &self,
                _: &[&[u8]],
            ) -> Result<Vec<Result<ReWrapResponse, ClientError>>, ClientError> {
                Err(tonic::Status::unavailable("connection refused").into())
            }
        }
        let mut out = Vec::new();
        let err = rewrap_lines(
            format!("{}\n", b64(b"old:a")).as_bytes(),
            &mut out,
            10,
            &Down,
            &mut |_| {},
        )
        .await
        .unwrap_err();
        let err = err.into_cli(Path::new("in"), Path::new("out"));
        assert_eq!(err.exit_code(), exit::UNAVAILABLE);
        assert!(out.is_empty());
    }

    #[test]
    fn blank_lines_are_not_counted_for_the_progress_total() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.txt");
        std::fs::write(&path, "a\n\n  \nb\r\nc").unwrap();
        assert_eq!(count_blob_lines(&path).unwrap(), 3);
    }
}
