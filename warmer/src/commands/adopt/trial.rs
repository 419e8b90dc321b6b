//! A trial start: when a unit says nothing about readiness (no `--ready`,
//! not `Type=notify`), `adopt` starts the service once, exactly as the
//! manifest it wrote would (`warmer run`, its user, sandbox and steps, no
//! checkpoint, scratch cache and run directories), and watches which TCP
//! ports its processes listen on. One port is the readiness probe; none or
//! several, and the operator is asked for `--ready`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The probe the trial manifest has: never ready, so warmer keeps the
/// service running (and never checkpoints it) until the trial stops it.
pub const NEVER_READY: &str = "exec: [\"/bin/false\"]";

/// How long a trial waits for the service to listen.
pub const WINDOW: Duration = Duration::from_secs(60);

/// A TCP socket in LISTEN state: its local address and port, and inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: String,
    pub port: u16,
    pub inode: u64,
}

/// The LISTEN sockets of a `/proc/net/tcp` or `tcp6` table.
pub fn parse_listeners(table: &str, v6: bool) -> Vec<Listener> {
    let mut out = Vec::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some((addr, port)) = f[1].split_once(':') else {
            continue;
        };
        let (Ok(port), Ok(inode)) = (u16::from_str_radix(port, 16), f[9].parse::<u64>()) else {
            continue;
        };
        let addr = if v6 { v6_addr(addr) } else { v4_addr(addr) };
        if let Some(addr) = addr {
            out.push(Listener { addr, port, inode });
        }
    }
    out
}

/// `0100007F` (host byte order, little-endian here) is 127.0.0.1.
fn v4_addr(hex: &str) -> Option<String> {
    let n = u32::from_str_radix(hex, 16).ok()?;
    Some(std::net::Ipv4Addr::from(n.swap_bytes()).to_string())
}

fn v6_addr(hex: &str) -> Option<String> {
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, word) in (0..4).map(|i| &hex[i * 8..i * 8 + 8]).enumerate() {
        let w = u32::from_str_radix(word, 16).ok()?.swap_bytes();
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
    }
    Some(std::net::Ipv6Addr::from(bytes).to_string())
}

/// The probe address for a listener: loopback for a wildcard bind.
pub fn probe_target(l: &Listener) -> String {
    match l.addr.as_str() {
        "0.0.0.0" | "127.0.0.1" => format!("127.0.0.1:{}", l.port),
        "::" | "::1" => format!("[::1]:{}", l.port),
        a if a.contains(':') => format!("[{a}]:{}", l.port),
        a => format!("{a}:{}", l.port),
    }
}

/// The processes below `root` (itself included).
fn tree(root: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
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

/// The socket inodes the processes hold open.
fn socket_inodes(pids: &[u32]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for pid in pids {
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    if let Ok(n) = n.parse() {
                        out.insert(n);
                    }
                }
            }
        }
    }
    out
}

fn listeners_of(pids: &[u32]) -> Vec<Listener> {
    let inodes = socket_inodes(pids);
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let table = std::fs::read_to_string(file).unwrap_or_default();
        out.extend(
            parse_listeners(&table, v6)
                .into_iter()
                .filter(|l| inodes.contains(&l.inode)),
        );
    }
    out.sort_by(|a, b| (a.port, &a.addr).cmp(&(b.port, &b.addr)));
    out.dedup_by(|a, b| a.port == b.port);
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
) -> Result<Vec<Listener>, String> {
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
    let child = Command::new(exe)
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
    let mut last: Option<Vec<Listener>> = None;
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
        let now = listeners_of(&tree(trial.0.id()));
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
    fn listen_sockets_from_the_kernels_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 100 0 0 10 0\n\
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1 0 100 0 0 10 0\n\
   2: 0100007F:1F90 0100007F:D3A2 01 00000000:00000000 00:00000000 00000000  1000        0 99 1 0 20 4 30 10 -1\n";
        let l = parse_listeners(tcp, false);
        assert_eq!(
            l,
            [
                Listener {
                    addr: "127.0.0.1".into(),
                    port: 8080,
                    inode: 4242
                },
                Listener {
                    addr: "0.0.0.0".into(),
                    port: 22,
                    inode: 17
                }
            ]
        );
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000001000000:2382 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   106        0 555 1 0 100 0 0 10 0\n";
        let l6 = parse_listeners(tcp6, true);
        assert_eq!(l6[0].addr, "::1");
        assert_eq!(l6[0].port, 9090);
        assert_eq!(probe_target(&l6[0]), "[::1]:9090");
        assert_eq!(
            probe_target(&Listener {
                addr: "10.0.0.5".into(),
                port: 80,
                inode: 1
            }),
            "10.0.0.5:80"
        );
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
