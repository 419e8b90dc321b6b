//! Criterion: start to ready for the shipped example service (examples/slowweb,
//! ~2 s of warm-up), three ways on the same machine and image:
//! - `cold_start`: `warmer run --cold`;
//! - `warmer_restore`: `warmer run` restoring from the cache;
//! - `criu_restore`: bare `criu restore` of the same image plus the same
//!   probe (the floor warmer sits on).
//!
//! Each sample is one real start, timed by itself (`iter_custom`). Needs root
//! and CRIU >= 4.2; CI compiles it (`cargo bench --no-run`), `cargo bench
//! --bench restore` runs it. `warmer bench SVC` does the same for any service.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use warmer::commands::bench::Bencher;
use warmer::dirs::Dirs;

fn setup() -> (tempfile::TempDir, Bencher) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the restore benchmarks need root (CRIU)"
    );
    let dir = tempfile::tempdir().unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dirs = Dirs {
        manifests: dir.path().join("manifests"),
        cache: dir.path().join("cache"),
        run: dir.path().join("run"),
    };
    std::fs::create_dir_all(&dirs.manifests).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = repo.join("examples/slowweb/server.py");
    std::fs::write(
        dirs.manifests.join("slowweb.yaml"),
        format!(
            "exec: [\"/usr/bin/python3\", \"{}\", \"--port\", \"{port}\", \"--warmup\", \"2\"]\n\
             ready: {{http: \"http://127.0.0.1:{port}/health\", timeout: 60s}}\n\
             checkpoint: {{settle: 200ms}}\n",
            script.display()
        ),
    )
    .unwrap();
    let warmer = PathBuf::from(env!("CARGO_BIN_EXE_warmer"));
    let mut b = Bencher::new(&dirs, "slowweb", &warmer).expect("bencher");
    b.ensure_image().expect("an image to restore");
    (dir, b)
}

fn restore_vs_cold(c: &mut Criterion) {
    let (_dir, b) = setup();
    let mut g = c.benchmark_group("slowweb_start_to_ready");
    g.sample_size(10).warm_up_time(Duration::from_millis(1));
    let ms = |v: f64| Duration::from_secs_f64(v / 1000.0);
    g.measurement_time(Duration::from_secs(30));
    g.bench_function("cold_start", |bn| {
        bn.iter_custom(|n| (0..n).map(|_| ms(b.cold_ms().unwrap())).sum())
    });
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("warmer_restore", |bn| {
        bn.iter_custom(|n| (0..n).map(|_| ms(b.restore_ms().unwrap())).sum())
    });
    g.bench_function("criu_restore", |bn| {
        bn.iter_custom(|n| (0..n).map(|_| ms(b.criu_restore_ms(None).unwrap())).sum())
    });
    g.finish();
}

criterion_group!(benches, restore_vs_cold);
criterion_main!(benches);
