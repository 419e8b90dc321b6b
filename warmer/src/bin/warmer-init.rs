//! `warmer-init SERVICE -- PROGRAM [ARGS...]`: PID 1 of a service's namespace.
//!
//! A separate, small binary (not a mode of `warmer`) because CRIU images map
//! it: an image depends on this file staying byte-identical, so its hash is
//! part of the digest, and upgrading `warmer` itself does not invalidate every
//! image on the machine. See `warmer::init`.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    warmer::init::main(&args);
}
