//! CRIU: finding it, and its command lines.
//!
//! Command lines are planned by pure functions ([`dump_args`],
//! [`restore_args`]) and unit-tested without root, as the runc crate of
//! containerd/rust-extensions does for runc. Running them is a thin layer.

mod args;
mod netlock;

pub use args::{
    dump_args, external_mount, lazy_pages_args, restore_args, DumpPlan, Inherit, RestorePlan,
    LAZY_PAGES_LOG,
};
pub use netlock::{clear_network_locks, lock_rule_deletions, locks, Conn};
use std::ffi::OsString;
use std::os::fd::AsRawFd;
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
    #[error("refusing to run {}", bin.display())]
    Untrusted {
        bin: PathBuf,
        #[source]
        why: cache::fsutil::Untrusted,
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

/// The CRIU feature (`criu check --feature`, asked through
/// [`Criu::has_feature`]) of `criu lazy-pages --lazy-bg-idle`: the daemon
/// holds the pages nobody asked for until the restored tree is quiet (the
/// package's second patch), so that after a boot a starting service's
/// faults do not queue on the disk behind the rest of its memory.
pub const QUIET_BACKGROUND: &str = "lazy-bg-idle";

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
        // Root runs it on every service: only a binary no one but root could
        // have written, up to `/`.
        cache::fsutil::check_trusted(&bin, nix::unistd::geteuid().as_raw()).map_err(|why| {
            CriuError::Untrusted {
                bin: bin.clone(),
                why,
            }
        })?;
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

    /// Can a tree restored into a user namespace of its own (a sandbox) get
    /// a userfaultfd, so restore lazily? The kernel refuses it the syscall
    /// (`vm.unprivileged_userfaultfd=0` asks for CAP_SYS_PTRACE in the
    /// initial user namespace); the CRIU scripts/install-criu.sh builds
    /// opens `/dev/userfaultfd` instead (tools/criu-deb/debian/patches), and
    /// says so as `criu check --feature uffd-dev`, which also proves that
    /// the device works on this kernel. Asked once per boot and binary.
    pub fn lazy_in_userns(&self, memo: &mut crate::memo::Memo) -> bool {
        self.has_feature(memo, "uffd-dev")
    }

    /// `criu check --feature NAME` succeeds, asked once per boot and binary
    /// (`memo`).
    pub fn has_feature(&self, memo: &mut crate::memo::Memo, name: &str) -> bool {
        let answer = memo.get(&format!("criu-{name}"), &self.bin, |bin| {
            let ok = Command::new(bin)
                .args(["check", "--feature", name])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            Ok::<_, std::convert::Infallible>(if ok { "yes" } else { "no" }.to_string())
        });
        answer.is_ok_and(|a| a == "yes")
    }

    /// [`Criu::lazy_in_userns`] for a service's restore: always true
    /// outside a sandbox; inside, asked of this CRIU through the memo of
    /// `run_root`.
    pub fn lazy_for(&self, sandboxed: bool, run_root: &Path) -> bool {
        if !sandboxed {
            return true;
        }
        let mut memo = crate::memo::Memo::load(run_root);
        let ok = self.lazy_in_userns(&mut memo);
        memo.save();
        ok
    }

    /// [`Criu::lazy_in_userns`] of the CRIU a start would use (located and
    /// asked through `run_root`'s memo, as a start does): for `status` and
    /// `validate`. No usable CRIU: false.
    pub fn located_lazy_in_userns(run_root: &Path) -> bool {
        let mut memo = crate::memo::Memo::load(run_root);
        let ok = Self::locate_memo(&mut memo).is_ok_and(|c| c.lazy_in_userns(&mut memo));
        memo.save();
        ok
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
    // A restore's end is on the critical path of every start: with a pidfd
    // (Linux 5.3) the wait wakes the moment CRIU exits, and looks at
    // `abort` and the deadline every millisecond between; without one it
    // sleeps 0.2 ms, then up to 1 ms, between looks (~0.5-1.5 ms late).
    let pidfd = pidfd_open(child.id());
    wait_child_with(child, pidfd, deadline, abort)
}

fn wait_child_with(
    child: &mut std::process::Child,
    pidfd: Option<std::os::fd::OwnedFd>,
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
        match &pidfd {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd of an fd we own; an error or EINTR only
                // ends this wait early, the loop looks again.
                unsafe { libc::poll(&mut p, 1, 1) };
            }
            None => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(1));
            }
        }
    }
}

/// A pidfd of `pid` (readable once it has exited), where the kernel has them.
pub fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; on success it returns a new
    // fd that nothing else owns.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: see above.
    Some(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
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
        Some("the service runs as another user, and root here lacks CAP_SYS_RESOURCE, which CRIU needs to dump it: name that user in the manifest (`user:`), so warmer starts it in a user namespace where root may dump it, instead of letting the service switch users itself".into())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of waiting (a pidfd's wake-up, and sleeps where the kernel
    /// has no pidfd) return the exit status, and kill and reap CRIU when
    /// `abort` says so or the deadline passes.
    #[test]
    fn waiting_for_criu_ends_with_its_exit_an_abort_or_the_deadline() {
        let spawn = |script: &str| {
            Command::new("/bin/sh")
                .args(["-c", script])
                .spawn()
                .unwrap()
        };
        for with_pidfd in [true, false] {
            let open = |c: &std::process::Child| with_pidfd.then(|| pidfd_open(c.id()).unwrap());
            let mut c = spawn("sleep 0.05; exit 3");
            let fd = open(&c);
            let st = wait_child_with(&mut c, fd, None, &mut || None).unwrap();
            assert_eq!(st.code(), Some(3));

            let mut c = spawn("sleep 30");
            let fd = open(&c);
            let mut looks = 0;
            let mut abort = || {
                looks += 1;
                (looks == 3).then(|| "enough".to_string())
            };
            let t = std::time::Instant::now();
            match wait_child_with(&mut c, fd, None, &mut abort) {
                Err(Interrupted::Aborted(why)) => assert_eq!(why, "enough"),
                other => panic!("{other:?}"),
            }
            assert!(t.elapsed() < std::time::Duration::from_secs(10));
            assert!(c.try_wait().unwrap().is_some(), "killed and reaped");

            let mut c = spawn("sleep 30");
            let fd = open(&c);
            let limit = std::time::Duration::from_millis(50);
            match wait_child_with(&mut c, fd, Some(limit), &mut || None) {
                Err(Interrupted::Timeout(after)) => assert_eq!(after, limit),
                other => panic!("{other:?}"),
            }
            assert!(c.try_wait().unwrap().is_some(), "killed and reaped");
        }
    }

    /// A stand-in for `criu` that answers `check --feature uffd-dev` with
    /// `status` and counts how often it was asked.
    fn fake_criu(dir: &Path, status: i32) -> Criu {
        fake_feature(dir, "uffd-dev", status)
    }

    /// A stand-in for `criu` that answers `check --feature FEATURE` with
    /// `status` (any other question: 9) and counts how often it was asked.
    fn fake_feature(dir: &Path, feature: &str, status: i32) -> Criu {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("criu");
        let count = dir.join("asked");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\n[ \"$*\" = \"check --feature {feature}\" ] || exit 9\necho x >> {}\nexit {status}\n",
                count.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A test thread forking while this one wrote the script holds it
        // open for writing until its child execs: exec fails with ETXTBSY
        // meanwhile. Wait that out (asked nothing, the stand-in exits 9).
        for _ in 0..200 {
            match Command::new(&bin).status() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                _ => break,
            }
        }
        Criu {
            bin,
            version: "4.2.1".into(),
        }
    }

    #[test]
    fn lazy_restores_in_a_sandbox_only_where_criu_says_it_can_and_it_is_asked_once() {
        for (status, can) in [(0, true), (1, false)] {
            let dir = tempfile::tempdir().unwrap();
            let criu = fake_criu(dir.path(), status);
            let run = dir.path().join("run");
            std::fs::create_dir(&run).unwrap();
            assert_eq!(criu.lazy_for(true, &run), can, "exit {status}");
            assert_eq!(criu.lazy_for(true, &run), can, "remembered");
            assert!(criu.lazy_for(false, &run), "outside a sandbox: never asked");
            let asked = std::fs::read_to_string(dir.path().join("asked")).unwrap();
            assert_eq!(asked.lines().count(), 1, "asked once per boot and binary");
        }
    }

    #[test]
    fn a_quiet_background_only_where_criu_knows_it_asked_once() {
        for (status, can) in [(0, true), (1, false)] {
            let dir = tempfile::tempdir().unwrap();
            let criu = fake_feature(dir.path(), "lazy-bg-idle", status);
            let run = dir.path().join("run");
            std::fs::create_dir(&run).unwrap();
            let asked = || {
                let mut memo = crate::memo::Memo::load(&run);
                let ok = criu.has_feature(&mut memo, QUIET_BACKGROUND);
                memo.save();
                ok
            };
            assert_eq!(asked(), can, "exit {status}");
            assert_eq!(asked(), can, "remembered");
            // The other feature is another question (this stand-in: no).
            assert!(!criu.lazy_for(true, &run));
            let asked = std::fs::read_to_string(dir.path().join("asked")).unwrap();
            assert_eq!(asked.lines().count(), 1, "asked once per boot and binary");
        }
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
