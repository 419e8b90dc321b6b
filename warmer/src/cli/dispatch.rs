//! From the parsed command line to the command that runs it, and its exit
//! code.

use std::process::ExitCode;

use super::{exit, images, output, service, setup, Cli, Cmd};
use crate::dirs::Dirs;
use crate::errors::chain;
use crate::supervisor;

/// Runs the command `cli` names.
pub fn dispatch(cli: Cli) -> ExitCode {
    let dirs = Dirs::new(cli.manifest_dir, cli.cache_dir, cli.run_dir);
    match cli.cmd {
        Cmd::Run {
            service,
            cold,
            bench,
        } => service::run(&dirs, &service, supervisor::RunOptions { cold, bench }),
        Cmd::Status { service, json } => service::status(&dirs, service.as_deref(), json),
        Cmd::Validate { files } => setup::validate(&dirs, &files),
        Cmd::Check => setup::check(),
        Cmd::GenerateUnits { dir } => {
            for r in crate::commands::units::generate(&dirs.manifests, &dir) {
                if let Err(e) = r {
                    eprintln!("warmer-generator: skipped: {e}");
                }
            }
            ExitCode::from(exit::OK)
        }
        Cmd::Checkpoint { service, timeout } => service::checkpoint(&dirs, &service, timeout),
        Cmd::Rollback { service, to } => service::rollback(&dirs, &service, to),
        Cmd::Reset { service } => service::reset(&dirs, &service),
        Cmd::Cache(c) => images::cache(&dirs, c),
        Cmd::Push { service, json } => images::push(&dirs, &service, json),
        Cmd::Completions { shell } => {
            match crate::commands::docs::completions(shell, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::from(exit::OK),
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(exit::OK),
                Err(e) => {
                    eprintln!("warmer completions: {e}");
                    ExitCode::from(exit::FAILURE)
                }
            }
        }
        Cmd::Man { dir } => match crate::commands::docs::write_man_pages(&dir) {
            Ok(pages) => {
                output::emit(&format!(
                    "wrote {} man pages into {}\n",
                    pages.len(),
                    dir.display()
                ));
                ExitCode::from(exit::OK)
            }
            Err(e) => {
                eprintln!("warmer man: {}: {e}", dir.display());
                ExitCode::from(exit::FAILURE)
            }
        },
        Cmd::Keygen { prefix } => output::report(
            "keygen",
            crate::remote::sign::keygen(&prefix),
            |(key, public)| {
                format!(
                    "wrote {} (private: keep it on the signing node) and {} (give it to the nodes that verify)\n",
                    key.display(),
                    public.display()
                )
            },
        ),
        Cmd::Pull {
            service,
            timeout,
            json,
        } => images::pull(&dirs, &service, timeout, json),
        Cmd::Export { target, output } => images::export(&dirs, &target, &output),
        Cmd::Adopt {
            unit,
            exec,
            ready,
            mode,
            force,
            enable,
        } => {
            let req = crate::commands::adopt::Request {
                unit,
                exec,
                ready,
                mode,
                force,
                enable,
            };
            match crate::commands::adopt::adopt(&dirs.manifests, &req) {
                Ok(a) => {
                    print!("{}", crate::commands::adopt::render(&a, &req.unit));
                    ExitCode::from(exit::OK)
                }
                Err(e) => {
                    eprintln!("warmer adopt: {}", chain(&e));
                    ExitCode::from(exit::FAILURE)
                }
            }
        }
        Cmd::Unadopt { unit } => match crate::commands::adopt::unadopt(&unit) {
            Ok(p) => {
                println!(
                    "removed {}: {unit} runs as its package shipped it",
                    p.display()
                );
                ExitCode::from(exit::OK)
            }
            Err(e) => {
                eprintln!("warmer unadopt: {}", chain(&e));
                ExitCode::from(exit::FAILURE)
            }
        },
        Cmd::Import { file } => images::import(&dirs, &file),
        Cmd::Inspect { target, json } => output::report(
            "inspect",
            crate::commands::inspect::inspect(&dirs, &target),
            |i| {
                if json {
                    output::json(&i)
                } else {
                    crate::commands::inspect::render(&i)
                }
            },
        ),
        Cmd::Bench {
            service,
            runs,
            json,
            drop_caches,
            out,
            breakdown,
        } => service::bench(
            &dirs,
            &service,
            runs,
            json,
            drop_caches,
            breakdown,
            out.as_deref(),
        ),
    }
}
