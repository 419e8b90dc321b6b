//! CRIU's command lines, planned by pure functions and unit-tested without
//! root (as the runc crate of containerd/rust-extensions does for runc).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// What to checkpoint and where.
#[derive(Debug, Clone)]
pub struct DumpPlan {
    /// The root of the tree: the service's namespace init, a session leader.
    pub pid: i32,
    pub images_dir: PathBuf,
    /// Logs and stats go here, never into the image directory.
    pub work_dir: PathBuf,
    pub log_name: String,
    pub tcp_established: bool,
    /// Keep the tree running after the dump (else CRIU ends it: persist
    /// mode's stop-time checkpoint).
    pub leave_running: bool,
    /// Run at CRIU's action points (`--action-script`), e.g. to capture state
    /// files at `post-dump` while the tree is still frozen.
    pub action_script: Option<String>,
    /// Mounts of the tree's namespace bound from the host (see
    /// `sandbox::mounts`): `--external mnt[PATH]:PATH` each.
    pub external_mounts: Vec<PathBuf>,
}

/// Options used for both dump and restore, so the two always agree.
fn common_args(work_dir: &Path, log_name: &str, tcp_established: bool) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--work-dir".into(),
        work_dir.into(),
        "--log-file".into(),
        log_name.into(),
        // flock/fcntl locks are common (pidfiles, sqlite): dump and restore them.
        "--file-locks".into(),
    ];
    if tcp_established {
        a.push("--tcp-established".into());
    }
    a
}

/// `criu dump` for a service that must keep running.
pub fn dump_args(plan: &DumpPlan) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "dump".into(),
        "--tree".into(),
        plan.pid.to_string().into(),
        "--images-dir".into(),
        plan.images_dir.clone().into(),
    ];
    if plan.leave_running {
        // The checkpoint happens while the service serves: it must go on.
        a.push("--leave-running".into());
    }
    a.extend(common_args(
        &plan.work_dir,
        &plan.log_name,
        plan.tcp_established,
    ));
    if let Some(script) = &plan.action_script {
        a.push("--action-script".into());
        a.push(script.into());
    }
    // A connection still in a listening socket's queue (handshake done or
    // under way, not yet accept()ed) is left out of the image: after a
    // restore its client sees a reset and connects again, as after any
    // restart. Without this a dump taken while clients connect fails
    // ("In-flight connection") and the next start is cold. The running
    // service (a ready-time dump) keeps and accepts it as usual.
    a.push("--skip-in-flight".into());
    for m in &plan.external_mounts {
        a.extend(external_mount(m, m));
    }
    a
}

/// `--external mnt[KEY]:SOURCE`: at dump the mount at KEY is external
/// (SOURCE names it in the image); at restore it is bound from SOURCE.
pub fn external_mount(key: &Path, source: &Path) -> [OsString; 2] {
    let mut e = OsString::from("mnt[");
    e.push(key.as_os_str());
    e.push("]:");
    e.push(source.as_os_str());
    ["--external".into(), e]
}

/// One pipe of the image to be replaced by a live fd passed to CRIU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inherit {
    /// The fd number in CRIU's own fd table.
    pub fd: i32,
    /// As `readlink /proc/PID/fd/N` showed it at dump: `pipe:[126119]`.
    pub resource: String,
}

/// What to restore and how.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub images_dir: PathBuf,
    pub work_dir: PathBuf,
    pub log_name: String,
    pub pidfile: PathBuf,
    pub inherit: Vec<Inherit>,
    pub tcp_established: bool,
    /// Leave the tree SIGSTOPped (`--leave-stopped`): warmer resumes it once
    /// the image's checksums are confirmed.
    pub leave_stopped: bool,
    /// Memory comes from a running `criu lazy-pages` (`--lazy-pages`).
    pub lazy_pages: bool,
}

/// `criu restore` that leaves the tree running as the caller's child:
/// `--restore-detached --restore-sibling` makes the restored root a sibling of
/// CRIU, i.e. warmer's child, instead of an orphan of PID 1 (which does not
/// reap it on these machines).
pub fn restore_args(plan: &RestorePlan) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "restore".into(),
        "--images-dir".into(),
        plan.images_dir.clone().into(),
        "--restore-detached".into(),
        "--restore-sibling".into(),
        "--pidfile".into(),
        plan.pidfile.clone().into(),
    ];
    a.extend(common_args(
        &plan.work_dir,
        &plan.log_name,
        plan.tcp_established,
    ));
    for i in &plan.inherit {
        a.push("--inherit-fd".into());
        a.push(format!("fd[{}]:{}", i.fd, i.resource).into());
    }
    if !plan.tcp_established {
        // Without --tcp-established a dump refuses every live connection,
        // so any connected socket in such an image was already closed (a
        // peer's reset, as a tcp probe ends): restore it closed, as it was.
        a.push("--tcp-close".into());
    }
    if plan.leave_stopped {
        a.push("--leave-stopped".into());
    }
    if plan.lazy_pages {
        a.push("--lazy-pages".into());
    }
    a
}

/// The lazy-pages daemon's log, in its work directory.
pub const LAZY_PAGES_LOG: &str = "lazy-pages.log";

/// `criu lazy-pages`: serves the image's pages to a `--lazy-pages` restore
/// over `lazy-pages.socket` in the work dir, reporting on `status_fd` once it
/// listens. `bg_idle_ms`: it holds the pages nobody asked for until the tree
/// went that long without a fault (a CRIU with `--feature lazy-bg-idle`:
/// [`super::QUIET_BACKGROUND`]).
pub fn lazy_pages_args(
    images_dir: &Path,
    work_dir: &Path,
    status_fd: i32,
    bg_idle_ms: Option<u32>,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "lazy-pages".into(),
        "--images-dir".into(),
        images_dir.into(),
        "--work-dir".into(),
        work_dir.into(),
        "--log-file".into(),
        LAZY_PAGES_LOG.into(),
        "--status-fd".into(),
        status_fd.to_string().into(),
    ];
    if let Some(ms) = bg_idle_ms {
        a.push("--lazy-bg-idle".into());
        a.push(ms.to_string().into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(a: &[OsString]) -> Vec<String> {
        a.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn dump_keeps_the_service_running_and_logs_outside_the_image() {
        let a = strs(&dump_args(&DumpPlan {
            pid: 42,
            images_dir: "/c/tmp/s/data".into(),
            work_dir: "/run/warmer/web".into(),
            log_name: "dump.log".into(),
            tcp_established: false,
            leave_running: true,
            action_script: Some("/usr/bin/warmer".into()),
            external_mounts: Vec::new(),
        }));
        assert!(a
            .windows(2)
            .any(|w| w == ["--action-script", "/usr/bin/warmer"]));
        assert_eq!(a[..3], ["dump", "--tree", "42"]);
        assert!(a.contains(&"--leave-running".to_string()));
        let w = a.iter().position(|x| x == "--work-dir").unwrap();
        assert_eq!(a[w + 1], "/run/warmer/web");
        assert!(!a.contains(&"--tcp-established".to_string()));
        assert!(a.contains(&"--skip-in-flight".to_string()));
    }

    #[test]
    fn the_lazy_daemon_holds_the_background_only_when_asked() {
        let plain = strs(&lazy_pages_args(
            Path::new("/img"),
            Path::new("/run/w"),
            3,
            None,
        ));
        assert_eq!(plain[0], "lazy-pages");
        assert!(!plain.iter().any(|a| a == "--lazy-bg-idle"));
        let quiet = strs(&lazy_pages_args(
            Path::new("/img"),
            Path::new("/run/w"),
            3,
            Some(30),
        ));
        assert!(quiet.windows(2).any(|w| w == ["--lazy-bg-idle", "30"]));
        assert!(quiet.windows(2).any(|w| w == ["--status-fd", "3"]));
    }

    #[test]
    fn restore_is_a_sibling_with_inherited_pipes() {
        let a = strs(&restore_args(&RestorePlan {
            images_dir: "/c/entries/d/data".into(),
            work_dir: "/run/warmer/web".into(),
            log_name: "restore.log".into(),
            pidfile: "/run/warmer/web/restore.pid".into(),
            inherit: vec![
                Inherit {
                    fd: 3,
                    resource: "pipe:[11]".into(),
                },
                Inherit {
                    fd: 4,
                    resource: "pipe:[12]".into(),
                },
            ],
            tcp_established: true,
            leave_stopped: true,
            lazy_pages: true,
        }));
        assert!(a.contains(&"--lazy-pages".to_string()));
        assert_eq!(a[0], "restore");
        assert!(a.contains(&"--leave-stopped".to_string()));
        assert!(a.contains(&"--restore-detached".to_string()));
        assert!(a.contains(&"--restore-sibling".to_string()));
        assert!(a.contains(&"--tcp-established".to_string()));
        assert!(!a.contains(&"--tcp-close".to_string()));
        assert!(a
            .windows(2)
            .any(|w| w == ["--inherit-fd", "fd[3]:pipe:[11]"]));
        assert!(a
            .windows(2)
            .any(|w| w == ["--inherit-fd", "fd[4]:pipe:[12]"]));
    }
}
