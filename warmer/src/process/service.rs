//! A running instance of a service: its init's PID and its output pipes,
//! however it was started.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::manifest::Manifest;
use crate::process::logs::Output;
use crate::process::signals::Signals;

/// The service's main process (host PID): the first child of its
/// namespace's init, warmer-init, whose PID is `init`.
pub fn main_pid(init: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How the last start happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartKind {
    Cold,
    Restored,
}

/// Variables of warmer's environment that belong to warmer, not the service.
const PRIVATE_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "JOURNAL_STREAM",
];

/// The service's environment: warmer's own minus what belongs to warmer
/// (systemd's notify socket, warmer's settings), plus the manifest's `env`,
/// plus `NOTIFY_SOCKET` when the service reports readiness itself.
pub fn service_env(
    manifest: &Manifest,
    notify_socket: Option<&Path>,
    run_dir: &Path,
) -> Result<Vec<(OsString, OsString)>, String> {
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !PRIVATE_ENV.contains(&k.as_ref()) && !k.starts_with("WARMER_")
        })
        .collect();
    for (k, v) in &manifest.env {
        env.insert(k.into(), v.into());
    }
    for (k, v) in env_file_vars(manifest)? {
        env.insert(k.into(), v.into());
    }
    if let Some(p) = notify_socket {
        env.insert("NOTIFY_SOCKET".into(), p.into());
    }
    // The contract of every service: this names the file rewritten before
    // each restore (see `process::hooks`).
    env.insert(
        crate::process::hooks::RESTORE_INFO_ENV.into(),
        crate::process::hooks::restore_info_path(run_dir, manifest.sandbox.is_some()).into(),
    );
    let java = env
        .get(std::ffi::OsStr::new(JAVA_TOOL_OPTIONS))
        .map(|v| v.to_string_lossy().into_owned());
    env.insert(
        JAVA_TOOL_OPTIONS.into(),
        java_tool_options(java.as_deref()).into(),
    );
    Ok(env.into_iter().collect())
}

/// The variables of the manifest's `env_file:` files, in order (a later
/// file wins). Root reads them and hands their values to the service: only
/// files no one but root could have written.
pub fn env_file_vars(manifest: &Manifest) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for f in &manifest.env_files {
        if f.optional && f.path.symlink_metadata().is_err() {
            continue;
        }
        let text =
            crate::manifest::read_trusted(&f.path).map_err(|why| format!("env_file: {why}"))?;
        out.extend(crate::manifest::parse_env_file(&text));
    }
    Ok(out)
}

const JAVA_TOOL_OPTIONS: &str = "JAVA_TOOL_OPTIONS";
/// HotSpot keeps its performance counters in a file it maps,
/// `/tmp/hsperfdata_<user>/<pid>`, and deletes at exit: an image of any JVM
/// then cannot be restored ("Can't open file tmp/hsperfdata_root/2"). In
/// ordinary memory they are part of the image like the rest of the heap.
/// (jstat then no longer sees the JVM; jcmd still does.)
const PERF_IN_MEMORY: &str = "-XX:+PerfDisableSharedMem";

/// `JAVA_TOOL_OPTIONS` for every JVM of the service: the given value plus
/// `PERF_IN_MEMORY`, unless the service decides about perf data itself.
pub fn java_tool_options(given: Option<&str>) -> String {
    match given {
        None | Some("") => PERF_IN_MEMORY.to_string(),
        Some(v) if v.contains("PerfDisableSharedMem") || v.contains("UsePerfData") => v.to_string(),
        Some(v) => format!("{v} {PERF_IN_MEMORY}"),
    }
}

/// The exit status reported for a process that vanished without being
/// reaped by warmer.
pub const UNKNOWN_EXIT: i32 = 255;

/// Runs with the PIDs of a tree (see [`Running::at_or_before_stop`]).
pub type Sampler = Box<dyn FnOnce(Vec<i32>) + Send>;

/// A live service tree, rooted at its namespace init (our child).
pub struct Running {
    pub pid: Pid,
    pub output: Output,
    pub kind: StartKind,
    exit: Option<i32>,
    /// The `criu lazy-pages` daemon serving a lazily restored tree; `None`
    /// once it has exited (it does when every page has been delivered).
    lazy_pages: Option<std::process::Child>,
    /// Why the lazy-pages daemon ended before delivering every page.
    lazy_failed: Option<String>,
    /// Run once when the lazy-pages daemon is done: every page delivered,
    /// or the tree gone (see [`Running::on_lazy_end`]).
    lazy_end: Option<Box<dyn FnOnce() + Send>>,
    /// `lazy_end` running on its thread (joined by [`Running::finish`]).
    lazy_ending: Option<std::thread::JoinHandle<()>>,
    /// Run once, with the tree's PIDs, at a time or at the stop, whichever
    /// comes first (see [`Running::at_or_before_stop`]).
    sample: Option<(Instant, Sampler)>,
    sampling: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn new(pid: Pid, output: Output, kind: StartKind) -> Self {
        Self {
            pid,
            output,
            kind,
            exit: None,
            lazy_pages: None,
            lazy_failed: None,
            lazy_end: None,
            lazy_ending: None,
            sample: None,
            sampling: None,
        }
    }

    /// Why the tree was killed: its lazy-pages daemon died before it had
    /// delivered every page (`None`: it did not).
    pub fn lazy_failure(&self) -> Option<&str> {
        self.lazy_failed.as_deref()
    }

    /// The daemon that serves the tree's missing pages ended abnormally: a
    /// page touched from now on would come back as zeros (userfaultfd
    /// drops the registration with the daemon's fd), silently corrupting
    /// the service's memory. Kill the tree instead; the next start knows
    /// (see `restore::choose`).
    fn lazy_died(&mut self, why: String) {
        tracing::error!(
            "criu lazy-pages {why} before it had delivered every page: the service's memory is incomplete, killing it"
        );
        self.lazy_failed = Some(format!("criu lazy-pages {why}"));
        self.lazy_pages = None;
        self.lazy_end = None;
        let _ = kill(self.pid, Signal::SIGKILL);
    }

    /// Hands the lazy-pages daemon to this tree: reaped with it, killed when
    /// the tree is gone.
    pub fn set_lazy_pages(&mut self, daemon: std::process::Child) {
        self.lazy_pages = Some(daemon);
    }

    /// `f` runs once the lazy-pages daemon has delivered every page (on a
    /// thread of its own: the service runs meanwhile), or when the tree is
    /// finished with the daemon still serving it; not when the daemon died.
    pub fn on_lazy_end(&mut self, f: Box<dyn FnOnce() + Send>) {
        self.lazy_end = Some(f);
    }

    /// `f` runs once with the PIDs of the tree, `after` from now (on a
    /// thread of its own) or when the tree is asked to stop, whichever
    /// comes first; never once the tree is gone.
    pub fn at_or_before_stop(&mut self, after: Duration, f: Sampler) {
        self.sample = Some((Instant::now() + after, f));
    }

    fn run_sample(&mut self, on_thread: bool) {
        if self.exit.is_some() {
            self.sample = None;
            return;
        }
        if let Some((_, f)) = self.sample.take() {
            let pids = self.pids();
            if on_thread {
                self.sampling = Some(std::thread::spawn(move || f(pids)));
            } else {
                f(pids);
            }
        }
    }

    /// Every process of the tree, its init first.
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let mut todo = vec![self.pid.as_raw()];
        while let Some(pid) = todo.pop() {
            out.push(pid);
            for task in std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .filter_map(|t| t.ok())
            {
                let children = std::fs::read_to_string(task.path().join("children"));
                todo.extend(
                    children
                        .unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
        out
    }

    fn lazy_pid(&self) -> Option<Pid> {
        self.lazy_pages
            .as_ref()
            .and_then(|c| i32::try_from(c.id()).ok())
            .map(Pid::from_raw)
    }

    /// Reaps without blocking. Returns the init's exit status once it has
    /// exited: its code, or 128+N when killed by signal N. Other children
    /// (orphans re-parented to us as subreaper) are reaped on the way.
    pub fn poll_exit(&mut self) -> Option<i32> {
        if self.exit.is_some() {
            return self.exit;
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == self.pid => {
                    self.exit = Some(code);
                    break;
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == self.pid => {
                    self.exit = Some(128 + sig as i32);
                    break;
                }
                Ok(WaitStatus::Exited(pid, code)) if Some(pid) == self.lazy_pid() => {
                    if code == 0 {
                        self.lazy_pages = None;
                        if let Some(f) = self.lazy_end.take() {
                            self.lazy_ending = Some(std::thread::spawn(f));
                        }
                    } else {
                        self.lazy_died(format!("exited with status {code}"));
                    }
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if Some(pid) == self.lazy_pid() => {
                    self.lazy_died(format!("was killed by {sig}"));
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        if self
            .sample
            .as_ref()
            .is_some_and(|(at, _)| Instant::now() >= *at)
        {
            self.run_sample(true);
        }
        // Gone without us reaping it (someone else did: it was never quite
        // ours): it exited, status unknown. Waiting for it would never end.
        if self.exit.is_none() && kill(self.pid, None) == Err(nix::errno::Errno::ESRCH) {
            tracing::warn!("process {} is gone and its exit status unknown", self.pid);
            self.exit = Some(UNKNOWN_EXIT);
        }
        self.exit
    }

    pub fn signal(&self, sig: Signal) {
        if self.exit.is_none() {
            let _ = kill(self.pid, sig);
        }
    }

    /// Sends SIGCONT to every task of a tree restored with `--leave-stopped`.
    /// The tree is walked through /proc/PID/task/TID/children (stable while
    /// everything is stopped).
    pub fn resume(&self) {
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }

    /// Waits up to `timeout` for the init to exit.
    pub fn wait_exit(&mut self, timeout: Duration, signals: &Signals) -> Option<i32> {
        let deadline = crate::process::clock::deadline(timeout);
        loop {
            if let Some(code) = self.poll_exit() {
                return Some(code);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            signals.wait(left.min(Duration::from_millis(50)));
        }
    }

    /// The signal that stopped warmer (SIGTERM, or SIGINT from a terminal;
    /// the init forwards it), then SIGKILL after `timeout`. Killing the init
    /// kills its whole PID namespace.
    pub fn stop(&mut self, timeout: Duration, signals: &Signals) -> i32 {
        self.run_sample(false);
        self.signal(signals.stop_signal().unwrap_or(Signal::SIGTERM));
        if let Some(code) = self.wait_exit(timeout, signals) {
            return code;
        }
        tracing::warn!(
            "service did not exit {} after SIGTERM: killing it",
            humantime::format_duration(timeout)
        );
        self.kill(signals)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self, signals: &Signals) -> i32 {
        self.signal(Signal::SIGKILL);
        loop {
            if let Some(code) = self.wait_exit(Duration::from_secs(5), signals) {
                return code;
            }
        }
    }

    /// Drains the output pumps (after exit) and stops a lazy-pages daemon
    /// that has nobody left to serve.
    pub fn finish(mut self) {
        for t in [self.lazy_ending.take(), self.sampling.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
        if let Some(mut daemon) = self.lazy_pages.take() {
            if let Some(f) = self.lazy_end.take() {
                f();
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        self.output.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_someone_else_reaped_counts_as_exited_not_as_running_forever() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        child.wait().unwrap(); // reaped here, not by Running
        let mut r = Running::new(pid, Output::discarding().unwrap(), StartKind::Restored);
        assert_eq!(r.poll_exit(), Some(UNKNOWN_EXIT));
        r.finish();
    }
}

#[cfg(test)]
mod env_tests {
    use super::*;

    #[test]
    fn jvms_keep_perf_counters_in_memory_unless_told_otherwise() {
        assert_eq!(java_tool_options(None), "-XX:+PerfDisableSharedMem");
        assert_eq!(
            java_tool_options(Some("-Xmx1g")),
            "-Xmx1g -XX:+PerfDisableSharedMem"
        );
        assert_eq!(
            java_tool_options(Some("-XX:-UsePerfData")),
            "-XX:-UsePerfData"
        );
    }
}
