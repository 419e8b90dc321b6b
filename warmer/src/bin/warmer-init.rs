//! `warmer-init SERVICE HOME -- PROGRAM [ARGS...]`: PID 1 of a service's
//! PID namespace (see `warmer::init` for the picture).
//!
//! A separate, small binary that depends on nothing of warmer's library:
//! CRIU images map it, so an image depends on this file staying
//! byte-identical; its hash is part of every digest, and keeping it apart
//! means upgrading `warmer` does not invalidate every image on the machine.

#[path = "../init_loop.rs"]
mod init_loop;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    init_loop::run(&args);
}
