use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::checksum::FileSum;

/// The metadata format this code writes and the only one it reads.
/// A reader rejects any other version (firecracker does the same with its
/// snapshot format): an unknown entry is quarantined, never guessed at.
/// Version 1 (no `generation`) is still read: its entries were migrated to
/// generation 1 of their digest.
pub const FORMAT_VERSION: u32 = 2;

/// What the caller knows about an entry it publishes.
#[derive(Debug, Clone, Default)]
pub struct NewEntry {
    pub service: String,
    pub digest: String,
    /// The inputs the digest was computed from, for humans and `cache ls`.
    pub inputs: serde_json::Value,
    /// Facts about the host the entry was made on (kernel, CRIU version, ...).
    pub host: BTreeMap<String, String>,
    /// How long the cold start took, to compare restores against.
    pub cold_start_ms: Option<u64>,
    /// Where the entry came from when it was not made here (a registry
    /// reference, an imported archive), for `cache ls`.
    pub origin: Option<String>,
    /// The payload's checksums as its maker recorded them (an entry made
    /// elsewhere): publishing fails unless the staged files match exactly.
    pub expected_files: Option<Vec<FileSum>>,
    /// Publish without fsync: for an entry that can be fetched again (a
    /// pull). A power loss before the data reached the disk leaves, at
    /// worst, an entry that fails its verification at the next boot (a
    /// stamp is good for one boot only) and is quarantined; never one that
    /// is trusted.
    pub no_sync: bool,
    /// When the entry was made, if not now (an entry made elsewhere keeps
    /// its maker's time): RFC 3339 and Unix seconds.
    pub created: Option<(String, u64)>,
}

/// `meta.json` of a published entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub format_version: u32,
    pub service: String,
    pub digest: String,
    /// The service's image generation: 1, 2, ... in the order they were made.
    #[serde(default)]
    pub generation: u64,
    pub inputs: serde_json::Value,
    /// RFC 3339, UTC, seconds.
    pub created: String,
    pub created_unix: u64,
    pub host: BTreeMap<String, String>,
    pub cold_start_ms: Option<u64>,
    /// Where an entry made elsewhere came from; absent for local ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Sum of the payload files' sizes.
    pub bytes: u64,
    pub hash: String,
    pub files: Vec<FileSum>,
}
