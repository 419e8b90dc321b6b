//! The service's own PID namespace and its tiny init.
//!
//! Every service runs as
//!
//! ```text
//! warmer run web                 (outer namespace; subreaper; supervisor)
//!  └─ warmer-init  [pid 1]       new PID namespace, session leader: the dump root
//!      └─ the service [pid 2]    and whatever it forks
//! ```
//!
//! Why: a checkpoint of a tree that lives in its own PID namespace restores
//! with the same inner PIDs no matter which outer PIDs are taken (after a
//! reboot the originals usually are: `Can't fork for 59: File exists`).
//! CRIU wants the dump root to be a session leader, hence `setsid` inside.
//!
//! PID 1 of a namespace ignores signals it has no handler for, so the init
//! (`src/bin/warmer-init.rs`) forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT,
//! SIGUSR1 and SIGUSR2 to the service, reaps orphans, and exits with the
//! service's status (128+N when it died of signal N). When it exits the
//! kernel kills the rest of the namespace: nothing of the service outlives it.
//! It blocks signals and waits with `sigwait` (no handlers, no threads): state
//! CRIU restores exactly. It is its own small binary, independent of this
//! library, so that changes to warmer do not change it (its hash is part of
//! every digest).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sys::wait::waitpid;
use nix::unistd::Pid;

/// The init's file name; it is installed next to `warmer`.
pub const INIT_BIN: &str = "warmer-init";

/// The program that runs as a service's namespace init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitExe {
    pub path: PathBuf,
    /// Arguments before SERVICE: `["__init"]` when `warmer` itself serves.
    pub prefix: Vec<String>,
}

/// `warmer-init` next to the running `warmer`, else on `PATH`. Without one
/// (`cargo run` builds only `warmer`), `warmer __init` serves instead: it
/// works the same, but its images then depend on the whole `warmer` binary.
pub fn locate() -> io::Result<InitExe> {
    let found = find()?;
    // Root executes it in every service's namespace: only a binary no one
    // but root (or warmer's user) could have written, up to `/`.
    cache::fsutil::check_trusted(&found.path, nix::unistd::geteuid().as_raw()).map_err(|why| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing to run {}: {why}", found.path.display()),
        )
    })?;
    Ok(found)
}

fn find() -> io::Result<InitExe> {
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name(INIT_BIN);
    let on_path = || {
        std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(INIT_BIN))
            .find(|p| p.is_file())
    };
    if beside.is_file() {
        return Ok(InitExe {
            path: beside,
            prefix: Vec::new(),
        });
    }
    if let Some(path) = on_path() {
        return Ok(InitExe {
            path,
            prefix: Vec::new(),
        });
    }
    tracing::warn!(
        "{INIT_BIN} not found next to {} or on PATH: using warmer itself as the init",
        exe.display()
    );
    Ok(InitExe {
        path: exe,
        prefix: vec![INIT_ARG.to_string()],
    })
}

pub use crate::process::roles::INIT_ARG;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("argument or environment entry contains a NUL byte: {0:?}")]
    Nul(OsString),
    #[error("cannot create the service's PID namespace")]
    Clone(#[source] io::Error),
    #[error("cannot start {} in the new namespace", exe)]
    Exec {
        exe: String,
        #[source]
        source: io::Error,
    },
    #[error("pipe")]
    Pipe(#[source] io::Error),
    #[error("cannot map the service's user namespace")]
    Map(#[source] io::Error),
    #[error("cannot enter the manifest's workdir {}", dir.display())]
    Workdir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare the service's process ({step})")]
    Setup {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Steps of [`child_exec`] a failure is reported for.
const STEP_WORKDIR: i32 = 4;
const STEP_EXEC: i32 = 6;

/// What goes into the new namespace.
pub struct InitSpec<'a> {
    /// The init program.
    pub init: &'a InitExe,
    pub service: &'a str,
    /// The init's own cwd once the service runs (see `main`).
    pub home: &'a Path,
    pub argv: &'a [String],
    pub env: &'a [(OsString, OsString)],
    pub workdir: Option<&'a Path>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
    /// Its user, credentials and namespaces (see [`crate::sandbox`]).
    pub sandbox: Option<&'a crate::sandbox::Prepared>,
}

fn cstring(s: &OsStr) -> Result<CString, SpawnError> {
    CString::new(s.as_bytes()).map_err(|_| SpawnError::Nul(s.to_os_string()))
}

/// Starts `warmer-init SERVICE HOME -- ARGV` as PID 1 of a new PID namespace, in its own
/// session, with stdout/stderr on the given fds and stdin on /dev/null.
/// Returns its PID as seen from here. It is our child.
pub fn spawn(spec: &InitSpec<'_>) -> Result<Pid, SpawnError> {
    // Everything the child touches is prepared here: between clone and exec the
    // child may only make async-signal-safe calls (no allocation; other threads'
    // locks may be held in its copy of memory).
    let exe = cstring(spec.init.path.as_os_str())?;
    let mut args = vec![cstring(OsStr::new(INIT_BIN))?];
    for a in crate::process::roles::init_args(&spec.init.prefix, spec.service, spec.home, spec.argv)
    {
        args.push(cstring(&a)?);
    }
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let env: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            cstring(&kv)
        })
        .collect::<Result<_, _>>()?;
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let workdir = spec.workdir.map(|w| cstring(w.as_os_str())).transpose()?;
    let devnull = std::fs::File::open("/dev/null").map_err(SpawnError::Pipe)?;
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Pipe(e.into()))?;
    let (null_fd, out_fd, err_fd, report_fd) = (
        devnull.as_raw_fd(),
        spec.stdout.as_raw_fd(),
        spec.stderr.as_raw_fd(),
        err_w.as_raw_fd(),
    );

    let pid = match spec.sandbox {
        None => {
            // SAFETY: clone(2) without a new stack behaves like fork(2): the
            // child gets a copy of this thread only. It runs `child_exec`,
            // which makes only async-signal-safe calls on memory prepared
            // above, and never returns.
            let ret = unsafe { fork_with(libc::CLONE_NEWPID) };
            if ret == 0 {
                // SAFETY: see above; we are the child and exec or _exit.
                unsafe {
                    child_exec(
                        &exe,
                        &argv,
                        &envp,
                        workdir.as_ref(),
                        [null_fd, out_fd, err_fd],
                        report_fd,
                    )
                }
            }
            if ret < 0 {
                return Err(SpawnError::Clone(io::Error::last_os_error()));
            }
            Pid::from_raw(i32::try_from(ret).expect("pid fits in i32"))
        }
        Some(sb) => {
            let pipe = || {
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                    .map_err(|e| SpawnError::Pipe(e.into()))
            };
            let ((up_r, up_w), (down_r, down_w)) = (pipe()?, pipe()?);
            let (up_raw, down_raw) = (up_w.as_raw_fd(), down_r.as_raw_fd());
            // SAFETY: as above; stage 1 and 2 make only async-signal-safe
            // calls on memory prepared before the clone.
            let ret = unsafe { fork_with(libc::CLONE_NEWNS) };
            if ret == 0 {
                // SAFETY: see above. /dev/null is opened inside (-1): one
                // of the host's mounts would not be in the image's.
                unsafe {
                    crate::sandbox::child::stage1(sb, up_raw, down_raw, report_fd);
                    child_exec(
                        &exe,
                        &argv,
                        &envp,
                        workdir.as_ref(),
                        [-1, out_fd, err_fd],
                        report_fd,
                    )
                }
            }
            if ret < 0 {
                return Err(SpawnError::Clone(io::Error::last_os_error()));
            }
            let stage1 = Pid::from_raw(i32::try_from(ret).expect("pid fits in i32"));
            drop(up_w);
            drop(down_r);
            let mut byte = [0u8; 1];
            let mut init = None;
            if read_full(&up_r, &mut byte) == 1 {
                if let Err(e) = map_user_namespace(stage1) {
                    let _ = nix::sys::signal::kill(stage1, nix::sys::signal::Signal::SIGKILL);
                    let _ = waitpid(stage1, None);
                    return Err(SpawnError::Map(e));
                }
                let _ = nix::unistd::write(&down_w, &[1]);
                let mut pid = [0u8; 4];
                if read_full(&up_r, &mut pid) == 4 {
                    init = Some(Pid::from_raw(i32::from_ne_bytes(pid)));
                }
            }
            let _ = waitpid(stage1, None);
            match init {
                Some(pid) => pid,
                // Stage 1 failed: its report says where.
                None => stage1,
            }
        }
    };
    drop(err_w);
    // The child reports an exec failure as an errno on the CLOEXEC pipe; EOF
    // means exec succeeded.
    let mut buf = [0u8; 8];
    let n = read_full(&err_r, &mut buf);
    if n == 8 {
        let _ = waitpid(pid, None);
        let step = i32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let source =
            io::Error::from_raw_os_error(i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]));
        return Err(match (step, spec.workdir) {
            (STEP_WORKDIR, Some(dir)) => SpawnError::Workdir {
                dir: dir.to_path_buf(),
                source,
            },
            (STEP_EXEC, _) => SpawnError::Exec {
                exe: spec.init.path.display().to_string(),
                source,
            },
            _ => SpawnError::Setup {
                step: crate::sandbox::child::step_name(step),
                source,
            },
        });
    }
    Ok(pid)
}

/// `clone(2)` without a new stack: fork(2) with namespace `flags`.
///
/// # Safety
/// As fork(2) in a threaded program: the child may only make
/// async-signal-safe calls until it execs or exits.
unsafe fn fork_with(flags: libc::c_int) -> libc::c_long {
    // SAFETY: the caller's contract.
    unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags | libc::SIGCHLD,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            0usize,
        )
    }
}

/// Maps every id of the user namespace of `pid` to itself, so files and
/// owners look as on the host; root outside, who created it, holds every
/// capability over it (see [`crate::sandbox`]).
fn map_user_namespace(pid: Pid) -> io::Result<()> {
    for map in ["uid_map", "gid_map"] {
        std::fs::write(format!("/proc/{pid}/{map}"), "0 0 4294967295\n")?;
    }
    Ok(())
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    got
}

/// `close_range(2)` flag: mark the range close-on-exec instead of closing it.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// The child's side of [`spawn`].
///
/// # Safety
/// Must only be called in a freshly cloned child; never returns.
unsafe fn child_exec(
    exe: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    workdir: Option<&CString>,
    stdio: [i32; 3],
    report: i32,
) -> ! {
    // SAFETY: all calls below are async-signal-safe syscalls on valid
    // pointers prepared by the parent; the function ends in execve or _exit.
    unsafe {
        // Reports (step, errno) on the CLOEXEC pipe: which step failed
        // matters (a missing workdir is not a missing warmer-init).
        let fail = |report: i32, step: i32| -> ! { crate::sandbox::child::fail(report, step) };
        if libc::setsid() < 0 {
            fail(report, 1);
        }
        // If warmer dies (even by SIGKILL), the kernel kills this init and so
        // the whole namespace: a service never outlives its supervisor. CRIU
        // keeps the setting across checkpoint/restore, and a restored init is
        // warmer's child too (--restore-sibling), so it holds after restore.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
            fail(report, 2);
        }
        let mut stdio = stdio;
        if stdio[0] < 0 {
            stdio[0] = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if stdio[0] < 0 {
                fail(report, 3);
            }
        }
        for (target, fd) in stdio.iter().enumerate() {
            let target = i32::try_from(target).unwrap_or(0);
            if libc::dup2(*fd, target) < 0 {
                fail(report, 3);
            }
        }
        if let Some(w) = workdir {
            if libc::chdir(w.as_ptr()) < 0 {
                fail(report, 4);
            }
        }
        // Only what is passed on purpose crosses into the service (and so
        // into its images): every other fd of ours is closed at exec, as
        // systemd does for its services. CLOEXEC rather than close, so the
        // exec-error pipe still works until the exec.
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) < 0 {
            fail(report, 5);
        }
        // The init's signals arrive blocked (it sigwaits for them): a
        // SIGTERM sent before it runs stays pending instead of being dropped
        // (PID 1 of a namespace ignores unblocked signals it has no handler for).
        let set = crate::process::init_loop::wait_set();
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(report, 6)
    }
}
