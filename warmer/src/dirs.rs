//! Where warmer finds and keeps things: manifests, the image cache, the run
//! directory. Every command works on one [`Dirs`].
//!
//! ```text
//! <manifests>/<svc>.yaml          what to run (root-owned)
//! <cache>/                        the image store (see the `cache` crate)
//! <run>/                          runtime state, a tmpfs under systemd
//!   .memo.json                    per-boot memo of input hashes (see `memo`)
//!   <svc>/                        0700: one service's run directory
//!     state.json                  what `warmer status` shows (see `state`)
//!     notify.sock                 the service's NOTIFY_SOCKET (notify probe)
//!     dump.log restore.log ...    CRIU's logs of the last operations
//! ```

use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Dirs {
    pub manifests: PathBuf,
    pub cache: PathBuf,
    pub run: PathBuf,
}

impl Dirs {
    /// The directories, made absolute: images refer to the run directory by
    /// path, so `--run-dir run` and `--run-dir $PWD/run` must be the same.
    pub fn new(manifests: PathBuf, cache: PathBuf, run: PathBuf) -> Self {
        Self {
            manifests: absolute(manifests),
            cache: absolute(cache),
            run: absolute(run),
        }
    }

    /// One service's run directory.
    pub fn service_run(&self, service: &str) -> PathBuf {
        self.run.join(service)
    }
}

fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

/// Why a run directory is not used.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing the run directory {}", path.display())]
    Untrusted {
        path: PathBuf,
        #[source]
        why: cache::fsutil::Untrusted,
    },
    #[error("refusing {}: not a directory of its own (a symlink or another file is there)", .0.display())]
    NotADirectory(PathBuf),
}

impl Dirs {
    /// One service's run directory, made ready for root to write in:
    /// created 0700 if missing, a real directory (never a symlink), owned by
    /// warmer's user, and, like the cache and the manifests, with no one
    /// else able to write it or any directory above it (sticky ones aside),
    /// so nothing in it can be swapped under warmer after this check, and
    /// paths inside it may be used as they are (openssh's `secure_path`
    /// reasoning).
    pub fn service_run_checked(&self, service: &str) -> Result<PathBuf, RunDirError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        if !self.run.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&self.run)
                .map_err(|source| RunDirError::Create {
                    path: self.run.clone(),
                    source,
                })?;
        }
        let uid = nix::unistd::geteuid().as_raw();
        cache::fsutil::check_trusted(&self.run, uid).map_err(|why| RunDirError::Untrusted {
            path: self.run.clone(),
            why,
        })?;
        let path = self.service_run(service);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(RunDirError::Create { path, source }),
        }
        let md = std::fs::symlink_metadata(&path).map_err(|source| RunDirError::Create {
            path: path.clone(),
            source,
        })?;
        if !md.file_type().is_dir() || md.uid() != uid {
            return Err(RunDirError::NotADirectory(path));
        }
        if md.mode() & 0o777 != 0o700 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| RunDirError::Create {
                    path: path.clone(),
                    source,
                },
            )?;
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_spellings_are_the_same_dirs() {
        let cwd = std::env::current_dir().unwrap();
        let a = Dirs::new("m".into(), "c".into(), "run".into());
        let b = Dirs::new(cwd.join("m"), cwd.join("c"), cwd.join("run"));
        // The run directory is a digest input: one spelling, one image.
        assert_eq!(a.run, b.run);
        assert_eq!(a.cache, b.cache);
        assert!(a.service_run("web").is_absolute());
    }
}
