//! After a boot (the page cache empty), asking the disk for everything a
//! restore will read at once, instead of as CRIU and the service come to it.
//!
//! CRIU opens every file the image's processes map or hold open (a Python
//! with scipy: 230 shared objects), checks each one's ELF build-id, and the
//! restored service then faults in the pages of them it runs; one after
//! another, each is a wait on the disk. [`start`] hands all of it to the disk
//! together, from threads of its own, the moment the restore is planned:
//! every such file's first [`HEAD`] bytes (its headers, its first text
//! pages), the pages the service touched of them after earlier restores,
//! and the working set's pages in `pages-*.img`. Nothing read is looked at
//! (`readahead(2)` fills the page cache, no more), files are opened
//! non-blocking, never through a final symlink, and only regular ones are
//! read, so a path in an image can make root read nothing but a regular
//! file's pages into the cache.
//! Skipped when most of the image is in the page cache already (the common
//! case: then it would only cost CPU the restore needs).
//!
//! First of all, and read through before anything else is asked for: CRIU
//! itself (its binary, loader and libraries, ~12 MB in 24 files, as an
//! earlier restore of the image saw `criu restore` map them:
//! [`CRIU_FILES_NOTE`]) and the image's own small files (tree, cores, maps).
//! Asked for together with the rest, they queued behind it and the
//! lazy-pages daemon's start waited: jetty9 as its unit runs it, page cache
//! dropped, 5 rounds each, daemon start 86.8 -> 41.5 ms, restore 227 -> 194
//! ms (medians).

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::restore::working_set::{self, WorkingSet};

/// The entry's note naming the files `criu restore` maps.
pub const CRIU_FILES_NOTE: &str = "criu-files";
/// CRIU's files asked for at most, and the most of each.
const CRIU_FILES_MAX: usize = 64;
const CRIU_FILE_MAX: u64 = 8 << 20;

/// The files `criu restore` mapped in an earlier restore of entry `key`.
pub fn criu_files(cache: &cache::Cache, key: &str) -> Vec<String> {
    cache
        .note(key, CRIU_FILES_NOTE)
        .and_then(|b| serde_json::from_slice::<Vec<String>>(&b).ok())
        .unwrap_or_default()
}

/// Adds what `criu restore` mapped this time (`files`) to entry `key`'s
/// note (`known`), where it found more, from a thread of its own: the note
/// is written durably, and a restore after a boot does not wait on the disk
/// for it. A union, never a replacement: after a boot the two reads of
/// CRIU's maps that agreed may both have fallen while its loader waited on
/// the disk, halfway through its libraries.
pub fn remember_criu_files(cache: &cache::Cache, key: &str, known: &[String], files: &[String]) {
    let all = union(known, files);
    if all.len() == known.len() {
        return;
    }
    let (cache, key) = (cache.clone(), key.to_string());
    std::thread::spawn(move || {
        let bytes = serde_json::to_vec(&all).expect("strings serialize");
        if let Err(e) = cache.set_note(&key, CRIU_FILES_NOTE, &bytes) {
            tracing::debug!("CRIU's files not noted: {}", crate::errors::chain(&e));
        }
    });
}

/// `known`, then what `files` adds, [`CRIU_FILES_MAX`] at most.
fn union(known: &[String], files: &[String]) -> Vec<String> {
    let mut all = known.to_vec();
    for f in files {
        if all.len() >= CRIU_FILES_MAX {
            break;
        }
        if !all.contains(f) {
            all.push(f.clone());
        }
    }
    all
}

/// How much of each file the image refers to is asked for.
pub const HEAD: u64 = 64 << 10;
/// Files asked for at most (an image with more is not a service).
const MAX_FILES: usize = 4096;
/// The longest range one thread takes at a time.
const CHUNK: u64 = 4 << 20;
/// The longest single `readahead(2)`: the kernel reads at most the larger of
/// the device's read-ahead window and its largest I/O of one call
/// (`force_page_cache_ra`), and drops the rest silently. Both are 128 KiB
/// by default on many disks: a 4 MiB call read 6% of a 229 MB page file
/// there (`read_ahead_kb=128`, `max_sectors_kb=128`), 63% with
/// `max_sectors_kb=1280`; in calls of 128 KiB, all of it, at the same speed
/// where the device takes 4 MiB at once (this VM: `read_ahead_kb=8192`).
const STEP: u64 = 128 << 10;
/// Threads asking at once (the disk takes requests in parallel).
const THREADS: usize = 8;

/// After a boot (less than half of the image in the page cache, sampled):
/// asks the disk for everything a restore of `entry` will read. `lazy`: the
/// restore reads only the pages never restored lazily and those of `first`
/// (the working set it restores first), else every page; and the file
/// pages `known` (the working set learned) says the service touches.
/// Before all of it, `criu` (the files CRIU maps: [`criu_files`]).
pub fn before_restore(
    entry: &cache::Entry,
    lazy: bool,
    first: Option<&WorkingSet>,
    known: Option<&WorkingSet>,
    criu: &[String],
) {
    let data = entry.data_dir();
    let (_, pages) = crate::restore::choose::memory_files(entry);
    let Some(r) = crate::restore::choose::resident_sample(&pages).filter(|r| *r < 0.5) else {
        return;
    };
    let mut pages: Vec<Range> = if lazy {
        working_set::file_ranges(&data, first)
    } else {
        pages
            .iter()
            .filter_map(|p| Some((p.clone(), 0, std::fs::metadata(p).ok()?.len())))
            .collect()
    };
    pages.extend(known.iter().flat_map(|w| w.file_ranges_touched()));
    // CRIU's files and the image's own (tree, cores, maps) are what the
    // lazy daemon and CRIU read before anything else: read them through
    // before the rest is asked for, or they queue behind it.
    let first: Vec<Range> = criu
        .iter()
        .take(CRIU_FILES_MAX)
        .filter(|f| f.starts_with('/'))
        .map(|f| (PathBuf::from(f), 0, CRIU_FILE_MAX))
        .chain(image_files(&data))
        .collect();
    let ranges = ranges(&data, pages);
    tracing::debug!(
        "{:.0}% of the image in the page cache: reading {} files first, then asking the disk for {} ranges at once",
        r * 100.0,
        first.len(),
        ranges.len()
    );
    start_after(first, ranges);
}

/// The image's own files but its pages (the process tree, cores, memory
/// maps, pagemaps, files: what CRIU and its lazy-pages daemon read before
/// anything else, a few hundred KB), whole.
fn image_files(data: &Path) -> Vec<Range> {
    let Ok(dir) = std::fs::read_dir(data) else {
        return Vec::new();
    };
    dir.filter_map(|d| d.ok())
        .filter(|d| !d.file_name().to_string_lossy().starts_with("pages-"))
        .filter_map(|d| Some((d.path(), 0, d.metadata().ok()?.len())))
        .collect()
}

/// One read to ask for: (file, offset, length).
pub type Range = (PathBuf, u64, u64);

/// What a restore of the image in `data` reads from the disk: `pages` (the
/// image's pages it reads before the tree runs: CRIU reads them first), the
/// file pages under those of them that land in a private file mapping (a
/// library's relocated data: CRIU's write into the mapping copies the page
/// on write, which first reads it from the file), then the head of every
/// regular file the image refers to.
pub fn ranges(data: &Path, pages: Vec<Range>) -> Vec<Range> {
    let mut out = pages;
    out.extend(copied_on_write(data));
    out.extend(
        crate::image::criu::files(data)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| f.reg)
            .map(|r| r.name)
            .filter(|n| n.starts_with('/'))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .take(MAX_FILES)
            .map(|n| (PathBuf::from(n), 0, HEAD)),
    );
    out
}

/// CRIU's `VMA_FILE_PRIVATE` (criu/include/image.h).
const VMA_FILE_PRIVATE: u32 = 1 << 6;
/// CRIU's pagemap flags.
const PE_LAZY: u32 = 1 << 1;
const PE_PRESENT: u32 = 1 << 2;

/// The file pages under the image's pages that a restore writes into
/// private file mappings (always eagerly: CRIU restores only anonymous
/// memory lazily).
fn copied_on_write(data: &Path) -> Vec<Range> {
    use crate::image::criu::proto::{MmEntry, PagemapEntry};
    let files: std::collections::BTreeMap<u64, String> = crate::image::criu::files(data)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| Some((u64::from(f.id), f.reg?.name)))
        .filter(|(_, n)| n.starts_with('/'))
        .collect();
    let page = crate::restore::working_set::page_size();
    let mut out: Vec<Range> = Vec::new();
    let Ok(dir) = std::fs::read_dir(data) else {
        return out;
    };
    for name in dir.filter_map(|d| d.ok()).map(|d| d.file_name()) {
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("mm-"))
            .and_then(|n| n.strip_suffix(".img"))
        else {
            continue;
        };
        let Ok(mm) = crate::image::criu::read_one::<MmEntry>(&data.join(&name)) else {
            continue;
        };
        let Ok(entries) =
            crate::image::criu::read::<PagemapEntry>(&data.join(format!("pagemap-{pid}.img")))
        else {
            continue;
        };
        // The first entry is the pagemap's head: it decodes as an entry
        // of vaddr = pages_id, no flags, and is skipped as not present.
        let mut vmas = mm
            .vmas
            .iter()
            .filter(|v| v.status & VMA_FILE_PRIVATE != 0)
            .peekable();
        for e in entries.iter().skip(1) {
            let flags = e.flags.unwrap_or(0);
            if flags & PE_PRESENT == 0 || flags & PE_LAZY != 0 {
                continue;
            }
            let n = e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages));
            let end = e.vaddr + n * page;
            while vmas.peek().is_some_and(|v| v.end <= e.vaddr) {
                vmas.next();
            }
            let mut ahead = vmas.clone();
            while let Some(v) = ahead.next().filter(|v| v.start < end) {
                let Some(file) = files.get(&v.shmid) else {
                    continue;
                };
                let (a, b) = (e.vaddr.max(v.start), end.min(v.end));
                if a < b {
                    out.push((PathBuf::from(file), v.pgoff + (a - v.start), b - a));
                }
            }
        }
    }
    out
}

/// Asks for `ranges` from `THREADS` threads, returning at once (a long
/// range in pieces of `CHUNK`, so they go to the disk side by side).
pub fn start(ranges: Vec<Range>) {
    start_after(Vec::new(), ranges);
}

/// [`start`], but `first` read through (in parallel) before any of
/// `ranges` is asked for.
pub fn start_after(first: Vec<Range>, ranges: Vec<Range>) {
    let pieces = |ranges: Vec<Range>| -> Vec<Range> {
        ranges
            .into_iter()
            .flat_map(|(path, off, len)| {
                (0..len.div_ceil(CHUNK))
                    .map(move |i| (path.clone(), off + i * CHUNK, (len - i * CHUNK).min(CHUNK)))
            })
            .collect()
    };
    let (first, ranges) = (
        std::sync::Arc::new(pieces(first)),
        std::sync::Arc::new(pieces(ranges)),
    );
    let threads = THREADS.min(first.len().max(ranges.len()));
    let (next_first, next) = (
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    );
    let done_first = std::sync::Arc::new(std::sync::Barrier::new(threads));
    for _ in 0..threads {
        let (first, ranges, next_first, next, done_first) = (
            first.clone(),
            ranges.clone(),
            next_first.clone(),
            next.clone(),
            done_first.clone(),
        );
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            while let Some((path, off, len)) =
                first.get(next_first.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            {
                read_through(path, *off, *len, &mut buf);
            }
            done_first.wait();
            while let Some((path, off, len)) =
                ranges.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            {
                ask(path, *off, *len);
            }
        });
    }
}

/// Opens a regular file as [`ask`] does (anything else: `None`), with its size.
fn open_regular(path: &Path) -> Option<(std::fs::File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let size = file.metadata().ok().filter(|m| m.is_file())?.len();
    Some((file, size))
}

/// Reads a range of a regular file into the page cache and waits for it
/// (the bytes go to `buf` and are dropped).
fn read_through(path: &Path, off: u64, len: u64, buf: &mut Vec<u8>) {
    let Some((file, size)) = open_regular(path) else {
        return;
    };
    buf.resize(usize::try_from(STEP).unwrap_or(1 << 17), 0);
    for (at, n) in steps(off, len.min(size.saturating_sub(off))) {
        let n = usize::try_from(n).unwrap_or(0).min(buf.len());
        if std::os::unix::fs::FileExt::read_at(&file, &mut buf[..n], at).is_err() {
            return;
        }
    }
}

/// `readahead(2)` of one range of a regular file (anything else: nothing).
fn ask(path: &Path, off: u64, len: u64) {
    let Some((file, size)) = open_regular(path) else {
        return;
    };
    // (A range may be given longer than the file: CRIU's own files are.)
    for (at, n) in steps(off, len.min(size.saturating_sub(off))) {
        let (Ok(at), Ok(n)) = (i64::try_from(at), usize::try_from(n)) else {
            return;
        };
        // SAFETY: readahead reads nothing into our memory; the fd is open.
        unsafe {
            libc::readahead(file.as_raw_fd(), at, n);
        }
    }
}

/// `off..off + len` in pieces of at most [`STEP`] bytes.
fn steps(off: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(STEP)).map(move |i| (off + i * STEP, (len - i * STEP).min(STEP)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_readahead_asks_for_no_more_than_any_disk_reads_in_one_call() {
        for (off, len) in [
            (0, 0),
            (0, 1),
            (4096, STEP),
            (12_345, 4 * STEP + 7),
            (0, 4 << 20),
        ] {
            let pieces: Vec<(u64, u64)> = steps(off, len).collect();
            assert!(
                pieces.iter().all(|&(_, n)| n > 0 && n <= STEP),
                "{pieces:?}"
            );
            let mut at = off;
            for &(o, n) in &pieces {
                assert_eq!(o, at);
                at += n;
            }
            assert_eq!(at, off + len);
        }
    }

    #[test]
    fn only_regular_files_are_asked_for_and_a_fifo_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, vec![1u8; 4096]).unwrap();
        // Would hang forever on a blocking open of a fifo with no writer.
        ask(&fifo, 0, HEAD);
        ask(&file, 0, HEAD);
        ask(Path::new("/nonexistent/x"), 0, HEAD);
        let mut buf = Vec::new();
        read_through(&fifo, 0, HEAD, &mut buf);
        read_through(&file, 0, u64::MAX, &mut buf);
        start_after(vec![(fifo.clone(), 0, HEAD)], vec![(file.clone(), 0, HEAD)]);
        start(vec![(fifo, 0, HEAD), (file, 0, HEAD)]);
    }

    #[test]
    fn an_images_own_files_are_all_but_its_pages() {
        let dir = tempfile::tempdir().unwrap();
        for (name, len) in [("pages-1.img", 8192), ("core-2.img", 10), ("pstree.img", 3)] {
            std::fs::write(dir.path().join(name), vec![0u8; len]).unwrap();
        }
        let mut got: Vec<(String, u64)> = image_files(dir.path())
            .into_iter()
            .map(|(p, off, len)| {
                assert_eq!(off, 0);
                (p.file_name().unwrap().to_string_lossy().into_owned(), len)
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("core-2.img".to_string(), 10),
                ("pstree.img".to_string(), 3)
            ]
        );
    }

    #[test]
    fn criu_files_only_grow_and_stay_bounded() {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_string()).collect::<Vec<_>>();
        let known = s(&["/usr/sbin/criu", "/lib/libc.so.6"]);
        // A partial list (the loader seen halfway) adds nothing.
        assert_eq!(union(&known, &s(&["/usr/sbin/criu"])), known);
        assert_eq!(
            union(&known, &s(&["/lib/libnl.so", "/usr/sbin/criu"])),
            s(&["/usr/sbin/criu", "/lib/libc.so.6", "/lib/libnl.so"])
        );
        let many: Vec<String> = (0..100).map(|i| format!("/lib/{i}.so")).collect();
        assert_eq!(union(&known, &many).len(), CRIU_FILES_MAX);
    }
}
