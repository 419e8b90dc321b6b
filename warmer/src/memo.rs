//! Per-boot memo of facts derived from files: the sha256 of a digest input,
//! the version a CRIU binary reports.
//!
//! Hashing `/usr/bin/python3` (7 MB) and asking `criu --version` cost ~12 ms
//! at every start: most of what warmer adds to a bare CRIU restore. The memo
//! keeps each fact with the file's [`FileIdentity`] (the reasoning, and the
//! type, of the cache's "verified this boot" stamps). It
//! lives in the run directory, a tmpfs under systemd: gone at reboot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cache::fsutil::{self, Durability, FileIdentity};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Fact {
    id: FileIdentity,
    /// The other files of a fact drawn from several ([`Memo::get_all`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    more: Vec<FileIdentity>,
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

/// The memo file's format (absent: 0, read the same).
const MEMO_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct OnDisk {
    #[serde(default)]
    format_version: u32,
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
        let boot_id = fsutil::boot_id();
        let facts = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<OnDisk>(&b).ok())
            .filter(|d| {
                !boot_id.is_empty() && d.boot_id == boot_id && d.format_version <= MEMO_VERSION
            })
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
            FileIdentity::of_path(file)
        } else {
            None
        };
        if let (Some(id), Some(fact)) = (&id, self.facts.get(&key)) {
            if &fact.id == id && fact.more.is_empty() {
                return Ok(fact.value.clone());
            }
        }
        let value = f(file)?;
        // Only remember what was computed from the file as it still is.
        if let Some(id) = id.filter(|id| FileIdentity::of_path(file).as_ref() == Some(id)) {
            self.facts.insert(
                key,
                Fact {
                    id,
                    more: Vec::new(),
                    value: value.clone(),
                },
            );
            self.dirty = true;
        }
        Ok(value)
    }

    /// The fact `kind` drawn from all of `files` (at least one), computed
    /// by `f` unless remembered while every one of them is the same file.
    pub fn get_all<E>(
        &mut self,
        kind: &str,
        files: &[&Path],
        f: impl FnOnce() -> Result<String, E>,
    ) -> Result<String, E> {
        let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        let key = format!("{kind}:{}", names.join("+"));
        let ids = || -> Option<Vec<FileIdentity>> {
            files.iter().map(|p| FileIdentity::of_path(p)).collect()
        };
        let before = if self.path.is_some() { ids() } else { None };
        if let (Some([first, rest @ ..]), Some(fact)) = (before.as_deref(), self.facts.get(&key)) {
            if &fact.id == first && fact.more == rest {
                return Ok(fact.value.clone());
            }
        }
        let value = f()?;
        if let Some(mut now) = before.filter(|b| ids().as_ref() == Some(b)) {
            if !now.is_empty() {
                let id = now.remove(0);
                self.facts.insert(
                    key,
                    Fact {
                        id,
                        more: now,
                        value: value.clone(),
                    },
                );
                self.dirty = true;
            }
        }
        Ok(value)
    }

    /// Writes the memo back if it learned something (best effort).
    pub fn save(&mut self) {
        let (Some(path), true) = (&self.path, self.dirty) else {
            return;
        };
        let disk = OnDisk {
            format_version: MEMO_VERSION,
            boot_id: self.boot_id.clone(),
            facts: std::mem::take(&mut self.facts),
        };
        // A lost memo only costs a re-hash: no fsync (it lives in /run).
        if let (Ok(bytes), Some(dir), Some(name)) = (
            serde_json::to_vec(&disk),
            path.parent(),
            path.file_name().and_then(|n| n.to_str()),
        ) {
            let _ = fsutil::write_atomic(dir, name, &bytes, 0o600, Durability::Atomic);
        }
        self.facts = disk.facts;
        self.dirty = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fact_of_several_files_is_asked_again_when_any_of_them_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("passwd"), dir.path().join("group"));
        std::fs::write(&a, "web:x:101").unwrap();
        std::fs::write(&b, "web:x:101:").unwrap();
        let calls = std::cell::Cell::new(0);
        let mut memo = Memo::load(dir.path());
        let get = |memo: &mut Memo| {
            memo.get_all("ids", &[&a, &b], || {
                calls.set(calls.get() + 1);
                Ok::<_, String>(format!("{}", calls.get()))
            })
            .unwrap()
        };
        assert_eq!(get(&mut memo), "1");
        memo.save();
        let mut memo = Memo::load(dir.path());
        assert_eq!(get(&mut memo), "1", "kept across processes");
        std::fs::write(&b, "web:x:101:other").unwrap();
        assert_eq!(get(&mut memo), "2", "the second file changed");
        assert_eq!(get(&mut memo), "2");
        assert_eq!(calls.get(), 2);
    }

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
