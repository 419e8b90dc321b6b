//! The supervisor's control socket: `warmer checkpoint SVC` asks the running
//! `warmer run SVC` to act now.
//!
//! ```text
//! <run>/<svc>/control.sock    unix stream socket, 0600 in a 0700 root dir;
//!                             peers must be root (SO_PEERCRED)
//! request:  one line, "checkpoint"
//! reply:    one line of JSON, {"ok": {...}} or {"err": "..."}
//! ```
//!
//! A thread accepts connections and hands them to the supervisor's loop
//! (which owns the service) through a channel, waking it at once.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const SOCKET: &str = "control.sock";

/// What a client asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Checkpoint,
}

/// A checkpoint taken on request.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Checkpointed {
    pub key: String,
    pub generation: u64,
    /// How long the service was frozen (the dump, start to end).
    pub frozen_ms: u64,
}

/// What the supervisor answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    Ok(Checkpointed),
    Err(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("service {service} is not running under warmer here (no {})", path.display())]
    NotRunning {
        service: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the supervisor over {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the supervisor's reply is not understood: {0}")]
    BadReply(String),
}

/// A request waiting for its reply.
pub struct Pending {
    pub request: Request,
    stream: UnixStream,
}

impl Pending {
    pub fn reply(mut self, reply: &Reply) {
        let mut line = serde_json::to_string(reply).expect("reply serializes");
        line.push('\n');
        let _ = self.stream.write_all(line.as_bytes());
    }
}

/// The supervisor's side.
pub struct ControlServer {
    rx: Receiver<Pending>,
    path: PathBuf,
}

impl ControlServer {
    /// Listens on `<run_dir>/control.sock`; `wake` gets a byte per request.
    pub fn start(run_dir: &Path, wake: UnixStream) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let path = run_dir.join(SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("warmer-control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    if let Some(p) = read_request(stream) {
                        if tx.send(p).is_err() {
                            return;
                        }
                        let _ = (&wake).write_all(b"c");
                    }
                }
            })?;
        Ok(Self { rx, path })
    }

    /// The next request, if one is waiting.
    pub fn next(&self) -> Option<Pending> {
        self.rx.try_recv().ok()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_request(mut stream: UnixStream) -> Option<Pending> {
    // Root only, whatever the socket's mode says.
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
    if !peer.is_ok_and(|c| c.uid() == 0) {
        let _ = stream.write_all(b"{\"err\":\"permission denied: root only\"}\n");
        return None;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).ok()?;
    let request = match line.trim() {
        "checkpoint" => Request::Checkpoint,
        other => {
            let reply = Reply::Err(format!("unknown request {other:?}"));
            let _ = writeln!(
                stream,
                "{}",
                serde_json::to_string(&reply).expect("serializes")
            );
            return None;
        }
    };
    Some(Pending { request, stream })
}

/// The client's side: sends `request` to the supervisor of `service` and
/// waits up to `timeout` for the reply.
pub fn send(
    run_dir: &Path,
    service: &str,
    request: Request,
    timeout: Duration,
) -> Result<Reply, ControlError> {
    let path = run_dir.join(service).join(SOCKET);
    let mut stream = UnixStream::connect(&path).map_err(|source| ControlError::NotRunning {
        service: service.to_string(),
        path: path.clone(),
        source,
    })?;
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let line = match request {
        Request::Checkpoint => "checkpoint\n",
    };
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
    serde_json::from_str(reply.trim()).map_err(|_| ControlError::BadReply(reply.trim().to_string()))
}
