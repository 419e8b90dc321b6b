//! The keys that say how the service runs, named after systemd's settings
//! (snake_case) so that an operator copies them from the unit: `user`,
//! `group`, `supplementary_groups`, `exec_start_pre` and the `sandbox:`
//! section. Validated here; applied by [`crate::sandbox`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_saphyr::{Location, Spanned};

use super::ManifestError;

/// Capability names, indexed by their number (linux/capability.h).
pub const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// A capability's number from its name (`CAP_NET_BIND_SERVICE` or
/// `net_bind_service`, any case).
pub fn capability(name: &str) -> Option<u8> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    CAPABILITIES
        .iter()
        .position(|c| *c == full)
        .and_then(|i| u8::try_from(i).ok())
}

/// `protect_system`: which parts of the file system are read-only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtectSystem {
    #[default]
    No,
    /// `/usr`, `/boot` and `/efi`.
    Yes,
    /// ... and `/etc`.
    Full,
    /// Everything but `/dev`, `/proc`, `/sys`, the private /tmp and the
    /// `read_write_paths` (and the service's own directories).
    Strict,
}

/// `protect_home`: what the service sees of `/home`, `/root`, `/run/user`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProtectHome {
    #[default]
    No,
    /// Empty and inaccessible.
    Yes,
    ReadOnly,
    /// An empty tmpfs each.
    Tmpfs,
}

/// A resource limit (`limit_nofile: 65536`, `"1024:4096"`, `infinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limit {
    /// `setrlimit`'s resource number.
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// The limits a manifest may set: key, resource.
pub const LIMITS: &[(&str, u32)] = &[
    ("limit_nofile", libc::RLIMIT_NOFILE),
    ("limit_nproc", libc::RLIMIT_NPROC),
    ("limit_core", libc::RLIMIT_CORE),
    ("limit_memlock", libc::RLIMIT_MEMLOCK),
    ("limit_stack", libc::RLIMIT_STACK),
    ("limit_as", libc::RLIMIT_AS),
    ("limit_fsize", libc::RLIMIT_FSIZE),
    ("limit_data", libc::RLIMIT_DATA),
];

/// How the service runs: its credentials and its sandbox. Present when the
/// manifest names a user, a group or any `sandbox:` key; every service with
/// one runs in namespaces of its own (see [`crate::sandbox`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Sandbox {
    /// A user name or number; `None`: root.
    pub user: Option<String>,
    /// A group name or number; `None`: the user's primary group.
    pub group: Option<String>,
    pub supplementary_groups: Vec<String>,
    pub private_tmp: bool,
    pub protect_system: ProtectSystem,
    pub protect_home: ProtectHome,
    pub read_write_paths: Vec<PathBuf>,
    pub read_only_paths: Vec<PathBuf>,
    pub inaccessible_paths: Vec<PathBuf>,
    pub no_new_privileges: bool,
    /// Capability numbers, sorted.
    pub ambient_capabilities: Vec<u8>,
    /// Capability numbers kept in the bounding set; `None`: all.
    pub capability_bounding_set: Option<Vec<u8>>,
    pub umask: Option<u32>,
    pub runtime_directory: Vec<String>,
    pub state_directory: Vec<String>,
    pub cache_directory: Vec<String>,
    pub logs_directory: Vec<String>,
    pub limits: Vec<Limit>,
}

impl Sandbox {
    /// The directories systemd would create for the unit: (path, kind).
    pub fn directories(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for (base, names) in [
            ("/run", &self.runtime_directory),
            ("/var/lib", &self.state_directory),
            ("/var/cache", &self.cache_directory),
            ("/var/log", &self.logs_directory),
        ] {
            out.extend(names.iter().map(|n| Path::new(base).join(n)));
        }
        out
    }
}

/// A step run before the service starts (`ExecStartPre=`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecStep {
    pub argv: Vec<String>,
    /// `+`: as root, outside the sandbox.
    pub privileged: bool,
    /// `-`: a failure is logged, not fatal.
    pub ignore_failure: bool,
}

/// `true`, `false`, or a word.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum BoolOrWord {
    Bool(bool),
    Word(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSandbox {
    #[serde(default)]
    private_tmp: Option<bool>,
    #[serde(default)]
    protect_system: Option<Spanned<BoolOrWord>>,
    #[serde(default)]
    protect_home: Option<Spanned<BoolOrWord>>,
    #[serde(default)]
    read_write_paths: Vec<Spanned<String>>,
    #[serde(default)]
    read_only_paths: Vec<Spanned<String>>,
    #[serde(default)]
    inaccessible_paths: Vec<Spanned<String>>,
    #[serde(default)]
    no_new_privileges: Option<bool>,
    #[serde(default)]
    ambient_capabilities: Vec<Spanned<String>>,
    #[serde(default)]
    capability_bounding_set: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    umask: Option<Spanned<String>>,
    #[serde(default)]
    runtime_directory: Vec<Spanned<String>>,
    #[serde(default)]
    state_directory: Vec<Spanned<String>>,
    #[serde(default)]
    cache_directory: Vec<Spanned<String>>,
    #[serde(default)]
    logs_directory: Vec<Spanned<String>>,
    #[serde(default)]
    limit_nofile: Option<Spanned<String>>,
    #[serde(default)]
    limit_nproc: Option<Spanned<String>>,
    #[serde(default)]
    limit_core: Option<Spanned<String>>,
    #[serde(default)]
    limit_memlock: Option<Spanned<String>>,
    #[serde(default)]
    limit_stack: Option<Spanned<String>>,
    #[serde(default)]
    limit_as: Option<Spanned<String>>,
    #[serde(default)]
    limit_fsize: Option<Spanned<String>>,
    #[serde(default)]
    limit_data: Option<Spanned<String>>,
}

type At<'a> = &'a dyn Fn(&Location, String) -> ManifestError;

/// A user or group: a name as `useradd` allows, or a number.
fn check_account(key: &str, v: &Spanned<String>, at: At<'_>) -> Result<String, ManifestError> {
    let s = v.value.trim();
    let ok = !s.is_empty()
        && s.len() <= 32
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'));
    if !ok {
        return Err(at(
            &v.referenced,
            format!(
                "{key}: expected a user or group name or number, got {:?}",
                v.value
            ),
        ));
    }
    Ok(s.to_string())
}

fn paths(key: &str, list: &[Spanned<String>], at: At<'_>) -> Result<Vec<PathBuf>, ManifestError> {
    let mut out = Vec::new();
    for p in list {
        // systemd's `-` (ignore if missing) and `+` prefixes are not taken.
        let path = Path::new(&p.value);
        let plain = path.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
        if !path.is_absolute() || path.parent().is_none() || !plain || p.value.contains(']') {
            return Err(at(
                &p.referenced,
                format!(
                    "sandbox.{key}: expected an absolute path below / without . or .. (and without ']'), got {:?}",
                    p.value
                ),
            ));
        }
        out.push(path.to_path_buf());
    }
    Ok(out)
}

fn dir_names(
    key: &str,
    list: &[Spanned<String>],
    at: At<'_>,
) -> Result<Vec<String>, ManifestError> {
    let mut out = Vec::new();
    for n in list {
        let p = Path::new(&n.value);
        let ok = !n.value.is_empty()
            && p.is_relative()
            && p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
            && !n.value.contains(']');
        if !ok {
            return Err(at(
                &n.referenced,
                format!(
                    "sandbox.{key}: expected a relative directory name like \"tomcat10\", got {:?}",
                    n.value
                ),
            ));
        }
        out.push(n.value.clone());
    }
    Ok(out)
}

fn caps(key: &str, names: &[String], loc: &Location, at: At<'_>) -> Result<Vec<u8>, ManifestError> {
    let mut out = Vec::new();
    for n in names {
        let c = capability(n).ok_or_else(|| {
            at(
                loc,
                format!("sandbox.{key}: unknown capability {n:?} (expected a name like CAP_NET_BIND_SERVICE)"),
            )
        })?;
        out.push(c);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn limit_value(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("infinity") {
        return Some(libc::RLIM_INFINITY);
    }
    s.parse().ok()
}

fn limit(
    key: &str,
    resource: u32,
    v: &Spanned<String>,
    at: At<'_>,
) -> Result<Limit, ManifestError> {
    let (soft, hard) = match v.value.split_once(':') {
        Some((s, h)) => (limit_value(s), limit_value(h)),
        None => (limit_value(&v.value), limit_value(&v.value)),
    };
    match (soft, hard) {
        (Some(soft), Some(hard)) if soft <= hard => Ok(Limit {
            resource,
            soft,
            hard,
        }),
        _ => Err(at(
            &v.referenced,
            format!(
                "sandbox.{key}: expected a number, SOFT:HARD (soft <= hard) or infinity, got {:?}",
                v.value
            ),
        )),
    }
}

/// Validates the credentials and the `sandbox:` section.
pub(super) fn validate(
    user: Option<&Spanned<String>>,
    group: Option<&Spanned<String>>,
    supplementary: &[Spanned<String>],
    raw: Option<&Spanned<RawSandbox>>,
    at: At<'_>,
) -> Result<Option<Sandbox>, ManifestError> {
    if user.is_none() && group.is_none() && supplementary.is_empty() && raw.is_none() {
        return Ok(None);
    }
    let empty = RawSandbox::default();
    let r = raw.map(|r| &r.value).unwrap_or(&empty);
    let word = |key: &str,
                v: &Option<Spanned<BoolOrWord>>,
                words: &[&str]|
     -> Result<String, ManifestError> {
        Ok(match v {
            None => "no".to_string(),
            Some(s) => match &s.value {
                BoolOrWord::Bool(true) => "yes".to_string(),
                BoolOrWord::Bool(false) => "no".to_string(),
                BoolOrWord::Word(w) if words.contains(&w.as_str()) => w.clone(),
                BoolOrWord::Word(w) => {
                    return Err(at(
                        &s.referenced,
                        format!(
                            "sandbox.{key}: expected true, false, {}, got {w:?}",
                            words[2..].join(" or ")
                        ),
                    ))
                }
            },
        })
    };
    let protect_system = match word(
        "protect_system",
        &r.protect_system,
        &["yes", "no", "full", "strict"],
    )?
    .as_str()
    {
        "yes" => ProtectSystem::Yes,
        "full" => ProtectSystem::Full,
        "strict" => ProtectSystem::Strict,
        _ => ProtectSystem::No,
    };
    let protect_home = match word(
        "protect_home",
        &r.protect_home,
        &["yes", "no", "read-only", "tmpfs"],
    )?
    .as_str()
    {
        "yes" => ProtectHome::Yes,
        "read-only" => ProtectHome::ReadOnly,
        "tmpfs" => ProtectHome::Tmpfs,
        _ => ProtectHome::No,
    };
    let ambient = {
        let names: Vec<String> = r
            .ambient_capabilities
            .iter()
            .map(|s| s.value.clone())
            .collect();
        let loc = r
            .ambient_capabilities
            .first()
            .map(|s| s.referenced)
            .unwrap_or(Location::UNKNOWN);
        caps("ambient_capabilities", &names, &loc, at)?
    };
    let bounding = match &r.capability_bounding_set {
        None => None,
        Some(b) => {
            // systemd's `~` in front: every capability but these.
            let invert = b.value.first().is_some_and(|f| f.starts_with('~'));
            let names: Vec<String> = b
                .value
                .iter()
                .map(|n| n.trim_start_matches('~').to_string())
                .collect();
            let listed = caps("capability_bounding_set", &names, &b.referenced, at)?;
            Some(if invert {
                (0..CAPABILITIES.len())
                    .filter_map(|c| u8::try_from(c).ok())
                    .filter(|c| !listed.contains(c))
                    .collect()
            } else {
                listed
            })
        }
    };
    if let Some(b) = &bounding {
        if let Some(c) = ambient.iter().find(|c| !b.contains(c)) {
            let loc = r
                .ambient_capabilities
                .first()
                .map(|s| s.referenced)
                .unwrap_or(Location::UNKNOWN);
            return Err(at(
                &loc,
                format!(
                    "sandbox.ambient_capabilities: {} is not in capability_bounding_set",
                    CAPABILITIES[usize::from(*c)]
                ),
            ));
        }
    }
    let umask = match &r.umask {
        None => None,
        Some(u) => Some(
            u32::from_str_radix(u.value.trim(), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    at(
                        &u.referenced,
                        format!(
                            "sandbox.umask: expected an octal mode like \"0027\", got {:?}",
                            u.value
                        ),
                    )
                })?,
        ),
    };
    let mut limits = Vec::new();
    for (key, value) in [
        ("limit_nofile", &r.limit_nofile),
        ("limit_nproc", &r.limit_nproc),
        ("limit_core", &r.limit_core),
        ("limit_memlock", &r.limit_memlock),
        ("limit_stack", &r.limit_stack),
        ("limit_as", &r.limit_as),
        ("limit_fsize", &r.limit_fsize),
        ("limit_data", &r.limit_data),
    ] {
        if let Some(v) = value {
            let resource = LIMITS
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, r)| *r)
                .expect("every limit key is in LIMITS");
            limits.push(limit(key, resource, v, at)?);
        }
    }
    let mut supplementary_groups = Vec::new();
    for g in supplementary {
        supplementary_groups.push(check_account("supplementary_groups", g, at)?);
    }
    Ok(Some(Sandbox {
        user: user.map(|u| check_account("user", u, at)).transpose()?,
        group: group.map(|g| check_account("group", g, at)).transpose()?,
        supplementary_groups,
        private_tmp: r.private_tmp.unwrap_or(false),
        protect_system,
        protect_home,
        read_write_paths: paths("read_write_paths", &r.read_write_paths, at)?,
        read_only_paths: paths("read_only_paths", &r.read_only_paths, at)?,
        inaccessible_paths: paths("inaccessible_paths", &r.inaccessible_paths, at)?,
        no_new_privileges: r.no_new_privileges.unwrap_or(false),
        ambient_capabilities: ambient,
        capability_bounding_set: bounding,
        umask,
        runtime_directory: dir_names("runtime_directory", &r.runtime_directory, at)?,
        state_directory: dir_names("state_directory", &r.state_directory, at)?,
        cache_directory: dir_names("cache_directory", &r.cache_directory, at)?,
        logs_directory: dir_names("logs_directory", &r.logs_directory, at)?,
        limits,
    }))
}

/// Validates `exec_start_pre`: argv lists, `+` (as root, outside the
/// sandbox) and `-` (failure ignored) in front of the program as systemd
/// has them.
pub(super) fn exec_steps(
    raw: &[Spanned<Vec<String>>],
    at: At<'_>,
) -> Result<Vec<ExecStep>, ManifestError> {
    let mut out = Vec::new();
    for s in raw {
        let mut argv = s.value.clone();
        let (mut privileged, mut ignore_failure) = (false, false);
        if let Some(first) = argv.first_mut() {
            loop {
                if let Some(rest) = first.strip_prefix('+') {
                    privileged = true;
                    *first = rest.to_string();
                } else if let Some(rest) = first.strip_prefix('-') {
                    ignore_failure = true;
                    *first = rest.to_string();
                } else {
                    break;
                }
            }
        }
        let ok = argv
            .first()
            .is_some_and(|p| Path::new(p).is_absolute() && !p.contains('\0'))
            && argv.iter().all(|a| !a.contains('\0'));
        if !ok {
            return Err(at(
                &s.referenced,
                "exec_start_pre: expected argv lists with an absolute program, e.g. [\"+/usr/libexec/app/prepare\", \"--x\"] (+: as root, -: failure ignored)".into(),
            ));
        }
        out.push(ExecStep {
            argv,
            privileged,
            ignore_failure,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    fn parse(extra: &str) -> Result<Manifest, String> {
        Manifest::parse(
            "web",
            Path::new("web.yaml"),
            &format!("exec: [\"/bin/app\"]\nready: {{tcp: \"h:1\"}}\n{extra}"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn systemd_settings_parse_into_what_the_sandbox_applies() {
        let m = parse(
            "user: tomcat\nexec_start_pre: [[\"+-/usr/libexec/x\", \"a\"], [\"/bin/true\"]]\n\
             sandbox:\n  protect_system: strict\n  protect_home: read-only\n  private_tmp: true\n\
             \x20 ambient_capabilities: [CAP_NET_BIND_SERVICE]\n  capability_bounding_set: [\"~CAP_SYS_ADMIN\"]\n\
             \x20 umask: \"0027\"\n  limit_nofile: \"1024:4096\"\n  limit_core: infinity\n",
        )
        .unwrap();
        let s = m.sandbox.unwrap();
        assert_eq!(s.user.as_deref(), Some("tomcat"));
        assert_eq!(s.protect_system, ProtectSystem::Strict);
        assert_eq!(s.protect_home, ProtectHome::ReadOnly);
        assert_eq!(s.ambient_capabilities, vec![10]);
        let b = s.capability_bounding_set.unwrap();
        assert!(
            !b.contains(&21) && b.contains(&10),
            "~: all but CAP_SYS_ADMIN"
        );
        assert_eq!(s.umask, Some(0o27));
        assert_eq!(s.limits[0].soft, 1024);
        assert_eq!(s.limits[0].hard, 4096);
        assert_eq!(s.limits[1].hard, libc::RLIM_INFINITY);
        assert_eq!(m.exec_start_pre.len(), 2);
        assert!(m.exec_start_pre[0].privileged && m.exec_start_pre[0].ignore_failure);
        assert_eq!(m.exec_start_pre[0].argv, ["/usr/libexec/x", "a"]);
        assert!(!m.exec_start_pre[1].privileged);
        assert!(parse("").unwrap().sandbox.is_none(), "no keys, no sandbox");
        assert_eq!(
            parse("sandbox: {protect_system: true}\n")
                .unwrap()
                .sandbox
                .unwrap()
                .protect_system,
            ProtectSystem::Yes
        );
    }

    #[test]
    fn bad_values_are_positioned_errors() {
        for (extra, want) in [
            ("sandbox: {umask: \"999\"}\n", "3:18: sandbox.umask"),
            ("sandbox: {ambient_capabilities: [CAP_FLY]}\n", "unknown capability \"CAP_FLY\""),
            ("sandbox: {limit_nofile: \"10:5\"}\n", "sandbox.limit_nofile"),
            ("sandbox: {protect_system: sometimes}\n", "expected true, false, full or strict"),
            ("sandbox: {read_write_paths: [rel]}\n", "sandbox.read_write_paths"),
            ("sandbox: {runtime_directory: [\"../etc\"]}\n", "relative directory name"),
            ("user: \"bad user\"\n", "3:7: user:"),
            ("exec_start_pre: [[\"relative\"]]\n", "exec_start_pre"),
            (
                "sandbox: {ambient_capabilities: [CAP_KILL], capability_bounding_set: [CAP_CHOWN]}\n",
                "CAP_KILL is not in capability_bounding_set",
            ),
            ("sandbox: {private_devices: true}\n", "unknown field `private_devices`"),
        ] {
            let e = parse(extra).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn credentials_and_sandbox_are_part_of_the_key() {
        let plain = parse("").unwrap();
        let user = parse("user: nobody\n").unwrap();
        let strict = parse("user: nobody\nsandbox: {protect_system: strict}\n").unwrap();
        assert_ne!(plain.canonical(), user.canonical());
        assert_ne!(user.canonical(), strict.canonical());
        assert!(
            !plain.canonical().contains("sandbox"),
            "older manifests keep their keys"
        );
    }
}

#[cfg(test)]
mod env_file_tests {
    use crate::manifest::parse_env_file;

    #[test]
    fn environment_files_read_as_systemd_reads_them() {
        let vars = parse_env_file(
            "# comment\n; also\nARGS=\"--web.listen-address=:9090 --x\"\nA='single $x'\nB=plain value\nC=\"esc \\\" q\"\nnot a line\n=novalue\n",
        );
        assert_eq!(
            vars,
            [
                ("ARGS", "--web.listen-address=:9090 --x"),
                ("A", "single $x"),
                ("B", "plain value"),
                ("C", "esc \" q"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }
}
