//! The on-disk format of warmer's own data in a cache entry, beside CRIU's
//! files. Written by the checkpoint, read by the restore, owned here (as
//! firecracker keeps its snapshot format apart from the code that uses it).
//!
//! ```text
//! <entry>/data/                   the payload the cache stores and verifies
//!   *.img                         CRIU's image files (CRIU's own format)
//!   restore.json                  RestoreInfo: what a restore needs beyond CRIU
//!   state/                        captured `state:` paths (see [`state`])
//!     index.json
//!     <n>/...
//! ```
//!
//! Every version of `restore.json` this warmer can read is listed in
//! [`read`]; an unknown `format_version` is refused (the entry is then
//! quarantined, never guessed at). [`IMAGE_FORMAT`] names the whole layout
//! and is part of every digest: a change that older readers cannot handle
//! bumps it, and only such a change invalidates existing images (an upgrade
//! of warmer itself does not: see [`crate::digest`]).

pub mod criu;
pub mod state;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The stale mark of a persist image after its one restore.
pub const RETIRED: &str = "restored once (persist mode): the next stop's checkpoint supersedes it";

/// The layout above, and what warmer gives every service that its image
/// depends on, as a whole. Part of the digest. 2: JVMs keep their perf
/// counters in memory (`JAVA_TOOL_OPTIONS`, see `service::java_tool_options`).
/// 3: every service has `WARMER_RESTORE_INFO` in its environment (see
/// `process::hooks`), and images carry `state/written.json`. 4: a sandboxed
/// service has its own /dev/shm, and its tmpfs that were empty at the dump
/// are external mounts made afresh at restore ([`EmptyTmpfs`]).
pub const IMAGE_FORMAT: u32 = 4;

/// The file name of [`RestoreInfo`] in the payload.
pub const RESTORE_INFO: &str = "restore.json";

/// The `restore.json` version this warmer writes (1 had no `taken`).
pub const RESTORE_INFO_VERSION: u32 = 2;

/// When an image was taken, which decides when it may be restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Taken {
    /// When the service first became ready (warm mode).
    Ready,
    /// By `warmer checkpoint` while the service ran.
    OnDemand,
    /// At a stop, the service's last state (persist mode).
    Stop,
}

/// What a restore needs to know beyond CRIU's own files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreInfo {
    pub format_version: u32,
    /// `pipe:[INODE]` of the service's stdout and stderr at dump time: the
    /// restore swaps them for fresh pipes (`--inherit-fd`).
    pub stdout: String,
    pub stderr: String,
    /// Dumped with `--tcp-established`: restore with it too.
    pub tcp_established: bool,
    pub taken: Taken,
    /// A sandboxed service's image: the host mounts its namespace had
    /// bound in (CRIU's external mounts), bound again at restore. `None`:
    /// the tree shared the host's mounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_mounts: Option<Vec<PathBuf>>,
    /// A sandboxed service's read-only mount points, made read-only again
    /// after CRIU (it binds external mounts with their source's flags).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_only_mounts: Vec<PathBuf>,
    /// A sandboxed service's own tmpfs that were empty while the tree was
    /// frozen: external mounts (in `external_mounts`) that the restore
    /// makes afresh, instead of CRIU packing and unpacking their (empty)
    /// contents with tar, about 4 ms each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub empty_tmpfs: Vec<EmptyTmpfs>,
}

/// An empty tmpfs of the service's namespace, made again at restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyTmpfs {
    pub path: PathBuf,
    /// The permission bits of its root (`1777` for /tmp).
    pub mode: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageFormatError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid restore.json", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has format_version {found}; this warmer reads {RESTORE_INFO_VERSION}", path.display())]
    UnknownVersion { path: PathBuf, found: u32 },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads `restore.json` from a payload directory.
pub fn read(data_dir: &Path) -> Result<RestoreInfo, ImageFormatError> {
    let path = data_dir.join(RESTORE_INFO);
    let bytes = std::fs::read(&path).map_err(|source| ImageFormatError::Read {
        path: path.clone(),
        source,
    })?;
    parse(&path, &bytes)
}

fn parse(path: &Path, bytes: &[u8]) -> Result<RestoreInfo, ImageFormatError> {
    #[derive(Deserialize)]
    struct Version {
        format_version: u32,
    }
    let parse_err = |source| ImageFormatError::Parse {
        path: path.to_path_buf(),
        source,
    };
    let v: Version = serde_json::from_slice(bytes).map_err(parse_err)?;
    match v.format_version {
        1 => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct V1 {
                #[allow(dead_code)]
                format_version: u32,
                stdout: String,
                stderr: String,
                tcp_established: bool,
            }
            let v1: V1 = serde_json::from_slice(bytes).map_err(parse_err)?;
            Ok(RestoreInfo {
                format_version: 1,
                stdout: v1.stdout,
                stderr: v1.stderr,
                tcp_established: v1.tcp_established,
                // Version 1 images were all taken when the service was ready.
                taken: Taken::Ready,
                external_mounts: None,
                read_only_mounts: Vec::new(),
                empty_tmpfs: Vec::new(),
            })
        }
        RESTORE_INFO_VERSION => serde_json::from_slice(bytes).map_err(parse_err),
        found => Err(ImageFormatError::UnknownVersion {
            path: path.to_path_buf(),
            found,
        }),
    }
}

/// Writes `restore.json` into a payload directory being staged (the cache
/// fsyncs and seals it at publish).
pub fn write(data_dir: &Path, info: &RestoreInfo) -> Result<(), ImageFormatError> {
    let path = data_dir.join(RESTORE_INFO);
    let bytes = serde_json::to_vec_pretty(info).expect("restore info serializes");
    std::fs::write(&path, bytes).map_err(|source| ImageFormatError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `restore.json` exactly as the first release (format 1) wrote it.
    const V1: &str = r#"{
  "format_version": 1,
  "stdout": "pipe:[126119]",
  "stderr": "pipe:[126120]",
  "tcp_established": false
}"#;

    fn parse_str(s: &str) -> Result<RestoreInfo, ImageFormatError> {
        parse(Path::new("restore.json"), s.as_bytes())
    }

    #[test]
    fn version_1_files_stay_readable() {
        let info = parse_str(V1).unwrap();
        assert_eq!(info.stdout, "pipe:[126119]");
        assert!(!info.tcp_established);
        assert_eq!(info.taken, Taken::Ready);
    }

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let info = RestoreInfo {
            format_version: RESTORE_INFO_VERSION,
            stdout: "pipe:[1]".into(),
            stderr: "pipe:[2]".into(),
            tcp_established: true,
            taken: Taken::Stop,
            external_mounts: Some(vec!["/dev".into(), "/tmp".into()]),
            read_only_mounts: vec!["/".into()],
            empty_tmpfs: vec![EmptyTmpfs {
                path: "/tmp".into(),
                mode: 0o1777,
            }],
        };
        write(dir.path(), &info).unwrap();
        assert_eq!(read(dir.path()).unwrap(), info);
    }

    #[test]
    fn unknown_versions_unknown_fields_and_truncation_are_refused() {
        let v9 = V1.replace("\"format_version\": 1", "\"format_version\": 9");
        assert!(matches!(
            parse_str(&v9),
            Err(ImageFormatError::UnknownVersion { found: 9, .. })
        ));
        let extra = V1.replace("\"tcp_established\"", "\"x\": 1, \"tcp_established\"");
        assert!(matches!(
            parse_str(&extra),
            Err(ImageFormatError::Parse { .. })
        ));
        assert!(matches!(
            parse_str(&V1[..V1.len() / 2]),
            Err(ImageFormatError::Parse { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read(dir.path()),
            Err(ImageFormatError::Read { .. })
        ));
    }
}
