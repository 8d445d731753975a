//! A tiny one-line progress bar for long `kmsctl` runs, drawn on stderr with `\r` (no terminal
//! library): stdout stays for the command's result.
#![forbid(unsafe_code)]

use std::io::Write;

/// A one-line progress bar on stderr, redrawn with `\r`; silent unless `shown` (the caller asks
/// whether stderr is a terminal).
pub struct Progress {
    shown: bool,
    total: Option<usize>,
    last_len: usize,
}

impl Progress {
    pub fn new(shown: bool, total: Option<usize>) -> Progress {
        Progress {
            shown,
            total,
            last_len: 0,
        }
    }

    /// Redraws the bar: `done` items so far, of which `failed` failed.
    pub fn update(&mut self, done: usize, failed: usize) {
        if !self.shown {
            return;
        }
        let line = progress_line(done, failed, self.total);
        let pad = self.last_len.saturating_sub(line.chars().count());
        self.last_len = line.chars().count();
        let mut stderr = std::io::stderr().lock();
        // A progress bar that cannot be drawn is not worth failing the run for.
        let _ = write!(stderr, "\r{line}{}", " ".repeat(pad));
        let _ = stderr.flush();
    }

    pub fn finish(&mut self) {
        if self.shown && self.last_len > 0 {
            let _ = writeln!(std::io::stderr().lock());
        }
    }
}

const BAR_WIDTH: usize = 30;

/// `re-wrapping [#########---------------------]  30% 300/1000 blobs, 2 failed`, or without a
/// known total `re-wrapping: 300 blobs, 2 failed`.
pub fn progress_line(done: usize, failed: usize, total: Option<usize>) -> String {
    let failed = if failed == 0 {
        String::new()
    } else {
        format!(", {failed} failed")
    };
    match total {
        Some(total) if total > 0 => {
            let done = done.min(total);
            let filled = done * BAR_WIDTH / total;
            format!(
                "re-wrapping [{}{}] {:>3}% {done}/{total} blobs{failed}",
                "#".repeat(filled),
                "-".repeat(BAR_WIDTH - filled),
                done * 100 / total,
            )
        }
        _ => format!("re-wrapping: {done} blobs{failed}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_shows_a_bar_with_a_total_and_a_count_without() {
        assert_eq!(
            progress_line(300, 2, Some(1000)),
            "re-wrapping [#########---------------------]  30% 300/1000 blobs, 2 failed"
        );
        assert_eq!(
            progress_line(1000, 0, Some(1000)),
            "re-wrapping [##############################] 100% 1000/1000 blobs"
        );
        assert_eq!(progress_line(12, 0, None), "re-wrapping: 12 blobs");
        assert_eq!(progress_line(0, 0, Some(0)), "re-wrapping: 0 blobs");
    }
}
