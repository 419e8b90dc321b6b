//! "Verified since boot" stamps.
//!
//! Hashing a large image on every restore costs tens of milliseconds. After a
//! full verification (at publish, or by `warmer cache verify` at boot, when
//! reading the image warms the page cache anyway) a stamp records the boot it
//! happened in and the identity of every file: inode, size, mtime, ctime,
//! owner and mode. A restore in the same boot whose files all still match the
//! stamp needs no hashing: any write, truncate, chmod, chown or replacement
//! changes ctime or the inode, and ctime cannot be set from user space (only
//! by changing the system clock, which is root's). A stamp from another boot
//! is ignored: a reboot may have followed offline tampering or disk errors.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use crate::fsutil::boot_id;
use crate::fsutil::FileIdentity;

/// Identity of one file at verification time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: String,
    // Not `#[serde(flatten)]`: flattening buffers values, and its buffer has
    // no i128 (the nanosecond times).
    pub id: FileIdentity,
}

impl FileId {
    pub fn of(path: &str, md: &fs::Metadata) -> Self {
        Self {
            path: path.to_string(),
            id: FileIdentity::of(md),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub boot_id: String,
    /// meta.json first, then every payload file in metadata order.
    pub files: Vec<FileId>,
}

/// The current identities of an entry's files, in stamp order. `None` if any
/// is missing.
pub fn current(entry_dir: &Path, files: &[String]) -> Option<Vec<FileId>> {
    let mut out = Vec::with_capacity(files.len() + 1);
    let meta = fs::symlink_metadata(entry_dir.join("meta.json")).ok()?;
    out.push(FileId::of("meta.json", &meta));
    for f in files {
        let md = fs::symlink_metadata(entry_dir.join("data").join(f)).ok()?;
        out.push(FileId::of(f, &md));
    }
    Some(out)
}
