use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::Error;

/// An exclusive per-service lock, held until dropped. Released by the kernel
/// if the holder dies, so a crash never leaves a service locked.
#[derive(Debug)]
pub struct ServiceLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl ServiceLock {
    pub(crate) fn acquire(path: &Path, service: &str, wait: bool) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(Error::io(path))?;
        let arg = if wait {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockExclusiveNonblock
        };
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(Self {
                _lock: lock,
                path: path.to_path_buf(),
            }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(Error::Locked {
                service: service.to_string(),
                path: path.to_path_buf(),
            }),
            Err((_, errno)) => Err(Error::Io {
                path: path.to_path_buf(),
                source: errno.into(),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
