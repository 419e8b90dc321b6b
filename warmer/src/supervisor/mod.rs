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
//!
//! One file per phase, all on the one `Supervisor` of a run:
//! - this file: [`run`] (set-up: manifest trust, locks, leftovers, CRIU,
//!   digest), the flow from start to ready, and the loop until the service
//!   exits;
//! - `warm.rs`: plan, pull on a miss, restore, background push;
//! - `cold.rs`: spawn under warmer-init, probe;
//! - `ready.rs`: the probe loop, what a ready start records and says;
//! - `inputs.rs`: the digest inputs while the service runs;
//! - `checkpointing.rs`: at ready, on request, at a persist stop;
//! - [`policy`]: the decisions, pure; [`backoff`]: what keeps failing;
//!   [`record`]: `state.json`; [`control`]: the `warmer checkpoint` socket.
//!
//! May call every part below it (restore, checkpoint, remote, process,
//! image, digest, criu, manifest); only `commands` and `cli` call it.

pub mod backoff;
mod checkpointing;
mod cold;
pub mod control;
mod inputs;
pub mod policy;
mod ready;
pub mod record;
mod warm;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cache::Cache;
use nix::sys::signal::Signal;

use crate::criu::Criu;
use crate::digest::watch::InputWatch;
use crate::digest::{DigestError, Digester, HostFacts, ServiceDigest};
use crate::dirs::Dirs;
use crate::errors::chain;
use crate::manifest::{Manifest, ManifestError};
use crate::process::init::{self, SpawnError};
use crate::process::notify::Systemd;
use crate::process::service::Running;
use crate::process::service::StartKind;
use crate::process::signals::Signals;
use crate::restore::{self};
use crate::supervisor::control::ControlServer;
use crate::supervisor::record::{RunRecord, ServiceState};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("service {service} is already running (lock {})", lock.display())]
    AlreadyRunning { service: String, lock: PathBuf },
    #[error("cannot prepare {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    RunDir(#[from] crate::dirs::RunDirError),
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
    #[error("service {service}: cannot prepare its user and sandbox")]
    Sandbox {
        service: String,
        #[source]
        source: crate::sandbox::SandboxError,
    },
    #[error("service {service}: exec_start_pre step {argv:?} {why}")]
    StartPre {
        service: String,
        argv: String,
        why: String,
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
    /// The one way this run computes the service's digest again (its
    /// inputs moved): the same as at start.
    digester: Option<Digester>,
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
    /// The host PID written into the manifest's `pid_file`.
    pid_written: Option<i32>,
    /// How long this start spent pulling its image from the registry: a
    /// one-time cost, not part of what a restore costs.
    pulled_ms: u64,
    /// The rest of an image this run began restoring before its pull ended
    /// (`remote::stream`): joined before the run ends.
    completing: Option<std::thread::JoinHandle<()>>,
    /// Its frames (whether one could not be had).
    streamed_frames: Option<std::sync::Arc<crate::remote::stream::Frames>>,
    opts: RunOptions,
}

/// How to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Ignore the cache: always cold-start, never checkpoint (baselines).
    pub cold: bool,
    /// A bench's restore: restore even where a cold start is faster, and
    /// leave images as they are (no checkpoint, no retiring, no push).
    pub bench: bool,
}

impl RunOptions {
    /// Whether this run may add, retire or push images.
    pub fn changes_images(&self) -> bool {
        !self.cold && !self.bench
    }
}

pub fn run(dirs: &Dirs, name: &str, opts: RunOptions) -> Result<Outcome, RunError> {
    let started = Instant::now();
    // Checked for trust before it is read (see `Manifest::load`).
    let manifest = Manifest::find(&dirs.manifests, name)?;
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
    let run_dir = dirs.service_run_checked(name)?;

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
    for p in recovered.put_back_undone {
        tracing::warn!(
            "{}: put the data back that an interrupted restore had set aside",
            p.display()
        );
    }
    for p in recovered.kept_newer {
        tracing::warn!(
            "{}: kept the data a restored service wrote after an interrupted restore (the newest data); dropped what was set aside",
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
    let (digester, digest) = match Digester::new(dirs, criu_version, &exe.path) {
        Ok(mut digester) => match digester.digest(&manifest) {
            Ok(d) => (Some(digester), Some(d)),
            Err(e @ DigestError::ProgramNotFound { .. }) => return Err(RunError::Program(e)),
            Err(e) => {
                tracing::warn!("no digest, so no cache for this run: {}", chain(&e));
                (Some(digester), None)
            }
        },
        // Without host facts there is no digest, so no cache: the service
        // still starts, cold.
        Err(e) => {
            tracing::warn!("no digest, so no cache for this run: {}", chain(&e));
            (None, None)
        }
    };
    let host = digester
        .as_ref()
        .map_or_else(HostFacts::unknown, |d| d.host.clone());
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
        digester,
        digest,
        timings: None,
        marks: [setup_done, digest_done, Duration::ZERO],
        watch: Default::default(),
        control: None,
        foreign: None,
        image_taken: false,
        pid_written: None,
        pulled_ms: 0,
        completing: None,
        streamed_frames: None,
        opts,
    };
    sup.run()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Supervisor {
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
        self.record.ready_from_spawn_us = crate::process::clock::since_spawn_us();
        if let (StartKind::Restored, Some(t)) = (running.kind, &self.timings) {
            self.record.breakdown = Some(self.breakdown(t));
            self.record.restored_mb = t.restored_mb();
        }
        let status = self.ready_status(running.kind, ready_ms);
        match (&self.timings, running.kind) {
            (Some(t), StartKind::Restored) => {
                tracing::info!(phase = "ready", ready_ms, restored = true, "{status}; {t}")
            }
            _ => tracing::info!(phase = "ready", ready_ms, restored = false, "{status}"),
        }
        // The PID file is there by the time anyone is told the service is
        // ready (as systemd expects of a PIDFile=).
        self.write_pid_file();
        // Connections an earlier stop-time dump locked (see `criu::locks`):
        // a restore lifted the rules of its own image's connections; the
        // others go now, before ready is said.
        let lifted = match (running.kind, &self.record.image, &self.cache) {
            (StartKind::Restored, Some(key), Some(cache)) => cache
                .lookup_key(key)
                .ok()
                .flatten()
                .and_then(|e| crate::image::criu::tcp_connections(&e.data_dir()).ok())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let released = crate::criu::locks::release(&self.run_dir, &lifted);
        if released > 0 {
            tracing::info!(
                "removed {released} network-lock rules of an image that was not restored"
            );
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
            // Set up inotify only now (it would slow the restore down); once
            // in place it compares the digest again (a change made meanwhile
            // raised no event).
            self.start_watch(true);
        }
        if running.kind == StartKind::Cold && self.opts.changes_images() {
            self.maybe_checkpoint(&running);
            self.systemd.status(&status);
        }
        Ok(self.supervise(running))
    }

    /// The manifest's `pid_file`: the service's host PID, now that it is
    /// ready (see [`crate::process::pidfile`]).
    fn write_pid_file(&mut self) {
        let Some(path) = self.manifest.pid_file.clone() else {
            return;
        };
        let Some(pid) = self
            .record
            .service_pid
            .and_then(crate::process::service::main_pid)
        else {
            tracing::warn!(
                "pid_file {}: the service has no main process",
                path.display()
            );
            return;
        };
        match crate::process::pidfile::write(&path, pid) {
            Ok(()) => self.pid_written = Some(pid),
            Err(e) => tracing::warn!("{}", chain(&e)),
        }
    }

    /// The environment hooks run with: the service's own.
    fn hook_env(&self) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        let notify = matches!(self.manifest.ready.probe, crate::manifest::Probe::Notify)
            .then(|| self.notify_socket());
        crate::process::service::service_env(&self.manifest, notify.as_deref(), &self.run_dir)
            .unwrap_or_else(|why| {
                tracing::warn!("hooks run with an empty environment: {why}");
                Vec::new()
            })
    }

    fn notify_socket(&self) -> PathBuf {
        self.run_dir.join("notify.sock")
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
        if let (Some(path), Some(pid)) = (&self.manifest.pid_file, self.pid_written) {
            if let Err(e) = crate::process::pidfile::remove_if(path, pid) {
                tracing::warn!("{}", chain(&e));
            }
        }
        if let (Some(why), Some(d)) = (lazy_failure, &self.digest) {
            let why = why.as_str();
            crate::restore::choose::History::record_lazy_failure(&self.run_dir, &d.hex, why);
            self.record.message = Some(format!(
                "killed: {why} before every page was delivered; the next restore is eager"
            ));
        }
        self.finish_pull();
        self.record.exit_code = Some(code);
        self.set_state(ServiceState::Stopped);
        Outcome {
            code,
            stopped_by: self.signals.stop_signal(),
        }
    }
}
