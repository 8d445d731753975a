//! The benchmark (`kms-bench`, run by `scripts/bench`) keeps working: a short run prints every
//! figure of its table. The figures themselves are not checked here; it is not a timed test.

use std::process::Command;

#[test]
fn the_benchmark_runs_and_prints_every_figure() {
    let out = Command::new(kms_e2e::binary("kms-bench")).arg("--smoke").output().expect("run kms-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kms-bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for kind in [
        "GenerateDataKey plaintext+wrapped",
        "GenerateDataKey wrapped only",
        "GenerateDataKey to recipient",
        "DecryptDataKey",
        "Encrypt 4 KiB (in HSM)",
        "ReWrap data key",
    ] {
        // One end-to-end line per number in flight, each with a ratio to the raw figure and the
        // server's peak RSS so far, then the raw line (the best raw run).
        let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with(kind)).collect();
        assert_eq!(lines.len(), 4, "{kind}:\n{stdout}");
        let raw = lines[3][kind.len()..].trim();
        assert!(raw.parse::<f64>().is_ok_and(|r| r > 0.0), "raw figure of {kind}: {raw:?}");
        for line in &lines[..3] {
            let cells: Vec<&str> = line.split_whitespace().collect();
            let (ratio, rss) = (cells[cells.len() - 2], cells[cells.len() - 1]);
            assert!(ratio.ends_with('%') && ratio.trim_end_matches('%').parse::<f64>().is_ok(), "{line}");
            assert!(rss.parse::<f64>().is_ok_and(|mib| mib > 1.0), "{line}");
        }
    }
    for figure in ["raw token keys", "1 keys", "20 keys", "key creation:", "server peak RSS:"] {
        assert!(stdout.contains(figure), "{figure} missing:\n{stdout}");
    }
}
