//! The commands that move images: the cache's, and to and from registries
//! and archives.

use std::process::ExitCode;

use super::exit;
use super::output::{self, emit, mb};
use super::CacheCmd;
use crate::dirs::Dirs;
use crate::errors::chain;
use crate::logging;

/// `warmer cache ls|verify|gc|rm`.
pub fn cache(dirs: &Dirs, cmd: CacheCmd) -> ExitCode {
    use crate::commands::cache as cc;
    let fail = |e: cc::CacheCmdError| {
        eprintln!("warmer: {}", chain(&e));
        ExitCode::from(exit::FAILURE)
    };
    match cmd {
        CacheCmd::Ls { json } => match cc::ls(dirs) {
            Ok((rows, bad)) if json => {
                emit(&output::json(&rows));
                for (d, p) in &bad {
                    eprintln!("warmer: damaged entry {d}: {p}");
                }
                ExitCode::from(exit::OK)
            }
            Ok((rows, bad)) => {
                emit(&cc::render_ls(&rows, &bad));
                ExitCode::from(exit::OK)
            }
            Err(e) => fail(e),
        },
        CacheCmd::Verify { target } => match cc::verify(dirs, target.as_deref()) {
            Ok(results) => {
                let (text, bad) = cc::render_verify(&results);
                emit(&text);
                ExitCode::from(if bad { exit::FAILURE } else { exit::OK })
            }
            Err(e) => fail(e),
        },
        CacheCmd::Gc {
            max_bytes,
            max_age,
            json,
        } => match cc::gc(dirs, &cache::GcPolicy { max_bytes, max_age }) {
            Ok(report) => {
                emit(&if json {
                    output::json(&report)
                } else {
                    cc::render_gc(&report)
                });
                ExitCode::from(exit::OK)
            }
            Err(e) => fail(e),
        },
        CacheCmd::Rm { target } => match cc::rm(dirs, &target) {
            Ok(entries) => {
                let lines: String = entries
                    .iter()
                    .map(|e| {
                        format!(
                            "removed {} {}\n",
                            crate::digest::short(&e.key),
                            e.meta.service
                        )
                    })
                    .collect();
                emit(&lines);
                ExitCode::from(exit::OK)
            }
            Err(e) => fail(e),
        },
    }
}

/// `warmer push`: the service's current image to its registry.
pub fn push(dirs: &Dirs, service: &str, json: bool) -> ExitCode {
    logging::set_service(service);
    match crate::remote::push_service(dirs, service, &mut |p| eprintln!("push: {p}")) {
        Ok(p) if json => {
            emit(&output::json(&p));
            ExitCode::from(exit::OK)
        }
        Ok(p) => {
            emit(&format!(
                "pushed {} ({}): {} of images, {} as blobs, {} sent ({} of {} blobs already there) in {} ms\n",
                p.reference,
                p.manifest_digest,
                mb(p.raw_bytes),
                mb(p.wire_bytes),
                mb(p.sent_bytes),
                p.blobs_present,
                p.blobs,
                p.ms
            ));
            if !p.signed {
                eprintln!("warmer push: warning: the image is not signed (no remote.sign key): nodes that verify will refuse it");
            }
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("warmer push: {}", chain(&e));
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// `warmer pull`: the image the service's manifest asks for, from its registry.
pub fn pull(
    dirs: &Dirs,
    service: &str,
    timeout: Option<std::time::Duration>,
    json: bool,
) -> ExitCode {
    use crate::remote::PullOutcome;
    logging::set_service(service);
    match crate::remote::pull_service(dirs, service, timeout, &mut |p| eprintln!("pull: {p}")) {
        Ok(p) if json => {
            emit(&output::json(&p));
            ExitCode::from(exit::OK)
        }
        Ok(PullOutcome::Present(key)) => {
            emit(&format!("already in the cache: {key}\n"));
            ExitCode::from(exit::OK)
        }
        Ok(PullOutcome::Pulled(p)) => {
            emit(&format!(
                "pulled {} ({}) as {}: {} fetched, {} of images, in {} ms\n",
                p.reference,
                p.manifest_digest,
                p.key,
                mb(p.fetched_bytes),
                mb(p.raw_bytes),
                p.ms
            ));
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("warmer pull: {}", chain(&e));
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// `warmer export`: an image into an archive file.
pub fn export(dirs: &Dirs, target: &str, output: &std::path::Path) -> ExitCode {
    output::report("export", crate::remote::export(dirs, target, output), |x| {
        format!(
            "exported {} to {}: {} of images in a {} archive\n",
            x.key,
            x.path.display(),
            mb(x.raw_bytes),
            mb(x.archive_bytes)
        )
    })
}

/// `warmer import`: an archive file into the cache.
pub fn import(dirs: &Dirs, file: &std::path::Path) -> ExitCode {
    output::report("import", crate::remote::import(dirs, file), |i| {
        let next = match &i.restores_here {
            Ok(()) => format!("the next start of {} restores it", i.service),
            Err(why) => format!("not used by a start here: {why}"),
        };
        format!("imported {} ({}); {next}\n", i.key, i.service)
    })
}
