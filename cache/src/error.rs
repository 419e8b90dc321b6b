use std::io;
use std::path::PathBuf;

/// Errors of the store's operations. Each carries the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cache I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cache metadata {path} is unreadable")]
    Meta {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cache at {root} has layout {found:?}, this warmer knows {expected:?}")]
    Layout {
        root: PathBuf,
        found: String,
        expected: String,
    },
    #[error("refusing the cache at {}: someone other than its user could have written it", root.display())]
    Untrusted {
        root: PathBuf,
        #[source]
        why: crate::fsutil::Untrusted,
    },
    #[error("refusing the cache at {}: {} is a {what}, not a directory", root.display(), path.display())]
    NotADirectory {
        root: PathBuf,
        path: PathBuf,
        what: &'static str,
    },
    #[error("service {service} is locked by another warmer (lock {path})")]
    Locked { service: String, path: PathBuf },
    #[error("cache entry {key} is damaged")]
    Damaged {
        key: String,
        #[source]
        problem: Problem,
    },
    #[error("invalid cache key {0:?}: expected lowercase hex")]
    BadKey(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// What is wrong with an entry. Any of these means: do not restore it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("unknown format_version {0}")]
    UnknownFormat(u32),
    #[error("metadata is missing or unreadable: {0}")]
    BadMeta(String),
    #[error("metadata names digest {found}, entry is {expected}")]
    WrongDigest { expected: String, found: String },
    #[error("{path}: missing")]
    Missing { path: String },
    #[error("{path}: size {found}, recorded {expected}")]
    Size {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error("{path}: checksum mismatch")]
    Checksum { path: String },
    #[error("{path}: not in the metadata")]
    Unexpected { path: String },
    #[error("{path}: not a regular file or directory")]
    NotRegular { path: String },
    #[error("{path}: owner uid {uid}, expected {expected}")]
    Owner {
        path: String,
        uid: u32,
        expected: u32,
    },
    #[error("{path}: mode {mode:o} allows group/other access")]
    Mode { path: String, mode: u32 },
    #[error("{path}: {error}")]
    Unreadable { path: String, error: String },
}
