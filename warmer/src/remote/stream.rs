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
//! A frame that cannot be fetched (the registry gone, a wrong hash) is never
//! served: the page server ends the tree first (`restore::page_server`). An
//! image without a frame index, or that cannot restore lazily (sandboxed),
//! is pulled whole as before.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cache::{Cache, Entry};
use futures_util::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};

use super::artifact::{self, Config, Fetched};
use super::frames::Index;
use super::registry::Registry;
use super::RemoteError;

/// Frames fetched at once before the restore.
const PARALLEL_FRAMES: usize = 8;
/// Frames fetched at once after it, beside the service's own requests.
const FILL_THREADS: usize = 2;
/// Neighbouring frames asked for in one range request, at most.
const RUN_FRAMES: usize = 16;
/// The largest frame an index may declare (each is decompressed whole in
/// memory; warmer writes 1 MiB).
const MAX_FRAME_BYTES: u64 = 16 << 20;

/// One frame of a page file.
#[derive(Debug, Clone)]
struct Frame {
    at: u64,
    len: u64,
    raw_at: u64,
    raw_len: u64,
    sha256: String,
}

const MISSING: u8 = 0;
const FETCHING: u8 = 1;
const PRESENT: u8 = 2;

/// A page file being filled.
struct PageFile {
    layer: OciDescriptor,
    frames: Vec<Frame>,
    out: File,
    state: Mutex<Vec<u8>>,
    changed: Condvar,
}

/// The page files of a staged image and where their frames come from.
pub struct Frames {
    rt: std::sync::Arc<tokio::runtime::Runtime>,
    client: Client,
    reference: Reference,
    files: BTreeMap<String, PageFile>,
    failed: Mutex<Option<String>>,
    /// The restore may have begun: the frames fetched from now on are
    /// fetched while the service may need them.
    begun: std::sync::atomic::AtomicBool,
}

impl Frames {
    fn new(
        registry: &Registry,
        reference: Reference,
        data: &Path,
        index: &Index,
        manifest: &oci_client::manifest::OciImageManifest,
    ) -> Result<Self, RemoteError> {
        if !(1..=MAX_FRAME_BYTES).contains(&index.frame_bytes) {
            return Err(RemoteError::Damaged(format!(
                "the frame index has frames of {} bytes (at most {MAX_FRAME_BYTES})",
                index.frame_bytes
            )));
        }
        let mut files = BTreeMap::new();
        for layer in &manifest.layers {
            if layer.media_type != artifact::FILE_ZSTD_TYPE {
                continue;
            }
            let name = artifact::title(layer)?;
            let Some(framed) = index.files.get(name).filter(|f| f.digest == layer.digest) else {
                continue;
            };
            let mut frames = Vec::with_capacity(framed.frames.len());
            let (mut at, mut raw_at) = (0u64, 0u64);
            let path = data.join(name);
            let size = std::fs::metadata(&path)
                .map_err(super::registry::io_err(&path))?
                .len();
            for (len, sha256) in &framed.frames {
                // zstd never needs much more than the raw size.
                if *len > index.frame_bytes + (1 << 20) {
                    return Err(RemoteError::Damaged(format!(
                        "the frame index of {name} has a frame of {len} bytes"
                    )));
                }
                let raw_len = index.frame_bytes.min(size.saturating_sub(raw_at));
                frames.push(Frame {
                    at,
                    len: *len,
                    raw_at,
                    raw_len,
                    sha256: sha256.clone(),
                });
                at += len;
                raw_at += raw_len;
            }
            if raw_at != size || Some(at) != u64::try_from(layer.size).ok() {
                return Err(RemoteError::Damaged(format!(
                    "the frame index of {name} does not add up to its layer"
                )));
            }
            let out = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(super::registry::io_err(&path))?;
            let n = frames.len();
            files.insert(
                name.to_string(),
                PageFile {
                    layer: layer.clone(),
                    frames,
                    out,
                    state: Mutex::new(vec![MISSING; n]),
                    changed: Condvar::new(),
                },
            );
        }
        // The pull's own runtime and client (its connections live on that
        // runtime), kept for as long as frames are fetched.
        let (rt, client) = (registry.rt.clone(), registry.client.clone());
        Ok(Frames {
            rt,
            client,
            reference,
            files,
            failed: Mutex::new(None),
            begun: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Fetches frames `run` of `file` with one range request, checks each
    /// against its sha256 before it is decompressed, writes it in place.
    fn fetch(&self, file: &PageFile, run: std::ops::Range<usize>) -> Result<(), String> {
        let name = artifact::title(&file.layer).unwrap_or("?");
        let (first, last) = (&file.frames[run.start], &file.frames[run.end - 1]);
        let (at, len) = (first.at, last.at + last.len - first.at);
        let what = format!("{name}: frames {}..{}", run.start, run.end);
        let bytes = self.rt.block_on(async {
            let resp = self
                .client
                .pull_blob_stream_partial(&self.reference, &file.layer, at, Some(len))
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            let BlobResponse::Partial(mut stream) = resp else {
                return Err(format!("{name}: the registry does not serve byte ranges"));
            };
            let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| format!("{what}: {e}"))?;
                    if bytes.len() as u64 + chunk.len() as u64 > len {
                        return Err(format!("{what}: more bytes than asked for"));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(())
            })
            .await;
            match read {
                Ok(Ok(())) if bytes.len() as u64 == len => Ok(bytes),
                Ok(Ok(())) => Err(format!("{what}: {} bytes of {len}", bytes.len())),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("{what}: no data for 10 s")),
            }
        })?;
        for i in run {
            let f = &file.frames[i];
            let from = usize::try_from(f.at - at).unwrap_or(usize::MAX);
            let z = &bytes[from..from + usize::try_from(f.len).unwrap_or(0)];
            if hex::encode(Sha256::digest(z)) != f.sha256 {
                return Err(format!(
                    "{name}: frame {i} does not match its signed sha256 (tampered or corrupted)"
                ));
            }
            let raw = zstd::bulk::decompress(z, usize::try_from(f.raw_len).unwrap_or(0))
                .map_err(|e| format!("{name}: frame {i}: {e}"))?;
            if raw.len() as u64 != f.raw_len {
                return Err(format!(
                    "{name}: frame {i} holds {} bytes, not {}",
                    raw.len(),
                    f.raw_len
                ));
            }
            file.out
                .write_all_at(&raw, f.raw_at)
                .map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    }

    /// Frames `run` of `file` are on disk and checked: those nobody fetches
    /// yet are fetched now, together; those another thread fetches are
    /// waited for.
    fn ensure(&self, file: &PageFile, run: std::ops::Range<usize>) -> Result<(), String> {
        let mut next = run.start;
        while next < run.end {
            if let Some(why) = self
                .failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return Err(why);
            }
            let mut st = file.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut end = next;
            while end < run.end && st[end] == MISSING {
                st[end] = FETCHING;
                end += 1;
            }
            if end == next {
                // Here already, or on its way.
                if st[next] == PRESENT {
                    next += 1;
                } else {
                    let _ = file
                        .changed
                        .wait_timeout(st, Duration::from_millis(100))
                        .unwrap_or_else(|p| p.into_inner());
                }
                continue;
            }
            drop(st);
            let late = self.begun.load(Ordering::Relaxed);
            let got = (if late {
                // Tests: the registry gone once the restore began.
                crate::failpoint_result("stream-frame-after-restore")
            } else {
                Ok(())
            })
            .and_then(|()| self.fetch(file, next..end));
            let mut st = file.state.lock().unwrap_or_else(|p| p.into_inner());
            for s in &mut st[next..end] {
                *s = if got.is_ok() { PRESENT } else { MISSING };
            }
            file.changed.notify_all();
            drop(st);
            if let Err(why) = got {
                *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                return Err(why);
            }
            next = end;
        }
        Ok(())
    }

    /// Fetches `want` (file, frame) with `threads` threads, neighbours
    /// together (up to [`RUN_FRAMES`] a request); the first failure ends it.
    fn ensure_all(&self, want: &[(&PageFile, usize)], threads: usize) -> Result<(), String> {
        let mut runs: Vec<(&PageFile, std::ops::Range<usize>)> = Vec::new();
        for &(f, i) in want {
            match runs.last_mut() {
                Some((g, r)) if std::ptr::eq(*g, f) && r.end == i && r.len() < RUN_FRAMES => {
                    r.end += 1;
                }
                _ => runs.push((f, i..i + 1)),
            }
        }
        let next = AtomicUsize::new(0);
        let first: Mutex<Option<String>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.clamp(1, runs.len().max(1)) {
                s.spawn(|| {
                    while let Some((f, r)) = runs.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if let Err(e) = self.ensure(f, r.clone()) {
                            first
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            break;
                        }
                    }
                });
            }
        });
        match first.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The frames holding bytes `off..off + len` of `name`.
    fn covering(&self, name: &str, off: u64, len: u64) -> Option<Vec<(&PageFile, usize)>> {
        let file = self.files.get(name)?;
        let first = file.frames.partition_point(|f| f.raw_at + f.raw_len <= off);
        let end = off + len;
        Some(
            (first..file.frames.len())
                .take_while(|&i| file.frames[i].raw_at < end)
                .map(|i| (file, i))
                .collect(),
        )
    }

    /// Every frame not yet fetched, in order.
    fn fill(&self) -> Result<(), String> {
        let want: Vec<(&PageFile, usize)> = self
            .files
            .values()
            .flat_map(|f| (0..f.frames.len()).map(move |i| (f, i)))
            .collect();
        self.ensure_all(&want, FILL_THREADS)
    }

    /// Why a frame could not be had, if one could not.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn frame_count(&self) -> usize {
        self.files.values().map(|f| f.frames.len()).sum()
    }
}

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

impl crate::restore::page_server::Pages for Frames {
    fn ready(&self, name: &str, off: u64, len: u64) -> Result<(), String> {
        // A page file without frames was fetched whole, and checked, with
        // the image's small files.
        let Some(want) = self.covering(name, off, len) else {
            return Ok(());
        };
        match (want.first(), want.last()) {
            (Some(&(f, a)), Some(&(_, b))) => self.ensure(f, a..b + 1),
            _ => Ok(()),
        }
    }
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
    /// restore lazily (`restore.json`: not sandboxed) is handed
    /// back before its memory is all here (see the module's text).
    #[allow(clippy::too_many_arguments)]
    pub fn pull_or_stream(
        &self,
        cache: &Cache,
        digest: &str,
        limit: Option<Duration>,
        keys: &[super::sign::Verifier],
        check: &dyn Fn(&Config) -> Result<(), RemoteError>,
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
        let lazy_ok = crate::image::read(&data).is_ok_and(|info| info.external_mounts.is_none());
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
        // What the restore reads before the tree runs, first; and page files
        // no task's pagemap names (shared memory's): CRIU reads them whole
        // before the tree runs, never lazily.
        let mut wanted: std::collections::BTreeSet<(&str, usize)> = Default::default();
        for (path, off, len) in
            crate::restore::working_set::file_ranges(&data, working_set.as_ref())
        {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            for (_, i) in frames.covering(name, off, len).unwrap_or_default() {
                if let Some((key, _)) = frames.files.get_key_value(name) {
                    wanted.insert((key.as_str(), i));
                }
            }
        }
        let tasks = task_page_files(&data);
        for (name, file) in &frames.files {
            if !tasks.contains(name) {
                wanted.extend((0..file.frames.len()).map(|i| (name.as_str(), i)));
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
            "restoring before the pull ends: {first} of {} frames here",
            frames.frame_count()
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
