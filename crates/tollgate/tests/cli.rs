//! The command line's own behaviour, apart from what it drives.

mod common;

use common::*;

/// A report whose reader has gone (`tollgate usage | head` once `head` has
/// its lines) ends quietly with the status SIGPIPE gives, not a panic.
#[test]
fn a_report_whose_reader_is_gone_ends_quietly() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Closed before the command starts: its very first write meets it.
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = tollgate()
        .args(["usage", "--by", "key"])
        .current_dir(dir.path())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("tollgate runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}
