//! Bounds on text that comes from outside (a caller, a certificate, a database row, the HSM) before
//! it is echoed: in an error message, a log line or an audit record. A 600 KB key name once made a
//! 1.2 MB audit record that no auditor could page past; nothing the service echoes may grow with
//! what a caller sends.
//!
//! [`text`] keeps at most a given number of bytes (cut at a character boundary), replaces control
//! characters so that a value cannot forge a log line, and says how much it left out. Must never be
//! given a secret: bounding is not redaction.
#![forbid(unsafe_code)]

use std::borrow::Cow;

/// Longest key name, identity or similar field echoed whole (a valid key name is at most 64 bytes,
/// a caller identity at most 512).
pub const NAME: usize = 512;
/// Longest message (a refusal, a failure, an audit detail).
pub const MESSAGE: usize = 1024;

/// `s` with control characters replaced by `?` and, if longer than `max` bytes, cut at a character
/// boundary and followed by `…(N more bytes)`. Returns `s` itself when nothing needs to change.
pub fn text(s: &str, max: usize) -> Cow<'_, str> {
    let clean = !s.chars().any(char::is_control);
    if clean && s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out: String = s[..cut].chars().map(|c| if c.is_control() { '?' } else { c }).collect();
    if cut < s.len() {
        out.push_str(&format!("…({} more bytes)", s.len() - cut));
    }
    Cow::Owned(out)
}

/// [`text`] into an owned `String`.
pub fn owned(s: &str, max: usize) -> String {
    text(s, max).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_clean_text_is_untouched() {
        assert!(matches!(text("tax/records", 64), Cow::Borrowed("tax/records")));
    }

    #[test]
    fn long_text_is_cut_and_says_how_much_is_missing() {
        let long = "x".repeat(100_000);
        let b = text(&long, 64);
        assert_eq!(b, format!("{}…(99936 more bytes)", "x".repeat(64)));
        assert!(b.len() < 100);
    }

    #[test]
    fn cuts_fall_on_character_boundaries_and_controls_are_replaced() {
        assert_eq!(text("khóa", 3), "kh…(3 more bytes)");
        assert_eq!(text("a\nINFO fake line\u{1b}[0m", 100), "a?INFO fake line?[0m");
    }
}
