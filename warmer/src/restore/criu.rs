//! Step 3 of a restore: `criu restore` itself (and its lazy-pages daemon).
//!
//! CRIU restores the tree as our child (`--restore-sibling`), with the
//! service's stdout/stderr pipes swapped for fresh ones of ours
//! (`--inherit-fd`). Any failure leaves nothing running.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::unistd::Pid;

use crate::criu::{self, Criu, CriuError, Inherit, RestorePlan};

use crate::process::logs::Output;
use crate::process::service::Running;
use crate::process::service::StartKind;

#[derive(Debug, thiserror::Error)]
pub enum CriuRestoreError {
    #[error("cannot set up the restore")]
    Setup(#[source] std::io::Error),
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("criu restore succeeded but its pidfile {} is unreadable", path.display())]
    Pidfile { path: PathBuf },
    #[error("criu restore did not finish within {}; killed it and what it had restored (log: {})", humantime::format_duration(*after), log.display())]
    Timeout {
        after: std::time::Duration,
        log: PathBuf,
    },
    #[error("criu restore stopped: {why}")]
    Aborted { why: String },
    /// The image's pages could not be had while it was restored (a page
    /// server that gave up: `super::page_server`); the tree never ran.
    #[error("the image's pages cannot be had: {0}")]
    PagesLost(String),
}

/// When to give up on a restore while CRIU runs.
pub struct Watch<'a> {
    /// CRIU must be done by then.
    pub deadline: std::time::Duration,
    /// Polled while CRIU runs: a reason to stop now (a failed hash, a stop
    /// request). CRIU and whatever it restored so far are then killed.
    pub abort: &'a mut dyn FnMut() -> Option<String>,
}

/// How to restore.
#[derive(Clone, Default)]
pub struct RestoreOptions {
    /// Leave every task stopped until [`Running::resume`].
    pub leave_stopped: bool,
    /// Serve memory on demand from a `criu lazy-pages` daemon.
    pub lazy: bool,
    /// The daemon logs every page fault (verbosity 4) to learn the working
    /// set from ([`super::working_set`]).
    pub learn: bool,
    /// The image's page files are still arriving: the daemon asks warmer's
    /// page server ([`super::page_server`]) for what it does not have.
    pub pages: Option<std::sync::Arc<dyn super::page_server::Pages>>,
    /// The daemon holds the pages nobody asked for until the tree went
    /// [`BACKGROUND_IDLE_MS`] without a fault (a CRIU that can:
    /// [`crate::criu::QUIET_BACKGROUND`]).
    pub quiet_background: bool,
}

/// How long a lazily restored tree must go without a page fault before the
/// daemon sends the rest of its memory (and again after every fault; CRIU
/// sends it regardless 100 times as long after the restore). With the page
/// cache dropped, Debian's tomcat10 as its unit runs it, working set first,
/// 3 rounds each: 216 MB read and 247 ms to its first answer with the rest
/// sent at once, 119 MB and 186 ms held for 30 ms. Long enough to cover the
/// gaps between a starting service's faults (it waits on its files between
/// them), short enough that an idle service has its memory within a
/// fraction of a second.
pub const BACKGROUND_IDLE_MS: u32 = 30;

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("leave_stopped", &self.leave_stopped)
            .field("lazy", &self.lazy)
            .field("learn", &self.learn)
            .field("pages", &self.pages.is_some())
            .field("quiet_background", &self.quiet_background)
            .finish()
    }
}

/// What the page server and the restore share: the tree's root once
/// known, and why the page server gave up, if it did.
#[derive(Default)]
struct PageServerState {
    /// A pidfd of the tree's root (0: not known yet): a signal through it
    /// never reaches a process that reused the pid.
    root: std::sync::atomic::AtomicI32,
    failed: std::sync::Mutex<Option<String>>,
}

impl Drop for PageServerState {
    fn drop(&mut self) {
        let fd = *self.root.get_mut();
        if fd > 0 {
            // SAFETY: the pidfd was opened for this struct and is closed once.
            unsafe { libc::close(fd) };
        }
    }
}

/// The fds CRIU receives the new pipes on.
const STDOUT_FD: i32 = 3;
const STDERR_FD: i32 = 4;

/// Restores the image in `data_dir`. Returns the restored tree, not yet
/// probed; with `leave_stopped` every task of it is stopped until
/// [`Running::resume`]. State files (`state:`) must already be back in place
/// ([`crate::image::state::put_back`]). Used by warmer's restore and by the
/// bench's bare-CRIU baseline alike, so both run the same command line.
pub fn restore(
    criu: &Criu,
    data_dir: &Path,
    info: &crate::image::RestoreInfo,
    run_dir: &Path,
    opts: RestoreOptions,
    mut output: Output,
    watch: Watch<'_>,
) -> Result<(Running, CriuTimes), CriuRestoreError> {
    let mut times = CriuTimes::default();
    let pidfile = run_dir.join("restore.pid");
    // CRIU opens the pidfile O_EXCL.
    let _ = std::fs::remove_file(&pidfile);
    let log = run_dir.join("restore.log");
    let plan = RestorePlan {
        images_dir: data_dir.to_path_buf(),
        work_dir: run_dir.to_path_buf(),
        log_name: "restore.log".into(),
        pidfile: pidfile.clone(),
        inherit: vec![
            Inherit {
                fd: STDOUT_FD,
                resource: info.stdout.clone(),
            },
            Inherit {
                fd: STDERR_FD,
                resource: info.stderr.clone(),
            },
        ],
        tcp_established: info.tcp_established,
        leave_stopped: opts.leave_stopped,
        lazy_pages: opts.lazy,
    };
    let _ = std::fs::remove_file(run_dir.join(STATS_FILE));
    let served = std::sync::Arc::new(PageServerState::default());
    let mut lazy = if opts.lazy {
        let t = std::time::Instant::now();
        let server = opts.pages.clone().map(|p| (p, served.clone()));
        let idle = opts.quiet_background.then_some(BACKGROUND_IDLE_MS);
        let daemon = start_lazy_pages(
            criu,
            data_dir,
            run_dir,
            opts.learn,
            idle,
            watch.deadline,
            server,
        )?;
        times.lazy_start = Some(t.elapsed());
        Some(daemon)
    } else {
        None
    };
    // A sandboxed image: CRIU gets the host mounts it binds in, in a mount
    // namespace of its own, and the tree is held stopped until its /proc
    // is its own again (see `sandbox::restore`).
    let sources = match &info.external_mounts {
        Some(ext) => {
            let mut s = crate::sandbox::restore::Sources::new(run_dir, ext, &info.empty_tmpfs)
                .map_err(|e| {
                    CriuRestoreError::Setup(std::io::Error::other(crate::errors::chain(&e)))
                })?;
            s.scratch_tmp(&[&criu.bin, data_dir, run_dir]);
            Some(s)
        }
        None => None,
    };
    // Served pages: the tree is held stopped until it is known the page
    // server has not given up meanwhile.
    let held = sources.is_some() || opts.pages.is_some();
    let plan = RestorePlan {
        leave_stopped: plan.leave_stopped || held,
        // TCP repair needs CAP_NET_ADMIN over the host's network namespace,
        // which the restored tree's user namespace does not have: its
        // connections come back closed (as after a peer's reset), and the
        // dump's network locks are lifted below.
        tcp_established: plan.tcp_established && sources.is_none(),
        ..plan
    };
    let out_w = high(output.stdout.write_fd()).map_err(CriuRestoreError::Setup)?;
    let err_w = high(output.stderr.write_fd()).map_err(CriuRestoreError::Setup)?;
    let (out_raw, err_raw) = (out_w.as_fd().as_raw_fd(), err_w.as_fd().as_raw_fd());

    let mut cmd = criu.command();
    cmd.args(criu::restore_args(&plan))
        .args(sources.iter().flat_map(|s| s.args.iter()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(sources) = sources {
        // SAFETY: `enter` makes only async-signal-safe calls on memory
        // prepared above.
        unsafe {
            cmd.pre_exec(move || sources.enter());
        }
    }
    // SAFETY: dup2 is async-signal-safe; the fds are open in the parent and
    // copied into the child by fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(out_raw, STDOUT_FD) < 0 || libc::dup2(err_raw, STDERR_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (mut child, reader) = criu.spawn(&mut cmd)?;
    // Pages that cannot be had while CRIU still runs (the tree not yet its
    // own, so the page server could not end it): CRIU is stopped at once,
    // not left waiting on them until its deadline.
    let lost = || {
        served
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    };
    let criu_pid = child.id();
    let bin = std::fs::canonicalize(&criu.bin).unwrap_or_else(|_| criu.bin.clone());
    // What CRIU maps, once its loader is done: read every 10 ms until two
    // reads agree (its libraries are all mapped within its first few ms).
    let spawned = std::time::Instant::now();
    let (mut looked, mut settled) = (std::time::Duration::ZERO, false);
    // A sandboxed tree's /proc is made while CRIU still finishes: CRIU
    // writes its pidfile once the tree's namespaces are final (its mounts
    // made read-only again, its root yard emptied), 3-4 ms before it exits
    // (it still detaches from every task), and the tree stays stopped
    // until warmer resumes it.
    let sandboxed = info.external_mounts.is_some();
    let mut early: Option<(i32, std::io::Result<()>)> = None;
    let mut abort = || {
        if sandboxed && early.is_none() {
            // The tree's root is our child (`--restore-sibling`): nothing
            // else is touched, whatever the file says.
            if let Some(pid) = read_pid(&pidfile).filter(|p| {
                u32::try_from(*p).ok().and_then(crate::process::parent_of)
                    == Some(std::process::id())
            }) {
                let made = crate::sandbox::restore::remount_proc(pid, &info.read_only_mounts);
                early = Some((pid, made));
            }
        }
        let now = spawned.elapsed();
        if !settled && now >= looked + std::time::Duration::from_millis(10) {
            looked = now;
            if let Some(files) = mapped_files(criu_pid, &bin).filter(|f| f.len() > 2) {
                settled = files == times.criu_files;
                times.criu_files = files;
            }
        }
        lost()
            .map(|why| format!("the image's pages cannot be had: {why}"))
            .or_else(|| (watch.abort)())
    };
    let waited = criu::wait_child(&mut child, Some(watch.deadline), &mut abort);
    drop(out_w);
    drop(err_w);
    // The restored service holds its own copies of the write ends now.
    output.close_write();
    let interrupted = |e: CriuRestoreError| {
        // CRIU is gone; what it restored so far is re-parented to us.
        let n = criu::kill_children();
        if n > 0 {
            tracing::warn!("killed {n} processes the interrupted restore left");
        }
        let _ = std::fs::remove_file(&pidfile);
        if info.tcp_established {
            criu::clear_network_locks(&image_conns(data_dir));
        }
        e
    };
    let status = match waited {
        Ok(st) => st,
        Err(criu::Interrupted::Io(source)) => {
            return Err(interrupted(
                CriuError::Spawn {
                    bin: criu.bin.clone(),
                    source,
                }
                .into(),
            ))
        }
        Err(criu::Interrupted::Timeout(after)) => {
            return Err(interrupted(CriuRestoreError::Timeout { after, log }))
        }
        Err(criu::Interrupted::Aborted(why)) => {
            return Err(interrupted(match lost() {
                Some(lost) => CriuRestoreError::PagesLost(lost),
                None => CriuRestoreError::Aborted { why },
            }))
        }
    };
    // CRIU's stderr is read for a failure's message only. On success the
    // reader is left to end by itself: a sandboxed restore's user namespace
    // helper, a fork of CRIU, keeps the pipe open ~1 ms after CRIU exits
    // (it removes the namespace's root yard), and the tree waits on nothing
    // of it.
    if !status.success() {
        let stderr = reader.join().unwrap_or_default();
        let _ = std::fs::remove_file(&pidfile);
        if let Some(mut daemon) = lazy.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        if info.tcp_established {
            let n = criu::clear_network_locks(&image_conns(data_dir));
            if n > 0 {
                tracing::warn!("removed {n} network-lock rules the failed restore left");
            }
        }
        return Err(CriuError::Failed {
            action: "restore",
            status,
            tail: criu::log_tail(&log, &stderr),
            log,
        }
        .into());
    }
    let pid = read_pid(&pidfile).ok_or(CriuRestoreError::Pidfile {
        path: pidfile.clone(),
    })?;
    let _ = std::fs::remove_file(&pidfile);
    if sandboxed {
        let made = match early {
            Some((p, made)) if p == pid => made,
            _ => crate::sandbox::restore::remount_proc(pid, &info.read_only_mounts),
        };
        if let Err(e) = made {
            // Never resumed: the tree ends with its init.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
            if let Some(mut daemon) = lazy.take() {
                let _ = daemon.kill();
                let _ = daemon.wait();
            }
            return Err(CriuRestoreError::Setup(e));
        }
    }
    if info.external_mounts.is_some() && info.tcp_established {
        criu::clear_network_locks(&image_conns(data_dir));
    }
    if opts.pages.is_some() {
        let fd = u32::try_from(pid).ok().and_then(criu::pidfd_open);
        served.root.store(
            fd.map_or(-1, std::os::fd::IntoRawFd::into_raw_fd),
            std::sync::atomic::Ordering::SeqCst,
        );
    }
    let gave_up = served
        .failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(why) = gave_up {
        // Never resumed: the tree ends with its init.
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        if let Some(mut daemon) = lazy.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        return Err(CriuRestoreError::PagesLost(why));
    }
    let mut running = Running::new(Pid::from_raw(pid), output, StartKind::Restored);
    if held && !opts.leave_stopped {
        running.resume();
    }
    if let Some(daemon) = lazy {
        running.set_lazy_pages(daemon);
    }
    times.stats = crate::image::criu::read_one::<crate::image::criu::proto::StatsEntry>(
        &run_dir.join(STATS_FILE),
    )
    .ok()
    .and_then(|s| s.restore);
    Ok((running, times))
}

/// The longest a lazy-pages daemon is given to start listening.
const LAZY_START_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Where CRIU writes its restore statistics (in its work directory).
const STATS_FILE: &str = "stats-restore";

/// What a restore's CRIU side cost, beside its wall time.
#[derive(Debug, Clone, Default)]
pub struct CriuTimes {
    /// Starting `criu lazy-pages` until it listened.
    pub lazy_start: Option<std::time::Duration>,
    /// CRIU's own statistics: `forking_time` and `restore_time` (µs),
    /// pages restored.
    pub stats: Option<crate::image::criu::proto::RestoreStatsEntry>,
    /// The files `criu restore` itself maps (its binary, its loader and
    /// libraries), seen while it ran: what a restore after a boot asks the
    /// disk for first ([`super::readahead`]).
    pub criu_files: Vec<String>,
}

/// The files process `pid` maps, in the order of its mappings, if it runs
/// `bin` (a child between fork and exec still maps its parent's).
fn mapped_files(pid: u32, bin: &Path) -> Option<Vec<String>> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    if std::fs::read_link(proc.join("exe")).ok()? != bin {
        return None;
    }
    let maps = std::fs::read_to_string(proc.join("maps")).ok()?;
    let mut out: Vec<String> = Vec::new();
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        if path.starts_with('/') && !out.iter().any(|p| p == path) {
            out.push(path.to_string());
        }
    }
    Some(out)
}

/// The pid CRIU wrote to `pidfile` (none while it is not there or only
/// partly written).
fn read_pid(pidfile: &Path) -> Option<i32> {
    let s = std::fs::read_to_string(pidfile).ok()?;
    s.trim().parse().ok().filter(|p| *p > 0)
}

/// The connections the image holds: those a failed restore may have locked.
fn image_conns(data_dir: &Path) -> Vec<criu::Conn> {
    crate::image::criu::tcp_connections(data_dir).unwrap_or_default()
}

/// Moves `fd` above the numbers children get their fds on, so the dup2s in
/// a child cannot clobber each other.
fn high(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// The fd `criu lazy-pages` reports readiness on.
const STATUS_FD: i32 = 3;
/// The fd `criu lazy-pages` asks a page server of ours for pages on.
const PS_FD: i32 = 4;

/// Starts `criu lazy-pages` for the image and waits until it listens (a
/// restore that connects earlier fails: `connect to lazy-pages.socket failed`).
fn start_lazy_pages(
    criu: &Criu,
    data_dir: &Path,
    run_dir: &Path,
    learn: bool,
    bg_idle_ms: Option<u32>,
    limit: std::time::Duration,
    server: Option<(
        std::sync::Arc<dyn super::page_server::Pages>,
        std::sync::Arc<PageServerState>,
    )>,
) -> Result<std::process::Child, CriuRestoreError> {
    // A socket left by an earlier daemon makes the next restore fail.
    let _ = std::fs::remove_file(run_dir.join("lazy-pages.socket"));
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| CriuRestoreError::Setup(e.into()))?;
    let w = high(w.as_fd()).map_err(CriuRestoreError::Setup)?;
    let w_raw = w.as_raw_fd();
    let log = run_dir.join(criu::LAZY_PAGES_LOG);
    let mut cmd = criu.command();
    cmd.args(criu::lazy_pages_args(
        data_dir, run_dir, STATUS_FD, bg_idle_ms,
    ))
    .args(learn.then_some("-v4"))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // A page server of ours: a socket pair, not a port anyone could ask.
    let pair = match &server {
        Some(_) => Some(std::os::unix::net::UnixStream::pair().map_err(CriuRestoreError::Setup)?),
        None => None,
    };
    let ps_raw = pair.as_ref().map_or(-1, |(_, theirs)| theirs.as_raw_fd());
    if pair.is_some() {
        cmd.args(["--page-server", "--ps-socket", &PS_FD.to_string()]);
    }
    // SAFETY: dup2 is async-signal-safe; the fd is open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(w_raw, STATUS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if ps_raw >= 0 && libc::dup2(ps_raw, PS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| CriuError::Spawn {
        bin: criu.bin.clone(),
        source,
    })?;
    drop(w);
    if let (Some((ours, theirs)), Some((pages, served))) = (pair, server) {
        drop(theirs);
        let images = data_dir.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || {
                let mut give_up = |why: &str| {
                    // The tree first: its faults wait on this answer; once
                    // the daemon is gone they would see zeros.
                    *served.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(why.to_string());
                    let root = served.root.load(std::sync::atomic::Ordering::SeqCst);
                    if root > 0 {
                        // SAFETY: pidfd_send_signal on a pidfd we own.
                        unsafe {
                            libc::syscall(
                                libc::SYS_pidfd_send_signal,
                                root,
                                libc::SIGKILL,
                                std::ptr::null::<libc::siginfo_t>(),
                                0,
                            )
                        };
                    }
                    tracing::error!(
                        "the image's pages cannot be had ({why}): the restored service is killed"
                    );
                };
                if let Err(why) = super::page_server::serve(&images, ours, &*pages, &mut give_up) {
                    tracing::debug!("page server ended: {why}");
                }
            });
        if let Err(e) = spawned {
            let _ = child.kill();
            let _ = child.wait();
            return Err(CriuRestoreError::Setup(e));
        }
    }
    let mut fds = [nix::poll::PollFd::new(
        r.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    // Bounded by the restore's own deadline (and 10 s at most: a daemon
    // that has not listened by then never will).
    let wait_ms = u16::try_from(limit.min(LAZY_START_MAX).as_millis()).unwrap_or(u16::MAX);
    let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(wait_ms)).unwrap_or(0) > 0
        && nix::unistd::read(&r, &mut [0u8; 1]).is_ok_and(|n| n == 1);
    if !ready {
        let _ = child.kill();
        let status = child.wait().map_err(CriuRestoreError::Setup)?;
        return Err(CriuError::Failed {
            action: "lazy-pages",
            status,
            tail: criu::log_tail(&log, b""),
            log,
        }
        .into());
    }
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pidfile_and_a_parent_are_read_as_criu_and_the_kernel_write_them() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("restore.pid");
        assert_eq!(read_pid(&f), None, "not there yet");
        std::fs::write(&f, "").unwrap();
        assert_eq!(read_pid(&f), None, "created, not written yet");
        std::fs::write(&f, "4242").unwrap();
        assert_eq!(read_pid(&f), Some(4242));
        std::fs::write(&f, "0").unwrap();
        assert_eq!(read_pid(&f), None);
        use crate::process::parent_of;
        let me = std::process::id();
        assert_eq!(parent_of(me), Some(std::os::unix::process::parent_id()));
        let mut c = std::process::Command::new("/bin/sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let child = c.id();
        assert_eq!(parent_of(child), Some(std::process::id()));
        c.kill().unwrap();
        c.wait().unwrap();
        assert_eq!(parent_of(child), None, "reaped");
    }

    #[test]
    fn the_files_a_process_maps_are_read_only_once_it_runs_the_binary() {
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        let files = mapped_files(std::process::id(), &me).unwrap();
        assert_eq!(files.first(), Some(&me.display().to_string()), "{files:?}");
        assert!(files.iter().all(|f| f.starts_with('/')));
        let unique: std::collections::BTreeSet<_> = files.iter().collect();
        assert_eq!(unique.len(), files.len(), "each once: {files:?}");
        assert_eq!(
            mapped_files(std::process::id(), Path::new("/usr/sbin/criu")),
            None
        );
    }
}
