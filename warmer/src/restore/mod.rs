//! Restoring a service from its cache entry, step by step.
//!
//! ```text
//!  1 plan ──> 2 prepare state ──> 3 CRIU ──> 4 verify ──> 5 probe ──> 6 commit
//!   │ no image,     │ hash first,      │ criu       │ hash        │ exited,
//!   │ stale         │ put back         │ restore    │ mismatch    │ not ready
//!   v               v                  v            v             v
//!  cold start      6' undo: kill the restored tree, put the service's data back
//!  (nothing to      exactly as it was before step 2, quarantine the image, cold start
//!   undo)
//! ```
//!
//! 1. [`plan`] (`plan.rs`; [`plan_streamed`] for an image still arriving
//!    from a registry): look the digest up; decide how integrity is
//!    established ([`Integrity`]) and whether state goes back first.
//! 2. [`Restore::prepare_state`]: an image with `state:` is hashed in full
//!    before anything of it is written outside the cache, then its state is
//!    put back, keeping the live data aside ([`PutBack`]).
//! 3. and 4. [`Restore::tree`]: without a stamp from this boot, every file is
//!    hashed on one core while CRIU restores the tree `--leave-stopped`; the
//!    tree runs only once the hashes hold.
//! 5. The caller's probe decides readiness ([`Readiness`]).
//! 6. [`commit`]: drop the data kept aside. 6'. [`Restore::undo`].
//!
//! [`Restore::run`] performs them in order; each is a function of its own
//! so it can be read and tested alone.

pub mod choose;
pub mod criu;
pub mod page_server;
mod plan;
pub mod readahead;
pub mod working_set;

use std::path::Path;
use std::time::{Duration, Instant};

use cache::{Cache, Entry};

pub use self::criu::{restore as criu_restore, CriuRestoreError, CriuTimes, RestoreOptions, Watch};
use self::plan::published_key;
pub use self::plan::{
    choose_restore, plan, plan_streamed, Integrity, Plan, Purpose, Served, Skip, NO_USERFAULTFD,
};
use crate::criu::Criu;
use crate::digest::short;
use crate::errors::chain;
use crate::image::state::{PutBack, StateError};
use crate::process::logs::Output;
pub use crate::process::probe::Readiness;
use crate::process::service::Running;
use crate::process::signals::Signals;

/// Why a restore failed. Every variant means: undo, quarantine, cold start.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("cache entry is unreadable")]
    Entry(#[source] cache::Error),
    #[error("image is damaged")]
    Damaged(#[source] cache::Problem),
    /// Both went wrong: the hash and CRIU. Both are reported.
    #[error("image is damaged, and criu restore failed as well ({})", chain(criu))]
    DamagedAndCriu {
        #[source]
        problem: cache::Problem,
        criu: Box<CriuRestoreError>,
    },
    /// CRIU's own message says what failed.
    #[error(transparent)]
    Criu(Box<CriuRestoreError>),
    #[error("cannot put the service's state files back")]
    State(#[source] StateError),
    #[error("cannot compare the service's state with the image")]
    Drift(#[source] StateError),
    #[error("cannot read the image's restore information")]
    Info(#[source] crate::image::ImageFormatError),
    #[error("restored service exited with status {0}")]
    Exited(i32),
    /// It exited after warmer passed it an operator's signal: no evidence
    /// against the image (undone, not quarantined).
    #[error("restored service exited with status {0} after a signal passed on to it")]
    EndedBySignal(i32),
    /// warmer was asked to stop while CRIU ran: CRIU and its tree were
    /// killed; no evidence against the image (undone, not quarantined).
    #[error("stopped during the restore")]
    Stopped,
    #[error("restored service not ready within {}", humantime::format_duration(*.0))]
    NotReady(Duration),
    /// The service's `after_restore` hook failed.
    #[error("{0}")]
    AfterRestore(String),
}

impl Failure {
    /// The entry a lookup found damaged, to quarantine it.
    pub fn entry_key(&self) -> Option<String> {
        match self {
            Failure::Entry(cache::Error::Damaged { key, .. }) => Some(key.clone()),
            _ => None,
        }
    }
}

/// Where a restore spent its time.
#[derive(Debug, Clone)]
pub struct Timings {
    pub integrity: Integrity,
    /// Putting `state:` data back (and hashing first when it goes back).
    pub state: Duration,
    /// `criu restore`, wall time (a lazy daemon's start included).
    pub criu: Duration,
    pub criu_times: CriuTimes,
    /// Time after CRIU returned, waiting for the hashes.
    pub hash_wait: Duration,
    /// From the tree's resumption to the probe's success (the hooks'
    /// time apart).
    pub probe: Duration,
    /// The `after_restore` hook, before the probe.
    pub hooks: Duration,
    /// Before CRIU: the working set's view of the image, what to ask the
    /// disk for.
    pub prepare: Duration,
}

impl Timings {
    /// The memory CRIU wrote into the tree before it ran (its
    /// `pages_restored`), MB.
    pub fn restored_mb(&self) -> Option<f64> {
        let pages = self.criu_times.stats.as_ref()?.pages_restored?;
        #[allow(clippy::cast_precision_loss)]
        Some((pages * working_set::page_size()) as f64 / 1e6)
    }

    /// The restore's phases in order, in ms, CRIU's own split out where it
    /// reports them (the supervisor adds what came before).
    pub fn phases(&self) -> Vec<(String, f64)> {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut out = vec![
            ("state".to_string(), ms(self.state)),
            ("working set view, read-ahead".to_string(), ms(self.prepare)),
        ];
        let mut criu_rest = ms(self.criu);
        if let Some(l) = self.criu_times.lazy_start {
            out.push(("lazy daemon start".into(), ms(l)));
            criu_rest -= ms(l);
        }
        if let Some(s) = &self.criu_times.stats {
            let (fork, restore) = (
                f64::from(s.forking_time) / 1000.0,
                f64::from(s.restore_time) / 1000.0,
            );
            out.push(("criu: forking".into(), fork));
            out.push(("criu: restore".into(), restore));
            criu_rest -= fork + restore;
        }
        out.push(("criu: rest (exec, checks, exit)".into(), criu_rest.max(0.0)));
        out.push(("integrity wait".into(), ms(self.hash_wait)));
        if !self.hooks.is_zero() {
            out.push(("after_restore hook".into(), ms(self.hooks)));
        }
        out.push(("probe".into(), ms(self.probe)));
        out
    }
}

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "criu restore {} ms, integrity: {} (+{} ms)",
            self.criu.as_millis(),
            self.integrity.describe(),
            self.hash_wait.as_millis()
        )
    }
}

/// A restored, ready service.
pub struct Restored {
    pub running: Running,
    pub timings: Timings,
    pub entry: Entry,
}

/// Step 6: the restored service is ready; the data kept aside goes.
pub fn commit(state: Option<PutBack>) {
    if let Some(pb) = state {
        // The restored service runs on the put-back data either way; a copy
        // left aside is only disk space (and `recover` would bring it back
        // at the next start, so say so loudly).
        if let Err(e) = pb.commit() {
            tracing::error!(
                "cannot remove the data kept aside during the restore: {}",
                chain(&e)
            );
        }
    }
}

/// The parts a restore works with.
pub struct Restore<'a> {
    pub criu: &'a Criu,
    pub cache: &'a Cache,
    pub run_dir: &'a Path,
    pub signals: &'a Signals,
}

impl Restore<'_> {
    /// Steps 2 to 6 for `plan`; `probe` is step 5. On failure everything is
    /// undone (6') and the failure returned; the caller cold-starts.
    pub fn run(
        &self,
        plan: &Plan,
        probe: &mut dyn FnMut(&mut Running) -> Readiness,
    ) -> Result<Restored, Failure> {
        let t_state = Instant::now();
        let state = match self.prepare_state(plan) {
            Ok(s) => s,
            Err(f) => return Err(self.undo(Some(plan.key().into()), f, None, None)),
        };
        let state_took = t_state.elapsed();
        crate::failpoint("restore-after-put-back");
        let (mut running, mut timings) = match self.tree(plan) {
            Ok(r) => r,
            Err(f) => return Err(self.undo(Some(plan.key().into()), f, None, state)),
        };
        timings.state = state_took;
        crate::failpoint("restore-after-criu");
        let t_probe = Instant::now();
        let readiness = probe(&mut running);
        timings.probe = t_probe.elapsed();
        let failure = match readiness {
            Readiness::Ready | Readiness::Stopped => None,
            Readiness::Exited(code) => Some(Failure::Exited(code)),
            Readiness::ExitedAfterSignal(code) => Some(Failure::EndedBySignal(code)),
            Readiness::TimedOut(t) => Some(Failure::NotReady(t)),
            Readiness::HookFailed(why) => Some(Failure::AfterRestore(why)),
        };
        if let Some(f) = failure {
            return Err(self.undo(Some(plan.key().into()), f, Some(running), state));
        }
        commit(state);
        Ok(Restored {
            running,
            timings,
            entry: plan.entry.clone(),
        })
    }

    /// Step 2: verify first if state goes back (nothing unverified is ever
    /// written outside the cache), then put back what vanished.
    pub fn prepare_state(&self, plan: &Plan) -> Result<Option<PutBack>, Failure> {
        if plan.integrity == Integrity::HashFirst {
            self.cache
                .verify(&plan.entry, &mut |_, _| {})
                .map_err(Failure::Damaged)?;
        }
        if plan.put_back.is_empty() {
            return Ok(None);
        }
        crate::image::state::put_back(&plan.entry.data_dir(), &plan.put_back)
            .map(Some)
            .map_err(Failure::State)
    }

    /// Steps 3 and 4: CRIU restores the tree; the hashes (if any are needed)
    /// run alongside and the tree stays stopped until they hold. A failed
    /// hash or a stop request kills CRIU at once, as does `plan.deadline`.
    pub fn tree(&self, plan: &Plan) -> Result<(Running, Timings), Failure> {
        let t0 = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        let held = plan.integrity == Integrity::HashAlongside;
        if held {
            let (cache, entry) = (self.cache.clone(), plan.entry.clone());
            std::thread::spawn(move || {
                let _ = tx.send(cache.verify_with(&entry, cache::Cores::One, &mut |_, _| {}));
            });
        } else {
            let _ = tx.send(Ok(()));
        }
        let mut verified: Option<Result<(), cache::Problem>> = None;
        let signals = self.signals;
        let mut abort = || {
            if verified.is_none() {
                verified = rx.try_recv().ok();
            }
            if let Some(Err(p)) = &verified {
                return Some(format!("the image is damaged: {p}"));
            }
            signals
                .stop_requested()
                .then(|| "warmer was asked to stop".to_string())
        };
        let data = plan.entry.data_dir();
        // What a restore touches teaches the working set, until it has
        // settled: a lazy one's faults, and any one's file pages.
        let known = plan.working_set.as_ref();
        let first = known.filter(|_| plan.choice.working_set);
        let learning = known.is_none_or(working_set::WorkingSet::learning_files);
        let learn = plan.choice.lazy && known.is_none_or(working_set::WorkingSet::learning_memory);
        let criu_files = readahead::criu_files(self.cache, plan.key());
        if plan.pages.is_none() {
            let entry = &plan.entry;
            readahead::before_restore(entry, plan.choice.lazy, first, known, &criu_files);
        }
        let images = match first {
            Some(ws) => match working_set::write_view(&data, self.run_dir, ws) {
                Ok(view) => {
                    tracing::info!(
                        phase = "working set",
                        "{} MB restored first, {} MB on demand",
                        view.eager_pages * working_set::page_size() / 1_000_000,
                        view.lazy_pages * working_set::page_size() / 1_000_000
                    );
                    view.dir
                }
                Err(e) => {
                    tracing::warn!("cannot prepare the working set first, restoring lazily: {e}");
                    data
                }
            },
            None => data,
        };
        let prepared = t0.elapsed();
        let t0 = Instant::now();
        let restored = Output::new()
            .map_err(CriuRestoreError::Setup)
            .and_then(|out| {
                let opts = RestoreOptions {
                    leave_stopped: held,
                    lazy: plan.choice.lazy,
                    learn,
                    pages: plan.pages.as_ref().map(|p| p.0.clone()),
                    quiet_background: plan.quiet_background,
                };
                let watch = Watch {
                    deadline: plan.deadline,
                    abort: &mut abort,
                };
                criu_restore(
                    self.criu,
                    &images,
                    &plan.info,
                    self.run_dir,
                    opts,
                    out,
                    watch,
                )
            });
        let t_criu = t0.elapsed();
        // The tree is held stopped until the hashes are in (bounded by the
        // same deadline; a stop request ends the wait too).
        let verified = match verified {
            Some(v) => v,
            None => loop {
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(v) => break v,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        break Err(cache::Problem::Unreadable {
                            path: ".".into(),
                            error: "verification thread panicked".into(),
                        })
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if t0.elapsed() > plan.deadline || self.signals.stop_requested() {
                            break Err(cache::Problem::Unreadable {
                                path: ".".into(),
                                error: "verification did not finish in time".into(),
                            });
                        }
                    }
                }
            },
        };
        let (restored, criu_times) = match restored {
            Ok((mut r, t)) => {
                if plan.pages.is_none() {
                    let key = plan.key();
                    readahead::remember_criu_files(self.cache, key, &criu_files, &t.criu_files);
                }
                if learn {
                    // What the service faults on from now on is its working set.
                    let (cache, key) = (self.cache.clone(), plan.key().to_string());
                    let log = self.run_dir.join(crate::criu::LAZY_PAGES_LOG);
                    r.on_lazy_end(Box::new(move || {
                        if let Some(key) = published_key(&cache, &key) {
                            working_set::learn(&cache, &key, &log);
                        }
                    }));
                }
                if learning || learn {
                    let (cache, key) = (self.cache.clone(), plan.key().to_string());
                    r.at_or_before_stop(
                        working_set::FILE_WINDOW,
                        Box::new(move |pids| {
                            if let Some(key) = published_key(&cache, &key) {
                                working_set::learn_files(&cache, &key, &pids);
                            }
                        }),
                    );
                }
                (Ok(r), t)
            }
            Err(e) => (Err(e), CriuTimes::default()),
        };
        let timings = Timings {
            integrity: plan.integrity,
            state: Duration::ZERO,
            criu: t_criu,
            criu_times,
            hash_wait: t0.elapsed().saturating_sub(t_criu),
            probe: Duration::ZERO,
            hooks: Duration::ZERO,
            prepare: prepared,
        };
        let restored = match restored {
            // CRIU was stopped because the hash failed: that is the cause.
            Err(CriuRestoreError::Aborted { .. }) if verified.is_err() => {
                return Err(Failure::Damaged(verified.unwrap_err()))
            }
            Err(CriuRestoreError::Aborted { .. }) => return Err(Failure::Stopped),
            r => r,
        };
        match (verified, restored) {
            (Ok(()), Ok(r)) => {
                if held {
                    r.resume();
                }
                Ok((r, timings))
            }
            (Err(problem), Ok(mut r)) => {
                // Never resumed: the damaged image did not run.
                r.kill(self.signals);
                r.finish();
                Err(Failure::Damaged(problem))
            }
            (Err(problem), Err(criu)) => Err(Failure::DamagedAndCriu {
                problem,
                criu: Box::new(criu),
            }),
            (Ok(()), Err(e)) => Err(Failure::Criu(Box::new(e))),
        }
    }

    /// 6': ends the restored tree, puts the live data back, quarantines the
    /// image. Returns the failure, for the caller's record. A failed undo is
    /// reported beside the failure that caused it.
    pub fn undo(
        &self,
        key: Option<String>,
        failure: Failure,
        running: Option<Running>,
        state: Option<PutBack>,
    ) -> Failure {
        if let Some(mut r) = running {
            r.kill(self.signals);
            r.finish();
        }
        let why = chain(&failure);
        let label = key.as_deref().map_or_else(|| "?".to_string(), short);
        let evidence = !matches!(failure, Failure::EndedBySignal(_) | Failure::Stopped);
        if evidence {
            tracing::warn!("image {label} unusable, cold start instead: {why}");
        } else {
            // Not the image's doing, and no cold start follows: warmer ends.
            tracing::info!("restore of image {label} ended: {why}; the image is kept");
        }
        if let Some(pb) = state {
            if let Err(e) = pb.undo() {
                tracing::error!(
                    "restore failed ({why}), and putting the service's data back failed too: {}",
                    chain(&e)
                );
            }
        }
        let Some(key) = key.filter(|_| evidence) else {
            return failure;
        };
        match self.cache.quarantine(&key, &why) {
            Ok(to) => tracing::warn!("image moved to {}", to.display()),
            Err(e) => {
                if self.cache.lookup_key(&key).is_ok_and(|e| e.is_some()) {
                    tracing::error!("cannot quarantine image {}: {}", short(&key), chain(&e));
                }
            }
        }
        failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_print_each_cause_once_and_both_when_two_went_wrong() {
        let f = Failure::Damaged(cache::Problem::Checksum {
            path: "pages-1.img".into(),
        });
        assert_eq!(
            chain(&f),
            "image is damaged: pages-1.img: checksum mismatch"
        );
        let f = Failure::DamagedAndCriu {
            problem: cache::Problem::Missing {
                path: "core-1.img".into(),
            },
            criu: Box::new(CriuRestoreError::Pidfile {
                path: "/run/x.pid".into(),
            }),
        };
        let text = chain(&f);
        assert!(text.contains("core-1.img: missing"), "{text}");
        assert!(text.contains("pidfile /run/x.pid"), "{text}");
        assert_eq!(text.matches("missing").count(), 1, "{text}");
    }
}
