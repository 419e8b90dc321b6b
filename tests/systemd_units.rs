//! The shipped unit files pass `systemd-analyze verify` (works without a
//! running systemd) and say what the operator workflow relies on.

mod common;

use std::process::Command;

use common::{repo, WARMER};

#[test]
fn units_verify_cleanly() {
    let have = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        have.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: apt-get install systemd (scripts/deps.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    // Point ExecStart at the binary under test, as `make install` points it
    // at the installed one.
    let bin = std::path::Path::new(WARMER).parent().unwrap();
    for (file, name) in [
        ("warmer@.service", "warmer@slowweb.service"),
        ("warmer-verify.service", "warmer-verify.service"),
    ] {
        let text = std::fs::read_to_string(repo().join("systemd").join(file)).unwrap();
        let unit = dir.path().join(name);
        std::fs::write(
            &unit,
            text.replace("/usr/local/bin/", &format!("{}/", bin.display())),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "{file}: {err}"
        );
    }
}

#[test]
fn the_service_unit_is_notify_with_deliberate_stop_and_restart() {
    let text = std::fs::read_to_string(repo().join("systemd/warmer@.service")).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/warmer run %i",
        "KillMode=mixed",
        "Restart=on-failure",
        "WantedBy=multi-user.target",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}");
    }
    let tmpfiles = std::fs::read_to_string(repo().join("systemd/warmer.conf")).unwrap();
    assert!(tmpfiles.contains("d /var/cache/warmer 0700 root root"));
    assert!(tmpfiles.contains("d /run/warmer 0700 root root"));
}
