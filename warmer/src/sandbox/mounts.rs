//! The service's mount namespace, planned as pure functions: which mounts
//! its root holds (from the host's mount table and the manifest's
//! `sandbox:`), and which of them CRIU must treat as external.
//!
//! The namespace gets a root of its own, as containers have: a
//! (non-recursive) bind of the host's `/`, and on it one non-recursive bind
//! per host mount, so that each is a mount of its own with no children
//! (CRIU restores a bind only from a source without locked children). On
//! top come the sandbox's mounts: tmpfs for `/dev/shm` (always),
//! `private_tmp` and inaccessible paths, binds of `read_write_paths` and the service's directories, and
//! read-only flags. `/proc` is mounted by the namespace's init (see
//! [`super::child`]).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::manifest::{ProtectHome, ProtectSystem, Sandbox};

/// One mount of the namespace's root, relative to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A non-recursive bind of this host path.
    Bind(PathBuf),
    /// A fresh tmpfs with this mode.
    Tmpfs(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where, inside the namespace (absolute).
    pub path: PathBuf,
    pub source: Source,
    pub read_only: bool,
    /// Its mount point is made first (inside a tmpfs of the plan).
    pub create: bool,
}

/// A host mount point, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMount {
    pub path: PathBuf,
    /// `major:minor`.
    pub dev: String,
    /// Mounted read-only (the per-mount `ro` option).
    pub read_only: bool,
}

/// Parses mountinfo (`/proc/PID/mountinfo`): mount points and devices, in
/// mount order. Octal escapes (`\040` for a space) are decoded.
pub fn parse_mountinfo(text: &str) -> Vec<HostMount> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (_id, _parent, dev, _root, point, options) = (
                f.next()?,
                f.next()?,
                f.next()?,
                f.next()?,
                f.next()?,
                f.next()?,
            );
            Some(HostMount {
                path: PathBuf::from(unescape(point)),
                dev: dev.to_string(),
                read_only: options.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// API file systems: writable even under `protect_system: strict`.
const API: &[&str] = &["/dev", "/proc", "/sys"];

/// Which host mounts enter the namespace: all but the kernel's own below
/// `/proc` and `/sys` (tracing, debugfs, bpf, pstore, configfs...: what
/// systemd's ProtectKernel* settings take away; the cgroup tree stays, JVMs
/// read their limits there) and `/dev/mqueue` (it belongs to the host's IPC
/// namespace, and the service has its own). Each mount costs a bind at
/// every restore.
fn wanted(p: &Path) -> bool {
    let sys_kept = p == Path::new("/sys") || under(p, Path::new("/sys/fs/cgroup"));
    let proc_kept = p == Path::new("/proc");
    (sys_kept || !under(p, Path::new("/sys")))
        && (proc_kept || !under(p, Path::new("/proc")))
        && !under(p, Path::new("/dev/mqueue"))
        && !under(p, Path::new("/dev/hugepages"))
}

/// Plans the namespace's mounts, parents before children. `exists` says
/// whether a host path exists (paths the manifest names must; the usual
/// `/usr`, `/boot`, `/efi` only when there). `skip` is a host directory
/// whose mounts never enter (warmer's own run directory).
pub fn plan(
    sandbox: &Sandbox,
    host: &[HostMount],
    skip: &Path,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Vec<Mount>, String> {
    let strict = sandbox.protect_system == ProtectSystem::Strict;
    let api = |p: &Path| API.iter().any(|a| under(p, Path::new(a)));
    let mut m: BTreeMap<PathBuf, Mount> = BTreeMap::new();
    fn put(m: &mut BTreeMap<PathBuf, Mount>, path: &Path, source: Source, read_only: bool) {
        m.insert(
            path.to_path_buf(),
            Mount {
                path: path.to_path_buf(),
                source,
                read_only,
                create: false,
            },
        );
    }
    put(&mut m, Path::new("/"), Source::Bind("/".into()), strict);
    for h in host {
        let p = &h.path;
        if p == Path::new("/") || under(p, skip) || !wanted(p) {
            continue;
        }
        put(&mut m, p, Source::Bind(p.clone()), strict && !api(p));
    }
    let mut read_only: Vec<PathBuf> = match sandbox.protect_system {
        ProtectSystem::No | ProtectSystem::Strict => Vec::new(),
        ProtectSystem::Yes => vec!["/usr".into(), "/boot".into(), "/efi".into()],
        ProtectSystem::Full => vec!["/usr".into(), "/boot".into(), "/efi".into(), "/etc".into()],
    };
    read_only.retain(|p| exists(p));
    let homes: Vec<PathBuf> = ["/home", "/root", "/run/user"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| exists(p))
        .collect();
    let mut tmpfs: Vec<(PathBuf, u32, bool)> = Vec::new();
    match sandbox.protect_home {
        ProtectHome::No => {}
        ProtectHome::ReadOnly => read_only.extend(homes.iter().cloned()),
        ProtectHome::Yes => tmpfs.extend(homes.iter().map(|h| (h.clone(), 0, true))),
        ProtectHome::Tmpfs => tmpfs.extend(homes.iter().map(|h| (h.clone(), 0o755, false))),
    }
    for p in &sandbox.read_only_paths {
        if !exists(p) {
            return Err(format!(
                "sandbox.read_only_paths: {} does not exist",
                p.display()
            ));
        }
        read_only.push(p.clone());
    }
    for p in &read_only {
        match m.get_mut(p) {
            Some(e) => e.read_only = true,
            None => put(&mut m, p, Source::Bind(p.clone()), true),
        }
    }
    let mut writable = sandbox.read_write_paths.clone();
    writable.extend(sandbox.directories());
    for p in &writable {
        if !exists(p) {
            return Err(format!(
                "sandbox.read_write_paths: {} does not exist",
                p.display()
            ));
        }
        match m.get_mut(p) {
            Some(e) => e.read_only = false,
            None => put(&mut m, p, Source::Bind(p.clone()), false),
        }
    }
    for p in &sandbox.inaccessible_paths {
        if !exists(p) {
            return Err(format!(
                "sandbox.inaccessible_paths: {} does not exist",
                p.display()
            ));
        }
        tmpfs.push((p.clone(), 0, true));
    }
    // Its own POSIX shared memory, as its IPC namespace gives it its own
    // System V IPC: the host's /dev/shm is emptied by a reboot, and a
    // segment the service maps there (PostgreSQL's dynamic shared memory)
    // must come back with its image; CRIU keeps a tmpfs of the namespace
    // in the image.
    if exists(Path::new("/dev/shm")) {
        tmpfs.push(("/dev/shm".into(), 0o1777, false));
    }
    if sandbox.private_tmp {
        for t in ["/tmp", "/var/tmp"] {
            if exists(Path::new(t)) {
                tmpfs.push((t.into(), 0o1777, false));
            }
        }
    }
    for (p, mode, ro) in tmpfs {
        // Whatever was mounted below it stays out.
        m.retain(|k, _| !under(k, &p) || k == &p);
        put(&mut m, &p, Source::Tmpfs(mode), ro);
    }
    Ok(m.into_values().collect())
}

/// Keeps host path `p` (warmer-init's binary) visible where the plan
/// would hide it under one of its tmpfs (a build tree below a private
/// /tmp): a read-only bind of it, its mount point made in the tmpfs.
pub fn keep_visible(plan: &mut Vec<Mount>, p: &Path) {
    let covering = plan
        .iter()
        .filter(|m| under(p, &m.path))
        .max_by_key(|m| m.path.components().count());
    if matches!(
        covering,
        Some(Mount {
            source: Source::Tmpfs(_),
            ..
        })
    ) {
        plan.push(Mount {
            path: p.to_path_buf(),
            source: Source::Bind(p.to_path_buf()),
            read_only: true,
            create: true,
        });
        plan.sort_by(|a, b| a.path.cmp(&b.path));
    }
}

/// The mounts of a namespace (its init's mountinfo) that CRIU must treat
/// as external: binds of host mounts, recognised by a device the host has.
/// Their keys are their mount points; at restore each is bound again from
/// the same host path. The namespace's own root and its own file systems
/// (the tmpfs, its /proc) are not.
pub fn externals(ns: &[HostMount], host: &[HostMount]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = ns
        .iter()
        .filter(|n| n.path != Path::new("/") && host.iter().any(|h| h.dev == n.dev))
        .map(|n| n.path.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The namespace's own tmpfs mounts (its `/dev/shm`, a private `/tmp`, the
/// tmpfs that hide paths), from its init's mountinfo: tmpfs whose device
/// the host does not have. Top-most mounts only.
pub fn own_tmpfs(mountinfo: &str, host: &[HostMount]) -> Vec<PathBuf> {
    let mut top: BTreeMap<PathBuf, bool> = BTreeMap::new();
    for l in mountinfo.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let (Some(dev), Some(point)) = (f.get(2), f.get(4)) else {
            continue;
        };
        let fstype = f.iter().position(|w| *w == "-").and_then(|i| f.get(i + 1));
        let own = fstype == Some(&"tmpfs") && !host.iter().any(|h| h.dev == *dev);
        top.insert(PathBuf::from(unescape(point)), own);
    }
    top.into_iter()
        .filter(|(p, own)| *own && p != Path::new("/"))
        .map(|(p, _)| p)
        .collect()
}

/// The mount points whose top-most mount is read-only: CRIU binds an
/// external mount again with its source's flags, so these are made
/// read-only again after a restore.
pub fn read_only(ns: &[HostMount]) -> Vec<PathBuf> {
    let mut top: BTreeMap<&Path, bool> = BTreeMap::new();
    for n in ns {
        top.insert(&n.path, n.read_only);
    }
    top.into_iter()
        .filter(|(_, ro)| *ro)
        .map(|(p, _)| p.to_path_buf())
        .collect()
}

/// CRIU's `--external mnt[KEY]:VALUE` cannot carry these.
pub fn usable_key(p: &Path) -> bool {
    let s = p.to_string_lossy();
    !s.contains(']')
        && !s.contains(':')
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Vec<HostMount> {
        parse_mountinfo(
            "22 1 0:21 / /proc rw - proc proc rw\n\
             23 1 0:22 / /sys rw - sysfs sysfs rw\n\
             1 0 254:0 / / rw - ext4 /dev/vda rw\n\
             24 1 0:6 / /dev rw - devtmpfs udev rw\n\
             25 24 0:23 / /dev/shm rw - tmpfs tmpfs rw\n\
             26 1 0:30 / /tmp rw - tmpfs tmpfs rw\n\
             27 26 0:31 / /tmp/inner rw - tmpfs tmpfs rw\n\
             28 22 0:40 / /proc/sys/fs/binfmt_misc rw - binfmt_misc b rw\n\
             29 1 0:41 / /run/warmer/web/root rw - ext4 x rw\n\
             30 1 254:1 / /srv/my\\040data rw - ext4 y rw\n\
             31 23 0:50 / /sys/kernel/debug rw - debugfs d rw\n\
             32 23 0:51 / /sys/fs/cgroup rw - cgroup2 c rw\n\
             33 24 0:52 / /dev/mqueue rw - mqueue m rw\n",
        )
    }

    fn sb() -> Sandbox {
        Sandbox::default()
    }

    fn paths(m: &[Mount]) -> Vec<String> {
        m.iter().map(|m| m.path.display().to_string()).collect()
    }

    #[test]
    fn every_host_mount_once_parents_first_without_the_kernels_own_or_ours() {
        let m = plan(&sb(), &host(), Path::new("/run/warmer"), &|_| true).unwrap();
        assert_eq!(
            paths(&m),
            [
                "/",
                "/dev",
                "/dev/shm",
                "/proc",
                "/srv/my data",
                "/sys",
                "/sys/fs/cgroup",
                "/tmp",
                "/tmp/inner"
            ]
        );
        assert!(m.iter().all(|m| !m.read_only));
    }

    #[test]
    fn strict_makes_all_but_api_and_writable_paths_read_only() {
        let s = Sandbox {
            protect_system: ProtectSystem::Strict,
            private_tmp: true,
            read_write_paths: vec!["/var/lib/app".into()],
            state_directory: vec!["app2".into()],
            ..sb()
        };
        let m = plan(&s, &host(), Path::new("/run/warmer"), &|_| true).unwrap();
        let ro: Vec<(String, bool)> = m
            .iter()
            .map(|m| (m.path.display().to_string(), m.read_only))
            .collect();
        assert_eq!(
            ro,
            [
                ("/", true),
                ("/dev", false),
                ("/dev/shm", false),
                ("/proc", false),
                ("/srv/my data", true),
                ("/sys", false),
                ("/sys/fs/cgroup", false),
                ("/tmp", false),
                ("/var/lib/app", false),
                ("/var/lib/app2", false),
                ("/var/tmp", false),
            ]
            .map(|(p, r)| (p.to_string(), r))
        );
        let tmp = m.iter().find(|m| m.path == Path::new("/tmp")).unwrap();
        assert_eq!(
            tmp.source,
            Source::Tmpfs(0o1777),
            "the host's /tmp and what is below it stay out"
        );
        let shm = m.iter().find(|m| m.path == Path::new("/dev/shm")).unwrap();
        assert_eq!(
            shm.source,
            Source::Tmpfs(0o1777),
            "its own /dev/shm, saved in its image"
        );
    }

    #[test]
    fn protect_system_and_home_and_missing_paths() {
        let s = Sandbox {
            protect_system: ProtectSystem::Full,
            protect_home: ProtectHome::Yes,
            inaccessible_paths: vec!["/srv/secret".into()],
            ..sb()
        };
        let m = plan(&s, &host(), Path::new("/run/warmer"), &|p| {
            p != Path::new("/efi")
        })
        .unwrap();
        let get = |p: &str| m.iter().find(|m| m.path == Path::new(p)).cloned();
        assert!(get("/usr").unwrap().read_only && get("/etc").unwrap().read_only);
        assert!(get("/efi").is_none(), "only what exists");
        assert_eq!(get("/home").unwrap().source, Source::Tmpfs(0));
        assert_eq!(get("/srv/secret").unwrap().source, Source::Tmpfs(0));
        let missing = Sandbox {
            read_write_paths: vec!["/nope".into()],
            ..sb()
        };
        let e = plan(&missing, &host(), Path::new("/run/warmer"), &|p| {
            p != Path::new("/nope")
        })
        .unwrap_err();
        assert!(e.contains("/nope"), "{e}");
    }

    #[test]
    fn warmer_init_under_a_private_tmp_stays_visible() {
        let s = Sandbox {
            private_tmp: true,
            ..sb()
        };
        let mut m = plan(&s, &host(), Path::new("/run/warmer"), &|_| true).unwrap();
        keep_visible(&mut m, Path::new("/tmp/build/warmer-init"));
        let bind = m
            .iter()
            .find(|m| m.path == Path::new("/tmp/build/warmer-init"))
            .unwrap();
        assert!(bind.create && bind.read_only);
        let tmp = m.iter().position(|m| m.path == Path::new("/tmp")).unwrap();
        let at = m
            .iter()
            .position(|m| m.path == Path::new("/tmp/build/warmer-init"))
            .unwrap();
        assert!(tmp < at, "the tmpfs first");
        let before = m.len();
        keep_visible(&mut m, Path::new("/usr/bin/warmer-init"));
        assert_eq!(m.len(), before, "nothing to do where it is visible");
    }

    #[test]
    fn own_tmpfs_are_the_namespaces_tmpfs_not_the_hosts() {
        let ns = "40 1 0:50 / / ro - ext4 /dev/vda rw\n\
             41 40 0:6 / /dev rw - devtmpfs udev rw\n\
             42 41 0:77 / /dev/shm rw - tmpfs tmpfs rw\n\
             43 40 0:78 / /tmp rw - tmpfs tmpfs rw\n\
             44 40 0:30 / /run rw - tmpfs tmpfs rw\n\
             45 40 0:79 / /srv/hidden ro - tmpfs tmpfs ro\n";
        let host = vec![HostMount {
            path: "/run".into(),
            dev: "0:30".into(),
            read_only: false,
        }];
        assert_eq!(
            own_tmpfs(ns, &host),
            [
                PathBuf::from("/dev/shm"),
                PathBuf::from("/srv/hidden"),
                PathBuf::from("/tmp")
            ],
            "the host's /run is bound in, not the namespace's own"
        );
    }

    #[test]
    fn externals_are_the_host_devices_but_not_the_root() {
        let ns = parse_mountinfo(
            "40 39 254:0 / / ro - ext4 /dev/vda ro\n\
             41 40 0:21 / /proc rw - proc proc rw\n\
             42 40 0:6 / /dev rw - devtmpfs udev rw\n\
             43 40 0:77 / /tmp rw - tmpfs tmpfs rw\n\
             44 40 254:0 /usr /usr ro - ext4 /dev/vda ro\n\
             45 41 0:78 / /proc rw - proc proc rw\n",
        );
        assert_eq!(
            externals(&ns, &host()),
            ["/dev", "/proc", "/usr"].map(PathBuf::from)
        );
        assert_eq!(read_only(&ns), ["/", "/usr"].map(PathBuf::from));
        assert!(usable_key(Path::new("/srv/my data")));
        assert!(!usable_key(Path::new("/srv/a:b")));
    }
}
