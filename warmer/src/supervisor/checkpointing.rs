//! Taking checkpoints while the service runs: at ready (warm mode), on
//! request (`warmer checkpoint`), and at a stop (persist mode).

use std::time::{Duration, Instant};

use crate::checkpoint::Checkpoint;
use crate::digest::short;
use crate::errors::chain;
use crate::image::Taken;
use crate::manifest::Mode;
use crate::process::service::Running;
use crate::supervisor::control::{ControlServer, Reply, Request};
use crate::supervisor::record::ServiceState;

use super::backoff::{self, Failures, Kind};
use super::{control::Checkpointed, ms, policy, Supervisor};

impl Supervisor {
    /// Why checkpoints of this digest are held back, if they are: the same
    /// checkpoint failed again and again (a full disk, a service CRIU cannot
    /// dump), or its images could not be restored (see [`backoff`]).
    fn held_back(&self, digest: &str) -> Option<String> {
        Failures::load(&self.run_dir)
            .skip(digest)
            .or_else(|| Failures::load_kind(&self.run_dir, Kind::Restore).skip(digest))
    }

    /// Counts a failed (or impossible) checkpoint of `digest` toward
    /// holding its checkpoints back.
    fn checkpoint_failed(&mut self, digest: &str, why: &str) {
        if let Err(e) = Failures::load(&self.run_dir).record(&self.run_dir, digest, why) {
            tracing::warn!("cannot record the checkpoint failure: {e}");
        }
    }

    /// Warm mode: the checkpoint at ready ([`policy::checkpoint_at_ready`]).
    pub(super) fn maybe_checkpoint(&mut self, running: &Running) {
        let (Some(cache), Some(digest)) = (self.cache.clone(), self.digest.clone()) else {
            return;
        };
        let facts = policy::ReadyFacts {
            mode: self.manifest.mode,
            checkpoint_enabled: self.manifest.checkpoint.enabled,
            cold_run: !self.opts.changes_images(),
            state: Some(self.record.state),
            // A stale image, or none: this ready service is the new generation.
            have_image: cache
                .lookup(&digest.hex)
                .is_ok_and(|e| e.is_some_and(|e| e.stale.is_none())),
            backoff: self.held_back(&digest.hex),
        };
        match policy::checkpoint_at_ready(&facts) {
            policy::AtReady::Nothing => return,
            policy::AtReady::Skip(why) => {
                tracing::warn!(phase = "checkpoint", "checkpoint skipped: {why}");
                self.record.message = Some(format!("checkpoint skipped: {why}"));
                self.set_state(ServiceState::Ready);
                return;
            }
            policy::AtReady::Take => {}
        }
        // Let the service settle (lazy initialisation after the first probe);
        // a stop request or exit during the wait cancels the checkpoint.
        let until = crate::process::clock::deadline(self.manifest.checkpoint.settle);
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
        if let Some(why) = backoff::no_room(cache.root(), running.pid) {
            tracing::warn!(phase = "checkpoint", "checkpoint skipped: {why}");
            self.record.message = Some(format!("checkpoint skipped: {why}"));
            self.checkpoint_failed(&digest.hex, &why);
            self.set_state(ServiceState::Ready);
            return;
        }
        match self.checkpoint(running, Taken::Ready) {
            Ok(_) => Failures::load(&self.run_dir).clear(&self.run_dir),
            Err(e) => {
                tracing::warn!("checkpoint failed, service keeps running: {}", chain(&e));
                self.record.message = Some(format!("checkpoint failed: {}", chain(&e)));
                self.checkpoint_failed(&digest.hex, &chain(&e));
            }
        }
        self.set_state(ServiceState::Ready);
    }

    /// Takes a checkpoint of `running` now and publishes it as a new
    /// generation. `Taken::Stop` dumps and ends the tree (persist mode, bounded
    /// by `stop.timeout`); the others leave it running.
    pub(super) fn checkpoint(
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
        // Secrets the manifest says must never be in an image.
        let forbidden =
            crate::process::hooks::forbidden_env(running.pid, &self.manifest.checkpoint.forbid_env);
        if !forbidden.is_empty() {
            return Err(CheckpointNowError::ForbiddenEnv(forbidden));
        }
        if let Some(hooks) = &self.manifest.hooks {
            if let Some(argv) = &hooks.before_checkpoint {
                let cwd = self
                    .manifest
                    .workdir
                    .clone()
                    .unwrap_or_else(|| self.run_dir.clone());
                let took = crate::process::hooks::run(
                    "before_checkpoint",
                    argv,
                    running.pid,
                    self.hook_user(),
                    &self.hook_env(),
                    &cwd,
                    hooks.timeout,
                )?;
                tracing::info!(
                    phase = "checkpoint",
                    "before_checkpoint hook took {} ms",
                    took.as_millis()
                );
            }
        }
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
        // An input that changed during the dump makes the new image stale
        // too: the digest is compared again (an event alone, such as the
        // watch's own "recheck once watched", changes nothing).
        self.check_inputs();
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
    pub(super) fn stop_checkpoint(&mut self, running: &mut Running) -> Option<i32> {
        if self.manifest.mode != Mode::Persist
            || !self.manifest.checkpoint.enabled
            || !self.opts.changes_images()
        {
            return None;
        }
        let digest = self.digest.as_ref().map(|d| d.hex.clone());
        // A stop-time dump that keeps failing is held back like a ready-time
        // one: the service stops normally, without a freeze that fails anyway.
        if let Some(why) = digest.as_deref().and_then(|d| self.held_back(d)) {
            tracing::warn!(phase = "stop", "stop-time checkpoint skipped: {why}");
            self.record.message = Some(format!("stop-time checkpoint skipped: {why}"));
            return None;
        }
        tracing::info!(
            phase = "stop",
            "persist mode: checkpointing the service's state at stop"
        );
        match self.checkpoint(running, Taken::Stop) {
            Ok(_) => {
                Failures::load(&self.run_dir).clear(&self.run_dir);
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
                if let Some(d) = &digest {
                    self.checkpoint_failed(d, &chain(&e));
                }
                None
            }
        }
    }

    /// Answers `warmer checkpoint` requests.
    pub(super) fn serve_control(&mut self, running: &Running) {
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
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointNowError {
    #[error("cannot checkpoint: {0}")]
    Unavailable(&'static str),
    #[error(transparent)]
    Checkpoint(crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Hook(#[from] crate::process::hooks::HookError),
    #[error("refused: the service's environment has {} (checkpoint.forbid_env): it would be in the image", .0.join(", "))]
    ForbiddenEnv(Vec<String>),
}

impl Supervisor {
    /// Whom hooks run as: a sandboxed service's user and group (resolved
    /// now); else root, in the service's namespaces.
    pub(super) fn hook_user(&self) -> Option<(u32, u32)> {
        let sandbox = self.manifest.sandbox.as_ref()?;
        match crate::sandbox::Credentials::resolve(sandbox) {
            Ok(c) => Some((c.uid, c.gid)),
            Err(e) => {
                tracing::warn!("hooks run as root: {}", chain(&e));
                None
            }
        }
    }
}
