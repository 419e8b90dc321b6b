//! The `warmer` command line: argument parsing, printing and exit codes only.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use warmer::cli::{exit, CacheCmd, Cmd};
use warmer::commands::status;
use warmer::dirs::Dirs;
use warmer::errors::chain;
use warmer::process::roles::Role;
use warmer::supervisor::RunError;
use warmer::{criu, logging, manifest, supervisor};

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
    let cli = warmer::cli::parse();
    let dirs = Dirs::new(cli.manifest_dir, cli.cache_dir, cli.run_dir);
    match cli.cmd {
        Cmd::Run {
            service,
            cold,
            bench,
        } => run(&dirs, &service, supervisor::RunOptions { cold, bench }),
        Cmd::Status { service, json } => status_cmd(&dirs, service.as_deref(), json),
        Cmd::Validate { files } => validate(&dirs, &files),
        Cmd::Check => check(),
        Cmd::GenerateUnits { dir } => {
            for r in warmer::commands::units::generate(&dirs.manifests, &dir) {
                if let Err(e) = r {
                    eprintln!("warmer-generator: skipped: {e}");
                }
            }
            ExitCode::from(exit::OK)
        }
        Cmd::Checkpoint { service, timeout } => checkpoint_cmd(&dirs, &service, timeout),
        Cmd::Rollback { service, to } => rollback_cmd(&dirs, &service, to),
        Cmd::Reset { service } => reset_cmd(&dirs, &service),
        Cmd::Cache(c) => cache_cmd(&dirs, c),
        Cmd::Push { service, json } => push_cmd(&dirs, &service, json),
        Cmd::Completions { shell } => {
            match warmer::commands::docs::completions(shell, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::from(exit::OK),
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(exit::OK),
                Err(e) => {
                    eprintln!("warmer completions: {e}");
                    ExitCode::from(exit::FAILURE)
                }
            }
        }
        Cmd::Man { dir } => match warmer::commands::docs::write_man_pages(&dir) {
            Ok(pages) => {
                emit(&format!(
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
        Cmd::Keygen { prefix } => match warmer::remote::sign::keygen(&prefix) {
            Ok((key, public)) => {
                emit(&format!(
                    "wrote {} (private: keep it on the signing node) and {} (give it to the nodes that verify)\n",
                    key.display(),
                    public.display()
                ));
                ExitCode::from(exit::OK)
            }
            Err(e) => {
                eprintln!("warmer keygen: {}", chain(&e));
                ExitCode::from(exit::FAILURE)
            }
        },
        Cmd::Pull {
            service,
            timeout,
            json,
        } => pull_cmd(&dirs, &service, timeout, json),
        Cmd::Export { target, output } => export_cmd(&dirs, &target, &output),
        Cmd::Adopt {
            unit,
            exec,
            ready,
            mode,
            force,
            enable,
        } => {
            let req = warmer::commands::adopt::Request {
                unit,
                exec,
                ready,
                mode,
                force,
                enable,
            };
            match warmer::commands::adopt::adopt(&dirs.manifests, &req) {
                Ok(a) => {
                    print!("{}", warmer::commands::adopt::render(&a, &req.unit));
                    ExitCode::from(exit::OK)
                }
                Err(e) => {
                    eprintln!("warmer adopt: {}", chain(&e));
                    ExitCode::from(exit::FAILURE)
                }
            }
        }
        Cmd::Unadopt { unit } => match warmer::commands::adopt::unadopt(&unit) {
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
        Cmd::Import { file } => import_cmd(&dirs, &file),
        Cmd::Inspect { target, json } => match warmer::commands::inspect::inspect(&dirs, &target) {
            Ok(i) => {
                emit(&if json {
                    self::json(&i)
                } else {
                    warmer::commands::inspect::render(&i)
                });
                ExitCode::from(exit::OK)
            }
            Err(e) => {
                eprintln!("warmer inspect: {}", chain(&e));
                ExitCode::from(exit::FAILURE)
            }
        },
        Cmd::Bench {
            service,
            runs,
            json,
            drop_caches,
            out,
            breakdown,
        } => bench_cmd(
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

/// Writes to stdout; a closed stdout (`warmer cache ls | head`) ends the
/// program quietly, as CLI tools do.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("warmer: cannot write to stdout: {e}");
        std::process::exit(i32::from(exit::SOFTWARE));
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn push_cmd(dirs: &Dirs, service: &str, json: bool) -> ExitCode {
    logging::set_service(service);
    match warmer::remote::push_service(dirs, service, &mut |p| eprintln!("push: {p}")) {
        Ok(p) if json => {
            emit(&self::json(&p));
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

fn pull_cmd(
    dirs: &Dirs,
    service: &str,
    timeout: Option<std::time::Duration>,
    json: bool,
) -> ExitCode {
    use warmer::remote::PullOutcome;
    logging::set_service(service);
    match warmer::remote::pull_service(dirs, service, timeout, &mut |p| eprintln!("pull: {p}")) {
        Ok(p) if json => {
            emit(&self::json(&p));
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

fn export_cmd(dirs: &Dirs, target: &str, output: &std::path::Path) -> ExitCode {
    match warmer::remote::export(dirs, target, output) {
        Ok(x) => {
            emit(&format!(
                "exported {} to {}: {} of images in a {} archive\n",
                x.key,
                x.path.display(),
                mb(x.raw_bytes),
                mb(x.archive_bytes)
            ));
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("warmer export: {}", chain(&e));
            ExitCode::from(exit::FAILURE)
        }
    }
}

fn import_cmd(dirs: &Dirs, file: &std::path::Path) -> ExitCode {
    match warmer::remote::import(dirs, file) {
        Ok(i) => {
            let next = match &i.restores_here {
                Ok(()) => format!("the next start of {} restores it", i.service),
                Err(why) => format!("not used by a start here: {why}"),
            };
            emit(&format!("imported {} ({}); {next}\n", i.key, i.service));
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("warmer import: {}", chain(&e));
            ExitCode::from(exit::FAILURE)
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    let mut s = serde_json::to_string_pretty(value).expect("output serializes");
    s.push('\n');
    s
}

fn bench_cmd(
    dirs: &Dirs,
    service: &str,
    runs: usize,
    json: bool,
    drop_caches: bool,
    breakdown: bool,
    out: Option<&std::path::Path>,
) -> ExitCode {
    use warmer::commands::bench;
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
        self::json(&report)
    } else {
        bench::markdown(&report)
    });
    ExitCode::from(exit::OK)
}

fn cache_cmd(dirs: &Dirs, cmd: CacheCmd) -> ExitCode {
    use warmer::commands::cache as cc;
    let fail = |e: cc::CacheCmdError| {
        eprintln!("warmer: {}", chain(&e));
        ExitCode::from(exit::FAILURE)
    };
    match cmd {
        CacheCmd::Ls { json } => match cc::ls(dirs) {
            Ok((rows, bad)) if json => {
                emit(&self::json(&rows));
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
                    self::json(&report)
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
                            warmer::digest::short(&e.key),
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

fn run(dirs: &Dirs, service: &str, opts: supervisor::RunOptions) -> ExitCode {
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

fn status_cmd(dirs: &Dirs, service: Option<&str>, json: bool) -> ExitCode {
    if let Some(s) = service {
        let known = manifest::Manifest::find(&dirs.manifests, s).is_ok()
            || warmer::supervisor::record::RunRecord::read(&dirs.run, s).is_some();
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
        self::json(&rows)
    } else {
        status::render(&rows)
    });
    ExitCode::from(exit::OK)
}

fn validate(dirs: &Dirs, files: &[PathBuf]) -> ExitCode {
    let mut bad = false;
    let mut digester = None;
    for f in files {
        match manifest::Manifest::load(f) {
            Ok(m) => {
                println!("{}: ok", f.display());
                if let Err(e) =
                    warmer::digest::resolve_program(&m, std::env::var("PATH").ok().as_deref())
                {
                    eprintln!("{}: warning: {e}", f.display());
                }
                // What the service's current image shows, where there is one.
                if digester.is_none() {
                    digester = warmer::digest::Digester::open(dirs).ok();
                }
                let entry = digester
                    .as_mut()
                    .and_then(|d| d.digest(&m).ok())
                    .zip(
                        // Only an existing cache: validate creates nothing.
                        dirs.cache
                            .join("VERSION")
                            .exists()
                            .then(|| cache::Cache::open(&dirs.cache).ok())
                            .flatten(),
                    )
                    .and_then(|(d, c)| c.lookup(&d.hex).ok().flatten());
                for w in warmer::commands::lint::pushed_secrets(&m)
                    .into_iter()
                    .chain(warmer::commands::lint::sandbox_limits(
                        &m,
                        m.sandbox.is_some()
                            && warmer::criu::Criu::located_lazy_in_userns(&dirs.run),
                    ))
                {
                    eprintln!("{}: warning: {w}", f.display());
                }
                if let Some(e) = entry {
                    if let Ok(open) = warmer::image::criu::open_files(&e.data_dir()) {
                        for w in warmer::commands::lint::unsaved_writes(&m, &open) {
                            eprintln!("{}: warning: {w}", f.display());
                        }
                    }
                    if m.remote.as_ref().is_some_and(|r| r.push) {
                        if let Ok(i) = warmer::commands::inspect::inspect(dirs, &e.key) {
                            let names: std::collections::BTreeSet<&String> =
                                i.processes.iter().flat_map(|p| &p.secret_env).collect();
                            if !names.is_empty() {
                                eprintln!(
                                    "{}: warning: remote.push sends the service's memory to the registry, and its image holds environment variables that look like secrets: {} (keep them out: checkpoint.forbid_env, a before_checkpoint hook, or remote: {{push: false}})",
                                    f.display(),
                                    warmer::errors::escape(
                                        &names.into_iter().cloned().collect::<Vec<_>>().join(", ")
                                    )
                                );
                            }
                        }
                    }
                }
            }
            Err(e) => {
                bad = true;
                for one in e.each() {
                    eprintln!("{one}");
                    if let Some(x) = one.excerpt() {
                        eprintln!("{x}");
                    }
                }
            }
        }
    }
    ExitCode::from(if bad { exit::DATAERR } else { exit::OK })
}

fn checkpoint_cmd(dirs: &Dirs, service: &str, timeout: std::time::Duration) -> ExitCode {
    use warmer::supervisor::control::{self, ControlError, Reply, Request};
    if let Err(e) = manifest::check_service_name(service) {
        eprintln!("warmer: {e}");
        return ExitCode::from(exit::USAGE);
    }
    match control::send(&dirs.run, service, Request::Checkpoint, timeout) {
        Ok(Reply::Ok(c)) => {
            emit(&format!(
                "checkpoint of {service}: generation {} (image {}), service frozen for {} ms\n",
                c.generation,
                warmer::digest::short(&c.key),
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
const RESTORE_TIMINGS: &str = warmer::supervisor::backoff::RESTORE_TIMINGS;

fn reset_cmd(dirs: &Dirs, service: &str) -> ExitCode {
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
    let forgotten = warmer::supervisor::backoff::forget(&run_dir).and_then(|mut gone| {
        // The timings kept beside the service's images (across boots).
        let opened = dirs
            .cache
            .exists()
            .then(|| cache::Cache::open(&dirs.cache).ok());
        if let Some(cache) = opened.flatten() {
            let kept = warmer::restore::choose::forget_kept(&cache, service)
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

fn rollback_cmd(dirs: &Dirs, service: &str, to: Option<u64>) -> ExitCode {
    match warmer::commands::rollback::rollback(dirs, service, to) {
        Ok(r) => {
            let running = warmer::supervisor::record::RunRecord::read(&dirs.run, service)
                .is_some_and(|rec| rec.state.is_running() && rec.warmer_alive());
            let mut text = format!(
                "{service}: the next start restores generation {} (image {}, taken {})",
                r.generation,
                warmer::digest::short(&r.key),
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
                warmer::commands::rollback::RollbackError::Manifest(_) => exit::DATAERR,
                _ => exit::FAILURE,
            })
        }
    }
}

fn check() -> ExitCode {
    let c = match criu::Criu::locate() {
        Ok(c) => c,
        Err(e) => {
            println!("criu: FAIL: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    println!(
        "criu: {} (version {}, need >= {}.{}): ok",
        c.bin.display(),
        c.version,
        criu::MIN_VERSION.0,
        criu::MIN_VERSION.1
    );
    match c.check() {
        Ok(r) if r.ok => {
            println!("criu check: ok: {}", r.lines.join(" / "));
            if c.lazy_in_userns(&mut warmer::memo::Memo::none()) {
                println!("sandboxed services: lazy restores (CRIU opens /dev/userfaultfd)");
            } else {
                println!(
                    "sandboxed services: eager restores only: {}",
                    warmer::restore::NO_USERFAULTFD
                );
            }
            if c.has_feature(&mut warmer::memo::Memo::none(), criu::QUIET_BACKGROUND) {
                println!(
                    "lazy restores: the memory nobody asked for follows once the service is quiet (criu lazy-pages --lazy-bg-idle)"
                );
            } else {
                println!(
                    "lazy restores: the memory nobody asked for follows at once, racing the service's first faults (this CRIU has no --lazy-bg-idle; scripts/install-criu.sh builds one that has)"
                );
            }
            ExitCode::from(exit::OK)
        }
        Ok(r) => {
            println!(
                "criu check: FAIL ({}):\n  {}",
                r.status,
                r.lines.join("\n  ")
            );
            println!(
                "hint: run as root; on kernels >= 6.16 use CRIU >= 4.2 (scripts/install-criu.sh)"
            );
            ExitCode::from(exit::UNAVAILABLE)
        }
        Err(e) => {
            println!("criu check: FAIL: {}", chain(&e));
            ExitCode::from(exit::UNAVAILABLE)
        }
    }
}
