//! The disk under a bench whose page cache is dropped before every run (the
//! after-a-reboot case): what each run read from it up to ready, how long it
//! kept it busy, and how fast the same disk reads a file of the image
//! sequentially, measured in the same bench. Together they show whether a
//! start waited on the disk, and how close it came to what the disk can do.
//!
//! The counters are the machine's (`/proc/diskstats`), summed over whole
//! disks that are devices (`/sys/block/NAME/device`): partitions, loop,
//! zram and device-mapper nodes would count the same reads twice or count
//! memory. Anything else reading the disk at the same moment counts too:
//! a bench wants a quiet machine anyway.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

/// Cumulative counters of the machine's disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Reads completed.
    pub reads: u64,
    /// 512-byte sectors read.
    pub sectors: u64,
    /// Milliseconds during which a disk had I/O in flight (`io_ticks`).
    pub busy_ms: u64,
}

impl Counters {
    /// Now; `None` where `/proc/diskstats` cannot be read.
    pub fn now() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/diskstats").ok()?;
        Some(Self::parse(&text, |name| {
            Path::new("/sys/block").join(name).join("device").exists()
        }))
    }

    /// Sums the lines of `is_disk` devices: fields 4 (reads completed), 6
    /// (sectors read) and 13 (ms doing I/O) of `Documentation/admin-guide/
    /// iostats.rst`. A line that does not parse counts nothing.
    pub fn parse(text: &str, is_disk: impl Fn(&str) -> bool) -> Self {
        let mut sum = Self::default();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 13 || !is_disk(f[2]) {
                continue;
            }
            let num = |i: usize| f[i].parse::<u64>().ok();
            if let (Some(reads), Some(sectors), Some(busy)) = (num(3), num(5), num(12)) {
                sum.reads += reads;
                sum.sectors += sectors;
                sum.busy_ms += busy;
            }
        }
        sum
    }

    /// What happened between `before` and `self`.
    pub fn since(self, before: Self) -> Use {
        #[allow(clippy::cast_precision_loss)]
        Use {
            read_mb: self.sectors.saturating_sub(before.sectors) as f64 * 512.0 / 1e6,
            reads: self.reads.saturating_sub(before.reads),
            busy_ms: self.busy_ms.saturating_sub(before.busy_ms) as f64,
        }
    }
}

/// One run's use of the disk, from its start to ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Use {
    pub read_mb: f64,
    pub reads: u64,
    /// Milliseconds the disk was busy (with reads or writes).
    pub busy_ms: f64,
}

/// One kind's disk use over the counted runs: medians.
#[derive(Debug, Clone, Serialize)]
pub struct KindUse {
    pub kind: String,
    pub read_mb: f64,
    pub reads: f64,
    pub busy_ms: f64,
    /// Median over runs of busy / start to ready.
    pub busy_share: f64,
    /// The median read at the disk's sequential rate: the least time those
    /// bytes take from this disk.
    pub sequential_ms: f64,
}

/// The disk part of a `--drop-caches` bench report.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    /// The disk's sequential read rate, measured on the image's largest file
    /// with the page cache dropped, in this bench.
    pub sequential_mb_s: f64,
    /// How much of that file was read to measure it.
    pub measured_mb: f64,
    pub kinds: Vec<KindUse>,
}

/// Medians of one kind's runs (`uses` and `took_ms` pair by run).
pub fn kind_use(kind: &str, uses: &[Use], took_ms: &[f64], sequential_mb_s: f64) -> KindUse {
    let median = |v: Vec<f64>| super::Stats::of(&v).median_ms;
    #[allow(clippy::cast_precision_loss)]
    let reads = median(uses.iter().map(|u| u.reads as f64).collect());
    let read_mb = median(uses.iter().map(|u| u.read_mb).collect());
    KindUse {
        kind: kind.to_string(),
        read_mb,
        reads,
        busy_ms: median(uses.iter().map(|u| u.busy_ms).collect()),
        busy_share: median(
            uses.iter()
                .zip(took_ms)
                .filter(|(_, t)| **t > 0.0)
                .map(|(u, t)| (u.busy_ms / t).min(1.0))
                .collect(),
        ),
        sequential_ms: if sequential_mb_s > 0.0 {
            read_mb / sequential_mb_s * 1000.0
        } else {
            f64::NAN
        },
    }
}

/// Reads up to `limit` bytes of `file` from its start in 1 MiB reads, the
/// page cache having been dropped by the caller: (MB/s, MB read).
pub fn sequential_rate(file: &Path, limit: u64) -> std::io::Result<(f64, f64)> {
    let mut f = std::fs::File::open(file)?.take(limit);
    let mut buf = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let mb = total as f64 / 1e6;
    Ok((if secs > 0.0 { mb / secs } else { f64::NAN }, mb))
}

/// The largest regular file directly in `dir` (an image's pages).
pub fn largest_file(dir: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            m.is_file().then(|| (m.len(), e.path()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS: &str = "\
 254       0 vda 9412110 1094826 628283882 18115651 3285446 976901 1316164112 7850805 0 1539724 26400529 1652449 44 1250108912 383662 921504 50410
 254       1 vda1 9400000 1094826 628000000 18115651 3285446 976901 1316164112 7850805 0 1539000 26400529
 253       0 zram0 5 0 40 0 0 0 0 0 0 3 0
   7       0 loop0 bad line
";

    #[test]
    fn sums_whole_disks_only() {
        let c = Counters::parse(STATS, |n| n == "vda");
        assert_eq!(
            c,
            Counters {
                reads: 9_412_110,
                sectors: 628_283_882,
                busy_ms: 1_539_724
            }
        );
        // A line too short or not numbers counts nothing.
        assert_eq!(
            Counters::parse(STATS, |n| n == "loop0"),
            Counters::default()
        );
    }

    #[test]
    fn use_between_two_samples() {
        let a = Counters {
            reads: 10,
            sectors: 2000,
            busy_ms: 5,
        };
        let b = Counters {
            reads: 110,
            sectors: 2000 + 200_000,
            busy_ms: 85,
        };
        let u = b.since(a);
        assert_eq!(u.reads, 100);
        assert!((u.read_mb - 102.4).abs() < 1e-9);
        assert_eq!(u.busy_ms, 80.0);
        // Counters that went back (a disk removed) give zero, not a wrap.
        assert_eq!(a.since(b).reads, 0);
    }

    #[test]
    fn medians_and_the_sequential_floor() {
        let uses = [
            Use {
                read_mb: 40.0,
                reads: 400,
                busy_ms: 90.0,
            },
            Use {
                read_mb: 20.0,
                reads: 200,
                busy_ms: 50.0,
            },
            Use {
                read_mb: 30.0,
                reads: 300,
                busy_ms: 300.0,
            },
        ];
        let k = kind_use("restore", &uses, &[100.0, 100.0, 200.0], 200.0);
        assert_eq!((k.read_mb, k.reads, k.busy_ms), (30.0, 300.0, 90.0));
        // Per run: 0.9, 0.5, 1.0 (busy longer than the run counts as all of it).
        assert!((k.busy_share - 0.9).abs() < 1e-9);
        assert!((k.sequential_ms - 150.0).abs() < 1e-9);
    }

    #[test]
    fn sequential_rate_reads_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("small"), vec![1u8; 10]).unwrap();
        std::fs::write(dir.path().join("big"), vec![1u8; 3 << 20]).unwrap();
        let big = largest_file(dir.path()).unwrap();
        assert!(big.ends_with("big"));
        let (rate, mb) = sequential_rate(&big, 2 << 20).unwrap();
        assert!((mb - 2.097_152).abs() < 1e-9);
        assert!(rate > 0.0);
    }
}
