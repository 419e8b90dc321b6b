//! Telling systemd what warmer is doing (`Type=notify`).
//!
//! Outside systemd (`$NOTIFY_SOCKET` unset) every call is a no-op. A failed
//! notification is logged, never fatal: the service matters more.

use std::time::Duration;

use sd_notify::NotifyState;

#[derive(Debug, Clone, Copy, Default)]
pub struct Systemd;

impl Systemd {
    fn send(&self, states: &[NotifyState<'_>]) {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!("sd_notify failed: {e}");
        }
    }

    pub fn status(&self, text: &str) {
        self.send(&[NotifyState::Status(text)]);
    }

    /// `READY=1` with a final status line.
    pub fn ready(&self, text: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(text)]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// Asks systemd for `d` more time in a long phase (start, checkpoint).
    pub fn extend_timeout(&self, d: Duration) {
        let usec = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }
}
