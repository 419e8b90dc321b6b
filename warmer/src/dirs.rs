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

use std::path::{Path, PathBuf};

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

/// Creates `path` (and parents) and makes it 0700.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
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
