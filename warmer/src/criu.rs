//! CRIU: finding it, and its command lines.
//!
//! Command lines are planned by pure functions ([`dump_args`],
//! [`restore_args`]) and unit-tested without root, as the runc crate of
//! containerd/rust-extensions does for runc. Running them is a thin layer.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// CRIU older than this cannot checkpoint on current kernels (see README).
pub const MIN_VERSION: (u32, u32) = (4, 2);

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("criu not found (looked in $WARMER_CRIU, PATH, /usr/local/sbin, /usr/sbin, /sbin); install it with scripts/install-criu.sh")]
    NotFound,
    #[error("{} --version failed", bin.display())]
    Version {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is CRIU {version}; warmer needs >= {}.{} (scripts/install-criu.sh builds 4.2.1)", bin.display(), MIN_VERSION.0, MIN_VERSION.1)]
    TooOld { bin: PathBuf, version: String },
    #[error("criu {action} did not finish within {}; killed it (log: {})", humantime::format_duration(*after), log.display())]
    Timeout {
        action: &'static str,
        after: std::time::Duration,
        log: PathBuf,
    },
    #[error("could not run {}", bin.display())]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("criu {action} failed ({status}); log: {}{}{}", log.display(), tail_suffix(tail), hint(tail).map(|h| format!("\nhint: {h}")).unwrap_or_default())]
    Failed {
        action: &'static str,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n{tail}")
    }
}

/// A located CRIU binary and its version.
#[derive(Debug, Clone)]
pub struct Criu {
    pub bin: PathBuf,
    pub version: String,
}

impl Criu {
    /// `$WARMER_CRIU`, then `criu` on PATH, then the usual sbin directories.
    pub fn locate() -> Result<Self, CriuError> {
        Self::locate_memo(&mut crate::memo::Memo::none())
    }

    /// [`Criu::locate`], remembering the binary's version while it is unchanged.
    pub fn locate_memo(memo: &mut crate::memo::Memo) -> Result<Self, CriuError> {
        let bin = find_bin().ok_or(CriuError::NotFound)?;
        let version = memo.get("criu-version", &bin, |bin| {
            let out = Command::new(bin)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .map_err(|source| CriuError::Version {
                    bin: bin.to_path_buf(),
                    source,
                })?;
            parse_version(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| CriuError::Version {
                bin: bin.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no Version: line"),
            })
        })?;
        if !version_at_least(&version, MIN_VERSION) {
            return Err(CriuError::TooOld { bin, version });
        }
        Ok(Self { bin, version })
    }

    /// Runs `criu check`: does CRIU work on this kernel, with our privileges?
    pub fn check(&self) -> Result<CheckReport, CriuError> {
        let o = self
            .command()
            .arg("check")
            .output()
            .map_err(|source| CriuError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(CheckReport {
            ok: o.status.success(),
            status: o.status,
            lines: text
                .lines()
                .filter(|l| !is_noise(l) && !l.trim().is_empty())
                .map(String::from)
                .collect(),
        })
    }

    /// Starts a CRIU command with its stderr piped and read on a thread (so
    /// it never blocks on a full pipe); join the thread for the text once
    /// CRIU has exited.
    pub fn spawn(
        &self,
        cmd: &mut Command,
    ) -> Result<(std::process::Child, std::thread::JoinHandle<Vec<u8>>), CriuError> {
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| CriuError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        let mut stderr = child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let _ = std::io::Read::read_to_end(s, &mut buf);
            }
            buf
        });
        Ok((child, reader))
    }

    /// A CRIU command with stdin on /dev/null and none of warmer's other
    /// fds: what warmer's caller left open (a shell's stray fd) would
    /// otherwise reach CRIU, and through a restore, the service. fds a caller
    /// passes on purpose are dup2'ed by later `pre_exec`s, which run after
    /// this one.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.stdin(Stdio::null());
        // SAFETY: close_range(2) is a plain syscall, async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, || {
                const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
                if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// Runs a planned CRIU command to completion.
    pub fn run(
        &self,
        action: &'static str,
        args: &[OsString],
        log: &Path,
    ) -> Result<(), CriuError> {
        let mut cmd = self.command();
        cmd.args(args);
        self.run_command(action, cmd, log, None)
    }

    /// Runs a prepared CRIU command (see [`Criu::command`]) to completion,
    /// or until `deadline` has passed: then CRIU is killed and the call fails.
    pub fn run_command(
        &self,
        action: &'static str,
        mut cmd: Command,
        log: &Path,
        deadline: Option<std::time::Duration>,
    ) -> Result<(), CriuError> {
        let (mut child, reader) = self.spawn(cmd.stdout(Stdio::null()))?;
        let spawn_err = |source| CriuError::Spawn {
            bin: self.bin.clone(),
            source,
        };
        let status = match wait_child(&mut child, deadline, &mut || None) {
            Ok(st) => st,
            Err(Interrupted::Io(e)) => return Err(spawn_err(e)),
            Err(Interrupted::Timeout(after)) => {
                return Err(CriuError::Timeout {
                    action,
                    after,
                    log: log.to_path_buf(),
                })
            }
            Err(Interrupted::Aborted(_)) => unreachable!("no abort condition"),
        };
        let stderr = reader.join().unwrap_or_default();
        if status.success() {
            Ok(())
        } else {
            Err(CriuError::Failed {
                action,
                status,
                log: log.to_path_buf(),
                tail: log_tail(log, &stderr),
            })
        }
    }
}

/// Why [`wait_child`] gave up on a CRIU process (it is killed and reaped).
#[derive(Debug)]
pub enum Interrupted {
    Timeout(std::time::Duration),
    /// `abort` said why.
    Aborted(String),
    Io(std::io::Error),
}

/// Waits for `child` until it exits, `deadline` passes, or `abort` returns a
/// reason (polled every few ms); in the last two cases the child is killed.
/// Every CRIU call goes through this: none can hang warmer.
pub fn wait_child(
    child: &mut std::process::Child,
    deadline: Option<std::time::Duration>,
    abort: &mut dyn FnMut() -> Option<String>,
) -> Result<std::process::ExitStatus, Interrupted> {
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_micros(200);
    loop {
        if let Some(st) = child.try_wait().map_err(Interrupted::Io)? {
            return Ok(st);
        }
        let stop = if let Some(why) = abort() {
            Some(Interrupted::Aborted(why))
        } else {
            deadline
                .filter(|d| start.elapsed() >= *d)
                .map(Interrupted::Timeout)
        };
        if let Some(stop) = stop {
            let _ = child.kill();
            let _ = child.wait();
            return Err(stop);
        }
        std::thread::sleep(pause);
        // Short: a restore's end is on the critical path of every start.
        pause = (pause * 2).min(std::time::Duration::from_millis(1));
    }
}

/// SIGKILLs and reaps every child of this process: what a killed CRIU
/// restore left behind (the partly restored tree is re-parented to warmer,
/// its subreaper). Only called when nothing else of ours runs.
pub fn kill_children() -> usize {
    let mut n = 0;
    let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
    let mut pids = Vec::new();
    for t in tasks.filter_map(|t| t.ok()) {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    for pid in pids {
        let pid = nix::unistd::Pid::from_raw(pid);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
            n += 1;
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }
    n
}

fn find_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WARMER_CRIU") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join("criu"))
        .find(|p| p.is_file());
    found
}

/// "Version: 4.2.1" -> "4.2.1"
pub fn parse_version(out: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

pub fn version_at_least(version: &str, min: (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .unwrap_or(0)
    });
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= min
}

/// What a manifest author can do about a CRIU failure, recognised from its log.
pub fn hint(tail: &str) -> Option<String> {
    if tail.contains("Connected TCP socket") {
        Some("the service had TCP connections open at the checkpoint (listed above): if they are the service's own (to a broker, a database, a coordinator such as epmd), set `checkpoint: {tcp_established: true}` in its manifest; if they are clients', checkpoint it before they connect".into())
    } else if tail.contains("External socket is used") {
        Some("the service is connected to a unix socket outside its tree (syslog, a database): such services cannot be checkpointed as they are".into())
    } else if tail.contains("bad build-ID") {
        Some(format!(
            "{} changed since the checkpoint (a new build of a program or library): the next start is cold and makes a new image",
            changed_file(tail).unwrap_or("a program or library the service maps".into())
        ))
    } else if tail.contains("bad size") {
        let file = changed_file(tail).unwrap_or("a file the service holds open".into());
        Some(format!(
            "{file} was written since the checkpoint: if it is the service's data, list its directory under `state:` (warmer then never restores an image older than it) and consider `mode: persist`; if it is a log, open it for appending"
        ))
    } else if tail.contains("Can't get rlimit") || tail.contains("Can't dump creds") {
        Some("the service runs as another user, and root here lacks CAP_SYS_RESOURCE, which CRIU needs to dump it: run the service as root (drop privileges inside it later), or run warmer where root has its full capabilities".into())
    } else {
        None
    }
}

/// `/path` from CRIU's `File path has bad size` (CRIU prints it without the
/// leading slash).
fn changed_file(tail: &str) -> Option<String> {
    let line = tail
        .lines()
        .find(|l| l.contains("bad size") || l.contains("bad build-ID"))?;
    let rest = line.split("File ").nth(1)?;
    let path = rest.split(" has bad").next()?.trim();
    (!path.is_empty()).then(|| format!("/{}", path.trim_start_matches('/')))
}

/// Lines CRIU prints on every run on machines where root lacks
/// CAP_SYS_RESOURCE (`rlimit: Can't setup RLIMIT_NOFILE for self`): harmless,
/// and never shown to users as an error.
pub fn is_noise(line: &str) -> bool {
    line.contains("RLIMIT_NOFILE")
}

/// What `criu check` said.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub ok: bool,
    pub status: std::process::ExitStatus,
    /// Its output, minus [`is_noise`] lines.
    pub lines: Vec<String>,
}

/// The last error lines of a CRIU log (falling back to its stderr), minus the
/// RLIMIT_NOFILE complaint CRIU prints on every run on these machines.
pub fn log_tail(log: &Path, stderr: &[u8]) -> String {
    let text = std::fs::read_to_string(log)
        .unwrap_or_else(|_| String::from_utf8_lossy(stderr).into_owned());
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !is_noise(l))
        .filter(|l| l.starts_with("Error") || l.contains("Error (") || l.contains("FAILED"))
        .collect();
    let start = lines.len().saturating_sub(6);
    lines[start..].join("\n")
}

/// CRIU's mark for its own packets (soccr.h `SOCCR_MARK`): the per-connection
/// DROP rules of a `--tcp-established` network lock all carry `! --mark 0xc114`.
const LOCK_MARK: &str = "0xc114";

/// One TCP connection: its two endpoints, in either order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub a: std::net::SocketAddr,
    pub b: std::net::SocketAddr,
}

/// The connections a stop-time `--tcp-established` dump left locked: CRIU
/// keeps their DROP rules for the restore to lift. An image that is never
/// restored (removed, quarantined, superseded, or the start went cold)
/// would leave its peers' packets dropped for good, so the connections are
/// recorded here and their rules removed once the next start is ready
/// (a successful restore has lifted them already).
///
/// ```text
/// <run>/<svc>/network-locks.json   {format_version, conns: [[a, b], ...]}
/// ```
pub mod locks {
    use std::path::Path;

    use super::{clear_network_locks, Conn};

    const FILE: &str = "network-locks.json";
    const VERSION: u32 = 1;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Locks {
        format_version: u32,
        conns: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    }

    /// Records `conns` as locked by a dump that ended the tree.
    pub fn record(run_dir: &Path, conns: &[Conn]) -> std::io::Result<()> {
        let doc = Locks {
            format_version: VERSION,
            conns: conns.iter().map(|c| (c.a, c.b)).collect(),
        };
        cache::fsutil::write_atomic(
            run_dir,
            FILE,
            &serde_json::to_vec(&doc).expect("serializes"),
            0o600,
            cache::fsutil::Durability::Atomic,
        )
    }

    /// Removes the rules of the recorded connections; returns how many.
    pub fn release(run_dir: &Path) -> usize {
        let path = run_dir.join(FILE);
        let Ok(bytes) = std::fs::read(&path) else {
            return 0;
        };
        let conns: Vec<Conn> = serde_json::from_slice::<Locks>(&bytes)
            .map(|l| l.conns.into_iter().map(|(a, b)| Conn { a, b }).collect())
            .unwrap_or_default();
        let removed = clear_network_locks(&conns);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
        removed
    }
}

impl Conn {
    fn matches(&self, x: std::net::SocketAddr, y: std::net::SocketAddr) -> bool {
        (self.a == x && self.b == y) || (self.a == y && self.b == x)
    }
}

/// The endpoints a lock rule names: (`-s` with `--sport`, `-d` with `--dport`).
fn rule_endpoints(line: &str) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |flag: &str| {
        words
            .windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].split('/').next().unwrap_or(w[1]))
    };
    let ip = |s: &str| s.parse::<std::net::IpAddr>().ok();
    let port = |s: &str| s.parse::<u16>().ok();
    Some((
        std::net::SocketAddr::new(ip(after("-s")?)?, port(after("--sport")?)?),
        std::net::SocketAddr::new(ip(after("-d")?)?, port(after("--dport")?)?),
    ))
}

/// The `iptables -D` argument lists that remove CRIU's connection-lock rules
/// for the connections `only` (those of the dump or restore that failed: a
/// rule of another service's checkpoint in progress stays) found in
/// `iptables-save -t filter` output.
pub fn lock_rule_deletions(save: &str, only: &[Conn]) -> Vec<Vec<String>> {
    save.lines()
        .filter(|l| l.starts_with("-A ") && l.contains(LOCK_MARK) && l.ends_with("-j DROP"))
        .filter(|l| rule_endpoints(l).is_some_and(|(x, y)| only.iter().any(|c| c.matches(x, y))))
        .map(|l| {
            let mut args: Vec<String> = vec!["-t".into(), "filter".into(), "-D".into()];
            args.extend(l.split_whitespace().skip(1).map(String::from));
            args
        })
        .collect()
}

/// Removes the network-lock rules a failed `--tcp-established` dump or
/// restore of the connections `only` left behind (they would drop those
/// connections for good). Returns how many were removed.
pub fn clear_network_locks(only: &[Conn]) -> usize {
    if only.is_empty() {
        return 0;
    }
    let mut removed = 0;
    for (save, tool) in [
        ("iptables-save", "iptables"),
        ("ip6tables-save", "ip6tables"),
    ] {
        let Ok(out) = Command::new(save).args(["-t", "filter"]).output() else {
            continue;
        };
        for args in lock_rule_deletions(&String::from_utf8_lossy(&out.stdout), only) {
            if Command::new(tool)
                .args(&args)
                .status()
                .is_ok_and(|s| s.success())
            {
                removed += 1;
            }
        }
    }
    removed
}

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
    a
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

/// `criu lazy-pages`: serves the image's pages to a `--lazy-pages` restore
/// over `lazy-pages.socket` in the work dir, reporting on `status_fd` once it
/// listens.
pub fn lazy_pages_args(images_dir: &Path, work_dir: &Path, status_fd: i32) -> Vec<OsString> {
    vec![
        "lazy-pages".into(),
        "--images-dir".into(),
        images_dir.into(),
        "--work-dir".into(),
        work_dir.into(),
        "--log-file".into(),
        "lazy-pages.log".into(),
        "--status-fd".into(),
        status_fd.to_string().into(),
    ]
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
        }));
        assert!(a
            .windows(2)
            .any(|w| w == ["--action-script", "/usr/bin/warmer"]));
        assert_eq!(a[..3], ["dump", "--tree", "42"]);
        assert!(a.contains(&"--leave-running".to_string()));
        let w = a.iter().position(|x| x == "--work-dir").unwrap();
        assert_eq!(a[w + 1], "/run/warmer/web");
        assert!(!a.contains(&"--tcp-established".to_string()));
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

    #[test]
    fn network_lock_rules_are_found_and_only_they() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n\
            -A INPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m tcp --sport 8080 --dport 4242 -m mark ! --mark 0xc114 -j DROP\n\
            -A INPUT -p tcp --dport 22 -j ACCEPT\n\
            -A OUTPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m tcp --sport 4242 --dport 8080 -m mark ! --mark 0xc114 -j DROP\nCOMMIT\n";
        let ours = Conn {
            a: "127.0.0.1:8080".parse().unwrap(),
            b: "127.0.0.1:4242".parse().unwrap(),
        };
        let d = lock_rule_deletions(save, &[ours]);
        assert_eq!(d.len(), 2);
        let theirs = Conn {
            a: "127.0.0.1:9090".parse().unwrap(),
            b: "127.0.0.1:4242".parse().unwrap(),
        };
        assert!(
            lock_rule_deletions(save, &[theirs]).is_empty(),
            "another service's rules stay"
        );
        assert_eq!(d[0][..4], ["-t", "filter", "-D", "INPUT"]);
        assert_eq!(d[1][3], "OUTPUT");
        assert!(d[0].ends_with(&["-j".to_string(), "DROP".to_string()]));
    }

    #[test]
    fn failures_come_with_hints() {
        assert!(hint("Error (criu/sk-inet.c:200): Connected TCP socket, consider using --tcp-established option.")
            .unwrap()
            .contains("tcp_established"));
        let h = hint(
            "Error (criu/files-reg.c:2133): File var/lib/app/db.log has bad size 7 (expect 2)",
        )
        .unwrap();
        assert!(
            h.contains("/var/lib/app/db.log") && h.contains("state:") && h.contains("persist"),
            "{h}"
        );
        assert!(
            hint("Error (criu/cr-dump.c:1): Can't get rlimit 0: Operation not permitted")
                .unwrap()
                .contains("CAP_SYS_RESOURCE")
        );
        assert_eq!(hint("Error (criu/cr-dump.c:1975): Dumping FAILED."), None);
    }

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("Version: 4.2.1\nGitID: x\n").as_deref(),
            Some("4.2.1")
        );
        assert!(version_at_least("4.2.1", MIN_VERSION));
        assert!(version_at_least("5.0", MIN_VERSION));
        assert!(!version_at_least("4.1.1", MIN_VERSION));
        assert!(!version_at_least("3.17", MIN_VERSION));
    }

    #[test]
    fn log_tail_keeps_errors_and_drops_rlimit_noise() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        std::fs::write(
            &log,
            "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE\n(00.1) info\nError (criu/files-reg.c:1): File x has bad size\n",
        )
        .unwrap();
        assert_eq!(
            log_tail(&log, b""),
            "Error (criu/files-reg.c:1): File x has bad size"
        );
    }
}
