//! Small filesystem primitives every on-disk file of warmer goes through:
//! atomic replacement, file identity and the boot id.
//!
//! One of each, shared by the cache (entries, stamps, stale marks) and by
//! warmer's own files (the per-boot memo, run records, state put-back), so the
//! rules are written once: never truncate-and-rewrite in place; write a new
//! file, then rename it over the old one; fsync the file and its directory
//! when the data must survive a power cut.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Whether a write must survive a crash of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file before the rename and the directory after it: the file
    /// is the old one or the new one after a power cut, never empty or torn.
    Fsync,
    /// Atomic against crashes of the process only (files in a tmpfs such as
    /// `/run`, or caches that are rebuilt when lost).
    Atomic,
}

/// Replaces `dir/name` with `bytes` (mode `mode`): a temporary file unique to
/// this process and call, then a rename. Concurrent writers never trip over
/// each other's temporary files; readers see the old or the new content.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    mode: u32,
    durability: Durability,
) -> io::Result<()> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp.{}.{seq}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durability == Durability::Fsync {
            f.sync_all()?;
        }
        fs::rename(&tmp, dir.join(name))?;
        if durability == Durability::Fsync {
            fsync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsync a directory, making renames and creations in it durable.
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// What identifies a file's content without reading it: any write, truncate,
/// chmod, chown or replacement changes ctime or the inode, and ctime cannot
/// be set from user space (only by changing the system clock, which is
/// root's). Within one boot, an unchanged identity means unchanged bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub uid: u32,
    pub mode: u32,
}

impl FileIdentity {
    pub fn of(md: &fs::Metadata) -> Self {
        Self {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
            ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
            uid: md.uid(),
            mode: md.mode(),
        }
    }

    /// The identity of `path` (following symlinks), if it can be stat'ed.
    pub fn of_path(path: &Path) -> Option<Self> {
        fs::metadata(path).ok().map(|md| Self::of(&md))
    }
}

/// Why a path cannot be trusted by `uid`: someone else could have written it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("{}: owned by uid {owner}; only uid {expected} (or root) may own it", path.display())]
    Owner {
        path: std::path::PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error("{}: writable by {} (mode {mode:o}); only its owner may write it", path.display(), if mode & 0o002 != 0 { "everyone" } else { "its group" })]
    Writable { path: std::path::PathBuf, mode: u32 },
    #[error("{}: cannot check it: {error}", path.display())]
    Unreadable {
        path: std::path::PathBuf,
        error: String,
    },
}

/// Checks `path` and every directory above it, up to `/`, as sudo and ssh
/// check their files: each must be owned by `uid` or root, and not writable
/// by anyone else; a directory writable by others is accepted only with the
/// sticky bit (like `/tmp`: others cannot rename or remove what is ours).
/// Symlinks are followed (the checked chain is the real one), so a link to
/// a file someone else owns is refused.
pub fn check_trusted(path: &Path, uid: u32) -> Result<(), Untrusted> {
    let real = fs::canonicalize(path).map_err(|e| Untrusted::Unreadable {
        path: path.to_path_buf(),
        error: e.to_string(),
    })?;
    let mut cur = Some(real.as_path());
    while let Some(p) = cur {
        let md = fs::metadata(p).map_err(|e| Untrusted::Unreadable {
            path: p.to_path_buf(),
            error: e.to_string(),
        })?;
        if md.uid() != uid && md.uid() != 0 {
            return Err(Untrusted::Owner {
                path: p.to_path_buf(),
                owner: md.uid(),
                expected: uid,
            });
        }
        let mode = md.mode() & 0o7777;
        let sticky_dir = md.is_dir() && mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !sticky_dir {
            return Err(Untrusted::Writable {
                path: p.to_path_buf(),
                mode,
            });
        }
        cur = p.parent();
    }
    Ok(())
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`); empty if unknown,
/// which callers treat as "nothing from an earlier check can be trusted".
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        for d in [Durability::Fsync, Durability::Atomic] {
            write_atomic(dir.path(), "f", b"one", 0o600, d).unwrap();
            write_atomic(dir.path(), "f", b"two", 0o600, d).unwrap();
            assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"two");
        }
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|d| d.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
        let mode = fs::metadata(dir.path().join("f")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn trust_needs_the_right_owner_and_no_foreign_writers_up_to_the_root() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let f = dir.path().join("m.yaml");
        fs::write(&f, "x").unwrap();
        check_trusted(&f, me).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            check_trusted(&f, me),
            Err(Untrusted::Writable { .. })
        ));
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            matches!(check_trusted(&f, me), Err(Untrusted::Writable { .. })),
            "a 0777 parent"
        );
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        check_trusted(&f, me).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        if me == 0 {
            nix::unistd::chown(&f, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            assert!(matches!(
                check_trusted(&f, 0),
                Err(Untrusted::Owner { owner: 65534, .. })
            ));
            // A symlink of ours to a file someone else owns is refused too.
            let link = dir.path().join("link.yaml");
            std::os::unix::fs::symlink(&f, &link).unwrap();
            assert!(matches!(
                check_trusted(&link, 0),
                Err(Untrusted::Owner { .. })
            ));
        }
    }

    #[test]
    fn identity_changes_with_content_and_owner_bits() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        fs::write(&f, "a").unwrap();
        let a = FileIdentity::of_path(&f).unwrap();
        assert_eq!(Some(a.clone()), FileIdentity::of_path(&f));
        fs::write(&f, "bb").unwrap();
        assert_ne!(Some(a), FileIdentity::of_path(&f));
        assert!(!boot_id().is_empty());
    }
}
