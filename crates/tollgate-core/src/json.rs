//! JSON text written by hand where serde_json's writer would cost more: the
//! ledger journal's lines and the access log's.

/// Whether `s` holds a byte a JSON string must escape: a control
/// character, `"` or `\`. Without an early exit the loop vectorises, which
/// for the short texts of a log line or a usage row beats stopping early.
pub fn needs_escape(s: &[u8]) -> bool {
    s.iter().fold(false, |found, &b| {
        found | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

#[cfg(test)]
mod tests {
    use super::needs_escape;

    /// Exactly the bytes serde_json escapes, wherever they stand.
    #[test]
    fn needs_escape_agrees_with_serde_json() {
        for b in 0..=u8::MAX {
            for at in [0, 7, 40] {
                let mut s = vec![b'a'; 41];
                s[at] = b;
                let Ok(text) = std::str::from_utf8(&s) else {
                    continue;
                };
                let escaped = serde_json::to_string(text).is_ok_and(|j| j.len() != text.len() + 2);
                assert_eq!(needs_escape(&s), escaped, "byte {b:#04x} at {at}");
            }
        }
        assert!(!needs_escape(b""));
    }
}
