//! The manifest's `pid_file`: the service's PID as the host sees it.
//!
//! A service runs as PID 2 of warmer's PID namespace (warmer-init is 1), so
//! the PID file it writes for the host's tools says `2`: PostgreSQL's
//! `/run/postgresql/15-main.pid` made `pg_lsclusters` call a running cluster
//! `down`. After a restore the file is older still (written before the
//! checkpoint, or gone with a reboot's /run). So warmer writes the file
//! itself once the service is ready, cold or restored: the host PID of the
//! service's main process (warmer-init's child), as systemd's `PIDFile=`
//! expects; and removes it when the service has stopped, if it still names
//! that process.
//!
//! Root writes in a directory the service's user may own: the file is
//! replaced by a new one made beside it (`O_EXCL`, never following a link)
//! and renamed over it relative to a descriptor of the directory, so a link
//! planted in its place is replaced, never written through. The new file
//! keeps the old one's owner and mode (0644 root when there was none).

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{openat, renameat, OFlag, AT_FDCWD};
use nix::sys::stat::{fstatat, Mode};
use nix::unistd::{fchown, unlinkat, Gid, Uid, UnlinkatFlags};

#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error("pid_file {}: {what}", path.display())]
    Io {
        path: std::path::PathBuf,
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("pid_file {}: not a path of a file", .0.display())]
    NotAFile(std::path::PathBuf),
}

fn split(path: &Path) -> Result<(&Path, &OsStr), PidFileError> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => Ok((dir, name)),
        _ => Err(PidFileError::NotAFile(path.to_path_buf())),
    }
}

fn open_dir(path: &Path, dir: &Path) -> Result<OwnedFd, PidFileError> {
    openat(
        AT_FDCWD,
        dir,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| PidFileError::Io {
        path: path.to_path_buf(),
        what: "opening its directory",
        source,
    })
}

/// Writes `pid` (a host PID) into `path`, replacing what is there.
pub fn write(path: &Path, pid: i32) -> Result<(), PidFileError> {
    let (dir, name) = split(path)?;
    let dirfd = open_dir(path, dir)?;
    let err = |what: &'static str| {
        move |source| PidFileError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    // Owner and mode of what is there now (a link counts as nothing).
    let (uid, gid, mode) = match fstatat(&dirfd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
            (st.st_uid, st.st_gid, st.st_mode & 0o777)
        }
        _ => (0, 0, 0o644),
    };
    let tmp_name = format!(".{}.warmer-{}", name.to_string_lossy(), std::process::id());
    let tmp = CString::new(tmp_name.as_bytes()).expect("no NUL in a file name");
    let _ = unlinkat(&dirfd, tmp.as_c_str(), UnlinkatFlags::NoRemoveDir);
    let fd = openat(
        &dirfd,
        tmp.as_c_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )
    .map_err(err("creating it"))?;
    let written = nix::unistd::write(&fd, format!("{pid}\n").as_bytes())
        .map(|_| ())
        .and_then(|()| {
            fchown(
                fd.as_fd(),
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
            )
        })
        .and_then(|()| nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(mode)))
        .map_err(err("writing it"))
        .and_then(|()| {
            renameat(&dirfd, tmp.as_c_str(), &dirfd, name).map_err(err("renaming it into place"))
        });
    if written.is_err() {
        let _ = unlinkat(&dirfd, tmp.as_c_str(), UnlinkatFlags::NoRemoveDir);
    }
    drop(fd);
    written
}

/// Removes `path` if it still names `pid` (a service that rewrote it since
/// keeps its own).
pub fn remove_if(path: &Path, pid: i32) -> Result<bool, PidFileError> {
    let (dir, name) = split(path)?;
    let dirfd = open_dir(path, dir)?;
    let fd = match openat(
        &dirfd,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::Error::ENOENT | nix::Error::ELOOP) => return Ok(false),
        Err(source) => {
            return Err(PidFileError::Io {
                path: path.to_path_buf(),
                what: "opening it",
                source,
            })
        }
    };
    let mut buf = [0u8; 32];
    let n = nix::unistd::read(&fd, &mut buf).unwrap_or(0);
    let says = std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    if says != Some(pid) {
        return Ok(false);
    }
    unlinkat(
        &dirfd,
        OsStr::from_bytes(name.as_bytes()),
        UnlinkatFlags::NoRemoveDir,
    )
    .map_err(|source| PidFileError::Io {
        path: path.to_path_buf(),
        what: "removing it",
        source,
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_the_pid_keeping_owner_and_mode_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("svc.pid");
        std::fs::write(&p, "2\n").unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        write(&p, 4242).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "4242\n");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        // A link planted where the file was is replaced, its target untouched.
        let target = dir.path().join("precious");
        std::fs::write(&target, "keep").unwrap();
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&target, &p).unwrap();
        write(&p, 7).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(!std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "7\n");
        // Removed only while it names that process.
        assert!(!remove_if(&p, 8).unwrap());
        assert!(remove_if(&p, 7).unwrap());
        assert!(!p.exists());
        assert!(!remove_if(&p, 7).unwrap(), "already gone");
    }
}
