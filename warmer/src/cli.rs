//! The command line's definition: every subcommand, flag and exit code, in
//! one place (help, man pages and completions are generated from it); its
//! submodules run it: `dispatch` from a parsed command line to the command,
//! `service` (run, status, checkpoint, reset, rollback, bench), `images`
//! (cache, push, pull, export, import), `setup` (validate, check), `output`
//! (how results are written).

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub mod dispatch;
mod images;
mod output;
mod service;
mod setup;

/// Exit codes (sysexits.h), also shown in `--help`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const DATAERR: u8 = 65;
    pub const UNAVAILABLE: u8 = 69;
    pub const SOFTWARE: u8 = 70;
    pub const TEMPFAIL: u8 = 75;
    pub const USAGE: u8 = 2;
}

pub const EXIT_CODES: &str = "\
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

// The doc comments are clap's help text (`<service>` is a placeholder, not HTML).
#[allow(rustdoc::invalid_html_tags)]
#[derive(Parser)]
#[command(
    name = "warmer",
    version,
    about = "Checkpoint slow services once with CRIU, restore them in milliseconds",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Directory of service manifests (<service>.yaml).
    #[arg(
        long,
        env = "WARMER_MANIFEST_DIR",
        default_value = "/etc/warmer/manifests",
        global = true
    )]
    pub manifest_dir: PathBuf,
    /// Checkpoint image cache.
    #[arg(
        long,
        env = "WARMER_CACHE_DIR",
        default_value = "/var/cache/warmer",
        global = true
    )]
    pub cache_dir: PathBuf,
    /// Runtime state (status files, CRIU logs, sockets).
    #[arg(
        long,
        env = "WARMER_RUN_DIR",
        default_value = "/run/warmer",
        global = true
    )]
    pub run_dir: PathBuf,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Start SERVICE: restore it from the cache, or cold-start and checkpoint it;
    /// supervise it until it exits or warmer gets SIGTERM/SIGINT.
    Run {
        service: String,
        /// Ignore the cache: cold start, no checkpoint (a baseline, or to
        /// rule warmer out while debugging a service).
        #[arg(long)]
        cold: bool,
        /// How `warmer bench` measures a restore: restore even where a cold
        /// start was measured faster, and change nothing (no checkpoint, no
        /// retired image, no push), so the next round restores the same.
        #[arg(long, hide = true, conflicts_with = "cold")]
        bench: bool,
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
    /// Check that CRIU is present, recent enough (>= 4.2) and works here, and
    /// whether it can restore sandboxed services lazily.
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
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
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
    /// Forget what warmer measured and counted for SERVICE: failed
    /// checkpoints and restores that hold its checkpoints back (this boot),
    /// and the restore timings behind eager/lazy and "a cold start is
    /// faster" (this boot's, and those kept beside its images). Its images
    /// and data are left alone.
    Reset { service: String },
    /// Turn an installed systemd unit into a manifest: its command line,
    /// environment, user, sandbox, directories, limits and ExecStartPre=
    /// steps (unit file and drop-ins from systemd's search path, or
    /// WARMER_UNIT_PATH); settings it cannot carry are listed at the top.
    /// With --enable, a drop-in makes `systemctl start UNIT` run it through
    /// warmer, under its own name
    Adopt {
        /// The unit, e.g. tomcat10 or tomcat10.service.
        unit: String,
        /// Readiness: http://HOST:PORT/PATH, tcp:HOST:PORT, exec:COMMAND or
        /// notify (default: notify for Type=notify units, the launcher's for
        /// a known launcher such as pg_ctlcluster; else required).
        #[arg(long)]
        ready: Option<String>,
        /// The daemon's foreground command line (systemd syntax), instead of
        /// ExecStart=: for Type=forking units whose launcher warmer does not
        /// know, e.g. --exec "/usr/sbin/nginx -g 'daemon off;'".
        #[arg(long, value_name = "COMMAND")]
        exec: Option<String>,
        /// warm (default) or persist.
        #[arg(long)]
        mode: Option<String>,
        /// Replace an existing manifest.
        #[arg(long)]
        force: bool,
        /// Also install the drop-in that runs the unit through warmer.
        #[arg(long)]
        enable: bool,
    },
    /// Remove the drop-in `adopt --enable` installed: the unit is again as
    /// its package shipped it (the manifest stays).
    Unadopt { unit: String },
    /// Cold start vs warmer restore vs bare `criu restore` of the same image,
    /// interleaved; median, min, max and the ratio (makes the image first if
    /// there is none). Stop the service first: the runs need its port.
    Bench {
        service: String,
        /// Rounds (each: one cold start, one warmer restore, one bare CRIU restore as warmer
        /// did; for an image of 64 MiB or more also bare CRIU eager and lazy).
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
    /// Print a completion script for SHELL (bash, zsh or fish); service
    /// names complete from the manifest directory.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (warmer.1, warmer-SUBCOMMAND.1, warmer.yaml.5)
    /// into DIR: for packaging.
    #[command(hide = true)]
    Man { dir: PathBuf },
    /// Make a key pair for signing images: PREFIX.key (private, 0600) and
    /// PREFIX.pub (cosign's public key format). Never overwrites.
    Keygen { prefix: PathBuf },
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
        #[arg(long, value_parser = parse_duration)]
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
pub enum CacheCmd {
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

/// A duration on the command line, bounded like a manifest's.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > crate::manifest::MAX_DURATION {
        return Err(format!(
            "longer than the longest allowed, {}",
            humantime::format_duration(crate::manifest::MAX_DURATION)
        ));
    }
    Ok(d)
}

/// "10G", "500M", "64K", "1048576" -> bytes (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
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

/// What `warmer --version` prints: the release, the format of warmer's
/// files in an image (a digest input: a new one means new digests, so cold
/// starts) and of the cache's entries (an entry of another one is set aside).
/// The Debian package's postinst compares them across an upgrade.
pub fn long_version() -> String {
    format!(
        "{}\nimage format {}\ncache format {}",
        env!("CARGO_PKG_VERSION"),
        crate::image::IMAGE_FORMAT,
        cache::FORMAT_VERSION
    )
}

/// The command line of this process, parsed (exits on `--help`, `--version`
/// and usage errors, as `Cli::parse` does).
pub fn parse() -> Cli {
    // Once per process: clap keeps &'static strs.
    let version: &'static str = Box::leak(long_version().into_boxed_str());
    let matches = Cli::command().long_version(version).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}
