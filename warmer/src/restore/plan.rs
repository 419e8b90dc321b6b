//! Step 1 of a restore: what to restore and how ([`plan`]; for an image
//! still arriving from a registry, [`plan_streamed`]): the image must be
//! current, not stale, its state data as it captured it; integrity by stamp
//! or hash ([`Integrity`]), eager or lazy ([`choose`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cache::{Cache, Entry};

use super::{choose, page_server, working_set, Failure};
use crate::image::state::Drift;
use crate::image::Taken;
use crate::manifest::Mode;

/// Why a sandboxed image restores eagerly where CRIU cannot help it.
pub const NO_USERFAULTFD: &str = "this CRIU cannot open a userfaultfd inside the service's user namespace (`criu check --feature uffd-dev` fails; the CRIU scripts/install-criu.sh builds can), so its images restore eagerly";

/// How an entry's integrity is established before its tree runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// A stamp from this boot still matches every file: nothing to hash.
    Stamped,
    /// Hashed in full before the state is put back (nothing unverified is
    /// ever written outside the cache).
    HashFirst,
    /// Hashed on one core while CRIU restores the tree, left stopped.
    HashAlongside,
}

impl Integrity {
    pub fn choose(stamped: bool, with_state: bool) -> Self {
        match (stamped, with_state) {
            (true, _) => Integrity::Stamped,
            (false, true) => Integrity::HashFirst,
            (false, false) => Integrity::HashAlongside,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Integrity::Stamped => "stamp",
            Integrity::HashFirst => "hashed before the state was put back",
            Integrity::HashAlongside => "hashed alongside",
        }
    }
}

/// What step 1 decided.
#[derive(Debug, Clone)]
pub struct Plan {
    /// CRIU must have restored the tree within this (manifest `restore.timeout`).
    pub deadline: Duration,
    pub entry: Entry,
    pub integrity: Integrity,
    /// `state:` paths that vanished with a tmpfs and go back with the image
    /// (every other captured path is exactly as at the checkpoint).
    pub put_back: Vec<PathBuf>,
    /// Eager or lazy, and why ([`choose`]).
    pub choice: choose::Choice,
    /// The image's `restore.json`, read once here.
    pub info: crate::image::RestoreInfo,
    /// What earlier restores of this entry touched first, if learned
    /// (restored first only when `choice.working_set` says so).
    pub working_set: Option<working_set::WorkingSet>,
    /// The entry's page files are still arriving (a fresh node restoring
    /// before its pull ends: `remote::stream`); the rest is served from here.
    pub pages: Option<Served>,
    /// A lazy restore's daemon holds the memory nobody asked for until the
    /// tree is quiet (set by the caller where CRIU can:
    /// [`crate::criu::QUIET_BACKGROUND`]).
    pub quiet_background: bool,
}

/// Page files served while they arrive ([`page_server::Pages`]).
#[derive(Clone)]
pub struct Served(pub std::sync::Arc<dyn page_server::Pages>);

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Served")
    }
}

impl Plan {
    /// The entry's name in the cache (digest and generation).
    pub fn key(&self) -> &str {
        &self.entry.key
    }
}

/// Why there is nothing to restore (a plain cold start, nothing failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    NoImage,
    Stale(String),
    /// The service's `state:` data moved on since the image was taken:
    /// restoring it would roll the data back.
    StateChanged {
        key: String,
        why: String,
    },
    /// Persist mode restores only the image of the last stop (or one a
    /// rollback chose explicitly).
    NotStopImage {
        key: String,
        taken: Taken,
    },
    /// This service cold-starts faster than it restores.
    ColdIsFaster(choose::ColdIsFaster),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::NoImage => write!(f, "no image"),
            Skip::Stale(why) => write!(f, "image is stale ({why})"),
            Skip::StateChanged { why, .. } => write!(f, "state changed since checkpoint ({why})"),
            Skip::ColdIsFaster(p) => write!(f, "{p}"),
            Skip::NotStopImage { taken, .. } => write!(
                f,
                "persist mode restores only a stop-time image (this one was taken {})",
                match taken {
                    Taken::Ready => "when the service was ready",
                    Taken::OnDemand => "on demand",
                    Taken::Stop => "at a stop",
                }
            ),
        }
    }
}

/// Why a restore is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A start: restore only where it beats a cold start.
    Start,
    /// `warmer bench`: restore whatever was measured before (measuring it
    /// is how an operator checks that decision).
    Measure,
}

/// Step 1: what to restore and how. The image must be current and not
/// stale; in persist mode, taken at a stop (unless a rollback pinned it);
/// and the service's `state:` data exactly as the image captured it. A warm
/// service measured to cold-start faster than it restores is not restored
/// (`run_dir` holds that measurement; a persist service always restores:
/// its memory is its state). `lazy_in_userns`: see [`choose_restore`].
pub fn plan(
    cache: &Cache,
    digest: &str,
    manifest: &crate::manifest::Manifest,
    run_dir: &Path,
    purpose: Purpose,
    lazy_in_userns: bool,
) -> Result<Result<Plan, Skip>, Failure> {
    let mode = manifest.mode;
    let entry = match cache.lookup(digest) {
        Ok(Some(e)) => e,
        Ok(None) => return Ok(Err(Skip::NoImage)),
        Err(e) => return Err(Failure::Entry(e)),
    };
    if let Some(why) = &entry.stale {
        return Ok(Err(Skip::Stale(why.clone())));
    }
    let history = choose::History::load_kept(run_dir, digest, Some((cache, &entry.key)));
    if mode == Mode::Warm && purpose == Purpose::Start {
        if let Some(v) = choose::cold_is_faster(&history, entry.meta.cold_start_ms) {
            return Ok(Err(Skip::ColdIsFaster(v)));
        }
    }
    // Nothing of an entry is read (not even restore.json) before its shape
    // holds: no symlinks, fifos or devices, no extra or missing files.
    if let Err(problem) = cache.check_shape(&entry) {
        return Err(Failure::Entry(cache::Error::Damaged {
            key: entry.key,
            problem,
        }));
    }
    let data = entry.data_dir();
    let info = crate::image::read(&data).map_err(Failure::Info)?;
    let taken = info.taken;
    let pinned = cache.pinned(digest).as_deref() == Some(entry.key.as_str());
    if mode == Mode::Persist && taken != Taken::Stop && !pinned {
        return Ok(Err(Skip::NotStopImage {
            key: entry.key,
            taken,
        }));
    }
    let put_back = match state_to_put_back(&data, manifest, &entry.key)? {
        Ok(p) => p,
        Err(skip) => return Ok(Err(skip)),
    };
    let ws = working_set::WorkingSet::load(cache, &entry.key);
    let choice = choose_restore(
        manifest.restore_mode,
        &entry,
        &history,
        info.external_mounts.is_none() || lazy_in_userns,
        ws.as_ref(),
    );
    Ok(Ok(Plan {
        pages: None,
        working_set: ws,
        deadline: manifest.restore_timeout,
        integrity: Integrity::choose(cache.stamp_valid(&entry), !put_back.is_empty()),
        put_back,
        choice,
        info,
        entry,
        quiet_background: false,
    }))
}

/// The `state:` paths that vanished (with a tmpfs) and go back with the
/// image; every other captured path must be exactly as the image has it,
/// or the image is older than the data.
fn state_to_put_back(
    data: &Path,
    manifest: &crate::manifest::Manifest,
    key: &str,
) -> Result<Result<Vec<PathBuf>, Skip>, Failure> {
    Ok(
        match crate::image::state::drift_all(data, &manifest.not_state).map_err(Failure::Drift)? {
            Drift::Same => Ok(Vec::new()),
            Drift::Vanished(paths) => Ok(paths),
            Drift::Changed(why) => Err(Skip::StateChanged {
                key: key.to_string(),
                why,
            }),
        },
    )
}

/// Step 1 for an image still arriving (`remote::stream`): restored lazily,
/// its working set first if it came with one; nothing to hash (every frame
/// and file was checked against the signed image as it arrived); its
/// `state:` data compared and put back as for any image.
pub fn plan_streamed(
    streamed: &crate::remote::stream::Streamed,
    manifest: &crate::manifest::Manifest,
) -> Result<Result<Plan, Skip>, Failure> {
    let data = streamed.data_dir();
    let info = crate::image::read(&data).map_err(Failure::Info)?;
    let put_back = match state_to_put_back(&data, manifest, &streamed.entry.key)? {
        Ok(p) => p,
        Err(skip) => return Ok(Err(skip)),
    };
    let ws = streamed.working_set.clone();
    let choice = match &ws {
        Some(w) => choose::Choice {
            lazy: true,
            working_set: true,
            reason: format!(
                "before the pull ends: its working set first ({} MB), the rest from the registry",
                w.bytes() / 1_000_000
            ),
        },
        None => choose::Choice {
            lazy: true,
            working_set: false,
            reason: "before the pull ends: lazily, from the registry".into(),
        },
    };
    Ok(Ok(Plan {
        deadline: manifest.restore_timeout,
        entry: streamed.entry.clone(),
        integrity: Integrity::Stamped,
        put_back,
        choice,
        info,
        working_set: ws,
        pages: Some(Served(streamed.frames.clone())),
        quiet_background: false,
    }))
}

/// The cache entry a restore's lessons go to: its own, or for an image that
/// was still arriving (`<digest>.0`, see [`plan_streamed`]) the entry it
/// became, once published (waited for a while: it is published as soon as
/// the rest has arrived). `None`: it never was.
pub(super) fn published_key(cache: &Cache, key: &str) -> Option<String> {
    let Some(digest) = key.strip_suffix(".0") else {
        return Some(key.to_string());
    };
    let t = Instant::now();
    loop {
        if let Ok(Some(e)) = cache.lookup(digest) {
            return Some(e.key);
        }
        if t.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Eager or lazy for this image now (see [`choose`]); the page cache is
/// looked at only when it can matter.
///
/// `userfaultfd`: whether the restored tree can open one: always in the
/// host's user namespace; in a sandbox's only with a CRIU that opens
/// `/dev/userfaultfd` ([`crate::criu::Criu::lazy_in_userns`]).
pub fn choose_restore(
    mode: crate::manifest::RestoreMode,
    entry: &Entry,
    history: &choose::History,
    userfaultfd: bool,
    ws: Option<&working_set::WorkingSet>,
) -> choose::Choice {
    if !userfaultfd {
        return choose::Choice {
            lazy: false,
            working_set: false,
            reason: format!("sandboxed: {NO_USERFAULTFD}"),
        };
    }
    let (memory, files) = choose::memory_files(entry);
    let known = ws.map(|w| choose::Known {
        bytes: w.bytes(),
        restores: w.restores,
    });
    choose::choose(
        mode,
        memory,
        known,
        &mut || choose::resident_sample(&files),
        history,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integrity_is_free_with_a_stamp_and_first_when_state_goes_back() {
        assert_eq!(Integrity::choose(true, true), Integrity::Stamped);
        assert_eq!(Integrity::choose(true, false), Integrity::Stamped);
        assert_eq!(Integrity::choose(false, true), Integrity::HashFirst);
        assert_eq!(Integrity::choose(false, false), Integrity::HashAlongside);
    }

    fn manifest(mode: Mode, lazy: bool) -> crate::manifest::Manifest {
        let text = format!(
            "exec: [a]\nready: {{tcp: \"h:1\"}}\nmode: {}\nrestore: {{lazy: {lazy}}}\n",
            if mode == Mode::Warm {
                "warm"
            } else {
                "persist"
            }
        );
        crate::manifest::Manifest::parse("web", Path::new("web.yaml"), &text).unwrap()
    }

    #[test]
    fn plan_skips_missing_and_stale_images() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path().join("c")).unwrap();
        let digest = "ab".repeat(32);
        assert!(matches!(
            plan(
                &cache,
                &digest,
                &manifest(Mode::Warm, false),
                dir.path(),
                Purpose::Start,
                false,
            ),
            Ok(Err(Skip::NoImage))
        ));
        let staging = cache.stage().unwrap();
        std::fs::write(staging.data_dir().join("core-1.img"), b"x").unwrap();
        crate::image::write(
            &staging.data_dir(),
            &crate::image::RestoreInfo {
                format_version: crate::image::RESTORE_INFO_VERSION,
                stdout: "pipe:[1]".into(),
                stderr: "pipe:[2]".into(),
                tcp_established: false,
                taken: Taken::Ready,
                external_mounts: None,
                read_only_mounts: Vec::new(),
                empty_tmpfs: Vec::new(),
            },
        )
        .unwrap();
        cache
            .publish(
                staging,
                cache::NewEntry {
                    service: "web".into(),
                    digest: digest.clone(),
                    ..Default::default()
                },
            )
            .unwrap();
        let p = plan(
            &cache,
            &digest,
            &manifest(Mode::Warm, true),
            dir.path(),
            Purpose::Start,
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.integrity, Integrity::Stamped, "just published: stamped");
        assert!(p.put_back.is_empty() && p.choice.lazy);
        assert!(
            matches!(
                plan(
                    &cache,
                    &digest,
                    &manifest(Mode::Persist, false),
                    dir.path(),
                    Purpose::Start,
                    false,
                ),
                Ok(Err(Skip::NotStopImage {
                    taken: Taken::Ready,
                    ..
                }))
            ),
            "a ready-time image is no fallback for a persist service"
        );
        cache.pin(&p.entry.key).unwrap();
        assert!(
            plan(
                &cache,
                &digest,
                &manifest(Mode::Persist, false),
                dir.path(),
                Purpose::Start,
                false,
            )
            .unwrap()
            .is_ok(),
            "unless a rollback chose it"
        );
        cache
            .mark_digest_stale(&digest, "server.py changed")
            .unwrap();
        assert_eq!(
            plan(
                &cache,
                &digest,
                &manifest(Mode::Warm, false),
                dir.path(),
                Purpose::Start,
                false,
            )
            .unwrap()
            .unwrap_err(),
            Skip::Stale("server.py changed".into())
        );
    }
}
