//! `warmer-init SERVICE HOME -- PROGRAM [ARGS...]`: PID 1 of a service's
//! PID namespace (see `warmer::init` for the picture and `warmer::roles` for
//! the contract).
//!
//! A separate, small crate that depends on libc only and carries its own
//! pinned version: CRIU images map this binary, so an image depends on it
//! staying byte-identical; its hash is part of every digest, and keeping it
//! apart means upgrading `warmer` does not invalidate every image on the
//! machine (tested by `tests/upgrade.rs`, which builds it at two versions).

mod init_loop;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    init_loop::run(&args);
}
