//! The service's inputs while it runs: the inotify watch, and what a change
//! means (same digest: nothing; files the service made among its inputs while
//! starting: the key follows; anything else: the image is stale).

use crate::digest::short;
use crate::digest::watch::InputWatch;
use crate::errors::chain;

use super::Supervisor;

impl Supervisor {
    /// Starts watching the digest inputs on a helper thread: setting up
    /// inotify on every input's directory takes ~1.5 ms, which a restore
    /// should not wait for.
    /// Watches the digest inputs from a thread of its own (inotify set-up
    /// would slow a restore down). `recheck`: compare the digest once the
    /// watch is in place (the service already runs: a change made before
    /// the watch started raised no event).
    pub(super) fn start_watch(&mut self, recheck: bool) {
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

    pub(super) fn clear_watch(&self) {
        if let Some(w) = self.watch.lock().expect("watch slot").as_ref() {
            w.clear();
        }
    }

    pub(super) fn input_change(&self) -> Option<String> {
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
    pub(super) fn check_inputs(&mut self) -> bool {
        self.reconcile_inputs(false)
    }

    /// [`Supervisor::check_inputs`]; `force`: recompute even without a watch
    /// event (right before a checkpoint: an event may still be in flight).
    pub(super) fn reconcile_inputs(&mut self, force: bool) -> bool {
        if self.record.stale.is_some() {
            return true;
        }
        let event = self.input_change();
        if event.is_none() && !force {
            return false;
        }
        let mut reason = event.unwrap_or_default();
        if let Some(old) = self.digest.clone() {
            let Some(digester) = self.digester.as_mut() else {
                return false;
            };
            let now = digester.digest(&self.manifest);
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
}
