//! A sandboxed image's restore: what CRIU needs besides the image.
//!
//! The image's external mounts (the host mounts bound into the namespace)
//! are bound again from the same host paths; its tmpfs that were empty at
//! the dump are made afresh (CRIU would run tar twice for each, ~4 ms). CRIU binds each
//! non-recursively from inside the new user namespace, where a source with
//! mounts below it is refused (they are locked to it): so CRIU runs in a
//! mount namespace of its own, with a childless bind of each source and of
//! the root prepared there before it starts (nothing of it is left on the
//! host when CRIU exits). After CRIU, the tree's /proc is mounted again from
//! inside its PID namespace (CRIU mounts it from its own), before the tree
//! is resumed.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::SandboxError;

/// The childless sources of one restore, prepared before CRIU is forked.
#[derive(Debug)]
pub struct Sources {
    root: CString,
    binds: Vec<(CString, CString)>,
    /// Fresh tmpfs for the image's empty ones: where, and `mode=...`.
    tmpfs: Vec<(CString, CString)>,
    /// CRIU's arguments: `--root` and one `--external mnt[KEY]:SOURCE` each.
    pub args: Vec<OsString>,
}

fn cstr(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| SandboxError::Path(p.to_path_buf()))
}

impl Sources {
    /// Plans the sources of `externals` (the image's, from its
    /// `restore.json`) under `run_dir`/mnt: a bind of the same host path,
    /// or for one of `empty_tmpfs` a fresh tmpfs with its mode.
    pub fn new(
        run_dir: &Path,
        externals: &[PathBuf],
        empty_tmpfs: &[crate::image::EmptyTmpfs],
    ) -> Result<Self, SandboxError> {
        let base = run_dir.join("mnt");
        let dir = |p: &Path| {
            std::fs::create_dir_all(p).map_err(|source| SandboxError::Directory {
                path: p.to_path_buf(),
                source,
            })
        };
        let root = base.join("root");
        dir(&root)?;
        let mut args: Vec<OsString> = vec!["--root".into(), root.clone().into()];
        let mut binds = Vec::new();
        let mut tmpfs = Vec::new();
        for (i, key) in externals.iter().enumerate() {
            if !super::mounts::usable_key(key) {
                return Err(SandboxError::Path(key.clone()));
            }
            if let Some(t) = empty_tmpfs.iter().find(|t| &t.path == key) {
                let at = base.join(i.to_string());
                dir(&at)?;
                args.extend(crate::criu::external_mount(key, &at));
                let data = CString::new(format!("mode={:o}", t.mode & 0o7777))
                    .expect("no NUL in a number");
                tmpfs.push((cstr(&at)?, data));
                continue;
            }
            if key.symlink_metadata().is_err() {
                return Err(SandboxError::Missing(key.clone()));
            }
            let at = base.join(i.to_string());
            // A file is bound on a file, a directory on a directory.
            if key.is_dir() {
                dir(&at)?;
            } else if !at.exists() {
                std::fs::write(&at, b"").map_err(|source| SandboxError::Directory {
                    path: at.clone(),
                    source,
                })?;
            }
            args.extend(crate::criu::external_mount(key, &at));
            binds.push((cstr(key)?, cstr(&at)?));
        }
        Ok(Sources {
            root: cstr(&root)?,
            binds,
            tmpfs,
            args,
        })
    }

    /// In CRIU's child before exec: a private mount namespace with the
    /// sources bound.
    ///
    /// # Safety
    /// Only in a forked child (`pre_exec`): async-signal-safe calls only.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        // SAFETY: unshare/mount on prepared NUL-terminated strings.
        unsafe {
            let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    c"/".as_ptr(),
                    self.root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0;
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
            for (src, at) in &self.binds {
                if libc::mount(
                    src.as_ptr(),
                    at.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The flags the sandbox gives its own tmpfs (see child.rs).
            for (at, data) in &self.tmpfs {
                if libc::mount(
                    c"tmpfs".as_ptr(),
                    at.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    data.as_ptr().cast(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }
}

/// Mounts the restored tree's /proc again, and makes its read-only mount
/// points read-only again, from inside its namespaces: a
/// child joins its user and mount namespaces and forks into its PID
/// namespace, where the grandchild mounts a /proc of that namespace over
/// the one CRIU made. The tree stays stopped meanwhile.
pub fn remount_proc(init: i32, read_only: &[PathBuf]) -> std::io::Result<()> {
    let ro: Vec<CString> = read_only
        .iter()
        .map(|p| cstr(p).map_err(|e| std::io::Error::other(e.to_string())))
        .collect::<Result<_, _>>()?;
    let open = |ns: &str| -> std::io::Result<OwnedFd> {
        Ok(std::fs::File::open(format!("/proc/{init}/ns/{ns}"))?.into())
    };
    let (user, mnt, pid) = (open("user")?, open("mnt")?, open("pid")?);
    let (user, mnt, pid) = (user.as_raw_fd(), mnt.as_raw_fd(), pid.as_raw_fd());
    // SAFETY: fork in a threaded program: the child makes only
    // async-signal-safe calls (setns, fork, mount, waitpid, _exit).
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: see above.
        unsafe {
            if libc::setns(user, libc::CLONE_NEWUSER) != 0
                || libc::setns(mnt, libc::CLONE_NEWNS) != 0
                || libc::setns(pid, libc::CLONE_NEWPID) != 0
            {
                libc::_exit(1);
            }
            let inner = libc::fork();
            if inner == 0 {
                let ok = libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH) == 0
                    && libc::mount(
                        c"proc".as_ptr(),
                        c"/proc".as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        std::ptr::null(),
                    ) == 0;
                if !ok {
                    libc::_exit(2);
                }
                // Read-only again where the image's namespace was, with
                // the flags each mount has.
                for p in &ro {
                    let mut st: libc::statvfs = std::mem::zeroed();
                    if libc::statvfs(p.as_ptr(), &mut st) != 0 {
                        libc::_exit(5);
                    }
                    if st.f_flag & libc::ST_RDONLY != 0 {
                        continue;
                    }
                    let flags = libc::MS_REMOUNT
                        | libc::MS_BIND
                        | libc::MS_RDONLY
                        | super::child::kept_flags(&st);
                    if libc::mount(
                        std::ptr::null(),
                        p.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ) != 0
                    {
                        libc::_exit(6);
                    }
                }
                libc::_exit(0);
            }
            let mut status = 0;
            if inner < 0 || libc::waitpid(inner, &mut status, 0) != inner {
                libc::_exit(3);
            }
            libc::_exit(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                4
            });
        }
    }
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None)
        .map_err(std::io::Error::from)?;
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        other => Err(std::io::Error::other(format!(
            "remounting the restored namespace's /proc failed: {other:?}"
        ))),
    }
}
