//! The page files of an image being pulled, fetched by range: frames
//! checked one by one against the signed frame index, written in place,
//! each fetched once however many ask for it (the pre-restore fetch, the
//! page server's faults, the background fill).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};

use super::super::artifact;
use super::super::frames::Index;
use super::super::registry::Registry;
use super::super::RemoteError;

/// Frames fetched at once before the restore.
pub(super) const PARALLEL_FRAMES: usize = 8;
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
pub(super) struct PageFile {
    layer: OciDescriptor,
    frames: Vec<Frame>,
    out: File,
    state: Mutex<Vec<u8>>,
    changed: Condvar,
}

impl PageFile {
    /// How many frames it has.
    pub(super) fn frame_count(&self) -> usize {
        self.frames.len()
    }
}

/// The page files of a staged image and where their frames come from.
pub struct Frames {
    rt: std::sync::Arc<tokio::runtime::Runtime>,
    client: Client,
    reference: Reference,
    pub(super) files: BTreeMap<String, PageFile>,
    failed: Mutex<Option<String>>,
    /// The restore may have begun: the frames fetched from now on are
    /// fetched while the service may need them.
    pub(super) begun: std::sync::atomic::AtomicBool,
}

impl Frames {
    pub(super) fn new(
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
                .map_err(super::super::registry::io_err(&path))?
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
                .map_err(super::super::registry::io_err(&path))?;
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
    pub(super) fn ensure_all(
        &self,
        want: &[(&PageFile, usize)],
        threads: usize,
    ) -> Result<(), String> {
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
    pub(super) fn covering(
        &self,
        name: &str,
        off: u64,
        len: u64,
    ) -> Option<Vec<(&PageFile, usize)>> {
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
    pub(super) fn fill(&self) -> Result<(), String> {
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

    /// Each page file's size.
    pub(super) fn sizes(&self) -> BTreeMap<String, u64> {
        self.files
            .iter()
            .map(|(name, f)| (name.clone(), f.frames.iter().map(|fr| fr.raw_len).sum()))
            .collect()
    }

    pub(super) fn frame_count(&self) -> usize {
        self.files.values().map(|f| f.frames.len()).sum()
    }
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
