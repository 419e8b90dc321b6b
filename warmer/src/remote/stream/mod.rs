//! A fresh node restores before the pull ends.
//!
//! An image pushed with its frame index ([`super::frames::Index`], signed
//! with the manifest) can be restored from a staging entry that holds only
//! part of its memory:
//!
//! ```text
//!  head (manifest, signature, config) ── small files, working set, frame index
//!    └─ page files: sparse; the frames of the pages a restore reads before
//!       the tree runs (never-lazy pages and the working set) fetched by range,
//!       neighbours in one request, 8 requests at once, each frame checked
//!       against its sha256 before it is decompressed
//!         └─ restore (lazy; CRIU's lazy-pages daemon asks warmer's page server,
//!            `restore::page_server`, which fetches a missing frame on demand)
//!              └─ meanwhile every other frame, in order; then the entry is
//!                 published like any pull (every file's BLAKE3 against the
//!                 config), once the restore has let go of the cache lock
//! ```
//!
//! The frames themselves (range requests, checks, each fetched once) are
//! [`Frames`], in `fetch.rs`.
//!
//! A frame that cannot be fetched (the registry gone, a wrong hash) is never
//! served: the page server ends the tree first (`restore::page_server`). An
//! image without a frame index, or that cannot restore lazily (sandboxed,
//! with a CRIU that cannot give its user namespace a userfaultfd), is pulled
//! whole as before.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache::{Cache, Entry};
use oci_client::manifest::OciDescriptor;

mod fetch;

pub use self::fetch::Frames;
use self::fetch::{PageFile, PARALLEL_FRAMES};
use super::artifact::{self, Config, Fetched};
use super::first_pages;
use super::frames::Index;
use super::registry::Registry;
use super::RemoteError;

/// The page files the tasks' pagemaps (`pagemap-<pid>.img`) name: the
/// memory a lazy restore may serve on demand. Any other page file is read
/// whole before the tree runs.
fn task_page_files(data: &Path) -> std::collections::BTreeSet<String> {
    use prost::Message as _;
    let mut out = std::collections::BTreeSet::new();
    let Ok(dir) = std::fs::read_dir(data) else {
        return out;
    };
    for d in dir.flatten() {
        let name = d.file_name();
        let task = name
            .to_str()
            .and_then(|n| n.strip_prefix("pagemap-")?.strip_suffix(".img"))
            .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if !task {
            continue;
        }
        let Ok(bytes) = std::fs::read(d.path()) else {
            continue;
        };
        let head = crate::image::criu::frames(&bytes)
            .ok()
            .and_then(|(_, bodies)| bodies.first().copied())
            .and_then(|b| crate::image::criu::proto::PagemapHead::decode(b).ok());
        if let Some(h) = head {
            out.insert(format!("pages-{}.img", h.pages_id));
        }
    }
    out
}

/// An image whose restore may start: its staging entry, and what fills it.
pub struct Streamed {
    /// Stands for the entry-to-be (its key is `<digest>.0`, never a real
    /// generation); its files are in the staging directory.
    pub entry: Entry,
    pub working_set: Option<crate::restore::working_set::WorkingSet>,
    pub frames: Arc<Frames>,
    staged: artifact::Staged,
    config: Config,
    origin: String,
    /// Bytes fetched before the restore, and how long it took.
    pub fetched_bytes: u64,
    pub ms: u64,
    pub frames_first: usize,
}

impl std::fmt::Debug for Streamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamed")
            .field("entry", &self.entry.key)
            .finish_non_exhaustive()
    }
}

/// What [`Registry::pull_or_stream`] got.
pub enum Got {
    Pulled(super::registry::Pulled),
    Streaming(Box<Streamed>),
}

impl Registry {
    /// Like [`Registry::pull`], but an image with a frame index that can
    /// restore lazily (`restore.json`: not sandboxed, or `lazy_in_userns`)
    /// is handed back before its memory is all here (see the module's text).
    #[allow(clippy::too_many_arguments)]
    pub fn pull_or_stream(
        &self,
        cache: &Cache,
        digest: &str,
        limit: Option<Duration>,
        keys: &[super::sign::Verifier],
        check: &dyn Fn(&Config) -> Result<(), RemoteError>,
        lazy_in_userns: bool,
        progress: super::Progress,
    ) -> Result<Got, RemoteError> {
        let t = Instant::now();
        let deadline = limit.map(|l| (t + l, l));
        let head = self.head(digest, deadline, keys, check, progress)?;
        let Some(index_layer) = head
            .manifest
            .layers
            .iter()
            .find(|l| l.media_type == artifact::FRAMES_TYPE)
            .cloned()
        else {
            return self
                .fetch_all(cache, digest, head, t, deadline, progress)
                .map(Got::Pulled);
        };
        let incoming = cache.incoming(digest).map_err(RemoteError::Cache)?;
        let mut fetched =
            self.prefetch_small(&head.reference, &head.manifest.layers, &incoming, deadline)?;
        let (blob, n) =
            self.fetch_layer(&head.reference, &index_layer, &incoming, None, deadline)?;
        fetched += n;
        let Fetched::Blob(blob) = blob else {
            return Err(RemoteError::Damaged(
                "the frame index was not fetched".into(),
            ));
        };
        let index: Index = std::fs::read(&blob)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| RemoteError::Damaged("the frame index is unreadable".into()))?;
        let mut fetch = |layer: &OciDescriptor,
                         target: Option<artifact::Target<'_>>|
         -> Result<Fetched, RemoteError> {
            let framed = layer.media_type == artifact::FILE_ZSTD_TYPE
                && artifact::title(layer)
                    .ok()
                    .and_then(|name| index.files.get(name))
                    .is_some_and(|f| f.digest == layer.digest);
            if framed && target.is_some() {
                return Ok(Fetched::Later);
            }
            let (got, n) = self.fetch_layer(&head.reference, layer, &incoming, target, deadline)?;
            fetched += n;
            Ok(got)
        };
        let staged = artifact::stage(cache, &head.config, &head.manifest, &mut fetch)?;
        let data = staged.staging.data_dir();
        let origin = format!("{}@{}", head.reference.whole(), head.manifest_digest);
        let frames = Frames::new(self, head.reference.clone(), &data, &index, &head.manifest)?;
        let working_set = staged
            .working_set
            .as_deref()
            .and_then(artifact::parse_working_set);
        let lazy_ok = crate::image::read(&data)
            .is_ok_and(|info| info.external_mounts.is_none() || lazy_in_userns);
        if !lazy_ok {
            // Restored eagerly (or its state goes back first): all of it now.
            frames.fill().map_err(RemoteError::Damaged)?;
            let entry = artifact::publish(cache, &head.config, staged, origin)?;
            let _ = cache.drop_incoming(digest);
            return Ok(Got::Pulled(super::registry::Pulled {
                key: entry.key,
                reference: head.reference.whole(),
                manifest_digest: head.manifest_digest,
                fetched_bytes: fetched,
                raw_bytes: entry.meta.bytes,
                ms: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
            }));
        }
        // What the restore reads before the tree runs, first: from the
        // image's first-pages blob where it has one (one request), else (and
        // for what it lacks) the frames holding it; and page files no task's
        // pagemap names (shared memory's): CRIU reads them whole before the
        // tree runs, never lazily.
        let mut have = std::collections::BTreeSet::new();
        if let Some(layer) = head
            .manifest
            .layers
            .iter()
            .find(|l| l.media_type == first_pages::FIRST_PAGES_TYPE)
        {
            let (blob, n) = self.fetch_layer(&head.reference, layer, &incoming, None, deadline)?;
            fetched += n;
            if let Fetched::Blob(blob) = blob {
                have = first_pages::unpack(&blob, &data, &frames.sizes())
                    .map_err(RemoteError::Damaged)?;
            }
        }
        let mut wanted: std::collections::BTreeSet<(&str, usize)> = Default::default();
        for (path, off, len) in
            crate::restore::working_set::file_ranges(&data, working_set.as_ref())
        {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if have.contains(&(name.to_string(), off, len)) {
                continue;
            }
            for (_, i) in frames.covering(name, off, len).unwrap_or_default() {
                if let Some((key, _)) = frames.files.get_key_value(name) {
                    wanted.insert((key.as_str(), i));
                }
            }
        }
        let tasks = task_page_files(&data);
        for (name, file) in &frames.files {
            if !tasks.contains(name) {
                wanted.extend((0..file.frame_count()).map(|i| (name.as_str(), i)));
            }
        }
        let want: Vec<(&PageFile, usize)> = wanted
            .into_iter()
            .map(|(name, i)| (&frames.files[name], i))
            .collect();
        let first = want.len();
        let left = deadline.map(|(at, _)| at.saturating_duration_since(Instant::now()));
        let started = Instant::now();
        frames
            .ensure_all(&want, PARALLEL_FRAMES)
            .map_err(RemoteError::Damaged)?;
        if left.is_some_and(|l| started.elapsed() > l) {
            return Err(RemoteError::Timeout {
                what: "download".into(),
                limit: deadline.map(|(_, l)| l).unwrap_or_default(),
            });
        }
        progress(&format!(
            "restoring before the pull ends: {first} of {} frames here, and {} ranges of first pages",
            frames.frame_count(),
            have.len()
        ));
        frames.begun.store(true, Ordering::Relaxed);
        let meta = head.config.entry.clone();
        let entry = Entry {
            key: format!("{digest}.0"),
            dir: staged.staging.dir().to_path_buf(),
            meta,
            stale: None,
        };
        Ok(Got::Streaming(Box::new(Streamed {
            entry,
            working_set,
            frames: Arc::new(frames),
            staged,
            config: head.config,
            origin,
            fetched_bytes: fetched,
            ms: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
            frames_first: first,
        })))
    }
}

impl Streamed {
    /// Fetches every frame still missing, then (holding the service's cache
    /// lock, so after the restore that uses the staging entry has let it go)
    /// publishes the entry. On a thread of its own; a failure is logged and
    /// the staging entry dropped (the next start pulls again).
    pub fn complete_in_background(
        self,
        cache: Cache,
        service: String,
        digest: String,
    ) -> Option<std::thread::JoinHandle<()>> {
        let spawned = std::thread::Builder::new()
            .name("stream-fill".into())
            .spawn(move || {
                let t = Instant::now();
                if let Err(why) = self.frames.fill() {
                    tracing::warn!(
                        phase = "pull",
                        "the image could not be completed ({why}); the next start fetches it again"
                    );
                    return;
                }
                let lock = match cache.lock_service(&service, true) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!("cannot lock the cache to keep the pulled image: {e}");
                        return;
                    }
                };
                match artifact::publish(&cache, &self.config, self.staged, self.origin) {
                    Ok(entry) => {
                        let _ = cache.drop_incoming(&digest);
                        tracing::info!(
                            phase = "pull",
                            "the rest of image {} arrived in {} ms after the restore began; kept as {}",
                            crate::digest::short(&digest),
                            t.elapsed().as_millis(),
                            entry.key
                        );
                    }
                    Err(e) => tracing::warn!(
                        phase = "pull",
                        "the pulled image is not kept: {}",
                        crate::errors::chain(&e)
                    ),
                }
                drop(lock);
            });
        spawned
            .map_err(|e| tracing::warn!("cannot complete the pulled image: {e}"))
            .ok()
    }

    /// Where its files are.
    pub fn data_dir(&self) -> PathBuf {
        self.entry.data_dir()
    }
}
