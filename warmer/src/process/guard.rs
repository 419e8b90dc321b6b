//! The restore guard: no process of a restore outlives the `warmer run`
//! that started it.
//!
//! A restored tree dies with warmer once CRIU is done (its namespace init
//! carries `PR_SET_PDEATHSIG`, which CRIU restores), and under systemd the
//! unit's cgroup is killed anyway. The gap is CRIU's own run: a `kill -9` of
//! warmer then left the tree serving unsupervised, or frozen and holding the
//! service's port until the next start. So for the length of a restore a
//! guard runs beside warmer (`warmer __guard SERVICE HOME CACHE`, in a process
//! group of its own so a terminal's signals spare it), reading a pipe only
//! warmer writes to: "over" disarms it; end of file without it means warmer
//! died, and the guard ends CRIU and every leftover of the service (the
//! same [`crate::process::leftovers`] rule the next start applies), until
//! none reappears.
//!
//! ```text
//!  warmer run ──pipe──> warmer __guard SVC HOME CACHE   "over\n": exit
//!      │                                            EOF: end CRIU, the tree
//!      └── criu restore ... (the tree)
//! ```

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DISARM: &[u8] = b"over\n";

/// How long a dead warmer's run lock may outlive the end of its pipe.
const LOCK_GRACE: Duration = Duration::from_secs(1);

/// An armed guard; [`Guard::disarm`] (or dropping it) ends it.
pub struct Guard {
    pipe: Option<std::fs::File>,
    child: Option<Child>,
}

impl Guard {
    /// Spawns the guard of `service`'s restore. `None` (logged) if it
    /// cannot be started: the restore goes on, as it did before guards.
    pub fn arm(service: &str, home: &Path, cache: &Path) -> Option<Self> {
        let spawn = || -> std::io::Result<Self> {
            use std::os::unix::process::CommandExt;
            let (read, write): (OwnedFd, OwnedFd) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            let child = Command::new(std::env::current_exe()?)
                .arg(crate::process::roles::GUARD_ARG)
                .arg(service)
                .arg(home)
                .arg(cache)
                .stdin(Stdio::from(read))
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .process_group(0)
                .spawn()?;
            Ok(Self {
                pipe: Some(std::fs::File::from(write)),
                child: Some(child),
            })
        };
        match spawn() {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!(
                    "no restore guard (a kill -9 now could leave the tree running): {e}"
                );
                None
            }
        }
    }

    /// The restore is over: the guard exits. Reaped on a thread, so the
    /// restore never waits for it.
    pub fn disarm(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(DISARM);
        }
        if let Some(mut c) = self.child.take() {
            let _ = std::thread::Builder::new()
                .name("guard-reaper".into())
                .spawn(move || c.wait());
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.end();
    }
}

/// The guard role: waits for warmer's word; without it, ends the leftovers
/// (only while it holds the service's run lock: a new `warmer run` that
/// already took over the service ends them itself, and its own processes
/// are never touched).
pub fn run(service: &str, home: &Path, cache: &Path) -> std::process::ExitCode {
    // A hangup or a terminal's signals are not warmer's death.
    for sig in [
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
    let mut heard = Vec::new();
    let mut buf = [0u8; 64];
    let mut stdin = std::io::stdin().lock();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                heard.extend_from_slice(&buf[..n]);
                if heard.windows(DISARM.len()).any(|w| w == DISARM) {
                    return std::process::ExitCode::SUCCESS;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // warmer died mid-restore. Its run lock goes with it, but the kernel
    // may close the pipe (waking us) a moment before the lock file: a lock
    // still held after LOCK_GRACE is a new run's, which ends leftovers
    // before it starts anything.
    let cache = match cache::Cache::open(cache) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warmer guard [{service}]: cannot open the cache: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let grace = Instant::now() + LOCK_GRACE;
    let lock = loop {
        match cache.lock_run(service) {
            Ok(l) => break l,
            Err(cache::Error::Locked { .. }) if Instant::now() < grace => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(cache::Error::Locked { .. }) => return std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("warmer guard [{service}]: cannot take the run lock: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    };
    // End CRIU and the tree, until none reappears (CRIU may fork a task
    // between two scans).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut quiet = 0;
    while quiet < 5 && Instant::now() < deadline {
        let ended = crate::process::leftovers::end(service, home);
        for l in &ended {
            eprintln!(
                "warmer guard [{service}]: warmer died mid-restore; ended pid {}: {}",
                l.pid, l.what
            );
        }
        quiet = if ended.is_empty() { quiet + 1 } else { 0 };
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(lock);
    std::process::ExitCode::SUCCESS
}
