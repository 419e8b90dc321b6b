//! The supervisor's restore and checkpoint failure branches, driven by a
//! fake CRIU (`common::fake_criu`): every outcome on demand, no kernel
//! support needed. The services and their PID namespaces are real (root).
//!
//! What must hold on every branch: the service runs (cold), the image is
//! quarantined, the reason is recorded, and the service's data is exactly
//! what it was before warmer touched it.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests start services in their own PID namespaces: run them as root"
    );
}

/// A quick service with a `state:` directory holding a ledger, on the fake
/// CRIU. Returns (env, ledger path, fake criu).
fn stateful() -> (Env, PathBuf, String) {
    require_root();
    let env = Env::new();
    let criu = fake_criu(env.dir.path()).display().to_string();
    let data = env.path("data");
    std::fs::create_dir(&data).unwrap();
    let ledger = data.join("ledger");
    std::fs::write(&ledger, "1\n").unwrap();
    env.slowweb(
        "svc",
        free_port(),
        &["--warmup", "0.1"],
        &format!("state: [\"{}\"]\n", data.display()),
    );
    (env, ledger, criu)
}

/// Cold start + (fake) checkpoint with the ledger at "1", then the service
/// moves the ledger on after the checkpoint.
fn checkpointed(env: &Env, ledger: &std::path::Path, criu: &str) {
    let mut w = env.run_with("svc", &[("WARMER_CRIU", criu), ("FAKE_CRIU_DUMP", "ok")]);
    env.wait_image("svc", &mut w);
    w.stop();
    std::fs::write(ledger, "1\n2\n3\n").unwrap();
}

fn quarantined(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.path("cache/quarantine"))
        .unwrap()
        .map(|d| std::fs::read_to_string(d.unwrap().path().join("REASON")).unwrap_or_default())
        .collect()
}

#[test]
fn a_failed_criu_restore_puts_the_newer_data_back_and_cold_starts() {
    let (env, ledger, criu) = stateful();
    checkpointed(&env, &ledger, &criu);
    let mut w = env.run_with(
        "svc",
        &[("WARMER_CRIU", &criu), ("FAKE_CRIU_RESTORE", "fail")],
    );
    let s = env.wait_ready("svc", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    let msg = s["message"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.starts_with("restore failed: criu restore failed"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(&ledger).unwrap(),
        "1\n2\n3\n",
        "the data written after the checkpoint survives a failed restore"
    );
    let reasons = quarantined(&env);
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].contains("Restoring FAILED"), "{reasons:?}");
    assert_eq!(
        reasons[0].matches("criu restore failed").count(),
        1,
        "each cause once: {reasons:?}"
    );
    w.stop();
}

#[test]
fn a_restored_tree_that_exits_is_undone_the_same_way() {
    let (env, ledger, criu) = stateful();
    checkpointed(&env, &ledger, &criu);
    let mut w = env.run_with(
        "svc",
        &[("WARMER_CRIU", &criu), ("FAKE_CRIU_RESTORE", "exit")],
    );
    let s = env.wait_ready("svc", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    assert!(
        s["message"]
            .as_str()
            .unwrap_or_default()
            .contains("restored service exited with status 3"),
        "{s}"
    );
    assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "1\n2\n3\n");
    assert_eq!(quarantined(&env).len(), 1);
    w.stop();
}

#[test]
fn a_warmer_killed_during_a_restore_leaves_data_the_next_start_puts_back() {
    let (env, ledger, criu) = stateful();
    checkpointed(&env, &ledger, &criu);
    let mut w = env.run_with(
        "svc",
        &[("WARMER_CRIU", &criu), ("FAKE_CRIU_RESTORE", "hang")],
    );
    env.wait_status("svc", &mut w, |s| s["state"] == "restoring");
    // The checkpoint's ledger is in place while the restored tree starts.
    wait_for(Duration::from_secs(10), || {
        (std::fs::read_to_string(&ledger).ok()? == "1\n").then_some(())
    });
    w.signal(nix::sys::signal::Signal::SIGKILL);
    w.wait(Duration::from_secs(10));
    for pid in pids_with("sleep 1000") {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // Whatever the next start does (here: a cold one), the newer data is back
    // before the service runs.
    let mut w = env.command();
    let out = w
        .args(["run", "--cold", "svc"])
        .env("WARMER_CRIU", &criu)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = Warmer::from_child(out);
    env.wait_ready("svc", &mut w);
    assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "1\n2\n3\n");
    w.stop();
    assert!(
        w.err().contains("interrupted restore"),
        "the recovery is logged: {}",
        w.err()
    );
}

#[test]
fn a_failed_checkpoint_keeps_the_service_serving_and_records_why() {
    require_root();
    let env = Env::new();
    let criu = fake_criu(env.dir.path()).display().to_string();
    let port = free_port();
    env.slowweb("svc", port, &["--warmup", "0.1"], "");
    let mut w = env.run_with("svc", &[("WARMER_CRIU", &criu), ("FAKE_CRIU_DUMP", "fail")]);
    let s = env.wait_status("svc", &mut w, |s| {
        s["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("checkpoint failed"))
    });
    assert_eq!(s["state"], "ready", "{s}");
    assert!(get(port, "/health").is_some(), "the service still answers");
    assert!(env.entries().is_empty(), "no partial entry");
    assert!(w.err().contains("Dumping FAILED"), "{}", w.err());
    w.stop();
}

#[test]
fn a_service_that_dies_before_it_is_ready_is_failed_with_its_status() {
    require_root();
    let env = Env::new();
    env.write_manifest(
        "dies",
        "exec: [\"/bin/sh\", \"-c\", \"exit 4\"]\nready: {tcp: \"127.0.0.1:1\", timeout: 30s}\n",
    );
    let out = env.command().args(["run", "dies"]).output().unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("service dies exited with status 4 before it was ready"),
        "{err}"
    );
    let s = env.status("dies");
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["message"]
            .as_str()
            .unwrap_or_default()
            .contains("status 4"),
        "{s}"
    );
}
