//! The sandboxed spawn's child side: between `clone` and `execve`, so only
//! async-signal-safe system calls on memory prepared by the parent
//! ([`super::Prepared`]): no allocation, no locks, no logging. A failure is
//! reported as (step, errno) on the spawn's report pipe.
//!
//! ```text
//! warmer ── clone(NEWNS) ──> stage 1 (root, host user namespace)
//!             mounts the root, pivot_root, unshare(NEWUSER)
//!   writes uid_map/gid_map <── "mapped?"
//!             unshare(NEWNS|NEWPID), clone(CLONE_PARENT) ──> stage 2 [pid 1]
//!   reads its pid <── exits            mounts /proc, credentials, exec warmer-init
//! ```
//!
//! Stage 2 is warmer's own child (`CLONE_PARENT`), as an unsandboxed init
//! is: warmer reaps it, and its parent-death signal points at warmer.

use super::{CMount, Credentials, Prepared};

/// Steps reported on failure.
pub const STEP_PRIVATE: i32 = 10;
pub const STEP_MOUNT: i32 = 11;
pub const STEP_READ_ONLY: i32 = 12;
pub const STEP_PIVOT: i32 = 13;
pub const STEP_USERNS: i32 = 14;
pub const STEP_MAPPED: i32 = 15;
pub const STEP_NAMESPACES: i32 = 16;
pub const STEP_FORK: i32 = 17;
pub const STEP_PROC: i32 = 18;
pub const STEP_BOUNDING: i32 = 19;
pub const STEP_LIMITS: i32 = 20;
pub const STEP_GROUPS: i32 = 21;
pub const STEP_USER: i32 = 22;
pub const STEP_CAPS: i32 = 23;
pub const STEP_NO_NEW_PRIVS: i32 = 24;

/// What a step number means, for the error message.
pub fn step_name(step: i32) -> &'static str {
    match step {
        STEP_PRIVATE => "making the mount namespace private",
        STEP_MOUNT => "mounting the sandbox's root",
        STEP_READ_ONLY => "making a sandbox mount read-only",
        STEP_PIVOT => "entering the sandbox's root (pivot_root)",
        STEP_USERNS => "creating the user namespace",
        STEP_MAPPED => "waiting for the user namespace's id maps",
        STEP_NAMESPACES => "creating the mount, PID and IPC namespaces",
        STEP_FORK => "starting the namespace's init",
        STEP_PROC => "mounting the namespace's /proc",
        STEP_BOUNDING => "dropping capabilities from the bounding set",
        STEP_LIMITS => "setting resource limits",
        STEP_GROUPS => "setting the groups",
        STEP_USER => "setting the user",
        STEP_CAPS => "setting the capabilities",
        STEP_NO_NEW_PRIVS => "setting no_new_privileges",
        _ => "preparing the process",
    }
}

/// Reports (step, errno) on `report` and exits.
///
/// # Safety
/// Only in a forked child.
pub unsafe fn fail(report: i32, step: i32) -> ! {
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&step.to_ne_bytes());
        bytes[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(report, bytes.as_ptr().cast(), 8);
        libc::_exit(127)
    }
}

/// The bind mount at `path` remounted read-only with the flags it has
/// ([`kept_flags`]); with `only_if_writable`, left alone where statvfs
/// already says read-only.
///
/// # Safety
/// Async-signal-safe (statvfs, mount, errno): callable in a forked child.
pub(super) unsafe fn remount_read_only(
    path: &std::ffi::CStr,
    only_if_writable: bool,
) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated path and a zeroed statvfs to fill. glibc's
    // statvfs is the statfs call alone on kernels that report mount flags
    // (ST_VALID, since 2.6.36).
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if only_if_writable && st.f_flag & libc::ST_RDONLY != 0 {
            return Ok(());
        }
        let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | kept_flags(&st);
        if libc::mount(
            std::ptr::null(),
            path.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Flags a read-only remount must keep (a bind remount drops what it does
/// not repeat, and the kernel refuses to drop a locked one).
pub(super) fn kept_flags(st: &libc::statvfs) -> libc::c_ulong {
    let f = st.f_flag as libc::c_ulong;
    let mut out = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if f & st_flag != 0 {
            out |= ms_flag;
        }
    }
    out
}

/// # Safety
/// Only in the stage-1 child.
unsafe fn mount_one(m: &CMount, report: i32) {
    // SAFETY: mount/statfs on NUL-terminated strings prepared by the parent.
    unsafe {
        for d in &m.mkdirs {
            // Most exist already (outside the tmpfs); those inside are made.
            libc::mkdir(d.as_ptr(), 0o755);
        }
        if m.touch {
            let fd = libc::open(
                m.target.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                0o644,
            );
            if fd >= 0 {
                libc::close(fd);
            }
        }
        let ok = match &m.source {
            Some(src) => {
                libc::mount(
                    src.as_ptr(),
                    m.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0
            }
            None => {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    m.target.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    m.data.as_ptr().cast(),
                ) == 0
            }
        };
        if !ok {
            if m.optional {
                return;
            }
            fail(report, STEP_MOUNT);
        }
        if m.read_only && remount_read_only(&m.target, false).is_err() {
            fail(report, STEP_READ_ONLY);
        }
    }
}

fn read_exact(fd: i32, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: read into a valid buffer.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n > 0 {
            got += n.unsigned_abs();
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return false;
        }
    }
    true
}

/// Stage 1, in the child of `clone(CLONE_NEWNS)`: builds the root, enters
/// it and a new user namespace, waits for warmer to map it, creates the
/// mount and PID namespaces and forks stage 2 as warmer's child. Returns
/// only in stage 2 (which then mounts /proc, takes the credentials and
/// execs); stage 1 itself reports stage 2's PID on `to_parent` and exits.
///
/// # Safety
/// Only in a freshly cloned child of warmer.
pub unsafe fn stage1(p: &Prepared, to_parent: i32, from_parent: i32, report: i32) {
    // SAFETY: system calls on prepared memory; see the module's doc.
    unsafe {
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(report, STEP_PRIVATE);
        }
        for m in &p.mounts {
            mount_one(m, report);
        }
        if libc::chdir(p.root.as_ptr()) != 0
            || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
            || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
            || libc::chdir(c"/".as_ptr()) != 0
        {
            fail(report, STEP_PIVOT);
        }
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            fail(report, STEP_USERNS);
        }
        let mut byte = [1u8];
        if libc::write(to_parent, byte.as_ptr().cast(), 1) != 1
            || !read_exact(from_parent, &mut byte)
        {
            fail(report, STEP_MAPPED);
        }
        // Its own IPC namespace too: SysV shared memory (PostgreSQL has
        // some) is dumped only from a namespace of the tree's own.
        if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC) != 0 {
            fail(report, STEP_NAMESPACES);
        }
        let pid = libc::syscall(
            libc::SYS_clone,
            libc::CLONE_PARENT | libc::SIGCHLD,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            0usize,
        );
        if pid < 0 {
            fail(report, STEP_FORK);
        }
        if pid > 0 {
            let pid = i32::try_from(pid).unwrap_or(0);
            libc::write(to_parent, pid.to_ne_bytes().as_ptr().cast(), 4);
            libc::_exit(0);
        }
        // Stage 2: PID 1 of the new namespace.
        if libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            fail(report, STEP_PROC);
        }
        credentials(&p.creds, report);
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Takes the service's credentials, in systemd's order.
///
/// # Safety
/// Only in a forked child about to exec.
pub unsafe fn credentials(c: &Credentials, report: i32) {
    // SAFETY: prctl/setrlimit/setgroups/setres[ug]id/capset with valid
    // arguments; all async-signal-safe system calls.
    unsafe {
        for cap in 0..64u32 {
            if c.bounding & (1u64 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) == 1
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
            {
                fail(report, STEP_BOUNDING);
            }
        }
        for l in &c.limits {
            let lim = libc::rlimit {
                rlim_cur: l.soft,
                rlim_max: l.hard,
            };
            if libc::setrlimit(l.resource as _, &lim) != 0 {
                // As systemd's setrlimit_closest(): a hard limit it may not
                // raise is set as high as it may (Credentials::resolve said
                // so in the log).
                let mut now = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if *libc::__errno_location() != libc::EPERM
                    || libc::getrlimit(l.resource as _, &mut now) != 0
                    || now.rlim_max == libc::RLIM_INFINITY
                {
                    fail(report, STEP_LIMITS);
                }
                let closest = libc::rlimit {
                    rlim_cur: l.soft.min(now.rlim_max),
                    rlim_max: l.hard.min(now.rlim_max),
                };
                if libc::setrlimit(l.resource as _, &closest) != 0 {
                    fail(report, STEP_LIMITS);
                }
            }
        }
        if let Some(m) = c.umask {
            libc::umask(m as libc::mode_t);
        }
        // The raw system calls: glibc's wrappers signal every thread of the
        // parent it still believes in (setxid broadcast) and would wait
        // forever in this single-threaded copy.
        if libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) != 0
            || libc::syscall(libc::SYS_setresgid, c.gid, c.gid, c.gid) != 0
        {
            fail(report, STEP_GROUPS);
        }
        if c.uid != 0 {
            if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_setresuid, c.uid, c.uid, c.uid) != 0
            {
                fail(report, STEP_USER);
            }
            // Only the ambient capabilities survive, as systemd leaves them
            // for a unit with `User=` and `AmbientCapabilities=`.
            let keep = c.ambient & c.bounding;
            let half = |m: u64, i: usize| u32::try_from((m >> (32 * i)) & 0xffff_ffff).unwrap_or(0);
            let data = [0, 1].map(|i| CapData {
                effective: half(keep, i),
                permitted: half(keep, i),
                inheritable: half(keep, i),
            });
            let header = CapHeader {
                version: CAP_VERSION_3,
                pid: 0,
            };
            if libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0 {
                fail(report, STEP_CAPS);
            }
            for cap in 0..64u32 {
                if keep & (1u64 << cap) != 0
                    && libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        cap as libc::c_ulong,
                        0,
                        0,
                    ) != 0
                {
                    fail(report, STEP_CAPS);
                }
            }
            libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
        }
        if c.no_new_privileges && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(report, STEP_NO_NEW_PRIVS);
        }
    }
}
