//! Establishing that an entry is what its maker published: its shape (no
//! links, devices or strays; private modes), its checksums, and the per-boot
//! stamp that lets a verified entry skip hashing until a file changes.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::checksum::{hash_file_with, Cores, FileSum};
use crate::error::{Error, Problem};
use crate::stamp::{self, Stamp};

use crate::seal::*;
use crate::store::*;

impl Cache {
    pub(crate) fn write_stamp(&self, entry: &Entry) -> Result<(), Error> {
        let files: Vec<String> = entry.meta.files.iter().map(|f| f.path.clone()).collect();
        let Some(ids) = stamp::current(&entry.dir, &files) else {
            return Ok(());
        };
        let stamp = Stamp {
            boot_id: stamp::boot_id(),
            files: ids,
        };
        let json = serde_json::to_vec(&stamp).expect("stamp serializes");
        write_atomic(&self.root.join("verified"), &entry.key, &json)
    }

    /// The entry's shape, without reading any content: its directories are
    /// private and ours, its payload holds exactly the recorded files, each
    /// a regular file (no symlink, fifo or device) of the recorded size.
    /// Cheap (a readdir and an lstat per file); checked before anything of an
    /// entry is used, stamp or not.
    pub fn check_shape(&self, entry: &Entry) -> Result<(), Problem> {
        let data = self.check_tree(entry)?;
        for sum in &entry.meta.files {
            let md = fs::symlink_metadata(data.join(&sum.path)).map_err(|e| not_opened(sum, e))?;
            self.check_file(&md, sum)?;
        }
        Ok(())
    }

    /// The entry's directories are private and ours and its payload holds no
    /// file it does not record; returns the payload directory.
    fn check_tree(&self, entry: &Entry) -> Result<PathBuf, Problem> {
        let dir_md = fs::symlink_metadata(&entry.dir).map_err(|e| Problem::Unreadable {
            path: ".".into(),
            error: e.to_string(),
        })?;
        self.check_private(&dir_md, ".")?;
        let data = entry.data_dir();
        let mut found = BTreeSet::new();
        self.list_tree(&data, &data, &mut found)?;
        let recorded: BTreeSet<&str> = entry.meta.files.iter().map(|f| f.path.as_str()).collect();
        if let Some(extra) = found.iter().find(|f| !recorded.contains(f.as_str())) {
            return Err(Problem::Unexpected {
                path: extra.clone(),
            });
        }
        Ok(data)
    }

    /// One recorded file as found: a regular file, private, of its size.
    fn check_file(&self, md: &fs::Metadata, sum: &FileSum) -> Result<(), Problem> {
        if !md.is_file() {
            return Err(Problem::NotRegular {
                path: sum.path.clone(),
            });
        }
        self.check_private(md, &sum.path)?;
        if md.len() != sum.size {
            return Err(Problem::Size {
                path: sum.path.clone(),
                expected: sum.size,
                found: md.len(),
            });
        }
        Ok(())
    }

    /// Whether a stamp from this boot matches every file of `entry` as it is
    /// now (and the entry has its recorded shape: see [`Cache::check_shape`]).
    pub fn stamp_valid(&self, entry: &Entry) -> bool {
        if self.check_shape(entry).is_err() {
            return false;
        }
        let Ok(bytes) = fs::read(self.stamp_path(&entry.key)) else {
            return false;
        };
        let Ok(stamp) = serde_json::from_slice::<Stamp>(&bytes) else {
            return false;
        };
        let files: Vec<String> = entry.meta.files.iter().map(|f| f.path.clone()).collect();
        let boot = stamp::boot_id();
        let dirs_private = [entry.dir.clone(), entry.data_dir()]
            .iter()
            .all(|d| fs::symlink_metadata(d).is_ok_and(|md| self.check_private(&md, ".").is_ok()));
        !boot.is_empty()
            && stamp.boot_id == boot
            && dirs_private
            && stamp::current(&entry.dir, &files).is_some_and(|now| now == stamp.files)
    }

    /// Makes sure `entry` is intact before it is used: free when a stamp from
    /// this boot still matches every file, a full [`Cache::verify`] otherwise.
    pub fn ensure_verified(
        &self,
        entry: &Entry,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Verification, Problem> {
        if self.stamp_valid(entry) {
            return Ok(Verification::Stamped);
        }
        self.verify(entry, progress)?;
        Ok(Verification::Hashed)
    }

    pub(crate) fn check_private(&self, md: &fs::Metadata, rel: &str) -> Result<(), Problem> {
        if !md.is_file() && !md.is_dir() {
            return Err(Problem::NotRegular {
                path: rel.to_string(),
            });
        }
        if md.uid() != self.uid {
            return Err(Problem::Owner {
                path: rel.to_string(),
                uid: md.uid(),
                expected: self.uid,
            });
        }
        if md.mode() & 0o077 != 0 {
            return Err(Problem::Mode {
                path: rel.to_string(),
                mode: md.mode() & 0o7777,
            });
        }
        Ok(())
    }

    /// Checks an entry completely: ownership and modes, no missing or extra
    /// files, sizes, and the checksum of every file. `progress` is called with
    /// the bytes hashed so far.
    pub fn verify(&self, entry: &Entry, progress: &mut dyn FnMut(u64, u64)) -> Result<(), Problem> {
        self.verify_with(entry, Cores::All, progress)
    }

    /// [`Cache::verify`] with a choice of cores.
    pub fn verify_with(
        &self,
        entry: &Entry,
        cores: Cores,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), Problem> {
        let data = self.check_tree(entry)?;
        let total = entry.meta.bytes;
        let mut done = 0u64;
        for sum in &entry.meta.files {
            let mut file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(data.join(&sum.path))
                .map_err(|e| not_opened(sum, e))?;
            let unreadable = |e: io::Error| Problem::Unreadable {
                path: sum.path.clone(),
                error: e.to_string(),
            };
            let md = file.metadata().map_err(unreadable)?;
            self.check_file(&md, sum)?;
            let (hex, n) = hash_file_with(&mut file, cores).map_err(unreadable)?;
            if n != sum.size || hex != sum.blake3 {
                return Err(Problem::Checksum {
                    path: sum.path.clone(),
                });
            }
            done += n;
            progress(done, total);
        }
        // Best effort: without a stamp the next use hashes again.
        let _ = self.write_stamp(entry);
        Ok(())
    }

    /// Every file under `dir`, as paths relative to `base`; directories are
    /// checked for ownership and mode on the way.
    pub(crate) fn list_tree(
        &self,
        base: &Path,
        dir: &Path,
        out: &mut BTreeSet<String>,
    ) -> Result<(), Problem> {
        let rel = |p: &Path| relative(base, p);
        let unreadable = |p: &Path, e: io::Error| Problem::Unreadable {
            path: rel(p),
            error: e.to_string(),
        };
        let md = fs::symlink_metadata(dir).map_err(|e| unreadable(dir, e))?;
        self.check_private(&md, &rel(dir))?;
        for dent in fs::read_dir(dir).map_err(|e| unreadable(dir, e))? {
            let dent = dent.map_err(|e| unreadable(dir, e))?;
            let path = dent.path();
            let ft = dent.file_type().map_err(|e| unreadable(&path, e))?;
            if ft.is_dir() {
                self.list_tree(base, &path, out)?;
            } else {
                out.insert(rel(&path));
            }
        }
        Ok(())
    }
}

/// Why a recorded file could not be looked at: missing, or unreadable.
fn not_opened(sum: &FileSum, e: io::Error) -> Problem {
    if e.kind() == io::ErrorKind::NotFound {
        Problem::Missing {
            path: sum.path.clone(),
        }
    } else {
        Problem::Unreadable {
            path: sum.path.clone(),
            error: e.to_string(),
        }
    }
}
