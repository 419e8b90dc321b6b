//! Watching a running service's digest inputs.
//!
//! When the program, a file argument, a `digest.files` entry or the manifest
//! changes while the service runs, the service's image is marked stale at once
//! (so a crash or reboot never restores it, even if the file is later changed
//! back), the run record says so, and the next start is a cold one that makes
//! a fresh image. Parent directories are watched, not the files themselves:
//! editors and package managers replace files by rename.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::{EventKind, RecursiveMode, Watcher};

use crate::digest::ServiceDigest;
use crate::manifest::Manifest;

pub struct InputWatch {
    _watcher: notify::RecommendedWatcher,
    changed: Arc<Mutex<Option<String>>>,
}

/// What a watched path must still be for the digest to hold.
#[derive(Clone)]
enum Expect {
    /// File contents with this sha256.
    Sha256(String),
    /// The manifest, by canonical form (comments and layout may change).
    Manifest { name: String, canonical: String },
}

impl InputWatch {
    /// Starts watching; `wake` gets a byte when something changed.
    pub fn start(
        manifest: &Manifest,
        digest: &ServiceDigest,
        wake: UnixStream,
    ) -> notify::Result<Self> {
        let mut expect: BTreeMap<PathBuf, Expect> = BTreeMap::new();
        let mut trees: Vec<PathBuf> = Vec::new();
        for f in &digest.inputs.files {
            expect.insert(f.path.clone(), Expect::Sha256(f.sha256.clone()));
            // /usr/bin/python3 -> python3.11: an upgrade replaces the target.
            if let Ok(real) = f.path.canonicalize() {
                expect.insert(real, Expect::Sha256(f.sha256.clone()));
            }
        }
        for d in manifest.digest_files.iter().filter(|d| d.is_dir()) {
            trees.push(d.clone());
        }
        expect.insert(
            manifest.path.clone(),
            Expect::Manifest {
                name: manifest.name.clone(),
                canonical: manifest.canonical(),
            },
        );
        let dirs: BTreeSet<PathBuf> = expect
            .keys()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();

        let changed = Arc::new(Mutex::new(None));
        let flag = changed.clone();
        let wake = Mutex::new(wake);
        let handler = move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            for path in &event.paths {
                let reason = if let Some(e) = expect.get(path) {
                    still_valid(path, e)
                        .then_some(())
                        .map_or_else(|| Some(format!("{} changed", path.display())), |()| None)
                } else if trees.iter().any(|t| path.starts_with(t)) {
                    Some(format!("{} changed", path.display()))
                } else {
                    None
                };
                if let Some(reason) = reason {
                    let mut slot = flag.lock().expect("watch flag");
                    if slot.is_none() {
                        *slot = Some(reason);
                        let _ = wake.lock().expect("wake").write_all(b"w");
                    }
                }
            }
        };
        let mut watcher = notify::recommended_watcher(handler)?;
        for d in &dirs {
            watcher.watch(d, RecursiveMode::NonRecursive)?;
        }
        for t in manifest.digest_files.iter().filter(|d| d.is_dir()) {
            watcher.watch(t, RecursiveMode::Recursive)?;
        }
        Ok(Self {
            _watcher: watcher,
            changed,
        })
    }

    /// Why the inputs no longer match the digest, once they don't.
    pub fn changed(&self) -> Option<String> {
        self.changed.lock().expect("watch flag").clone()
    }

    /// Asks for one comparison of the digest with the files (without a
    /// wake-up: the supervisor looks every second): what a watch started
    /// after its service must do, since a change between the last
    /// comparison and the watch's start raised no event.
    pub fn flag(&self, reason: &str) {
        let mut slot = self.changed.lock().expect("watch flag");
        if slot.is_none() {
            *slot = Some(reason.to_string());
        }
    }

    /// Forgets a change that turned out not to change the digest.
    pub fn clear(&self) {
        *self.changed.lock().expect("watch flag") = None;
    }
}

fn still_valid(path: &Path, expect: &Expect) -> bool {
    match expect {
        Expect::Sha256(want) => crate::digest::sha256_file(path).is_ok_and(|got| &got == want),
        Expect::Manifest { name, canonical } => std::fs::read_to_string(path)
            .ok()
            .and_then(|text| Manifest::parse(name, path, &text).ok())
            .is_some_and(|m| &m.canonical() == canonical),
    }
}
