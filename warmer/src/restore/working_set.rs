//! The pages a restored service touches first (its working set): learned
//! from lazy restores, restored first by the next ones.
//!
//! **Learn.** A lazy restore's `criu lazy-pages` daemon logs every page the
//! service faults on (`#PF at ADDR`, at verbosity 4). When the daemon ends
//! (every page delivered) or the service stops, those pages join the image's
//! working set, kept beside its cache entry as the note `working-set`
//! ([`cache::Cache::set_note`]: the entry itself never changes, and its
//! hashes still hold). The daemon delivers the pages nobody asked for in the
//! background, in address order, from the moment the tree runs: a page it
//! delivered before the service touched it is not seen, so each later restore
//! adds the faults that remain (the set grows towards what the service
//! touches until every page is in). Once a restore adds less than 1% (after
//! [`LEARN_RESTORES`]), the set is settled and restores stop logging faults
//! (at verbosity 4 the daemon's log costs the restore several ms).
//!
//! **Use.** A restore of an image with a working set restores a *view* of it:
//! a directory in the service's run directory whose files are symlinks into
//! the entry (relative ones: CRIU opens some of them from inside a sandbox's
//! root, where the cache's absolute path may be hidden, under a private
//! `/tmp` for one; a relative link is looked up from the view's directory
//! as CRIU opened it, on the host), except the pagemaps, rewritten so that the working set's pages
//! are no longer marked lazy (CRIU's `PE_LAZY`). `criu restore --lazy-pages`
//! copies those pages before the tree runs, in address order, as an eager
//! restore would; the daemon serves the rest on demand and in the background.
//! Only flags change: every page keeps its place in `pages-*.img`, so the view
//! restores exactly the memory of the image.
//!
//! ```text
//! <cache>/notes/<key>/working-set   {format_version, restores, pids: {PID: [[ADDR, PAGES], ..]}}
//! <run>/<svc>/image-view/           the view of the last restore
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::image::criu::proto::{PagemapEntry, PagemapHead};

/// The cache note a working set is kept in.
pub const NOTE: &str = "working-set";
/// The view's directory in the service's run directory.
pub const VIEW_DIR: &str = "image-view";
pub const FORMAT_VERSION: u32 = 1;
/// CRIU's pagemap flags (criu/include/pagemap.h).
const PE_LAZY: u32 = 1 << 1;
const PE_PRESENT: u32 = 1 << 2;
/// Restores a working set is learned from before it can be settled.
pub const LEARN_RESTORES: u32 = 2;
/// The most of a lazy-pages log read when learning (a fault is ~60 bytes).
const LOG_MAX: u64 = 256 << 20;

/// Which pages, per process of the image (its PID in the image).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    pub format_version: u32,
    /// How many restores it was learned from.
    pub restores: u32,
    /// Pages the last of them added.
    #[serde(default)]
    pub last_new: u64,
    /// Image PID -> sorted, disjoint, non-adjacent `[address, pages]` runs.
    pub pids: BTreeMap<i32, Vec<(u64, u64)>>,
    /// The pages of files the service mapped and touched after the restore
    /// (its code, above all): file -> `[page index, pages]` runs. Not in the
    /// image: after a boot they come from the disk, and are asked for with
    /// the image's ([`super::readahead`]).
    #[serde(default)]
    pub files: BTreeMap<String, Vec<(u64, u64)>>,
    /// File pages the last lesson added.
    #[serde(default)]
    pub last_new_files: u64,
    /// Lazy restores whose faults were learned from (`restores` counts
    /// every lesson, an eager restore's file pages too: a set learned while
    /// a service could only restore eagerly, as a sandboxed one once did,
    /// has no memory part yet, and must not count as settled for it).
    #[serde(default)]
    pub memory_lessons: u32,
}

impl WorkingSet {
    /// The entry's working set, if one was learned (and is readable).
    pub fn load(cache: &cache::Cache, key: &str) -> Option<Self> {
        let bytes = cache.note(key, NOTE)?;
        let mut ws = serde_json::from_slice::<Self>(&bytes)
            .ok()
            .filter(|w| w.format_version == FORMAT_VERSION && w.pages() + w.file_pages() > 0)?;
        // Written before memory lessons were counted: a memory part came
        // from lazy restores, as many as it has lessons at most.
        if ws.memory_lessons == 0 && ws.pages() > 0 {
            ws.memory_lessons = ws.restores;
        }
        Some(ws)
    }

    pub fn save(&self, cache: &cache::Cache, key: &str) -> Result<(), cache::Error> {
        cache.set_note(key, NOTE, &serde_json::to_vec(self).expect("serializes"))
    }

    /// Whether restores still teach it something: the first
    /// [`LEARN_RESTORES`], and any after one that added at least 1% of its
    /// pages. A settled set costs nothing (the daemon logs no faults).
    pub fn learning(&self) -> bool {
        self.learning_memory() || self.learning_files()
    }

    /// Whether a lazy restore's faults still teach it something.
    pub fn learning_memory(&self) -> bool {
        self.memory_lessons < LEARN_RESTORES || self.last_new * 100 >= self.pages().max(1)
    }

    /// Whether the file pages a restored service touches still do.
    pub fn learning_files(&self) -> bool {
        self.restores < LEARN_RESTORES || self.last_new_files * 100 >= self.file_pages().max(1)
    }

    /// The file pages the service touched, as (file, offset, length).
    pub fn file_ranges_touched(&self) -> Vec<(PathBuf, u64, u64)> {
        let page = page_size();
        // A set from elsewhere (a registry, an archive) may name more files
        // than a lesson here keeps: only as many are asked for.
        self.files
            .iter()
            .take(MAX_FILES)
            .flat_map(|(f, runs)| {
                runs.iter()
                    .map(move |(s, n)| (PathBuf::from(f), s * page, n * page))
            })
            .collect()
    }

    pub fn file_pages(&self) -> u64 {
        self.files.values().flatten().map(|(_, n)| n).sum()
    }

    pub fn pages(&self) -> u64 {
        self.pids.values().flatten().map(|(_, n)| n).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.pages() * page_size()
    }

    /// Adds `faults` (page addresses per image PID); returns how many pages
    /// were new.
    pub fn merge(&mut self, faults: &BTreeMap<i32, BTreeSet<u64>>) -> u64 {
        let page = page_size();
        let before = self.pages();
        for (pid, addrs) in faults {
            let mut all: BTreeSet<u64> = addrs.clone();
            for (start, n) in self.pids.get(pid).into_iter().flatten() {
                all.extend((0..*n).map(|i| start + i * page));
            }
            self.pids.insert(*pid, runs(&all, page));
        }
        self.format_version = FORMAT_VERSION;
        self.pages() - before
    }

    /// Adds file pages (page indexes per file); returns how many were new.
    pub fn merge_files(&mut self, touched: &BTreeMap<String, BTreeSet<u64>>) -> u64 {
        let before = self.file_pages();
        for (file, pages) in touched.iter().take(MAX_FILES) {
            let mut all = pages.clone();
            for (start, n) in self.files.get(file).into_iter().flatten() {
                all.extend(*start..start + n);
            }
            self.files.insert(file.clone(), runs(&all, 1));
        }
        self.format_version = FORMAT_VERSION;
        self.file_pages() - before
    }
}

/// How long after a restore the file pages its service touched are taken
/// (or at its stop, if that comes first): start-up and its first requests.
pub const FILE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Files a working set keeps pages of, at most.
const MAX_FILES: usize = 4096;

/// The pages of files mapped by `pids` that are in their page tables (bit
/// 63 of /proc/PID/pagemap: present; bit 61: a file page, not a private
/// copy): after a restore, only what they touched since.
pub fn touched_file_pages(pids: &[i32]) -> BTreeMap<String, BTreeSet<u64>> {
    use std::os::unix::fs::FileExt;
    let page = page_size();
    let mut out: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for pid in pids {
        let (Ok(maps), Ok(pagemap)) = (
            std::fs::read_to_string(format!("/proc/{pid}/maps")),
            std::fs::File::open(format!("/proc/{pid}/pagemap")),
        ) else {
            continue;
        };
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (Some(range), _, Some(off), _, Some(inode), Some(path)) =
                (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            if inode == "0" || !path.starts_with('/') || f.next().is_some() {
                continue; // anonymous, special, or "(deleted)"
            }
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b), Ok(off)) = (
                u64::from_str_radix(a, 16),
                u64::from_str_radix(b, 16),
                u64::from_str_radix(off, 16),
            ) else {
                continue;
            };
            let n = usize::try_from((b - a) / page).unwrap_or(0);
            let mut buf = vec![0u8; n * 8];
            if pagemap.read_exact_at(&mut buf, a / page * 8).is_err() {
                continue;
            }
            let pages = out.entry(path.to_string()).or_default();
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                if e >> 63 & 1 == 1 && e >> 61 & 1 == 1 {
                    pages.insert(off / page + i as u64);
                }
            }
        }
    }
    out.retain(|_, p| !p.is_empty());
    out
}

/// Serializes the lessons of one process (a lazy restore's daemon ending
/// and its file sample can come together).
static LESSON: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Learns from the tree `pids` restored from entry `key`: the file pages
/// they touched since the restore join the working set. A lesson, as
/// [`learn`]: one per restore.
pub fn learn_files(cache: &cache::Cache, key: &str, pids: &[i32]) {
    let touched = touched_file_pages(pids);
    let _one = LESSON.lock();
    let mut ws = WorkingSet::load(cache, key).unwrap_or_default();
    let new = ws.merge_files(&touched);
    ws.restores += 1;
    ws.last_new_files = new;
    match ws.save(cache, key) {
        Ok(()) => tracing::info!(
            phase = "working set",
            "the restored service touched {} pages of {} files ({new} new): {} MB of files in the working set{}",
            touched.values().map(BTreeSet::len).sum::<usize>(),
            touched.len(),
            ws.file_pages() * page_size() / 1_000_000,
            if ws.learning() { "" } else { ", settled" }
        ),
        Err(e) => tracing::debug!("working set not kept: {}", crate::errors::chain(&e)),
    }
}

/// Consecutive pages as `[start, pages]` runs.
fn runs(addrs: &BTreeSet<u64>, page: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &a in addrs {
        match out.last_mut() {
            Some((s, n)) if *s + *n * page == a => *n += 1,
            _ => out.push((a, 1)),
        }
    }
    out
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// The pages a `criu lazy-pages` log (verbosity 4) says were faulted on,
/// per image PID: its lines `(TIME) PID-FD: #PF at 0xADDR`.
pub fn faults_in_log(log: &Path) -> std::io::Result<BTreeMap<i32, BTreeSet<u64>>> {
    use std::io::{BufRead, Read};
    let file = std::fs::File::open(log)?;
    let mut out: BTreeMap<i32, BTreeSet<u64>> = BTreeMap::new();
    for line in std::io::BufReader::new(file.take(LOG_MAX)).lines() {
        let line = line?;
        if let Some((pid, addr)) = fault_of(&line) {
            out.entry(pid).or_default().insert(addr);
        }
    }
    Ok(out)
}

fn fault_of(line: &str) -> Option<(i32, u64)> {
    let (before, after) = line.split_once(": #PF at 0x")?;
    let who = before.rsplit(' ').next()?;
    let pid = who.split_once('-')?.0.parse().ok()?;
    let addr = u64::from_str_radix(after.trim(), 16).ok()?;
    Some((pid, addr & !(page_size() - 1)))
}

/// Learns from the lazy-pages log of a restore of entry `key`: its faults
/// join the entry's working set. Logged; a failure costs only the lesson.
pub fn learn(cache: &cache::Cache, key: &str, log: &Path) {
    let faults = match faults_in_log(log) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!("no working set learned from {}: {e}", log.display());
            return;
        }
    };
    let n: usize = faults.values().map(BTreeSet::len).sum();
    let _one = LESSON.lock();
    let mut ws = WorkingSet::load(cache, key).unwrap_or_default();
    if n == 0 && ws.pages() == 0 {
        return;
    }
    let new = ws.merge(&faults);
    ws.last_new = new;
    ws.memory_lessons += 1;
    match ws.save(cache, key) {
        Ok(()) => tracing::info!(
            phase = "working set",
            "the restore faulted on {n} pages ({new} not in the working set yet): working set {} MB of memory",
            ws.bytes() / 1_000_000,
        ),
        Err(e) => tracing::debug!("working set not kept: {}", crate::errors::chain(&e)),
    }
}

/// What a view restores first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub dir: PathBuf,
    /// Pages the view restores before the tree runs (the working set's
    /// pages that the image holds lazily).
    pub eager_pages: u64,
    /// Pages still served on demand.
    pub lazy_pages: u64,
}

/// The parts of `runs` (sorted, disjoint `[address, pages]`) inside
/// `[start, end)`, as `[from, to)` address pairs, in order.
fn overlaps(
    runs: &[(u64, u64)],
    start: u64,
    end: u64,
    page: u64,
) -> impl Iterator<Item = (u64, u64)> + '_ {
    let first = runs.partition_point(|(s, k)| s + k * page <= start);
    runs[first..]
        .iter()
        .take_while(move |(s, _)| *s < end)
        .map(move |(s, k)| ((*s).max(start), (s + k * page).min(end)))
        .filter(|(a, b)| a < b)
}

/// The pagemap of `pid` with the working set's pages no longer lazy, and
/// how many pages became eager and stayed lazy.
pub fn rewrite(entries: &[PagemapEntry], ws: &[(u64, u64)]) -> (Vec<PagemapEntry>, u64, u64) {
    let page = page_size();
    let (mut out, mut eager, mut lazy) = (Vec::with_capacity(entries.len()), 0, 0);
    let piece = |e: &PagemapEntry, start: u64, end: u64, keep_lazy: bool| {
        let n = (end - start) / page;
        PagemapEntry {
            vaddr: start,
            compat_nr_pages: u32::try_from(n).unwrap_or(0),
            in_parent: None,
            flags: Some(if keep_lazy {
                e.flags.unwrap_or(0)
            } else {
                e.flags.unwrap_or(0) & !PE_LAZY
            }),
            nr_pages: Some(n),
        }
    };
    for e in entries {
        let n = e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages));
        if e.flags.unwrap_or(0) & PE_LAZY == 0 {
            out.push(*e);
            continue;
        }
        let end = e.vaddr + n * page;
        let mut pos = e.vaddr;
        for (a, b) in overlaps(ws, e.vaddr, end, page) {
            if a > pos {
                out.push(piece(e, pos, a, true));
                lazy += (a - pos) / page;
            }
            out.push(piece(e, a, b, false));
            eager += (b - a) / page;
            pos = b;
        }
        if pos < end {
            out.push(piece(e, pos, end, true));
            lazy += (end - pos) / page;
        }
    }
    (out, eager, lazy)
}

/// Builds the view of the image in `data` that restores `ws` first, in
/// `run_dir`/[`VIEW_DIR`] (replacing an older one).
pub fn write_view(data: &Path, run_dir: &Path, ws: &WorkingSet) -> std::io::Result<View> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = run_dir.join(VIEW_DIR);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let to_data = relative(&dir.canonicalize()?, &data.canonicalize()?);
    let mut view = View {
        dir: dir.clone(),
        ..View::default()
    };
    for dent in std::fs::read_dir(data)? {
        let name = dent?.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix("pagemap-"))
            .and_then(|n| n.strip_suffix(".img"))
            .and_then(|n| n.parse::<i32>().ok());
        match pid.and_then(|p| ws.pids.get(&p)) {
            Some(runs) => {
                let (bytes, eager, lazy) = rewrite_file(&data.join(&name), runs)?;
                std::fs::write(dir.join(&name), bytes)?;
                view.eager_pages += eager;
                view.lazy_pages += lazy;
            }
            None => std::os::unix::fs::symlink(to_data.join(&name), dir.join(&name))?,
        }
    }
    Ok(view)
}

/// The relative path from directory `from` to `to` (both canonical).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (from, to): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c);
    }
    out
}

/// A pagemap file rewritten for `runs`: its framing kept, its entries split.
fn rewrite_file(path: &Path, runs: &[(u64, u64)]) -> std::io::Result<(Vec<u8>, u64, u64)> {
    let bytes = std::fs::read(path)?;
    let bad = |what: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {what}", path.display()),
        )
    };
    let (header, bodies) = crate::image::criu::frames(&bytes).map_err(|(_, what)| bad(what))?;
    let (head, rest) = bodies
        .split_first()
        .ok_or_else(|| bad("no pagemap head".into()))?;
    PagemapHead::decode(*head).map_err(|e| bad(e.to_string()))?;
    let entries = rest
        .iter()
        .map(|b| PagemapEntry::decode(*b))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let (entries, eager, lazy) = rewrite(&entries, runs);
    let mut out = bytes[..header].to_vec();
    let mut frame = |body: &[u8]| {
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(body);
    };
    frame(head);
    for e in entries {
        frame(&e.encode_to_vec());
    }
    Ok((out, eager, lazy))
}

/// The parts of the image's `pages-*.img` files a restore that is not eager
/// reads before the tree runs (file, offset, length), in file order: the
/// pages CRIU never restores lazily (all but private anonymous memory:
/// a library's relocated data, for one), and the working set's.
pub fn file_ranges(data: &Path, ws: Option<&WorkingSet>) -> Vec<(PathBuf, u64, u64)> {
    let page = page_size();
    let mut out: Vec<(PathBuf, u64, u64)> = Vec::new();
    let mut push = |pages: &PathBuf, off: u64, len: u64| match out.last_mut() {
        Some((p, o, l)) if p == pages && *o + *l == off => *l += len,
        _ => out.push((pages.clone(), off, len)),
    };
    let Ok(dir) = std::fs::read_dir(data) else {
        return out;
    };
    let mut pids: Vec<i32> = dir
        .filter_map(|d| d.ok())
        .filter_map(|d| {
            d.file_name()
                .to_str()?
                .strip_prefix("pagemap-")?
                .strip_suffix(".img")?
                .parse()
                .ok()
        })
        .collect();
    pids.sort_unstable();
    let none = Vec::new();
    for pid in pids {
        let runs = ws.and_then(|w| w.pids.get(&pid)).unwrap_or(&none);
        let Ok(bytes) = std::fs::read(data.join(format!("pagemap-{pid}.img"))) else {
            continue;
        };
        let Ok((_, bodies)) = crate::image::criu::frames(&bytes) else {
            continue;
        };
        let Some(Ok(head)) = bodies.first().map(|b| PagemapHead::decode(*b)) else {
            continue;
        };
        let pages = data.join(format!("pages-{}.img", head.pages_id));
        let mut off = 0u64;
        for e in bodies[1..]
            .iter()
            .filter_map(|b| PagemapEntry::decode(*b).ok())
        {
            let n = e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages));
            let flags = e.flags.unwrap_or(0);
            if flags & PE_PRESENT == 0 {
                continue;
            }
            let end = e.vaddr + n * page;
            if flags & PE_LAZY == 0 {
                push(&pages, off, n * page);
            } else {
                for (a, b) in overlaps(runs, e.vaddr, end, page) {
                    push(&pages, off + (a - e.vaddr), b - a);
                }
            }
            off += n * page;
        }
    }
    out
}

/// Reads into the page cache what a restore of `entry` reads before its
/// tree runs: every CRIU image but the memory pages, and of those the ones
/// never restored lazily and the working set's, in file order. Returns the bytes read. Nothing is checked
/// here (the caller checked the entry's shape; hashing comes after).
pub fn read_first(cache: &cache::Cache, entry: &cache::Entry) -> u64 {
    let data = entry.data_dir();
    let mut ranges: Vec<(PathBuf, u64, u64)> = entry
        .meta
        .files
        .iter()
        .filter(|f| !f.path.starts_with("pages-"))
        .map(|f| (data.join(&f.path), 0, f.size))
        .collect();
    let ws = WorkingSet::load(cache, &entry.key);
    ranges.extend(file_ranges(&data, ws.as_ref()));
    // The files the service touched are not the cache's: asked for, not read.
    if let Some(ws) = &ws {
        super::readahead::start(ws.file_ranges_touched());
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    let mut open: Option<(PathBuf, std::fs::File)> = None;
    for (path, mut off, len) in ranges {
        use std::os::unix::fs::FileExt;
        if open.as_ref().is_none_or(|(p, _)| *p != path) {
            let Ok(f) = std::fs::File::open(&path) else {
                continue;
            };
            open = Some((path.clone(), f));
        }
        let Some((_, file)) = &open else { continue };
        let end = off + len;
        while off < end {
            let want = usize::try_from((end - off).min(buf.len() as u64)).unwrap_or(buf.len());
            match file.read_at(&mut buf[..want], off) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    off += n as u64;
                    read += n as u64;
                }
            }
        }
    }
    read
}

#[cfg(test)]
mod tests {

    #[test]
    fn view_links_are_relative_to_the_view() {
        let r = |a: &str, b: &str| relative(Path::new(a), Path::new(b));
        assert_eq!(
            r(
                "/run/warmer/svc/image-view",
                "/var/cache/warmer/entries/k/data"
            ),
            Path::new("../../../../var/cache/warmer/entries/k/data")
        );
        assert_eq!(
            r("/tmp/t/run/svc/image-view", "/tmp/t/cache/entries/k/data"),
            Path::new("../../../cache/entries/k/data")
        );
        assert_eq!(r("/a/b", "/a/b/c"), Path::new("c"));
    }

    use super::*;

    const P: u64 = 4096;

    fn pe(vaddr: u64, n: u64, flags: u32) -> PagemapEntry {
        PagemapEntry {
            vaddr,
            compat_nr_pages: 0,
            in_parent: None,
            flags: Some(flags),
            nr_pages: Some(n),
        }
    }

    fn span(e: &PagemapEntry) -> (u64, u64, bool) {
        (
            e.vaddr,
            e.nr_pages.unwrap(),
            e.flags.unwrap() & PE_LAZY != 0,
        )
    }

    #[test]
    fn faults_are_read_from_criu_debug_lines_only() {
        assert_eq!(
            fault_of("(00.012345) 17-5: #PF at 0x7f0000001000"),
            Some((17, 0x7f00_0000_1000))
        );
        assert_eq!(
            fault_of("(00.1) 17-5: #PF at 0x7f0000001234").unwrap().1,
            0x7f00_0000_1000
        );
        assert_eq!(fault_of("(00.1) 17-5: uffd_copy: 0x7f00/4096"), None);
        assert_eq!(fault_of("(00.1) nonsense: #PF at 0xzz"), None);
    }

    #[test]
    fn merging_keeps_runs_sorted_disjoint_and_counts_new_pages() {
        let mut ws = WorkingSet::default();
        let f = |addrs: &[u64]| BTreeMap::from([(1, addrs.iter().map(|a| a * P).collect())]);
        assert_eq!(ws.merge(&f(&[10, 11, 12, 20])), 4);
        assert_eq!(ws.pids[&1], vec![(10 * P, 3), (20 * P, 1)]);
        assert_eq!(ws.merge(&f(&[13, 12, 19])), 2);
        assert_eq!(ws.pids[&1], vec![(10 * P, 4), (19 * P, 2)]);
        assert_eq!(ws.pages(), 6);
    }

    #[test]
    fn the_file_pages_a_process_touched_are_the_ones_in_its_page_tables() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lib.so");
        let len = 16 * 4096;
        std::fs::write(&path, vec![7u8; len]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a fresh private read-only mapping of a file we hold open.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // Fault-around maps neighbours too: touch one page, then take
        // whatever the kernel mapped; it must include that page and no page
        // of another file.
        // SAFETY: reading inside the mapping.
        let byte = unsafe { std::ptr::read_volatile(addr.cast::<u8>().add(5 * 4096)) };
        assert_eq!(byte, 7);
        let touched = touched_file_pages(&[i32::try_from(std::process::id()).unwrap()]);
        let canon = std::fs::canonicalize(&path).unwrap();
        let pages = &touched[canon.to_str().unwrap()];
        assert!(pages.contains(&5), "{pages:?}");
        assert!(pages.iter().all(|p| *p < 16), "{pages:?}");
        // SAFETY: unmapping exactly the mapping made above.
        unsafe { libc::munmap(addr, len) };
        let mut ws = WorkingSet::default();
        assert_eq!(ws.merge_files(&touched), ws.file_pages());
        assert!(ws
            .file_ranges_touched()
            .iter()
            .any(|(f, off, _)| *f == canon && *off <= 5 * P));
    }

    #[test]
    fn learning_goes_on_until_a_restore_adds_under_one_percent() {
        let mut ws = WorkingSet::default();
        let f = |range: std::ops::Range<u64>| BTreeMap::from([(1, range.map(|a| a * P).collect())]);
        ws.merge(&f(0..1000));
        (ws.restores, ws.memory_lessons) = (1, 1);
        assert!(ws.learning(), "one restore is not enough");
        ws.last_new = ws.merge(&f(1000..1005));
        (ws.restores, ws.memory_lessons) = (2, 2);
        assert!(!ws.learning(), "5 new pages of 1005: settled");
        ws.last_new = ws.merge(&f(2000..2100));
        assert!(ws.learning(), "100 new: still learning");
    }

    #[test]
    fn file_lessons_of_eager_restores_do_not_settle_the_memory_part() {
        // Two eager restores (a sandboxed service before its CRIU could
        // restore it lazily) taught only file pages.
        let mut ws = WorkingSet {
            restores: 2,
            files: BTreeMap::from([("/usr/lib/x.so".to_string(), vec![(0, 10)])]),
            ..WorkingSet::default()
        };
        assert!(!ws.learning_files());
        assert!(
            ws.learning_memory(),
            "no lazy restore has been learned from"
        );
        assert!(ws.learning());
        let f = BTreeMap::from([(1, (0..100u64).map(|a| a * P).collect())]);
        ws.last_new = ws.merge(&f);
        ws.memory_lessons = 2;
        ws.last_new = 0;
        assert!(!ws.learning(), "two memory lessons, nothing new: settled");
    }

    #[test]
    fn rewriting_splits_lazy_entries_around_the_working_set_and_keeps_every_page() {
        let entries = vec![
            pe(0, 4, PE_PRESENT),                  // eager already: untouched
            pe(100 * P, 10, PE_PRESENT | PE_LAZY), // 100..110
            pe(200 * P, 2, PE_PRESENT | PE_LAZY),  // 200..202
        ];
        // Runs: one inside the first lazy entry, one across its end and into
        // nothing, one covering the second lazy entry whole, one outside.
        let ws = vec![
            (0, 2),
            (102 * P, 2),
            (108 * P, 5),
            (199 * P, 4),
            (500 * P, 1),
        ];
        let (out, eager, lazy) = rewrite(&entries, &ws);
        let spans: Vec<_> = out.iter().map(span).collect();
        assert_eq!(
            spans,
            vec![
                (0, 4, false),
                (100 * P, 2, true),
                (102 * P, 2, false),
                (104 * P, 4, true),
                (108 * P, 2, false),
                (200 * P, 2, false),
            ]
        );
        assert_eq!((eager, lazy), (6, 6));
        // Every page of the image is still there, in the same order.
        let total = |v: &[PagemapEntry]| v.iter().map(|e| e.nr_pages.unwrap()).sum::<u64>();
        assert_eq!(total(&out), total(&entries));
        assert!(out.windows(2).all(|w| w[0].vaddr < w[1].vaddr));
        assert!(out.iter().all(|e| e.flags.unwrap() & PE_PRESENT != 0));
    }
}
