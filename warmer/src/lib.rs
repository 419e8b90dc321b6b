//! warmer: cold-start a slow service once, checkpoint it with CRIU when it is
//! ready, and restore it from a digest-keyed cache on every later start.
//!
//! The library holds everything; `main.rs` only parses arguments, prints and
//! maps errors to exit codes. Where to look:
//! - [`supervisor`]: `warmer run`, the warm path end to end
//! - [`restore`]: how a restore works, step by step (and its undo)
//! - [`checkpoint`]: how a checkpoint is taken and published
//! - [`image`]: warmer's own files inside an image (format, versions)
//! - [`state_files`]: `state:` paths captured at checkpoint, put back at restore
//! - [`digest`]: the cache key and its inputs ([`digest::Digester`])
//! - [`manifest`]: YAML -> validated manifest, positioned errors
//! - [`criu`]: locating CRIU, planning its command lines
//! - [`init`], [`roles`]: the service's PID namespace and its init; the
//!   binary's three roles and their contracts
//! - [`probe`], [`notify`], [`logs`], [`signals`], [`service`]: the parts of
//!   supervision
//! - [`state`], [`status`]: what a run records and `warmer status` shows
//! - [`restore::choose`]: eager or lazy, per image (`restore.mode`)
//! - [`remote`]: images that travel: registry push/pull, export/import
//! - [`criu_image`], [`inspect`]: CRIU's image files (types generated from
//!   its `.proto` files) and `warmer inspect`
//! - [`cache_cmd`], [`bench`]: `warmer cache ...`, `warmer bench`
//! - [`dirs`], [`errors`], [`logging`], [`memo`], [`watch`]: plumbing
/// Crash-injection points (`failpoints` feature): when `WARMER_FAILPOINT`
/// names this point the process aborts here, as a `kill -9` would stop it.
#[inline]
pub fn failpoint(_name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("WARMER_FAILPOINT").is_ok_and(|v| v == _name) {
        std::process::abort();
    }
}

pub mod backoff;
pub mod bench;
pub mod cache_cmd;
pub mod checkpoint;
pub mod control;
pub mod criu;
pub mod criu_image;
pub mod digest;
pub mod dirs;
pub mod errors;
pub mod image;
pub mod init;
#[path = "../../init/src/init_loop.rs"]
pub mod init_loop;
pub mod inspect;
pub mod leftovers;
pub mod lint;
pub mod logging;
pub mod logs;
pub mod manifest;
pub mod memo;
pub mod notify;
pub mod ports;
pub mod probe;
pub mod remote;
pub mod restore;
pub mod roles;
pub mod rollback;
pub mod service;
pub mod signals;
pub mod state;
pub mod state_files;
pub mod status;
pub mod supervisor;
pub mod units;
pub mod watch;
