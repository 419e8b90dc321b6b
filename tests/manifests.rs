//! `warmer validate` as an operator uses it: positioned errors, exit codes,
//! and every shipped manifest valid.

mod common;

use std::process::Command;

use common::{repo, WARMER};

fn validate(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.yaml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(WARMER)
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "svc.yaml");
    (out.status.code().unwrap(), err)
}

#[test]
fn bad_manifests_get_file_line_column_errors() {
    let cases = [
        (
            "exec: [\"/bin/true\"]\nready:\n  tcp: \"127.0.0.1:1\"\n  colour: blue\n",
            "svc.yaml:4:3:",
            "unknown field `colour`",
        ),
        (
            "exec: \"/bin/true\"\nready: {tcp: \"127.0.0.1:1\"}\n",
            "svc.yaml:1:7:",
            "",
        ),
        (
            "exec: []\nready: {tcp: \"127.0.0.1:1\"}\n",
            "svc.yaml:1:7:",
            "non-empty argv",
        ),
        (
            "exec: [\"/bin/true\"]\nready:\n  tcp: \"127.0.0.1:1\"\n  exec: [\"true\"]\n",
            "svc.yaml:4:9:",
            "found tcp and exec",
        ),
        (
            "exec: [\"/bin/true\"]\nready:\n  http: \"http://x/\"\n  timeout: forever\n",
            "svc.yaml:4:12:",
            "duration",
        ),
        (
            "exec: [\"/bin/true\"]\nready: {tcp: \"h:1\"}\ncheckpoint:\n  settle: [1]\n",
            "svc.yaml:4:11:",
            "",
        ),
        (
            "exec: [\"/bin/true\"\nready: {}\n",
            "svc.yaml:2:6:",
            "illegal",
        ),
    ];
    for (text, position, message) in cases {
        let (code, err) = validate(text);
        assert_eq!(code, 65, "{text:?} -> {err}");
        assert!(
            err.starts_with(position),
            "{text:?}: expected {position}, got {err}"
        );
        assert!(
            err.contains(message),
            "{text:?}: expected {message:?} in {err}"
        );
        assert!(err.contains('^'), "a caret excerpt is shown: {err}");
    }
}

#[test]
fn a_good_manifest_validates() {
    let (code, err) = validate("exec: [\"/bin/true\"]\nready: {tcp: \"127.0.0.1:1\"}\n");
    assert_eq!(code, 0, "{err}");
}

#[test]
fn every_shipped_manifest_is_valid() {
    let dir = repo().join("manifests");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|d| d.ok())
        .map(|d| d.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let out = Command::new(WARMER)
        .arg("validate")
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
