//! The supervisor's restore and checkpoint failure branches, driven by a
//! fake CRIU (`common::fake_criu`): every outcome on demand, no kernel
//! support needed. The services and their PID namespaces are real (root).
//!
//! What must hold on every branch: the service runs (cold), the image is
//! quarantined, the reason is recorded, and the service's data is exactly
//! what it was before warmer touched it (the only thing a restore ever puts
//! back is a `state:` path a reboot took from a tmpfs, and that is undone).

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

/// A quick service with two `state:` paths on the fake CRIU: a data
/// directory on disk and a file in /dev/shm (a tmpfs, emptied by a reboot).
struct Stateful {
    env: Env,
    ledger: PathBuf,
    shm: PathBuf,
    criu: String,
}

impl Drop for Stateful {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.shm);
    }
}

fn stateful() -> Stateful {
    require_root();
    let env = Env::new();
    let criu = fake_criu(env.dir.path()).display().to_string();
    let data = env.path("data");
    std::fs::create_dir(&data).unwrap();
    let ledger = data.join("ledger");
    std::fs::write(&ledger, "1\n2\n3\n").unwrap();
    let shm = PathBuf::from(format!(
        "/dev/shm/warmer-test-{}",
        env.dir.path().file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&shm, "segment").unwrap();
    env.slowweb(
        "svc",
        free_port(),
        &["--warmup", "0.1"],
        &format!("state: [\"{}\", \"{}\"]\n", data.display(), shm.display()),
    );
    Stateful {
        env,
        ledger,
        shm,
        criu,
    }
}

/// Cold start + (fake) checkpoint, then a "reboot" empties /dev/shm: the
/// next restore must put the shm file back (and only it).
fn checkpointed(s: &Stateful) {
    let mut w = s
        .env
        .run_with("svc", &[("WARMER_CRIU", &s.criu), ("FAKE_CRIU_DUMP", "ok")]);
    s.env.wait_image("svc", &mut w);
    w.stop();
    std::fs::remove_file(&s.shm).unwrap();
}

/// The data is exactly as before the failed restore: ledger untouched, the
/// vanished shm file still absent (the put-back undone), nothing left beside.
fn assert_untouched(s: &Stateful) {
    assert_eq!(std::fs::read_to_string(&s.ledger).unwrap(), "1\n2\n3\n");
    assert!(!s.shm.exists(), "the put-back of the shm file was undone");
    let leftovers: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|d| d.ok())
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&*s.shm.file_name().unwrap().to_string_lossy()))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_failed_criu_restore_undoes_its_put_back_and_cold_starts() {
    let s = stateful();
    checkpointed(&s);
    let mut w = s.env.run_with(
        "svc",
        &[("WARMER_CRIU", &s.criu), ("FAKE_CRIU_RESTORE", "fail")],
    );
    let st = s.env.wait_ready("svc", &mut w);
    assert_eq!(st["last_start"], "cold", "{st}");
    let msg = st["message"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.starts_with("restore failed: criu restore failed"),
        "{msg}"
    );
    w.stop();
    // The cold start's own checkpoint captured the shm file as absent.
    assert_untouched(&s);
    let reasons = quarantine_reasons(&s.env);
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].contains("Restoring FAILED"), "{reasons:?}");
    assert_eq!(
        reasons[0].matches("criu restore failed").count(),
        1,
        "each cause once: {reasons:?}"
    );
}

#[test]
fn a_restored_tree_that_exits_is_undone_the_same_way() {
    let s = stateful();
    checkpointed(&s);
    let mut w = s.env.run_with(
        "svc",
        &[("WARMER_CRIU", &s.criu), ("FAKE_CRIU_RESTORE", "exit")],
    );
    let st = s.env.wait_ready("svc", &mut w);
    assert_eq!(st["last_start"], "cold", "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap_or_default()
            .contains("restored service exited with status 3"),
        "{st}"
    );
    w.stop();
    assert_untouched(&s);
    assert_eq!(quarantine_reasons(&s.env).len(), 1);
}

#[test]
fn a_lazy_daemon_that_never_listens_or_dies_means_a_prompt_cold_start() {
    require_root();
    let env = Env::new();
    let criu = fake_criu(env.dir.path()).display().to_string();
    env.slowweb(
        "lz",
        free_port(),
        &["--warmup", "0.1"],
        "restore: {mode: lazy, timeout: 2s}\n",
    );
    for (lazy, why) in [("hang", "lazy-pages failed"), ("die", "lazy-pages failed")] {
        // An image (the last failed restore quarantined the one before).
        let mut w = env.run_with("lz", &[("WARMER_CRIU", &criu), ("FAKE_CRIU_DUMP", "ok")]);
        env.wait_image("lz", &mut w);
        w.stop();
        let t = std::time::Instant::now();
        let mut w = env.run_with("lz", &[("WARMER_CRIU", &criu), ("FAKE_CRIU_LAZY", lazy)]);
        let st = env.wait_ready("lz", &mut w);
        assert_eq!(st["last_start"], "cold", "{st}");
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "{lazy}: the daemon's wait is bounded by restore.timeout (2 s): {:?}",
            t.elapsed()
        );
        w.stop();
        assert!(w.err().contains(why), "{lazy}: {}", w.err());
        assert!(
            pids_with("sleep 1002").is_empty(),
            "{lazy}: the daemon was left running"
        );
        let history: serde_json::Value = serde_json::from_slice(
            &std::fs::read(env.run.join("lz/restore-history.json")).unwrap(),
        )
        .unwrap();
        assert!(history["lazy_failed"].is_string(), "{history}");
    }
}

#[test]
fn a_warmer_killed_during_a_restore_leaves_data_the_next_start_puts_back() {
    let s = stateful();
    checkpointed(&s);
    let mut w = s.env.run_with(
        "svc",
        &[("WARMER_CRIU", &s.criu), ("FAKE_CRIU_RESTORE", "hang")],
    );
    s.env
        .wait_status("svc", &mut w, |st| st["state"] == "restoring");
    // The shm file is back while the restored tree starts.
    wait_for(Duration::from_secs(10), || s.shm.exists().then_some(()));
    w.signal(nix::sys::signal::Signal::SIGKILL);
    w.wait(Duration::from_secs(10));
    for pid in pids_with("sleep 1000") {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // Whatever the next start does (here: a cold one), what the interrupted
    // restore changed is undone before the service runs.
    let child = s
        .env
        .command()
        .args(["run", "--cold", "svc"])
        .env("WARMER_CRIU", &s.criu)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = Warmer::from_child(child);
    s.env.wait_ready("svc", &mut w);
    assert_untouched(&s);
    w.stop();
    assert!(
        w.err().contains("interrupted restore"),
        "the recovery is logged: {}",
        w.err()
    );
}

#[test]
fn data_written_after_the_checkpoint_is_never_touched_and_the_image_never_tried() {
    let s = stateful();
    checkpointed(&s);
    std::fs::write(&s.ledger, "1\n2\n3\n4\n").unwrap();
    // A restore would fail loudly here; it must not even be tried.
    let mut w = s.env.run_with(
        "svc",
        &[("WARMER_CRIU", &s.criu), ("FAKE_CRIU_RESTORE", "fail")],
    );
    let st = s.env.wait_ready("svc", &mut w);
    assert_eq!(st["last_start"], "cold", "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap_or_default()
            .contains("state changed since checkpoint"),
        "{st}"
    );
    w.stop();
    assert_eq!(std::fs::read_to_string(&s.ledger).unwrap(), "1\n2\n3\n4\n");
    assert!(!s.shm.exists(), "nothing put back");
    assert!(
        quarantine_reasons(&s.env).is_empty(),
        "a stale image is not a damaged one"
    );
    assert!(
        !std::path::Path::new(&s.env.path("run/svc/restore.log")).exists(),
        "CRIU never ran"
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

#[test]
fn an_image_criu_keeps_failing_to_restore_is_not_remade_forever() {
    require_root();
    let env = Env::new();
    let criu = fake_criu(env.dir.path()).display().to_string();
    env.slowweb("lf", free_port(), &["--warmup", "0.1"], "");
    let fake = [
        ("WARMER_CRIU", criu.as_str()),
        ("FAKE_CRIU_RESTORE", "fail"),
    ];
    // 1: cold + checkpoint. 2: the restore fails, quarantined, cold, one
    // more checkpoint. 3: fails again: cold, and no checkpoint this time.
    for round in 1..=3 {
        let mut w = env.run_with("lf", &fake);
        let s = env.wait_status("lf", &mut w, |s| {
            s["state"] == "ready"
                && (!s["image"].is_null()
                    || s["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("checkpoint skipped")))
        });
        assert_eq!(s["last_start"], "cold", "round {round}: {s}");
        if round < 3 {
            assert!(!s["image"].is_null(), "round {round}: {s}");
        } else {
            assert!(
                s["message"]
                    .as_str()
                    .unwrap()
                    .contains("could not be restored 2 times"),
                "{s}\n{}\n{:?}",
                w.err(),
                std::fs::read_to_string(env.path("run/lf/restore-failures.json"))
            );
        }
        w.stop();
    }
    assert!(env.entries().is_empty());
    let s = env.status("lf");
    assert_eq!(s["next_start"]["action"], "cold", "{s}");
    assert!(
        s["next_start"]["detail"]
            .as_str()
            .unwrap()
            .contains("none will be taken"),
        "{s}"
    );
}

#[test]
fn a_service_that_cold_starts_faster_than_it_restores_stays_cold() {
    require_root();
    let env = Env::new();
    let criu = fake_criu(env.dir.path()).display().to_string();
    let port = free_port();
    // Ready in a few tens of ms cold; its (fake) restore takes a second.
    env.write_manifest(
        "quick",
        &format!(
            "exec: [\"/usr/bin/python3\", \"-c\", \"import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(1000)\"]\nready: {{tcp: \"127.0.0.1:{port}\"}}\ncheckpoint: {{settle: 10ms}}\n"
        ),
    );
    let port_s = port.to_string();
    let fake = [
        ("WARMER_CRIU", criu.as_str()),
        ("FAKE_CRIU_RESTORE", "slowok"),
        ("FAKE_PORT", port_s.as_str()),
    ];
    let mut w = env.run_with("quick", &fake);
    env.wait_image("quick", &mut w);
    w.stop();
    // One or two slow restores decide nothing (a boot storm could be why).
    for _ in 0..2 {
        let mut w = env.run_with("quick", &fake);
        let s = env.wait_ready("quick", &mut w);
        assert_eq!(s["last_start"], "restored", "{s}");
        assert!(s["message"].is_null(), "{s}");
        w.stop();
    }
    // The third: every restore measured was slower than cold. Decided.
    let mut w = env.run_with("quick", &fake);
    let s = env.wait_ready("quick", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}");
    let msg = s["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("a cold start is faster") && msg.contains("3 restores took"),
        "{s}"
    );
    w.stop();
    let st = env.status("quick");
    assert_eq!(st["next_start"]["action"], "cold", "{st}");
    assert!(
        st["next_start"]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("warmer reset"),
        "{st}"
    );
    // From now on: cold, and never slower than that.
    let mut w = env.run_with("quick", &fake);
    let s = env.wait_ready("quick", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    assert!(s["ready_ms"].as_u64().unwrap() < 1000, "{s}");
    w.stop();
    // A bench's restore measures anyway (it is how the decision is checked).
    let mut w = env.run_with_args("quick", &["--bench"], &fake);
    let s = env.wait_ready("quick", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}");
    w.stop();
    // The timings are kept beside the image too (they outlive a reboot).
    let kept = |env: &Env| {
        std::fs::read_dir(env.dir.path().join("cache/notes"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| d.path().join("restore-history").exists())
    };
    assert!(kept(&env), "no restore-history note beside the image");
    // `warmer reset` forgets the measurements: restores are tried again.
    let out = env.command().args(["reset", "quick"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!kept(&env), "reset left the timings kept beside the image");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("restore timings"),
        "{out:?}"
    );
    assert_eq!(env.status("quick")["next_start"]["action"], "restore");
}

#[test]
fn a_missing_workdir_is_named_as_such() {
    require_root();
    let env = Env::new();
    env.write_manifest(
        "nowd",
        "exec: [\"/bin/true\"]\nworkdir: /nonexistent/warmer-test\nready: {tcp: \"127.0.0.1:1\"}\n",
    );
    let out = env.command().args(["run", "nowd"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("cannot enter the manifest's workdir /nonexistent/warmer-test"),
        "{err}"
    );
}

/// An `exec` probe's children die with it: a shell probe that started
/// `sleep`s in the background and ran out of time left 5 of them with
/// parent 1.
#[test]
fn an_exec_probe_leaves_no_process_behind() {
    require_root();
    let env = Env::new();
    env.write_manifest(
        "probed",
        "exec: [\"/bin/sleep\", \"30\"]\n\
         ready:\n  exec: [\"/bin/sh\", \"-c\", \"sleep 987.123 & sleep 987.124; exit 1\"]\n  timeout: 3s\n\
         checkpoint: {enabled: false}\n",
    );
    let out = env.command().args(["run", "probed"]).output().unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    // The group is killed at once; give the kernel a moment to reap.
    let left = wait_for(Duration::from_secs(5), || {
        let p = pids_with("987.12");
        p.is_empty().then_some(p)
    });
    assert!(left.is_empty());
}
