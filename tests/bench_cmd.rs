//! `warmer bench` on a real service: makes the image, interleaves the three
//! kinds of start, reports every field scripts rely on, writes md/svg/json.

mod common;

use common::*;

#[test]
fn bench_reports_cold_restore_and_bare_criu() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    env.slowweb("bw", port, &["--warmup", "0.6"], "");
    let out_dir = env.path("out");
    let out = env
        .command()
        .args(["bench", "bw", "--runs", "2", "--json", "--out"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("run 2/2"), "progress is shown: {err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["service"], "bw");
    assert_eq!(r["runs"], 2);
    assert!(r["image_bytes"].as_u64().unwrap() > 1_000_000);
    for kind in ["cold", "restore", "criu_restore"] {
        let s = &r[kind];
        let (median, min, max) = (
            s["median_ms"].as_f64().unwrap(),
            s["min_ms"].as_f64().unwrap(),
            s["max_ms"].as_f64().unwrap(),
        );
        assert!(min > 0.0 && min <= median && median <= max, "{kind}: {s}");
        assert_eq!(r["samples"][kind].as_array().unwrap().len(), 2);
    }
    assert!(
        r["cold"]["median_ms"].as_f64().unwrap() >= 600.0,
        "the warm-up is real"
    );
    let ratio =
        r["cold"]["median_ms"].as_f64().unwrap() / r["restore"]["median_ms"].as_f64().unwrap();
    assert!((r["ratio"].as_f64().unwrap() - ratio).abs() < 1e-9);
    for ext in ["md", "svg", "json"] {
        let p = out_dir.join(format!("bench-bw.{ext}"));
        assert!(
            std::fs::metadata(&p).unwrap().len() > 100,
            "{}",
            p.display()
        );
    }
    let svg = std::fs::read_to_string(out_dir.join("bench-bw.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("warmer restore"));
    // Nothing of the runs is left behind.
    assert!(pids_with(&env.dir.path().display().to_string()).is_empty());
}

#[test]
fn bench_refuses_a_running_service() {
    require_criu();
    let env = Env::new();
    let (_port, mut w) = env.start_plain("busy");
    let out = env
        .command()
        .args(["bench", "busy", "--runs", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("running under warmer"));
    w.stop();
}

/// A persist service's bench leaves its images and data exactly as it found
/// them: the next real start restores the state at the last stop.
#[test]
fn bench_of_a_persist_service_leaves_images_and_data_as_they_were() {
    require_criu();
    let env = Env::new();
    let port = free_port();
    let data = env.path("ledger");
    let script = repo().join("examples/ledger/ledger.py");
    env.write_manifest(
        "pb",
        &format!(
            "exec: [\"/usr/bin/python3\", \"{}\", \"--port\", \"{port}\", \"--data\", \"{}\", \"--warmup\", \"0.5\"]\n\
             ready: {{http: \"http://127.0.0.1:{port}/health\"}}\n\
             state: [\"{}\"]\nmode: persist\n",
            script.display(),
            data.display(),
            data.display()
        ),
    );
    let mut w = env.run("pb");
    env.wait_ready("pb", &mut w);
    for v in ["a", "b", "c"] {
        get(port, &format!("/write?v={v}")).unwrap();
    }
    w.stop();
    let ls = || {
        let out = env
            .command()
            .args(["cache", "ls", "--json"])
            .output()
            .unwrap();
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| (r["key"].clone(), r["stale"].clone()))
            .collect::<Vec<_>>()
    };
    let before = ls();
    let ledger = std::fs::read(data.join("ledger.log")).unwrap();
    let out = env
        .command()
        .args(["bench", "pb", "--runs", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ls(), before, "the images are as they were");
    assert_eq!(std::fs::read(data.join("ledger.log")).unwrap(), ledger);
    let mut w = env.run("pb");
    let s = env.wait_ready("pb", &mut w);
    assert_eq!(s["last_start"], "restored", "{s}\n{}", w.err());
    assert_eq!(state(port)["count"], 3);
    w.stop();
}
