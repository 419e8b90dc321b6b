//! `warmer cache ls | verify | gc | rm`: the operator's view of the cache.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use cache::{Cache, Entry, GcPolicy, GcReport, Problem};
use serde::Serialize;

use crate::digest::short;
use crate::digest::Digester;
use crate::dirs::Dirs;
use crate::manifest::Manifest;

#[derive(Debug, thiserror::Error)]
pub enum CacheCmdError {
    #[error(transparent)]
    Cache(#[from] cache::Error),
    #[error(transparent)]
    Select(#[from] cache::SelectError),
}

/// One entry, as `cache ls --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct EntryRow {
    /// `<digest>.<generation>`: the entry's name in the cache.
    pub key: String,
    pub digest: String,
    /// The service's image generation (1, 2, ... in the order made).
    pub generation: u64,
    /// The next start of the service restores this entry: the same answer
    /// as `warmer status` gives (same planning step).
    pub next_restore: bool,
    /// For the entry of the current digest that is not restored next: why
    /// the next start is cold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cold: Option<String>,
    pub service: String,
    pub bytes: u64,
    pub created: String,
    pub cold_start_ms: Option<u64>,
    /// The digest a start of the service would use now.
    pub current: bool,
    pub stale: Option<String>,
    /// Verified (hashed) during this boot and unchanged since.
    pub verified_this_boot: bool,
    pub host: BTreeMap<String, String>,
    /// Where the entry came from if not made here (registry reference with
    /// the manifest digest, or the imported archive).
    pub origin: Option<String>,
}

/// The digest each service with a manifest would use now.
pub fn current_digests(dirs: &Dirs) -> BTreeMap<String, String> {
    let Ok(mut digester) = Digester::open(dirs) else {
        return BTreeMap::new();
    };
    std::fs::read_dir(&dirs.manifests)
        .into_iter()
        .flatten()
        .filter_map(|d| d.ok())
        .filter_map(|d| {
            let p = d.path();
            let ext = p.extension()?.to_str()?;
            if !matches!(ext, "yaml" | "yml") {
                return None;
            }
            let m = Manifest::load(&p).ok()?;
            let d = digester.digest(&m).ok()?;
            Some((m.name, d.hex))
        })
        .collect()
}

/// Entries, and the digests of entries whose metadata is damaged.
pub type Listing = (Vec<EntryRow>, Vec<(String, Problem)>);

pub fn ls(dirs: &Dirs) -> Result<Listing, CacheCmdError> {
    let cache = Cache::open(&dirs.cache)?;
    let current = current_digests(dirs);
    // What each service's next start does, asked as `status` asks it.
    let next: BTreeMap<&String, Option<crate::commands::status::NextStart>> = current
        .iter()
        .map(|(name, digest)| {
            let manifest = Manifest::find(&dirs.manifests, name).ok();
            let alive = crate::supervisor::record::RunRecord::read(&dirs.run, name)
                .is_some_and(|r| r.state.is_running() && r.warmer_alive());
            let run_dir = dirs.service_run(name);
            let n = crate::commands::status::next_start(
                manifest.as_ref(),
                Ok(&cache),
                Ok(digest),
                alive,
                Some(&run_dir),
            );
            (name, n)
        })
        .collect();
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for item in cache.list()? {
        match item {
            Ok(e) => rows.push(EntryRow {
                current: current.get(&e.meta.service) == Some(&e.meta.digest),
                verified_this_boot: cache.stamp_valid(&e),
                next_restore: next
                    .get(&e.meta.service)
                    .and_then(Option::as_ref)
                    .is_some_and(|n| n.image.as_deref() == Some(e.key.as_str())),
                next_cold: next
                    .get(&e.meta.service)
                    .and_then(Option::as_ref)
                    .filter(|n| {
                        n.action == "cold" && current.get(&e.meta.service) == Some(&e.meta.digest)
                    })
                    .map(|n| n.detail.clone()),
                key: e.key,
                generation: e.meta.generation,
                digest: e.meta.digest,
                service: e.meta.service,
                bytes: e.meta.bytes,
                created: e.meta.created,
                cold_start_ms: e.meta.cold_start_ms,
                stale: e.stale,
                host: e.meta.host,
                origin: e.meta.origin,
            }),
            Err(b) => bad.push(b),
        }
    }
    Ok((rows, bad))
}

pub fn render_ls(rows: &[EntryRow], bad: &[(String, Problem)]) -> String {
    let mut out = format!(
        "{:<16} {:>4} {:<18} {:>9} {:<21} {:>8}  {}\n",
        "IMAGE", "GEN", "SERVICE", "MB", "CREATED", "COLD_MS", "FLAGS"
    );
    for r in rows {
        let mut flags = Vec::new();
        if r.current && r.next_restore && r.stale.is_none() {
            flags.push("current (next start restores it)".to_string());
        } else if let Some(why) = r.next_cold.as_ref().filter(|_| r.current) {
            flags.push(format!("current digest (next start is cold: {why})"));
        } else if r.current {
            flags.push("current digest".to_string());
        }
        if let Some(why) = &r.stale {
            flags.push(format!("stale ({why})"));
        }
        if r.verified_this_boot {
            flags.push("verified".into());
        }
        if let Some(origin) = &r.origin {
            flags.push(format!("from {origin}"));
        }
        out.push_str(&format!(
            "{:<16} {:>4} {:<18} {:>9.1} {:<21} {:>8}  {}\n",
            short(&r.key),
            r.generation,
            r.service,
            r.bytes as f64 / 1e6,
            r.created,
            r.cold_start_ms.map(|v| v.to_string()).unwrap_or("-".into()),
            flags.join(", ")
        ));
    }
    for (digest, problem) in bad {
        out.push_str(&format!("{:<14} DAMAGED: {problem}\n", short(digest)));
    }
    out
}

/// The entries `target` names: a service's entries, or the one entry whose
/// digest starts with it. `None`: all entries.
/// Every entry, or those `target` names ([`cache::Target`]).
fn select(cache: &Cache, target: Option<&str>) -> Result<Vec<Entry>, CacheCmdError> {
    match target {
        None => Ok(cache.list()?.into_iter().flatten().collect()),
        Some(t) => Ok(cache.select(t)?),
    }
}

/// Puts the current images of `current` (service -> digest) first in
/// `entries`, the smallest working set first (every service waits least in
/// sum when the shortest reads go first); returns them.
fn boot_order(
    cache: &Cache,
    current: &BTreeMap<String, String>,
    entries: &mut [Entry],
) -> Vec<Entry> {
    let key_of = |e: &Entry| -> Option<(u64, u64)> {
        let digest = current.get(&e.meta.service)?;
        let now = cache.lookup(digest).ok()??;
        (now.key == e.key).then(|| {
            let ws = crate::restore::working_set::WorkingSet::load(cache, &e.key)
                .map_or(0, |w| w.bytes());
            (ws, e.meta.bytes)
        })
    };
    let mut keyed: Vec<(Option<(u64, u64)>, Entry)> =
        entries.iter().map(|e| (key_of(e), e.clone())).collect();
    // Current ones (Some) before the rest (None), each group stable.
    keyed.sort_by_key(|(k, _)| (k.is_none(), *k));
    for (slot, (_, e)) in entries.iter_mut().zip(&keyed) {
        *slot = e.clone();
    }
    keyed
        .into_iter()
        .filter_map(|(k, e)| k.map(|_| e))
        .collect()
}

/// Outcome of verifying one entry.
pub struct Verified {
    /// The entry's key.
    pub digest: String,
    pub service: String,
    pub bytes: u64,
    pub elapsed: Duration,
    pub problem: Option<Problem>,
}

/// Hashes every file of the selected entries (quarantining bad ones) and
/// stamps good ones for this boot. Reading the images also brings them into
/// the page cache, which is what the first restore after boot needs: so the
/// whole cache (no `target`, as at boot) is read in the order restores need
/// it (`boot_order`): first what every current image's restore reads
/// before its service runs (its CRIU metadata and working set), then the
/// current images whole, then the older generations.
pub fn verify(dirs: &Dirs, target: Option<&str>) -> Result<Vec<Verified>, CacheCmdError> {
    let cache = Cache::open(&dirs.cache)?;
    let mut out = Vec::new();
    let mut entries = select(&cache, target)?;
    if target.is_none() {
        let current = boot_order(&cache, &current_digests(dirs), &mut entries);
        let t = std::time::Instant::now();
        let mut read = 0u64;
        for entry in &current {
            if cache.check_shape(entry).is_ok() {
                read += crate::restore::working_set::read_first(&cache, entry);
            }
        }
        tracing::info!(
            "read what the restores of {} current images need first: {} MB in {} ms",
            current.len(),
            read / 1_000_000,
            t.elapsed().as_millis()
        );
    }
    for entry in entries {
        let _lock = cache.lock_service(&entry.meta.service, true)?;
        let t = std::time::Instant::now();
        let label = format!("{} {}", entry.meta.service, short(&entry.key));
        let mut last = 0u64;
        let mut progress = |done: u64, total: u64| {
            // A line per 10% of a large image.
            if total >= 64 << 20 && done * 10 / total > last {
                last = done * 10 / total;
                eprintln!(
                    "verify {label}: {}% ({} / {} MB)",
                    done * 100 / total,
                    done >> 20,
                    total >> 20
                );
                let _ = std::io::stderr().flush();
            }
        };
        let problem = cache.verify(&entry, &mut progress).err();
        if let Some(p) = &problem {
            cache.quarantine(&entry.key, &format!("cache verify: {p}"))?;
        }
        out.push(Verified {
            digest: entry.key,
            service: entry.meta.service,
            bytes: entry.meta.bytes,
            elapsed: t.elapsed(),
            problem,
        });
    }
    // Entries whose metadata is unreadable are damaged too.
    for (digest, problem) in cache.list()?.into_iter().filter_map(Result::err) {
        if target.is_none() || target.is_some_and(|t| digest.starts_with(t)) {
            cache.quarantine(&digest, &format!("cache verify: {problem}"))?;
            out.push(Verified {
                digest,
                service: String::new(),
                bytes: 0,
                elapsed: Duration::ZERO,
                problem: Some(problem),
            });
        }
    }
    Ok(out)
}

pub fn gc(dirs: &Dirs, policy: &GcPolicy) -> Result<GcReport, CacheCmdError> {
    let cache = Cache::open(&dirs.cache)?;
    let current = current_digests(dirs);
    Ok(cache.gc(policy, &|m| current.get(&m.service) == Some(&m.digest))?)
}

/// Removes the entries `target` names; returns them.
pub fn rm(dirs: &Dirs, target: &str) -> Result<Vec<Entry>, CacheCmdError> {
    let cache = Cache::open(&dirs.cache)?;
    let entries = select(&cache, Some(target))?;
    for e in &entries {
        let _lock = cache.lock_service(&e.meta.service, true)?;
        cache.remove(&e.key)?;
    }
    // A service left without images will restore none: the connections its
    // last stop's dump locked for a restore are released now (see
    // `criu::locks`), not at its next start, which may never come.
    let services: std::collections::BTreeSet<&String> =
        entries.iter().map(|e| &e.meta.service).collect();
    for service in services {
        if cache.select(service).is_err() {
            let released = crate::criu::locks::release(&dirs.service_run(service), &[]);
            if released > 0 {
                tracing::info!(
                    "{service}: removed {released} network-lock rules its removed image held"
                );
            }
        }
    }
    Ok(entries)
}

/// The report of `cache verify`, a line per entry. Returns whether any was bad.
pub fn render_verify(results: &[Verified]) -> (String, bool) {
    let mut out = String::new();
    let mut bad = false;
    for r in results {
        match &r.problem {
            None => out.push_str(&format!(
                "ok   {} {} ({:.1} MB in {} ms)\n",
                short(&r.digest),
                r.service,
                r.bytes as f64 / 1e6,
                r.elapsed.as_millis()
            )),
            Some(p) => {
                bad = true;
                out.push_str(&format!(
                    "BAD  {} {}: {p} (quarantined)\n",
                    short(&r.digest),
                    r.service
                ));
            }
        }
    }
    (out, bad)
}

/// The report of `cache gc`.
pub fn render_gc(report: &GcReport) -> String {
    let mut out = String::new();
    for r in &report.removed {
        out.push_str(&format!(
            "removed {} {} ({:.1} MB): {}\n",
            short(&r.key),
            r.service,
            r.bytes as f64 / 1e6,
            r.reason
        ));
    }
    for (d, why) in &report.skipped {
        out.push_str(&format!("skipped {}: {why}\n", short(d)));
    }
    out.push_str(&format!("{:.1} MB kept\n", report.kept_bytes as f64 / 1e6));
    out
}
