//! The `warmer` binary: the role this process was started in (warmer-init's
//! loop, a CRIU action script, the stop guard), else the command line
//! (`warmer::cli`: its definition, and one module per group of commands).

use std::process::ExitCode;

use warmer::errors::chain;
use warmer::logging;
use warmer::process::roles::Role;

fn main() -> ExitCode {
    match warmer::process::roles::this_process() {
        Role::Init(args) => warmer::process::init_loop::run(&args),
        Role::ActionScript(req) => {
            return match warmer::image::state::hook(&req) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("warmer (CRIU action script): {}", chain(&e));
                    ExitCode::FAILURE
                }
            };
        }
        Role::Guard {
            service,
            home,
            cache,
        } => return warmer::process::guard::run(&service, &home, &cache),
        Role::Cli => {}
    }
    logging::init();
    warmer::cli::dispatch::dispatch(warmer::cli::parse())
}
