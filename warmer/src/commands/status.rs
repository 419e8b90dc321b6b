//! `warmer status`: what each service is doing and what the cache holds for it.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;

use crate::digest::Digester;
use crate::dirs::Dirs;
use crate::manifest::{Manifest, Mode};
use crate::process::service::StartKind;
use crate::supervisor::record::{RunRecord, ServiceState};

#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub digest: String,
    /// `<digest>.<generation>`.
    pub key: String,
    pub generation: u64,
    pub bytes: u64,
    pub created: String,
}

/// One service, as `status --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    /// starting, restoring, ready, checkpointing, stopping, stopped, failed
    pub state: ServiceState,
    pub last_start: Option<StartKind>,
    pub ready_ms: Option<u64>,
    pub cold_ready_ms: Option<u64>,
    /// The published image for the service's current digest, if any.
    pub image: Option<ImageInfo>,
    /// The service's main process (as seen from here).
    pub pid: Option<i32>,
    /// Its namespace init, `warmer-init` (the root of what CRIU dumps).
    pub init_pid: Option<i32>,
    pub digest: Option<String>,
    pub message: Option<String>,
    /// Why the running service (or its image) no longer matches its inputs.
    pub stale: Option<String>,
    /// warm or persist (from the manifest).
    pub mode: Option<Mode>,
    /// What the next start will do, and why.
    pub next_start: Option<NextStart>,
}

/// What the next start of a service will do.
#[derive(Debug, Clone, Serialize)]
pub struct NextStart {
    /// `restore` or `cold`.
    pub action: &'static str,
    /// Which image, or why cold.
    pub detail: String,
    /// The cache key of the image it restores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl NextStart {
    fn restore(detail: String, image: Option<String>) -> Option<Self> {
        Some(Self {
            action: "restore",
            detail,
            image,
        })
    }
    fn cold(detail: impl Into<String>) -> Option<Self> {
        Some(Self {
            action: "cold",
            detail: detail.into(),
            image: None,
        })
    }
}

/// The cache as `status` and `cache ls` could open it, or why not.
pub type CacheView = Result<cache::Cache, String>;

/// Opens the cache for reading only (opening creates a missing one), or says
/// why there is none to read.
pub fn open_cache(dirs: &Dirs) -> CacheView {
    match std::fs::metadata(dirs.cache.join("VERSION")) {
        Ok(_) => {}
        // The cache is root's and 0700: a user can see it is there, not in it.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(format!(
                "cannot read the image cache {} as uid {} (it is root's: run as root)",
                dirs.cache.display(),
                nix::unistd::geteuid()
            ))
        }
        Err(_) => {
            return Err(format!(
                "no image cache at {} yet (none was ever taken)",
                dirs.cache.display()
            ))
        }
    }
    cache::Cache::open(&dirs.cache).map_err(|e| {
        format!(
            "cannot open the image cache {}: {}",
            dirs.cache.display(),
            crate::errors::chain(&e)
        )
    })
}

/// What the next start of the service does, from the same planning step a
/// start runs (`status` and `cache ls` both ask this). `digest`: the digest
/// a start would use, or why there is none.
pub fn next_start(
    manifest: Option<&Manifest>,
    cache: Result<&cache::Cache, &str>,
    digest: Result<&str, &str>,
    alive: bool,
    run_dir: Option<&Path>,
) -> Option<NextStart> {
    let m = manifest?;
    if !m.checkpoint.enabled {
        return NextStart::cold("checkpoint.enabled is false");
    }
    let cache = match cache {
        Ok(c) => c,
        Err(why) => return NextStart::cold(why),
    };
    let digest = match digest {
        Ok(d) => d,
        Err(why) => return NextStart::cold(why),
    };
    if m.mode == Mode::Persist && alive {
        return NextStart::restore(
            "the state at stop, once the stop-time checkpoint completes; after a crash or kill: cold, on the current data".into(),
            None,
        );
    }
    let run_dir = run_dir?;
    // Whether a sandboxed image could restore lazily: asked of the CRIU a
    // start would use (remembered per boot, as a start does).
    let lazy_in_userns = m.sandbox.is_some()
        && run_dir
            .parent()
            .is_some_and(crate::criu::Criu::located_lazy_in_userns);
    let start = crate::restore::Purpose::Start;
    match crate::restore::plan(cache, digest, m, run_dir, start, lazy_in_userns) {
        Ok(Ok(plan)) => NextStart::restore(
            format!(
                "image {} (generation {}, taken {}), {}",
                crate::digest::short(&plan.entry.key),
                plan.entry.meta.generation,
                plan.entry.meta.created,
                plan.choice
            ),
            Some(plan.entry.key.clone()),
        ),
        Ok(Err(crate::restore::Skip::NoImage)) => {
            let restores = crate::supervisor::backoff::Failures::load_kind(
                run_dir,
                crate::supervisor::backoff::Kind::Restore,
            );
            let checkpoints = crate::supervisor::backoff::Failures::load(run_dir);
            match restores.skip(digest).or_else(|| checkpoints.skip(digest)) {
                Some(why) => NextStart::cold(format!("no image, and none will be taken: {why}")),
                None if restores.digest == digest => NextStart::cold(format!(
                    "no image (the last restore failed: {}); the next cold start takes a new one",
                    restores.last
                )),
                None => NextStart::cold("no image"),
            }
        }
        Ok(Err(skip)) => NextStart::cold(skip.to_string()),
        Err(failure) => NextStart::cold(crate::errors::chain(&failure)),
    }
}

/// Service names known from manifests and from run records.
fn known_services(dirs: &Dirs) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let stems = |dir: &Path, want: &dyn Fn(&Path) -> Option<String>| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|d| d.ok())
            .filter_map(|d| want(&d.path()))
            .collect()
    };
    names.extend(stems(&dirs.manifests, &|p| {
        let ext = p.extension()?.to_str()?;
        matches!(ext, "yaml" | "yml").then(|| p.file_stem()?.to_str().map(String::from))?
    }));
    names.extend(stems(&dirs.run, &|p| {
        p.join("state.json")
            .exists()
            .then(|| p.file_name()?.to_str().map(String::from))?
    }));
    names
}

pub fn collect(dirs: &Dirs, only: Option<&str>) -> Vec<ServiceStatus> {
    let names: Vec<String> = match only {
        Some(n) => vec![n.to_string()],
        None => known_services(dirs).into_iter().collect(),
    };
    let cache = open_cache(dirs);
    let mut digester = Digester::open(dirs)
        .map_err(|e| format!("no digest, so no image: {}", crate::errors::chain(&e)));
    names
        .into_iter()
        .map(|name| one(dirs, &name, cache.as_ref(), digester.as_mut()))
        .collect()
}

fn one(
    dirs: &Dirs,
    name: &str,
    cache: Result<&cache::Cache, &String>,
    digester: Result<&mut Digester, &mut String>,
) -> ServiceStatus {
    let record = RunRecord::read(&dirs.run, name);
    let alive = record.as_ref().is_some_and(|r| r.warmer_alive());
    let state = match &record {
        Some(r) if r.state.is_running() && !alive => ServiceState::Stopped,
        Some(r) => r.state,
        None => ServiceState::Stopped,
    };
    let manifest = Manifest::find(&dirs.manifests, name).ok();
    // A running service runs on the digest it started with; otherwise the
    // digest a start would use now (so a changed binary shows no image).
    let digest: Result<String, String> = match (&record, manifest.as_ref(), digester) {
        (Some(r), _, _) if alive => r
            .digest
            .clone()
            .ok_or_else(|| "the running service has no digest (see its log)".to_string()),
        (_, None, _) => Err("no manifest".to_string()),
        (_, Some(_), Err(why)) => Err(why.clone()),
        (_, Some(m), Ok(d)) => d
            .digest(m)
            .map(|d| d.hex)
            .map_err(|e| format!("no digest, so no image: {}", crate::errors::chain(&e))),
    };
    let service_run = dirs.service_run(name);
    let next = next_start(
        manifest.as_ref(),
        cache.map_err(String::as_str),
        digest.as_deref().map_err(String::as_str),
        alive,
        Some(service_run.as_path()),
    );
    let cache = cache.ok();
    let digest = digest.ok();
    let entry = cache
        .zip(digest.as_deref())
        .and_then(|(c, d)| c.lookup(d).ok().flatten());
    let image = entry
        .as_ref()
        .filter(|e| e.stale.is_none())
        .map(|e| ImageInfo {
            digest: e.meta.digest.clone(),
            key: e.key.clone(),
            generation: e.meta.generation,
            bytes: e.meta.bytes,
            created: e.meta.created.clone(),
        });
    let cold_ready_ms = record
        .as_ref()
        .and_then(|r| r.cold_ready_ms)
        .or_else(|| entry.as_ref().and_then(|e| e.meta.cold_start_ms));
    ServiceStatus {
        name: name.to_string(),
        state,
        last_start: record.as_ref().and_then(|r| r.last_start),
        ready_ms: record.as_ref().and_then(|r| r.ready_ms),
        cold_ready_ms,
        image,
        pid: record
            .as_ref()
            .filter(|_| alive)
            .and_then(|r| r.service_pid)
            .and_then(crate::process::service::main_pid),
        init_pid: record
            .as_ref()
            .filter(|_| alive)
            .and_then(|r| r.service_pid),
        digest,
        stale: record
            .as_ref()
            .filter(|_| alive)
            .and_then(|r| r.stale.clone())
            // A persist image retired by its one restore is not stale news.
            .or_else(|| {
                entry
                    .as_ref()
                    .and_then(|e| e.stale.clone())
                    .filter(|s| !s.starts_with(crate::image::RETIRED))
            }),
        message: record.and_then(|r| r.message),
        mode: manifest.map(|m| m.mode),
        next_start: next,
    }
}

/// The human table.
pub fn render(rows: &[ServiceStatus]) -> String {
    let mut out = format!(
        "{:<20} {:<8} {:<13} {:<9} {:>9} {:>9}  {}\n",
        "SERVICE", "MODE", "STATE", "START", "READY_MS", "COLD_MS", "IMAGE"
    );
    let dash = || "-".to_string();
    for r in rows {
        let mut state = serde_json::to_value(r.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        if r.stale.is_some() {
            state.push_str(" (stale)");
        }
        let start = r
            .last_start
            .map(|k| match k {
                StartKind::Cold => "cold".to_string(),
                StartKind::Restored => "restored".to_string(),
            })
            .unwrap_or_else(dash);
        let image = r
            .image
            .as_ref()
            .map(|i| {
                format!(
                    "{} ({} MB, {})",
                    crate::digest::short(&i.key),
                    i.bytes / 1_000_000,
                    i.created
                )
            })
            .unwrap_or_else(|| "none".to_string());
        let mode = match r.mode {
            Some(Mode::Warm) => "warm",
            Some(Mode::Persist) => "persist",
            None => "-",
        };
        out.push_str(&format!(
            "{:<20} {:<8} {:<13} {:<9} {:>9} {:>9}  {}\n",
            r.name,
            mode,
            state,
            start,
            r.ready_ms.map(|v| v.to_string()).unwrap_or_else(dash),
            r.cold_ready_ms.map(|v| v.to_string()).unwrap_or_else(dash),
            image
        ));
        if let Some(n) = &r.next_start {
            out.push_str(&indented(&format!("next start: {}: ", n.action), &n.detail));
        }
        if let Some(m) = &r.message {
            out.push_str(&indented("last: ", m));
        }
    }
    out
}

/// `label` and `text` under the table's first column; a text of several
/// lines (CRIU's log tail) keeps them, each indented under the first, and
/// control characters (from a log, a file name in an image) are escaped.
fn indented(label: &str, text: &str) -> String {
    let pad = " ".repeat(21 + label.len());
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        let safe: String = line.chars().flat_map(char::escape_debug).collect();
        let safe = safe.replace("\\\"", "\"").replace("\\'", "'");
        if i == 0 {
            out.push_str(&format!("{:<20} {label}{safe}\n", ""));
        } else {
            out.push_str(&format!("{pad}{}\n", safe.trim_start()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::indented;

    #[test]
    fn a_multi_line_message_stays_under_its_label_and_escapes_control_bytes() {
        let text = indented(
            "last: ",
            "restore failed: criu\n  2: Error (x)\nhint: \u{1b}]0;pwned\u{7}",
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with(&format!("{:<20} last: restore failed", "")));
        assert!(lines[1].starts_with(&" ".repeat(27)) && lines[1].ends_with("2: Error (x)"));
        assert!(
            !text.contains('\u{1b}') && lines[2].contains("\\u{1b}"),
            "{text}"
        );
    }
}
