//! `warmer run SVC`: the warm path, end to end.
//!
//! ```text
//!            digest ──> cache hit? ──yes──> verify ─> criu restore ─> probe ──ok──┐
//!                          │no                 │fail        │fail        │fail     │
//!                          │                   └──── quarantine image ───┘         │
//!                          v                                │                      v
//!                     cold start <──────────────────────────┘                    READY
//!                          │                                                       │
//!                        probe ──ok──> READY ─> settle ─> criu dump --leave-running │
//!                                                    ─> publish to cache           │
//!                                                                                  v
//!                          supervise: forward signals, SIGTERM -> stop, exit status
//! ```
//!
//! Whatever fails on the warm side (CRIU missing, damaged image, restore or
//! checkpoint error) the service still runs: cold, logged, never down.

pub mod backoff;
pub mod control;
pub mod record;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cache::Cache;
use nix::sys::signal::Signal;

use crate::checkpoint::{short, Checkpoint};
use crate::criu::Criu;
use crate::digest::watch::InputWatch;
use crate::digest::{DigestError, Digester, HostFacts, ServiceDigest};
use crate::dirs::{private_dir, Dirs};
use crate::errors::chain;
use crate::image::Taken;
use crate::manifest::{Manifest, ManifestError, Mode, Probe};
use crate::process::init::{self, InitSpec, SpawnError};
use crate::process::logs::Output;
use crate::process::notify::Systemd;
use crate::process::probe::{Check, Prober, Readiness};
use crate::process::service::{service_env, Running};
use crate::process::signals::Signals;
use crate::restore::{self, Restore, Skip};
use crate::supervisor::control::{ControlServer, Reply, Request};
use crate::supervisor::record::{RunRecord, ServiceState, StartKind};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("refusing manifest {}: someone other than root could have written it", path.display())]
    UntrustedManifest {
        path: PathBuf,
        #[source]
        why: cache::fsutil::Untrusted,
    },
    #[error("service {service} is already running (lock {})", lock.display())]
    AlreadyRunning { service: String, lock: PathBuf },
    #[error("cannot prepare {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Program(DigestError),
    #[error("service {service}: cannot start")]
    Spawn {
        service: String,
        #[source]
        source: SpawnError,
    },
    #[error("service {service}: output pipes")]
    Pipes {
        service: String,
        #[source]
        source: std::io::Error,
    },
    #[error("service {service}: cannot listen on {}", path.display())]
    NotifySocket {
        service: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("service {service}: data left aside by an interrupted restore cannot be put back")]
    Recover {
        service: String,
        #[source]
        source: crate::image::state::StateError,
    },
    #[error("service {service} exited with status {code} before it was ready{why}")]
    ExitedBeforeReady {
        service: String,
        code: i32,
        /// What else is known (another process on its port).
        why: String,
    },
    #[error("service {service} was not ready within {}{why}", humantime::format_duration(*timeout))]
    NotReady {
        service: String,
        timeout: Duration,
        why: String,
    },
}

/// How `warmer run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The service's exit status (128+N for signal N).
    pub code: i32,
    /// warmer was asked to stop by this signal (and passed it on).
    pub stopped_by: Option<Signal>,
}

/// Everything one `warmer run` works with.
struct Supervisor {
    manifest: Manifest,
    /// `<run-dir>` (all services); `run_dir` is this service's part of it.
    run_root: PathBuf,
    run_dir: PathBuf,
    exe: init::InitExe,
    signals: Signals,
    systemd: Systemd,
    record: RunRecord,
    started: Instant,
    cache: Option<Cache>,
    criu: Option<Criu>,
    host: HostFacts,
    digest: Option<ServiceDigest>,
    /// Where the last restore spent its time, for the ready message.
    timings: Option<restore::Timings>,
    /// When (since `started`) set-up ended, the digest was known, and the
    /// restore's plan (and pull) was done: for the breakdown.
    marks: [Duration; 3],
    /// Filled by the watcher thread once inotify is set up.
    watch: std::sync::Arc<std::sync::Mutex<Option<InputWatch>>>,
    /// `warmer checkpoint` requests, once the service is ready.
    control: Option<ControlServer>,
    /// Who else answered on the service's port while it started, if anyone.
    foreign: Option<String>,
    /// This run restored an image or took one: its digest is settled.
    image_taken: bool,
    /// How long this start spent pulling its image from the registry: a
    /// one-time cost, not part of what a restore costs.
    pulled_ms: u64,
    opts: RunOptions,
}

/// How to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Ignore the cache: always cold-start, never checkpoint (baselines).
    pub cold: bool,
}

pub fn run(dirs: &Dirs, name: &str, opts: RunOptions) -> Result<Outcome, RunError> {
    let started = Instant::now();
    let manifest = Manifest::find(&dirs.manifests, name)?;
    // A manifest says what runs as root: only root (or warmer's own user)
    // may have written it, or any directory above it.
    cache::fsutil::check_trusted(&manifest.path, nix::unistd::geteuid().as_raw()).map_err(
        |why| RunError::UntrustedManifest {
            path: manifest.path.clone(),
            why,
        },
    )?;
    let span = tracing::info_span!("run", service = name, digest = tracing::field::Empty);
    let _span = span.enter();
    // Anything the service tree orphans (CRIU's restored root among them,
    // were it ever re-parented) comes to us, not to PID 1.
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    tracing::debug!("t+{} us: manifest", started.elapsed().as_micros());
    let signals = Signals::install().map_err(RunError::Signals)?;
    let run_dir = dirs.service_run(name);
    private_dir(&run_dir).map_err(|source| RunError::Dir {
        path: run_dir.clone(),
        source,
    })?;

    let cache = match Cache::open(&dirs.cache) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("cache unusable, running without checkpoints: {}", chain(&e));
            None
        }
    };
    tracing::debug!("t+{} us: cache open", started.elapsed().as_micros());
    let _lock = match cache.as_ref().map(|c| c.lock_run(name)) {
        Some(Err(cache::Error::Locked { path, .. })) => {
            return Err(RunError::AlreadyRunning {
                service: name.to_string(),
                lock: path,
            })
        }
        Some(Err(e)) => {
            tracing::warn!("cannot lock the service's cache: {}", chain(&e));
            None
        }
        Some(Ok(l)) => Some(l),
        None => None,
    };
    // What an earlier run left running (killed mid-restore): ended first.
    // We hold the run lock, so no live warmer owns any of it. Only looked for
    // when the last run did not end cleanly (its record says it was still
    // running): a scan of every process costs milliseconds.
    let unclean =
        RunRecord::read(&dirs.run, name).is_some_and(|r| r.state.is_running() && !r.warmer_alive());
    if _lock.is_some() && unclean {
        for l in crate::process::leftovers::end(name, &run_dir) {
            tracing::warn!("ended pid {}: {}", l.pid, l.what);
        }
    }
    // A restore interrupted by a crash of warmer left the service's newer
    // data aside: it comes back before anything else runs.
    let recovered =
        crate::image::state::recover(&manifest.state).map_err(|source| RunError::Recover {
            service: name.to_string(),
            source,
        })?;
    for p in recovered {
        tracing::warn!(
            "{}: put the data back that an interrupted restore had set aside",
            p.display()
        );
    }
    let mut memo = crate::memo::Memo::load(&dirs.run);
    let criu = match Criu::locate_memo(&mut memo) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("checkpoint/restore disabled: {e}");
            None
        }
    };
    memo.save();
    tracing::debug!("t+{} us: criu locate", started.elapsed().as_micros());
    let setup_done = started.elapsed();
    let exe = init::locate().map_err(|source| RunError::Dir {
        path: init::INIT_BIN.into(),
        source,
    })?;
    let criu_version = criu.as_ref().map_or("none", |c| c.version.as_str());
    let (host, digest) = match Digester::new(dirs, criu_version, &exe.path) {
        Ok(mut digester) => match digester.digest(&manifest) {
            Ok(d) => (digester.host, Some(d)),
            Err(e @ DigestError::ProgramNotFound { .. }) => return Err(RunError::Program(e)),
            Err(e) => {
                tracing::warn!("no digest, so no cache for this run: {}", chain(&e));
                (digester.host, None)
            }
        },
        // Without host facts there is no digest, so no cache: the service
        // still starts, cold.
        Err(e) => {
            tracing::warn!("no digest, so no cache for this run: {}", chain(&e));
            (HostFacts::unknown(), None)
        }
    };
    if let Some(d) = &digest {
        span.record("digest", d.hex.as_str());
    }
    tracing::debug!("t+{} us: digest", started.elapsed().as_micros());
    let digest_done = started.elapsed();
    let mut record = RunRecord::new(name);
    record.digest = digest.as_ref().map(|d| d.hex.clone());
    let mut sup = Supervisor {
        manifest,
        run_root: dirs.run.clone(),
        run_dir,
        exe,
        signals,
        systemd: Systemd,
        record,
        started,
        cache,
        criu,
        host,
        digest,
        timings: None,
        marks: [setup_done, digest_done, Duration::ZERO],
        watch: Default::default(),
        control: None,
        foreign: None,
        image_taken: false,
        pulled_ms: 0,
        opts,
    };
    sup.run()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Supervisor {
    /// Starts watching the digest inputs on a helper thread: setting up
    /// inotify on every input's directory takes ~1.5 ms, which a restore
    /// should not wait for.
    /// Watches the digest inputs from a thread of its own (inotify set-up
    /// would slow a restore down). `recheck`: compare the digest once the
    /// watch is in place (the service already runs: a change made before
    /// the watch started raised no event).
    fn start_watch(&mut self, recheck: bool) {
        let Some(digest) = self.digest.clone() else {
            return;
        };
        let wake = match self.signals.waker() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("cannot watch the digest inputs: {e}");
                return;
            }
        };
        let (manifest, slot) = (self.manifest.clone(), self.watch.clone());
        let spawned = std::thread::Builder::new()
            .name("warmer-watch".into())
            .spawn(move || match InputWatch::start(&manifest, &digest, wake) {
                Ok(w) => {
                    if recheck {
                        w.flag("the inputs, rechecked once watched");
                    }
                    *slot.lock().expect("watch slot") = Some(w)
                }
                Err(e) => tracing::warn!("cannot watch the digest inputs: {e}"),
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot watch the digest inputs: {e}");
        }
    }

    /// After a restore: if an input changed between the digest at start and
    /// the watcher's start, the restored service is already stale.
    fn recheck_digest(&mut self) {
        let Some(d) = &self.digest else { return };
        let mut memo = crate::memo::Memo::load(&self.run_root);
        let now = crate::digest::compute(&self.manifest, &self.host, &self.run_dir, &mut memo);
        memo.save();
        if !now.is_ok_and(|n| n.hex == d.hex) {
            let reason = "digest inputs changed during the restore".to_string();
            tracing::warn!(
                "{reason}: image marked stale; restart the service to run the new version"
            );
            if let Some(cache) = &self.cache {
                let _ = cache.mark_digest_stale(&d.hex, &reason);
            }
            self.record.stale = Some(reason);
        }
    }

    fn clear_watch(&self) {
        if let Some(w) = self.watch.lock().expect("watch slot").as_ref() {
            w.clear();
        }
    }

    fn input_change(&self) -> Option<String> {
        self.watch
            .lock()
            .expect("watch slot")
            .as_ref()
            .and_then(InputWatch::changed)
    }

    /// Marks the image stale once an input changed. Returns whether stale.
    ///
    /// Stale means the digest changed: on a watch event the digest is
    /// recomputed (cheap: hashes are remembered per file identity). The same
    /// digest (a touch, a write to `state:`, a change undone): nothing. Only
    /// new files, before this run took its image (what a service writes
    /// among its inputs while it starts: `__pycache__`, `conf/Catalina/...`):
    /// the image is keyed by the inputs as they are now, which is what the
    /// next start computes. Anything else: stale.
    fn check_inputs(&mut self) -> bool {
        self.reconcile_inputs(false)
    }

    /// [`Supervisor::check_inputs`]; `force`: recompute even without a watch
    /// event (right before a checkpoint: an event may still be in flight).
    fn reconcile_inputs(&mut self, force: bool) -> bool {
        if self.record.stale.is_some() {
            return true;
        }
        let event = self.input_change();
        if event.is_none() && !force {
            return false;
        }
        let mut reason = event.unwrap_or_default();
        if let Some(old) = self.digest.clone() {
            let mut memo = crate::memo::Memo::load(&self.run_root);
            let now = crate::digest::compute(&self.manifest, &self.host, &self.run_dir, &mut memo);
            memo.save();
            match now.as_ref().map(|n| crate::digest::change(&old, n)) {
                Ok(crate::digest::Change::Same) => {
                    self.clear_watch();
                    return false;
                }
                Ok(crate::digest::Change::OnlyNew(files)) if !self.image_taken => {
                    let now = now.expect("computed");
                    tracing::info!(
                        "the service created {} among its own inputs while starting ({}); its image is keyed by the inputs as they are now",
                        if files.len() == 1 { "a file".to_string() } else { format!("{} files", files.len()) },
                        files.first().map(|f| f.display().to_string()).unwrap_or_default()
                    );
                    self.record.digest = Some(now.hex.clone());
                    self.digest = Some(now);
                    // Watch the new set of inputs.
                    *self.watch.lock().expect("watch slot") = None;
                    self.start_watch(false);
                    return false;
                }
                Ok(crate::digest::Change::OnlyNew(files)) => {
                    reason = format!(
                        "{} appeared among the inputs",
                        files
                            .first()
                            .map(|f| f.display().to_string())
                            .unwrap_or_default()
                    );
                }
                Ok(crate::digest::Change::Changed(why)) => reason = why,
                Err(e) => reason = format!("the inputs cannot be read: {}", chain(&e)),
            }
        }
        if reason.is_empty() {
            return false;
        }
        tracing::warn!("{reason}: image marked stale; restart the service to run the new version");
        if let (Some(cache), Some(d)) = (&self.cache, &self.digest) {
            if let Err(e) = cache.mark_digest_stale(&d.hex, &reason) {
                tracing::error!("cannot mark image {} stale: {}", short(&d.hex), chain(&e));
            }
        }
        self.record.stale = Some(reason);
        let state = self.record.state;
        self.set_state(state);
        true
    }

    fn set_state(&mut self, state: ServiceState) {
        self.record.state = state;
        if let Err(e) = self.record.write(&self.run_root) {
            let path = RunRecord::path(&self.run_root, &self.manifest.name);
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }

    fn run(&mut self) -> Result<Outcome, RunError> {
        let restored = if self.opts.cold {
            None
        } else {
            self.try_restore()
        };
        let running = match restored {
            Some(Ok(r)) => r,
            Some(Err(code)) => {
                // The operator's signal ended the restored service: the run
                // ends as it would have had the service been running.
                self.record.exit_code = Some(code);
                self.set_state(ServiceState::Stopped);
                return Ok(Outcome {
                    code,
                    stopped_by: self.signals.stop_signal(),
                });
            }
            None => self.cold_start()?,
        };
        self.record.service_pid = Some(running.pid.as_raw());
        if self.signals.stop_requested() {
            // Asked to stop before it was ready: no READY=1, no checkpoint.
            return Ok(self.supervise(running));
        }
        let ready_ms = ms(self.started.elapsed());
        self.record.last_start = Some(running.kind);
        self.record.ready_ms = Some(ready_ms);
        self.record.ready_from_spawn_us = crate::commands::bench::since_spawn_us();
        if let (StartKind::Restored, Some(t)) = (running.kind, &self.timings) {
            self.record.breakdown = Some(self.breakdown(t));
        }
        let status = match running.kind {
            StartKind::Cold => {
                self.record.cold_ready_ms = Some(ready_ms);
                format!("ready: cold start in {ready_ms} ms")
            }
            StartKind::Restored => match self.record.cold_ready_ms {
                Some(cold) => {
                    // Never slower than cold: one restore that was not
                    // faster decides it (warm mode; persist must restore).
                    if let (Some(d), Some(c)) = (&self.digest, &self.record.restore_choice) {
                        crate::restore::choose::History::record(
                            &self.run_dir,
                            &d.hex,
                            c.lazy,
                            ready_ms.saturating_sub(self.pulled_ms),
                        );
                    }
                    if self.manifest.mode == Mode::Warm {
                        if let Some(d) = &self.digest {
                            if let Some(p) = crate::supervisor::backoff::PreferCold::judge(
                                &self.run_dir,
                                &d.hex,
                                cold,
                                ready_ms.saturating_sub(self.pulled_ms),
                            ) {
                                tracing::warn!(
                                    "{p}: this service will be cold-started from now on"
                                );
                                self.record.message = Some(format!("next starts are cold: {p}"));
                            }
                        }
                    }
                    format!(
                        "ready: restored in {ready_ms} ms (cold {cold} ms){}",
                        self.pull_note()
                    )
                }
                None => format!("ready: restored in {ready_ms} ms{}", self.pull_note()),
            },
        };
        match (&self.timings, running.kind) {
            (Some(t), StartKind::Restored) => {
                tracing::info!(phase = "ready", ready_ms, restored = true, "{status}; {t}")
            }
            _ => tracing::info!(phase = "ready", ready_ms, restored = false, "{status}"),
        }
        self.set_state(ServiceState::Ready);
        self.systemd.ready(&status);

        match self.signals.waker() {
            Ok(wake) => match ControlServer::start(&self.run_dir, wake) {
                Ok(c) => self.control = Some(c),
                Err(e) => tracing::warn!("no control socket (warmer checkpoint): {e}"),
            },
            Err(e) => tracing::warn!("no control socket (warmer checkpoint): {e}"),
        }
        if running.kind == StartKind::Restored {
            // Set up inotify only now (it would slow the restore down), then
            // make sure nothing changed since the digest was taken.
            self.start_watch(true);
            self.recheck_digest();
        }
        if running.kind == StartKind::Cold && !self.opts.cold {
            self.maybe_checkpoint(&running);
            self.systemd.status(&status);
        }
        Ok(self.supervise(running))
    }

    fn notify_socket(&self) -> PathBuf {
        self.run_dir.join("notify.sock")
    }

    /// Restores from the cache if there is a usable image (see
    /// [`crate::restore`] for the steps). Every failure is undone and
    /// recorded, the image quarantined, and `None` returned: cold start next.
    /// `Some(Err(status))`: the restored service was ended by a signal the
    /// operator sent meanwhile (not the image's fault: kept).
    fn try_restore(&mut self) -> Option<Result<Running, i32>> {
        let (criu, cache, digest) = match (&self.criu, &self.cache, &self.digest) {
            (Some(c), Some(k), Some(d)) => (c.clone(), k.clone(), d.hex.clone()),
            _ => return None,
        };
        // Held until the restore is done: gc and rm wait for it.
        let lock = match cache.lock_service(&self.manifest.name, true) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("cannot lock the cache, cold start: {}", chain(&e));
                return None;
            }
        };
        let mut planned = restore::plan(&cache, &digest, &self.manifest, &self.run_dir);
        if matches!(planned, Ok(Err(Skip::NoImage))) && self.pull_missing(&cache, &digest) {
            planned = restore::plan(&cache, &digest, &self.manifest, &self.run_dir);
        }
        self.marks[2] = self.started.elapsed();
        let plan = match planned {
            Ok(Ok(plan)) => plan,
            Ok(Err(skip @ Skip::StateChanged { .. })) => {
                // The image is older than the data: never restored again.
                // (Warm mode then takes a fresh one when the service is ready.)
                if let Skip::StateChanged { key, why } = &skip {
                    let reason = format!("state changed since checkpoint: {why}");
                    if let Err(e) = cache.mark_stale(key, &reason) {
                        tracing::warn!("cannot mark image {} stale: {}", short(key), chain(&e));
                    }
                }
                tracing::info!(phase = "plan", "cold start: {skip}");
                self.record.message = Some(format!("cold start: {skip}"));
                return None;
            }
            Ok(Err(skip @ Skip::ColdIsFaster(_))) => {
                tracing::info!(phase = "plan", "cold start: {skip}");
                self.record.message = Some(format!("cold start: {skip}"));
                return None;
            }
            Ok(Err(skip @ Skip::NotStopImage { .. })) => {
                tracing::info!(phase = "plan", "cold start: {skip}");
                return None;
            }
            Ok(Err(Skip::NoImage)) => {
                tracing::info!(
                    phase = "plan",
                    "no image for digest {}: cold start",
                    short(&digest)
                );
                return None;
            }
            Ok(Err(Skip::Stale(why))) => {
                tracing::info!(
                    phase = "plan",
                    "image {} is stale ({why}): cold start",
                    short(&digest)
                );
                return None;
            }
            Err(failure) => {
                let failure = Restore {
                    criu: &criu,
                    cache: &cache,
                    run_dir: &self.run_dir,
                    signals: &self.signals,
                }
                .undo(failure.entry_key(), failure, None, None);
                self.record.message = Some(format!("restore failed: {}", chain(&failure)));
                return None;
            }
        };
        self.set_state(ServiceState::Restoring);
        self.systemd
            .status(&format!("restoring {}", short(&digest)));
        tracing::info!(
            phase = "restore",
            lazy = plan.choice.lazy,
            "restoring from image {}: {}",
            short(&digest),
            plan.choice
        );
        self.record.restore_choice = Some(plan.choice.clone());
        let restore = Restore {
            criu: &criu,
            cache: &cache,
            run_dir: &self.run_dir,
            signals: &self.signals,
        };
        let notify_probe = matches!(self.manifest.ready.probe, Probe::Notify);
        let prober = if notify_probe {
            None
        } else {
            Prober::new(&self.manifest.ready.probe, &self.notify_socket()).ok()
        };
        let mut prober = prober;
        let (timeout, signals, systemd) =
            (self.manifest.ready.timeout, &self.signals, self.systemd);
        let mut probe = |running: &mut Running| -> Readiness {
            // A notify-probed service said READY=1 before its checkpoint;
            // the restored one is past that point.
            if notify_probe {
                return match running.poll_exit() {
                    Some(code) => Readiness::Exited(code),
                    None => Readiness::Ready,
                };
            }
            match prober.as_mut() {
                Some(p) => wait_ready(running, p, timeout, signals, systemd, &mut || {}, None),
                None => Readiness::TimedOut(Duration::ZERO),
            }
        };
        let result = restore.run(&plan, &mut probe);
        drop(lock);
        match result {
            Ok(restored) => {
                if self.manifest.mode == Mode::Persist {
                    // Used once: from now on the service's memory and data
                    // move on, so after a crash this image would roll them back.
                    let why = RETIRED;
                    if let Err(e) = cache.mark_stale(&restored.entry.key, why) {
                        tracing::error!(
                            "cannot retire the persist image {}; stopping the service rather than risking a rollback later: {}",
                            short(&restored.entry.key),
                            chain(&e)
                        );
                        let mut r = restored.running;
                        r.kill(&self.signals);
                        r.finish();
                        return None;
                    }
                }
                self.record.image = Some(restored.entry.key.clone());
                self.image_taken = true;
                if restored.entry.meta.origin.is_none() && self.manifest.mode == Mode::Warm {
                    self.push_in_background(&restored.entry.key, true);
                }
                self.timings = Some(restored.timings.clone());
                // What the image's cold start took, for the ready message and status.
                self.record.cold_ready_ms = restored.entry.meta.cold_start_ms;
                Some(Ok(restored.running))
            }
            Err(restore::Failure::Stopped) => {
                // Asked to stop while CRIU ran: nothing runs; end the run.
                Some(Err(128
                    + self.signals.stop_signal().unwrap_or(Signal::SIGTERM)
                        as i32))
            }
            Err(restore::Failure::EndedBySignal(code)) => {
                tracing::info!("the restored service exited with status {code} after a signal warmer passed on; the image is kept");
                Some(Err(code))
            }
            Err(failure) => {
                self.record.message = Some(format!("restore failed: {}", chain(&failure)));
                if plan.choice.lazy {
                    // Auto does not try lazy again for this image this boot.
                    crate::restore::choose::History::record_lazy_failure(
                        &self.run_dir,
                        &digest,
                        &chain(&failure),
                    );
                }
                // Learn from it: the same state is not checkpointed and
                // failed again forever (see `backoff`).
                let restores = crate::supervisor::backoff::Failures::load_kind(
                    &self.run_dir,
                    crate::supervisor::backoff::Kind::Restore,
                );
                let _ = restores.record(&self.run_dir, &digest, &chain(&failure));
                None
            }
        }
    }

    /// The cache has no image of `digest`: fetch it from the service's
    /// registry, if it has one, within `remote.timeout` (a registry that is
    /// down or slow costs a start no more). Returns whether an image came.
    fn pull_missing(&mut self, cache: &Cache, digest: &str) -> bool {
        let Some(remote) = &self.manifest.remote else {
            return false;
        };
        if self.manifest.mode != Mode::Warm {
            return false;
        }
        self.systemd.status("pulling the image");
        let t = Instant::now();
        let result = crate::remote::pull(
            cache,
            &self.manifest,
            digest,
            &self.host.as_map(),
            Some(remote.timeout),
            &mut |p| tracing::info!(phase = "pull", "{p}"),
        );
        match result {
            Ok(p) => {
                self.pulled_ms = p.ms;
                tracing::info!(
                    phase = "pull",
                    pull_ms = p.ms,
                    "pulled image {} from {}: {} MB fetched in {} ms",
                    short(&p.key),
                    remote.repository,
                    p.fetched_bytes / 1_000_000,
                    p.ms
                );
                true
            }
            Err(e) => {
                let why = chain(&e);
                tracing::info!(
                    phase = "pull",
                    "no image from {} ({} ms): {why}",
                    remote.repository,
                    t.elapsed().as_millis()
                );
                self.record.message = Some(format!("cold start: pull failed: {why}"));
                false
            }
        }
    }

    /// Where this restore's time went, from spawn (when known) to ready.
    fn breakdown(&self, t: &restore::Timings) -> Vec<(String, f64)> {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let total = ms(self.started.elapsed());
        let mut out = Vec::new();
        if let Some(us) = self.record.ready_from_spawn_us {
            #[allow(clippy::cast_precision_loss)]
            let from_spawn = us as f64 / 1000.0;
            out.push((
                "exec and start-up".to_string(),
                (from_spawn - total).max(0.0),
            ));
        }
        let [setup, digest, planned] = self.marks;
        let pull = Duration::from_millis(self.pulled_ms);
        out.push(("set-up (manifest, cache, CRIU)".into(), ms(setup)));
        out.push(("digest".into(), ms(digest.saturating_sub(setup))));
        out.push((
            "plan (lock, image shape, state, mode)".into(),
            ms(planned.saturating_sub(digest).saturating_sub(pull)),
        ));
        if self.pulled_ms > 0 {
            out.push(("pull".into(), ms(pull)));
        }
        out.extend(t.phases());
        let counted: f64 = out
            .iter()
            .skip(usize::from(self.record.ready_from_spawn_us.is_some()))
            .map(|(_, v)| v)
            .sum();
        out.push(("other".into(), (total - counted).max(0.0)));
        out
    }

    fn pull_note(&self) -> String {
        if self.pulled_ms > 0 {
            format!(", of which {} ms pulling the image", self.pulled_ms)
        } else {
            String::new()
        }
    }

    /// Uploads an image to the service's registry (`remote.push`) on a
    /// thread of its own: never delays the service; a failure is logged.
    /// `if_missing`: only if the registry has no image of its digest yet (a
    /// start that restored a local image: its first push may have been cut
    /// short by a stop).
    fn push_in_background(&self, key: &str, if_missing: bool) {
        let Some(remote) = self.manifest.remote.as_ref().filter(|r| r.push) else {
            return;
        };
        let Some(cache) = self.cache.clone() else {
            return;
        };
        let manifest = self.manifest.clone();
        let key = key.to_string();
        let repository = remote.repository.clone();
        let spawned = std::thread::Builder::new()
            .name("push".into())
            .spawn(move || {
                let entry = match cache.lookup_key(&key) {
                    Ok(Some(e)) => e,
                    _ => return,
                };
                let mut progress = |p: &str| tracing::debug!(phase = "push", "{p}");
                let pushed = if if_missing {
                    crate::remote::push_if_missing(&cache, &manifest, &entry, &mut progress)
                } else {
                    crate::remote::push(&cache, &manifest, &entry, &mut progress).map(Some)
                };
                match pushed {
                    Ok(None) => tracing::debug!(phase = "push", "the registry has image {}", short(&key)),
                    Ok(Some(p)) => tracing::info!(
                        phase = "push",
                        push_ms = p.ms,
                        "pushed image {} to {repository}: {} MB sent ({} of {} blobs already there) in {} ms",
                        short(&key),
                        p.sent_bytes / 1_000_000,
                        p.blobs_present,
                        p.blobs,
                        p.ms
                    ),
                    Err(e) => tracing::warn!(
                        phase = "push",
                        "cannot push image {} to {repository}: {}",
                        short(&key),
                        chain(&e)
                    ),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the push: {e}");
        }
    }

    fn cold_start(&mut self) -> Result<Running, RunError> {
        // Watch before the service reads its files, so a change while it
        // starts is not missed.
        self.start_watch(false);
        self.set_state(ServiceState::Starting);
        self.systemd.status("cold start");
        let service = self.manifest.name.clone();
        let prober = Prober::new(&self.manifest.ready.probe, &self.notify_socket());
        let mut prober = prober.map_err(|source| RunError::NotifySocket {
            service: service.clone(),
            path: self.notify_socket(),
            source,
        })?;
        let notify = prober.is_notify().then(|| self.notify_socket());
        let env = service_env(&self.manifest, notify.as_deref());
        let mut output = Output::new().map_err(|source| RunError::Pipes {
            service: service.clone(),
            source,
        })?;
        let pid = init::spawn(&InitSpec {
            init: &self.exe,
            service: &service,
            home: &self.run_dir,
            argv: &self.manifest.exec,
            env: &env,
            workdir: self.manifest.workdir.as_deref(),
            stdout: output.stdout.write_fd(),
            stderr: output.stderr.write_fd(),
        })
        .map_err(|source| RunError::Spawn {
            service: service.clone(),
            source,
        })?;
        output.close_write();
        let mut running = Running::new(pid, output, StartKind::Cold);
        self.record.service_pid = Some(pid.as_raw());
        self.set_state(ServiceState::Starting);
        tracing::info!("cold start: pid {pid}");
        let err = match self.wait_ready(&mut running, &mut prober) {
            Readiness::Ready | Readiness::Stopped => return Ok(running),
            Readiness::Exited(code) | Readiness::ExitedAfterSignal(code) => {
                running.finish();
                self.record.exit_code = Some(code);
                if self.foreign.is_none() {
                    // Often the reason (EADDRINUSE): say who holds the port.
                    self.foreign = self.port_holder();
                }
                RunError::ExitedBeforeReady {
                    service,
                    code,
                    why: self
                        .foreign
                        .clone()
                        .map(|f| format!(" ({f})"))
                        .unwrap_or_default(),
                }
            }
            Readiness::TimedOut(timeout) => {
                running.stop(self.manifest.stop_timeout, &self.signals);
                running.finish();
                RunError::NotReady {
                    service,
                    timeout,
                    why: self
                        .foreign
                        .clone()
                        .map(|f| format!(" ({f})"))
                        .unwrap_or_default(),
                }
            }
        };
        self.record.message = Some(chain(&err));
        self.set_state(ServiceState::Failed);
        Err(err)
    }

    /// Who else holds the probed local port, if someone does.
    fn port_holder(&self) -> Option<String> {
        let port = match &self.manifest.ready.probe {
            Probe::Http(u) if crate::process::ports::is_local(&u.host) => u.port,
            Probe::Tcp(a) => a
                .rsplit_once(':')
                .filter(|(h, _)| crate::process::ports::is_local(h))
                .and_then(|(_, p)| p.parse().ok())?,
            _ => return None,
        };
        match crate::process::ports::holder(port, nix::unistd::Pid::from_raw(i32::MAX - 1)) {
            crate::process::ports::Holder::Other(who) => {
                Some(format!("port {port} is held by {who}"))
            }
            _ => None,
        }
    }

    /// Polls the probe until ready, exit, stop request or timeout, watching
    /// the digest inputs meanwhile.
    fn wait_ready(&mut self, running: &mut Running, prober: &mut Prober) -> Readiness {
        let (timeout, systemd) = (self.manifest.ready.timeout, self.systemd);
        let watch = self.watch.clone();
        let mut changed = None;
        let mut foreign = self.foreign.take();
        let r = wait_ready(
            running,
            prober,
            timeout,
            &self.signals,
            systemd,
            &mut || {
                if changed.is_none() {
                    changed = watch
                        .lock()
                        .expect("watch slot")
                        .as_ref()
                        .and_then(InputWatch::changed);
                }
            },
            Some(&mut foreign),
        );
        self.foreign = foreign;
        if changed.is_some() {
            self.check_inputs();
        }
        r
    }

    /// Warm mode: the checkpoint at ready, unless a usable image of this
    /// digest exists already.
    fn maybe_checkpoint(&mut self, running: &Running) {
        if self.manifest.mode != Mode::Warm
            || !self.manifest.checkpoint.enabled
            || !self.record.state.can_checkpoint()
        {
            return;
        }
        let (Some(cache), Some(digest)) = (&self.cache, &self.digest) else {
            return;
        };
        // A usable image of this digest exists: nothing to do. (A stale one,
        // or none, and this ready service is the new generation.)
        if cache
            .lookup(&digest.hex)
            .is_ok_and(|e| e.is_some_and(|e| e.stale.is_none()))
        {
            return;
        }
        // Let the service settle (lazy initialisation after the first probe);
        // a stop request or exit during the wait cancels the checkpoint.
        let until = Instant::now() + self.manifest.checkpoint.settle;
        while Instant::now() < until {
            if self.signals.stop_requested() {
                return;
            }
            self.signals
                .wait(until.saturating_duration_since(Instant::now()));
        }
        if self.signals.stop_requested() || nix::sys::signal::kill(running.pid, None).is_err() {
            return;
        }
        // A checkpoint that keeps failing (a full disk, a service CRIU cannot
        // dump) is not retried at every start: after a few failures for the
        // same digest it waits for something to change.
        let failures = crate::supervisor::backoff::Failures::load(&self.run_dir);
        let restores = crate::supervisor::backoff::Failures::load_kind(
            &self.run_dir,
            crate::supervisor::backoff::Kind::Restore,
        );
        if let Some(why) = failures
            .skip(&digest.hex)
            .or_else(|| restores.skip(&digest.hex))
        {
            tracing::warn!(phase = "checkpoint", "checkpoint skipped: {why}");
            self.record.message = Some(format!("checkpoint skipped: {why}"));
            self.set_state(ServiceState::Ready);
            return;
        }
        if let Some(why) = crate::supervisor::backoff::no_room(cache.root(), running.pid) {
            tracing::warn!(phase = "checkpoint", "checkpoint skipped: {why}");
            self.record.message = Some(format!("checkpoint skipped: {why}"));
            let _ = failures.record(&self.run_dir, &digest.hex.clone(), &why);
            self.set_state(ServiceState::Ready);
            return;
        }
        let hex = digest.hex.clone();
        match self.checkpoint(running, Taken::Ready) {
            Ok(_) => failures.clear(&self.run_dir),
            Err(e) => {
                tracing::warn!("checkpoint failed, service keeps running: {}", chain(&e));
                self.record.message = Some(format!("checkpoint failed: {}", chain(&e)));
                let _ = failures.record(&self.run_dir, &hex, &chain(&e));
            }
        }
        self.set_state(ServiceState::Ready);
    }

    /// Takes a checkpoint of `running` now and publishes it as a new
    /// generation. `Taken::Stop` dumps and ends the tree (persist mode, bounded
    /// by `stop.timeout`); the others leave it running.
    fn checkpoint(
        &mut self,
        running: &Running,
        taken: Taken,
    ) -> Result<Checkpointed, CheckpointNowError> {
        if self.reconcile_inputs(!self.image_taken) {
            return Err(CheckpointNowError::Unavailable(
                "the service's inputs changed since it started: restart it first",
            ));
        }
        let (Some(criu), Some(cache), Some(digest)) =
            (self.criu.clone(), self.cache.clone(), self.digest.clone())
        else {
            return Err(CheckpointNowError::Unavailable(
                "no CRIU, cache or digest for this run (see the start's warnings)",
            ));
        };
        let previous = self.record.state;
        self.set_state(ServiceState::Checkpointing);
        self.systemd.status("checkpointing");
        // Every dump has a deadline; a stop-time one has the stop's.
        let deadline = if taken == Taken::Stop {
            self.manifest.stop_timeout
        } else {
            self.manifest.checkpoint.timeout
        };
        self.systemd
            .extend_timeout(deadline + Duration::from_secs(5));
        let t = Instant::now();
        let result = Checkpoint {
            criu: &criu,
            cache: &cache,
            manifest: &self.manifest,
            digest: &digest,
            host: &self.host,
            run_dir: &self.run_dir,
            cold_start_ms: self.record.cold_ready_ms.unwrap_or(0),
            taken,
        }
        .take(running, Some(deadline));
        let elapsed = t.elapsed();
        self.set_state(previous);
        let entry = result.map_err(CheckpointNowError::Checkpoint)?;
        tracing::info!(
            phase = "checkpoint",
            checkpoint_ms = ms(elapsed),
            generation = entry.meta.generation,
            "checkpoint {} stored: {} MB in {} ms",
            short(&entry.key),
            entry.meta.bytes / 1_000_000,
            elapsed.as_millis()
        );
        // An input that changed during the dump makes the new image stale too.
        if let Some(reason) = self.input_change() {
            self.record.stale = None;
            let _ = cache.mark_digest_stale(&digest.hex, &reason);
            self.check_inputs();
        }
        self.record.image = Some(entry.key.clone());
        self.image_taken = true;
        if taken != Taken::Stop && self.record.stale.is_none() {
            self.push_in_background(&entry.key, false);
        }
        Ok(Checkpointed {
            key: entry.key,
            generation: entry.meta.generation,
            frozen_ms: ms(elapsed),
        })
    }

    /// Persist mode, asked to stop: checkpoint the service's current state
    /// (which ends it). Returns its exit status if that worked; `None`: stop
    /// it normally (its own shutdown saves its data; the next start is cold).
    fn stop_checkpoint(&mut self, running: &mut Running) -> Option<i32> {
        if self.manifest.mode != Mode::Persist
            || !self.manifest.checkpoint.enabled
            || self.opts.cold
        {
            return None;
        }
        tracing::info!(
            phase = "stop",
            "persist mode: checkpointing the service's state at stop"
        );
        match self.checkpoint(running, Taken::Stop) {
            Ok(_) => {
                crate::failpoint("stop-after-checkpoint");
                // CRIU ended the tree after the dump.
                let code = running.wait_exit(self.manifest.stop_timeout, &self.signals);
                Some(code.map_or_else(|| running.kill(&self.signals), |_| 0))
            }
            Err(e) => {
                tracing::warn!(
                    "stop-time checkpoint failed, stopping the service normally (next start: cold): {}",
                    chain(&e)
                );
                self.record.message = Some(format!("stop-time checkpoint failed: {}", chain(&e)));
                None
            }
        }
    }

    /// Answers `warmer checkpoint` requests.
    fn serve_control(&mut self, running: &Running) {
        while let Some(pending) = self.control.as_ref().and_then(ControlServer::next) {
            let reply = match pending.request {
                Request::Checkpoint => {
                    tracing::info!(phase = "checkpoint", "checkpoint requested");
                    let taken = Taken::OnDemand;
                    match self.checkpoint(running, taken) {
                        Ok(done) => {
                            crate::supervisor::backoff::Failures::default().clear(&self.run_dir);
                            crate::supervisor::backoff::Failures::load_kind(
                                &self.run_dir,
                                crate::supervisor::backoff::Kind::Restore,
                            )
                            .clear(&self.run_dir);
                            if self.manifest.mode == Mode::Persist {
                                // Older than the data by the time of any
                                // later start: restored only by an explicit
                                // rollback, never by a restart.
                                tracing::info!("persist mode: this image is restored only by `warmer rollback`");
                            }
                            Reply::Ok(done)
                        }
                        Err(e) => Reply::Err(chain(&e)),
                    }
                }
            };
            pending.reply(&reply);
        }
    }

    /// Runs until the service exits or warmer is asked to stop.
    fn supervise(&mut self, mut running: Running) -> Outcome {
        let code = loop {
            for sig in self.signals.take_forwarded() {
                running.signal(sig);
            }
            if let Some(code) = running.poll_exit() {
                tracing::info!("service exited with status {code}");
                break code;
            }
            self.check_inputs();
            self.serve_control(&running);
            if self.signals.stop_requested() {
                self.set_state(ServiceState::Stopping);
                self.systemd.stopping();
                tracing::info!(phase = "stop", "stopping");
                if let Some(code) = self.stop_checkpoint(&mut running) {
                    break code;
                }
                break running.stop(self.manifest.stop_timeout, &self.signals);
            }
            self.signals.wait(Duration::from_secs(1));
        };
        let lazy_failure = running.lazy_failure().map(str::to_string);
        running.finish();
        if let (Some(why), Some(d)) = (lazy_failure, &self.digest) {
            let why = why.as_str();
            crate::restore::choose::History::record_lazy_failure(&self.run_dir, &d.hex, why);
            self.record.message = Some(format!(
                "killed: {why} before every page was delivered; the next restore is eager"
            ));
        }
        self.record.exit_code = Some(code);
        self.set_state(ServiceState::Stopped);
        Outcome {
            code,
            stopped_by: self.signals.stop_signal(),
        }
    }
}

/// The stale mark of a persist image after its one restore.
pub const RETIRED: &str = "restored once (persist mode): the next stop's checkpoint supersedes it";

/// A checkpoint taken on request.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Checkpointed {
    pub key: String,
    pub generation: u64,
    /// How long the service was frozen (the dump, start to end).
    pub frozen_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointNowError {
    #[error("cannot checkpoint: {0}")]
    Unavailable(&'static str),
    #[error("checkpoint failed")]
    Checkpoint(#[source] crate::checkpoint::CheckpointError),
}

/// Polls `prober` until ready, exit, stop request or `timeout`; `tick` runs
/// between attempts.
///
/// An answer from a process outside the service's tree (another process on
/// its port) is not readiness: it is logged once, kept in `foreign`, and the
/// wait goes on. If the service exits after warmer passed it a signal, that
/// is [`Readiness::ExitedAfterSignal`]: the operator's doing, not the image's.
///
/// `foreign: None` skips the ownership check: a restored tree's listening
/// sockets were bound by CRIU itself (a restore fails when the port is taken),
/// and the check reads the kernel's socket tables (milliseconds on a busy
/// host).
fn wait_ready(
    running: &mut Running,
    prober: &mut Prober,
    timeout: Duration,
    signals: &Signals,
    systemd: Systemd,
    tick: &mut dyn FnMut(),
    mut foreign: Option<&mut Option<String>>,
) -> Readiness {
    let deadline = Instant::now() + timeout;
    systemd.extend_timeout(timeout + Duration::from_secs(5));
    let mut backoff = crate::process::probe::Backoff::default();
    let mut signalled = false;
    loop {
        if signals.stop_requested() {
            return Readiness::Stopped;
        }
        for sig in signals.take_forwarded() {
            running.signal(sig);
            signalled = true;
        }
        if let Some(code) = running.poll_exit() {
            return if signalled {
                Readiness::ExitedAfterSignal(code)
            } else {
                Readiness::Exited(code)
            };
        }
        tick();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Readiness::TimedOut(timeout);
        }
        let check = match foreign.as_deref_mut() {
            Some(_) => prober.check_from(left, running.pid),
            None if prober.check(left) => Check::Ready,
            None => Check::NotReady,
        };
        match check {
            Check::Ready => return Readiness::Ready,
            Check::NotReady => {}
            Check::Foreign { port, who } => {
                let foreign = foreign.as_deref_mut().expect("checked only with a slot");
                if foreign.is_none() {
                    let msg = format!(
                        "port {port} answers, but it is held by {who}, not by the service: not ready"
                    );
                    tracing::warn!(phase = "probe", "{msg}");
                    *foreign = Some(msg);
                }
            }
        }
        signals.wait(backoff.next_pause().min(left));
    }
}
