//! A sandboxed image's restore: what CRIU needs besides the image.
//!
//! The image's external mounts (the host mounts bound into the namespace)
//! are bound again from the same host paths; its tmpfs that were empty at
//! the dump are made afresh (CRIU would run tar twice for each, ~4 ms). CRIU binds each
//! non-recursively from inside the new user namespace, where a source with
//! mounts below it is refused (they are locked to it): so CRIU runs in a
//! mount namespace of its own, with a childless bind of each source and of
//! the root prepared there before it starts (nothing of it is left on the
//! host when CRIU exits). CRIU's scratch directories go on a tmpfs of that
//! namespace (see [`Sources::scratch_tmp`]). After CRIU, the tree's /proc is
//! mounted again from inside its PID namespace (CRIU mounts it from its
//! own), before the tree is resumed.

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
    /// A tmpfs on CRIU's /tmp (see [`Sources::scratch_tmp`]).
    scratch: bool,
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
        // CRIU's first mount engine (`--mntns-compat-mode`) mounts each
        // mount in its place; its default since 3.17 makes each in a yard
        // of its own, then moves it into the namespace (a directory, two
        // mounts, a clone and a move per mount, and a second `pivot_root`).
        // On a sandbox's tree (private mounts, no propagation across
        // namespaces, no mount over another's files) both make the same
        // table, and the first in 3 ms less here (docs/sandbox.md).
        let mut args: Vec<OsString> = vec![
            "--root".into(),
            root.clone().into(),
            "--mntns-compat-mode".into(),
        ];
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
            scratch: false,
            args,
        })
    }

    /// CRIU makes and removes its scratch directories under /tmp on every
    /// restore into a mount namespace: its mount yard, the path it binds
    /// an overmounted source through, a mount point for /proc; its released
    /// helper removes the yard as the restore ends. On the host's /tmp, a
    /// disk here, each removal took 0.35-0.7 ms, on the restore's path (and
    /// a CRIU that died left them there). So they go on a tmpfs of CRIU's
    /// own mount namespace, seen by nobody else and gone with it: unless
    /// /tmp is not a plain directory or one of `criu_paths` (its binary,
    /// image, work and run directories) is under it, which the tmpfs would
    /// hide; then CRIU uses the host's /tmp as before.
    pub fn scratch_tmp(&mut self, criu_paths: &[&Path]) {
        self.scratch = scratch_tmp_usable(Path::new("/tmp"), criu_paths);
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
            // Best effort: without it CRIU uses the host's /tmp.
            if self.scratch {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/tmp".as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"mode=1777".as_ptr().cast(),
                );
            }
        }
        Ok(())
    }
}

/// Whether a tmpfs on `tmp` hides none of `paths` (each resolved through
/// its symlinks, as CRIU's lookups would be).
fn scratch_tmp_usable(tmp: &Path, paths: &[&Path]) -> bool {
    let plain_dir = tmp.symlink_metadata().is_ok_and(|m| m.is_dir());
    plain_dir
        && !paths.iter().any(|p| {
            let real = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            real.starts_with(tmp) || p.starts_with(tmp)
        })
}

/// Mounts the restored tree's /proc again, and makes its read-only mount
/// points read-only again, inside its mount namespace, while the tree is
/// stopped.
///
/// Where the kernel takes proc's `pidns=` (Linux 6.15 and later) the proc
/// of the tree's PID namespace is made here and attached by a thread that
/// joins the mount namespace alone (~0.3 ms); elsewhere a child joins the
/// user and mount namespaces and forks into the PID namespace, where the
/// grandchild mounts it (two forks of warmer: ~2 ms).
pub fn remount_proc(init: i32, read_only: &[PathBuf]) -> std::io::Result<()> {
    let ro: Vec<CString> = read_only
        .iter()
        .map(|p| cstr(p).map_err(|e| std::io::Error::other(e.to_string())))
        .collect::<Result<_, _>>()?;
    let open = |ns: &str| -> std::io::Result<OwnedFd> {
        Ok(std::fs::File::open(format!("/proc/{init}/ns/{ns}"))?.into())
    };
    let (mnt, pid) = (open("mnt")?, open("pid")?);
    if let Some(proc_mount) = proc_of(&pid)? {
        return std::thread::scope(|s| {
            s.spawn(|| attach_proc(&mnt, &proc_mount, &ro))
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the mount thread panicked")))
        });
    }
    let user = open("user")?;
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
                    if super::child::remount_read_only(p, true).is_err() {
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

/// A detached proc mount of the PID namespace `pid` (nosuid, nodev,
/// noexec, as warmer-init mounts it at a cold start), or None where the
/// kernel does not take proc's `pidns=`.
fn proc_of(pid: &OwnedFd) -> std::io::Result<Option<OwnedFd>> {
    const FSOPEN_CLOEXEC: libc::c_uint = 1;
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_SET_FD: libc::c_uint = 5;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    const MOUNT_ATTR_NOSUID_NODEV_NOEXEC: libc::c_uint = 0x2 | 0x4 | 0x8;
    let fd = |ret: libc::c_long| -> std::io::Result<OwnedFd> {
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let raw = i32::try_from(ret).map_err(|_| std::io::Error::other("fd out of range"))?;
        // SAFETY: the kernel just returned this descriptor to us.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
    };
    if crate::failpoint_result("proc-without-pidns").is_err() {
        return Ok(None);
    }
    // SAFETY: fsopen/fsconfig/fsmount on a NUL-terminated name and
    // descriptors we own.
    unsafe {
        let ctx = fd(libc::syscall(
            libc::SYS_fsopen,
            c"proc".as_ptr(),
            FSOPEN_CLOEXEC,
        ))?;
        // Its source reads "proc" in mountinfo, as mount(2)'s would.
        if libc::syscall(
            libc::SYS_fsconfig,
            ctx.as_raw_fd(),
            FSCONFIG_SET_STRING,
            c"source".as_ptr(),
            c"proc".as_ptr(),
            0,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let set = libc::syscall(
            libc::SYS_fsconfig,
            ctx.as_raw_fd(),
            FSCONFIG_SET_FD,
            c"pidns".as_ptr(),
            std::ptr::null::<libc::c_void>(),
            pid.as_raw_fd(),
        );
        if set < 0 {
            let e = std::io::Error::last_os_error();
            // An older kernel: proc has no such parameter.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(None);
            }
            return Err(e);
        }
        if libc::syscall(
            libc::SYS_fsconfig,
            ctx.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        fd(libc::syscall(
            libc::SYS_fsmount,
            ctx.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            MOUNT_ATTR_NOSUID_NODEV_NOEXEC,
        ))
        .map(Some)
    }
}

/// On a thread of its own (its file-system context unshared, so that it
/// alone joins the mount namespace `mnt`, as root of the initial user
/// namespace, which holds every capability over the tree's): `proc_mount`
/// in place of the proc CRIU made, and `ro` read-only again.
fn attach_proc(mnt: &OwnedFd, proc_mount: &OwnedFd, ro: &[CString]) -> std::io::Result<()> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    let check = |ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: unshare/setns/umount2/move_mount/statvfs/mount on this
    // thread, with NUL-terminated paths and descriptors we own; the
    // thread ends right after, its file-system context with it.
    unsafe {
        check(libc::unshare(libc::CLONE_FS) == 0)?;
        check(libc::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS) == 0)?;
        check(libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH) == 0)?;
        check(
            libc::syscall(
                libc::SYS_move_mount,
                proc_mount.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                c"/proc".as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            ) == 0,
        )?;
        for p in ro {
            super::child::remount_read_only(p, true).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("making {} read-only again: {e}", p.to_string_lossy()),
                )
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(a: &[OsString]) -> Vec<String> {
        a.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    /// CRIU gets the root, the first mount engine, and one source per
    /// external mount: a bind of the host path (a file on a file), or a
    /// fresh tmpfs for one that was empty; nothing else is planned.
    #[test]
    fn criu_gets_the_root_the_first_mount_engine_and_a_source_per_external() {
        let host = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        let dir = host.path().join("data");
        let file = host.path().join("file");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(&file, b"x").unwrap();
        let tmp = host.path().join("tmp");
        let empty = [crate::image::EmptyTmpfs {
            path: tmp.clone(),
            mode: 0o1777,
        }];
        let s = Sources::new(
            run.path(),
            &[dir.clone(), file.clone(), tmp.clone()],
            &empty,
        )
        .unwrap();
        let mnt = run.path().join("mnt");
        let a = strs(&s.args);
        assert_eq!(
            a[..3],
            [
                "--root".to_string(),
                mnt.join("root").display().to_string(),
                "--mntns-compat-mode".to_string()
            ]
        );
        let externals: Vec<&String> = a.iter().skip(3).step_by(2).collect();
        assert!(externals.iter().all(|e| *e == "--external"), "{a:?}");
        assert_eq!(a.len(), 3 + 2 * 3, "{a:?}");
        assert!(mnt.join("0").is_dir() && mnt.join("1").is_file() && mnt.join("2").is_dir());
        assert_eq!(s.binds.len(), 2);
        assert_eq!(s.tmpfs.len(), 1);
        assert_eq!(s.tmpfs[0].1.to_str().unwrap(), "mode=1777");

        // A host path that is gone is refused, as is a key CRIU would misread.
        let gone = host.path().join("gone");
        assert!(matches!(
            Sources::new(run.path(), &[gone], &[]),
            Err(SandboxError::Missing(_))
        ));
        let colon = host.path().join("a:b");
        std::fs::create_dir(&colon).unwrap();
        assert!(matches!(
            Sources::new(run.path(), &[colon], &[]),
            Err(SandboxError::Path(_))
        ));
    }

    /// CRIU's /tmp becomes a tmpfs only where it hides nothing CRIU is
    /// given: not for a path under it, directly or through a symlink, nor
    /// when /tmp itself is a symlink or missing.
    #[test]
    fn the_scratch_tmpfs_hides_nothing_criu_is_given() {
        let host = tempfile::tempdir().unwrap();
        let tmp = host.path().join("tmp");
        let elsewhere = host.path().join("var");
        std::fs::create_dir_all(tmp.join("cache")).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        let bin = host.path().join("criu");
        std::fs::write(&bin, b"").unwrap();
        assert!(scratch_tmp_usable(&tmp, &[&bin, &elsewhere]));
        assert!(!scratch_tmp_usable(&tmp, &[&bin, &tmp.join("cache")]));
        // Not yet made, still under it.
        assert!(!scratch_tmp_usable(&tmp, &[&tmp.join("run")]));
        let link = host.path().join("link");
        std::os::unix::fs::symlink(tmp.join("cache"), &link).unwrap();
        assert!(!scratch_tmp_usable(&tmp, &[&bin, &link]));

        let tmp_link = host.path().join("tmp2");
        std::os::unix::fs::symlink(&elsewhere, &tmp_link).unwrap();
        assert!(!scratch_tmp_usable(&tmp_link, &[&bin]));
        assert!(!scratch_tmp_usable(&host.path().join("none"), &[&bin]));
    }
}
