//! The warm start: plan, pull on a miss, restore (see [`crate::restore`] for
//! the steps), and the background push of a restored local image.

use std::time::{Duration, Instant};

use cache::Cache;
use nix::sys::signal::Signal;

use crate::digest::short;
use crate::errors::chain;
use crate::manifest::{Mode, Probe};
use crate::process::probe::{Prober, Readiness};
use crate::process::service::Running;
use crate::restore::{self, Restore, Skip};
use crate::supervisor::record::ServiceState;

use super::backoff::{Failures, Kind};
use super::{ready::wait_ready, Supervisor};
use crate::image::RETIRED;

impl Supervisor {
    /// Restores from the cache if there is a usable image (see
    /// [`crate::restore`] for the steps). Every failure is undone and
    /// recorded, the image quarantined, and `None` returned: cold start next.
    /// `Some(Err(status))`: the restored service was ended by a signal the
    /// operator sent meanwhile (not the image's fault: kept).
    pub(super) fn try_restore(&mut self) -> Option<Result<Running, i32>> {
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
        let purpose = if self.opts.bench {
            restore::Purpose::Measure
        } else {
            restore::Purpose::Start
        };
        // One memo for what this start asks of CRIU (each asked once per boot).
        let mut memo = crate::memo::Memo::load(&self.run_root);
        let lazy_in_userns = self.manifest.sandbox.is_none() || criu.lazy_in_userns(&mut memo);
        memo.save();
        let plan = |me: &Self, cache: &cache::Cache| {
            let (m, run_dir) = (&me.manifest, &me.run_dir);
            restore::plan(cache, &digest, m, run_dir, purpose, lazy_in_userns)
        };
        let mut planned = plan(self, &cache);
        let mut streamed = None;
        if matches!(planned, Ok(Err(Skip::NoImage))) {
            match self.pull_missing(&cache, &digest, lazy_in_userns) {
                Pulled::Nothing => {}
                Pulled::Whole => {
                    planned = plan(self, &cache);
                }
                Pulled::Streaming(s) => {
                    planned = restore::plan_streamed(&s, &self.manifest);
                    streamed = Some(s);
                }
            }
        }
        self.marks[2] = self.started.elapsed();
        let plan = match planned {
            Ok(Ok(mut plan)) => {
                plan.quiet_background =
                    plan.choice.lazy && criu.has_feature(&mut memo, crate::criu::QUIET_BACKGROUND);
                memo.save();
                plan
            }
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
                self.record.message = Some(format!("cold start: {skip}"));
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
                self.record.message = Some(format!("cold start: the image is stale ({why})"));
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
        // A sandboxed service's directories are bound into its namespace:
        // after a reboot (/run is empty) they are made again, as at a cold
        // start, before CRIU looks for them.
        if let Some(sandbox) = &self.manifest.sandbox {
            let made = crate::sandbox::Credentials::resolve(sandbox)
                .and_then(|c| crate::sandbox::make_directories(sandbox, &c, &self.run_dir));
            if let Err(e) = made {
                tracing::warn!("cold start: the sandbox cannot be prepared: {}", chain(&e));
                return None;
            }
        }
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
        // Before the probe, the service learns it was restored (see
        // `process::hooks`): the restore-info file, its hook, its signal.
        let (run_dir, hooks, restore_signal) = (
            self.run_dir.clone(),
            self.manifest.hooks.clone(),
            self.manifest.restore_signal,
        );
        let hook_env = self.hook_env();
        let cwd = self
            .manifest
            .workdir
            .clone()
            .unwrap_or_else(|| self.run_dir.clone());
        let entry = plan.entry.clone();
        let sandboxed = self.manifest.sandbox.is_some();
        let as_user = self.hook_user();
        let mut hook_time = Duration::ZERO;
        let mut told = |running: &mut Running| -> Result<(), String> {
            if let Err(e) = crate::process::hooks::write_restore_info(&run_dir, sandboxed, &entry) {
                tracing::warn!("cannot write the restore-info file: {e}");
            }
            if let Some(argv) = hooks.as_ref().and_then(|h| h.after_restore.as_ref()) {
                let limit = hooks.as_ref().map_or(Duration::ZERO, |h| h.timeout);
                let took = crate::process::hooks::run(
                    "after_restore",
                    argv,
                    running.pid,
                    as_user,
                    &hook_env,
                    &cwd,
                    limit,
                )
                .map_err(|e| chain(&e))?;
                hook_time += took;
            }
            if let Some(sig) = restore_signal {
                match crate::process::service::main_pid(running.pid.as_raw()) {
                    Some(main) => {
                        if let Err(e) =
                            nix::sys::signal::kill(nix::unistd::Pid::from_raw(main), sig)
                        {
                            tracing::warn!("cannot send {sig} to the restored service: {e}");
                        }
                    }
                    None => tracing::warn!("no main process to send {sig} to"),
                }
            }
            Ok(())
        };
        let mut probe = |running: &mut Running| -> Readiness {
            if let Err(why) = told(running) {
                return Readiness::HookFailed(why);
            }
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
        // A persist image is used once, whatever happens: retired before its
        // restore starts, so that even a warmer killed mid-restore (the tree
        // running on, unsupervised, its data moving on) never has it restored
        // again over newer data.
        let retire = self.manifest.mode == Mode::Persist && self.opts.changes_images();
        if retire {
            if let Err(e) = cache.mark_stale(plan.key(), RETIRED) {
                tracing::error!(
                    "cannot retire the persist image {} before its restore; cold start rather than risking a second restore later: {}",
                    short(plan.key()),
                    chain(&e)
                );
                return None;
            }
        }
        crate::failpoint("restore-after-retire");
        // Nothing of this restore outlives warmer, whenever it dies.
        let guard =
            crate::process::guard::Guard::arm(&self.manifest.name, &self.run_dir, cache.root());
        let mut result = restore.run(&plan, &mut probe);
        if let Ok(r) = result.as_mut() {
            r.timings.probe = r.timings.probe.saturating_sub(hook_time);
            r.timings.hooks = hook_time;
        }
        if let Some(g) = guard {
            g.disarm();
        }
        if retire && matches!(result, Err(restore::Failure::Stopped)) {
            // Stopped before the tree ever ran: the image is as good as it was.
            if let Err(e) = cache.clear_stale(plan.key()) {
                tracing::warn!(
                    "cannot un-retire image {}: {}",
                    short(plan.key()),
                    chain(&e)
                );
            }
        }
        drop(lock);
        if let Some(s) = streamed {
            self.streamed_frames = Some(s.frames.clone());
            // The rest of the image, then the entry: published once this
            // lock is free (the restore is done with the staging entry).
            self.completing =
                s.complete_in_background(cache.clone(), self.manifest.name.clone(), digest.clone());
        }
        match result {
            Ok(restored) => {
                // A streamed image is not an entry yet (published when the
                // rest has arrived).
                self.record.image = (self.completing.is_none()).then(|| restored.entry.key.clone());
                self.image_taken = true;
                if restored.entry.meta.origin.is_none()
                    && self.manifest.mode == Mode::Warm
                    && self.opts.changes_images()
                {
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
                // failed again forever (see `backoff`); a damaged file says
                // nothing about the state.
                if super::policy::counts_against_state(&failure) {
                    let restores = Failures::load_kind(&self.run_dir, Kind::Restore);
                    if let Err(e) = restores.record(&self.run_dir, &digest, &chain(&failure)) {
                        tracing::warn!("cannot record the failed restore: {e}");
                    }
                }
                None
            }
        }
    }

    /// The cache has no image of `digest`: fetch it from the service's
    /// registry, if it has one, within `remote.timeout` (a registry that is
    /// down or slow costs a start no more). An image that can restore
    /// lazily comes back before all of it is here (`remote::stream`), unless
    /// the manifest asks for eager restores.
    /// `lazy_in_userns`: this service's image may restore lazily (always
    /// outside a sandbox: [`crate::criu::Criu::lazy_for`]).
    pub(super) fn pull_missing(
        &mut self,
        cache: &Cache,
        digest: &str,
        lazy_in_userns: bool,
    ) -> Pulled {
        let Some(remote) = &self.manifest.remote else {
            return Pulled::Nothing;
        };
        if self.manifest.mode != Mode::Warm {
            return Pulled::Nothing;
        }
        self.systemd.status("pulling the image");
        let t = Instant::now();
        let progress = &mut |p: &str| tracing::info!(phase = "pull", "{p}");
        // Not after a lazy restore of this digest failed this boot (a frame
        // that could not be had among them): the whole pull then says why.
        use crate::remote::Stream;
        let may_stream = if self.manifest.restore_mode == crate::manifest::RestoreMode::Eager
            || crate::restore::choose::History::load(&self.run_dir, digest)
                .lazy_failed
                .is_some()
        {
            Stream::No
        } else if lazy_in_userns {
            Stream::Any
        } else {
            Stream::HostOnly
        };
        let result = crate::remote::pull_or_stream(
            cache,
            &self.manifest,
            digest,
            &self.host.as_map(),
            Some(remote.timeout),
            may_stream,
            progress,
        );
        let result = match result {
            Ok(crate::remote::stream::Got::Streaming(s)) => {
                self.pulled_ms = s.ms;
                tracing::info!(
                    phase = "pull",
                    pull_ms = s.ms,
                    "image {} from {}: restoring before the pull ends ({} MB fetched in {} ms, {} frames of memory)",
                    short(&s.entry.key),
                    remote.repository,
                    s.fetched_bytes / 1_000_000,
                    s.ms,
                    s.frames_first
                );
                return Pulled::Streaming(s);
            }
            Ok(crate::remote::stream::Got::Pulled(p)) => Ok(p),
            Err(e) => Err(e),
        };
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
                Pulled::Whole
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
                Pulled::Nothing
            }
        }
    }

    /// Where this restore's time went, from spawn (when known) to ready.
    pub(super) fn breakdown(&self, t: &restore::Timings) -> Vec<(String, f64)> {
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

    pub(super) fn pull_note(&self) -> String {
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
    pub(super) fn push_in_background(&self, key: &str, if_missing: bool) {
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
}

impl Supervisor {
    /// Waits (within `remote.timeout`) for the rest of an image this run
    /// began restoring before its pull ended, so that it is kept: a stop
    /// right after the start would otherwise lose it.
    pub(super) fn finish_pull(&mut self) {
        if let (Some(frames), Some(d)) = (self.streamed_frames.take(), &self.digest) {
            if let Some(why) = frames.failure() {
                // The service was killed (or its restore failed) for it: the
                // next start pulls the image whole, or starts cold.
                crate::restore::choose::History::record_lazy_failure(
                    &self.run_dir,
                    &d.hex,
                    &format!("the image's pages cannot be had: {why}"),
                );
                if self.record.last_start == Some(crate::process::service::StartKind::Restored) {
                    self.record.message = Some(format!(
                        "killed: the image's pages cannot be had ({why}); the next start pulls it whole"
                    ));
                }
            }
        }
        let Some(handle) = self.completing.take() else {
            return;
        };
        let limit = self
            .manifest
            .remote
            .as_ref()
            .map_or(Duration::from_secs(60), |r| r.timeout);
        let t = Instant::now();
        if !handle.is_finished() {
            tracing::info!(phase = "pull", "waiting for the rest of the image");
        }
        while !handle.is_finished() && t.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            tracing::warn!(
                phase = "pull",
                "the rest of the image did not arrive within {}; the next start fetches it again",
                humantime::format_duration(limit)
            );
        }
    }
}

/// What [`Supervisor::pull_missing`] got.
pub(super) enum Pulled {
    /// No image (no registry, none there, or the pull failed).
    Nothing,
    /// The image, whole, in the cache.
    Whole,
    /// An image whose restore may begin before the rest arrives.
    Streaming(Box<crate::remote::stream::Streamed>),
}
