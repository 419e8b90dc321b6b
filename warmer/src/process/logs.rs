//! The service's stdout/stderr: pipes owned by warmer, copied to warmer's own.
//!
//! At a checkpoint the pipes' identities (`pipe:[INODE]`) are recorded; a
//! restore hands CRIU the write ends of fresh pipes with `--inherit-fd`, so the
//! restored service writes into this warmer's pipes, not into the void.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::thread::JoinHandle;

use nix::fcntl::OFlag;

/// One direction of output: a pipe whose read end is pumped to our own fd.
pub struct OutputPipe {
    write: Option<OwnedFd>,
    resource: String,
    pump: Option<JoinHandle<()>>,
}

#[derive(Clone, Copy)]
pub enum Sink {
    Stdout,
    Stderr,
    /// Read and dropped (benchmarks).
    Discard,
}

impl OutputPipe {
    pub fn new(sink: Sink) -> io::Result<Self> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let resource = format!("pipe:[{}]", nix::sys::stat::fstat(&w)?.st_ino);
        let pump = std::thread::Builder::new()
            .name("warmer-log".into())
            .spawn(move || pump(File::from(r), sink))?;
        Ok(Self {
            write: Some(w),
            resource,
            pump: Some(pump),
        })
    }

    /// The write end, to hand to the service (or CRIU).
    pub fn write_fd(&self) -> BorrowedFd<'_> {
        self.write
            .as_ref()
            .expect("write end is open until closed")
            .as_fd()
    }

    /// `pipe:[INODE]`, as /proc/PID/fd shows it and `--inherit-fd` wants it.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// Drops our copy of the write end once the service holds its own, so the
    /// pump sees EOF when the service is gone.
    pub fn close_write(&mut self) {
        self.write = None;
    }

    /// Waits for the pump to drain (after the service is gone).
    pub fn finish(mut self) {
        self.close_write();
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
    }
}

fn pump(mut from: File, sink: Sink) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        // A closed or full sink must not stop the pump: the service would
        // block on a full pipe. Output that cannot be written is dropped.
        let _ = match sink {
            Sink::Stdout => {
                let mut o = io::stdout().lock();
                o.write_all(&buf[..n]).and_then(|_| o.flush())
            }
            Sink::Stderr => io::stderr().lock().write_all(&buf[..n]),
            Sink::Discard => Ok(()),
        };
    }
}

/// stdout and stderr of one service instance.
pub struct Output {
    pub stdout: OutputPipe,
    pub stderr: OutputPipe,
}

impl Output {
    /// Pipes copied to warmer's own stdout and stderr.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            stdout: OutputPipe::new(Sink::Stdout)?,
            stderr: OutputPipe::new(Sink::Stderr)?,
        })
    }

    /// Pipes whose contents are dropped.
    pub fn discarding() -> io::Result<Self> {
        Ok(Self {
            stdout: OutputPipe::new(Sink::Discard)?,
            stderr: OutputPipe::new(Sink::Discard)?,
        })
    }

    pub fn close_write(&mut self) {
        self.stdout.close_write();
        self.stderr.close_write();
    }

    pub fn finish(self) {
        self.stdout.finish();
        self.stderr.finish();
    }
}
