//! Faults, hostile input and privilege: warmer never hangs, never restores
//! anything a non-root user could have written, and whatever happens the
//! service still runs (or the run ends cleanly) with its data intact.
//! Real CRIU where the fault can be made for real; the fake CRIU
//! (`common::fake_criu`) where it must happen at an exact moment.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// A warmed slowweb: checkpointed, stopped. Returns (env, port, entry dir).
fn warmed(name: &str) -> (Env, u16, PathBuf) {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb(name, port, &["--warmup", "0.3"], "");
    let mut w = env.run(name);
    env.wait_image(name, &mut w);
    w.stop();
    let entry = env.entries().pop().expect("an entry");
    (env, port, entry)
}

/// The next start is cold, quarantines the entry for `why`, and is prompt.
fn cold_and_quarantined(env: &Env, name: &str, why: &str) {
    let t = Instant::now();
    let mut w = env.run(name);
    let s = env.wait_ready(name, &mut w);
    assert_eq!(s["last_start"], "cold", "{s}\n{}", w.err());
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    let reasons = quarantine_reasons(env);
    assert!(reasons.iter().any(|r| r.contains(why)), "{reasons:?}");
    w.stop();
}

fn drop_stamps(env: &Env) {
    for d in std::fs::read_dir(env.path("cache/verified")).unwrap() {
        std::fs::remove_file(d.unwrap().path()).unwrap();
    }
}

// ------------------------------------------------------------ tampering

#[test]
fn a_truncated_pages_file_without_a_stamp_never_hangs() {
    let (env, _, entry) = warmed("trunc");
    drop_stamps(&env);
    let pages = pages_file(&entry);
    let len = std::fs::metadata(&pages).unwrap().len();
    nix::unistd::truncate(&pages, i64::try_from(len - 4096).unwrap()).unwrap();
    cold_and_quarantined(&env, "trunc", "size");
}

#[test]
fn a_same_size_corruption_without_a_stamp_stops_criu_and_never_runs() {
    let (env, port, entry) = warmed("flip");
    drop_stamps(&env);
    flip_bit_in_pages(&entry, 0x01);
    cold_and_quarantined(&env, "flip", "checksum mismatch");
    let _ = port;
}

/// Damaged files are the disk's fault, not the state's: two corrupt images
/// in a row are quarantined and retaken, and the service does not switch to
/// "stays cold" as if CRIU could not restore it.
#[test]
fn corruption_does_not_count_as_criu_failing_to_restore() {
    let (env, _, _) = warmed("flip");
    for round in 0..2 {
        let entry = env.entries().pop().expect("an entry");
        drop_stamps(&env);
        flip_bit_in_pages(&entry, 0x10);
        let mut w = env.run("flip");
        let s = env.wait_image("flip", &mut w);
        assert_eq!(s["last_start"], "cold", "round {round}: {s}");
        assert!(
            !s["message"]
                .as_str()
                .unwrap_or_default()
                .contains("checkpoint skipped"),
            "round {round}: {s}"
        );
        w.stop();
    }
    assert_eq!(quarantine_reasons(&env).len(), 2);
    let mut w = env.run("flip");
    let s = env.wait_ready("flip", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    w.stop();
}

/// An upgrade (or a downgrade) of warmer that changes the image format: the
/// first start after it is a cold start, never a failed restore, and the
/// old image is set aside with the reason.
#[test]
fn an_image_of_another_format_is_set_aside_and_the_start_is_cold() {
    let (env, _, entry) = warmed("format");
    let meta_path = entry.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    let other = cache::FORMAT_VERSION + 1;
    meta["format_version"] = other.into();
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    cold_and_quarantined(&env, "format", &format!("unknown format_version {other}"));
}

#[test]
fn a_pages_file_replaced_by_a_symlink_is_refused_even_with_a_stamp() {
    let (env, _, entry) = warmed("link");
    let pages = pages_file(&entry);
    std::fs::remove_file(&pages).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", &pages).unwrap();
    cold_and_quarantined(&env, "link", "not a regular file");
}

#[test]
fn an_extra_file_in_an_entry_is_refused_even_with_a_stamp() {
    let (env, _, entry) = warmed("extra");
    let extra = entry.join("data/evil.img");
    std::fs::write(&extra, b"x").unwrap();
    std::fs::set_permissions(&extra, std::fs::Permissions::from_mode(0o600)).unwrap();
    cold_and_quarantined(&env, "extra", "not in the metadata");
}

#[test]
fn an_entries_dir_that_is_a_symlink_is_not_a_cache() {
    let (env, port, _) = warmed("symentries");
    let entries = env.path("cache/entries");
    let elsewhere = env.path("elsewhere");
    std::fs::rename(&entries, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &entries).unwrap();
    let mut w = env.run("symentries");
    let s = env.wait_ready("symentries", &mut w);
    assert_eq!(s["last_start"], "cold");
    assert!(
        w.err().contains("is a symlink, not a directory"),
        "{}",
        w.err()
    );
    assert!(get(port, "/health").is_some(), "the service runs anyway");
    w.stop();
}

// ------------------------------------------------------------ ownership

#[test]
fn a_cache_someone_else_owns_is_never_used() {
    let (env, _, entry) = warmed("owner");
    let nobody = nix::unistd::Uid::from_raw(65534);
    // Everything the way root's cache would be, but owned by nobody (who
    // could have planted it, with consistent checksums).
    for p in [env.path("cache"), entry.clone()] {
        nix::unistd::chown(&p, Some(nobody), None).unwrap();
    }
    let mut w = env.run("owner");
    let s = env.wait_ready("owner", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    assert!(
        w.err().contains("refusing the cache") && w.err().contains("uid 65534"),
        "{}",
        w.err()
    );
    w.stop();
}

#[test]
fn a_manifest_someone_else_could_write_is_refused() {
    require_criu();
    let env = Env::new();
    env.slowweb("m", free_port(), &["--warmup", "0.1"], "");
    let dir = env.path("manifests");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = env.command().args(["run", "m"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(
        err.contains("refusing manifest") && err.contains("writable by everyone"),
        "{err}"
    );
    // validate applies the same checks (it said `ok` to what run refuses).
    let out = env
        .command()
        .arg("validate")
        .arg(dir.join("m.yaml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(err.contains("refusing manifest"), "{err}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A manifest that is a symlink to a file nobody owns: refused before a
    // byte of it is read (its first line never shows in an error).
    let real = env.path("app/m.yaml");
    std::fs::rename(dir.join("m.yaml"), &real).unwrap();
    nix::unistd::chown(&real, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    std::os::unix::fs::symlink(&real, dir.join("m.yaml")).unwrap();
    std::fs::write(&real, "secret-first-line: x\n").unwrap();
    nix::unistd::chown(&real, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let out = env.command().args(["run", "m"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert!(!err.contains("secret-first-line"), "{err}");
}

/// The run directory gets the cache's checks: with `WARMER_RUN_DIR` under a
/// directory `nobody` owns, `nobody` could swap `run/svc` for a link to a
/// directory of root's, and root would chmod it and create sockets, logs
/// and state files there. Refused, and nothing is created through a link.
#[test]
fn a_run_directory_someone_else_controls_is_refused() {
    require_criu();
    let env = Env::new();
    env.slowweb(
        "rd",
        free_port(),
        &["--warmup", "0.1"],
        "checkpoint: {enabled: false}\n",
    );
    let nobody = nix::unistd::Uid::from_raw(65534);
    let theirs = env.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    nix::unistd::chown(&theirs, Some(nobody), None).unwrap();
    let run = theirs.join("run");
    let out = env
        .command()
        .env("WARMER_RUN_DIR", &run)
        .args(["run", "rd"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("refusing the run directory") && err.contains("uid 65534"),
        "{err}"
    );
    assert!(!run.join("rd").exists(), "nothing made in it");
    // A trusted run root, but the service's directory is a symlink (to a
    // directory of root's that must stay as it is).
    let target = env.path("root-owned");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = env.path("run2");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::symlink(&target, run.join("rd")).unwrap();
    let out = env
        .command()
        .env("WARMER_RUN_DIR", &run)
        .args(["run", "rd"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("not a directory of its own"), "{err}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&target).unwrap().mode() & 0o777,
        0o755,
        "not chmodded"
    );
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "nothing created in it"
    );
}

/// A warmer-init anyone could have written is never executed: root would
/// run it in every service's namespace.
#[test]
fn a_world_writable_warmer_init_is_refused() {
    require_criu();
    let env = Env::new();
    env.slowweb(
        "wi",
        free_port(),
        &["--warmup", "0.1"],
        "checkpoint: {enabled: false}\n",
    );
    // A copy of warmer with a warmer-init beside it that is world-writable.
    let bin = env.path("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::copy(WARMER, bin.join("warmer")).unwrap();
    std::fs::copy(init_bin(), bin.join("warmer-init")).unwrap();
    std::fs::set_permissions(
        bin.join("warmer-init"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let out = std::process::Command::new(bin.join("warmer"))
        .env("WARMER_MANIFEST_DIR", env.path("manifests"))
        .env("WARMER_CACHE_DIR", env.path("cache"))
        .env("WARMER_RUN_DIR", &env.run)
        .args(["run", "wi"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("refusing to run") && err.contains("warmer-init") && err.contains("writable"),
        "{err}"
    );
}

/// `status` as a user who cannot read root's cache says so, instead of
/// "no image cache" (or "is CRIU installed?") for a service that has one.
#[test]
fn status_as_another_user_says_it_cannot_read_the_cache() {
    require_criu();
    let (env, _, _) = warmed("st");
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::os::unix::process::CommandExt::uid(&mut env.command(), 65534)
        .args(["status", "st", "--json"])
        .output()
        .unwrap();
    let s: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{out:?}"));
    let detail = s[0]["next_start"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("cannot read the image cache") && detail.contains("uid 65534"),
        "{s}"
    );
}

// ------------------------------------------------------------ kill -9, deadlines

fn fake_env(name: &str) -> (Env, String, u16) {
    require_criu();
    let env = Env::new();
    let criu = fake_criu(env.dir.path()).display().to_string();
    let port = free_port();
    env.slowweb(name, port, &["--warmup", "0.2"], "restore: {timeout: 3s}\n");
    let mut w = env.run_with(name, &[("WARMER_CRIU", &criu), ("FAKE_CRIU_DUMP", "ok")]);
    env.wait_image(name, &mut w);
    w.stop();
    (env, criu, port)
}

fn init_bin() -> String {
    Path::new(WARMER)
        .with_file_name("warmer-init")
        .display()
        .to_string()
}

#[test]
fn leftovers_of_a_warmer_killed_mid_restore_are_ended_before_the_next_start() {
    let (env, criu, port) = fake_env("orphan");
    let init = init_bin();
    assert!(
        Path::new(&init).exists(),
        "build warmer-init first (scripts/test.sh does)"
    );
    let home = env.path("run/orphan").display().to_string();
    let left = || {
        pids_with(&format!("orphan\0{home}\0--"))
            .into_iter()
            .chain(pids_with(&format!("orphan {home} --")))
            .collect::<Vec<_>>()
    };
    let alive = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
    };
    let restoring = |env: &Env| {
        let mut w = env.run_with(
            "orphan",
            &[
                ("WARMER_CRIU", &criu),
                ("FAKE_CRIU_RESTORE", "orphan"),
                ("FAKE_CRIU_INIT", &init),
            ],
        );
        env.wait_status("orphan", &mut w, |s| s["state"] == "restoring");
        wait_for(Duration::from_secs(10), || {
            (!left().is_empty()).then_some(())
        });
        w
    };
    // 1. warmer killed while CRIU runs: its restore guard ends the tree at
    //    once; nothing waits for a next start.
    let mut w = restoring(&env);
    let tree = left();
    w.signal(Signal::SIGKILL);
    w.wait(Duration::from_secs(10));
    wait_for(Duration::from_secs(10), || {
        (!tree.iter().any(alive)).then_some(())
    });
    // 2. warmer and its guard both killed (kill -9 of everything): the next
    //    start ends the tree before anything else (its own, new init is
    //    another process).
    let mut w = restoring(&env);
    for g in pids_with(&format!("__guard orphan {home}")) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(g), Signal::SIGKILL);
    }
    w.signal(Signal::SIGKILL);
    w.wait(Duration::from_secs(10));
    let before = left();
    assert!(!before.is_empty(), "the killed run left its tree behind");
    let mut w = env.run_with(
        "orphan",
        &[("WARMER_CRIU", &criu), ("FAKE_CRIU_RESTORE", "fail")],
    );
    env.wait_ready("orphan", &mut w);
    assert!(!before.iter().any(alive), "leftovers ended: {before:?}");
    assert!(w.err().contains("from an earlier run"), "{}", w.err());
    assert!(get(port, "/health").is_some());
    w.stop();
    for p in pids_with("sleep 1001") {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
    }
}

#[test]
fn a_restore_that_never_returns_is_killed_at_its_deadline() {
    let (env, criu, port) = fake_env("stuck");
    let t = Instant::now();
    let mut w = env.run_with(
        "stuck",
        &[("WARMER_CRIU", &criu), ("FAKE_CRIU_RESTORE", "stuck")],
    );
    let s = env.wait_ready("stuck", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert!(
        s["message"]
            .as_str()
            .unwrap_or_default()
            .contains("did not finish within 3s"),
        "{s}"
    );
    assert!(get(port, "/health").is_some());
    w.stop();
}

// ------------------------------------------------------------ signals

#[test]
fn sigterm_during_a_restore_stops_promptly_and_keeps_the_image() {
    let (env, criu, _) = fake_env("termr");
    let mut w = env.run_with(
        "termr",
        &[("WARMER_CRIU", &criu), ("FAKE_CRIU_RESTORE", "stuck")],
    );
    env.wait_status("termr", &mut w, |s| s["state"] == "restoring");
    let t = Instant::now();
    let st = w.stop();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(
        st.signal(),
        Some(15),
        "dies of SIGTERM: {st:?}\n{}",
        w.err()
    );
    assert!(quarantine_reasons(&env).is_empty(), "a stop is no evidence");
    assert_eq!(env.entries().len(), 1);
    assert!(
        !w.err().contains("cold start instead"),
        "no cold start follows a stop: {}",
        w.err()
    );
}

#[test]
fn sighup_during_a_restore_is_not_evidence_against_the_image() {
    let (env, criu, _) = fake_env("hupr");
    let mut w = env.run_with(
        "hupr",
        &[("WARMER_CRIU", &criu), ("FAKE_CRIU_RESTORE", "slow")],
    );
    env.wait_status("hupr", &mut w, |s| s["state"] == "restoring");
    w.signal(Signal::SIGHUP);
    let st = w.wait(Duration::from_secs(20));
    // The restored tree (here `sleep`) died of the HUP passed on to it.
    assert_eq!(st.code(), Some(129), "{st:?}\n{}", w.err());
    assert!(
        quarantine_reasons(&env).is_empty(),
        "image kept: {}",
        w.err()
    );
    assert_eq!(env.entries().len(), 1);
}

#[test]
fn sigint_is_passed_on_and_warmer_ends_as_the_service_did() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    // A service with Python's default SIGINT handling: it dies of SIGINT.
    env.write_manifest(
        "int",
        &format!(
            "exec: [\"/usr/bin/python3\", \"-c\", \"import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(1000)\"]\nready: {{tcp: \"127.0.0.1:{port}\"}}\ncheckpoint: {{enabled: false}}\n"
        ),
    );
    let mut w = env.run("int");
    env.wait_ready("int", &mut w);
    w.signal(Signal::SIGINT);
    let st = w.wait(Duration::from_secs(20));
    assert_eq!(
        st.signal(),
        Some(2),
        "{st:?}: 130, like the service, not 143\n{}",
        w.err()
    );
}

// ------------------------------------------------------------ port taken

#[test]
fn a_port_another_process_holds_is_not_readiness() {
    require_criu();
    let env = Env::new();
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    // Another web server on the port: it answers the probe with a 200.
    std::thread::spawn(move || {
        for c in squatter.incoming().flatten() {
            let mut c = c;
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut c, &mut buf);
            let _ = std::io::Write::write_all(
                &mut c,
                b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            );
        }
    });
    env.slowweb("taken", port, &["--warmup", "0.3"], "");
    let out = env.command().args(["run", "taken"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains(&format!(
            "port {port} answers, but it is held by pid {}",
            std::process::id()
        )),
        "{err}"
    );
    assert!(
        env.entries().is_empty(),
        "no image of a half-started service"
    );
}

// ------------------------------------------------------------ disk full

/// A small tmpfs mounted for the test's cache, unmounted on drop.
struct SmallFs(PathBuf);

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_cache_without_room_is_not_filled_and_the_checkpoint_backs_off() {
    require_criu();
    let env = Env::new();
    let cache = env.path("cache");
    nix::mount::mount(
        Some("tmpfs"),
        &cache,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=8m,mode=0700"),
    )
    .expect("mount a small tmpfs (root)");
    let _fs = SmallFs(cache.clone());
    let port = free_port();
    env.slowweb("full", port, &["--warmup", "0.3"], "");
    for round in 1..=4 {
        let mut w = env.run("full");
        let s = env.wait_status("full", &mut w, |s| {
            s["state"] == "ready"
                && s["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("checkpoint skipped"))
        });
        let msg = s["message"].as_str().unwrap().to_string();
        if round <= 3 {
            assert!(msg.contains("MB free"), "round {round}: {msg}");
        } else {
            assert!(msg.contains("failed 3 times"), "round {round}: {msg}");
        }
        assert!(get(port, "/health").is_some(), "the service runs");
        w.stop();
    }
    assert!(env.entries().is_empty());
    assert_eq!(std::fs::read_dir(cache.join("tmp")).unwrap().count(), 0);
}

/// The restore guard ends a dead warmer's leftovers only while it holds the
/// service's run lock: a new `warmer run` that already took the service over
/// (it ends leftovers itself) never has its own processes killed.
#[test]
fn the_restore_guard_never_touches_a_service_another_run_owns() {
    require_criu();
    let env = Env::new();
    let home = env.path("run/owned");
    std::fs::create_dir_all(&home).unwrap();
    let cache = env.path("cache");
    let leftover = || {
        // What a restore leaves: the service's namespace init (a real one).
        std::process::Command::new(init_bin())
            .arg("owned")
            .arg(&home)
            .args(["--", "sleep", "1004"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let guard_over = |held: bool| {
        let c = cache::Cache::open(&cache).unwrap();
        let _lock = held.then(|| c.lock_run("owned").unwrap());
        let mut tree = leftover();
        // The guard, then its warmer "dies": its pipe closes without a word.
        let mut g = std::process::Command::new(WARMER)
            .args(["__guard", "owned"])
            .arg(&home)
            .arg(&cache)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(g.stdin.take());
        assert!(g.wait().unwrap().success());
        let alive = tree.try_wait().unwrap().is_none();
        let _ = tree.kill();
        let _ = tree.wait();
        alive
    };
    assert!(guard_over(true), "another run holds the lock: untouched");
    assert!(!guard_over(false), "no one does: ended");
    for p in pids_with("sleep 1004") {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
    }
}
