//! No acknowledged write is ever lost, in either mode, across stop/start,
//! `kill -9` of warmer or of the service; persist mode's restart is a
//! restore of the same memory; `warmer checkpoint` and `warmer rollback` end
//! to end. Real CRIU, real processes, `examples/ledger` (every write fsync'd
//! before it is acknowledged).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// A ledger service named `name` in `mode`, its data under `state:`.
fn ledger(env: &Env, name: &str, mode: &str) -> (u16, PathBuf) {
    ledger_with(env, name, mode, true, &[])
}

/// A ledger; `declared`: its data directory under `state:`; `args`: more
/// arguments for it (`--prealloc N`).
fn ledger_with(env: &Env, name: &str, mode: &str, declared: bool, args: &[&str]) -> (u16, PathBuf) {
    let port = free_port();
    let data = env.path(&format!("data-{name}"));
    let script = repo().join("examples/ledger/ledger.py");
    let extra: String = args.iter().map(|a| format!(", \"{a}\"")).collect();
    let state = if declared {
        format!("state: [\"{}\"]\n", data.display())
    } else {
        String::new()
    };
    env.write_manifest(
        name,
        &format!(
            "exec: [\"/usr/bin/python3\", \"{}\", \"--port\", \"{port}\", \"--data\", \"{}\", \"--warmup\", \"1.5\"{extra}]\n\
             ready: {{http: \"http://127.0.0.1:{port}/health\", timeout: 60s}}\n\
             checkpoint: {{settle: 100ms}}\n\
             {state}\
             mode: {mode}\n",
            script.display(),
            data.display(),
        ),
    );
    (port, data)
}

fn write(port: u16, n: usize, tag: &str) {
    for i in 0..n {
        get(port, &format!("/write?v={tag}-{i}")).expect("write acknowledged");
    }
}

fn lines_on_disk(data: &std::path::Path) -> usize {
    // A preallocated ledger ends at its first zero byte.
    std::fs::read_to_string(data.join("ledger.log"))
        .unwrap_or_default()
        .split('\0')
        .next()
        .unwrap_or_default()
        .lines()
        .count()
}

/// Memory and disk agree, and hold `n` writes.
fn assert_holds(port: u16, data: &std::path::Path, n: usize) -> serde_json::Value {
    let s = state(port);
    assert_eq!(s["count"], n, "in-memory count: {s}");
    assert_eq!(
        s["lines"].as_array().unwrap().len(),
        n,
        "lines the service sees: {s}"
    );
    assert_eq!(lines_on_disk(data), n, "lines on disk");
    s
}

#[test]
fn warm_mode_never_restores_an_image_older_than_the_data() {
    require_criu();
    let env = Env::new();
    let (port, data) = ledger(&env, "wl", "warm");
    let mut w = env.run("wl");
    let s = env.wait_image("wl", &mut w);
    assert_eq!(s["last_start"], "cold");
    write(port, 5, "a");
    assert_eq!(w.stop().code(), None, "died of SIGTERM like the service");
    // The image is older than the data now: cold start on the current data.
    let mut w = env.run("wl");
    let s = env.wait_ready("wl", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    assert!(
        s["message"]
            .as_str()
            .unwrap_or_default()
            .contains("state changed since checkpoint"),
        "{s}"
    );
    assert_holds(port, &data, 5);
    // ... and a fresh image of that data is taken once it is ready.
    let s = env.wait_image("wl", &mut w);
    assert_eq!(s["image"]["generation"], 2, "{s}");
    let nonce = state(port)["nonce"].clone();
    w.stop();
    // Nothing written since: restored, same memory, same data.
    let mut w = env.run("wl");
    let s = env.wait_ready("wl", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(assert_holds(port, &data, 5)["nonce"], nonce);
    // kill -9 of warmer after more writes: the next start is cold on them.
    write(port, 2, "b");
    w.signal(Signal::SIGKILL);
    w.wait(Duration::from_secs(10));
    let mut w = env.run("wl");
    let s = env.wait_ready("wl", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    assert_holds(port, &data, 7);
    w.stop();
}

/// Warm mode, the data directory NOT under `state:`: the file the image
/// holds open for writing is state all the same. `args`: the ledger's shape.
fn undeclared_data_survives(name: &str, args: &[&str], shape: &str) {
    require_criu();
    let env = Env::new();
    let (port, data) = ledger_with(&env, name, "warm", false, args);
    let mut w = env.run(name);
    let s = env.wait_image(name, &mut w);
    assert_eq!(s["last_start"], "cold");
    let nonce = state(port)["nonce"].clone();
    // validate names the file, as state warmer was not told about.
    let out = env
        .command()
        .arg("validate")
        .arg(env.path(&format!("manifests/{name}.yaml")))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ledger.log open for writing") && err.contains("treats it as state"),
        "{shape}: validate must warn about the ledger: {err}"
    );
    write(port, 5, "a");
    // status and cache ls know before the stop that the next start is cold,
    // and why: the same answer.
    let ls = env
        .command()
        .args(["cache", "ls", "--json"])
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    let row = &rows[0];
    assert_eq!(row["next_restore"], false, "{shape}: {row}");
    assert!(
        row["next_cold"]
            .as_str()
            .unwrap_or_default()
            .contains("ledger.log"),
        "{shape}: {row}"
    );
    let s = env.status(name);
    assert_eq!(s["next_start"]["action"], "cold", "{shape}: {s}");
    assert!(
        s["next_start"]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("ledger.log"),
        "{shape}: {s}"
    );
    w.stop();
    let mut w = env.run(name);
    let s = env.wait_ready(name, &mut w);
    assert_eq!(
        s["last_start"], "cold",
        "{shape}: restoring would lose or hide the acknowledged writes: {s}"
    );
    let message = s["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("ledger.log") && message.contains("open for writing"),
        "{shape}: the reason names the file: {s}"
    );
    assert_holds(port, &data, 5);
    assert_ne!(state(port)["nonce"], nonce, "{shape}: a new process");
    // A fresh image of this data; nothing written since: restored.
    let s = env.wait_image(name, &mut w);
    assert_eq!(s["image"]["generation"], 2, "{s}");
    let nonce = state(port)["nonce"].clone();
    w.stop();
    let mut w = env.run(name);
    let s = env.wait_ready(name, &mut w);
    assert_eq!(s["last_start"], "restored", "{shape}: {s}\n{}", w.err());
    assert_eq!(assert_holds(port, &data, 5)["nonce"], nonce);
    // Written after that restore: cold again, nothing lost.
    write(port, 3, "b");
    w.stop();
    let mut w = env.run(name);
    let s = env.wait_ready(name, &mut w);
    assert_eq!(s["last_start"], "cold", "{shape}: {s}");
    assert_holds(port, &data, 8);
    w.stop();
}

#[test]
fn undeclared_preallocated_log_written_in_place_loses_nothing() {
    // ZooKeeper's shape: the file's size never changes.
    undeclared_data_survives("zk", &["--prealloc", "65536"], "preallocated");
}

#[test]
fn undeclared_appended_log_loses_nothing() {
    // Prometheus's WAL: opened for appending.
    undeclared_data_survives("wal", &[], "appended");
}

#[test]
fn persist_mode_restores_the_state_at_stop_and_never_an_older_one() {
    require_criu();
    let env = Env::new();
    let (port, data) = ledger(&env, "pl", "persist");
    let mut w = env.run("pl");
    let s = env.wait_ready("pl", &mut w);
    assert_eq!(s["last_start"], "cold");
    assert_eq!(s["mode"], "persist");
    let cold_ms = s["ready_ms"].as_u64().unwrap();
    write(port, 5, "a");
    let nonce = state(port)["nonce"].clone();
    let st = w.stop();
    assert_eq!(
        st.code(),
        Some(0),
        "a stop with its checkpoint is clean: {}",
        w.err()
    );
    assert!(w.err().contains("checkpoint"), "{}", w.err());
    assert_eq!(lines_on_disk(&data), 5);
    // One image, the stop's: no ready-time image in persist mode (it would
    // have been generation 1, the stop's 2).
    let entries = env.entries();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].to_string_lossy().ends_with(".1"), "{entries:?}");

    // Restart: a restore of exactly that state, memory and data together.
    let mut w = env.run("pl");
    let s = env.wait_ready("pl", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(assert_holds(port, &data, 5)["nonce"], nonce, "same memory");
    let restored_ms = s["ready_ms"].as_u64().unwrap();
    assert!(
        restored_ms * 3 < cold_ms,
        "restore {restored_ms} ms is not much faster than cold {cold_ms} ms"
    );
    // The image was used once: a crash now must not bring it back.
    write(port, 3, "b");
    let st = env.status("pl");
    assert_eq!(st["next_start"]["action"], "restore", "{st}");
    w.stop();
    let mut w = env.run("pl");
    env.wait_ready("pl", &mut w);
    let s = assert_holds(port, &data, 8);
    assert_eq!(s["nonce"], nonce, "still the same process memory");
    write(port, 2, "c");

    // kill -9 of warmer: no stop-time checkpoint, so the next start is cold,
    // on the current data, never the older image.
    w.signal(Signal::SIGKILL);
    w.wait(Duration::from_secs(10));
    let st = env.status("pl");
    assert_eq!(st["next_start"]["action"], "cold", "{st}");
    let mut w = env.run("pl");
    let s = env.wait_ready("pl", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    let after_crash = assert_holds(port, &data, 10);
    assert_ne!(after_crash["nonce"], nonce);

    // kill -9 of the service itself: warmer exits with it; next start cold.
    write(port, 1, "d");
    // This service's own process (status names it; other tests' ledgers are
    // pid 2 of their namespaces too).
    let outer = env.status("pl")["pid"].as_i64().expect("the service's pid");
    let outer = i32::try_from(outer).unwrap();
    assert!(
        std::fs::read_to_string(format!("/proc/{outer}/cmdline"))
            .is_ok_and(|c| c.contains("ledger.py")),
        "pid {outer} is the ledger"
    );
    let _ = after_crash;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(outer), Signal::SIGKILL).unwrap();
    let st = w.wait(Duration::from_secs(10));
    assert_ne!(st.code(), Some(0));
    let mut w = env.run("pl");
    let s = env.wait_ready("pl", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    assert_holds(port, &data, 11);
    w.stop();
}

fn warmer(env: &Env, args: &[&str]) -> (i32, String, String) {
    let out = env.command().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn checkpoint_now_makes_a_generation_and_rollback_chooses_an_earlier_one() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb("cn", port, &["--warmup", "0.5"], "");
    let (code, _, err) = warmer(&env, &["checkpoint", "cn"]);
    assert_eq!(code, 69, "not running: {err}");
    let mut w = env.run("cn");
    let s = env.wait_image("cn", &mut w);
    assert_eq!(s["image"]["generation"], 1);
    for _ in 0..3 {
        get(port, "/hit").unwrap();
    }
    let (code, out, err) = warmer(&env, &["checkpoint", "cn"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("generation 2") && out.contains("frozen for"),
        "{out}"
    );
    assert_eq!(get(port, "/hit").unwrap(), "{\"hits\": 4}", "kept running");
    w.stop();
    // The newest generation is restored: 3 hits.
    let mut w = env.run("cn");
    env.wait_ready("cn", &mut w);
    assert_eq!(state(port)["hits"], 3);
    w.stop();
    // Roll back to generation 1: 0 hits, and it stays chosen across restarts.
    let (code, out, err) = warmer(&env, &["rollback", "cn"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("generation 1") && out.contains("instead of generation 2"),
        "{out}"
    );
    let (_, ls, _) = warmer(&env, &["cache", "ls"]);
    assert!(ls.contains("next start restores it"), "{ls}");
    for _ in 0..2 {
        let mut w = env.run("cn");
        let s = env.wait_ready("cn", &mut w);
        assert_eq!(s["last_start"], "restored", "{s}");
        assert_eq!(state(port)["hits"], 0);
        w.stop();
    }
    let (code, _, err) = warmer(&env, &["rollback", "cn", "--to", "9"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no generation 9") && err.contains("1, 2"),
        "{err}"
    );
}

#[test]
fn rollback_is_refused_where_it_would_roll_data_back() {
    require_criu();
    let env = Env::new();
    // Warm mode with state: always refused.
    let (_, _) = ledger(&env, "ws", "warm");
    let mut w = env.run("ws");
    env.wait_image("ws", &mut w);
    let (code, _, err) = warmer(&env, &["checkpoint", "ws"]);
    assert_eq!(code, 0, "{err}");
    w.stop();
    let (code, _, err) = warmer(&env, &["rollback", "ws"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("refused") && err.contains("warm mode"),
        "{err}"
    );

    // Persist mode: refused once the data moved on.
    let (port, _) = ledger(&env, "ps", "persist");
    let mut w = env.run("ps");
    env.wait_ready("ps", &mut w);
    write(port, 1, "a");
    let (code, out, err) = warmer(&env, &["checkpoint", "ps"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("generation 1"), "{out}");
    write(port, 1, "b");
    w.stop(); // generation 2, at stop
    let (code, _, err) = warmer(&env, &["rollback", "ps", "--to", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("refused") && err.contains("moved on"), "{err}");
}
