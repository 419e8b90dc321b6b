//! A payload file as zstd in independent frames of [`FRAME`] bytes each.
//!
//! One zstd stream of a 200 MB page file decompresses on one core (300 ms
//! on this class of machine: most of a fresh node's pull). Cut into frames
//! that each start afresh and record their size, the same bytes are still
//! one valid zstd stream (anything that reads zstd reads it, older warmers
//! included), but a puller finds every frame's place from the headers and
//! decompresses them on every core, each straight to its offset.
//!
//! Frames cost a little ratio (the window restarts every MiB: CRIU's pages
//! rarely repeat further apart) and are deterministic: the same file makes
//! the same blob on every node, so registries still store it once.
//!
//! Reading trusts nothing more than before: the blob's sha256 was checked
//! before [`unpack`] sees it; every frame must declare its size and
//! decompress to exactly that, and the whole must fit the size the config
//! records. A blob that is not frames this way (an older warmer's single
//! frame) is decompressed as one stream, as before.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use zstd::zstd_safe;

/// Raw bytes per frame.
pub const FRAME: usize = 1 << 20;

/// Threads that decompress one file's frames: the machine's cores, at most
/// this many (each holds a frame and a few queued: memory stays small).
pub const MAX_THREADS: usize = 8;

/// How many threads to decompress with on this machine.
pub fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_THREADS)
}

/// The largest frame a framed blob may declare (ours are [`FRAME`]); a
/// bigger one is decompressed as a stream instead.
const MAX_FRAME: u64 = 8 << 20;

/// Compresses `input` (read to its end) into `out` as frames of [`FRAME`]
/// bytes; returns the raw bytes read. `raw` sees every raw chunk (for the
/// file's own hash).
pub fn compress(
    input: &mut dyn Read,
    out: &mut dyn Write,
    level: i32,
    raw: &mut dyn FnMut(&[u8]),
    frame: &mut dyn FnMut(&[u8]),
) -> io::Result<u64> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    // Each frame checks its own bytes as it decompresses (4 bytes a frame).
    compressor.include_checksum(true)?;
    let mut buf = vec![0u8; FRAME];
    let mut packed = Vec::with_capacity(zstd_safe::compress_bound(FRAME));
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < FRAME {
            match input.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            break;
        }
        raw(&buf[..filled]);
        packed.clear();
        compressor.compress_to_buffer(&buf[..filled], &mut packed)?;
        frame(&packed);
        out.write_all(&packed)?;
        total += filled as u64;
        if filled < FRAME {
            break;
        }
    }
    if total == 0 {
        // An empty file is one empty frame (a valid zstd stream).
        packed.clear();
        compressor.compress_to_buffer(&[], &mut packed)?;
        frame(&packed);
        out.write_all(&packed)?;
    }
    Ok(total)
}

/// The frames of the compressed page files of an image, signed with it
/// (a layer of its own, [`super::artifact::FRAMES_TYPE`]): enough to fetch
/// any part of a page file by range and check it before it is used.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    /// Raw bytes per frame (the last may be shorter).
    pub frame_bytes: u64,
    /// By file (a page file's path in the image).
    pub files: std::collections::BTreeMap<String, FramedFile>,
}

/// One file's frames.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FramedFile {
    /// The layer's blob digest.
    pub digest: String,
    /// Each frame's compressed length and sha256 (hex), in order.
    pub frames: Vec<(u64, String)>,
}

/// One frame of a blob: where it is, and where its bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    at: usize,
    len: usize,
    raw_at: u64,
    raw_len: usize,
}

/// The frames of `blob`, if it is frames of declared sizes no bigger than
/// [`MAX_FRAME`] that add up to at most `limit`; `None` otherwise (decode
/// it as a stream).
fn index(blob: &[u8], limit: u64) -> Option<Vec<Frame>> {
    let mut frames = Vec::new();
    let (mut at, mut raw_at) = (0usize, 0u64);
    while at < blob.len() {
        let rest = &blob[at..];
        let len = zstd_safe::find_frame_compressed_size(rest).ok()?;
        let raw_len = zstd_safe::get_frame_content_size(&rest[..len])
            .ok()
            .flatten()
            .filter(|&n| n <= MAX_FRAME)?;
        if len == 0 || raw_at + raw_len > limit {
            return None;
        }
        frames.push(Frame {
            at,
            len,
            raw_at,
            raw_len: usize::try_from(raw_len).ok()?,
        });
        at += len;
        raw_at += raw_len;
    }
    Some(frames)
}

/// Decompresses the verified blob `blob` into `out` (new, empty), never
/// past `limit` bytes; returns the bytes written. Frames are decompressed
/// by up to `threads` threads at once.
pub fn unpack(blob: &Path, out: &File, limit: u64, threads: usize) -> io::Result<u64> {
    let input = File::open(blob)?;
    let len = input.metadata()?.len();
    // A blob of frames is mapped whole; a very large one of a single
    // stream would not be, so only those small enough to scan are.
    let frames = if len > 0 {
        // SAFETY: the blob is a private file warmer wrote and verified, in
        // a private directory; nothing else writes it while it is mapped.
        let map = unsafe { memmap2::Mmap::map(&input)? };
        match index(&map, limit) {
            Some(frames) if frames.len() > 1 => Some((map, frames)),
            _ => None,
        }
    } else {
        None
    };
    let Some((map, frames)) = frames else {
        return unpack_stream(input, out, limit);
    };
    let total: u64 = frames.iter().map(|f| f.raw_len as u64).sum();
    out.set_len(total)?;
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<io::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, frames.len()) {
            s.spawn(|| {
                let mut d = match zstd::bulk::Decompressor::new() {
                    Ok(d) => d,
                    Err(e) => {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        return;
                    }
                };
                let mut buf = Vec::with_capacity(FRAME);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(f) = frames.get(i) else { break };
                    if failed.lock().map(|g| g.is_some()).unwrap_or(true) {
                        break;
                    }
                    buf.clear();
                    buf.reserve(f.raw_len);
                    let r = d
                        .decompress_to_buffer(&map[f.at..f.at + f.len], &mut buf)
                        .and_then(|n| {
                            if n == f.raw_len {
                                Ok(())
                            } else {
                                Err(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    format!("a frame declared {} bytes and holds {n}", f.raw_len),
                                ))
                            }
                        })
                        .and_then(|()| out.write_all_at(&buf, f.raw_at));
                    if let Err(e) = r {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        break;
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// A blob that is not frames: one stream, one core, never past `limit`
/// (+1 byte, so the caller sees it went past).
fn unpack_stream(input: File, mut out: &File, limit: u64) -> io::Result<u64> {
    let mut dec = zstd::stream::read::Decoder::new(input)?.take(limit + 1);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match dec.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
        total += n as u64;
    }
    Ok(total)
}

/// Decompresses a blob's frames while the blob is still arriving: each
/// complete frame goes to a pool of threads that write it at its offset.
/// The bytes are not trusted yet (the blob's digest is checked when it has
/// all arrived; until then what is written is in a private staging
/// directory nothing reads). A blob that turns out not to be frames of
/// declared sizes stops being split; [`Sink::finish`] then says so and the
/// caller unpacks the whole blob as a stream.
pub struct Sink {
    pending: Vec<u8>,
    raw_at: u64,
    limit: u64,
    /// Not frames (or past `limit`): nothing more is split.
    gave_up: bool,
    tx: Option<std::sync::mpsc::SyncSender<Job>>,
    workers: Vec<std::thread::JoinHandle<io::Result<()>>>,
}

struct Job {
    frame: Vec<u8>,
    raw_at: u64,
    raw_len: usize,
}

impl Sink {
    /// Frames are written into `out` (new, empty), never past `limit`
    /// bytes, by `threads` threads.
    pub fn new(out: File, limit: u64, threads: usize) -> io::Result<Self> {
        let out = std::sync::Arc::new(out);
        // A few frames in flight per thread: the download never waits on a
        // decoder for long, and memory stays a few MiB.
        let threads = threads.max(1);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(threads * 4);
        let rx = std::sync::Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for _ in 0..threads {
            let (rx, out) = (rx.clone(), out.clone());
            workers.push(std::thread::Builder::new().name("unpack".into()).spawn(
                move || -> io::Result<()> {
                    let mut d = zstd::bulk::Decompressor::new()?;
                    let mut buf = Vec::with_capacity(FRAME);
                    loop {
                        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(j) => j,
                            Err(_) => return Ok(()),
                        };
                        buf.clear();
                        buf.reserve(job.raw_len);
                        let n = d.decompress_to_buffer(&job.frame, &mut buf)?;
                        if n != job.raw_len {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("a frame declared {} bytes and holds {n}", job.raw_len),
                            ));
                        }
                        out.write_all_at(&buf, job.raw_at)?;
                    }
                },
            )?);
        }
        Ok(Sink {
            pending: Vec::new(),
            raw_at: 0,
            limit,
            gave_up: false,
            tx: Some(tx),
            workers,
        })
    }

    /// The next bytes of the blob.
    pub fn push(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.gave_up {
            return Ok(());
        }
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        while at < self.pending.len() {
            let rest = &self.pending[at..];
            // An incomplete frame reports an error: wait for more bytes,
            // unless the frame's header already says it is not ours.
            let Ok(len) = zstd_safe::find_frame_compressed_size(rest) else {
                if rest.len() > 2 * FRAME + (64 << 10) {
                    self.gave_up = true;
                }
                break;
            };
            let size = zstd_safe::get_frame_content_size(&rest[..len])
                .ok()
                .flatten()
                .filter(|&n| n <= MAX_FRAME && self.raw_at + n <= self.limit);
            let (Some(raw_len), true) = (size, len > 0) else {
                self.gave_up = true;
                break;
            };
            let job = Job {
                frame: rest[..len].to_vec(),
                raw_at: self.raw_at,
                raw_len: usize::try_from(raw_len).unwrap_or(usize::MAX),
            };
            let sent = self.tx.as_ref().map(|tx| tx.send(job).is_ok());
            if sent != Some(true) {
                // A worker failed: `finish` reports it.
                self.gave_up = true;
                break;
            }
            self.raw_at += raw_len;
            at += len;
        }
        if self.gave_up {
            self.pending = Vec::new();
        } else {
            self.pending.drain(..at);
        }
        Ok(())
    }

    /// Waits for every frame to be written. `Ok(Some(bytes))`: the blob
    /// was frames, all written; `Ok(None)`: it was not (unpack it as a
    /// stream); `Err`: a frame did not decompress to what it declared.
    pub fn finish(mut self) -> io::Result<Option<u64>> {
        drop(self.tx.take());
        let mut failed = None;
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some(io::Error::other("an unpack thread panicked")),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if self.gave_up || !self.pending.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.raw_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        // Compressible but not trivially: a page-like pattern with noise.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 4096 < 2048 {
                    0
                } else {
                    (x & 0x0f) as u8
                }
            })
            .collect()
    }

    fn framed(raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut seen = Vec::new();
        let mut sizes = Vec::new();
        let n = compress(
            &mut &raw[..],
            &mut out,
            3,
            &mut |c| seen.extend_from_slice(c),
            &mut |f| sizes.push(f.len()),
        )
        .unwrap();
        assert_eq!(n, raw.len() as u64);
        assert_eq!(sizes.iter().sum::<usize>(), out.len(), "every frame seen");
        assert_eq!(seen, raw, "the raw callback sees every byte once, in order");
        out
    }

    fn unpack_bytes(blob: &[u8], limit: u64) -> io::Result<Vec<u8>> {
        let dir = tempfile::tempdir().unwrap();
        let (b, o) = (dir.path().join("blob"), dir.path().join("out"));
        std::fs::write(&b, blob).unwrap();
        let out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&o)
            .unwrap();
        let n = unpack(&b, &out, limit, 3)?;
        let got = std::fs::read(&o).unwrap();
        assert_eq!(n, got.len() as u64);
        Ok(got)
    }

    #[test]
    fn frames_are_one_zstd_stream_and_unpack_in_parallel_to_the_same_bytes() {
        for len in [0, 1, FRAME - 1, FRAME, FRAME + 1, 5 * FRAME + 12345] {
            let raw = data(len);
            let blob = framed(&raw);
            // Any zstd reader reads it whole (older warmers did).
            assert_eq!(
                zstd::stream::decode_all(&blob[..]).unwrap(),
                raw,
                "len {len}"
            );
            let frames = index(&blob, len as u64).unwrap();
            assert_eq!(frames.len(), len.div_ceil(FRAME).max(1), "len {len}");
            assert_eq!(unpack_bytes(&blob, len as u64).unwrap(), raw, "len {len}");
        }
    }

    #[test]
    fn a_single_stream_unpacks_as_before() {
        let raw = data(3 * FRAME + 7);
        let blob = zstd::stream::encode_all(&raw[..], 3).unwrap();
        assert_eq!(unpack_bytes(&blob, raw.len() as u64).unwrap(), raw);
    }

    #[test]
    fn frames_past_the_recorded_size_are_not_written_beyond_it() {
        let raw = data(4 * FRAME);
        let blob = framed(&raw);
        // The index refuses; the stream stops one byte past the limit, which
        // the caller reports as damage.
        assert!(index(&blob, 2 * FRAME as u64).is_none());
        let got = unpack_bytes(&blob, 2 * FRAME as u64).unwrap();
        assert_eq!(got.len(), 2 * FRAME + 1);
    }

    #[test]
    fn a_frame_that_lies_about_its_size_fails() {
        let raw = data(3 * FRAME);
        let mut blob = framed(&raw);
        // Corrupt the second frame's body (after its header): it no longer
        // decompresses to what it declares.
        let second = index(&blob, raw.len() as u64).unwrap()[1];
        for b in &mut blob[second.at + 20..second.at + 60] {
            *b ^= 0x5a;
        }
        assert!(unpack_bytes(&blob, raw.len() as u64).is_err());
    }

    #[test]
    fn a_blob_unpacks_as_it_arrives_in_any_pieces() {
        let raw = data(5 * FRAME + 999);
        let blob = framed(&raw);
        for piece in [1usize, 4096, 333_333, blob.len()] {
            let dir = tempfile::tempdir().unwrap();
            let o = dir.path().join("out");
            let out = std::fs::File::create(&o).unwrap();
            let mut sink = Sink::new(out, raw.len() as u64, 2).unwrap();
            for chunk in blob.chunks(piece) {
                sink.push(chunk).unwrap();
            }
            assert_eq!(
                sink.finish().unwrap(),
                Some(raw.len() as u64),
                "pieces of {piece}"
            );
            assert_eq!(std::fs::read(&o).unwrap(), raw, "pieces of {piece}");
        }
        // Not frames (one stream with no sizes per MiB), or past the limit:
        // the sink says so and the caller unpacks the blob instead.
        let stream = zstd::stream::encode_all(&raw[..], 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (bytes, limit) in [(&stream, raw.len() as u64), (&blob, 2 * FRAME as u64)] {
            let out = std::fs::File::create(dir.path().join("x")).unwrap();
            let mut sink = Sink::new(out, limit, 2).unwrap();
            for chunk in bytes.chunks(65536) {
                sink.push(chunk).unwrap();
            }
            assert_eq!(sink.finish().unwrap(), None);
        }
    }
}
