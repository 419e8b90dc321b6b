//! warmer: cold-start a slow service once, checkpoint it with CRIU when it is
//! ready, and restore it from a digest-keyed cache on every later start.
//!
//! The library holds everything, the command line too ([`cli`]: parsing,
//! printing, exit codes); `main.rs` only picks the process's role. Folders by concern; imports point one way, from the
//! top of this list down (a module never takes a type from one above it):
//!
//! ```text
//!  cli           the command line: parsing, dispatch, printing, exit codes
//!     │
//!  commands/     the CLI's verbs: status, cache, rollback, inspect, validate, bench, units
//!     │
//!  supervisor/   `warmer run`: set-up, inputs, warm start, cold start,
//!     │          checkpointing, the loop; its policies as pure functions
//!     │
//!  restore/  checkpoint   remote/          how a restore / a checkpoint works;
//!     │          │          │              images that travel
//!  process/   image/    digest/   criu    the parts: the service's processes,
//!     │          │          │       │      the image on disk, the cache key, CRIU
//!  sandbox/                                its user, credentials and namespaces
//!  manifest/  memo  dirs  errors  logging  formats and plumbing
//! ```
//!
//! Where to look:
//! - "how does restore work": [`restore`] (steps 1-6 and the undo)
//! - "how does a checkpoint get taken": [`checkpoint`]
//! - "what is on disk": [`image`] (warmer's files in an image, state
//!   captures, CRIU's own files) and the `cache` crate (the store)
//! - "what decides restore or cold, checkpoint or not": [`supervisor::policy`]
//! - "how does a service run as its unit's user, in its sandbox": [`sandbox`]
/// Crash-injection points (`failpoints` feature): when `WARMER_FAILPOINT`
/// names this point the process aborts here, as a `kill -9` would stop it.
#[inline]
pub fn failpoint(_name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("WARMER_FAILPOINT").is_ok_and(|v| v == _name) {
        std::process::abort();
    }
}

/// Like [`failpoint`], but the failure is an error to handle: `Err` when
/// `WARMER_FAILPOINT` names this point (in a build with `failpoints`).
pub fn failpoint_result(_name: &str) -> Result<(), String> {
    #[cfg(feature = "failpoints")]
    if std::env::var("WARMER_FAILPOINT").is_ok_and(|v| v == _name) {
        return Err(format!("failpoint {_name}"));
    }
    Ok(())
}

pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod criu;
pub mod digest;
pub mod dirs;
pub mod errors;
pub mod image;
pub mod logging;
pub mod manifest;
pub mod memo;
pub mod process;
pub mod remote;
pub mod restore;
pub mod sandbox;
pub mod supervisor;
