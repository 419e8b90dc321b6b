//! One bench's runs: the image made if needed, cold starts, warmer restores and
//! bare CRIU restores, each spawned and timed from outside; and everything
//! the runs touch put back as it was.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use crate::process::clock::{monotonic_ns, SPAWNED_AT};

/// Measures one service: each method is one timed start to ready.
pub struct Bencher {
    pub(super) dirs: Dirs,
    pub(super) manifest: Manifest,
    pub(super) exe: PathBuf,
    pub(super) criu: Criu,
    pub(super) signals: Signals,
    pub(super) log: PathBuf,
    pub(super) digester: Digester,
    pub(super) entry: Option<cache::Entry>,
    /// The service's live `state:` data, saved before the first run and put
    /// back when the bench ends: benchmarking never changes the data.
    pub(super) saved_state: Option<PathBuf>,
    /// The service's run record (what `warmer status` shows) and the
    /// measurements that steer its starts, as they were: put back too.
    pub(super) saved_files: Vec<(&'static str, Option<Vec<u8>>)>,
    /// The service's images (key, stale mark) before the bench: images the
    /// bench made go, marks it changed come back.
    pub(super) saved_entries: Vec<(String, Option<String>)>,
    /// The breakdown of each warmer restore run so far.
    pub(super) breakdowns: std::cell::RefCell<Vec<Vec<(String, f64)>>>,
    /// How the last warmer restore run restored, and why.
    pub(super) last_choice: std::cell::RefCell<Option<crate::restore::choose::Choice>>,
    /// What CRIU wrote into the tree before it ran, per warmer restore run.
    pub(super) restored_mb: std::cell::RefCell<Vec<f64>>,
    /// This CRIU holds a lazy restore's background until the tree is quiet
    /// (bare CRIU's lazy restores then do as warmer's).
    pub(super) quiet_background: bool,
    /// Empty the page cache before every run (after what the bench itself
    /// reads to prepare it, so the run finds nothing of its own warm).
    pub drop_caches: bool,
    /// The disks' counters as the last run started and when it was ready.
    pub(super) start_disk: std::cell::Cell<Option<disk::Counters>>,
    pub(super) ready_disk: std::cell::Cell<Option<disk::Counters>>,
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
        // Asked once here, not inside a timed run.
        let quiet_background = criu.has_feature(&mut memo, crate::criu::QUIET_BACKGROUND);
        let cache = cache::Cache::open(&dirs.cache)?;
        match cache.lock_run(service) {
            Ok(l) => drop(l),
            Err(cache::Error::Locked { .. }) => return Err(BenchError::Running(service.into())),
            Err(e) => return Err(e.into()),
        }
        let run_dir = dirs.service_run_checked(service)?;
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
            last_choice: Default::default(),
            restored_mb: Default::default(),
            quiet_background,
            drop_caches: false,
            start_disk: Default::default(),
            ready_disk: Default::default(),
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
        self.before_run()?;
        self.warmer_run(true)
    }

    /// One warmer restore to ready (`warmer run`), in ms.
    pub fn restore_ms(&self) -> Result<f64, BenchError> {
        self.prepare_restore()?;
        self.before_run()?;
        self.warmer_run(false)
    }

    /// Just before a run's clock starts: the page cache emptied (with
    /// `drop_caches`) and the disks' counters noted.
    fn before_run(&self) -> Result<(), BenchError> {
        if self.drop_caches {
            drop_caches()?;
        }
        self.start_disk.set(disk::Counters::now());
        self.ready_disk.set(None);
        Ok(())
    }

    /// What the last run read from the disk and how long it kept it busy,
    /// from its start to ready.
    pub fn last_disk_use(&self) -> Option<disk::Use> {
        Some(self.ready_disk.get()?.since(self.start_disk.get()?))
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

    /// One bare `criu restore` of the image to ready, in ms: restoring the
    /// way warmer's own run of the round did (`None`), or eagerly or lazily.
    pub fn criu_restore_ms(&self, kind: Option<Kind>) -> Result<f64, BenchError> {
        let entry = self.prepare_restore()?;
        self.before_run()?;
        self.criu_restore(&entry, kind)
    }

    /// How warmer's last run restored (else how it would now).
    fn warmer_choice(
        &self,
        entry: &cache::Entry,
        sandboxed: bool,
    ) -> crate::restore::choose::Choice {
        RunRecord::read(&self.dirs.run, &self.manifest.name)
            .and_then(|r| r.restore_choice)
            .unwrap_or_else(|| {
                let cache = cache::Cache::open(&self.dirs.cache).ok();
                let ws = cache
                    .as_ref()
                    .and_then(|c| crate::restore::working_set::WorkingSet::load(c, &entry.key));
                crate::restore::choose_restore(
                    self.manifest.restore_mode,
                    entry,
                    &crate::restore::choose::History::load_kept(
                        &self.dirs.service_run(&self.manifest.name),
                        &entry.meta.digest,
                        cache.as_ref().map(|c| (c, entry.key.as_str())),
                    ),
                    self.criu.lazy_for(sandboxed, &self.dirs.run),
                    ws.as_ref(),
                )
            })
    }
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
        let deadline = crate::process::clock::deadline(limit);
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
        let deadline =
            crate::process::clock::deadline(self.manifest.stop_timeout + Duration::from_secs(10));
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
        self.ready_disk.set(disk::Counters::now());
        let stopped = self.stop(child);
        let rec = rec?;
        stopped?;
        if let (false, Some(b)) = (cold, &rec.breakdown) {
            self.breakdowns.borrow_mut().push(b.clone());
        }
        if !cold {
            self.last_choice.replace(rec.restore_choice.clone());
            self.restored_mb.borrow_mut().extend(rec.restored_mb);
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
    fn criu_restore(&self, entry: &cache::Entry, kind: Option<Kind>) -> Result<f64, BenchError> {
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
        let kind = kind.unwrap_or_else(|| {
            self.warmer_choice(entry, info.external_mounts.is_some())
                .kind()
        });
        // Working set first is CRIU restoring the view warmer builds.
        let images = match kind {
            Kind::WorkingSet => cache::Cache::open(&self.dirs.cache)
                .ok()
                .and_then(|c| crate::restore::working_set::WorkingSet::load(&c, &entry.key))
                .map(|ws| crate::restore::working_set::write_view(&data, &work, &ws))
                .transpose()
                .map_err(io("the working set's view of the image"))?
                .map_or(data.clone(), |v| v.dir),
            _ => data.clone(),
        };
        let (mut running, _) = crate::restore::criu_restore(
            &self.criu,
            &images,
            &info,
            &work,
            crate::restore::RestoreOptions {
                leave_stopped: false,
                lazy: kind != Kind::Eager,
                learn: false,
                pages: None,
                // As warmer's own lazy restores: the floor it sits on.
                quiet_background: kind != Kind::Eager && self.quiet_background,
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
        self.ready_disk.set(disk::Counters::now());
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
