//! The service's processes: how they are started, watched, signalled and
//! ended. Owns warmer's PID-namespace init ([`init`], [`init_loop`]), the
//! running tree ([`service`]), its output ([`logs`]), signals, readiness
//! probes, port ownership, sd_notify, leftovers of a crashed run, and the
//! binary's three roles ([`roles`]).
//!
//! May call: `manifest`, `criu` (locating CRIU for the network-lock rules),
//! `digest` (hashing helpers). Never `restore`, `checkpoint` or `supervisor`.

pub mod clock;
pub mod guard;
pub mod hooks;
pub mod init;
#[path = "../../../init/src/init_loop.rs"]
pub mod init_loop;
pub mod leftovers;
pub mod logs;
pub mod notify;
pub mod pidfile;
pub mod ports;
pub mod probe;
pub mod roles;
pub mod service;
pub mod signals;

/// The parent of process `pid`, from `/proc/PID/stat` (its fourth field:
/// `pid (comm) state ppid ...`, where comm may hold spaces and parentheses).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
