//! The benchmark (`kms-bench`, run by `scripts/bench`) keeps working: a short run prints every
//! figure of its table, on the in-process module and on the network HSM. The figures themselves are
//! not checked here; it is not a timed test.

use std::process::Command;

const KINDS: [&str; 6] = [
    "GenerateDataKey plaintext+wrapped",
    "GenerateDataKey wrapped only",
    "GenerateDataKey to recipient",
    "DecryptDataKey",
    "Encrypt 4 KiB (in HSM)",
    "ReWrap data key",
];

fn run(args: &[&str]) -> String {
    let out = Command::new(kms_e2e::binary("kms-bench")).args(args).output().expect("run kms-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "kms-bench {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// One end-to-end line per number in flight, each with the ratio to the raw figure at as many in
/// flight, the server's CPU per request, the HSM calls and the network HSM's CPU per request (`-`
/// when not counted) and its peak RSS; then the raw line with the best raw rate at each number in flight.
fn check_table(stdout: &str, calls_counted: bool) {
    for kind in KINDS {
        let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with(kind)).collect();
        assert_eq!(lines.len(), 4, "{kind}:\n{stdout}");
        let raw = lines[3][kind.len()..].trim();
        for n in ["1", "8", "64"] {
            let rate = raw.split("  ").find_map(|c| c.trim().strip_prefix(&format!("{n}: "))).unwrap_or("");
            assert!(rate.parse::<f64>().is_ok_and(|r| r > 0.0), "raw figure of {kind} at {n}: {raw:?}");
        }
        for line in &lines[..3] {
            let cells: Vec<&str> = line[kind.len()..].split_whitespace().collect();
            assert_eq!(cells.len(), 13, "{line}");
            assert!(cells[6].ends_with('%') && cells[6].trim_end_matches('%').parse::<f64>().is_ok(), "ratio: {line}");
            for cpu in &cells[7..10] {
                assert!(cpu.parse::<f64>().is_ok(), "CPU: {line}");
            }
            assert!(cells[7].parse::<f64>().unwrap() > 0.0, "server CPU per request: {line}");
            match calls_counted {
                true => {
                    assert!(cells[10].parse::<f64>().is_ok_and(|c| c >= 1.0), "calls: {line}");
                    assert!(cells[11].parse::<f64>().is_ok_and(|us| us > 0.0), "HSM CPU: {line}");
                }
                false => assert_eq!((cells[10], cells[11]), ("-", "-"), "{line}"),
            }
            assert!(cells[12].parse::<f64>().is_ok_and(|mib| mib > 1.0), "RSS: {line}");
        }
    }
}

#[test]
fn the_benchmark_runs_and_prints_every_figure() {
    let stdout = run(&["--smoke"]);
    check_table(&stdout, false);
    for figure in ["raw token keys", "1 keys", "20 keys", "key creation:", "server peak RSS:"] {
        assert!(stdout.contains(figure), "{figure} missing:\n{stdout}");
    }
    assert!(!stdout.contains(" sessions "), "no sessions curve in-process unless asked:\n{stdout}");
}

#[test]
fn the_benchmark_runs_on_the_network_hsm_with_its_sessions_curve() {
    let stdout = run(&["--smoke", "--hsm", "network", "--hsm-latency-ms", "1", "--keys", ""]);
    assert!(stdout.contains("network HSM (hsm-sim serve"), "{stdout}");
    assert!(stdout.contains("1.0 ms added per call, 16 request-path sessions"), "{stdout}");
    check_table(&stdout, true);
    for sessions in ["4 sessions", "16 sessions"] {
        let line = stdout.lines().find(|l| l.starts_with(sessions)).unwrap_or_else(|| panic!("{sessions} missing:\n{stdout}"));
        let cells: Vec<&str> = line[sessions.len()..].split_whitespace().collect();
        assert_eq!(cells.len(), 6, "{line}");
        assert!(cells[0].parse::<f64>().is_ok_and(|r| r > 0.0), "raw: {line}");
        assert!(cells[2].ends_with('%'), "{line}");
        assert!(cells[5].parse::<f64>().is_ok_and(|c| c >= 1.0), "calls: {line}");
    }
    assert!(stdout.contains("server peak RSS:"), "{stdout}");
}

#[test]
fn the_store_comparison_prints_every_row() {
    let stdout = run(&["--compare-stores", "--smoke"]);
    for (label, ratio) in [("SQLite, 1", false), ("PostgreSQL, 1", true), ("PostgreSQL, 2", true)] {
        let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with(label)).collect();
        assert_eq!(lines.len(), 3, "{label}:\n{stdout}");
        for (line, n) in lines.iter().zip(["1", "8", "64"]) {
            let cells: Vec<&str> = line[label.len()..].split_whitespace().collect();
            assert_eq!(cells[0], n, "{line}");
            for figure in &cells[1..4] {
                assert!(figure.parse::<f64>().is_ok_and(|f| f > 0.0), "{line}");
            }
            assert_eq!(cells.len() > 4, ratio, "{line}");
        }
    }
}
