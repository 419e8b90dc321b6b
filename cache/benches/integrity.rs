//! What integrity costs at restore time, and which hash to pay it with.
//!
//! A 150 MB payload (the size of a Python service with numpy/pandas loaded)
//! in the page cache, as it is for a restore shortly after a checkpoint or
//! after `warmer cache verify` at boot:
//! - raw baselines: plain `read` of the file, SHA-256 on one core, BLAKE3 on
//!   one core, BLAKE3 on every core (mmap + rayon);
//! - the store's real paths: `verify` (full, BLAKE3) and `ensure_verified`
//!   with a stamp from this boot (no hashing).

use std::io::Read;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sha2::Digest;

const SIZE: usize = 150 << 20;

fn payload() -> Vec<u8> {
    // Not all zeroes: compressible data would flatter nothing here, but real
    // images are mixed.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn integrity(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache::Cache::open(dir.path().join("c")).unwrap();
    let staging = cache.stage().unwrap();
    let data = payload();
    std::fs::write(staging.data_dir().join("pages-1.img"), &data).unwrap();
    for i in 0..20 {
        std::fs::write(
            staging.data_dir().join(format!("core-{i}.img")),
            vec![1u8; 4096],
        )
        .unwrap();
    }
    let entry = cache
        .publish(
            staging,
            cache::NewEntry {
                service: "bench".into(),
                digest: "ab".repeat(32),
                ..Default::default()
            },
        )
        .unwrap();
    let pages = entry.data_dir().join("pages-1.img");

    let mut g = c.benchmark_group("integrity_150MB");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("baseline_read", |b| {
        let mut buf = vec![0u8; 256 << 10];
        b.iter(|| {
            let mut f = std::fs::File::open(&pages).unwrap();
            while f.read(&mut buf).unwrap() > 0 {}
        })
    });
    g.bench_function("sha256_1core", |b| b.iter(|| sha2::Sha256::digest(&data)));
    g.bench_function("blake3_1core", |b| b.iter(|| blake3::hash(&data)));
    g.bench_function("blake3_all_cores_mmap", |b| {
        b.iter(|| {
            let mut h = blake3::Hasher::new();
            h.update_mmap_rayon(&pages).unwrap();
            h.finalize()
        })
    });
    g.bench_function("store_verify_full", |b| {
        b.iter(|| cache.verify(&entry, &mut |_, _| {}).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("integrity_stamped");
    g.bench_function("ensure_verified_with_stamp", |b| {
        b.iter(|| {
            assert_eq!(
                cache.ensure_verified(&entry, &mut |_, _| {}).unwrap(),
                cache::Verification::Stamped
            )
        })
    });
    g.finish();
}

criterion_group!(benches, integrity);
criterion_main!(benches);
