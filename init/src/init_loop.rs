//! The loop of the namespace init: `SERVICE HOME -- PROGRAM [ARGS...]`.
//!
//! Compiled into the `warmer-init` binary and (by `#[path]`) into the warmer
//! library, for `warmer __init` when no `warmer-init` is installed. Depends on
//! std and libc only (see `main.rs` for why).

use std::ffi::{OsStr, OsString};
use std::io;
use std::process::Command;

/// Signals the init passes on to the service.
pub const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The init's arguments, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitArgs<'a> {
    pub service: &'a OsStr,
    /// The run directory the init moves its own cwd to.
    pub home: &'a OsStr,
    pub argv: Vec<OsString>,
}

/// `SERVICE HOME -- PROGRAM [ARGS...]` (see `warmer::roles::init_args`).
pub fn parse_args(args: &[OsString]) -> Result<InitArgs<'_>, &'static str> {
    const USAGE: &str = "usage: warmer-init SERVICE HOME -- PROGRAM [ARGS...]";
    match args {
        [service, home, sep, program, rest @ ..] if sep == "--" => {
            let mut argv = vec![program.clone()];
            argv.extend(rest.iter().cloned());
            Ok(InitArgs {
                service,
                home,
                argv,
            })
        }
        _ => Err(USAGE),
    }
}

/// The set of signals the init waits for: SIGCHLD and [`FORWARDED`].
pub fn wait_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// `warmer-init SERVICE HOME -- ARGV...`: the namespace init. Never returns.
///
/// The signals it waits for arrive blocked already (the spawner blocks them
/// before exec, so a SIGTERM sent before this code runs stays pending instead
/// of being dropped: PID 1 of a namespace ignores unblocked signals it has no
/// handler for). After starting the service (in the workdir it was given), the
/// init moves its own cwd to HOME, the service's run directory: CRIU's
/// parasite mounts a /proc for the namespace at `proc.crtools` relative to the
/// dump root's cwd, so that cwd must be writable and private to this service
/// (two services sharing a cwd could not be checkpointed at the same time).
pub fn run(args: &[OsString]) -> ! {
    let parsed = match parse_args(args) {
        Ok(p) => p,
        Err(usage) => {
            eprintln!("warmer-init: {usage}");
            std::process::exit(2);
        }
    };
    let set = wait_set();
    // SAFETY: sigprocmask with a valid, initialised set.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        eprintln!("warmer-init: sigprocmask: {}", io::Error::last_os_error());
        std::process::exit(127);
    }
    let mut cmd = Command::new(&parsed.argv[0]);
    cmd.args(&parsed.argv[1..]);
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
        Ok(c) => libc::pid_t::try_from(c.id()).unwrap_or(libc::pid_t::MAX),
        Err(e) => {
            eprintln!("warmer-init: cannot execute {:?}: {e}", parsed.argv[0]);
            std::process::exit(if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    if let Err(e) = std::env::set_current_dir(parsed.home) {
        eprintln!("warmer-init: cannot enter {:?}: {e}", parsed.home);
    }
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait with a valid set and out-pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue; // EINTR, e.g. around a checkpoint or restore
        }
        if sig != libc::SIGCHLD {
            // SAFETY: kill with plain integers.
            unsafe { libc::kill(child, sig) };
            continue;
        }
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid with a valid out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == child {
                if libc::WIFEXITED(status) {
                    std::process::exit(libc::WEXITSTATUS(status));
                }
                if libc::WIFSIGNALED(status) {
                    std::process::exit(128 + libc::WTERMSIG(status));
                }
            }
            // else: an orphan reaped
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let a: Vec<OsString> = ["web", "/run/warmer/web", "--", "/bin/app", "--x"]
            .iter()
            .map(OsString::from)
            .collect();
        let p = parse_args(&a).unwrap();
        assert_eq!(p.service, "web");
        assert_eq!(p.argv, vec![OsString::from("/bin/app"), "--x".into()]);
        assert!(parse_args(&a[..3]).is_err(), "no program");
        let no_sep: Vec<OsString> = ["web", "/h", "/bin/app"]
            .iter()
            .map(OsString::from)
            .collect();
        assert!(parse_args(&no_sep).is_err());
    }
}
