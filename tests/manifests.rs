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
fn every_problem_of_a_file_is_reported_in_file_order() {
    let (code, err) = validate(
        "exec: [a]\nworkdir: rel\nready: {tcp: \"h:1\", timeout: soon}\ncache: {keep: 0}\nmode: fast\nstate: [relative]\n",
    );
    assert_eq!(code, 65, "{err}");
    let positions: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(".yaml:"))
        .map(|l| l.split(": ").next().unwrap())
        .collect();
    assert_eq!(positions.len(), 5, "{err}");
    for (want, got) in [":2:10", ":3:30", ":4:15", ":5:7", ":6:9"]
        .iter()
        .zip(&positions)
    {
        assert!(got.ends_with(want), "{want} vs {got}\n{err}");
    }
    assert!(
        err.contains("workdir:") && err.contains("mode:") && err.contains("state:"),
        "{err}"
    );
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

/// The README's manifest example names every key the parser knows (the
/// table `warmer.yaml(5)` is written from), and nothing else: README, man
/// page and parser cannot drift apart.
#[test]
fn the_readme_manifest_example_and_the_key_table_agree() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme.split("## Manifests").nth(1).unwrap();
    let block = section
        .split("```yaml")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut top = String::new();
    for line in block.lines() {
        let indent = line.len() - line.trim_start().len();
        let body = line.trim_start().trim_start_matches("# ");
        let Some((key, _)) = body.split_once(':') else {
            continue;
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            continue;
        }
        if indent == 0 {
            top = key.to_string();
            seen.insert(top.clone());
        } else if indent == 2 {
            seen.insert(format!("{top}.{key}"));
        }
    }
    let table: std::collections::BTreeSet<String> = warmer::manifest::keys::KEYS
        .iter()
        .map(|k| k.path.to_string())
        .collect();
    let sections: std::collections::BTreeSet<String> = table
        .iter()
        .filter_map(|p| p.split_once('.').map(|(s, _)| s.to_string()))
        .collect();
    let seen_keys: std::collections::BTreeSet<String> =
        seen.into_iter().filter(|k| !sections.contains(k)).collect();
    assert_eq!(
        seen_keys.difference(&table).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "in the README, not in the key table"
    );
    assert_eq!(
        table.difference(&seen_keys).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "in the key table, not in the README"
    );
}

mod fuzz {
    //! The manifest parser on hostile input: it never panics, every
    //! rejection is positioned, and what it prints is bounded.
    use proptest::prelude::*;
    use std::path::Path;
    use warmer::manifest::{Manifest, ManifestError};

    const GOOD: &str = "exec: [\"/usr/bin/python3\", \"/srv/app/server.py\"]\nready:\n  http: \"http://127.0.0.1:8080/health\"\n  timeout: 60s\ncheckpoint: {settle: 500ms}\nstate: [\"/var/lib/app\"]\nmode: persist\n";

    fn check(text: &str) {
        match Manifest::parse("web", Path::new("web.yaml"), text) {
            Ok(_) => {}
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("web.yaml:"), "unpositioned: {msg}");
                if let ManifestError::Invalid { line, column, .. } = &e {
                    assert!(*line >= 1 && *column >= 1);
                }
                assert!(msg.len() < 1000, "unbounded message: {} bytes", msg.len());
                if let Some(x) = e.excerpt() {
                    assert!(x.len() < 1000, "unbounded excerpt: {} bytes", x.len());
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            check(&text);
        }

        #[test]
        fn mutated_manifests_never_panic(at in 0usize..GOOD.len(), len in 0usize..20, junk in "[ -~\\n\\t:{}\\[\\]\"'#&*!|>%@`-]{0,20}") {
            let mut text = GOOD.to_string();
            let at = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            let end = (at + len).min(text.len());
            let end = (end..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
            text.replace_range(at..end, &junk);
            check(&text);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// Every duration key with any number and unit: validated or
        /// refused with its position, never a panic, and what passes is
        /// within the bound and usable as a deadline.
        #[test]
        fn durations_of_any_size_are_bounded_or_refused(
            key in prop::sample::select(vec!["ready.timeout", "checkpoint.settle", "checkpoint.timeout", "stop.timeout", "restore.timeout"]),
            n in prop::num::u64::ANY,
            unit in prop::sample::select(vec!["ns", "ms", "s", "m", "h", "d", "w", "M", "y", "years"]),
        ) {
            let (section, field) = key.split_once('.').unwrap();
            let text = if section == "ready" {
                format!("exec: [a]\nready: {{tcp: \"h:1\", {field}: {n}{unit}}}\n")
            } else {
                format!("exec: [a]\nready: {{tcp: \"h:1\"}}\n{section}: {{{field}: {n}{unit}}}\n")
            };
            check(&text);
            if let Ok(m) = Manifest::parse("web", Path::new("web.yaml"), &text) {
                for d in [m.ready.timeout, m.checkpoint.settle, m.checkpoint.timeout, m.stop_timeout, m.restore_timeout] {
                    prop_assert!(d <= warmer::manifest::MAX_DURATION);
                    let _ = warmer::process::clock::deadline(d + std::time::Duration::from_secs(5));
                }
            }
        }
    }

    #[test]
    fn the_overflowing_durations_an_attacker_tried_are_refused_with_their_position() {
        for text in [
            "exec: [a]\nready: {tcp: \"h:1\", timeout: 293000000000y}\n",
            "exec: [a]\nready: {tcp: \"h:1\"}\ncheckpoint: {settle: 293000000000y}\n",
            "exec: [a]\nready: {tcp: \"h:1\"}\nstop: {timeout: 8d}\n",
        ] {
            let e = Manifest::parse("web", Path::new("web.yaml"), text)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("web.yaml:")
                    && (e.contains("longest allowed") || e.contains("expected a duration")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_huge_scalar_is_not_echoed() {
        let big = "x".repeat(5_000_000);
        let text = format!("exec: 3\nready: {{tcp: \"{big}\"}}\n");
        check(&text);
        let text = format!("exec: [a]\nready: {{tcp: \"h:1\"}}\nmode: \"{big}\"\n");
        check(&text);
    }

    #[test]
    fn invalid_utf8_is_positioned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("web.yaml");
        std::fs::write(&p, b"exec: [a]\nready: {tcp: \"h:1\xff\"}\n").unwrap();
        let e = Manifest::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("web.yaml:2:18:") && e.contains("not UTF-8"),
            "{e}"
        );
    }
}
