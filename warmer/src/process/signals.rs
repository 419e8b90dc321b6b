//! Signals for the supervisor: flags set by handlers plus a self-pipe, so the
//! main loop can sleep in poll(2) and still wake at once on a signal.
//!
//! Handlers (not a blocked mask + sigwait) because a blocked mask is
//! inherited by every child warmer starts, CRIU included.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

pub struct Signals {
    stop: Arc<AtomicBool>,
    /// SIGINT (rather than SIGTERM) asked for the stop.
    interrupt: Arc<AtomicBool>,
    /// Signals to pass on to the service, by index in [`crate::process::init::FORWARDED`].
    forward: Vec<(Signal, Arc<AtomicBool>)>,
    child: Arc<AtomicBool>,
    wake: UnixStream,
    notify: UnixStream,
}

impl Signals {
    /// SIGTERM and SIGINT request a stop; SIGHUP, SIGQUIT, SIGUSR1/2 are
    /// forwarded; SIGCHLD wakes the loop.
    pub fn install() -> std::io::Result<Self> {
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        notify.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let child = Arc::new(AtomicBool::new(false));
        let interrupt = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(Signal::SIGINT as i32, interrupt.clone())?;
        for sig in [Signal::SIGTERM, Signal::SIGINT] {
            signal_hook::flag::register(sig as i32, stop.clone())?;
            signal_hook::low_level::pipe::register(sig as i32, notify.try_clone()?)?;
        }
        signal_hook::flag::register(Signal::SIGCHLD as i32, child.clone())?;
        signal_hook::low_level::pipe::register(Signal::SIGCHLD as i32, notify.try_clone()?)?;
        let mut forward = Vec::new();
        for sig in [
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
        ] {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(sig as i32, flag.clone())?;
            signal_hook::low_level::pipe::register(sig as i32, notify.try_clone()?)?;
            forward.push((sig, flag));
        }
        Ok(Self {
            stop,
            interrupt,
            forward,
            child,
            wake,
            notify,
        })
    }

    /// A handle other threads write a byte to, to wake [`Signals::wait`].
    pub fn waker(&self) -> std::io::Result<UnixStream> {
        self.notify.try_clone()
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The signal that asked warmer to stop (SIGINT or SIGTERM), if any.
    pub fn stop_signal(&self) -> Option<Signal> {
        if !self.stop_requested() {
            None
        } else if self.interrupt.load(Ordering::SeqCst) {
            Some(Signal::SIGINT)
        } else {
            Some(Signal::SIGTERM)
        }
    }

    /// Signals received since the last call that should reach the service.
    pub fn take_forwarded(&self) -> Vec<Signal> {
        self.forward
            .iter()
            .filter(|(_, f)| f.swap(false, Ordering::SeqCst))
            .map(|(s, _)| *s)
            .collect()
    }

    /// Sleeps up to `timeout`, returning early on any signal.
    pub fn wait(&self, timeout: Duration) {
        if self.stop_requested() || self.child.swap(false, Ordering::SeqCst) {
            return;
        }
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
        let mut buf = [0u8; 64];
        while let Ok(n) = std::io::Read::read(&mut &self.wake, &mut buf) {
            if n == 0 {
                break;
            }
        }
        self.child.store(false, Ordering::SeqCst);
    }
}
