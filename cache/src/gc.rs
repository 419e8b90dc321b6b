//! Keeping the cache bounded.
//!
//! Order of removal: entries marked stale; entries older than `max_age`;
//! entries whose metadata is unreadable (quarantined, not deleted); then, while
//! the cache is larger than `max_bytes`, entries that are not their service's
//! current digest (oldest first), then current ones (oldest first). An entry
//! whose service lock is held (being restored or published right now) is
//! skipped and reported.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::store::{Cache, Entry};
use crate::{Error, Meta};

/// How long a partial download is kept for resuming.
const INCOMING_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Default)]
pub struct GcPolicy {
    pub max_bytes: Option<u64>,
    pub max_age: Option<Duration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Removed {
    /// The entry's key (`<digest>.<generation>`).
    pub key: String,
    pub service: String,
    pub bytes: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub removed: Vec<Removed>,
    /// (key, why it was left alone)
    pub skipped: Vec<(String, String)>,
    /// Bytes of the entries left.
    pub kept_bytes: u64,
}

/// What [`Cache::remove_for_gc`] did with an entry.
enum Gone {
    Removed(u64),
    /// Busy: left in place.
    Kept(Box<Entry>),
}

impl Cache {
    /// Applies `policy`. `is_current` says whether an entry is its service's
    /// current digest (a stale digest goes before a current one).
    pub fn gc(
        &self,
        policy: &GcPolicy,
        is_current: &dyn Fn(&Meta) -> bool,
    ) -> Result<GcReport, Error> {
        let mut report = GcReport::default();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut keep: Vec<(bool, Entry)> = Vec::new();
        for item in self.list()? {
            let entry = match item {
                Ok(e) => e,
                Err((key, problem)) => {
                    let reason = format!("unreadable: {problem}");
                    self.quarantine(&key, &reason)?;
                    report.removed.push(Removed {
                        key,
                        service: String::new(),
                        bytes: 0,
                        reason: format!("{reason} (quarantined)"),
                    });
                    continue;
                }
            };
            let age = now.saturating_sub(entry.meta.created_unix);
            let reason = if let Some(why) = &entry.stale {
                Some(format!("marked stale: {why}"))
            } else {
                policy
                    .max_age
                    .filter(|max| age > max.as_secs())
                    .map(|max| format!("older than {}", humantime::format_duration(max)))
            };
            let current = is_current(&entry.meta);
            match reason {
                Some(reason) => {
                    if let Gone::Kept(entry) = self.remove_for_gc(entry, reason, &mut report)? {
                        keep.push((current, *entry));
                    }
                }
                None => keep.push((current, entry)),
            }
        }
        if let Some(max) = policy.max_bytes {
            // Stale digests first, then oldest first.
            keep.sort_by_key(|(current, e)| (*current, e.meta.created_unix));
            let mut total: u64 = keep.iter().map(|(_, e)| e.meta.bytes).sum();
            let mut rest = Vec::new();
            for (current, entry) in keep {
                if total <= max {
                    rest.push((current, entry));
                    continue;
                }
                let what = if current { "current" } else { "stale digest" };
                let reason = format!("over --max-bytes ({what})");
                // Only bytes actually removed count: a busy entry stays, and
                // the next one in line must go instead.
                match self.remove_for_gc(entry, reason, &mut report)? {
                    Gone::Removed(bytes) => total -= bytes,
                    Gone::Kept(entry) => rest.push((current, *entry)),
                }
            }
            keep = rest;
        }
        report.kept_bytes = keep.iter().map(|(_, e)| e.meta.bytes).sum();
        // Downloads that broke off and were not resumed within a day.
        let pruned = self.prune_incoming(INCOMING_MAX_AGE)?;
        if pruned > 0 {
            report.removed.push(Removed {
                key: "incoming".into(),
                service: String::new(),
                bytes: pruned,
                reason: "partial downloads older than a day".into(),
            });
        }
        Ok(report)
    }

    fn remove_for_gc(
        &self,
        entry: Entry,
        reason: String,
        report: &mut GcReport,
    ) -> Result<Gone, Error> {
        let _lock = match self.lock_service(&entry.meta.service, false) {
            Ok(l) => l,
            Err(Error::Locked { .. }) => {
                report.skipped.push((
                    entry.key.clone(),
                    "service busy (restoring or publishing)".into(),
                ));
                return Ok(Gone::Kept(Box::new(entry)));
            }
            Err(e) => return Err(e),
        };
        self.remove(&entry.key)?;
        let bytes = entry.meta.bytes;
        report.removed.push(Removed {
            key: entry.key,
            service: entry.meta.service,
            bytes,
            reason,
        });
        Ok(Gone::Removed(bytes))
    }
}
