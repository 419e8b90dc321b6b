//! A content-addressed store of checkpoint images.
//!
//! The store knows nothing about CRIU: an entry is a directory of files (the
//! payload) published under a key (the service's digest) together with a
//! metadata file that records where the entry came from and a checksum of
//! every payload file.
//!
//! # Layout (version 2)
//!
//! ```text
//! <root>/                         0700 root
//!   VERSION                       "warmer-cache 2\n"
//!   tmp/                          staging; anything here at open() is a crash leftover
//!     stage-<pid>-<nanos>/
//!       data/ ...                 payload being written
//!       meta.json
//!   entries/
//!     <digest>.<gen>/             published, never modified in place; <gen> is the
//!                                 service's image generation (1, 2, ...)
//!       meta.json                 Meta: format_version, service, digest, generation,
//!                                 inputs, created, host facts, cold_start_ms, bytes,
//!                                 files[]
//!       data/                     the payload (CRIU image files, restore.json, state/)
//!   quarantine/
//!     <key>.<secs>.<nanos>/       entries that failed verification or restore,
//!       REASON                    kept for inspection (the newest few only)
//!   locks/
//!     <service>.lock              flock(2): one restorer/publisher/remover per service
//!     <service>.run               flock(2): held by the service's supervisor
//!   verified/
//!     <key>                       stamp: boot id + identity of every file after a
//!                                 full verification (see `stamp`)
//!   stale/
//!     <key>                       reason the entry must never be restored again
//!   pins/
//!     <digest>                    the key a rollback chose for the digest's next
//!                                 restore (else its newest generation is current)
//!   notes/
//!     <key>/<name>                what was learned about an entry after it was
//!                                 published (warmer: its restores' working set)
//!   generations/
//!     <service>                   the last generation number given (never reused)
//! ```
//!
//! Layout 1 (entries named `<digest>`, one per digest) is migrated on open:
//! each entry becomes generation 1 of its digest.
//!
//! Publishing stages the entry under `tmp/` (same filesystem), fsyncs every file
//! and directory, then renames it into `entries/` and fsyncs `entries/`: a
//! reader sees either no entry or a whole one. As in cacache, losing the race
//! to an identical key is success.
//!
//! Entries hold a service's memory (secrets) and are executed by CRIU (a
//! writable image is code execution): every directory is 0700, every file 0600,
//! all owned by the store's owner, and an entry that is not is refused.

mod checksum;
mod error;
pub mod fsutil;
mod gc;
mod key;
mod lock;
mod marks;
mod meta;
mod seal;
mod select;
mod stamp;
mod store;
mod verify;

pub use checksum::{hash_file, hash_file_with, Cores, FileSum, HASH_ALGORITHM};
pub use error::{Error, Problem};
pub use gc::{GcPolicy, GcReport, Removed};
pub use key::{make_key, split_key};
pub use lock::ServiceLock;
pub use meta::{Meta, NewEntry, FORMAT_VERSION};
pub use select::{SelectError, Target, MIN_PREFIX};
pub use store::{Cache, Entry, Listed, Staging, Verification};

/// Crash-injection points for tests (`failpoints` feature): when the
/// environment variable `CACHE_FAILPOINT` names this point, the process aborts
/// here, as a power cut or kill -9 would stop it.
#[inline]
pub(crate) fn failpoint(_name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("CACHE_FAILPOINT").is_ok_and(|v| v == _name) {
        std::process::abort();
    }
}
