//! Per-boot memo of facts derived from files: the sha256 of a digest input,
//! the version a CRIU binary reports.
//!
//! Hashing `/usr/bin/python3` (7 MB) and asking `criu --version` cost ~12 ms
//! at every start: most of what warmer adds to a bare CRIU restore. The memo
//! keeps each fact with the file's identity (device, inode, size, mtime,
//! ctime): any write, replacement, chmod or chown changes ctime or the inode,
//! and ctime cannot be set from user space, so a matching identity means the
//! same bytes (the reasoning the cache's "verified this boot" stamps use). It
//! lives in the run directory, a tmpfs under systemd: gone at reboot.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Identity {
    fn of(path: &Path) -> Option<Self> {
        let md = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
            ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Fact {
    id: Identity,
    value: String,
}

/// Facts keyed by (kind, path), valid while the file's identity holds.
#[derive(Debug, Default)]
pub struct Memo {
    path: Option<PathBuf>,
    facts: BTreeMap<String, Fact>,
    boot_id: String,
    dirty: bool,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    boot_id: String,
    facts: BTreeMap<String, Fact>,
}

impl Memo {
    /// A memo that remembers nothing (status, tests).
    pub fn none() -> Self {
        Self::default()
    }

    /// Loads `<run-dir>/.memo.json` (a memo of another boot is ignored).
    pub fn load(run_root: &Path) -> Self {
        let path = run_root.join(".memo.json");
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let facts = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<OnDisk>(&b).ok())
            .filter(|d| !boot_id.is_empty() && d.boot_id == boot_id)
            .map(|d| d.facts)
            .unwrap_or_default();
        Self {
            path: Some(path),
            facts,
            boot_id,
            dirty: false,
        }
    }

    /// The fact `kind` about `file`, computed by `f` unless remembered.
    pub fn get<E>(
        &mut self,
        kind: &str,
        file: &Path,
        f: impl FnOnce(&Path) -> Result<String, E>,
    ) -> Result<String, E> {
        let key = format!("{kind}:{}", file.display());
        let id = if self.path.is_some() {
            Identity::of(file)
        } else {
            None
        };
        if let (Some(id), Some(fact)) = (&id, self.facts.get(&key)) {
            if &fact.id == id {
                return Ok(fact.value.clone());
            }
        }
        let value = f(file)?;
        // Only remember what was computed from the file as it still is.
        if let Some(id) = id.filter(|id| Identity::of(file).as_ref() == Some(id)) {
            self.facts.insert(
                key,
                Fact {
                    id,
                    value: value.clone(),
                },
            );
            self.dirty = true;
        }
        Ok(value)
    }

    /// Writes the memo back if it learned something (best effort).
    pub fn save(&mut self) {
        let (Some(path), true) = (&self.path, self.dirty) else {
            return;
        };
        let disk = OnDisk {
            boot_id: self.boot_id.clone(),
            facts: std::mem::take(&mut self.facts),
        };
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        if let Ok(bytes) = serde_json::to_vec(&disk) {
            if std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
        self.facts = disk.facts;
        self.dirty = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bin");
        std::fs::write(&file, "v1").unwrap();
        let calls = std::cell::Cell::new(0);
        let mut memo = Memo::load(dir.path());
        let get = |memo: &mut Memo| {
            memo.get("sha", &file, |p| {
                calls.set(calls.get() + 1);
                std::fs::read_to_string(p).map_err(|e| e.to_string())
            })
            .unwrap()
        };
        assert_eq!(get(&mut memo), "v1");
        memo.save();
        let mut memo = Memo::load(dir.path());
        assert_eq!(get(&mut memo), "v1");
        std::fs::write(&file, "v2").unwrap();
        assert_eq!(get(&mut memo), "v2");
        assert_eq!(calls.get(), 2, "computed once per version of the file");
        let mut none = Memo::none();
        assert_eq!(get(&mut none), "v2");
        assert_eq!(calls.get(), 3, "a disabled memo always computes");
    }
}
