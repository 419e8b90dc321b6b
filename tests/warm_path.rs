//! The warm path on real CRIU and real processes: cold start, checkpoint,
//! stop, restore; and every way a restore must not happen.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// Cold start, checkpoint; returns (env, port, nonce of the cold instance).
fn warmed(name: &str, args: &[&str]) -> (Env, u16, String) {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb(name, port, &[&["--warmup", "1.5"], args].concat(), "");
    let mut w = env.run(name);
    let s = env.wait_image(name, &mut w);
    assert_eq!(s["last_start"], "cold");
    assert!(s["cold_ready_ms"].as_u64().unwrap() >= 1500, "{s}");
    let nonce = state(port)["nonce"].as_str().unwrap().to_string();
    let st = w.stop();
    assert_eq!(st.signal(), Some(Signal::SIGTERM as i32), "{}", w.err());
    (env, port, nonce)
}

#[test]
fn restore_brings_back_the_memory_state_and_its_output() {
    let (env, port, nonce) = warmed("web", &[]);
    assert!(pids_with(&env.dir.path().display().to_string()).is_empty());

    let mut w = env.run("web");
    let s = env.wait_ready("web", &mut w);
    assert_eq!(s["last_start"], "restored", "{}", w.err());
    let st = state(port);
    assert_eq!(st["nonce"], nonce.as_str(), "memory state preserved");
    assert!(st["index"].as_u64().unwrap() > 0);
    // The restored service's output reaches this warmer's stdout.
    let hit = get(port, "/hit").unwrap();
    assert!(hit.contains("\"hits\": 1"), "{hit}");
    let line = format!("slowweb: hit 1 (nonce {nonce})");
    wait_for(Duration::from_secs(5), || {
        w.out().contains(&line).then_some(())
    });
    assert!(s["ready_ms"].as_u64().unwrap() < s["cold_ready_ms"].as_u64().unwrap());
    assert!(w.err().contains("ready: restored in"), "{}", w.err());
    w.stop();
}

#[test]
fn sigterm_stops_a_restored_tree_and_leaves_nothing() {
    let child = format!("{}", 80000 + u32::from(free_port()) % 10000);
    let (env, port, _) = warmed("tree", &["--child", &child]);
    let sleeper = format!("sleep {child}");
    let mut w = env.run("tree");
    wait_for(Duration::from_secs(60), || {
        w.assert_running();
        (env.status("tree")["last_start"] == "restored" && get(port, "/health").is_some())
            .then_some(())
    });
    let marker = env.dir.path().display().to_string();
    let tree = |marker: &str| {
        pids_with(marker)
            .into_iter()
            .filter(|p| {
                !std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .unwrap_or_default()
                    .contains("lazy-pages")
            })
            .count()
    };
    // A lazily restored process's /proc/PID/cmdline reads its memory: it
    // shows once the daemon has delivered that page.
    wait_for(Duration::from_secs(10), || {
        (tree(&marker) == 2).then_some(())
    });
    wait_for(Duration::from_secs(10), || {
        (pids_with(&sleeper).len() == 1).then_some(())
    });
    let st = w.stop();
    assert_eq!(st.signal(), Some(Signal::SIGTERM as i32), "{}", w.err());
    assert!(
        pids_with(&marker).is_empty(),
        "service or init left running"
    );
    assert!(pids_with(&sleeper).is_empty(), "child left running");
    assert_eq!(env.status("tree")["state"], "stopped");
}

#[test]
fn a_killed_warmer_takes_its_service_with_it() {
    let (env, port, _) = warmed("orphan", &[]);
    let marker = env.dir.path().display().to_string();
    let mut w = env.run("orphan");
    env.wait_ready("orphan", &mut w);
    assert!(get(port, "/health").is_some());
    w.signal(Signal::SIGKILL);
    w.wait(Duration::from_secs(10));
    wait_for(Duration::from_secs(10), || {
        pids_with(&marker).is_empty().then_some(())
    });
}

#[test]
fn a_changed_program_is_never_restored() {
    let (env, port, nonce) = warmed("chg", &[]);
    let before = env.status("chg")["image"]["digest"].clone();
    // Same behaviour, different bytes: a new build of the service.
    let script = env.app();
    let mut text = std::fs::read_to_string(&script).unwrap();
    text.push_str("\n# rebuilt\n");
    std::fs::write(&script, text).unwrap();
    assert!(
        env.status("chg")["image"].is_null(),
        "no image for the new digest"
    );

    let mut w = env.run("chg");
    let s = env.wait_image("chg", &mut w);
    assert_eq!(s["last_start"], "cold");
    assert_ne!(
        state(port)["nonce"],
        nonce.as_str(),
        "a fresh process, not the old image"
    );
    assert_ne!(s["image"]["digest"], before);
    w.stop();
}

#[test]
fn a_corrupt_image_falls_back_to_a_cold_start_and_is_quarantined() {
    let (env, port, nonce) = warmed("bad", &[]);
    let entry = env.entries().pop().unwrap();
    flip_bit_in_pages(&entry, 0x01);

    let mut w = env.run("bad");
    let s = env.wait_ready("bad", &mut w);
    assert_eq!(s["last_start"], "cold", "{}", w.err());
    assert_ne!(state(port)["nonce"], nonce.as_str());
    assert!(w.err().contains("checksum mismatch"), "{}", w.err());
    let quarantined = std::fs::read_dir(env.path("cache/quarantine"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 1);
    w.stop();
}

#[test]
fn an_image_criu_cannot_restore_falls_back_to_a_cold_start() {
    let (env, port, nonce) = warmed("unr", &[]);
    // Intact checksums, unrestorable content: an image CRIU rejects.
    let entry = env.entries().pop().unwrap();
    let pstree = entry.join("data/pstree.img");
    std::fs::write(&pstree, b"garbage").unwrap();
    reseal(&entry);

    let mut w = env.run("unr");
    let s = env.wait_ready("unr", &mut w);
    assert_eq!(s["last_start"], "cold", "{}", w.err());
    assert_ne!(state(port)["nonce"], nonce.as_str());
    let err = w.err();
    // An image this big is restored lazily by default: then the lazy-pages
    // daemon is the first to read (and reject) it.
    assert!(
        err.contains("criu restore failed") || err.contains("criu lazy-pages failed"),
        "{err}"
    );
    assert!(
        err.contains("restore.log") || err.contains("lazy-pages.log"),
        "the CRIU log path is named: {err}"
    );
    assert!(
        err.contains("Head magic doesn't match"),
        "CRIU's own reason: {err}"
    );
    w.stop();
}

/// Recomputes an entry's recorded checksums after a test edited its files.
fn reseal(entry: &std::path::Path) {
    let meta_path = entry.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    for f in meta["files"].as_array_mut().unwrap() {
        let path = entry.join("data").join(f["path"].as_str().unwrap());
        let mut file = std::fs::File::open(&path).unwrap();
        let (hex, size) = cache::hash_file(&mut file).unwrap();
        f["blake3"] = hex.into();
        f["size"] = size.into();
    }
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
}

#[test]
fn notify_probe_cold_and_restored() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    let script = env.app();
    env.write_manifest(
        "ntf",
        &format!(
            "exec: [\"/usr/bin/python3\", \"{}\", \"--port\", \"{port}\", \"--warmup\", \"1\", \"--notify\"]\nready:\n  notify: true\n  timeout: 30s\ncheckpoint: {{settle: 100ms}}\n",
            script.display()
        ),
    );
    let nonce = env.make_image("ntf", port);
    let mut w = env.run("ntf");
    let s = env.wait_ready("ntf", &mut w);
    assert_eq!(s["last_start"], "restored");
    assert_eq!(state(port)["nonce"], nonce);
    w.stop();
}

#[test]
fn a_service_that_exits_makes_warmer_exit_with_its_status() {
    require_criu();
    let env = Env::new();
    env.write_manifest(
        "quits",
        "exec: [\"/bin/sh\", \"-c\", \"echo started; sleep 0.3; exit 7\"]\nready:\n  exec: [\"true\"]\n  timeout: 10s\ncheckpoint: {enabled: false}\n",
    );
    let mut w = env.run("quits");
    let st = w.wait(Duration::from_secs(20));
    assert_eq!(st.code(), Some(7), "{}", w.err());
    assert!(w.out().contains("started"));
    assert_eq!(env.status("quits")["state"], "stopped");
}

#[test]
fn a_second_run_of_the_same_service_is_refused() {
    require_criu();
    let env = Env::new();
    let (_port, mut w) = env.start_plain("dup");
    let mut second = env.run("dup");
    let st = second.wait(Duration::from_secs(10));
    assert_eq!(st.code(), Some(75), "{}", second.err());
    assert!(second.err().contains("already running"));
    w.stop();
}

#[test]
fn state_files_restore_only_while_the_data_is_as_it_was_and_are_never_overwritten() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    let data = env.path("app/data");
    std::fs::create_dir(&data).unwrap();
    let file = data.join("state.txt");
    env.slowweb(
        "st",
        port,
        &[
            "--warmup",
            "0.5",
            "--statefile",
            &file.display().to_string(),
        ],
        &format!("state: [\"{}\"]\n", data.display()),
    );
    let mut w = env.run("st");
    env.wait_image("st", &mut w);
    let nonce = state(port)["nonce"].as_str().unwrap().to_string();
    w.stop();
    // Unchanged data (a file held open for writing among it): restored.
    let mut w = env.run("st");
    let s = env.wait_ready("st", &mut w);
    assert_eq!(s["last_start"], "restored", "{}", w.err());
    assert_eq!(state(port)["nonce"], nonce.as_str());
    w.stop();
    // The disk moves on: the image is older than the data, so it is not
    // restored, and nothing is copied over the newer data.
    std::fs::write(&file, format!("{nonce} and much more since")).unwrap();
    std::fs::write(data.join("later.txt"), "x").unwrap();
    let mut w = env.run("st");
    let s = env.wait_ready("st", &mut w);
    assert_eq!(s["last_start"], "cold", "{}", w.err());
    assert!(data.join("later.txt").exists(), "newer data kept");
    let cold_nonce = state(port)["nonce"].as_str().unwrap().to_string();
    assert_ne!(cold_nonce, nonce);
    // The cold start on the current data is the new generation.
    let s = env.wait_image("st", &mut w);
    assert_eq!(s["image"]["generation"], 2, "{s}");
    w.stop();
    let mut w = env.run("st");
    let s = env.wait_ready("st", &mut w);
    assert_eq!(s["last_start"], "restored", "{}", w.err());
    assert_eq!(state(port)["nonce"], cold_nonce.as_str());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), cold_nonce);
    w.stop();
}

#[test]
fn a_state_file_a_reboot_took_from_a_tmpfs_goes_back_with_the_image() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    // A file the service keeps open in /dev/shm: gone after a reboot, and
    // CRIU cannot restore without it ("Can't open file dev/shm/...").
    let shm = std::path::PathBuf::from(format!(
        "/dev/shm/warmer-test-{}",
        env.dir.path().file_name().unwrap().to_string_lossy()
    ));
    env.slowweb(
        "shm",
        port,
        &["--warmup", "0.5", "--statefile", &shm.display().to_string()],
        &format!("state: [\"{}\"]\n", shm.display()),
    );
    let mut w = env.run("shm");
    env.wait_image("shm", &mut w);
    let nonce = state(port)["nonce"].as_str().unwrap().to_string();
    w.stop();
    std::fs::remove_file(&shm).unwrap(); // the reboot
    let mut w = env.run("shm");
    let s = env.wait_ready("shm", &mut w);
    assert_eq!(s["last_start"], "restored", "{}", w.err());
    assert_eq!(state(port)["nonce"], nonce.as_str());
    assert_eq!(std::fs::read_to_string(&shm).unwrap(), nonce);
    w.stop();
    let _ = std::fs::remove_file(&shm);
}

#[test]
fn a_changed_input_marks_the_image_stale_at_once() {
    let (env, port, nonce) = warmed("stale", &[]);
    let mut w = env.run("stale");
    let s = env.wait_ready("stale", &mut w);
    assert_eq!(s["last_start"], "restored");
    let script = env.app();
    let original = std::fs::read_to_string(&script).unwrap();
    std::fs::write(&script, format!("{original}\n# hotfix\n")).unwrap();
    let s = env.wait_status("stale", &mut w, |s| !s["stale"].is_null());
    assert!(
        s["stale"].as_str().unwrap().contains("server.py changed"),
        "{s}"
    );
    // Changed back: the digest is the old one again, but the image was marked
    // stale while the service ran, so it is not restored.
    std::fs::write(&script, &original).unwrap();
    w.stop();
    let mut w = env.run("stale");
    let s = env.wait_ready("stale", &mut w);
    assert_eq!(s["last_start"], "cold", "{}", w.err());
    assert_ne!(state(port)["nonce"], nonce.as_str());
    // And the next cold start makes a fresh image for the same digest.
    let s = env.wait_image("stale", &mut w);
    assert!(s["stale"].is_null(), "{s}");
    w.stop();
}

#[test]
fn the_second_restore_in_a_boot_skips_hashing() {
    let (env, _port, _) = warmed("stamp", &[]);
    let mut w = env.run("stamp");
    env.wait_ready("stamp", &mut w);
    assert!(
        w.err().contains("integrity: stamp"),
        "published this boot: {}",
        w.err()
    );
    w.stop();
    // A verification stamp from another boot does not count.
    for stamp in std::fs::read_dir(env.path("cache/verified")).unwrap() {
        std::fs::remove_file(stamp.unwrap().path()).unwrap();
    }
    let mut w = env.run("stamp");
    env.wait_ready("stamp", &mut w);
    assert!(w.err().contains("hashed alongside"), "{}", w.err());
    w.stop();
    let mut w = env.run("stamp");
    env.wait_ready("stamp", &mut w);
    assert!(w.err().contains("integrity: stamp"), "{}", w.err());
    w.stop();
}

#[test]
fn an_entry_with_loose_permissions_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (env, port, nonce) = warmed("perm", &[]);
    let entry = env.entries().pop().unwrap();
    let core = entry.join("data/pstree.img");
    std::fs::set_permissions(&core, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut w = env.run("perm");
    let s = env.wait_ready("perm", &mut w);
    assert_eq!(s["last_start"], "cold");
    assert_ne!(state(port)["nonce"], nonce.as_str());
    assert!(w.err().contains("allows group/other access"), "{}", w.err());
    w.stop();
}

#[test]
fn leftover_criu_network_lock_rules_are_removed() {
    require_criu();
    let _iptables = iptables_lock();
    // The rule a --tcp-established dump adds per connection (criu/netfilter.c).
    let rule = [
        "INPUT",
        "-s",
        "127.0.0.77/32",
        "-d",
        "127.0.0.77/32",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--sport",
        "4001",
        "--dport",
        "4002",
        "-m",
        "mark",
        "!",
        "--mark",
        "0xc114",
        "-j",
        "DROP",
    ];
    let st = std::process::Command::new("iptables")
        .arg("-A")
        .args(rule)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "iptables is needed (scripts/deps.sh installs it)"
    );
    let listed = || {
        let out = std::process::Command::new("iptables-save")
            .args(["-t", "filter"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("127.0.0.77")
    };
    assert!(listed());
    // Only the rules of the given connections go.
    let other = warmer::criu::Conn {
        a: "127.0.0.77:4001".parse().unwrap(),
        b: "127.0.0.77:4999".parse().unwrap(),
    };
    assert_eq!(warmer::criu::clear_network_locks(&[other]), 0);
    assert!(listed(), "another connection's rule stays");
    let ours = warmer::criu::Conn {
        a: "127.0.0.77:4002".parse().unwrap(),
        b: "127.0.0.77:4001".parse().unwrap(),
    };
    assert!(warmer::criu::clear_network_locks(&[ours]) >= 1);
    assert!(!listed(), "the lock rule is gone");
}

#[test]
fn several_services_started_at_once_on_a_new_cache_all_checkpoint_and_restore() {
    require_criu();
    let env = Env::new();
    let names = ["par1", "par2", "par3"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    for (name, port) in names.iter().zip(&ports) {
        env.slowweb(name, *port, &["--warmup", "0.5"], "");
    }
    // All at once: the cache directory does not exist yet.
    let mut runs: Vec<Warmer> = names.iter().map(|n| env.run(n)).collect();
    for (name, w) in names.iter().zip(runs.iter_mut()) {
        let s = env.wait_image(name, w);
        assert_eq!(s["last_start"], "cold", "{}", w.err());
        assert!(!w.err().contains("warning"), "{}", w.err());
    }
    let nonces: Vec<_> = ports.iter().map(|p| state(*p)["nonce"].clone()).collect();
    for w in runs.iter_mut() {
        w.stop();
    }
    let mut runs: Vec<Warmer> = names.iter().map(|n| env.run(n)).collect();
    for ((name, w), (port, nonce)) in names
        .iter()
        .zip(runs.iter_mut())
        .zip(ports.iter().zip(&nonces))
    {
        let s = env.wait_ready(name, w);
        assert_eq!(s["last_start"], "restored", "{}", w.err());
        assert_eq!(&state(*port)["nonce"], nonce);
    }
    for w in runs.iter_mut() {
        w.stop();
    }
}

#[test]
fn a_failed_checkpoint_leaves_the_service_running_and_says_why() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb(
        "busy",
        port,
        &["--warmup", "0.5"],
        "checkpoint: {settle: 1500ms}\n",
    );
    let mut w = env.run("busy");
    env.wait_ready("busy", &mut w);
    let nonce = state(port)["nonce"].clone();
    // A client connects and stays connected through the checkpoint: CRIU
    // refuses to dump an established TCP connection without
    // --tcp-established.
    let held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let s = env.wait_status("busy", &mut w, |s| !s["message"].is_null());
    let msg = s["message"].as_str().unwrap();
    assert!(msg.contains("checkpoint failed"), "{msg}");
    // The peer is named, not only a hint that blames clients.
    let client = held.local_addr().unwrap().to_string();
    assert!(
        msg.contains(&client) && msg.contains("ESTABLISHED"),
        "{msg}"
    );
    assert!(
        w.err().contains("hint:") && w.err().contains("tcp_established"),
        "{}",
        w.err()
    );
    assert!(s["image"].is_null());
    assert!(env.entries().is_empty(), "nothing half-published");
    assert!(
        std::fs::read_dir(env.path("cache/tmp"))
            .unwrap()
            .next()
            .is_none(),
        "staging removed"
    );
    drop(held);
    // The service never noticed.
    assert_eq!(state(port)["nonce"], nonce);
    assert_eq!(env.status("busy")["state"], "ready");
    w.stop();
}

#[test]
fn a_lazy_restore_serves_the_same_memory_and_leaves_nothing_behind() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb("lazy", port, &["--warmup", "1"], "restore: {lazy: true}\n");
    let nonce = env.make_image("lazy", port);
    let mut w = env.run("lazy");
    let s = env.wait_ready("lazy", &mut w);
    assert_eq!(s["last_start"], "restored", "{}", w.err());
    // Every page of the index is touched: all of it arrives.
    assert_eq!(state(port)["nonce"], nonce);
    assert!(get(port, "/hit").is_some());
    w.stop();
    let marker = env.dir.path().display().to_string();
    assert!(pids_with(&marker).is_empty(), "service left running");
    assert!(
        pids_with(&format!("lazy-pages --images-dir {marker}")).is_empty(),
        "lazy-pages daemon left running"
    );
    assert!(!w.err().contains("Traceback"), "{}", w.err());
}

#[test]
fn a_stale_lazy_socket_is_no_obstacle_and_a_killed_lazy_daemon_means_cold_then_eager() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb("lz", port, &["--warmup", "1"], "restore: {mode: lazy}\n");
    let nonce = env.make_image("lz", port);

    // A socket file left by a daemon that died with an earlier warmer.
    std::fs::write(env.run.join("lz/lazy-pages.socket"), b"").unwrap();
    let mut w = env.run("lz");
    let s = env.wait_ready("lz", &mut w);
    assert_eq!(s["last_start"], "restored", "{}", w.err());
    assert_eq!(state(port)["nonce"], nonce);
    w.stop();

    // The daemon killed the moment it appears: never a half-restored
    // service; a cold start instead, and the image's next restore is eager.
    let marker = env.dir.path().display().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let (stop, needle) = (stop.clone(), format!("lazy-pages --images-dir {marker}"));
        std::thread::spawn(move || {
            let mut killed = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for pid in pids_with(&needle) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    killed += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            killed
        })
    };
    let mut w = env.run("lz");
    let s = env.wait_ready("lz", &mut w);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(killer.join().unwrap() > 0, "the daemon was never seen");
    assert_eq!(s["last_start"], "cold", "{s}\n{}", w.err());
    assert_ne!(state(port)["nonce"], nonce, "a fresh cold start");
    w.stop();
    let history: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.run.join("lz/restore-history.json")).unwrap())
            .unwrap();
    assert!(history["lazy_failed"].is_string(), "{history}");
    assert!(
        pids_with(&format!("lazy-pages --images-dir {marker}")).is_empty(),
        "lazy-pages daemon left running"
    );
}

/// The working set a cache entry has learned: (restores, pages).
fn working_set(env: &Env) -> Option<(u64, u64)> {
    let notes = std::fs::read_dir(env.path("cache/notes")).ok()?;
    let dir = notes.filter_map(|d| d.ok()).next()?.path();
    let ws: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("working-set")).ok()?).ok()?;
    let pages = ws["pids"]
        .as_object()?
        .values()
        .flat_map(|runs| runs.as_array().unwrap().iter())
        .map(|run| run[1].as_u64().unwrap())
        .sum();
    Some((ws["restores"].as_u64()?, pages))
}

#[test]
fn auto_learns_what_a_restore_touches_and_the_next_restore_brings_it_first() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    // A fixed amount of memory, well above the 64 MiB where auto goes lazy.
    env.slowweb("ws", port, &["--records", "700000"], "");
    let nonce = env.make_image("ws", port);
    assert_eq!(working_set(&env), None);

    // First restore: lazy, nothing known; what it faults on is learned.
    let mut w = env.run("ws");
    let s = env.wait_ready("ws", &mut w);
    assert_eq!(s["last_start"], "restored", "{}", w.err());
    assert!(w.err().contains("lazy (auto:"), "{}", w.err());
    assert_eq!(state(port)["nonce"], nonce);
    w.stop();
    let (restores, pages) = working_set(&env).expect("a working set was learned");
    assert_eq!(restores, 1);
    assert!(pages > 0);
    let image_pages = 700_000 * 100 / 4096;
    assert!(pages < image_pages, "{pages} pages: only what was touched");
    let out = env.command().args(["inspect", "ws"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("working set") && text.contains("learned from 1 restores"),
        "{text}"
    );

    // Second: the working set first, the rest on demand: the same memory.
    let mut w = env.run("ws");
    let s = env.wait_ready("ws", &mut w);
    assert_eq!(s["last_start"], "restored", "{}", w.err());
    assert!(w.err().contains("working set first (auto:"), "{}", w.err());
    assert!(w.err().contains("restored first"), "{}", w.err());
    let st = state(port);
    assert_eq!(st["nonce"], nonce);
    assert_eq!(st["index"], 700_000);
    assert!(get(port, "/hit").is_some());
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.run.join("ws/state.json")).unwrap()).unwrap();
    assert_eq!(rec["restore_choice"]["working_set"], true, "{rec}");
    // The view: the entry's files, but its own pagemaps.
    let view = env.run.join("ws/image-view");
    let pagemaps: Vec<_> = std::fs::read_dir(&view)
        .unwrap()
        .filter_map(|d| d.ok())
        .filter(|d| d.file_name().to_string_lossy().starts_with("pagemap-"))
        .collect();
    assert!(pagemaps.iter().any(|d| d.file_type().unwrap().is_file()));
    let pages_img = view.join("pages-1.img");
    assert!(std::fs::symlink_metadata(&pages_img)
        .unwrap()
        .file_type()
        .is_symlink());
    w.stop();
    assert!(working_set(&env).unwrap().0 >= 1);
    let marker = env.dir.path().display().to_string();
    assert!(pids_with(&marker).is_empty(), "service left running");

    // A working set that is not one (garbage in the note) is no obstacle.
    let notes = std::fs::read_dir(env.path("cache/notes")).unwrap();
    let note = notes.filter_map(|d| d.ok()).next().unwrap().path();
    std::fs::write(note.join("working-set"), b"{garbage").unwrap();
    let mut w = env.run("ws");
    let s = env.wait_ready("ws", &mut w);
    assert_eq!(s["last_start"], "restored", "{}", w.err());
    assert!(w.err().contains("lazy (auto:"), "{}", w.err());
    assert_eq!(state(port)["nonce"], nonce);
    w.stop();
}

#[test]
fn auto_restores_a_small_image_eagerly_and_says_why() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    // A fixed, small amount of work (a time-bound warm-up grows the image
    // with the machine's speed, past the 64 MiB line on a fast one).
    env.slowweb("small", port, &["--records", "1000"], "");
    let mut w = env.run("small");
    env.wait_image("small", &mut w);
    w.stop();
    let st = env.status("small");
    let detail = st["next_start"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("eager (auto:") && detail.contains("under 64 MiB"),
        "{st}"
    );
    let mut w = env.run("small");
    let s = env.wait_ready("small", &mut w);
    assert_eq!(s["last_start"], "restored");
    w.stop();
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.run.join("small/state.json")).unwrap()).unwrap();
    assert_eq!(rec["restore_choice"]["lazy"], false, "{rec}");
    assert!(w.err().contains("eager (auto:"), "{}", w.err());
}

#[test]
fn a_data_file_outside_state_is_named_by_validate_and_kept_from_a_restore() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    // Data where data lives (not under /tmp, which counts as scratch).
    let data_dir = tempfile::Builder::new()
        .prefix("warmer-test-")
        .tempdir_in("/var/lib")
        .unwrap();
    let file = data_dir.path().join("nonce.dat");
    env.slowweb(
        "outside",
        port,
        &[
            "--warmup",
            "0.3",
            "--statefile",
            &file.display().to_string(),
        ],
        "",
    );
    let mut w = env.run("outside");
    env.wait_image("outside", &mut w);
    w.stop();
    let manifest = env.path("manifests/outside.yaml");
    let out = env
        .command()
        .arg("validate")
        .arg(&manifest)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("holds {} open for writing", file.display()))
            && err.contains("state:"),
        "{err}"
    );
    // The file moves on: it is state though undeclared, so the image is
    // older than the data: no restore is tried; cold, naming the file.
    std::fs::write(&file, "written by someone since").unwrap();
    let mut w = env.run("outside");
    let s = env.wait_ready("outside", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    let msg = s["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&*file.display().to_string()) && msg.contains("open for writing"),
        "{msg}"
    );
    assert!(
        quarantine_reasons(&env).is_empty(),
        "nothing failed: the image was never tried"
    );
    w.stop();
}

#[test]
fn fds_of_warmers_caller_reach_neither_the_service_nor_its_image() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb("fds", port, &["--warmup", "0.3"], "");
    // A caller with a stray, inheritable fd (as a shell script can have).
    let stray = std::fs::File::open("/dev/null").unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&stray);
    let high = nix::fcntl::fcntl(&stray, nix::fcntl::FcntlArg::F_DUPFD(40)).unwrap();
    assert!(high >= 40 && raw != high);
    let mut w = env.run("fds");
    assert!(
        std::path::Path::new(&format!("/proc/{}/fd/{high}", w.pid())).exists(),
        "warmer itself inherited the stray fd (the case under test)"
    );
    env.wait_image("fds", &mut w);
    let svc = state(port)["pid"].as_i64().unwrap();
    let outer = pids_with("--port")
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| {
                s.lines().any(|l| {
                    l.starts_with("NSpid:") && l.split_whitespace().last() == Some(&svc.to_string())
                }) && std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.contains(&port.to_string()))
            })
        })
        .expect("the service's pid");
    let fds: Vec<i32> = std::fs::read_dir(format!("/proc/{outer}/fd"))
        .unwrap()
        .filter_map(|d| d.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    assert!(
        !fds.contains(&high),
        "the stray fd {high} reached the service: {fds:?}"
    );
    // status names the service's own process, and its init apart.
    let s = env.status("fds");
    assert_eq!(s["pid"], outer, "{s}");
    assert_ne!(s["init_pid"], outer, "{s}");
    w.stop();
    // Restored from an image that holds no stray fd either.
    let mut w = env.run("fds");
    let s = env.wait_ready("fds", &mut w);
    assert_eq!(s["last_start"], "restored", "{}", w.err());
    w.stop();
    nix::unistd::close(high).unwrap();
}

#[test]
fn files_a_service_writes_among_its_inputs_at_first_start_do_not_make_it_stale() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    // A Python app whose digest covers its whole directory: at its first
    // start Python writes __pycache__/helper.*.pyc into it.
    let app = env.path("site");
    std::fs::create_dir(&app).unwrap();
    std::fs::write(app.join("helper.py"), "GREETING = 'hi'\n").unwrap();
    let server = std::fs::read_to_string(repo().join("examples/slowweb/server.py")).unwrap();
    std::fs::write(app.join("server.py"), format!("import helper\n{server}")).unwrap();
    env.write_manifest(
        "pyc",
        &format!(
            "exec: [\"/usr/bin/python3\", \"{}\", \"--port\", \"{port}\", \"--warmup\", \"0.3\"]\n\
             workdir: {}\nenv: {{PYTHONPATH: \"{}\", PYTHONDONTWRITEBYTECODE: \"\"}}\n\
             ready: {{http: \"http://127.0.0.1:{port}/health\"}}\ncheckpoint: {{settle: 100ms}}\n\
             digest: {{files: [\"{}\"]}}\n",
            app.join("server.py").display(),
            app.display(),
            app.display(),
            app.display()
        ),
    );
    let mut w = env.run("pyc");
    let s = env.wait_image("pyc", &mut w);
    assert!(s["stale"].is_null(), "{s}\n{}", w.err());
    assert!(app.join("__pycache__").exists(), "the case under test");
    w.stop();
    let mut w = env.run("pyc");
    let s = env.wait_ready("pyc", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    // A real change still makes it stale at once.
    std::fs::write(app.join("helper.py"), "GREETING = 'hello'\n").unwrap();
    let s = env.wait_status("pyc", &mut w, |s| !s["stale"].is_null());
    assert!(
        s["stale"].as_str().unwrap().contains("helper.py changed"),
        "{s}"
    );
    w.stop();
}

/// A tcp probe leaves nothing behind in the service: ZooKeeper accepts a
/// connection and waits for data on it; a probe that closed with a FIN left
/// it in CLOSE_WAIT, and every checkpoint failed ("Connected TCP socket").
#[test]
fn a_tcp_probe_leaves_no_connection_a_checkpoint_trips_on() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    let script = env.path("hold.py");
    std::fs::write(
        &script,
        "import socket, sys, time\n\
         time.sleep(0.3)\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(16)\n\
         held = []\n\
         while True:\n    c, _ = s.accept(); held.append(c)\n",
    )
    .unwrap();
    env.write_manifest(
        "hold",
        &format!(
            "exec: [\"/usr/bin/python3\", \"{}\", \"{port}\"]\nready: {{tcp: \"127.0.0.1:{port}\"}}\ncheckpoint: {{settle: 300ms}}\n",
            script.display()
        ),
    );
    let mut w = env.run("hold");
    let s = env.wait_status("hold", &mut w, |s| {
        !s["image"].is_null()
            || s["message"]
                .as_str()
                .is_some_and(|m| m.contains("checkpoint"))
    });
    assert!(
        !s["image"].is_null(),
        "the probe's connection must not fail the checkpoint: {s}\n{}",
        w.err()
    );
    w.stop();
    let mut w = env.run("hold");
    let s = env.wait_ready("hold", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    w.stop();
}

/// A persist-mode stop-time dump with `tcp_established` leaves CRIU's DROP
/// rules for the restore to lift; an image that is never restored must not
/// leave them behind (they drop the peer's packets for good).
#[test]
fn network_locks_of_an_image_never_restored_are_removed_at_the_next_start() {
    require_criu();
    let _iptables = iptables_lock();
    let env = Env::new();
    // The service's own peer (as epmd is RabbitMQ's), accepting and holding.
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer_port = peer.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in peer.incoming().flatten() {
            held.push(c);
        }
    });
    let port = free_port();
    env.http_service(
        "peered",
        port,
        &peer_port.to_string(),
        "peer = socket.create_connection(('127.0.0.1', int(sys.argv[2])))",
        "mode: persist\ncheckpoint: {tcp_established: true}\n",
    );
    let locked = || {
        let out = std::process::Command::new("iptables-save")
            .args(["-t", "filter"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("0xc114") && l.contains(&format!("port {peer_port} ")))
            .count()
    };
    let mut w = env.run("peered");
    env.wait_ready("peered", &mut w);
    w.stop();
    assert!(
        locked() > 0,
        "the stop-time dump locked the peer connection: {}",
        w.err()
    );
    // An image that is there but is not restored (a cold start, as after a
    // failed restore): its rules go at the next ready start.
    let mut w = env.run_with_args("peered", &["--cold"], &[]);
    env.wait_ready("peered", &mut w);
    assert_eq!(
        locked(),
        0,
        "rules of the unrestored image remain:\n{}",
        w.err()
    );
    w.stop();
    // The image is removed: it will never be restored, its rules go with it.
    let mut w = env.run("peered");
    env.wait_ready("peered", &mut w);
    w.stop();
    assert!(locked() > 0);
    let out = env
        .command()
        .args(["cache", "rm", "peered"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(locked(), 0, "rules of the removed image remain");
    let mut w = env.run("peered");
    let s = env.wait_ready("peered", &mut w);
    assert_eq!(s["last_start"], "cold", "{s}");
    assert_eq!(
        locked(),
        0,
        "rules of the unrestored image remain:\n{}",
        w.err()
    );
    w.stop();
    // The last stop's image restores (CRIU lifts its own rules).
    let mut w = env.run("peered");
    let s = env.wait_ready("peered", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(locked(), 0);
    w.stop();
    // Leave no rules for other tests: what the next start would remove.
    assert!(locked() > 0);
    assert!(warmer::criu::locks::release(&env.path("run/peered"), &[]) > 0);
    assert_eq!(locked(), 0);
}

/// A service's own PID file says its PID inside warmer's namespace (2); the
/// manifest's `pid_file` gets the host's view of it, cold and restored, for
/// the host's tools (pg_lsclusters), and goes when the service stops.
#[test]
fn pid_file_holds_the_host_pid_cold_and_restored() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    let pid_path = env.path("run-svc/svc.pid");
    std::fs::create_dir_all(pid_path.parent().unwrap()).unwrap();
    env.http_service(
        "pidder",
        port,
        pid_path.to_str().unwrap(),
        "time.sleep(0.3)\nopen(sys.argv[2], 'w').write(f'{os.getpid()}\\n')",
        &format!(
            "pid_file: {}\ncheckpoint: {{settle: 100ms}}\n",
            pid_path.display()
        ),
    );
    let host_pid_in_file = || -> i32 {
        std::fs::read_to_string(&pid_path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let mut w = env.run("pidder");
    let s = env.wait_image("pidder", &mut w);
    assert_eq!(s["last_start"], "cold");
    let pid = host_pid_in_file();
    assert_ne!(pid, 2, "the namespace's PID was replaced");
    assert_eq!(s["pid"], pid, "{s}");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.contains("pidder.py"), "{cmdline}");
    w.stop();
    assert!(!pid_path.exists(), "removed with the service");
    let mut w = env.run("pidder");
    let s = env.wait_ready("pidder", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    let restored = host_pid_in_file();
    assert_eq!(s["pid"], restored, "{s}");
    assert_ne!(restored, pid);
    w.stop();
}

/// Connections waiting in a listening socket's queue at the dump (clients
/// connecting while a stop or a ready-time checkpoint freezes the service)
/// made the dump fail ("In-flight connection") and the next start cold.
/// They are left out of the image (their clients reconnect).
#[test]
fn connections_waiting_to_be_accepted_do_not_fail_a_checkpoint() {
    require_criu();
    let env = Env::new();
    let (port, queue) = (free_port(), free_port());
    env.http_service(
        "inflight",
        port,
        &queue.to_string(),
        "q = socket.socket(); q.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\nq.bind(('127.0.0.1', int(sys.argv[2]))); q.listen(16)  # never accepted",
        "checkpoint: {settle: 1s}\n",
    );
    let mut w = env.run("inflight");
    env.wait_ready("inflight", &mut w);
    // Clients queue up while the service settles, never accepted.
    let clients: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", queue)).unwrap())
        .collect();
    let s = env.wait_status("inflight", &mut w, |s| {
        !s["image"].is_null()
            || s["message"]
                .as_str()
                .is_some_and(|m| m.contains("checkpoint"))
    });
    assert!(!s["image"].is_null(), "{s}\n{}", w.err());
    drop(clients);
    w.stop();
    let mut w = env.run("inflight");
    let s = env.wait_ready("inflight", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    w.stop();
}

/// 96 MiB of random memory, one page of it touched every 5 ms for as long
/// as it runs (never 30 ms without a fault once restored lazily); a
/// connection that sends `hash` gets the hash the memory had at the start
/// and the one it has now.
const BUSY_MEMORY: &str = r#"
import hashlib, os, socket, sys, threading, time
port = int(sys.argv[1])
blob = bytearray(os.urandom(96 << 20))
first = hashlib.sha256(blob).hexdigest()
def touch():
    i = 0
    while True:
        blob[(i * 4096) % len(blob)] ^= 0
        i += 1
        time.sleep(0.005)
threading.Thread(target=touch, daemon=True).start()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen()
while True:
    c, _ = s.accept()
    try:
        if c.recv(16).startswith(b"hash"):
            c.sendall(f"{first} {hashlib.sha256(blob).hexdigest()}".encode())
    except OSError:
        pass  # a probe's connection, reset
    c.close()
"#;

#[test]
fn a_lazy_restore_holds_the_rest_until_the_service_is_quiet_and_not_forever() {
    require_criu();
    require_quiet_background();
    let env = Env::new();
    let port = free_port();
    let script = env.path("busy.py");
    std::fs::write(&script, BUSY_MEMORY).unwrap();
    env.write_manifest(
        "busy",
        &format!(
            "exec: [\"/usr/bin/python3\", \"{}\", \"{port}\"]\n\
             ready: {{tcp: \"127.0.0.1:{port}\", timeout: 30s}}\n\
             checkpoint: {{settle: 100ms}}\n\
             restore: {{mode: lazy}}\n",
            script.display()
        ),
    );
    let mut w = env.run("busy");
    env.wait_image("busy", &mut w);
    w.stop();

    let mut w = env.run("busy");
    let s = env.wait_ready("busy", &mut w);
    assert_eq!(s["last_start"], "restored", "{}", w.err());
    // The daemon was asked to hold what nobody asked for until the tree
    // went 30 ms without a fault.
    let marker = env.dir.path().display().to_string();
    let daemons = pids_with(&format!("lazy-pages --images-dir {marker}"));
    assert_eq!(daemons.len(), 1, "one lazy-pages daemon");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", daemons[0])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("--lazy-bg-idle 30"), "{cmdline}");
    // This service faults every 5 ms, so it is never quiet: the rest must
    // still come (CRIU sends it regardless 100 x 30 ms after the restore;
    // page by page, as the service touches it, it would take 2 minutes)
    // and the daemon end, while the service keeps running.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !pids_with(&format!("lazy-pages --images-dir {marker}")).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the lazy-pages daemon still runs 30 s after the restore: the rest of the memory was held back for good"
        );
        w.assert_running();
        std::thread::sleep(Duration::from_millis(100));
    }
    w.assert_running();
    // Every page arrived, and arrived right.
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"hash").unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    let (first, now) = answer.split_once(' ').expect("two hashes");
    assert_eq!(first.len(), 64, "{answer}");
    assert_eq!(first, now, "the memory changed across the restore");
    w.stop();
    assert!(pids_with(&marker).is_empty(), "service left running");
}
