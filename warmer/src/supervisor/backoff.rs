//! Not retrying what keeps failing:
//! - a checkpoint of the same digest that failed [`MAX_TRIES`] times (a full
//!   disk, a service CRIU cannot dump) is skipped at later starts until the
//!   digest changes or `warmer checkpoint` succeeds; a dump that cannot fit
//!   on the cache's filesystem is not started at all;
//! - an image that CRIU could not restore is quarantined, and the same state
//!   is not checkpointed again and again: after [`MAX_RESTORE_FAILURES`]
//!   failed restores of one digest its checkpoints stop (until the digest
//!   changes, the next boot, or `warmer checkpoint`).
//!
//! ```text
//! <run>/<svc>/checkpoint-failures.json   {format_version, digest, count, last}   (per boot: /run)
//! <run>/<svc>/restore-failures.json      {format_version, digest, count, last}
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Failures of one digest before its checkpoint is skipped.
pub const MAX_TRIES: u32 = 3;
/// Failed restores of one digest before its checkpoints stop.
pub const MAX_RESTORE_FAILURES: u32 = 2;

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Checkpoint,
    Restore,
}

impl Kind {
    fn file(self) -> &'static str {
        match self {
            Kind::Checkpoint => "checkpoint-failures.json",
            Kind::Restore => "restore-failures.json",
        }
    }
    fn limit(self) -> u32 {
        match self {
            Kind::Checkpoint => MAX_TRIES,
            Kind::Restore => MAX_RESTORE_FAILURES,
        }
    }
}

/// The failure files' format (absent: 0, read the same).
const FAILURES_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failures {
    #[serde(default)]
    format_version: u32,
    pub digest: String,
    pub count: u32,
    pub last: String,
    #[serde(skip, default = "default_kind")]
    kind: Kind,
}

fn default_kind() -> Kind {
    Kind::Checkpoint
}

impl Default for Failures {
    fn default() -> Self {
        Self::empty(Kind::Checkpoint)
    }
}

impl Failures {
    fn empty(kind: Kind) -> Self {
        Self {
            format_version: FAILURES_VERSION,
            digest: String::new(),
            count: 0,
            last: String::new(),
            kind,
        }
    }

    /// The checkpoint failures recorded in `run_dir`.
    pub fn load(run_dir: &Path) -> Self {
        Self::load_kind(run_dir, Kind::Checkpoint)
    }

    pub fn load_kind(run_dir: &Path, kind: Kind) -> Self {
        let mut f: Self = std::fs::read(run_dir.join(kind.file()))
            .ok()
            .and_then(|b| serde_json::from_slice::<Self>(&b).ok())
            .filter(|f| f.format_version <= FAILURES_VERSION)
            .unwrap_or_else(|| Self::empty(kind));
        f.kind = kind;
        f
    }

    /// Why the checkpoint of `digest` is skipped, if it is.
    pub fn skip(&self, digest: &str) -> Option<String> {
        (self.digest == digest && self.count >= self.kind.limit()).then(|| match self.kind {
            Kind::Checkpoint => format!(
                "it failed {} times for this version of the service (last: {}); fix that, then `warmer checkpoint` (or change the service)",
                self.count, self.last
            ),
            Kind::Restore => format!(
                "its image could not be restored {} times (last: {}); this version stays cold until it changes (or `warmer checkpoint`)",
                self.count, self.last
            ),
        })
    }

    pub fn record(&self, run_dir: &Path, digest: &str, why: &str) -> std::io::Result<()> {
        let next = Failures {
            format_version: FAILURES_VERSION,
            digest: digest.to_string(),
            count: if self.digest == digest {
                self.count + 1
            } else {
                1
            },
            last: why.chars().take(500).collect(),
            kind: self.kind,
        };
        cache::fsutil::write_atomic(
            run_dir,
            self.kind.file(),
            &serde_json::to_vec(&next).expect("serializes"),
            0o600,
            cache::fsutil::Durability::Atomic,
        )
    }

    pub fn clear(&self, run_dir: &Path) {
        let _ = std::fs::remove_file(run_dir.join(self.kind.file()));
    }
}

/// How `warmer reset` names the restore history it forgot.
pub const RESTORE_TIMINGS: &str = "restore timings (eager/lazy, cold is faster)";

/// `warmer reset SVC`: forgets every measurement and count that steers the
/// service's next starts (this file's failure counts, the restore history).
/// Returns what it removed, described.
pub fn forget(run_dir: &Path) -> std::io::Result<Vec<&'static str>> {
    let mut gone = Vec::new();
    for (file, what) in [
        (Kind::Checkpoint.file(), "failed checkpoints"),
        (Kind::Restore.file(), "failed restores"),
        (crate::restore::choose::FILE, RESTORE_TIMINGS),
    ] {
        match std::fs::remove_file(run_dir.join(file)) {
            Ok(()) => gone.push(what),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(gone)
}

/// Why a dump of the tree under `init` would not fit in the cache's
/// filesystem, if it would not: its resident memory (what CRIU writes,
/// roughly) against the free space, with a margin.
pub fn no_room(cache_root: &Path, init: nix::unistd::Pid) -> Option<String> {
    let free = nix::sys::statvfs::statvfs(cache_root)
        .ok()
        .map(|s| s.blocks_available() * s.fragment_size())?;
    let need = tree_resident_bytes(init);
    // 10% and 16 MiB of margin: metadata, state copies, page-table rounding.
    let want = need + need / 10 + (16 << 20);
    (free < want).then(|| {
        format!(
            "the image would need about {} MB and {} has {} MB free",
            want >> 20,
            cache_root.display(),
            free >> 20
        )
    })
}

/// Resident bytes of the processes in the PID namespace of `init`.
fn tree_resident_bytes(init: nix::unistd::Pid) -> u64 {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let Some(want) = ns(&init.as_raw().to_string()) else {
        return 0;
    };
    let page = 4096u64;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|d| d.ok())
        .filter_map(|d| d.file_name().to_str().map(String::from))
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| ns(p).as_ref() == Some(&want))
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/statm")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_failures_of_one_digest_skip_it_and_another_digest_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..MAX_TRIES {
            let f = Failures::load(dir.path());
            assert!(f.skip("aa").is_none());
            f.record(dir.path(), "aa", "No space left on device")
                .unwrap();
        }
        let f = Failures::load(dir.path());
        let why = f.skip("aa").unwrap();
        assert!(
            why.contains("failed 3 times") && why.contains("No space left"),
            "{why}"
        );
        assert!(f.skip("bb").is_none(), "another version is tried");
        f.record(dir.path(), "bb", "x").unwrap();
        assert_eq!(Failures::load(dir.path()).count, 1);
        Failures::load(dir.path()).clear(dir.path());
        assert!(Failures::load(dir.path()).skip("aa").is_none());
    }
}
