//! `kill -9` of warmer at each phase (a failpoint aborts the process at the
//! exact moment; feature `failpoints`): the next start always brings the
//! service up, with nothing left over from the killed run, no partial cache
//! entry, and no acknowledged write lost.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

/// Runs until the failpoint aborts warmer.
fn run_until_abort(env: &Env, name: &str, point: &str, cache_point: bool) {
    let var = if cache_point {
        "CACHE_FAILPOINT"
    } else {
        "WARMER_FAILPOINT"
    };
    let mut w = env.run_with(name, &[(var, point)]);
    let st = w.wait(Duration::from_secs(60));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(6),
        "{point}: expected the abort, got {st:?}\n{}",
        w.err()
    );
}

/// No process of the service is left, every entry verifies, no staging.
fn nothing_left_and_cache_whole(env: &Env, needle: &str) {
    wait_for(Duration::from_secs(10), || {
        pids_with(needle)
            .into_iter()
            .all(|p| {
                std::fs::read_to_string(format!("/proc/{p}/status")).map_or(true, |s| {
                    s.lines()
                        .any(|l| l.starts_with("State:") && l.contains('Z'))
                })
            })
            .then_some(())
    });
    let out = env.command().args(["cache", "verify"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn shm_service(env: &Env, name: &str) -> (u16, PathBuf) {
    let port = free_port();
    let shm = PathBuf::from(format!(
        "/dev/shm/warmer-kill-{}-{name}",
        env.dir.path().file_name().unwrap().to_string_lossy()
    ));
    env.slowweb(
        name,
        port,
        &["--warmup", "0.3", "--statefile", &shm.display().to_string()],
        &format!("state: [\"{}\"]\n", shm.display()),
    );
    (port, shm)
}

#[test]
fn killed_after_putting_state_back_then_restored_whole() {
    require_criu();
    let env = Env::new();
    let (port, shm) = shm_service(&env, "kpb");
    let mut w = env.run("kpb");
    env.wait_image("kpb", &mut w);
    let nonce = state(port)["nonce"].as_str().unwrap().to_string();
    w.stop();
    std::fs::remove_file(&shm).unwrap(); // a reboot
    run_until_abort(&env, "kpb", "restore-after-put-back", false);
    nothing_left_and_cache_whole(&env, "--statefile");
    let mut w = env.run("kpb");
    let s = env.wait_ready("kpb", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert!(w.err().contains("interrupted restore"), "{}", w.err());
    assert_eq!(state(port)["nonce"], nonce.as_str());
    assert_eq!(std::fs::read_to_string(&shm).unwrap(), nonce);
    w.stop();
    let _ = std::fs::remove_file(&shm);
}

#[test]
fn killed_right_after_criu_restored_then_restored_again() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb("kac", port, &["--warmup", "0.3"], "");
    let nonce = env.make_image("kac", port);
    run_until_abort(&env, "kac", "restore-after-criu", false);
    nothing_left_and_cache_whole(&env, &format!("--port {port}"));
    let mut w = env.run("kac");
    let s = env.wait_ready("kac", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(state(port)["nonce"], nonce);
    w.stop();
}

#[test]
fn killed_during_a_checkpoint_leaves_no_entry_then_checkpoints_again() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb("kck", port, &["--warmup", "0.3"], "");
    for (point, cache_point) in [
        ("checkpoint-after-dump", false),
        ("publish-before-rename", true),
    ] {
        run_until_abort(&env, "kck", point, cache_point);
        nothing_left_and_cache_whole(&env, &format!("--port {port}"));
        assert!(env.entries().is_empty(), "{point}: no partial entry");
    }
    // Killed right after the publish: the entry is whole and restorable.
    run_until_abort(&env, "kck", "publish-after-rename", true);
    nothing_left_and_cache_whole(&env, &format!("--port {port}"));
    assert_eq!(env.entries().len(), 1);
    let mut w = env.run("kck");
    let s = env.wait_ready("kck", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    w.stop();
    let tmp = std::fs::read_dir(env.path("cache/tmp")).unwrap().count();
    assert_eq!(tmp, 0, "staging leftovers cleaned");
}

fn ledger(env: &Env) -> (u16, PathBuf) {
    let port = free_port();
    let data = env.path("ledger-data");
    env.write_manifest(
        "kl",
        &format!(
            "exec: [\"/usr/bin/python3\", \"{}\", \"--port\", \"{port}\", \"--data\", \"{}\", \"--warmup\", \"0.5\"]\n\
             ready: {{http: \"http://127.0.0.1:{port}/health\"}}\nstate: [\"{}\"]\nmode: persist\n",
            repo().join("examples/ledger/ledger.py").display(),
            data.display(),
            data.display()
        ),
    );
    (port, data)
}

#[test]
fn persist_killed_around_the_stop_time_checkpoint_loses_no_write() {
    require_criu();
    let env = Env::new();
    let (port, data) = ledger(&env);
    let writes = |n: usize, tag: &str| {
        for i in 0..n {
            get(port, &format!("/write?v={tag}{i}")).unwrap();
        }
    };
    let lines = || {
        std::fs::read_to_string(data.join("ledger.log"))
            .unwrap()
            .lines()
            .count()
    };

    // Killed after the stop-time dump, before its publish: cold next time.
    let mut w = env.run_with("kl", &[("WARMER_FAILPOINT", "checkpoint-after-dump")]);
    env.wait_ready("kl", &mut w);
    writes(3, "a");
    w.signal(nix::sys::signal::Signal::SIGTERM);
    let st = w.wait(Duration::from_secs(30));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(6),
        "{}",
        w.err()
    );
    nothing_left_and_cache_whole(&env, "ledger.py");
    assert!(env.entries().is_empty());
    let mut w = env.run("kl");
    let s = env.wait_ready("kl", &mut w);
    assert_eq!(s["last_start"], "cold");
    assert_eq!(state(port)["count"], 3);
    writes(2, "b");

    // Killed after the stop-time checkpoint was published: restored.
    w.child.kill().unwrap(); // (this run ends without a checkpoint: cold next)
    w.wait(Duration::from_secs(10));
    nothing_left_and_cache_whole(&env, "ledger.py");
    let mut w = env.run_with("kl", &[("WARMER_FAILPOINT", "stop-after-checkpoint")]);
    let s = env.wait_ready("kl", &mut w);
    assert_eq!(s["last_start"], "cold");
    let nonce = state(port)["nonce"].clone();
    writes(1, "c");
    w.signal(nix::sys::signal::Signal::SIGTERM);
    w.wait(Duration::from_secs(30));
    nothing_left_and_cache_whole(&env, "ledger.py");
    let mut w = env.run("kl");
    let s = env.wait_ready("kl", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(state(port)["nonce"], nonce);
    assert_eq!(state(port)["count"], 6);
    assert_eq!(lines(), 6);
    w.stop();
}

/// A persist image is restored at most once whatever happens: killed right
/// after CRIU restored it (the tree may run on a moment, unsupervised, its
/// data moving on), the next start never restores that image again.
#[test]
fn a_persist_image_killed_mid_restore_is_never_restored_twice() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    let shm = PathBuf::from(format!(
        "/dev/shm/warmer-kill-{}-pers",
        env.dir.path().file_name().unwrap().to_string_lossy()
    ));
    env.slowweb(
        "pers",
        port,
        &["--warmup", "0.3", "--statefile", &shm.display().to_string()],
        &format!("state: [\"{}\"]\nmode: persist\n", shm.display()),
    );
    let mut w = env.run("pers");
    env.wait_ready("pers", &mut w);
    w.stop();
    std::fs::remove_file(&shm).unwrap(); // a reboot
    run_until_abort(&env, "pers", "restore-after-criu", false);
    nothing_left_and_cache_whole(&env, "--statefile");
    let mut w = env.run("pers");
    let s = env.wait_ready("pers", &mut w);
    assert_eq!(s["last_start"], "cold", "used once: {s}\n{}", w.err());
    assert!(
        w.err().contains("restored once"),
        "the image was retired before its restore: {}",
        w.err()
    );
    w.stop();
    let _ = std::fs::remove_file(&shm);
}
