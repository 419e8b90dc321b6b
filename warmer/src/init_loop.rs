//! The loop of the namespace init: `SERVICE HOME -- PROGRAM [ARGS...]`.
//!
//! Compiled into the `warmer-init` binary (by `#[path]`, so that binary does
//! not depend on the rest of the library and stays byte-identical across
//! changes to warmer) and into the library, for `warmer __init` when no
//! `warmer-init` is installed. Depends on std, nix and libc only.

use std::ffi::OsString;
use std::io;
use std::process::Command;

use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Signals the init passes on to the service.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// `warmer-init SERVICE HOME -- ARGV...`: the namespace init. Never returns.
///
/// After starting the service (in the workdir it was given), the init moves
/// its own cwd to HOME, the service's run directory: CRIU's parasite mounts a
/// /proc for the namespace at `proc.crtools` relative to the dump root's cwd,
/// so that cwd must be writable and private to this service (two services
/// sharing a cwd could not be checkpointed at the same time).
pub fn run(args: &[OsString]) -> ! {
    let argv: Vec<&OsString> = args
        .iter()
        .skip_while(|a| a.as_os_str() != "--")
        .skip(1)
        .collect();
    if argv.is_empty() || args.len() < 3 {
        eprintln!("warmer-init: usage: warmer-init SERVICE HOME -- PROGRAM [ARGS...]");
        std::process::exit(2);
    }
    let home = &args[1];
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    for s in FORWARDED {
        mask.add(s);
    }
    if let Err(e) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None) {
        eprintln!("warmer-init: sigprocmask: {e}");
        std::process::exit(127);
    }
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    // SAFETY: sigprocmask and signal are async-signal-safe. The service must
    // not inherit the init's blocked mask or Rust's ignored SIGPIPE.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => Pid::from_raw(i32::try_from(c.id()).unwrap_or(i32::MAX)),
        Err(e) => {
            eprintln!("warmer-init: cannot execute {:?}: {e}", argv[0]);
            std::process::exit(if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    if let Err(e) = std::env::set_current_dir(home) {
        eprintln!("warmer-init: cannot enter {home:?}: {e}");
    }
    loop {
        let sig = match mask.wait() {
            Ok(s) => s,
            Err(_) => continue, // EINTR, e.g. around a checkpoint or restore
        };
        if sig != Signal::SIGCHLD {
            let _ = kill(child, sig);
            continue;
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => std::process::exit(code),
                Ok(WaitStatus::Signaled(pid, s, _)) if pid == child => {
                    std::process::exit(128 + s as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue, // an orphan reaped
            }
        }
    }
}
