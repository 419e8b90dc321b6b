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
//!   options, then the same probe loop, timed from just before CRIU starts.
//!   State files, if any, are put back before the clock starts.
//!
//! Runs are interleaved (cold, restore, criu, cold, ...) so that drift (page
//! cache, CPU frequency, other load) hits all three alike; `--drop-caches`
//! empties the page cache before every run, as after a reboot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::checkpoint::short;
use crate::criu::Criu;
use crate::digest::Digester;
use crate::dirs::Dirs;
use crate::errors::chain;
use crate::manifest::{Manifest, Probe};
use crate::process::probe::{Backoff, Prober};
use crate::process::service::StartKind;
use crate::process::signals::Signals;
use crate::supervisor::record::{RunRecord, ServiceState};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
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
    /// cold median / restore median
    pub ratio: f64,
    /// What warmer adds to CRIU: the median over rounds of (warmer restore -
    /// bare criu restore).
    pub overhead_ms: f64,
    pub samples: Samples,
    pub machine: Machine,
    /// Where warmer's restores spent their time, phase by phase (medians).
    pub breakdown: Vec<Phase>,
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

/// Measures one service: each method is one timed start to ready.
pub struct Bencher {
    dirs: Dirs,
    manifest: Manifest,
    exe: PathBuf,
    criu: Criu,
    signals: Signals,
    log: PathBuf,
    digester: Digester,
    entry: Option<cache::Entry>,
    /// The service's live `state:` data, saved before the first run and put
    /// back when the bench ends: benchmarking never changes the data.
    saved_state: Option<PathBuf>,
    /// The service's run record (what `warmer status` shows) and the
    /// measurements that steer its starts, as they were: put back too.
    saved_files: Vec<(&'static str, Option<Vec<u8>>)>,
    /// The service's images (key, stale mark) before the bench: images the
    /// bench made go, marks it changed come back.
    saved_entries: Vec<(String, Option<String>)>,
    /// The breakdown of each warmer restore run so far.
    breakdowns: std::cell::RefCell<Vec<Vec<(String, f64)>>>,
}

impl Drop for Bencher {
    fn drop(&mut self) {
        let run = self.dirs.service_run(&self.manifest.name);
        for (name, bytes) in std::mem::take(&mut self.saved_files) {
            let back = match bytes {
                Some(b) => cache::fsutil::write_atomic(
                    &run,
                    name,
                    &b,
                    0o644,
                    cache::fsutil::Durability::Atomic,
                ),
                None => std::fs::remove_file(run.join(name)).or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                }),
            };
            if let Err(e) = back {
                tracing::error!(
                    "cannot put {} back as it was before the bench: {e}",
                    run.join(name).display()
                );
            }
        }
        self.put_entries_back();
        let Some(saved) = self.saved_state.take() else {
            return;
        };
        let back = crate::image::state::captured_paths(&saved)
            .and_then(|all| crate::image::state::put_back(&saved, &all))
            .and_then(crate::image::state::PutBack::commit);
        match back {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&saved);
            }
            Err(e) => tracing::error!(
                "cannot put the service's data back as it was before the bench; the copy is in {}: {}",
                saved.display(),
                chain(&e)
            ),
        }
    }
}

/// The files of a service's run directory that a bench puts back as it
/// found them: what `status` shows, and what steers the next starts.
const BENCH_KEEPS: &[&str] = &[
    "state.json",
    crate::restore::choose::FILE,
    "checkpoint-failures.json",
    "restore-failures.json",
];

impl Bencher {
    /// After the bench: persist images it made are removed, stale marks it changed
    /// (a retired persist image it restored again) come back.
    fn put_entries_back(&self) {
        let Ok(cache) = cache::Cache::open(&self.dirs.cache) else {
            return;
        };
        let Ok(_lock) = cache.lock_service(&self.manifest.name, true) else {
            return;
        };
        let before: std::collections::BTreeMap<&str, &Option<String>> = self
            .saved_entries
            .iter()
            .map(|(k, s)| (k.as_str(), s))
            .collect();
        for e in cache.select(&self.manifest.name).unwrap_or_default() {
            let done = match before.get(e.key.as_str()) {
                // A persist image the bench made holds the bench's data, not
                // the operator's; a warm one is what a start would have made.
                None if self.manifest.mode == crate::manifest::Mode::Persist => {
                    cache.remove(&e.key)
                }
                None => Ok(()),
                Some(s) if **s == e.stale => Ok(()),
                Some(Some(why)) => cache.mark_stale(&e.key, why),
                Some(None) => cache.clear_stale(&e.key),
            };
            if let Err(err) = done {
                tracing::error!(
                    "cannot leave image {} as it was before the bench: {}",
                    short(&e.key),
                    chain(&err)
                );
            }
        }
    }

    /// `warmer` is the binary that runs the service (usually this one).
    pub fn new(dirs: &Dirs, service: &str, warmer: &Path) -> Result<Self, BenchError> {
        let manifest = Manifest::find(&dirs.manifests, service)?;
        let mut memo = crate::memo::Memo::load(&dirs.run);
        let criu = Criu::locate_memo(&mut memo)?;
        let cache = cache::Cache::open(&dirs.cache)?;
        match cache.lock_run(service) {
            Ok(l) => drop(l),
            Err(cache::Error::Locked { .. }) => return Err(BenchError::Running(service.into())),
            Err(e) => return Err(e.into()),
        }
        let run_dir = dirs.run.join(service);
        std::fs::create_dir_all(&run_dir).map_err(io(format!("creating {}", run_dir.display())))?;
        // The init `warmer run` will use (it looks for it the same way).
        let beside = warmer.with_file_name(crate::process::init::INIT_BIN);
        let init = if beside.is_file() {
            beside
        } else {
            crate::process::init::locate()
                .map_err(io("locating warmer-init"))?
                .path
        };
        memo.save();
        let digester = Digester::new(dirs, &criu.version, &init)?;
        // Every restore run needs the data as the image has it, and cold runs
        // change it: keep the operator's data safe aside meanwhile.
        let saved_state = if manifest.state.is_empty() {
            None
        } else {
            let saved = dirs.run.join(format!("{service}.bench")).join("live-state");
            let _ = std::fs::remove_dir_all(&saved);
            std::fs::create_dir_all(&saved).map_err(io("saving the live state"))?;
            crate::image::state::capture(&manifest.state, &saved).map_err(|e| BenchError::Run {
                what: "saving the service's live state".into(),
                detail: chain(&e),
            })?;
            Some(saved)
        };
        let saved_files = BENCH_KEEPS
            .iter()
            .map(|name| (*name, std::fs::read(run_dir.join(name)).ok()))
            .collect();
        let saved_entries = cache
            .select(service)
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.key, e.stale))
            .collect();
        Ok(Self {
            saved_files,
            saved_entries,
            breakdowns: Default::default(),
            saved_state,
            dirs: dirs.clone(),
            manifest,
            exe: warmer.to_path_buf(),
            criu,
            signals: Signals::install().map_err(io("signal handlers"))?,
            log: run_dir.join("bench.log"),
            digester,
            entry: None,
        })
    }

    /// The image to restore; made by an ordinary `warmer run` (cold start,
    /// checkpoint) if there is none yet. Returns whether it had to be made.
    pub fn ensure_image(&mut self) -> Result<bool, BenchError> {
        let cache = cache::Cache::open(&self.dirs.cache)?;
        let digest = self.digester.digest(&self.manifest)?;
        let made = cache
            .lookup(&digest.hex)?
            .is_none_or(|e| e.stale.as_deref().is_some_and(|s| !is_retired(s)));
        if made {
            self.make_image(&cache, &digest.hex)?;
        }
        self.entry = Some(cache.lookup(&digest.hex)?.ok_or_else(|| BenchError::Run {
            what: "checkpoint".into(),
            detail: format!("no image was published; see {}", self.log.display()),
        })?);
        Ok(made)
    }

    /// One cold start to ready (`warmer run --cold`), in ms.
    pub fn cold_ms(&self) -> Result<f64, BenchError> {
        self.warmer_run(true)
    }

    /// One warmer restore to ready (`warmer run`), in ms.
    pub fn restore_ms(&self) -> Result<f64, BenchError> {
        self.prepare_restore()?;
        self.warmer_run(false)
    }

    /// Before a restore run: the data as the image has it (earlier runs
    /// changed it), and a persist image that a run retired made usable again.
    fn prepare_restore(&self) -> Result<cache::Entry, BenchError> {
        // The current generation: in persist mode every restored run's stop
        // makes a new one.
        let entry = self.current_entry()?;
        let data = entry.data_dir();
        if crate::image::state::has_state(&data) {
            crate::image::state::captured_paths(&data)
                .and_then(|all| crate::image::state::put_back(&data, &all))
                .and_then(crate::image::state::PutBack::commit)
                .map_err(|e| BenchError::Run {
                    what: "putting the image's state in place".into(),
                    detail: chain(&e),
                })?;
        }
        let cache = cache::Cache::open(&self.dirs.cache)?;
        if let Some(now) = cache.lookup_key(&entry.key)? {
            if now.stale.as_deref().is_some_and(is_retired) {
                cache.clear_stale(&entry.key)?;
            }
        }
        Ok(entry)
    }

    fn current_entry(&self) -> Result<cache::Entry, BenchError> {
        let cache = cache::Cache::open(&self.dirs.cache)?;
        let digest = self
            .entry
            .as_ref()
            .map(|e| e.meta.digest.clone())
            .ok_or_else(|| BenchError::Run {
                what: "restore".into(),
                detail: "no image: call ensure_image first".into(),
            })?;
        cache.lookup(&digest)?.ok_or_else(|| BenchError::Run {
            what: "restore".into(),
            detail: format!("the image of {} is gone", short(&digest)),
        })
    }

    /// One bare `criu restore` of the image to ready, in ms.
    pub fn criu_restore_ms(&self) -> Result<f64, BenchError> {
        let entry = self.prepare_restore()?;
        self.criu_restore(&entry)
    }
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
    b.criu_restore_ms()?;
    b.breakdowns.borrow_mut().clear();

    let mut samples = Samples {
        cold: Vec::new(),
        restore: Vec::new(),
        criu_restore: Vec::new(),
    };
    for i in 0..opts.runs {
        if b.signals.stop_requested() {
            break;
        }
        // Every round runs the three in another of the six orders, so
        // whatever a run leaves behind (memory to reclaim, a busy page cache)
        // falls on each kind alike, and each follows each other kind equally.
        const ORDERS: [[usize; 3]; 6] = [
            [0, 1, 2],
            [1, 2, 0],
            [2, 0, 1],
            [0, 2, 1],
            [2, 1, 0],
            [1, 0, 2],
        ];
        let (mut cold, mut restore, mut bare) = (0.0, 0.0, 0.0);
        for kind in ORDERS[i % 6] {
            if opts.drop_caches {
                drop_caches()?;
            }
            match kind {
                0 => cold = b.cold_ms()?,
                1 => restore = b.restore_ms()?,
                _ => bare = b.criu_restore_ms()?,
            }
        }
        progress(&format!(
            "run {}/{}: cold {cold:.0} ms, warmer restore {restore:.1} ms, criu restore {bare:.1} ms",
            i + 1,
            opts.runs
        ));
        samples.cold.push(cold);
        samples.restore.push(restore);
        samples.criu_restore.push(bare);
    }
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
        samples,
        breakdown: phases(&b.breakdowns.take()),
        show_breakdown: opts.breakdown,
        machine: Machine {
            kernel: host.kernel.clone(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            criu_version: b.criu.version.clone(),
            run_dir_tmpfs: is_tmpfs("/run"),
        },
    })
}

/// A persist image retired after its one restore (the bench restores it
/// again on purpose, with the data as it captured it).
fn is_retired(stale_reason: &str) -> bool {
    stale_reason.starts_with(crate::image::RETIRED)
}

/// The environment variable through which the bench tells the `warmer run`
/// it spawns when it spawned it (CLOCK_MONOTONIC, ns).
pub const SPAWNED_AT: &str = "WARMER_SPAWNED_AT_NS";

/// CLOCK_MONOTONIC now, in ns (one clock for every process of the machine).
pub fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u128::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u128::try_from(ts.tv_nsec).unwrap_or(0)
}

/// In a `warmer run` the bench spawned: µs since that spawn.
pub fn since_spawn_us() -> Option<u64> {
    let at: u128 = std::env::var(SPAWNED_AT).ok()?.parse().ok()?;
    u64::try_from(monotonic_ns().checked_sub(at)? / 1000).ok()
}

fn drop_caches() -> Result<(), BenchError> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(io("dropping the page cache"))
}

fn is_tmpfs(path: &str) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

impl Bencher {
    /// `warmer run`: `Some(true)` cold (a baseline), `Some(false)` a bench
    /// restore (changes no image, so every round restores the same, and a
    /// measured "cold is faster" does not stop it), `None` an ordinary run
    /// (to make the image).
    fn spawn_warmer(&self, cold: Option<bool>) -> Result<Child, BenchError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io(format!("opening {}", self.log.display())))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--manifest-dir")
            .arg(&self.dirs.manifests)
            .arg("--cache-dir")
            .arg(&self.dirs.cache)
            .arg("--run-dir")
            .arg(&self.dirs.run)
            .arg("run");
        match cold {
            Some(true) => cmd.arg("--cold"),
            Some(false) => cmd.arg("--bench"),
            None => &mut cmd,
        };
        cmd.arg(&self.manifest.name)
            .env_remove("NOTIFY_SOCKET")
            // The clock starts here, before warmer exists: what a user waits.
            .env(SPAWNED_AT, monotonic_ns().to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("log"))?)
            .stderr(log);
        cmd.spawn().map_err(io("starting warmer run"))
    }

    /// Waits until the run `child` records `want`; returns the record.
    fn wait_record(
        &self,
        child: &mut Child,
        want: &dyn Fn(&RunRecord) -> bool,
        limit: Duration,
    ) -> Result<RunRecord, BenchError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(r) = RunRecord::read(&self.dirs.run, &self.manifest.name) {
                if r.warmer_pid == child.id() && want(&r) {
                    return Ok(r);
                }
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(BenchError::Run {
                    what: format!("warmer run {}", self.manifest.name),
                    detail: format!(
                        "exited ({st}) before it was ready; see {}",
                        self.log.display()
                    ),
                });
            }
            if Instant::now() > deadline || self.signals.stop_requested() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BenchError::Run {
                    what: format!("warmer run {}", self.manifest.name),
                    detail: format!("not ready in time; see {}", self.log.display()),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stop(&self, mut child: Child) -> Result<(), BenchError> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + self.manifest.stop_timeout + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child
                .try_wait()
                .map_err(io("waiting for warmer"))?
                .is_some()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    fn make_image(&self, cache: &cache::Cache, digest: &str) -> Result<(), BenchError> {
        let mut child = self.spawn_warmer(None)?;
        let limit = self.manifest.ready.timeout + Duration::from_secs(300);
        self.wait_record(&mut child, &|r| r.state == ServiceState::Ready, limit)?;
        if self.manifest.mode == crate::manifest::Mode::Persist {
            // Its image is taken at the stop.
            return self.stop(child);
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while cache.lookup(digest)?.is_none_or(|e| e.stale.is_some()) {
            if Instant::now() > deadline
                || RunRecord::read(&self.dirs.run, &self.manifest.name)
                    .is_some_and(|r| r.message.is_some())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop(child)
    }

    /// One `warmer run`: its own ready_ms.
    fn warmer_run(&self, cold: bool) -> Result<f64, BenchError> {
        let mut child = self.spawn_warmer(Some(cold))?;
        let limit = self.manifest.ready.timeout + Duration::from_secs(30);
        let ready =
            |r: &RunRecord| matches!(r.state, ServiceState::Ready | ServiceState::Checkpointing);
        let rec = self.wait_record(&mut child, &ready, limit);
        let stopped = self.stop(child);
        let rec = rec?;
        stopped?;
        if let (false, Some(b)) = (cold, &rec.breakdown) {
            self.breakdowns.borrow_mut().push(b.clone());
        }
        if !cold && rec.last_start != Some(StartKind::Restored) {
            return Err(BenchError::Run {
                what: "warmer restore".into(),
                detail: format!(
                    "the image was not restored ({}); see {}",
                    rec.message.unwrap_or_default(),
                    self.log.display()
                ),
            });
        }
        #[allow(clippy::cast_precision_loss)]
        match rec.ready_from_spawn_us {
            Some(us) => Ok(us as f64 / 1000.0),
            None => Err(BenchError::Run {
                what: "warmer run".into(),
                detail: "its record has no ready time from spawn (an older warmer?)".into(),
            }),
        }
    }

    /// One bare `criu restore` of the image plus the probe loop.
    fn criu_restore(&self, entry: &cache::Entry) -> Result<f64, BenchError> {
        let data = entry.data_dir();
        let work = self.dirs.run.join(format!("{}.bench", self.manifest.name));
        std::fs::create_dir_all(&work).map_err(io("bench work dir"))?;
        let notify = work.join("notify.sock");
        let mut prober = Prober::new(&self.manifest.ready.probe, &notify).map_err(io("probe"))?;
        let t0 = Instant::now();
        let output = crate::process::logs::Output::discarding().map_err(io("pipes"))?;
        let info = crate::image::read(&data).map_err(|e| BenchError::Run {
            what: "criu restore".into(),
            detail: chain(&e),
        })?;
        let (mut running, _) = crate::restore::criu_restore(
            &self.criu,
            &data,
            &info,
            &work,
            crate::restore::RestoreOptions {
                leave_stopped: false,
                // What warmer's own restore in this round chose.
                lazy: RunRecord::read(&self.dirs.run, &self.manifest.name)
                    .and_then(|r| r.restore_choice)
                    .map_or_else(
                        || {
                            crate::restore::choose_restore(
                                self.manifest.restore_mode,
                                entry,
                                &crate::restore::choose::History::load(
                                    &self.dirs.service_run(&self.manifest.name),
                                    &entry.meta.digest,
                                ),
                            )
                            .lazy
                        },
                        |c| c.lazy,
                    ),
            },
            output,
            crate::restore::Watch {
                deadline: self.manifest.restore_timeout,
                abort: &mut || None,
            },
        )
        .map_err(|e| BenchError::Run {
            what: "criu restore".into(),
            detail: chain(&e),
        })?;
        let deadline = t0 + self.manifest.ready.timeout;
        let mut backoff = Backoff::default();
        let ready = loop {
            if matches!(self.manifest.ready.probe, Probe::Notify) {
                break true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || running.poll_exit().is_some() {
                break false;
            }
            if prober.check(left) {
                break true;
            }
            std::thread::sleep(backoff.next_pause().min(left));
        };
        let elapsed = t0.elapsed();
        running.kill(&self.signals);
        running.finish();
        if !ready {
            return Err(BenchError::Run {
                what: "criu restore".into(),
                detail: "restored service not ready".into(),
            });
        }
        Ok(elapsed.as_secs_f64() * 1000.0)
    }
}

/// The Markdown table for `--out`.
/// Per-phase medians over runs (phases in the order they first appear).
fn phases(runs: &[Vec<(String, f64)>]) -> Vec<Phase> {
    let mut names: Vec<&str> = Vec::new();
    for run in runs {
        for (name, _) in run {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            let samples: Vec<f64> = runs
                .iter()
                .map(|run| run.iter().find(|(n, _)| n == name).map_or(0.0, |(_, v)| *v))
                .collect();
            Phase {
                phase: name.to_string(),
                median_ms: Stats::of(&samples).median_ms,
            }
        })
        .collect()
}

pub fn markdown(r: &BenchReport) -> String {
    let row = |name: &str, s: &Stats| {
        format!(
            "| {name} | {:.1} | {:.1} | {:.1} |\n",
            s.median_ms, s.min_ms, s.max_ms
        )
    };
    let mut out = format!(
        "### {} ({} runs, image {:.0} MB, page cache {})\n\n",
        r.service,
        r.runs,
        r.image_bytes as f64 / 1e6,
        if r.drop_caches { "dropped" } else { "warm" }
    );
    out.push_str("| start to ready | median ms | min ms | max ms |\n|---|---|---|---|\n");
    out.push_str(&row("cold start", &r.cold));
    out.push_str(&row("warmer restore", &r.restore));
    out.push_str(&row("bare criu restore", &r.criu_restore));
    out.push_str(&format!(
        "\ncold / warmer restore: **{:.1}x**; warmer adds {:.1} ms to bare CRIU (median of per-round differences).\n\
         Machine: kernel {}, {} CPUs, CRIU {}, /run {}a tmpfs.\n",
        r.ratio,
        r.overhead_ms,
        r.machine.kernel,
        r.machine.cpus,
        r.machine.criu_version,
        if r.machine.run_dir_tmpfs { "" } else { "not " }
    ));
    if r.show_breakdown && !r.breakdown.is_empty() {
        out.push_str("\nWhere a warmer restore's time goes (median per phase, from spawn to ready):\n\n| phase | ms |\n|---|---|\n");
        for p in &r.breakdown {
            out.push_str(&format!("| {} | {:.1} |\n", p.phase, p.median_ms));
        }
        let sum: f64 = r.breakdown.iter().map(|p| p.median_ms).sum();
        out.push_str(&format!("| (sum of medians) | {sum:.1} |\n"));
    }
    out
}

/// A small SVG: one row per kind, every run as a dot, the median as a bar.
pub fn svg(r: &BenchReport) -> String {
    let rows = [
        ("cold start", &r.samples.cold, "#c0392b"),
        ("warmer restore", &r.samples.restore, "#2471a3"),
        ("bare criu restore", &r.samples.criu_restore, "#7f8c8d"),
    ];
    let max = rows
        .iter()
        .flat_map(|(_, s, _)| s.iter().copied())
        .fold(1.0_f64, f64::max);
    let (left, width, row_h) = (150.0, 560.0, 44.0);
    let x = |ms: f64| left + ms / max * width;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"760\" height=\"{}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <text x=\"10\" y=\"20\" font-weight=\"bold\">{}: start to ready (ms), {} runs, image {:.0} MB, page cache {}</text>\n",
        60.0 + row_h * 3.0 + 30.0,
        r.service,
        r.runs,
        r.image_bytes as f64 / 1e6,
        if r.drop_caches { "dropped" } else { "warm" }
    );
    for (i, (name, samples, color)) in rows.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let y = 50.0 + row_h * i as f64;
        let median = Stats::of(samples).median_ms;
        out.push_str(&format!(
            "<text x=\"10\" y=\"{:.0}\">{name}</text>\n<rect x=\"{left}\" y=\"{:.0}\" width=\"{:.1}\" height=\"18\" fill=\"{color}\" opacity=\"0.35\"/>\n<text x=\"{:.1}\" y=\"{:.0}\">{median:.1}</text>\n",
            y + 14.0,
            y,
            (x(median) - left).max(1.0),
            x(median) + 6.0,
            y + 14.0
        ));
        for s in samples.iter() {
            out.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.0}\" r=\"3\" fill=\"{color}\"/>\n",
                x(*s),
                y + 9.0
            ));
        }
    }
    let axis_y = 50.0 + row_h * 3.0;
    out.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{axis_y}\" x2=\"{}\" y2=\"{axis_y}\" stroke=\"black\"/>\n<text x=\"{left}\" y=\"{}\">0</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max:.0} ms</text>\n</svg>\n",
        left + width,
        axis_y + 16.0,
        left + width,
        axis_y + 16.0
    ));
    out
}

/// Writes `bench-<svc>.{md,svg,json}` into `dir`.
pub fn write_out(r: &BenchReport, dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let mut written = Vec::new();
    for (ext, text) in [
        ("md", markdown(r)),
        ("svg", svg(r)),
        (
            "json",
            serde_json::to_string_pretty(r).expect("report serializes"),
        ),
    ] {
        let p = dir.join(format!("bench-{}.{ext}", r.service));
        let mut f = std::fs::File::create(&p).map_err(io(format!("writing {}", p.display())))?;
        f.write_all(text.as_bytes())
            .map_err(io(format!("writing {}", p.display())))?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_min_max() {
        let s = Stats::of(&[5.0, 1.0, 3.0]);
        assert_eq!((s.median_ms, s.min_ms, s.max_ms), (3.0, 1.0, 5.0));
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(s.median_ms, 2.5);
    }
}
