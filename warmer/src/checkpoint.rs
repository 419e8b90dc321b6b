//! Checkpointing a ready service into the cache, while it keeps running.
//!
//! CRIU dumps the tree with `--leave-running` into a staging directory of the
//! cache; warmer adds `restore.json`; the cache seals and publishes it
//! atomically. A failed dump leaves the service running untouched (CRIU
//! resumes it) and the staging directory is removed.

use std::path::{Path, PathBuf};

use cache::{Cache, Entry, NewEntry};

use crate::criu::{self, Criu, CriuError, DumpPlan};
use crate::digest::{HostFacts, ServiceDigest};
use crate::image::{ImageFormatError, RestoreInfo, Taken, RESTORE_INFO_VERSION};
use crate::manifest::Manifest;
use crate::process::service::Running;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot stage the image")]
    Cache(#[from] cache::Error),
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("cannot write the image's restore information")]
    Info(#[source] ImageFormatError),
    #[error("cannot list the sandbox's mounts")]
    Sandbox(#[source] crate::sandbox::SandboxError),
    #[error("cannot locate warmer itself (CRIU's action script)")]
    Exe(#[source] std::io::Error),
    #[error("the service's TCP connections: {peers}")]
    Connected {
        peers: String,
        #[source]
        source: CriuError,
    },
}

pub struct Checkpoint<'a> {
    pub criu: &'a Criu,
    pub cache: &'a Cache,
    pub manifest: &'a Manifest,
    pub digest: &'a ServiceDigest,
    pub host: &'a HostFacts,
    pub run_dir: &'a Path,
    pub cold_start_ms: u64,
    pub taken: Taken,
}

impl Checkpoint<'_> {
    /// Dumps `running` and publishes the image as a new generation. Returns
    /// the new entry. A stop-time checkpoint (`Taken::Stop`) ends the tree;
    /// `deadline` bounds the dump (CRIU is killed past it).
    pub fn take(
        &self,
        running: &Running,
        deadline: Option<std::time::Duration>,
    ) -> Result<Entry, CheckpointError> {
        // A crash during an earlier dump can leave CRIU's /proc mount point
        // behind in the init's cwd; its mkdir would then fail with EEXIST.
        let _ = std::fs::remove_dir(self.run_dir.join("proc.crtools"));
        let staging = self.cache.stage()?;
        // Publishing and pruning must not race a gc or rm of this service.
        let _lock = self.cache.lock_service(&self.manifest.name, true)?;
        // CRIU execs the action script without a shell or arguments: the
        // script is warmer itself, told by the environment what to do. It
        // runs at every dump: `state:` paths are captured, and every file
        // the tree holds open for writing is fingerprinted, while the tree
        // is frozen (see `image::state`).
        let exe = std::env::current_exe().map_err(CheckpointError::Exe)?;
        let action_script = Some(exe.to_string_lossy().into_owned());
        let mut mounts = if self.manifest.sandbox.is_some() {
            sandbox_externals(running.pid.as_raw()).map_err(CheckpointError::Sandbox)?
        } else {
            NamespaceMounts::default()
        };
        // Only where a failed dump can be taken again (the service keeps
        // running): a stop-time dump packs every tmpfs.
        if self.taken == Taken::Stop {
            mounts.empty_tmpfs.clear();
        }
        // The connections this dump may lock (to clean up only theirs).
        let conns = if self.manifest.checkpoint.tcp_established {
            crate::process::ports::established(running.pid)
        } else {
            Vec::new()
        };
        let (plan, dumped) = loop {
            let mut external_mounts = mounts.binds.clone();
            external_mounts.extend(mounts.empty_tmpfs.iter().map(|t| t.path.clone()));
            let plan = DumpPlan {
                pid: running.pid.as_raw(),
                images_dir: staging.data_dir(),
                work_dir: self.run_dir.to_path_buf(),
                log_name: "dump.log".into(),
                tcp_established: self.manifest.checkpoint.tcp_established,
                leave_running: self.taken != Taken::Stop,
                action_script: action_script.clone(),
                external_mounts,
            };
            let mut cmd = self.criu.command();
            cmd.args(criu::dump_args(&plan));
            cmd.envs(crate::process::roles::action_script_env(
                &self.manifest.state,
            ));
            let root = format!("/proc/{}/root", running.pid.as_raw());
            cmd.envs(crate::process::roles::empty_tmpfs_env(
                &mounts
                    .empty_tmpfs
                    .iter()
                    .map(|t| Path::new(&root).join(t.path.strip_prefix("/").unwrap_or(&t.path)))
                    .collect::<Vec<_>>(),
            ));
            let dumped =
                self.criu
                    .run_command("dump", cmd, &self.run_dir.join("dump.log"), deadline);
            if dumped.is_err() && plan.tcp_established {
                let n = criu::clear_network_locks(&conns);
                if n > 0 {
                    tracing::warn!("removed {n} network-lock rules the failed dump left");
                }
            }
            // A tmpfs written between the look and the freeze fails the
            // dump (the action script checks it frozen): once more, with
            // every tmpfs's content in the image.
            if dumped.is_err() && !mounts.empty_tmpfs.is_empty() {
                tracing::warn!(
                    "checkpoint failed with the empty tmpfs made external: once more with their contents in the image"
                );
                mounts.empty_tmpfs.clear();
                clear_dir(&staging.data_dir());
                continue;
            }
            break (plan, dumped);
        };
        if let Err(CriuError::Failed { tail, .. }) = &dumped {
            if tail.contains("Connected TCP socket") {
                // Name the peers: the hint alone cannot tell whose they are.
                let peers = crate::process::ports::connections(running.pid)
                    .iter()
                    .map(|(c, st)| format!("{} -> {} ({st})", c.a, c.b))
                    .collect::<Vec<_>>();
                return Err(CheckpointError::Connected {
                    peers: if peers.is_empty() {
                        "none left by now".into()
                    } else {
                        peers.join(", ")
                    },
                    source: dumped.expect_err("matched an error"),
                });
            }
        }
        dumped?;
        if plan.tcp_established && !plan.leave_running {
            if let Err(e) = criu::locks::record(self.run_dir, &conns) {
                tracing::warn!("cannot record the connections the dump locked: {e}");
            }
        }
        crate::failpoint("checkpoint-after-dump");
        let info = RestoreInfo {
            format_version: RESTORE_INFO_VERSION,
            stdout: running.output.stdout.resource().to_string(),
            stderr: running.output.stderr.resource().to_string(),
            tcp_established: plan.tcp_established,
            taken: self.taken,
            external_mounts: self
                .manifest
                .sandbox
                .is_some()
                .then(|| plan.external_mounts.clone()),
            read_only_mounts: mounts.read_only,
            empty_tmpfs: mounts.empty_tmpfs,
        };
        crate::image::write(&staging.data_dir(), &info).map_err(CheckpointError::Info)?;
        let entry = self.cache.publish(
            staging,
            NewEntry {
                service: self.manifest.name.clone(),
                digest: self.digest.hex.clone(),
                inputs: serde_json::to_value(&self.digest.inputs).expect("inputs serialize"),
                host: self.host.as_map(),
                cold_start_ms: Some(self.cold_start_ms),
                ..NewEntry::default()
            },
        )?;
        let removed = self.cache.prune_service(
            &self.manifest.name,
            usize::try_from(self.manifest.keep).unwrap_or(usize::MAX),
            Some(&entry.key),
        )?;
        for d in removed {
            tracing::info!("removed old image {}", crate::digest::short(&d));
        }
        Ok(entry)
    }
}

/// What a dump needs to know of a sandboxed tree's mount namespace.
#[derive(Debug, Default)]
struct NamespaceMounts {
    /// The host mounts bound in (CRIU's external mounts).
    binds: Vec<PathBuf>,
    /// Its read-only mount points.
    read_only: Vec<PathBuf>,
    /// Its own tmpfs that are empty now (checked again, frozen, by the
    /// action script).
    empty_tmpfs: Vec<crate::image::EmptyTmpfs>,
}

/// The mounts of the namespace of the tree rooted at `init`.
fn sandbox_externals(init: i32) -> Result<NamespaceMounts, crate::sandbox::SandboxError> {
    let path = PathBuf::from(format!("/proc/{init}/mountinfo"));
    let text = std::fs::read_to_string(&path)
        .map_err(|source| crate::sandbox::SandboxError::Read { path, source })?;
    let ns = crate::sandbox::mounts::parse_mountinfo(&text);
    let host = crate::sandbox::host_mounts()?;
    let ext = crate::sandbox::mounts::externals(&ns, &host);
    if let Some(bad) = ext.iter().find(|p| !crate::sandbox::mounts::usable_key(p)) {
        return Err(crate::sandbox::SandboxError::Path(bad.clone()));
    }
    let root = PathBuf::from(format!("/proc/{init}/root"));
    let mut empty_tmpfs = Vec::new();
    for p in crate::sandbox::mounts::own_tmpfs(&text, &host) {
        if !crate::sandbox::mounts::usable_key(&p) {
            continue;
        }
        let inside = root.join(p.strip_prefix("/").unwrap_or(&p));
        let empty = std::fs::read_dir(&inside).is_ok_and(|mut d| d.next().is_none());
        if let (true, Ok(md)) = (empty, std::fs::metadata(&inside)) {
            use std::os::unix::fs::PermissionsExt;
            empty_tmpfs.push(crate::image::EmptyTmpfs {
                path: p,
                mode: md.permissions().mode() & 0o7777,
            });
        }
    }
    Ok(NamespaceMounts {
        binds: ext,
        read_only: crate::sandbox::mounts::read_only(&ns),
        empty_tmpfs,
    })
}

/// Removes what a failed dump left in the images directory.
fn clear_dir(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}
