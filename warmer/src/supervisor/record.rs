//! What a service is doing, as `warmer run` records it and `warmer status`
//! reads it: `<run-dir>/<service>/state.json`, replaced atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::process::service::StartKind;

/// The phases of one `warmer run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Cold start: waiting for the readiness probe.
    Starting,
    /// Restoring from the cache, then probing.
    Restoring,
    /// Ready and serving.
    Ready,
    /// Ready, and a checkpoint is being taken (the service keeps serving).
    Checkpointing,
    Stopping,
    /// The service exited and warmer with it.
    Stopped,
    /// warmer could not get the service ready.
    Failed,
}

impl ServiceState {
    /// Only a freshly cold-started, ready service is checkpointed: a restored
    /// one already has its image.
    pub fn can_checkpoint(self) -> bool {
        self == ServiceState::Ready
    }

    pub fn is_running(self) -> bool {
        !matches!(self, ServiceState::Stopped | ServiceState::Failed)
    }
}

/// The format of `state.json`; records without one (version 0, before it
/// was versioned) read the same. A record of a newer format is not read.
pub const RECORD_VERSION: u32 = 1;

/// The persisted record of a `warmer run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    #[serde(default)]
    pub format_version: u32,
    pub name: String,
    pub state: ServiceState,
    /// PID of the `warmer run` process.
    pub warmer_pid: u32,
    /// PID (outer namespace) of the service's init.
    pub service_pid: Option<i32>,
    pub digest: Option<String>,
    pub last_start: Option<StartKind>,
    /// From `warmer run` start to ready, for the last start.
    pub ready_ms: Option<u64>,
    /// From the moment whoever started warmer spawned it (`warmer bench`
    /// passes that moment in `WARMER_SPAWNED_AT_NS`) to ready: warmer's own
    /// exec and start-up included.
    #[serde(default)]
    pub ready_from_spawn_us: Option<u64>,
    /// The last measured cold start: this run's, or the one the restored
    /// image was made after.
    pub cold_ready_ms: Option<u64>,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    /// Set when a digest input changed while the service ran: the running
    /// service and its image no longer match the files.
    #[serde(default)]
    pub stale: Option<String>,
    /// The cache key of the image this run restored or last took.
    #[serde(default)]
    pub image: Option<String>,
    /// How the last restore was done (eager or lazy) and why.
    #[serde(default)]
    pub restore_choice: Option<crate::restore::choose::Choice>,
    /// Where the last restore's time went: (phase, ms), in order.
    #[serde(default)]
    pub breakdown: Option<Vec<(String, f64)>>,
    /// The memory CRIU wrote into the tree before it ran at the last
    /// restore (its `pages_restored`), MB.
    #[serde(default)]
    pub restored_mb: Option<f64>,
    /// RFC 3339.
    pub updated: String,
}

impl RunRecord {
    pub fn new(name: &str) -> Self {
        Self {
            format_version: RECORD_VERSION,
            name: name.to_string(),
            state: ServiceState::Starting,
            warmer_pid: std::process::id(),
            service_pid: None,
            digest: None,
            last_start: None,
            ready_ms: None,
            ready_from_spawn_us: None,
            cold_ready_ms: None,
            exit_code: None,
            message: None,
            stale: None,
            image: None,
            restore_choice: None,
            breakdown: None,
            restored_mb: None,
            updated: now(),
        }
    }

    pub fn path(run_dir: &Path, name: &str) -> PathBuf {
        run_dir.join(name).join("state.json")
    }

    /// Reads a record; `None` when there is none or it is unreadable.
    pub fn read(run_dir: &Path, name: &str) -> Option<Self> {
        let bytes = std::fs::read(Self::path(run_dir, name)).ok()?;
        serde_json::from_slice::<Self>(&bytes)
            .ok()
            .filter(|r| r.format_version <= RECORD_VERSION)
    }

    /// Writes the record (new file, then rename).
    pub fn write(&mut self, run_dir: &Path) -> std::io::Result<()> {
        self.updated = now();
        self.format_version = RECORD_VERSION;
        // Runtime state in /run: atomic, no fsync needed.
        cache::fsutil::write_atomic(
            &run_dir.join(&self.name),
            "state.json",
            &serde_json::to_vec_pretty(self).expect("record serializes"),
            0o644,
            cache::fsutil::Durability::Atomic,
        )
    }

    /// Whether the `warmer run` that wrote this is still alive.
    pub fn warmer_alive(&self) -> bool {
        let Ok(pid) = i32::try_from(self.warmer_pid) else {
            return false;
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            && std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains("warmer"))
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_ready_service_can_be_checkpointed() {
        assert!(ServiceState::Ready.can_checkpoint());
        for s in [
            ServiceState::Starting,
            ServiceState::Restoring,
            ServiceState::Checkpointing,
            ServiceState::Stopping,
            ServiceState::Stopped,
            ServiceState::Failed,
        ] {
            assert!(!s.can_checkpoint(), "{s:?}");
        }
    }

    #[test]
    fn record_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("web")).unwrap();
        let mut r = RunRecord::new("web");
        r.state = ServiceState::Ready;
        r.last_start = Some(StartKind::Restored);
        r.ready_ms = Some(84);
        r.write(dir.path()).unwrap();
        let back = RunRecord::read(dir.path(), "web").unwrap();
        assert_eq!(back, r);
        assert!(
            back.warmer_alive(),
            "this test process is a warmer test binary"
        );
    }

    #[test]
    fn records_without_a_version_read_and_newer_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("web")).unwrap();
        let mut r = RunRecord::new("web");
        r.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(RunRecord::path(dir.path(), "web")).unwrap();
        assert!(text.contains("\"format_version\": 1"), "{text}");
        let old = text.replace("\"format_version\": 1,", "");
        std::fs::write(RunRecord::path(dir.path(), "web"), &old).unwrap();
        assert!(
            RunRecord::read(dir.path(), "web").is_some(),
            "version 0 reads"
        );
        let newer = text.replace("\"format_version\": 1", "\"format_version\": 9");
        std::fs::write(RunRecord::path(dir.path(), "web"), newer).unwrap();
        assert!(
            RunRecord::read(dir.path(), "web").is_none(),
            "a newer format is not guessed at"
        );
    }
}
