//! warmer: cold-start a slow service once, checkpoint it with CRIU when it is
//! ready, and restore it from a digest-keyed cache on every later start.
//!
//! The library holds everything; `main.rs` only parses arguments and maps
//! errors to exit codes. Where to look:
//! - [`manifest`]: YAML -> validated manifest, positioned errors
//! - [`digest`]: the cache key and its inputs
//! - [`criu`]: locating CRIU, planning its command lines
//! - [`init`]: the service's PID namespace and its tiny init
//! - [`supervisor`]: `warmer run`, the warm path end to end
//! - [`restore`], [`checkpoint`]: the two CRIU operations
//! - [`probe`], [`notify`], [`logs`], [`signals`], [`service`], [`state`], [`status`]
pub mod bench;
pub mod cache_cmd;
pub mod checkpoint;
pub mod criu;
pub mod digest;
pub mod init;
pub mod init_loop;
pub mod logs;
pub mod manifest;
pub mod memo;
pub mod notify;
pub mod probe;
pub mod restore;
pub mod service;
pub mod signals;
pub mod state;
pub mod state_files;
pub mod status;
pub mod supervisor;
pub mod watch;
