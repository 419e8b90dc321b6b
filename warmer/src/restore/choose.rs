//! Eager or lazy: which restore an image gets (manifest `restore.mode`).
//!
//! An eager restore copies all of the image's memory into the new
//! processes before they run; a lazy one (userfaultfd, `criu lazy-pages`)
//! lets them run as soon as the tree is rebuilt, and fetches each page on
//! first touch. Lazy wins for big images, above all when the image is not
//! in the page cache (it reads only what the service touches before it
//! answers); it loses for small ones (a daemon to start, a fault per page)
//! and for some services that touch most of their memory at once.
//!
//! A third kind builds on lazy: **working set first** ([`super::working_set`]).
//! What earlier restores of the image touched first is copied before the tree
//! runs, in bulk and in address order, and only the rest is served on demand.
//!
//! `auto` (the default) decides per image from what is known, never by trying
//! a slower kind on a start (that is `warmer bench`'s job):
//! 1. memory under [`LAZY_MIN_BYTES`]: eager;
//! 2. a lazy restore of this image failed this boot: eager;
//! 3. a working set is known: working set first, unless eager was measured
//!    faster than it this boot;
//! 4. none yet: lazy (which learns one), unless eager was measured faster than
//!    lazy this boot and most of the image is in the page cache (only then is
//!    the page cache looked at: a sampled mincore of the image).
//!
//! The decision and its reason go to the log and `warmer status`.
//!
//! The same measurements decide whether a warm service is restored at all
//! ([`cold_is_faster`]): never slower than cold, judged from several samples,
//! never from one.
//!
//! ```text
//! <run>/<svc>/restore-history.json   {format_version, digest, eager_ms, lazy_ms,
//!                                     ws_ms, cold_ms, lazy_failed}   (this boot)
//! <cache>/notes/<key>/restore-history {kernel, the same without lazy_failed}
//! ```
//! The timings outlive a reboot beside the image they were measured on (a
//! cache note, [`NOTE`]): after a boot, `auto` starts from what the last
//! boot measured (`warmer bench`'s alternatives included) instead of from
//! nothing. They are dropped with the image, and ignored under another
//! kernel (the page copy, userfaultfd and CRIU's own costs are the
//! kernel's). A failed lazy restore counts this boot only: it may have
//! been the machine's, not the image's. `warmer reset SVC` forgets both
//! (and the failure counts of `backoff`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::manifest::RestoreMode;

/// Below this much memory in an image, eager is as fast as lazy or faster
/// (the lazy daemon and a fault per page cost more than copying). Measured:
/// a 182 MB Python image restores in 138 ms lazy vs 209 ms eager.
pub const LAZY_MIN_BYTES: u64 = 64 << 20;
/// Below this fraction of an image in the page cache, lazy reads far less.
const COLD_CACHE: f64 = 0.5;
/// Measurements kept per kind.
const KEEP: usize = 3;
pub const FILE: &str = "restore-history.json";
/// The history's format; files without one (version 0) read the same.
pub const HISTORY_VERSION: u32 = 1;
/// Restores measured before "a cold start is faster" can be concluded.
pub const MIN_RESTORE_SAMPLES: usize = 3;

/// The cache note that keeps an image's timings across boots.
pub const NOTE: &str = "restore-history";

/// Where the timings are kept beyond this boot: the cache and the key of
/// the image they were measured on.
pub type Kept<'a> = Option<(&'a cache::Cache, &'a str)>;

/// The note's content: the timings, and the kernel they were measured under.
#[derive(Debug, Serialize, Deserialize)]
struct KeptHistory {
    kernel: String,
    history: History,
}

fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// How the restores of one image went (this boot).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    #[serde(default)]
    pub format_version: u32,
    pub digest: String,
    /// Cold starts of this digest, start to ready, ms, newest last.
    #[serde(default)]
    pub cold_ms: Vec<u64>,
    /// Start to ready, ms, newest last.
    pub eager_ms: Vec<u64>,
    pub lazy_ms: Vec<u64>,
    /// Working set first, start to ready, ms, newest last.
    #[serde(default)]
    pub ws_ms: Vec<u64>,
    /// Why a lazy restore failed, if one did.
    pub lazy_failed: Option<String>,
}

impl History {
    /// This boot's measurements of `digest`.
    pub fn load(run_dir: &Path, digest: &str) -> Self {
        Self::load_kept(run_dir, digest, None)
    }

    /// This boot's measurements of `digest`; when this boot has none yet,
    /// those kept beside the image `kept` names (under this kernel).
    pub fn load_kept(run_dir: &Path, digest: &str, kept: Kept<'_>) -> Self {
        let valid = |h: &Self| h.digest == digest && h.format_version <= HISTORY_VERSION;
        let this_boot = std::fs::read(run_dir.join(FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Self>(&b).ok())
            .filter(valid);
        this_boot
            .or_else(|| {
                let (cache, key) = kept?;
                let k: KeptHistory = serde_json::from_slice(&cache.note(key, NOTE)?).ok()?;
                (k.kernel == kernel_release())
                    .then_some(History {
                        lazy_failed: None,
                        ..k.history
                    })
                    .filter(valid)
            })
            .unwrap_or_else(|| History {
                digest: digest.to_string(),
                ..History::default()
            })
    }

    /// Writes the history (and its timings beside the image, if `kept`); a
    /// failure is logged (the next decision then has fewer measurements,
    /// nothing worse).
    fn save(mut self, run_dir: &Path, kept: Kept<'_>) {
        self.format_version = HISTORY_VERSION;
        if let Some((cache, key)) = kept {
            let note = KeptHistory {
                kernel: kernel_release(),
                history: History {
                    lazy_failed: None,
                    ..self.clone()
                },
            };
            if let Err(e) =
                cache.set_note(key, NOTE, &serde_json::to_vec(&note).expect("serializes"))
            {
                tracing::warn!("cannot keep the restore timings beside image {key}: {e}");
            }
        }
        if let Err(e) = cache::fsutil::write_atomic(
            run_dir,
            FILE,
            &serde_json::to_vec(&self).expect("serializes"),
            0o600,
            cache::fsutil::Durability::Atomic,
        ) {
            tracing::warn!(
                "cannot record the restore history in {}: {e}",
                run_dir.display()
            );
        }
    }

    /// Remembers how long a restore of the image (of `kind`) took to ready.
    pub fn record(run_dir: &Path, digest: &str, kind: Kind, ms: u64, kept: Kept<'_>) {
        let mut h = Self::load_kept(run_dir, digest, kept);
        push_sample(
            match kind {
                Kind::Eager => &mut h.eager_ms,
                Kind::Lazy => &mut h.lazy_ms,
                Kind::WorkingSet => &mut h.ws_ms,
            },
            ms,
        );
        h.save(run_dir, kept);
    }

    /// Remembers how long a cold start of this digest took to ready.
    pub fn record_cold(run_dir: &Path, digest: &str, ms: u64, kept: Kept<'_>) {
        let mut h = Self::load_kept(run_dir, digest, kept);
        push_sample(&mut h.cold_ms, ms);
        h.save(run_dir, kept);
    }

    /// Remembers that a lazy restore of the image failed (this boot only).
    pub fn record_lazy_failure(run_dir: &Path, digest: &str, why: &str) {
        let mut h = Self::load(run_dir, digest);
        h.lazy_failed = Some(why.chars().take(300).collect());
        h.save(run_dir, None);
    }
}

/// `warmer reset SVC`: forgets the timings kept beside every image of
/// `service`; returns how many images had some.
pub fn forget_kept(cache: &cache::Cache, service: &str) -> Result<usize, cache::Error> {
    let mut n = 0;
    for entry in cache.list()?.into_iter().flatten() {
        if entry.meta.service == service && cache.remove_note(&entry.key, NOTE)? {
            n += 1;
        }
    }
    Ok(n)
}

fn push_sample(list: &mut Vec<u64>, ms: u64) {
    list.push(ms);
    if list.len() > KEEP {
        list.remove(0);
    }
}

/// The measurements that say a warm service cold-starts faster than it
/// restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdIsFaster {
    /// Median cold start, ms.
    pub cold_ms: u64,
    /// The fastest and slowest restore measured, ms.
    pub restore_ms: (u64, u64),
    pub restores: usize,
}

impl std::fmt::Display for ColdIsFaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a cold start is faster: {} restores took {}-{} ms, a cold start {} ms (kept with the image; `warmer reset` forgets it)",
            self.restores, self.restore_ms.0, self.restore_ms.1, self.cold_ms
        )
    }
}

/// Never slower than cold, decided from several samples: a warm service
/// cold-starts from now on (this boot, this digest) only when at least
/// [`MIN_RESTORE_SAMPLES`] restores were measured and even the fastest was
/// no faster than the median cold start. One slow restore (a boot storm, a
/// dropped page cache) decides nothing. `image_cold_ms`: the cold start the
/// image was taken after, when this boot measured none.
pub fn cold_is_faster(h: &History, image_cold_ms: Option<u64>) -> Option<ColdIsFaster> {
    let restores: Vec<u64> = h
        .eager_ms
        .iter()
        .chain(&h.lazy_ms)
        .chain(&h.ws_ms)
        .copied()
        .collect();
    if restores.len() < MIN_RESTORE_SAMPLES {
        return None;
    }
    let cold_ms = median(&h.cold_ms).or(image_cold_ms)?;
    let (min, max) = (*restores.iter().min()?, *restores.iter().max()?);
    (min >= cold_ms).then_some(ColdIsFaster {
        cold_ms,
        restore_ms: (min, max),
        restores: restores.len(),
    })
}

fn median(v: &[u64]) -> Option<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// How a restore brings the memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// All of it before the tree runs.
    Eager,
    /// Each page on first touch (and the rest in the background).
    Lazy,
    /// The working set before the tree runs, the rest as lazy.
    WorkingSet,
}

/// What was decided, and why (for the log and `status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    /// A lazy-pages daemon serves (some of) the memory.
    pub lazy: bool,
    /// The working set goes first (with `lazy`).
    #[serde(default)]
    pub working_set: bool,
    pub reason: String,
}

impl Choice {
    pub fn kind(&self) -> Kind {
        match (self.lazy, self.working_set) {
            (false, _) => Kind::Eager,
            (true, false) => Kind::Lazy,
            (true, true) => Kind::WorkingSet,
        }
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind() {
            Kind::Eager => "eager",
            Kind::Lazy => "lazy",
            Kind::WorkingSet => "working set first",
        };
        write!(f, "{kind} ({})", self.reason)
    }
}

fn mb(b: u64) -> u64 {
    b / 1_000_000
}

/// A working set known for the image: its size and how many restores it
/// was learned from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub bytes: u64,
    pub restores: u32,
}

/// The restore for an image with `memory` bytes of pages, given `history`
/// and the working set learned for it (`ws`); `resident` tells the fraction
/// of the image in the page cache (`None`: unknown), asked only when it can
/// change the answer (it costs a sampled mincore of the image).
pub fn choose(
    mode: RestoreMode,
    memory: u64,
    ws: Option<Known>,
    resident: &mut dyn FnMut() -> Option<f64>,
    h: &History,
) -> Choice {
    let choice = |kind: Kind, reason: String| Choice {
        lazy: kind != Kind::Eager,
        working_set: kind == Kind::WorkingSet,
        reason,
    };
    match mode {
        RestoreMode::Eager => return choice(Kind::Eager, "restore.mode: eager".into()),
        RestoreMode::Lazy => return choice(Kind::Lazy, "restore.mode: lazy".into()),
        RestoreMode::Auto => {}
    }
    if memory < LAZY_MIN_BYTES {
        return choice(
            Kind::Eager,
            format!(
                "auto: {} MB of memory, under {} MiB",
                mb(memory),
                LAZY_MIN_BYTES >> 20
            ),
        );
    }
    if let Some(why) = &h.lazy_failed {
        return choice(
            Kind::Eager,
            format!("auto: a lazy restore failed this boot ({why})"),
        );
    }
    let eager = median(&h.eager_ms);
    if let Some(ws) = ws {
        return match (eager, median(&h.ws_ms)) {
            (Some(e), Some(w)) if e < w => choice(
                Kind::Eager,
                format!("auto: measured this boot: eager {e} ms, working set first {w} ms"),
            ),
            _ => choice(
                Kind::WorkingSet,
                format!(
                    "auto: {} MB of memory, {} MB of it touched first (learned from {} restores)",
                    mb(memory),
                    mb(ws.bytes),
                    ws.restores
                ),
            ),
        };
    }
    let lazy = choice(
        Kind::Lazy,
        format!(
            "auto: {} MB of memory, no working set learned yet",
            mb(memory)
        ),
    );
    match (eager, median(&h.lazy_ms)) {
        (Some(e), Some(l)) if e < l => match resident() {
            Some(r) if r < COLD_CACHE => choice(
                Kind::Lazy,
                format!(
                    "auto: {} MB of memory, {:.0}% in the page cache: lazy reads only what the service touches",
                    mb(memory),
                    r * 100.0
                ),
            ),
            _ => choice(
                Kind::Eager,
                format!("auto: measured this boot: lazy {l} ms, eager {e} ms"),
            ),
        },
        _ => lazy,
    }
}

/// The memory pages an image holds: its `pages-*.img` files.
pub fn memory_files(entry: &cache::Entry) -> (u64, Vec<std::path::PathBuf>) {
    let data = entry.data_dir();
    let pages: Vec<&cache::FileSum> = entry
        .meta
        .files
        .iter()
        .filter(|f| f.path.starts_with("pages-") && f.path.ends_with(".img"))
        .collect();
    (
        pages.iter().map(|f| f.size).sum(),
        pages.iter().map(|f| data.join(&f.path)).collect(),
    )
}

/// The fraction of `files` in the page cache, estimated from `SAMPLES`
/// pages spread evenly over them (mincore(2) on a mapping of each; nothing
/// is read): microseconds, where a walk of every page of a 200 MB image
/// takes 2-3 ms of a restore. `None` if it cannot be told.
pub fn resident_sample(files: &[std::path::PathBuf]) -> Option<f64> {
    use std::os::fd::AsRawFd;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let sizes: Vec<(std::fs::File, usize)> = files
        .iter()
        .filter_map(|p| {
            let f = std::fs::File::open(p).ok()?;
            let len = usize::try_from(f.metadata().ok()?.len()).ok()?;
            (len > 0).then_some((f, len))
        })
        .collect();
    let total: usize = sizes.iter().map(|(_, l)| l).sum();
    if total == 0 {
        return None;
    }
    let (mut asked, mut resident) = (0usize, 0usize);
    for (file, len) in &sizes {
        // This file's share of the samples, at least one.
        let n = (SAMPLES * len / total).max(1);
        // SAFETY: a fresh read-only shared mapping of a file we hold open;
        // it is only passed to mincore and unmapped below, never accessed.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                *len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return None;
        }
        let pages = len.div_ceil(page);
        for i in 0..n {
            let at = (pages * i / n) * page;
            let mut v = 0u8;
            // SAFETY: one page inside the mapping; `v` holds its one byte.
            let rc = unsafe { libc::mincore(addr.cast::<u8>().add(at).cast(), page, &raw mut v) };
            if rc == 0 {
                asked += 1;
                resident += usize::from(v & 1);
            }
        }
        // SAFETY: unmapping exactly the mapping made above.
        unsafe { libc::munmap(addr, *len) };
    }
    #[allow(clippy::cast_precision_loss)]
    (asked > 0).then(|| resident as f64 / asked as f64)
}

/// Pages [`resident_sample`] looks at.
const SAMPLES: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn h(eager: &[u64], lazy: &[u64]) -> History {
        History {
            digest: "d".into(),
            eager_ms: eager.to_vec(),
            lazy_ms: lazy.to_vec(),
            ..History::default()
        }
    }

    #[test]
    fn cold_is_faster_needs_several_restores_all_no_faster_than_cold() {
        // One slow restore decides nothing (Prometheus: 114 ms once, against
        // cold starts of 60-167 ms).
        assert_eq!(cold_is_faster(&h(&[114], &[]), Some(100)), None);
        assert_eq!(cold_is_faster(&h(&[114, 120], &[]), Some(100)), None);
        // Three, but one was faster than cold: keep restoring.
        assert_eq!(cold_is_faster(&h(&[114, 90, 130], &[]), Some(100)), None);
        // Three, none faster: cold from now on, with the spread.
        let v = cold_is_faster(&h(&[114, 130], &[101]), Some(100)).unwrap();
        assert_eq!((v.cold_ms, v.restore_ms, v.restores), (100, (101, 130), 3));
        assert!(v.to_string().contains("3 restores took 101-130 ms"), "{v}");
        // Cold starts measured this boot count before the image's one.
        let mut with_cold = h(&[114, 130, 101], &[]);
        with_cold.cold_ms = vec![200, 150, 180];
        assert_eq!(cold_is_faster(&with_cold, Some(100)), None, "median 180");
        // Nothing known about cold: nothing decided.
        assert_eq!(cold_is_faster(&h(&[1, 2, 3], &[]), None), None);
    }

    #[test]
    fn an_unversioned_history_reads_and_a_newer_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE),
            r#"{"digest":"d","eager_ms":[5],"lazy_ms":[],"lazy_failed":null}"#,
        )
        .unwrap();
        assert_eq!(History::load(dir.path(), "d").eager_ms, vec![5]);
        History::record_cold(dir.path(), "d", 7, None);
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.contains(r#""format_version":1"#), "{text}");
        std::fs::write(
            dir.path().join(FILE),
            r#"{"format_version":99,"digest":"d","eager_ms":[5],"lazy_ms":[]}"#,
        )
        .unwrap();
        assert!(History::load(dir.path(), "d").eager_ms.is_empty());
    }

    const BIG: u64 = 1 << 30;

    #[test]
    fn explicit_modes_are_obeyed() {
        let ws = Some(Known {
            bytes: 1 << 20,
            restores: 1,
        });
        assert!(!choose(RestoreMode::Eager, BIG, ws, &mut || Some(0.0), &h(&[], &[])).lazy);
        let lazy = choose(RestoreMode::Lazy, 1, ws, &mut || Some(1.0), &h(&[], &[]));
        assert_eq!(lazy.kind(), Kind::Lazy);
    }

    #[test]
    fn small_images_are_always_eager() {
        let c = choose(
            RestoreMode::Auto,
            30 << 20,
            None,
            &mut || Some(0.0),
            &h(&[900], &[100]),
        );
        assert!(!c.lazy, "{c}");
        assert!(c.reason.contains("under"), "{c}");
    }

    #[test]
    fn auto_never_tries_a_slower_kind_on_a_start() {
        let mut asked = false;
        // Nothing known: lazy, which learns the working set.
        let none = choose(
            RestoreMode::Auto,
            BIG,
            None,
            &mut || {
                asked = true;
                Some(1.0)
            },
            &h(&[], &[]),
        );
        assert_eq!(none.kind(), Kind::Lazy, "{none}");
        // Lazy measured: lazy again (no "eager once to compare").
        let again = choose(RestoreMode::Auto, BIG, None, &mut || None, &h(&[], &[210]));
        assert_eq!(again.kind(), Kind::Lazy, "{again}");
        assert!(
            !asked,
            "the page cache is looked at only when it can matter"
        );
        // Both measured (a bench did), eager faster, image in the page cache.
        let c = choose(
            RestoreMode::Auto,
            BIG,
            None,
            &mut || Some(1.0),
            &h(&[130], &[210]),
        );
        assert!(
            !c.lazy && c.reason.contains("lazy 210 ms, eager 130 ms"),
            "{c}"
        );
        // Redis-like: lazy faster.
        let c = choose(
            RestoreMode::Auto,
            BIG,
            None,
            &mut || Some(1.0),
            &h(&[911, 905], &[109]),
        );
        assert_eq!(c.kind(), Kind::Lazy);
    }

    #[test]
    fn a_known_working_set_goes_first_unless_eager_was_measured_faster() {
        let ws = Some(Known {
            bytes: 30_000_000,
            restores: 2,
        });
        let c = choose(RestoreMode::Auto, BIG, ws, &mut || None, &h(&[300], &[210]));
        assert_eq!(c.kind(), Kind::WorkingSet, "{c}");
        assert!(c.reason.contains("30 MB of it touched first"), "{c}");
        let mut measured = h(&[90], &[210]);
        measured.ws_ms = vec![120];
        let c = choose(RestoreMode::Auto, BIG, ws, &mut || None, &measured);
        assert_eq!(c.kind(), Kind::Eager, "{c}");
        measured.ws_ms = vec![60];
        let c = choose(RestoreMode::Auto, BIG, ws, &mut || None, &measured);
        assert_eq!(c.kind(), Kind::WorkingSet, "{c}");
    }

    #[test]
    fn a_cold_page_cache_means_lazy_and_a_lazy_failure_means_eager() {
        let c = choose(
            RestoreMode::Auto,
            BIG,
            None,
            &mut || Some(0.1),
            &h(&[130], &[210]),
        );
        assert!(c.lazy && c.reason.contains("10% in the page cache"), "{c}");
        let mut failed = h(&[], &[100]);
        failed.lazy_failed = Some("daemon died".into());
        assert!(!choose(RestoreMode::Auto, BIG, None, &mut || Some(0.1), &failed).lazy);
    }

    #[test]
    fn history_is_per_digest_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        for ms in [5, 6, 7, 8] {
            History::record(dir.path(), "a", Kind::Eager, ms, None);
        }
        History::record(dir.path(), "a", Kind::Lazy, 3, None);
        History::record(dir.path(), "a", Kind::WorkingSet, 2, None);
        let got = History::load(dir.path(), "a");
        assert_eq!(got.eager_ms, vec![6, 7, 8]);
        assert_eq!(got.lazy_ms, vec![3]);
        assert_eq!(got.ws_ms, vec![2]);
        assert_eq!(History::load(dir.path(), "b"), h(&[], &[]).with_digest("b"));
    }

    #[test]
    fn timings_outlive_a_boot_beside_their_image_under_the_same_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache::Cache::open(dir.path().join("c")).unwrap();
        let digest = "ab".repeat(32);
        let staging = cache.stage().unwrap();
        std::fs::write(staging.data_dir().join("core-1.img"), b"x").unwrap();
        let entry = cache
            .publish(
                staging,
                cache::NewEntry {
                    service: "web".into(),
                    digest: digest.clone(),
                    ..Default::default()
                },
            )
            .unwrap();
        let kept = Some((&cache, entry.key.as_str()));
        let boot1 = dir.path().join("run1");
        std::fs::create_dir(&boot1).unwrap();
        History::record_cold(&boot1, &digest, 900, kept);
        History::record(&boot1, &digest, Kind::Eager, 40, kept);
        History::record_lazy_failure(&boot1, &digest, "daemon died");
        assert!(History::load(&boot1, &digest).lazy_failed.is_some());
        // A new boot: an empty run directory.
        let boot2 = dir.path().join("run2");
        std::fs::create_dir(&boot2).unwrap();
        assert!(
            History::load(&boot2, &digest).eager_ms.is_empty(),
            "not without the image"
        );
        let after = History::load_kept(&boot2, &digest, kept);
        assert_eq!((after.cold_ms, after.eager_ms), (vec![900], vec![40]));
        assert_eq!(
            after.lazy_failed, None,
            "a failure counts the boot it happened in"
        );
        // Under another kernel, the timings say nothing.
        let mut note: KeptHistory =
            serde_json::from_slice(&cache.note(&entry.key, NOTE).unwrap()).unwrap();
        note.kernel = "0.0.1-other".into();
        cache
            .set_note(&entry.key, NOTE, &serde_json::to_vec(&note).unwrap())
            .unwrap();
        assert!(History::load_kept(&boot2, &digest, kept)
            .eager_ms
            .is_empty());
        // Nor for another digest (a note copied beside another image).
        assert!(History::load_kept(&boot2, &"cd".repeat(32), kept)
            .cold_ms
            .is_empty());
    }

    impl History {
        fn with_digest(mut self, d: &str) -> Self {
            self.digest = d.into();
            self
        }
    }

    #[test]
    fn residency_of_files_just_written_is_high() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pages-1.img");
        std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
        let r = resident_sample(&[p]).unwrap();
        assert!(r > 0.9, "{r}");
    }
}
