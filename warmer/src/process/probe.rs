//! Readiness probes: one attempt at a time, each bounded in time.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::manifest::{HttpUrl, Probe};

/// Longest a single attempt may take; the overall deadline is the manifest's.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// The pause between probe attempts: 1 ms, doubling up to 20 ms. Short at
/// first because a restored service is usually ready at once; capped so a
/// cold start's ready time is not overstated by more than 20 ms.
#[derive(Debug, Clone, Copy)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(1))
    }
}

impl Backoff {
    pub fn next_pause(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Duration::from_millis(20));
        now
    }
}

/// How waiting for readiness ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// The service exited first, with this status.
    Exited(i32),
    /// The service exited after warmer passed it a signal from the operator.
    ExitedAfterSignal(i32),
    /// warmer was asked to stop first.
    Stopped,
    /// Not ready within this time.
    TimedOut(Duration),
    /// Before the probe: the service's `after_restore` hook failed (why).
    HookFailed(String),
}

/// The outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Ready,
    NotReady,
    /// An answer came, but from a process outside the service: not ready.
    Foreign {
        port: u16,
        who: String,
    },
}

/// A probe ready to be polled.
pub enum Prober {
    Http(HttpUrl),
    Tcp(String),
    Exec(Vec<String>),
    Notify(NotifySocket),
}

impl Prober {
    /// `notify_socket` is where a notify probe listens (bound here).
    pub fn new(probe: &Probe, notify_socket: &Path) -> std::io::Result<Self> {
        Ok(match probe {
            Probe::Http(u) => Prober::Http(u.clone()),
            Probe::Tcp(a) => Prober::Tcp(a.clone()),
            Probe::Exec(argv) => Prober::Exec(argv.clone()),
            Probe::Notify => Prober::Notify(NotifySocket::bind(notify_socket)?),
        })
    }

    /// One attempt, taking at most `min(limit, 2 s)`.
    pub fn check(&mut self, limit: Duration) -> bool {
        let limit = limit.clamp(Duration::from_millis(10), ATTEMPT_TIMEOUT);
        match self {
            Prober::Http(url) => http_ok(url, limit),
            Prober::Tcp(addr) => {
                connect(addr, crate::process::clock::deadline(limit)).is_some_and(reset)
            }
            Prober::Exec(argv) => exec_ok(argv, limit),
            Prober::Notify(sock) => sock.ready_seen(),
        }
    }

    /// One attempt whose answer counts only if it came from the service
    /// whose namespace init is `init` (for local http/tcp probes; see
    /// [`crate::process::ports`]).
    pub fn check_from(&mut self, limit: Duration, init: nix::unistd::Pid) -> Check {
        if !self.check(limit) {
            return Check::NotReady;
        }
        let port = match self {
            Prober::Http(u) if crate::process::ports::is_local(&u.host) => Some(u.port),
            Prober::Tcp(a) => a
                .rsplit_once(':')
                .filter(|(h, _)| crate::process::ports::is_local(h))
                .and_then(|(_, p)| p.parse().ok()),
            _ => None,
        };
        match port.map(|p| (p, crate::process::ports::holder(p, init))) {
            Some((port, crate::process::ports::Holder::Other(who))) => Check::Foreign { port, who },
            _ => Check::Ready,
        }
    }

    pub fn is_notify(&self) -> bool {
        matches!(self, Prober::Notify(_))
    }
}

/// Closes a probe's connection with a reset (SO_LINGER 0) rather than a FIN:
/// a service that accepted it and waits for data (ZooKeeper) then holds a
/// closed socket, not one in CLOSE_WAIT that no checkpoint can dump.
fn reset(s: TcpStream) -> bool {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(e) = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger) {
        tracing::debug!("probe: cannot set SO_LINGER: {e}");
    }
    drop(s);
    true
}

/// Connects to the first address of `addr` that answers before `deadline`.
fn connect(addr: &str, deadline: Instant) -> Option<TcpStream> {
    let addrs = addr.to_socket_addrs().ok()?;
    for a in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        if let Ok(s) = TcpStream::connect_timeout(&a, left) {
            return Some(s);
        }
    }
    None
}

/// GET the URL with HTTP/1.1 and `Connection: close`; any 2xx is ready.
/// The whole attempt (connect, write, every read) ends by `limit`.
fn http_ok(url: &HttpUrl, limit: Duration) -> bool {
    let deadline = crate::process::clock::deadline(limit);
    let host = url.host.trim_start_matches('[').trim_end_matches(']');
    let Some(mut s) = connect(&format!("{}:{}", url.host, url.port), deadline)
        .or_else(|| connect(&format!("{host}:{}", url.port), deadline))
    else {
        return false;
    };
    // Each read waits at most what is left of the attempt.
    let left = || {
        let l = deadline.saturating_duration_since(Instant::now());
        (!l.is_zero()).then_some(l)
    };
    let Some(l) = left() else { return false };
    let _ = s.set_write_timeout(Some(l));
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: warmer-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.path, url.host, url.port
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let Some(l) = left() else { break };
        let _ = s.set_read_timeout(Some(l));
        match s.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let ok = status_is_2xx(&head[..got]);
    // Read the rest (up to 64 KiB) before closing: closing a socket with
    // unread data sends a RST, and the service would log a reset connection
    // for every probe.
    let mut rest = [0u8; 4096];
    let mut total = 0usize;
    while total < 64 * 1024 {
        let Some(l) = left() else { break };
        let _ = s.set_read_timeout(Some(l));
        match s.read(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    ok
}

fn status_is_2xx(head: &[u8]) -> bool {
    // "HTTP/1.1 200 OK"
    let text = String::from_utf8_lossy(head);
    let mut parts = text.split_whitespace();
    matches!(parts.next(), Some(v) if v.starts_with("HTTP/"))
        && parts
            .next()
            .is_some_and(|code| code.len() == 3 && code.starts_with('2'))
}

/// Runs an `exec` probe in a process group of its own; whatever it leaves
/// behind (a shell's background children) is killed with the group when it
/// exits or runs out of time: a probe never leaves a process.
fn exec_ok(argv: &[String], limit: Duration) -> bool {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    matches!(
        crate::process::hooks::run_in_group(&mut cmd, limit),
        Ok(Some(status)) if status.success()
    )
}

/// The `$NOTIFY_SOCKET` a notify-probed service talks to.
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    ready: bool,
}

impl NotifySocket {
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path)?;
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock,
            path: path.to_path_buf(),
            ready: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ready_seen(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l.trim() == "READY=1")
            {
                self.ready = true;
            }
        }
        self.ready
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn http_status_lines() {
        assert!(status_is_2xx(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_is_2xx(b"HTTP/1.0 204 No Content\r\n"));
        assert!(!status_is_2xx(b"HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(!status_is_2xx(b"HTTP/1.1 2000\r\n"));
        assert!(!status_is_2xx(b"SSH-2.0"));
    }

    #[test]
    fn http_probe_against_a_local_server() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for (i, s) in l.incoming().take(2).enumerate() {
                let mut s = s.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let reply: &[u8] = if i == 0 {
                    b"HTTP/1.1 503 Loading\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                };
                s.write_all(reply).unwrap();
            }
        });
        let url =
            crate::manifest::parse_http_url(&format!("http://127.0.0.1:{port}/health")).unwrap();
        let mut p = Prober::Http(url);
        assert!(!p.check(Duration::from_secs(1)), "503 is not ready");
        assert!(p.check(Duration::from_secs(1)), "200 is ready");
        server.join().unwrap();
        assert!(
            !p.check(Duration::from_millis(100)),
            "closed port is not ready"
        );
    }

    #[test]
    fn exec_and_notify_probes() {
        assert!(Prober::Exec(vec!["true".into()]).check(Duration::from_secs(1)));
        assert!(!Prober::Exec(vec!["false".into()]).check(Duration::from_secs(1)));
        assert!(!Prober::Exec(vec!["sleep".into(), "5".into()]).check(Duration::from_millis(50)));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let mut p = Prober::new(&Probe::Notify, &path).unwrap();
        assert!(!p.check(Duration::from_millis(10)));
        let c = UnixDatagram::unbound().unwrap();
        c.send_to(b"STATUS=loading\n", &path).unwrap();
        assert!(!p.check(Duration::from_millis(10)));
        c.send_to(b"STATUS=up\nREADY=1\n", &path).unwrap();
        assert!(p.check(Duration::from_millis(10)));
    }
}
