//! The commands that act on a service: run it, show it, checkpoint it,
//! forget its restore history, roll it back, bench it.

use std::process::ExitCode;

use super::exit;
use super::output::{self, emit};
use crate::commands::status;
use crate::dirs::Dirs;
use crate::errors::chain;
use crate::supervisor::RunError;
use crate::{logging, manifest, supervisor};

/// `warmer run`: the service, until it stops; its exit code is the service's.
pub fn run(dirs: &Dirs, service: &str, opts: supervisor::RunOptions) -> ExitCode {
    logging::set_service(service);
    match supervisor::run(dirs, service, opts) {
        Ok(outcome) => {
            if let Some(sig) = outcome.stopped_by {
                if outcome.code == 128 + sig as i32 {
                    // The service died of the signal warmer was stopped with:
                    // so does warmer, so systemd sees a clean stop.
                    let _ = signal_hook::low_level::emulate_default_handler(sig as i32);
                }
            }
            ExitCode::from(u8::try_from(outcome.code).unwrap_or(exit::FAILURE))
        }
        Err(e) => {
            tracing::error!("{}", chain(&e));
            if let RunError::Manifest(m) = &e {
                for one in m.each() {
                    if let Some(x) = one.excerpt() {
                        eprintln!("{x}");
                    }
                }
            }
            ExitCode::from(match e {
                RunError::Manifest(_) => exit::DATAERR,
                RunError::AlreadyRunning { .. } => exit::TEMPFAIL,
                RunError::NotReady { .. }
                | RunError::ExitedBeforeReady { .. }
                | RunError::Spawn { .. }
                | RunError::Program(_) => exit::UNAVAILABLE,
                _ => exit::SOFTWARE,
            })
        }
    }
}

/// `warmer status`: one service or all, as a table or JSON.
pub fn status(dirs: &Dirs, service: Option<&str>, json: bool) -> ExitCode {
    if let Some(s) = service {
        let known = manifest::Manifest::find(&dirs.manifests, s).is_ok()
            || crate::supervisor::record::RunRecord::read(&dirs.run, s).is_some();
        if !known {
            eprintln!(
                "warmer: unknown service {s:?} (no manifest in {}, no run state)",
                dirs.manifests.display()
            );
            return ExitCode::from(exit::FAILURE);
        }
    }
    let rows = status::collect(dirs, service);
    emit(&if json {
        output::json(&rows)
    } else {
        status::render(&rows)
    });
    ExitCode::from(exit::OK)
}

/// `warmer checkpoint`: asks the running service's warmer for a checkpoint now.
pub fn checkpoint(dirs: &Dirs, service: &str, timeout: std::time::Duration) -> ExitCode {
    use crate::supervisor::control::{self, ControlError, Reply, Request};
    if let Err(e) = manifest::check_service_name(service) {
        eprintln!("warmer: {e}");
        return ExitCode::from(exit::USAGE);
    }
    match control::send(&dirs.run, service, Request::Checkpoint, timeout) {
        Ok(Reply::Ok(c)) => {
            emit(&format!(
                "checkpoint of {service}: generation {} (image {}), service frozen for {} ms\n",
                c.generation,
                crate::digest::short(&c.key),
                c.frozen_ms
            ));
            ExitCode::from(exit::OK)
        }
        Ok(Reply::Err(e)) => {
            eprintln!("warmer: checkpoint of {service} failed: {e}");
            ExitCode::from(exit::FAILURE)
        }
        Err(e @ ControlError::NotRunning { .. }) => {
            eprintln!("warmer: {}", chain(&e));
            ExitCode::from(exit::UNAVAILABLE)
        }
        Err(e) => {
            eprintln!("warmer: {}", chain(&e));
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// What `warmer reset` calls the restore history it forgot.
const RESTORE_TIMINGS: &str = crate::supervisor::backoff::RESTORE_TIMINGS;

/// `warmer reset`: forgets the service's restore history (back-off, kept timings).
pub fn reset(dirs: &Dirs, service: &str) -> ExitCode {
    if let Err(e) = manifest::check_service_name(service) {
        eprintln!("warmer: {e}");
        return ExitCode::from(exit::USAGE);
    }
    let run_dir = match dirs.service_run_checked(service) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("warmer: {}", chain(&e));
            return ExitCode::from(exit::FAILURE);
        }
    };
    let forgotten = crate::supervisor::backoff::forget(&run_dir).and_then(|mut gone| {
        // The timings kept beside the service's images (across boots).
        let opened = dirs
            .cache
            .exists()
            .then(|| cache::Cache::open(&dirs.cache).ok());
        if let Some(cache) = opened.flatten() {
            let kept = crate::restore::choose::forget_kept(&cache, service)
                .map_err(|e| std::io::Error::other(chain(&e)))?;
            if kept > 0 && !gone.contains(&RESTORE_TIMINGS) {
                gone.push(RESTORE_TIMINGS);
            }
        }
        Ok(gone)
    });
    match forgotten {
        Ok(forgotten) if forgotten.is_empty() => {
            emit(&format!("{service}: nothing to forget\n"));
            ExitCode::from(exit::OK)
        }
        Ok(forgotten) => {
            emit(&format!("{service}: forgot {}\n", forgotten.join(", ")));
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("warmer: {service}: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// `warmer rollback`: the next start restores an earlier generation.
pub fn rollback(dirs: &Dirs, service: &str, to: Option<u64>) -> ExitCode {
    match crate::commands::rollback::rollback(dirs, service, to) {
        Ok(r) => {
            let running = crate::supervisor::record::RunRecord::read(&dirs.run, service)
                .is_some_and(|rec| rec.state.is_running() && rec.warmer_alive());
            let mut text = format!(
                "{service}: the next start restores generation {} (image {}, taken {})",
                r.generation,
                crate::digest::short(&r.key),
                r.created
            );
            if let Some(prev) = r.previous {
                text.push_str(&format!(" instead of generation {prev}"));
            }
            text.push('\n');
            if running {
                text.push_str(
                    "it is running now: the rollback takes effect when it is restarted\n",
                );
            }
            emit(&text);
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("warmer: {}", chain(&e));
            ExitCode::from(match e {
                crate::commands::rollback::RollbackError::Manifest(_) => exit::DATAERR,
                _ => exit::FAILURE,
            })
        }
    }
}

/// `warmer bench`: restore against cold start and bare CRIU, in interleaved rounds.
pub fn bench(
    dirs: &Dirs,
    service: &str,
    runs: usize,
    json: bool,
    drop_caches: bool,
    breakdown: bool,
    out: Option<&std::path::Path>,
) -> ExitCode {
    use crate::commands::bench;
    logging::set_service(service);
    let opts = bench::BenchOptions {
        runs: runs.max(1),
        drop_caches,
        breakdown,
    };
    let report = match bench::bench(dirs, service, &opts, &mut |p| eprintln!("bench: {p}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("warmer bench: {}", chain(&e));
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    if let Some(dir) = out {
        match bench::write_out(&report, dir) {
            Ok(files) => {
                for f in files {
                    eprintln!("bench: wrote {}", f.display());
                }
            }
            Err(e) => {
                eprintln!("warmer bench: {}", chain(&e));
                return ExitCode::from(exit::SOFTWARE);
            }
        }
    }
    emit(&if json {
        output::json(&report)
    } else {
        bench::markdown(&report)
    });
    ExitCode::from(exit::OK)
}
