//! Readiness: the probe loop shared by cold starts and restores, and what a
//! ready start records (the measurements behind eager or lazy and never
//! slower than cold) and says.

use std::time::{Duration, Instant};

use super::Supervisor;
use crate::manifest::Mode;
use crate::process::service::StartKind;
use crate::restore::choose;

use crate::process::notify::Systemd;
use crate::process::probe::{Check, Prober, Readiness};
use crate::process::service::Running;
use crate::process::signals::Signals;

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
pub(super) fn wait_ready(
    running: &mut Running,
    prober: &mut Prober,
    timeout: Duration,
    signals: &Signals,
    systemd: Systemd,
    tick: &mut dyn FnMut(),
    mut foreign: Option<&mut Option<String>>,
) -> Readiness {
    let deadline = crate::process::clock::deadline(timeout);
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

impl Supervisor {
    /// Records how long this start took to ready and returns the message
    /// that says so. A warm service whose restores are measured no faster
    /// than its cold starts is cold-started from now on (this image, kept
    /// across boots: [`choose::cold_is_faster`]).
    pub(super) fn ready_status(&mut self, kind: StartKind, ready_ms: u64) -> String {
        // A pull is a one-time cost, not what a restore costs.
        let measured = ready_ms.saturating_sub(self.pulled_ms);
        let digest = self.digest.as_ref().map(|d| d.hex.clone());
        match kind {
            StartKind::Cold => {
                self.record.cold_ready_ms = Some(ready_ms);
                if let Some(d) = &digest {
                    // Kept beside the image of this digest, when there is one.
                    let current = self
                        .cache
                        .as_ref()
                        .and_then(|c| c.lookup(d).ok().flatten().map(|e| (c, e.key)));
                    let kept = current.as_ref().map(|(c, k)| (*c, k.as_str()));
                    choose::History::record_cold(&self.run_dir, d, ready_ms, kept);
                }
                match self
                    .record
                    .service_pid
                    .and_then(crate::process::service::main_pid)
                {
                    Some(pid) => format!("ready: cold start in {ready_ms} ms, pid {pid}"),
                    None => format!("ready: cold start in {ready_ms} ms"),
                }
            }
            StartKind::Restored => {
                if let (Some(d), Some(c)) = (&digest, &self.record.restore_choice) {
                    let kept = self.cache.as_ref().zip(self.record.image.as_deref());
                    choose::History::record(&self.run_dir, d, c.kind(), measured, kept);
                    let history = choose::History::load(&self.run_dir, d);
                    let verdict = choose::cold_is_faster(&history, self.record.cold_ready_ms);
                    if let Some(v) = verdict.filter(|_| self.manifest.mode == Mode::Warm) {
                        tracing::warn!("{v}: this service will be cold-started from now on");
                        self.record.message = Some(format!("next starts are cold: {v}"));
                    }
                }
                match self.record.cold_ready_ms {
                    Some(cold) => format!(
                        "ready: restored in {ready_ms} ms (cold {cold} ms){}",
                        self.pull_note()
                    ),
                    None => format!("ready: restored in {ready_ms} ms{}", self.pull_note()),
                }
            }
        }
    }
}
