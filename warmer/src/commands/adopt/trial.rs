//! A trial start: when a unit says nothing about readiness (no `--ready`,
//! not `Type=notify`), `adopt` starts the service once, exactly as the
//! manifest it wrote would (`warmer run`, its user, sandbox and steps, no
//! checkpoint, scratch cache and run directories), and watches which TCP
//! ports its processes listen on. One port is the readiness probe; none or
//! several, and the operator is asked for `--ready`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The probe the trial manifest has: never ready, so warmer keeps the
/// service running (and never checkpoints it) until the trial stops it.
pub const NEVER_READY: &str = "exec: [\"/bin/false\"]";

/// How long a trial waits for the service to listen.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The probe address for a listening socket: loopback for a wildcard
/// bind, of the same family.
pub fn probe_target(a: &SocketAddr) -> String {
    match a.ip() {
        ip if ip.is_unspecified() || ip.is_loopback() => match a {
            SocketAddr::V4(_) => format!("127.0.0.1:{}", a.port()),
            SocketAddr::V6(_) => format!("[::1]:{}", a.port()),
        },
        _ => a.to_string(),
    }
}

/// The processes below `root` (itself included), by their parents: the
/// trial's killer of last resort.
fn tree(root: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(ppid) = crate::process::parent_of(pid) {
            parent.insert(pid, ppid);
        }
    }
    let mut out = Vec::new();
    for &pid in parent.keys() {
        let mut p = pid;
        for _ in 0..64 {
            if p == root {
                out.push(pid);
                break;
            }
            match parent.get(&p) {
                Some(&pp) if pp != 0 => p = pp,
                _ => break,
            }
        }
    }
    out
}

/// A scratch directory root owns, removed with everything the trial left.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The trial run, stopped (and its tree killed) when dropped.
struct Trial(Child);

impl Drop for Trial {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for p in tree(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.wait();
    }
}

/// Runs `manifest_yaml` (a service named `service`) once and returns the
/// ports its processes listen on once they have held still for a second,
/// within `window`; the service is stopped before this returns. `Err` says
/// why the trial could not run, with the end of warmer's output.
pub fn listening_ports(
    service: &str,
    manifest_yaml: &str,
    window: Duration,
) -> Result<Vec<SocketAddr>, String> {
    let dir = Scratch(PathBuf::from(format!(
        "/run/warmer-adopt-trial.{}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&dir.0);
    let mk = |p: &Path| {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(p)
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let manifests = dir.0.join("manifests");
    mk(&manifests)?;
    std::fs::set_permissions(
        &manifests,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| e.to_string())?;
    let file = manifests.join(format!("{service}.yaml"));
    std::fs::write(&file, manifest_yaml).map_err(|e| format!("{}: {e}", file.display()))?;
    let log = dir.0.join("trial.log");
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    // Adopt killed mid-trial: the trial stops its service too.
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .arg("--manifest-dir")
        .arg(&manifests)
        .arg("--cache-dir")
        .arg(dir.0.join("cache"))
        .arg("--run-dir")
        .arg(dir.0.join("run"))
        .args(["run", service])
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start the trial: {e}"))?;
    let mut trial = Trial(child);
    let end = Instant::now() + window;
    let mut last: Option<Vec<SocketAddr>> = None;
    let mut still_since = Instant::now();
    let tail = |log: &Path| {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    };
    while Instant::now() < end {
        if let Ok(Some(status)) = trial.0.try_wait() {
            return Err(format!(
                "the trial start ended ({status}) before it listened:\n{}",
                tail(&log)
            ));
        }
        let now = crate::process::ports::listening(nix::unistd::Pid::from_raw(trial.0.id() as i32));
        if last.as_ref() != Some(&now) {
            last = Some(now);
            still_since = Instant::now();
        } else if !now.is_empty() && still_since.elapsed() >= Duration::from_secs(1) {
            drop(trial);
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(trial);
    Ok(last.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_go_to_loopback_of_the_same_family() {
        let t = |a: &str| probe_target(&a.parse().unwrap());
        assert_eq!(t("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(t("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(t("[::]:9090"), "[::1]:9090");
        assert_eq!(t("10.0.0.5:80"), "10.0.0.5:80");
    }

    #[test]
    fn a_tree_is_found_through_its_parents() {
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        let mut child = Command::new("/bin/sleep").arg("5").spawn().unwrap();
        assert!(tree(me).contains(&child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
