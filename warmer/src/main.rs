//! The `warmer` command line: argument parsing, printing and exit codes only.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warmer::commands::status;
use warmer::dirs::Dirs;
use warmer::errors::chain;
use warmer::process::roles::Role;
use warmer::supervisor::RunError;
use warmer::{criu, logging, manifest, supervisor};

/// Exit codes (sysexits.h), also shown in `--help`.
mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const DATAERR: u8 = 65;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
    pub const TEMPFAIL: u8 = 75;
    pub const USAGE: u8 = 2;
}

const EXIT_CODES: &str = "\
Exit codes:
  run        the service's own exit status (128+N if it died of signal N; when
             warmer was stopped by SIGTERM and the service died of it, warmer
             dies of SIGTERM too), or:
  65         invalid manifest (run, validate)
  69         service not ready in time, or exited before ready; CRIU unusable (check)
  70         internal error (cannot create directories, spawn, ...)
  75         the service is already running under another warmer
  checkpoint 0 taken; 1 the checkpoint failed; 69 the service is not running
  rollback   0 chosen; 1 refused (the reason is printed) or no such generation
  1          status: unknown service; cache verify: a bad entry; cache rm: no match
  2          usage error";

#[derive(Parser)]
#[command(
    name = "warmer",
    version,
    about = "Checkpoint slow services once with CRIU, restore them in milliseconds",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Directory of service manifests (<service>.yaml).
    #[arg(
        long,
        env = "WARMER_MANIFEST_DIR",
        default_value = "/etc/warmer/manifests",
        global = true
    )]
    manifest_dir: PathBuf,
    /// Checkpoint image cache.
    #[arg(
        long,
        env = "WARMER_CACHE_DIR",
        default_value = "/var/cache/warmer",
        global = true
    )]
    cache_dir: PathBuf,
    /// Runtime state (status files, CRIU logs, sockets).
    #[arg(
        long,
        env = "WARMER_RUN_DIR",
        default_value = "/run/warmer",
        global = true
    )]
    run_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start SERVICE: restore it from the cache, or cold-start and checkpoint it;
    /// supervise it until it exits or warmer gets SIGTERM/SIGINT.
    Run {
        service: String,
        /// Ignore the cache: cold start, no checkpoint (a baseline, or to
        /// rule warmer out while debugging a service).
        #[arg(long)]
        cold: bool,
    },
    /// Show services: state, last start (cold/restored), ready times, image.
    Status {
        service: Option<String>,
        /// JSON array of objects (name, state, last_start, ready_ms, cold_ready_ms, image).
        #[arg(long)]
        json: bool,
    },
    /// Check manifest files; prints FILE:LINE:COL: message for each problem.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Check that CRIU is present, recent enough (>= 4.2) and works here.
    Check,
    /// Write systemd drop-ins for every manifest into DIR (run by
    /// systemd/warmer-generator at boot and on daemon-reload).
    #[command(hide = true)]
    GenerateUnits { dir: PathBuf },
    /// Ask the running supervisor of SERVICE to take a checkpoint now (e.g.
    /// after the traffic that warms a JIT); prints the new generation and how
    /// long the service was frozen. The service keeps running.
    Checkpoint {
        service: String,
        /// Give up waiting for the supervisor's answer after this long.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Make an earlier image generation of SERVICE the one its next start
    /// restores (default: the one before the current). Refused where it would
    /// roll the service's data back (see `warmer cache ls` for generations).
    Rollback {
        service: String,
        #[arg(long = "to", value_name = "GEN")]
        to: Option<u64>,
    },
    /// Cold start vs warmer restore vs bare `criu restore` of the same image,
    /// interleaved; median, min, max and the ratio (makes the image first if
    /// there is none). Stop the service first: the runs need its port.
    Bench {
        service: String,
        /// Rounds (each: one cold start, one warmer restore, one bare CRIU restore).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// One JSON object on stdout instead of the table.
        #[arg(long)]
        json: bool,
        /// Empty the page cache before every run (the after-reboot case).
        #[arg(long)]
        drop_caches: bool,
        /// Also write bench-SVC.md, .svg and .json into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Show where warmer's restores spend their time: set-up, digest,
        /// plan, pull, state, lazy daemon, CRIU's own phases (from its stats
        /// file), integrity, probe.
        #[arg(long)]
        breakdown: bool,
    },
    /// Inspect and maintain the image cache.
    #[command(subcommand)]
    Cache(CacheCmd),
    /// Upload the image a start of SERVICE restores now to its manifest's
    /// `remote.repository`, tagged with its digest (blobs the registry has
    /// are not sent again).
    Push {
        service: String,
        #[arg(long)]
        json: bool,
    },
    /// Fetch the image of SERVICE's digest on this host from its
    /// `remote.repository` into the cache (verified; resumes a broken pull).
    Pull {
        service: String,
        /// Give up after this long (the partial download is kept for the next try).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Write an image (SERVICE's current one, or a DIGEST prefix) to one
    /// archive: an OCI image layout tarball, layers zstd-compressed.
    Export {
        target: String,
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: PathBuf,
    },
    /// Verify an archive made by `warmer export` and add its image to the
    /// cache; refused (with the reason) if this host's kernel, CPU flags,
    /// CRIU or warmer-init differ from the image's.
    Import { file: PathBuf },
    /// What an image holds, read from its files (nothing is run): process
    /// tree and command lines, memory per process, open files, sockets,
    /// namespaces; when, why and where it was made.
    Inspect {
        /// SERVICE (the image its next start restores) or a DIGEST prefix.
        target: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List entries: service, size, age, current/stale/verified flags.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Hash every file of the entries (all, a service's, or one digest);
    /// quarantine bad ones. Exit 1 if any entry is bad. Run at boot, it also
    /// loads the images into the page cache for fast first restores.
    Verify { target: Option<String> },
    /// Remove marked-stale entries, entries older than --max-age, and (stale
    /// digests first, then oldest) entries beyond --max-bytes.
    Gc {
        /// Total size to keep the cache under, e.g. 10G, 500M, 1048576.
        #[arg(long, value_parser = parse_bytes)]
        max_bytes: Option<u64>,
        /// Remove entries older than this, e.g. 30d, 12h.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_age: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Remove the entries of a service, or the entry with a digest (prefix).
    Rm { target: String },
}

/// "10G", "500M", "64K", "1048576" -> bytes (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown unit {c:?}: use K, M, G or T")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("expected a size like 10G, 500M or 1048576, got {s:?}"))
}

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
        Role::Cli => {}
    }
    logging::init();
    let cli = Cli::parse();
    let dirs = Dirs::new(cli.manifest_dir, cli.cache_dir, cli.run_dir);
    match cli.cmd {
        Cmd::Run { service, cold } => run(&dirs, &service, supervisor::RunOptions { cold }),
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
        Cmd::Cache(c) => cache_cmd(&dirs, c),
        Cmd::Push { service, json } => push_cmd(&dirs, &service, json),
        Cmd::Pull {
            service,
            timeout,
            json,
        } => pull_cmd(&dirs, &service, timeout, json),
        Cmd::Export { target, output } => export_cmd(&dirs, &target, &output),
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
                            warmer::checkpoint::short(&e.key),
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
                RunError::Manifest(_) | RunError::UntrustedManifest { .. } => exit::DATAERR,
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
                if let Some(e) = entry {
                    if let Ok(open) = warmer::image::criu::open_files(&e.data_dir()) {
                        for w in warmer::commands::lint::unsaved_writes(&m, &open) {
                            eprintln!("{}: warning: {w}", f.display());
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
                warmer::checkpoint::short(&c.key),
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

fn rollback_cmd(dirs: &Dirs, service: &str, to: Option<u64>) -> ExitCode {
    match warmer::commands::rollback::rollback(dirs, service, to) {
        Ok(r) => {
            let running = warmer::supervisor::record::RunRecord::read(&dirs.run, service)
                .is_some_and(|rec| rec.state.is_running() && rec.warmer_alive());
            let mut text = format!(
                "{service}: the next start restores generation {} (image {}, taken {})",
                r.generation,
                warmer::checkpoint::short(&r.key),
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
