//! Running a service as its unit runs it: its user, groups, capabilities,
//! limits, and a sandbox of its own (private /tmp, read-only system, its
//! own /proc), cold and restored.
//!
//! A service with a `user:` or a `sandbox:` runs as
//!
//! ```text
//! warmer run web                        host namespaces, root
//!  └─ warmer-init  [pid 1]              user namespace (owned by root, ids mapped 1:1),
//!      └─ the service [pid 2]           its own mount and PID namespaces; both with
//!                                       the service's credentials
//! ```
//!
//! Why a user namespace: a checkpoint reads every task's resource limits,
//! and the kernel lets it only with `CAP_SYS_RESOURCE` over the task's user
//! namespace (or the same uid). Where root lacks that capability (many VMs,
//! containers, CI machines), a service of another user could not be
//! dumped; in a user namespace root created, root holds every capability.
//! Ids are mapped one to one, so files, ownership and `ps` look as usual.
//!
//! Why a root of its own: CRIU restores a mount namespace from its images
//! only when the namespace has a root of its own (see [`mounts`]); the host
//! mounts bound in are external to the image and bound again at restore
//! ([`restore`]).
//!
//! Order, as systemd: namespaces and mounts, then the bounding set and
//! limits, then the user (groups, gid, uid, keeping only the ambient
//! capabilities), then `no_new_privileges`. warmer-init runs with the same
//! credentials as the service: nothing in the namespaces holds more.
//!
//! May call: `manifest`. Called by `process` (spawning) and `restore`.

pub mod child;
mod ids;
pub mod mounts;
pub mod restore;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::manifest::{Limit, Sandbox};
use crate::memo::Memo;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("user {0:?} does not exist")]
    NoUser(String),
    #[error("group {0:?} does not exist")]
    NoGroup(String),
    #[error("cannot look up {what}")]
    Lookup {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("{0}")]
    Mounts(String),
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {} for the service", path.display())]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the image binds host path {} into the service's namespace, and it is not there now", .0.display())]
    Missing(PathBuf),
    #[error("path {} cannot be used in the service's namespace (CRIU's external mounts cannot name it)", .0.display())]
    Path(PathBuf),
}

/// The credentials the service runs with, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the user's groups (as `initgroups`) plus the
    /// manifest's.
    pub groups: Vec<u32>,
    /// Capability bit masks.
    pub ambient: u64,
    pub bounding: u64,
    pub no_new_privileges: bool,
    pub umask: Option<u32>,
    pub limits: Vec<Limit>,
}

/// Every capability this kernel knows (bits 0..=cap_last_cap).
fn all_caps() -> u64 {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40)
        .min(63);
    if last == 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    }
}

fn mask(caps: &[u8]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1u64 << c))
}

fn user(name: &str) -> Result<nix::unistd::User, SandboxError> {
    let found = match name.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(uid.into()),
        Err(_) => nix::unistd::User::from_name(name),
    };
    found
        .map_err(|source| SandboxError::Lookup {
            what: format!("user {name:?}"),
            source,
        })?
        .ok_or_else(|| SandboxError::NoUser(name.to_string()))
}

fn group(name: &str) -> Result<u32, SandboxError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    nix::unistd::Group::from_name(name)
        .map_err(|source| SandboxError::Lookup {
            what: format!("group {name:?}"),
            source,
        })?
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| SandboxError::NoGroup(name.to_string()))
}

impl Credentials {
    /// Looks the manifest's user and groups up in the system's databases.
    pub fn resolve(s: &Sandbox) -> Result<Self, SandboxError> {
        Self::resolve_with(s, None)
    }

    /// As [`Credentials::resolve`], the names' numbers also remembered in
    /// `memo` for the boot (see `ids`).
    pub fn resolve_with(s: &Sandbox, memo: Option<&mut Memo>) -> Result<Self, SandboxError> {
        let (uid, gid, groups) = ids::lookup(s, memo, Self::look_up_ids)?;
        let all = all_caps();
        Ok(Credentials {
            uid,
            gid,
            groups,
            ambient: mask(&s.ambient_capabilities),
            bounding: s.capability_bounding_set.as_deref().map_or(all, mask) & all,
            no_new_privileges: s.no_new_privileges,
            umask: s.umask,
            limits: s.limits.clone(),
        })
    }

    /// The manifest's user and groups as numbers, asked of the system's
    /// databases (NSS): uid, gid and the sorted supplementary groups.
    fn look_up_ids(s: &Sandbox) -> Result<ids::Ids, SandboxError> {
        let (uid, primary, mut groups) = match &s.user {
            None => (0, 0, Vec::new()),
            Some(name) => {
                let u = user(name)?;
                let cname = CString::new(u.name.as_bytes())
                    .map_err(|_| SandboxError::NoUser(name.clone()))?;
                let groups = nix::unistd::getgrouplist(&cname, u.gid)
                    .map_err(|source| SandboxError::Lookup {
                        what: format!("the groups of {name:?}"),
                        source,
                    })?
                    .into_iter()
                    .map(|g| g.as_raw())
                    .collect();
                (u.uid.as_raw(), u.gid.as_raw(), groups)
            }
        };
        let gid = match &s.group {
            Some(g) => group(g)?,
            None => primary,
        };
        for g in &s.supplementary_groups {
            groups.push(group(g)?);
        }
        groups.sort_unstable();
        groups.dedup();
        Ok((uid, gid, groups))
    }

    /// The limits that will be lowered to warmer's own hard limit, as
    /// systemd lowers them, because raising a hard limit needs
    /// CAP_SYS_RESOURCE (which root here may lack): `(key, asked, hard)`.
    pub fn limits_lowered(&self) -> Vec<(&'static str, u64, u64)> {
        const CAP_SYS_RESOURCE: u32 = 24;
        let effective = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .unwrap_or(0);
        if effective & (1 << CAP_SYS_RESOURCE) != 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for l in &self.limits {
            let mut now = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes the struct it is given.
            if unsafe { libc::getrlimit(l.resource as _, &mut now) } != 0 {
                continue;
            }
            let hard = now.rlim_max;
            if hard != libc::RLIM_INFINITY && l.hard > hard {
                let key = crate::manifest::sandbox::LIMITS
                    .iter()
                    .find(|(_, r)| *r == l.resource)
                    .map_or("limit", |(k, _)| *k);
                out.push((key, l.hard, hard));
            }
        }
        out
    }
}

/// Creates the service's directories (`runtime_directory` and the others)
/// owned by its user and group, as systemd does; existing ones are handed
/// to them too (only the directory itself, as systemd's `chown` of a
/// directory it did not create would not recurse either).
pub fn make_directories(
    s: &Sandbox,
    creds: &Credentials,
    run_dir: &Path,
) -> Result<(), SandboxError> {
    for dir in s.directories() {
        let fail = |source| SandboxError::Directory {
            path: dir.clone(),
            source,
        };
        // Never hand warmer's own directory (or one above it) to the service.
        if run_dir.starts_with(&dir) {
            return Err(fail(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "it holds warmer's run directory",
            )));
        }
        match std::fs::symlink_metadata(&dir) {
            // Never follow a link someone put there: root would chown its target.
            Ok(m) if !m.is_dir() => {
                return Err(fail(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a directory",
                )))
            }
            Ok(_) => {}
            Err(_) => {
                std::fs::create_dir_all(&dir).map_err(fail)?;
                std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .map_err(fail)?;
            }
        }
        std::os::unix::fs::lchown(&dir, Some(creds.uid), Some(creds.gid)).map_err(fail)?;
    }
    Ok(())
}

/// One mount, ready for the child (no allocation after the clone).
#[derive(Debug)]
pub struct CMount {
    /// A bind's source, or `None` for a tmpfs.
    pub source: Option<CString>,
    pub target: CString,
    /// tmpfs options (`mode=1777`).
    pub data: CString,
    pub read_only: bool,
    /// A bind of a host mount that may fail (a mount point no one can bind,
    /// such as an automounter's): skipped, as if it were not there.
    pub optional: bool,
    /// Directories to make before the mount (inside a tmpfs), parents first.
    pub mkdirs: Vec<CString>,
    /// The mount point is a file to make.
    pub touch: bool,
}

/// Everything the sandboxed spawn needs, prepared before the clone.
#[derive(Debug)]
pub struct Prepared {
    pub creds: Credentials,
    /// The namespace's root on the host (a directory in the run dir).
    pub root: CString,
    pub mounts: Vec<CMount>,
}

fn cstr(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| SandboxError::Path(p.to_path_buf()))
}

/// The host's mounts.
pub fn host_mounts() -> Result<Vec<mounts::HostMount>, SandboxError> {
    let path = PathBuf::from("/proc/self/mountinfo");
    let text =
        std::fs::read_to_string(&path).map_err(|source| SandboxError::Read { path, source })?;
    Ok(mounts::parse_mountinfo(&text))
}

/// Where a service's namespace root is assembled on the host.
pub fn root_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("root")
}

impl Prepared {
    /// Resolves credentials, creates the directories and plans the mounts;
    /// `visible` (warmer-init's binary) must stay reachable inside.
    pub fn new(s: &Sandbox, run_dir: &Path, visible: &[&Path]) -> Result<Self, SandboxError> {
        let creds = Credentials::resolve(s)?;
        for (key, asked, hard) in creds.limits_lowered() {
            tracing::warn!(
                "{key}: {asked} is above warmer's own hard limit {hard}, and raising it needs CAP_SYS_RESOURCE: the service gets {hard}, as systemd does"
            );
        }
        make_directories(s, &creds, run_dir)?;
        let root = root_dir(run_dir);
        std::fs::create_dir_all(&root).map_err(|source| SandboxError::Directory {
            path: root.clone(),
            source,
        })?;
        let host = host_mounts()?;
        let skip = run_dir.parent().unwrap_or(run_dir);
        let mut plan = mounts::plan(s, &host, skip, &|p| p.symlink_metadata().is_ok())
            .map_err(SandboxError::Mounts)?;
        for v in visible {
            mounts::keep_visible(&mut plan, v);
        }
        let host_points: Vec<&Path> = host.iter().map(|h| h.path.as_path()).collect();
        let mut out = Vec::new();
        for m in plan {
            if !mounts::usable_key(&m.path) {
                return Err(SandboxError::Path(m.path));
            }
            let rel = m.path.strip_prefix("/").unwrap_or(&m.path);
            let target = if rel.as_os_str().is_empty() {
                root.clone()
            } else {
                root.join(rel)
            };
            let (source, data) = match &m.source {
                mounts::Source::Bind(p) => (Some(cstr(p)?), CString::default()),
                mounts::Source::Tmpfs(mode) => (
                    None,
                    CString::new(format!("mode={mode:o}")).expect("no NUL"),
                ),
            };
            let mut mkdirs = Vec::new();
            if m.create {
                let mut up: Vec<&Path> = m.path.ancestors().skip(1).collect();
                up.reverse();
                for a in up {
                    let rel = a.strip_prefix("/").unwrap_or(a);
                    if !rel.as_os_str().is_empty() {
                        mkdirs.push(cstr(&root.join(rel))?);
                    }
                }
            }
            out.push(CMount {
                mkdirs,
                touch: m.create && !m.path.is_dir(),
                optional: m.path != Path::new("/")
                    && host_points.contains(&m.path.as_path())
                    && source.is_some(),
                source,
                target: cstr(&target)?,
                data,
                read_only: m.read_only,
            });
        }
        Ok(Prepared {
            creds,
            root: cstr(&root)?,
            mounts: out,
        })
    }
}
