use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::checksum::HASH_ALGORITHM;
use crate::error::{Error, Problem};
use crate::fsutil::{self};
use crate::key::*;
use crate::lock::ServiceLock;
use crate::meta::{Meta, NewEntry, FORMAT_VERSION};
use crate::seal::*;

pub(crate) const LAYOUT: &str = "warmer-cache 2";
/// Layout 1 named entries by digest alone (one generation per digest).
pub(crate) const LAYOUT_1: &str = "warmer-cache 1";
pub(crate) const META: &str = "meta.json";
pub(crate) const DATA: &str = "data";
/// Quarantined entries kept for inspection; older ones are deleted.
pub(crate) const QUARANTINE_KEEP: usize = 8;

/// A cache rooted at a directory. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct Cache {
    pub(crate) root: PathBuf,
    pub(crate) uid: u32,
}

/// A published entry: its directory and its metadata.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `<digest>.<generation>`: the entry's name in the store.
    pub key: String,
    pub dir: PathBuf,
    pub meta: Meta,
    /// Why the entry was marked stale (its inputs changed while its service
    /// ran); a stale entry is never restored.
    pub stale: Option<String>,
}

/// How an entry came to be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// A stamp from this boot matched every file: no hashing needed.
    Stamped,
    /// Every file was hashed now.
    Hashed,
}

impl Entry {
    /// The payload directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(DATA)
    }
}

/// One item of [`Cache::list`]: an entry, or the digest of one whose
/// metadata is damaged and what is wrong with it.
pub type Listed = Result<Entry, (String, Problem)>;

/// An entry being written. Removed on drop unless published.
#[derive(Debug)]
pub struct Staging {
    pub(crate) dir: PathBuf,
    pub(crate) published: bool,
}

impl Staging {
    /// The entry-to-be's directory (its payload is under [`Staging::data_dir`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the caller writes the payload.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(DATA)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

pub(crate) fn mkdir_private(path: &Path) -> Result<(), Error> {
    match DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(path)(e)),
    }
}

pub(crate) fn fsync_dir(path: &Path) -> Result<(), Error> {
    fsutil::fsync_dir(path).map_err(Error::io(path))
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Cache {
    /// Opens (creating if needed) the store at `root` and removes staging
    /// leftovers of processes that no longer exist.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, Error> {
        let root = root.into();
        if fs::symlink_metadata(&root).is_err() {
            fs::create_dir_all(&root).map_err(Error::io(&root))?;
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
                .map_err(Error::io(&root))?;
        }
        // The cache's user is whoever runs warmer (root in production), never
        // whoever happens to own the directory: images are restored, with
        // their credentials, by that user.
        let uid = nix::unistd::geteuid().as_raw();
        crate::fsutil::check_trusted(&root, uid).map_err(|why| Error::Untrusted {
            root: root.clone(),
            why,
        })?;
        let root_md = fs::symlink_metadata(&root).map_err(Error::io(&root))?;
        if root_md.uid() != uid {
            return Err(Error::Untrusted {
                root: root.clone(),
                why: crate::fsutil::Untrusted::Owner {
                    path: root.clone(),
                    owner: root_md.uid(),
                    expected: uid,
                },
            });
        }
        // Images are secrets: the root is private whatever created it.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(Error::io(&root))?;
        let version = root.join("VERSION");
        let mut migrate = false;
        match fs::read_to_string(&version) {
            Ok(found) if found.trim() == LAYOUT => {}
            Ok(found) if found.trim() == LAYOUT_1 => migrate = true,
            Ok(found) => {
                return Err(Error::Layout {
                    root,
                    found: found.trim().to_string(),
                    expected: LAYOUT.to_string(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_atomic(&root, "VERSION", format!("{LAYOUT}\n").as_bytes())?;
            }
            Err(e) => return Err(Error::io(&version)(e)),
        }
        for sub in [
            "tmp",
            "entries",
            "quarantine",
            "locks",
            "verified",
            "stale",
            "pins",
            "generations",
            "incoming",
            "notes",
        ] {
            mkdir_private(&root.join(sub))?;
        }
        for sub in [
            "tmp",
            "entries",
            "quarantine",
            "locks",
            "verified",
            "stale",
            "pins",
            "incoming",
            "notes",
        ] {
            let path = root.join(sub);
            let md = fs::symlink_metadata(&path).map_err(Error::io(&path))?;
            let what = if md.file_type().is_symlink() {
                "symlink"
            } else if !md.is_dir() {
                "file"
            } else {
                ""
            };
            if !what.is_empty() {
                return Err(Error::NotADirectory {
                    root: root.clone(),
                    path,
                    what,
                });
            }
            if md.uid() != uid || md.mode() & 0o077 != 0 {
                return Err(Error::Untrusted {
                    root: root.clone(),
                    why: crate::fsutil::Untrusted::Writable {
                        path,
                        mode: md.mode() & 0o7777,
                    },
                });
            }
        }
        let cache = Self { root, uid };
        if migrate {
            cache.migrate_from_1()?;
        }
        cache.clean_staging()?;
        Ok(cache)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Layout 1 -> 2: every entry becomes generation 1 of its digest.
    /// Renames only, under a lock; safe to repeat after a crash midway.
    pub(crate) fn migrate_from_1(&self) -> Result<(), Error> {
        let _lock = ServiceLock::acquire(&self.root.join("locks/.layout"), ".layout", true)?;
        if fs::read_to_string(self.root.join("VERSION")).is_ok_and(|v| v.trim() == LAYOUT) {
            return Ok(()); // another opener migrated it meanwhile
        }
        for sub in ["entries", "stale"] {
            let dir = self.root.join(sub);
            for dent in fs::read_dir(&dir).map_err(Error::io(&dir))? {
                let name = dent.map_err(Error::io(&dir))?.file_name();
                let name = name.to_string_lossy();
                if valid_digest(&name).is_ok() {
                    let (from, to) = (dir.join(&*name), dir.join(make_key(&name, 1)));
                    fs::rename(&from, &to).map_err(Error::io(&from))?;
                }
            }
            fsync_dir(&dir)?;
        }
        // Stamps name files by old paths; the next verification makes new ones.
        let verified = self.root.join("verified");
        for dent in fs::read_dir(&verified).map_err(Error::io(&verified))? {
            let _ = fs::remove_file(dent.map_err(Error::io(&verified))?.path());
        }
        write_atomic(&self.root, "VERSION", format!("{LAYOUT}\n").as_bytes())
    }

    pub(crate) fn entries_dir(&self) -> PathBuf {
        self.root.join("entries")
    }

    /// The directory of the entry named `key` (whether or not it exists).
    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.entries_dir().join(key)
    }

    /// Removes `tmp/stage-<pid>-*` directories whose process is gone: a crash
    /// between staging and rename leaves them, never a partial entry.
    pub(crate) fn clean_staging(&self) -> Result<(), Error> {
        let tmp = self.root.join("tmp");
        for dent in fs::read_dir(&tmp).map_err(Error::io(&tmp))? {
            let dent = dent.map_err(Error::io(&tmp))?;
            let name = dent.file_name();
            let name = name.to_string_lossy();
            let pid = name
                .strip_prefix("stage-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new("/proc").join(p.to_string()).exists());
            if !alive {
                let path = dent.path();
                fs::remove_dir_all(&path).map_err(Error::io(&path))?;
            }
        }
        Ok(())
    }

    /// Takes the per-service cache lock, held while an entry of the service
    /// is restored, published or removed; `wait` blocks until it is free.
    pub fn lock_service(&self, service: &str, wait: bool) -> Result<ServiceLock, Error> {
        let path = self.root.join("locks").join(format!("{service}.lock"));
        ServiceLock::acquire(&path, service, wait)
    }

    /// Takes the lock that says "a supervisor runs this service", held for the
    /// supervisor's whole life; never waits.
    pub fn lock_run(&self, service: &str) -> Result<ServiceLock, Error> {
        let path = self.root.join("locks").join(format!("{service}.run"));
        ServiceLock::acquire(&path, service, false)
    }

    /// A fresh staging directory with an empty `data/`.
    pub fn stage(&self) -> Result<Staging, Error> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos();
        let dir = self
            .root
            .join("tmp")
            .join(format!("stage-{}-{nanos}", std::process::id()));
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(Error::io(&dir))?;
        let staging = Staging {
            dir,
            published: false,
        };
        mkdir_private(&staging.data_dir())?;
        Ok(staging)
    }

    /// Checksums the staged payload, writes its metadata, makes everything
    /// durable and moves it into place atomically.
    ///
    /// The entry is a new generation of its service (one more than the
    /// highest it has) and becomes the current one of its digest: a pin
    /// left by a rollback to an earlier generation is lifted. The caller
    /// holds the service's lock ([`Cache::lock_service`]).
    pub fn publish(&self, mut staging: Staging, new: NewEntry) -> Result<Entry, Error> {
        valid_digest(&new.digest)?;
        let data = staging.data_dir();
        let mut files = Vec::new();
        seal_tree(&data, &data, &mut files, !new.no_sync)?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        if let Some(expected) = &new.expected_files {
            check_expected(expected, &files).map_err(|problem| Error::Damaged {
                key: new.digest.clone(),
                problem,
            })?;
        }
        let generation = self.next_generation(&new.service)?;
        let now = SystemTime::now();
        let (created, created_unix) = new.created.unwrap_or_else(|| {
            (
                humantime::format_rfc3339_seconds(now).to_string(),
                now_unix(),
            )
        });
        let meta = Meta {
            format_version: FORMAT_VERSION,
            service: new.service,
            digest: new.digest,
            generation,
            inputs: new.inputs,
            created,
            created_unix,
            host: new.host,
            cold_start_ms: new.cold_start_ms,
            origin: new.origin,
            bytes: files.iter().map(|f| f.size).sum(),
            hash: HASH_ALGORITHM.to_string(),
            files,
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|source| Error::Meta {
            path: staging.dir.join(META),
            source,
        })?;
        crate::failpoint("publish-before-meta");
        write_atomic(&staging.dir, META, &json)?;
        fsync_dir(&data)?;
        fsync_dir(&staging.dir)?;
        crate::failpoint("publish-before-rename");

        let key = make_key(&meta.digest, generation);
        let target = self.entry_dir(&key);
        // A new generation number under the service lock: the name is free
        // (a leftover would be a half-removed entry: it was renamed out of
        // `entries/` first, see `remove`).
        fs::rename(&staging.dir, &target).map_err(Error::io(&target))?;
        staging.published = true;
        crate::failpoint("publish-after-rename");
        fsync_dir(&self.entries_dir())?;
        let _ = fs::remove_file(self.stale_path(&key));
        let _ = fs::remove_file(self.pin_path(&meta.digest));
        let entry = self.read_entry(&key)?;
        // Every file was just hashed: this boot need not hash them again.
        self.write_stamp(&entry)?;
        Ok(entry)
    }

    /// The next generation number of `service`: one more than any it ever
    /// had (remembered in `generations/<service>`, so a number is never
    /// reused after its entry was quarantined or removed). The caller holds
    /// the service lock.
    pub(crate) fn next_generation(&self, service: &str) -> Result<u64, Error> {
        let dir = self.root.join("generations");
        let counted = fs::read_to_string(dir.join(service))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let present = self
            .list()?
            .into_iter()
            .flatten()
            .filter(|e| e.meta.service == service)
            .map(|e| e.meta.generation)
            .max()
            .unwrap_or(0);
        let next = counted.max(present) + 1;
        write_atomic(&dir, service, format!("{next}\n").as_bytes())?;
        Ok(next)
    }

    /// The names of every generation of `digest`, oldest first.
    pub(crate) fn keys_of(&self, digest: &str) -> Result<Vec<String>, Error> {
        valid_digest(digest)?;
        let dir = self.entries_dir();
        let mut keys: Vec<(u64, String)> = Vec::new();
        for dent in fs::read_dir(&dir).map_err(Error::io(&dir))? {
            let name = dent.map_err(Error::io(&dir))?.file_name();
            let name = name.to_string_lossy();
            if let Ok((d, gen)) = split_key(&name) {
                if d == digest {
                    keys.push((gen, name.into_owned()));
                }
            }
        }
        keys.sort();
        Ok(keys.into_iter().map(|(_, k)| k).collect())
    }

    /// The current generation of `digest`: the one a rollback pinned, else
    /// the newest (stale or not: the caller decides). Its files are not
    /// checked here; call [`Cache::verify`] before trusting them.
    pub fn lookup(&self, digest: &str) -> Result<Option<Entry>, Error> {
        if let Some(key) = self.pinned(digest) {
            if let Some(e) = self.lookup_key(&key)? {
                return Ok(Some(e));
            }
        }
        match self.keys_of(digest)?.pop() {
            Some(key) => self.read_entry(&key).map(Some),
            None => Ok(None),
        }
    }

    /// The entry named `key`, if it exists.
    pub fn lookup_key(&self, key: &str) -> Result<Option<Entry>, Error> {
        valid_key(key)?;
        match fs::symlink_metadata(self.entry_dir(key)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(self.entry_dir(key))(e)),
            Ok(_) => self.read_entry(key).map(Some),
        }
    }

    pub(crate) fn read_entry(&self, key: &str) -> Result<Entry, Error> {
        let dir = self.entry_dir(key);
        let damaged = |problem| Error::Damaged {
            key: key.to_string(),
            problem,
        };
        let (digest, generation) = split_key(key)?;
        let meta_path = dir.join(META);
        let md = fs::symlink_metadata(&meta_path)
            .map_err(|e| damaged(Problem::BadMeta(format!("{}: {e}", meta_path.display()))))?;
        self.check_private(&md, META).map_err(damaged)?;
        let bytes = fs::read(&meta_path).map_err(Error::io(&meta_path))?;
        #[derive(serde::Deserialize)]
        struct Version {
            format_version: u32,
        }
        let version: Version =
            serde_json::from_slice(&bytes).map_err(|e| damaged(Problem::BadMeta(e.to_string())))?;
        let mut meta: Meta = match version.format_version {
            // Format 1 had no generations: an entry was its digest's only one.
            1 | FORMAT_VERSION => serde_json::from_slice(&bytes)
                .map_err(|e| damaged(Problem::BadMeta(e.to_string())))?,
            v => return Err(damaged(Problem::UnknownFormat(v))),
        };
        if version.format_version == 1 {
            meta.generation = generation;
        }
        if meta.digest != digest || meta.generation != generation {
            return Err(damaged(Problem::WrongDigest {
                expected: key.to_string(),
                found: make_key(&meta.digest, meta.generation),
            }));
        }
        let stale = fs::read_to_string(self.stale_path(key))
            .ok()
            .map(|r| r.trim().to_string());
        Ok(Entry {
            key: key.to_string(),
            dir,
            meta,
            stale,
        })
    }

    /// All published entries, newest first. Entries whose metadata cannot be
    /// read come back as `(digest, problem)`.
    pub fn list(&self) -> Result<Vec<Listed>, Error> {
        let dir = self.entries_dir();
        let mut out = Vec::new();
        for dent in fs::read_dir(&dir).map_err(Error::io(&dir))? {
            let dent = dent.map_err(Error::io(&dir))?;
            let key = dent.file_name().to_string_lossy().into_owned();
            match self.read_entry(&key) {
                Ok(e) => out.push(Ok(e)),
                Err(Error::Damaged { key, problem }) => out.push(Err((key, problem))),
                Err(Error::BadKey(k)) => {
                    out.push(Err((k.clone(), Problem::BadMeta("not a cache key".into()))))
                }
                Err(e) => return Err(e),
            }
        }
        // Newest first: by creation time, and within a service by
        // generation (several can be made in one second).
        out.sort_by_key(|r| match r {
            Ok(e) => std::cmp::Reverse((e.meta.created_unix, e.meta.generation)),
            Err(_) => std::cmp::Reverse((0, 0)),
        });
        Ok(out)
    }
}
