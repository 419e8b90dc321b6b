//! `warmer bench SVC`: cold start vs warmer restore vs bare `criu restore` of
//! the same image, interleaved, to ready.
//!
//! - cold: `warmer run --cold SVC`, from the moment the bench spawns it to
//!   the first passing probe (the spawn moment travels in
//!   `WARMER_SPAWNED_AT_NS`, CLOCK_MONOTONIC, so warmer's own exec and
//!   start-up count);
//! - restore: `warmer run SVC` restoring from the cache, timed the same way
//!   (exec, digest, integrity check, CRIU, probe: everything);
//! - criu_restore: the floor: `criu restore` of the same image with the same
//!   options (eager, lazy, or the working set's view of it), then the same
//!   probe loop, timed from just before CRIU starts. State files, if any,
//!   are put back before the clock starts;
//! - criu_eager, criu_lazy: for an image big enough for `auto` to restore
//!   lazily, bare CRIU both ways as well: the raw baselines of what warmer's
//!   choice (and its working set) is worth.
//!
//! Runs are interleaved (cold, restore, criu, cold, ...) so that drift (page
//! cache, CPU frequency, other load) hits every kind alike; `--drop-caches`
//! empties the page cache before every run, as after a reboot.

mod bencher;
pub mod disk;
pub mod memory;
mod report;

pub use bencher::Bencher;
use report::phases;
pub use report::{markdown, svg, write_out};

use serde::Serialize;

use crate::criu::Criu;
use crate::digest::short;
use crate::digest::Digester;
use crate::dirs::Dirs;
use crate::errors::chain;
use crate::manifest::{Manifest, Probe};
use crate::process::probe::{Backoff, Prober};
use crate::process::service::StartKind;
use crate::process::signals::Signals;
use crate::restore::choose;
use crate::restore::choose::Kind;
use crate::supervisor::record::{RunRecord, ServiceState};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    RunDir(#[from] crate::dirs::RunDirError),
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error(transparent)]
    Criu(#[from] crate::criu::CriuError),
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
    #[error(transparent)]
    Cache(#[from] cache::Error),
    #[error("service {0} is running under warmer: stop it first (its port would be taken)")]
    Running(String),
    #[error("{what}: {detail}")]
    Run { what: String, detail: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub runs: usize,
    pub drop_caches: bool,
    /// Print where warmer's restores spent their time.
    pub breakdown: bool,
}

/// One phase of warmer's restores: its median over the counted runs.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub phase: String,
    pub median_ms: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stats {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    pub fn of(samples: &[f64]) -> Self {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Self {
            median_ms: median,
            min_ms: s.first().copied().unwrap_or(f64::NAN),
            max_ms: s.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Samples {
    pub cold: Vec<f64>,
    pub restore: Vec<f64>,
    pub criu_restore: Vec<f64>,
    /// Bare CRIU, eager and lazy (empty for an image `auto` restores eagerly).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub criu_eager: Vec<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub criu_lazy: Vec<f64>,
}

/// `--json` output.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub service: String,
    pub runs: usize,
    pub image_bytes: u64,
    pub drop_caches: bool,
    pub cold: Stats,
    pub restore: Stats,
    pub criu_restore: Stats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub criu_eager: Option<Stats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub criu_lazy: Option<Stats>,
    /// How warmer's last restore of the bench restored, and why.
    pub restore_kind: String,
    /// cold median / restore median
    pub ratio: f64,
    /// What warmer adds to CRIU: the median over rounds of (warmer restore -
    /// bare criu restore).
    pub overhead_ms: f64,
    pub samples: Samples,
    pub machine: Machine,
    /// Where warmer's restores spent their time, phase by phase (medians).
    pub breakdown: Vec<Phase>,
    /// With `--drop-caches`: what each kind read from the disk, and the
    /// disk's sequential rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<disk::DiskReport>,
    /// With the page cache warm: what CRIU copied into the tree before it
    /// ran, and how fast this machine copies pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryReport>,
    /// Whether the Markdown shows the breakdown (`--breakdown`).
    #[serde(skip)]
    pub show_breakdown: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub criu_version: String,
    pub run_dir_tmpfs: bool,
}

pub fn bench(
    dirs: &Dirs,
    service: &str,
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport, BenchError> {
    let exe = std::env::current_exe().map_err(io("locating warmer"))?;
    let mut b = Bencher::new(dirs, service, &exe)?;
    progress("looking for an image (or making one: cold start + checkpoint)");
    if b.ensure_image()? {
        progress("image made");
    }
    let entry = b.entry.clone().expect("ensure_image sets it");
    let host = b.digester.host.clone();
    // A just-written image is still being flushed to disk, and the first
    // start of anything pays for cold caches of its own: settle both with one
    // round that is not counted.
    nix::unistd::sync();
    progress("warm-up round (not counted)");
    b.cold_ms()?;
    b.restore_ms()?;
    b.criu_restore_ms(None)?;
    b.breakdowns.borrow_mut().clear();
    b.restored_mb.borrow_mut().clear();
    // Both raw baselines where lazy is in question at all (a sandboxed
    // image restores lazily only with a CRIU that can: see
    // `restore::choose_restore`).
    let sandboxed =
        crate::image::read(&entry.data_dir()).is_ok_and(|i| i.external_mounts.is_some());
    let baselines = b.criu.lazy_for(sandboxed, &b.dirs.run)
        && choose::memory_files(&entry).0 >= choose::LAZY_MIN_BYTES;

    let mut samples = Samples {
        cold: Vec::new(),
        restore: Vec::new(),
        criu_restore: Vec::new(),
        criu_eager: Vec::new(),
        criu_lazy: Vec::new(),
    };
    // Per kind, per counted run: the disk's use (with --drop-caches).
    let mut disk_uses: [Vec<disk::Use>; 5] = Default::default();
    b.drop_caches = opts.drop_caches;
    let kinds: Vec<usize> = if baselines {
        vec![0, 1, 2, 3, 4]
    } else {
        vec![0, 1, 2]
    };
    for i in 0..opts.runs {
        if b.signals.stop_requested() {
            break;
        }
        // Every round runs the kinds in another order, shuffled (a fixed
        // sequence: the same bench orders its rounds the same), so whatever
        // a run leaves behind (memory to reclaim, a busy page cache, warm
        // dentries) falls on each kind alike and no kind always follows
        // another (a bare CRIU run right after warmer's own would restore
        // from what warmer's run just warmed).
        let order = shuffled(&kinds, i);
        let mut took = [0.0f64; 5];
        for kind in order {
            took[kind] = match kind {
                0 => b.cold_ms()?,
                1 => b.restore_ms()?,
                2 => b.criu_restore_ms(None)?,
                3 => b.criu_restore_ms(Some(Kind::Eager))?,
                _ => b.criu_restore_ms(Some(Kind::Lazy))?,
            };
            if let (true, Some(u)) = (opts.drop_caches, b.last_disk_use()) {
                disk_uses[kind].push(u);
            }
        }
        let [cold, restore, bare, eager, lazy] = took;
        let extra = if baselines {
            format!(", criu eager {eager:.1} ms, criu lazy {lazy:.1} ms")
        } else {
            String::new()
        };
        progress(&format!(
            "run {}/{}: cold {cold:.0} ms, warmer restore {restore:.1} ms, criu restore {bare:.1} ms{extra}",
            i + 1,
            opts.runs
        ));
        samples.cold.push(cold);
        samples.restore.push(restore);
        samples.criu_restore.push(bare);
        if baselines {
            samples.criu_eager.push(eager);
            samples.criu_lazy.push(lazy);
        }
    }
    let disk = if opts.drop_caches && disk_uses[1].len() == samples.restore.len() {
        progress("the disk's sequential read rate (the image's largest file, page cache dropped)");
        Some(disk_report(&entry, &samples, &disk_uses)?)
    } else {
        None
    };
    let memory = if opts.drop_caches {
        None
    } else {
        memory_report(&entry, &b.restored_mb.borrow())?
    };
    let restore_kind = b
        .last_choice
        .take()
        .map(|c| c.to_string())
        .unwrap_or_default();
    let (cold, restore, criu_restore) = (
        Stats::of(&samples.cold),
        Stats::of(&samples.restore),
        Stats::of(&samples.criu_restore),
    );
    Ok(BenchReport {
        service: service.to_string(),
        runs: samples.cold.len(),
        image_bytes: entry.meta.bytes,
        drop_caches: opts.drop_caches,
        ratio: cold.median_ms / restore.median_ms,
        // Paired by round (the two ran next to each other), which cancels
        // most of the drift that separate medians would carry.
        overhead_ms: Stats::of(
            &samples
                .restore
                .iter()
                .zip(&samples.criu_restore)
                .map(|(w, c)| w - c)
                .collect::<Vec<_>>(),
        )
        .median_ms,
        cold,
        restore,
        criu_restore,
        criu_eager: baselines.then(|| Stats::of(&samples.criu_eager)),
        criu_lazy: baselines.then(|| Stats::of(&samples.criu_lazy)),
        restore_kind,
        samples,
        breakdown: phases(&b.breakdowns.take()),
        disk,
        memory,
        show_breakdown: opts.breakdown,
        machine: Machine {
            kernel: host.kernel.clone(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            criu_version: b.criu.version.clone(),
            run_dir_tmpfs: is_tmpfs("/run"),
        },
    })
}

/// The memory part of a bench with the page cache warm.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// Median over warmer's restores of what CRIU wrote into the tree
    /// before it ran (`pages_restored`), MB.
    pub restored_mb: f64,
    /// This machine's rate of copying pages from the page cache into fresh
    /// memory, measured on the image's largest file in this bench.
    pub page_copy_mb_s: f64,
    pub measured_mb: f64,
    /// `restored_mb` at that rate: the least time those copies take.
    pub copy_ms: f64,
}

/// What CRIU copied before the tree ran, beside this machine's page-copy
/// rate; `None` where CRIU reported no count.
fn memory_report(
    entry: &cache::Entry,
    restored_mb: &[f64],
) -> Result<Option<MemoryReport>, BenchError> {
    if restored_mb.is_empty() {
        return Ok(None);
    }
    let Some(file) = disk::largest_file(&entry.data_dir()) else {
        return Ok(None);
    };
    let (rate, mb) = memory::page_copy_rate(&file, 512 << 20)
        .map_err(io(format!("copying {}", file.display())))?;
    let restored_mb = Stats::of(restored_mb).median_ms;
    Ok(Some(MemoryReport {
        restored_mb,
        page_copy_mb_s: rate,
        measured_mb: mb,
        copy_ms: restored_mb / rate * 1000.0,
    }))
}

/// The disk's sequential rate on the image's largest file (at most 512 MB
/// of it, page cache dropped), and each kind's use of the disk beside it.
fn disk_report(
    entry: &cache::Entry,
    samples: &Samples,
    uses: &[Vec<disk::Use>; 5],
) -> Result<disk::DiskReport, BenchError> {
    let file = disk::largest_file(&entry.data_dir()).ok_or_else(|| BenchError::Run {
        what: "measuring the disk".into(),
        detail: format!("no file in {}", entry.data_dir().display()),
    })?;
    drop_caches()?;
    let (rate, mb) = disk::sequential_rate(&file, 512 << 20)
        .map_err(io(format!("reading {}", file.display())))?;
    let kinds = [
        ("cold start", &samples.cold),
        ("warmer restore", &samples.restore),
        ("bare criu restore (as warmer)", &samples.criu_restore),
        ("bare criu restore, eager", &samples.criu_eager),
        ("bare criu restore, lazy", &samples.criu_lazy),
    ]
    .into_iter()
    .zip(uses)
    .filter(|((_, took), u)| !took.is_empty() && u.len() == took.len())
    .map(|((name, took), u)| disk::kind_use(name, u, took, rate))
    .collect();
    Ok(disk::DiskReport {
        sequential_mb_s: rate,
        measured_mb: mb,
        kinds,
    })
}

/// `kinds` in the order of round `round`: a Fisher-Yates shuffle driven by
/// a SplitMix64 sequence seeded with the round.
fn shuffled(kinds: &[usize], round: usize) -> Vec<usize> {
    let mut state = (round as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = kinds.to_vec();
    for i in (1..out.len()).rev() {
        let j = usize::try_from(next() % (i as u64 + 1)).unwrap_or(0);
        out.swap(i, j);
    }
    out
}

/// A persist image retired after its one restore (the bench restores it
/// again on purpose, with the data as it captured it).
fn is_retired(stale_reason: &str) -> bool {
    stale_reason.starts_with(crate::image::RETIRED)
}

fn drop_caches() -> Result<(), BenchError> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(io("dropping the page cache"))
}

fn is_tmpfs(path: &str) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_run_every_kind_once_and_no_kind_always_follows_another() {
        let kinds = [0, 1, 2, 3, 4];
        let mut follows = std::collections::BTreeMap::new();
        for round in 0..60 {
            let order = shuffled(&kinds, round);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, kinds);
            for w in order.windows(2) {
                *follows.entry((w[0], w[1])).or_insert(0) += 1;
            }
        }
        // 60 rounds, 4 pairs each, 20 ordered pairs: ~12 each; none always.
        assert_eq!(follows.len(), 20, "{follows:?}");
        assert!(
            follows.values().all(|n| (4..=24).contains(n)),
            "{follows:?}"
        );
    }

    #[test]
    fn stats_median_min_max() {
        let s = Stats::of(&[5.0, 1.0, 3.0]);
        assert_eq!((s.median_ms, s.min_ms, s.max_ms), (3.0, 1.0, 5.0));
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(s.median_ms, 2.5);
    }
}
