//! What is said about entries without changing them: stale marks, rollback
//! pins, notes, downloads under way (`incoming/`), quarantine, removal and
//! pruning of old generations.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::os::unix::fs::OpenOptionsExt;

use crate::error::Error;

use crate::key::*;
use crate::seal::*;
use crate::store::*;

impl Cache {
    pub(crate) fn stamp_path(&self, key: &str) -> PathBuf {
        self.root.join("verified").join(key)
    }

    pub(crate) fn stale_path(&self, key: &str) -> PathBuf {
        self.root.join("stale").join(key)
    }

    pub(crate) fn pin_path(&self, digest: &str) -> PathBuf {
        self.root.join("pins").join(digest)
    }

    /// Makes `key` the generation its digest's next lookup returns (a
    /// rollback), until a newer generation is published or [`Cache::unpin`].
    pub fn pin(&self, key: &str) -> Result<(), Error> {
        let (digest, _) = split_key(key)?;
        if self.lookup_key(key)?.is_none() {
            return Err(Error::io(self.entry_dir(key))(io::Error::from(
                io::ErrorKind::NotFound,
            )));
        }
        write_atomic(&self.root.join("pins"), digest, key.as_bytes())
    }

    /// Lifts a rollback pin: the digest's newest generation is current again.
    pub fn unpin(&self, digest: &str) -> Result<(), Error> {
        valid_digest(digest)?;
        match fs::remove_file(self.pin_path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(Error::io(self.pin_path(digest))(e))
            }
            _ => Ok(()),
        }
    }

    /// The key a rollback pinned for `digest`, if any.
    pub fn pinned(&self, digest: &str) -> Option<String> {
        fs::read_to_string(self.pin_path(digest))
            .ok()
            .map(|k| k.trim().to_string())
            .filter(|k| split_key(k).is_ok_and(|(d, _)| d == digest))
    }

    fn notes_dir(&self, key: &str) -> PathBuf {
        self.root.join("notes").join(key)
    }

    /// Keeps `bytes` beside an entry under `name` (lowercase letters and
    /// `-`): something learned about it after it was published (what its
    /// restores touched first), which changes nothing of the entry itself.
    /// Replaced whole; goes with the entry.
    pub fn set_note(&self, key: &str, name: &str, bytes: &[u8]) -> Result<(), Error> {
        valid_key(key)?;
        valid_note(name)?;
        if bytes.len() > NOTE_MAX {
            return Err(Error::io(self.notes_dir(key).join(name))(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a note holds at most {NOTE_MAX} bytes"),
            )));
        }
        if self.lookup_key(key)?.is_none() {
            return Err(Error::io(self.entry_dir(key))(io::Error::from(
                io::ErrorKind::NotFound,
            )));
        }
        let dir = self.notes_dir(key);
        mkdir_private(&dir)?;
        write_atomic(&dir, name, bytes)
    }

    /// The note `name` of an entry, if there is one (read only when it is a
    /// regular file of the store's owner, private, and not oversized).
    pub fn note(&self, key: &str, name: &str) -> Option<Vec<u8>> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        valid_key(key).ok()?;
        valid_note(name).ok()?;
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.notes_dir(key).join(name))
            .ok()?;
        let md = file.metadata().ok()?;
        let private = md.is_file() && md.uid() == self.uid && md.mode() & 0o077 == 0;
        if !private || md.len() > NOTE_MAX as u64 {
            return None;
        }
        let mut bytes = Vec::new();
        file.take(NOTE_MAX as u64).read_to_end(&mut bytes).ok()?;
        Some(bytes)
    }

    /// Removes the note `name` of an entry; whether there was one.
    pub fn remove_note(&self, key: &str, name: &str) -> Result<bool, Error> {
        valid_key(key)?;
        valid_note(name)?;
        let path = self.notes_dir(key).join(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(path)(e)),
        }
    }

    /// Marks an entry stale: it is never restored again, and `gc` removes it
    /// first. Used when a digest input changes under a running service.
    pub fn mark_stale(&self, key: &str, reason: &str) -> Result<(), Error> {
        valid_key(key)?;
        write_atomic(
            &self.root.join("stale"),
            key,
            format!("{reason}\n").as_bytes(),
        )
    }

    /// Lifts a stale mark (an explicit rollback to this entry).
    pub fn clear_stale(&self, key: &str) -> Result<(), Error> {
        valid_key(key)?;
        match fs::remove_file(self.stale_path(key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(Error::io(self.stale_path(key))(e))
            }
            _ => Ok(()),
        }
    }

    /// Marks every generation of `digest` stale (its inputs changed).
    pub fn mark_digest_stale(&self, digest: &str, reason: &str) -> Result<(), Error> {
        for key in self.keys_of(digest)? {
            self.mark_stale(&key, reason)?;
        }
        Ok(())
    }

    /// A private directory for the blobs of an entry being downloaded from
    /// another tier (`name`: lowercase hex), kept across failures so a
    /// download that broke off continues with what it has. Removed by
    /// [`Cache::drop_incoming`] once the entry is published, by `gc` when old.
    pub fn incoming(&self, name: &str) -> Result<PathBuf, Error> {
        valid_digest(name)?;
        let dir = self.root.join("incoming").join(name);
        mkdir_private(&dir)?;
        let md = fs::symlink_metadata(&dir).map_err(Error::io(&dir))?;
        self.check_private(&md, "incoming")
            .map_err(|problem| Error::Damaged {
                key: format!("incoming/{name}"),
                problem,
            })?;
        Ok(dir)
    }

    /// Removes a download directory (see [`Cache::incoming`]).
    pub fn drop_incoming(&self, name: &str) -> Result<(), Error> {
        valid_digest(name)?;
        let dir = self.root.join("incoming").join(name);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(&dir)(e)),
            _ => Ok(()),
        }
    }

    /// Removes download directories untouched for longer than `age`.
    pub(crate) fn prune_incoming(&self, age: Duration) -> Result<u64, Error> {
        let dir = self.root.join("incoming");
        let mut bytes = 0;
        for dent in fs::read_dir(&dir).map_err(Error::io(&dir))? {
            let path = dent.map_err(Error::io(&dir))?.path();
            let old = fs::symlink_metadata(&path)
                .and_then(|md| md.modified())
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|e| e > age);
            if old {
                bytes += fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|d| d.metadata().ok())
                    .map(|md| md.len())
                    .sum::<u64>();
                fs::remove_dir_all(&path).map_err(Error::io(&path))?;
            }
        }
        Ok(bytes)
    }

    /// Moves an entry aside (never restored again, kept for inspection) and
    /// records why. Returns where it went.
    pub fn quarantine(&self, key: &str, reason: &str) -> Result<PathBuf, Error> {
        valid_key(key)?;
        let qdir = self.root.join("quarantine");
        // Unique even for two quarantines of one key in the same second.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let target = qdir.join(format!("{key}.{}.{nanos:09}", now_unix()));
        let src = self.entry_dir(key);
        fs::rename(&src, &target).map_err(Error::io(&src))?;
        fsync_dir(&self.entries_dir())?;
        self.forget(key);
        // The reason is best effort: the entry is already out of reach.
        let _ = write_atomic(&target, "REASON", format!("{reason}\n").as_bytes());
        self.trim_quarantine()?;
        Ok(target)
    }

    pub(crate) fn trim_quarantine(&self) -> Result<(), Error> {
        let qdir = self.root.join("quarantine");
        // <key>.<secs>.<nanos>: oldest first.
        let mut items: Vec<((u64, u64), PathBuf)> = fs::read_dir(&qdir)
            .map_err(Error::io(&qdir))?
            .filter_map(|d| d.ok())
            .map(|d| {
                let name = d.file_name().to_string_lossy().into_owned();
                let mut parts = name.rsplit('.');
                let nanos = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                let secs = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                ((secs, nanos), d.path())
            })
            .collect();
        items.sort();
        while items.len() > QUARANTINE_KEEP {
            let (_, path) = items.remove(0);
            fs::remove_dir_all(&path).map_err(Error::io(&path))?;
        }
        Ok(())
    }

    /// Deletes an entry. Renamed out of `entries/` first, so a crash midway
    /// never leaves a half-deleted entry where a reader could find it.
    pub fn remove(&self, key: &str) -> Result<(), Error> {
        valid_key(key)?;
        let src = self.entry_dir(key);
        let doomed = self
            .root
            .join("tmp")
            .join(format!("stage-{}-rm-{key}", std::process::id()));
        fs::rename(&src, &doomed).map_err(Error::io(&src))?;
        fsync_dir(&self.entries_dir())?;
        self.forget(key);
        fs::remove_dir_all(&doomed).map_err(Error::io(&doomed))
    }

    /// Drops the stamp, stale marker and pin of an entry that is gone.
    pub(crate) fn forget(&self, key: &str) {
        let _ = fs::remove_file(self.stamp_path(key));
        let _ = fs::remove_file(self.stale_path(key));
        let _ = fs::remove_dir_all(self.notes_dir(key));
        if let Ok((digest, _)) = split_key(key) {
            if self.pinned(digest).as_deref() == Some(key) {
                let _ = fs::remove_file(self.pin_path(digest));
            }
        }
    }

    /// Keeps the newest `keep` entries of `service` (never removing `protect`,
    /// an entry's key) and deletes the rest. Returns the keys removed.
    pub fn prune_service(
        &self,
        service: &str,
        keep: usize,
        protect: Option<&str>,
    ) -> Result<Vec<String>, Error> {
        let mut removed = Vec::new();
        let mut kept = 0usize;
        // Newest generation first: never by creation time, which has
        // one-second resolution (four checkpoints in a second kept .5 .6 .8).
        let mut mine: Vec<Entry> = self
            .list()?
            .into_iter()
            .flatten()
            .filter(|e| e.meta.service == service)
            .collect();
        mine.sort_by_key(|e| std::cmp::Reverse(e.meta.generation));
        for entry in mine {
            if kept < keep || Some(entry.key.as_str()) == protect {
                kept += 1;
                continue;
            }
            self.remove(&entry.key)?;
            removed.push(entry.key);
        }
        Ok(removed)
    }
}

/// The largest note an entry keeps.
const NOTE_MAX: usize = 16 << 20;

fn valid_note(name: &str) -> Result<(), Error> {
    if !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
    {
        Ok(())
    } else {
        Err(Error::io(name)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a note's name is lowercase letters and '-'",
        )))
    }
}
