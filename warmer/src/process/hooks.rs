//! What a service can rely on around checkpoints and restores: its hooks,
//! the restore signal, and the restore-info file.
//!
//! Every restore of an image brings back the same memory, "random" state
//! included: a Python service seeded at start drew the same
//! `random.getrandbits(64)` after two restores of one image, and so would
//! every node that pulled it. So a restored service is told, three ways
//! (use any):
//! - `hooks.after_restore`: a command warmer runs after CRIU restored the
//!   tree and before the readiness probe, inside the service's namespaces,
//!   with its credentials and environment (reseed, reconnect, re-read
//!   secrets); failing, the restore is undone and the service cold-starts.
//!   `hooks.before_checkpoint` runs before every checkpoint (close
//!   connections, drop secrets from memory); failing, no checkpoint.
//! - `restore.signal`: sent to the service's main process after each
//!   restore, before the probe.
//! - `WARMER_RESTORE_INFO`: every service has it in its environment from
//!   its cold start; it names a file warmer rewrites (whole, by rename)
//!   before each restore's hook or signal:
//!
//! ```text
//! {"format_version": 1, "restores": 3, "image": "<digest>.<gen>", "generation": 2,
//!  "origin": "local" | "registry ..." | "import ...", "boot_id": "...",
//!  "restored_at": "2026-11-29T12:00:00Z", "random": "<32 fresh bytes, hex>"}
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The environment variable naming the restore-info file.
pub const RESTORE_INFO_ENV: &str = "WARMER_RESTORE_INFO";
/// Its name in the service's run directory.
pub const RESTORE_INFO_FILE: &str = "restore-info.json";
const RESTORE_INFO_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook {kind} ({argv}) could not start")]
    Spawn {
        kind: &'static str,
        argv: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hook {kind} ({argv}) exited with {status}")]
    Failed {
        kind: &'static str,
        argv: String,
        status: ExitStatus,
    },
    #[error("hook {kind} ({argv}) did not end within {}; killed", humantime::format_duration(*limit))]
    TimedOut {
        kind: &'static str,
        argv: String,
        limit: Duration,
    },
}

/// Runs `cmd` in a process group of its own until it exits or `limit`
/// passes; either way the whole group is killed after (nothing it started
/// outlives it). `None`: it ran out of time.
pub fn run_in_group(cmd: &mut Command, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    use std::os::unix::process::CommandExt;
    let mut child = cmd.process_group(0).spawn()?;
    let group = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let end_group = || {
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    };
    let deadline = crate::process::clock::deadline(limit);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                end_group();
                return Ok(Some(status));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                end_group();
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
        }
    }
}

/// Runs hook `argv` (`kind` names it in messages) inside the namespaces of
/// the service whose init is `init` (`nsenter`: its PID and mount
/// namespaces), with `env` and in `cwd`, bounded by `limit`. Returns how
/// long it took.
pub fn run(
    kind: &'static str,
    argv: &[String],
    init: nix::unistd::Pid,
    as_user: Option<(u32, u32)>,
    env: &[(std::ffi::OsString, std::ffi::OsString)],
    cwd: &Path,
    limit: Duration,
) -> Result<Duration, HookError> {
    let t = Instant::now();
    let shown = argv.join(" ");
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--target={}", init.as_raw()));
    // A sandboxed service's hooks run as it does: in its user namespace,
    // as its user and group (without supplementary groups).
    if let Some((uid, gid)) = as_user {
        cmd.arg("--user")
            .arg(format!("--setuid={uid}"))
            .arg(format!("--setgid={gid}"));
    }
    cmd.args(["--pid", "--mount", "--"])
        .args(argv)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::null());
    match run_in_group(&mut cmd, limit) {
        Err(source) => Err(HookError::Spawn {
            kind,
            argv: shown,
            source,
        }),
        Ok(None) => Err(HookError::TimedOut {
            kind,
            argv: shown,
            limit,
        }),
        Ok(Some(status)) if !status.success() => Err(HookError::Failed {
            kind,
            argv: shown,
            status,
        }),
        Ok(Some(_)) => Ok(t.elapsed()),
    }
}

/// The restore-info file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreInfo {
    pub format_version: u32,
    /// How many times this image was restored here (this one included).
    pub restores: u64,
    pub image: String,
    pub generation: u64,
    /// `local`, or where the image came from (`registry REF@DIGEST`,
    /// `import FILE`).
    pub origin: String,
    pub boot_id: String,
    pub restored_at: String,
    /// 32 bytes from the kernel's generator, new at every restore.
    pub random: String,
}

/// The restore-info file of a service's run directory.
///
/// A sandboxed service may run as another user, who cannot enter the run
/// directory (root's, 0700): its file lives in `<service>.info/` beside it,
/// a directory of root's that anyone may read.
pub fn restore_info_path(run_dir: &Path, sandboxed: bool) -> PathBuf {
    restore_info_dir(run_dir, sandboxed).join(RESTORE_INFO_FILE)
}

fn restore_info_dir(run_dir: &Path, sandboxed: bool) -> PathBuf {
    match (sandboxed, run_dir.file_name()) {
        (true, Some(name)) => {
            let mut dir = name.to_os_string();
            dir.push(".info");
            run_dir.with_file_name(dir)
        }
        _ => run_dir.to_path_buf(),
    }
}

/// Rewrites the restore-info file for a restore of `entry` (atomically:
/// the service never reads half of it). Readable by the service.
pub fn write_restore_info(
    run_dir: &Path,
    sandboxed: bool,
    entry: &cache::Entry,
) -> std::io::Result<RestoreInfo> {
    let dir = restore_info_dir(run_dir, sandboxed);
    if sandboxed {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        // Root writes into it: only a directory of root's, never a link.
        let md = std::fs::symlink_metadata(&dir)?;
        if !md.is_dir() || md.uid() != 0 || md.mode() & 0o022 != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{} is not a directory only root can write", dir.display()),
            ));
        }
    }
    let path = dir.join(RESTORE_INFO_FILE);
    let before: Option<RestoreInfo> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let restores = before
        .filter(|b| b.image == entry.key)
        .map_or(1, |b| b.restores + 1);
    let mut random = [0u8; 32];
    getrandom(&mut random)?;
    let info = RestoreInfo {
        format_version: RESTORE_INFO_VERSION,
        restores,
        image: entry.key.clone(),
        generation: entry.meta.generation,
        origin: entry
            .meta
            .origin
            .clone()
            .unwrap_or_else(|| "local".to_string()),
        boot_id: cache::fsutil::boot_id(),
        restored_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        random: hex::encode(random),
    };
    cache::fsutil::write_atomic(
        &dir,
        RESTORE_INFO_FILE,
        &serde_json::to_vec_pretty(&info).expect("serializes"),
        0o644,
        cache::fsutil::Durability::Atomic,
    )?;
    Ok(info)
}

/// Fills `buf` from the kernel's generator.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Whether environment variable `name` matches `pattern` (`*`: any run of
/// characters; otherwise exact).
pub fn env_matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || !name.ends_with(last) || name.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Names that look like secrets (for `inspect` and `validate`).
pub const SECRET_PATTERNS: &[&str] = &[
    "*TOKEN*",
    "*PASSWORD*",
    "*PASSWD*",
    "*SECRET*",
    "*KEY*",
    "*CREDENTIAL*",
];

/// Whether `name` looks like the name of a secret.
pub fn looks_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    SECRET_PATTERNS.iter().any(|p| env_matches(p, &upper))
}

/// The environment variable names of the processes in the PID namespace
/// of `init` matching any of `patterns`.
pub fn forbidden_env(init: nix::unistd::Pid, patterns: &[String]) -> Vec<String> {
    if patterns.is_empty() {
        return Vec::new();
    }
    let mut found = std::collections::BTreeSet::new();
    for pid in crate::process::ports::namespace_pids(init) {
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for var in raw.split(|b| *b == 0).filter(|v| !v.is_empty()) {
            let name = String::from_utf8_lossy(var.split(|b| *b == b'=').next().unwrap_or(&[]))
                .into_owned();
            if patterns.iter().any(|p| env_matches(p, &name)) {
                found.insert(name);
            }
        }
    }
    found.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names() {
        assert!(env_matches(
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SECRET_ACCESS_KEY"
        ));
        assert!(!env_matches("AWS_SECRET", "AWS_SECRET_ACCESS_KEY"));
        assert!(env_matches("*TOKEN*", "GITHUB_TOKEN"));
        assert!(env_matches("*TOKEN*", "TOKEN"));
        assert!(env_matches("DB_*", "DB_PASSWORD"));
        assert!(!env_matches("DB_*", "XDB_PASSWORD"));
        assert!(env_matches("*_KEY_*ID", "AWS_KEY_X_ID"));
        assert!(looks_secret("api_key"));
        assert!(looks_secret("DATABASE_PASSWORD"));
        assert!(!looks_secret("PATH"));
    }
}
