//! Service manifests: YAML in, a validated [`Manifest`] out.
//!
//! Parsing goes raw -> validated (as zincati does with its config fragments):
//! the `Raw*` types mirror the YAML and keep source positions; [`Manifest`]
//! can only be built by [`Manifest::parse`], so a `Manifest` that exists is a
//! valid one. Every error carries `FILE:LINE:COL`.
//!
//! ```yaml
//! exec: ["/usr/bin/python3", "/srv/app/server.py", "--port", "8080"]
//! workdir: /srv/app
//! pid_file: /run/app/app.pid       # warmer writes the service's host PID here
//! env: { APP_MODE: "prod" }
//! ready:
//!   http: "http://127.0.0.1:8080/health"   # or tcp / exec / notify
//!   timeout: 60s
//! checkpoint:
//!   settle: 500ms
//! digest:
//!   files: ["/srv/app/server.py"]
//! state: ["/var/lib/app/data"]     # on-disk state captured with the image
//! not_state: ["/srv/app/logs"]      # written, but not state (see image::state::written)
//! mode: warm                         # or persist: checkpoint at every stop
//! restore:
//!   lazy: true                       # pages on demand (userfaultfd), for big images
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_saphyr::{Location, Spanned};

/// The schema version of manifests this warmer reads. Part of the digest.
pub const MANIFEST_VERSION: u32 = 1;

/// A manifest that failed to load, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: cannot read manifest", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
        /// The offending source line with a caret under the column.
        excerpt: Option<String>,
    },
    #[error("{}: {reason}", path.display())]
    Name { path: PathBuf, reason: String },
    /// More than one problem in one file, each an `Invalid`, in file order.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ManifestError>),
    #[error("no manifest for service {service:?} in {} (looked for {service}.yaml and {service}.yml)", dir.display())]
    NotFound { service: String, dir: PathBuf },
}

/// A section's value, or (its error collected) a stand-in.
fn keep<T>(errors: &mut Vec<ManifestError>, r: Result<T, ManifestError>, fallback: T) -> T {
    r.unwrap_or_else(|e| {
        errors.push(e);
        fallback
    })
}

impl ManifestError {
    /// One error as itself, several as [`ManifestError::Several`] (in file order).
    fn all(mut errors: Vec<ManifestError>) -> Self {
        if errors.len() == 1 {
            return errors.remove(0);
        }
        let pos = |e: &ManifestError| match e {
            ManifestError::Invalid { line, column, .. } => (*line, *column),
            _ => (0, 0),
        };
        errors.sort_by_key(pos);
        ManifestError::Several(errors)
    }

    /// Each problem on its own (one, or the parts of `Several`).
    pub fn each(&self) -> Vec<&ManifestError> {
        match self {
            ManifestError::Several(v) => v.iter().collect(),
            e => vec![e],
        }
    }

    /// The source line and a caret, for printing under the message.
    pub fn excerpt(&self) -> Option<&str> {
        match self {
            ManifestError::Invalid { excerpt, .. } => excerpt.as_deref(),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------- raw form

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    exec: Spanned<Vec<String>>,
    #[serde(default)]
    workdir: Option<Spanned<String>>,
    #[serde(default)]
    pid_file: Option<Spanned<String>>,
    #[serde(default)]
    env: Option<Spanned<BTreeMap<String, String>>>,
    ready: Spanned<RawReady>,
    #[serde(default)]
    checkpoint: Option<RawCheckpoint>,
    #[serde(default)]
    digest: Option<RawDigest>,
    #[serde(default)]
    stop: Option<RawStop>,
    #[serde(default)]
    cache: Option<RawCache>,
    #[serde(default)]
    state: Vec<Spanned<String>>,
    #[serde(default)]
    not_state: Vec<Spanned<String>>,
    #[serde(default)]
    restore: Option<RawRestore>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    remote: Option<Spanned<RawRemote>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemote {
    repository: Spanned<String>,
    #[serde(default)]
    push: Option<bool>,
    #[serde(default)]
    insecure: Option<bool>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    ca_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestore {
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    lazy: Option<Spanned<bool>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReady {
    #[serde(default)]
    http: Option<Spanned<String>>,
    #[serde(default)]
    tcp: Option<Spanned<String>>,
    #[serde(default)]
    exec: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    notify: Option<Spanned<bool>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheckpoint {
    #[serde(default)]
    settle: Option<Spanned<String>>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    tcp_established: Option<bool>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDigest {
    #[serde(default)]
    files: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStop {
    #[serde(default)]
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default)]
    keep: Option<Spanned<u32>>,
}

// ---------------------------------------------------------- validated form

/// How readiness is decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// GET the URL; any 2xx is ready.
    Http(HttpUrl),
    /// A TCP connect to `host:port` succeeds.
    Tcp(String),
    /// The command exits 0.
    Exec(Vec<String>),
    /// The service sends `READY=1` to `$NOTIFY_SOCKET`.
    Notify,
}

/// A plain-HTTP URL, split for the probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.path)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ready {
    pub probe: Probe,
    #[serde(with = "millis")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    /// `false`: never checkpoint (run cold every time).
    pub enabled: bool,
    #[serde(with = "millis")]
    pub settle: Duration,
    /// Dump established TCP connections too (CRIU `--tcp-established`).
    pub tcp_established: bool,
    /// A dump taking longer is killed (the service keeps running).
    #[serde(skip)]
    pub timeout: Duration,
}

/// How an image's memory is restored (see [`crate::restore::choose`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// warmer decides per image from its size, the page cache and how
    /// earlier restores went.
    Auto,
    /// All memory before the service runs.
    Eager,
    /// Memory on first touch (userfaultfd, `criu lazy-pages`).
    Lazy,
}

/// The registry tier of a service's images (see [`crate::remote`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// `host[:port]/path`: images are tagged with their digest in it.
    pub repository: String,
    /// Push each new image after its checkpoint (in the background).
    pub push: bool,
    /// Plain HTTP to this registry (test registries only).
    pub insecure: bool,
    /// A start waits at most this long for a pull (lookup and download).
    pub timeout: Duration,
    /// A CA certificate (PEM) trusted for this registry besides the system's.
    pub ca_file: Option<PathBuf>,
}

pub const DEFAULT_REMOTE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a stop means for the service's memory (see README, "Modes").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Checkpointed once when ready; every start restores that state, as
    /// long as the service's `state:` data is exactly as it was then (else
    /// cold). For services whose state is re-derived at start.
    #[default]
    Warm,
    /// Checkpointed at every stop (memory and `state:` at the same instant);
    /// the next start restores exactly that, once. After a crash or any stop
    /// whose checkpoint did not complete: cold, on the current data.
    Persist,
}

/// A valid service manifest. Serializes to its canonical form (the digest's
/// view of it): the file's own formatting and comments do not matter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    pub version: u32,
    pub name: String,
    pub mode: Mode,
    pub exec: Vec<String>,
    pub workdir: Option<PathBuf>,
    /// A PID file the host's tools read (pg_lsclusters, init scripts):
    /// warmer writes the service's main process's host PID there once it is
    /// ready, cold or restored (the service itself can only write its PID
    /// inside warmer's namespace). How it runs, not what: not in the digest.
    #[serde(skip)]
    pub pid_file: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub ready: Ready,
    pub checkpoint: Checkpoint,
    /// Extra digest inputs, absolute.
    pub digest_files: Vec<PathBuf>,
    #[serde(with = "millis")]
    pub stop_timeout: Duration,
    /// Cache generations kept for this service.
    pub keep: u32,
    /// Paths kept on disk that must match memory (captured at checkpoint,
    /// put back before restore).
    pub state: Vec<PathBuf>,
    /// Paths the service writes that its memory does not depend on (its
    /// logs outside /var/log): not implicit state. Absent from the digest's
    /// view when empty (manifests without it keep their digests).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_state: Vec<PathBuf>,
    /// Eager, lazy (userfaultfd: the service runs as soon as its tree is
    /// rebuilt, pages arrive on first touch) or auto. How an image is
    /// restored, not what it is: not part of the digest.
    #[serde(skip)]
    pub restore_mode: RestoreMode,
    /// CRIU must have restored the tree within this; else it is killed and
    /// the service cold-started. Not part of the digest.
    #[serde(skip)]
    pub restore_timeout: Duration,
    /// Where images are shared with other machines. Not part of the digest:
    /// the same service on every node has the same key.
    #[serde(skip)]
    pub remote: Option<Remote>,
    #[serde(skip)]
    pub path: PathBuf,
}

mod millis {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u128(d.as_millis())
    }
}

pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(500);
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_KEEP: u32 = 2;
/// Manifests are small; anything bigger is a mistake or an attack.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// The most of a source line an error message shows.
const EXCERPT_CHARS: usize = 120;
pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(300);

/// Service names become file, unit and directory names: keep them plain.
pub fn check_service_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid service name {name:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'"
        ))
    }
}

impl Manifest {
    /// Finds `<dir>/<service>.yaml` (or `.yml`) and loads it.
    pub fn find(dir: &Path, service: &str) -> Result<Self, ManifestError> {
        check_service_name(service).map_err(|reason| ManifestError::Name {
            path: dir.join(service),
            reason,
        })?;
        for ext in ["yaml", "yml"] {
            let path = dir.join(format!("{service}.{ext}"));
            if path.exists() {
                return Self::load(&path);
            }
        }
        Err(ManifestError::NotFound {
            service: service.to_string(),
            dir: dir.to_path_buf(),
        })
    }

    /// Loads a manifest file; the service name is the file stem.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let bytes = std::fs::read(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Invalid {
                path: path.to_path_buf(),
                line: 1,
                column: 1,
                message: format!(
                    "manifest is {} bytes; the limit is {MAX_MANIFEST_BYTES}",
                    bytes.len()
                ),
                excerpt: None,
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = good.iter().filter(|b| **b == b'\n').count() + 1;
            let col_bytes =
                good.len() - good.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&good[good.len() - col_bytes..])
                .chars()
                .count()
                + 1;
            ManifestError::Invalid {
                path: path.to_path_buf(),
                line: u64::try_from(line).unwrap_or(u64::MAX),
                column: u64::try_from(column).unwrap_or(u64::MAX),
                message: format!(
                    "not UTF-8: byte 0x{:02x} at offset {} (manifests are UTF-8 text)",
                    e.as_bytes()[good.len()],
                    good.len()
                ),
                excerpt: None,
            }
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        check_service_name(&name).map_err(|reason| ManifestError::Name {
            path: path.to_path_buf(),
            reason,
        })?;
        Self::parse(&name, path, &text)
    }

    /// Parses and validates manifest text. `path` is used in messages.
    pub fn parse(name: &str, path: &Path, text: &str) -> Result<Self, ManifestError> {
        let at = |loc: &Location, message: String| invalid(path, text, loc, message);
        let raw: RawManifest = serde_saphyr::from_str(text).map_err(|e| {
            let loc = e.location().unwrap_or(Location::UNKNOWN);
            at(&loc, saphyr_message(&e))
        })?;

        // Every section is checked, so one run reports every problem: a
        // section's first error is collected and a stand-in value used.
        let mut errors = Vec::new();
        let exec = raw.exec.value.clone();
        let checked = (|| {
            if exec.is_empty() || exec[0].is_empty() {
                return Err(at(
                    &raw.exec.referenced,
                    "exec: expected a non-empty argv list, e.g. [\"/usr/bin/app\", \"--flag\"]"
                        .into(),
                ));
            }
            if exec.iter().any(|a| a.contains('\0')) {
                return Err(at(
                    &raw.exec.referenced,
                    "exec: NUL byte in argument".into(),
                ));
            }
            Ok(())
        })();
        keep(&mut errors, checked, ());

        let workdir = (|| {
            Ok(match &raw.workdir {
                Some(w) if !Path::new(&w.value).is_absolute() => {
                    return Err(at(
                        &w.referenced,
                        format!("workdir: expected an absolute path, got {:?}", w.value),
                    ))
                }
                Some(w) => Some(PathBuf::from(&w.value)),
                None => None,
            })
        })();
        let workdir = keep(&mut errors, workdir, None);
        let pid_file = (|| {
            Ok(match &raw.pid_file {
                Some(p)
                    if !Path::new(&p.value).is_absolute()
                        || Path::new(&p.value).file_name().is_none() =>
                {
                    return Err(at(
                        &p.referenced,
                        format!(
                            "pid_file: expected an absolute path of a file, got {:?}",
                            p.value
                        ),
                    ))
                }
                Some(p) => Some(PathBuf::from(&p.value)),
                None => None,
            })
        })();
        let pid_file = keep(&mut errors, pid_file, None);

        let env = raw
            .env
            .as_ref()
            .map(|e| e.value.clone())
            .unwrap_or_default();
        let checked = (|| {
            if let Some(bad) = env
                .keys()
                .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
            {
                let loc = raw
                    .env
                    .as_ref()
                    .map(|e| e.referenced)
                    .unwrap_or(Location::UNKNOWN);
                return Err(at(&loc, format!("env: invalid variable name {bad:?}")));
            }
            Ok(())
        })();
        keep(&mut errors, checked, ());

        let ready = keep(
            &mut errors,
            validate_ready(&raw.ready, &at),
            Ready {
                probe: Probe::Notify,
                timeout: DEFAULT_READY_TIMEOUT,
            },
        );

        let default_checkpoint = Checkpoint {
            enabled: true,
            settle: DEFAULT_SETTLE,
            tcp_established: false,
            timeout: DEFAULT_CHECKPOINT_TIMEOUT,
        };
        let checkpoint = (|| {
            Ok(match &raw.checkpoint {
                Some(c) => Checkpoint {
                    enabled: c.enabled.unwrap_or(true),
                    settle: duration(c.settle.as_ref(), DEFAULT_SETTLE, "checkpoint.settle", &at)?,
                    tcp_established: c.tcp_established.unwrap_or(false),
                    timeout: duration(
                        c.timeout.as_ref(),
                        DEFAULT_CHECKPOINT_TIMEOUT,
                        "checkpoint.timeout",
                        &at,
                    )?,
                },
                None => default_checkpoint.clone(),
            })
        })();
        let checkpoint = keep(&mut errors, checkpoint, default_checkpoint);

        let digest_files = (|| {
            let mut digest_files = Vec::new();
            for f in raw.digest.iter().flat_map(|d| d.files.iter()) {
                let p = Path::new(&f.value);
                let abs = if p.is_absolute() {
                    p.to_path_buf()
                } else if let Some(w) = &workdir {
                    w.join(p)
                } else {
                    return Err(at(
                        &f.referenced,
                        format!(
                        "digest.files: relative path {:?} needs a workdir (or make it absolute)",
                        f.value
                    ),
                    ));
                };
                digest_files.push(abs);
            }
            Ok(digest_files)
        })();
        let digest_files = keep(&mut errors, digest_files, Vec::new());

        let stop_timeout = duration(
            raw.stop.as_ref().and_then(|s| s.timeout.as_ref()),
            DEFAULT_STOP_TIMEOUT,
            "stop.timeout",
            &at,
        );
        let stop_timeout = keep(&mut errors, stop_timeout, DEFAULT_STOP_TIMEOUT);

        let generations = (|| {
            Ok(match raw.cache.as_ref().and_then(|c| c.keep.as_ref()) {
                Some(k) if k.value == 0 => return Err(at(
                    &k.referenced,
                    "cache.keep: expected at least 1 (use checkpoint.enabled: false to keep none)"
                        .into(),
                )),
                Some(k) => k.value,
                None => DEFAULT_KEEP,
            })
        })();
        let generations = keep(&mut errors, generations, DEFAULT_KEEP);

        let mode = (|| {
            Ok(match raw.mode.as_ref() {
                None => Mode::Warm,
                Some(m) => match m.value.as_str() {
                    "warm" => Mode::Warm,
                    "persist" => Mode::Persist,
                    other => {
                        return Err(at(
                            &m.referenced,
                            format!("mode: expected warm or persist, got {other:?}"),
                        ))
                    }
                },
            })
        })();
        let mode = keep(&mut errors, mode, Mode::Warm);

        let absolute_paths = |key: &str, list: &[Spanned<String>]| {
            let mut out = Vec::new();
            for p in list {
                let path = Path::new(&p.value);
                if !path.is_absolute() || path.parent().is_none() {
                    return Err(at(
                        &p.referenced,
                        format!(
                            "{key}: expected an absolute path below /, got {:?}",
                            p.value
                        ),
                    ));
                }
                out.push(path.to_path_buf());
            }
            Ok(out)
        };
        let state = keep(&mut errors, absolute_paths("state", &raw.state), Vec::new());
        let not_state = keep(
            &mut errors,
            absolute_paths("not_state", &raw.not_state),
            Vec::new(),
        );

        let remote = (|| {
            Ok(match raw.remote.as_ref() {
                None => None,
                Some(r) => {
                    let repo = &r.value.repository;
                    let ok = !repo.value.is_empty()
                        && !repo.value.contains("://")
                        && !repo.value.contains(['@', ' '])
                        && repo.value.contains('/')
                        && !repo.value.rsplit('/').next().unwrap_or("").contains(':');
                    if !ok {
                        return Err(at(
                        &repo.referenced,
                        format!(
                            "remote.repository: expected host[:port]/path without tag or scheme, e.g. registry.example:5000/warmer/web, got {:?}",
                            repo.value
                        ),
                    ));
                    }
                    if mode == Mode::Persist {
                        return Err(at(
                        &r.referenced,
                        "remote: a persist-mode image holds this machine's data at its stop; it does not travel (use mode: warm)".into(),
                    ));
                    }
                    let ca_file = match &r.value.ca_file {
                        Some(c) if !Path::new(&c.value).is_absolute() => {
                            return Err(at(
                                &c.referenced,
                                format!(
                                    "remote.ca_file: expected an absolute path, got {:?}",
                                    c.value
                                ),
                            ))
                        }
                        c => c.as_ref().map(|c| PathBuf::from(&c.value)),
                    };
                    Some(Remote {
                        repository: repo.value.clone(),
                        push: r.value.push.unwrap_or(false),
                        insecure: r.value.insecure.unwrap_or(false),
                        timeout: duration(
                            r.value.timeout.as_ref(),
                            DEFAULT_REMOTE_TIMEOUT,
                            "remote.timeout",
                            &at,
                        )?,
                        ca_file,
                    })
                }
            })
        })();
        let remote = keep(&mut errors, remote, None);
        let restore_mode = keep(
            &mut errors,
            restore_mode(raw.restore.as_ref(), &at),
            RestoreMode::Auto,
        );
        let restore_timeout = duration(
            raw.restore.as_ref().and_then(|r| r.timeout.as_ref()),
            DEFAULT_RESTORE_TIMEOUT,
            "restore.timeout",
            &at,
        );
        let restore_timeout = keep(&mut errors, restore_timeout, DEFAULT_RESTORE_TIMEOUT);
        if !errors.is_empty() {
            return Err(ManifestError::all(errors));
        }

        Ok(Manifest {
            version: MANIFEST_VERSION,
            name: name.to_string(),
            mode,
            exec,
            workdir,
            pid_file,
            env,
            ready,
            checkpoint,
            digest_files,
            stop_timeout,
            keep: generations,
            state,
            not_state,
            restore_mode,
            restore_timeout,
            remote,
            path: path.to_path_buf(),
        })
    }

    /// The canonical form hashed into the digest: sorted-key JSON of the
    /// validated manifest.
    pub fn canonical(&self) -> String {
        serde_json::to_string(self).expect("a manifest always serializes")
    }
}

fn validate_ready(
    raw: &Spanned<RawReady>,
    at: &dyn Fn(&Location, String) -> ManifestError,
) -> Result<Ready, ManifestError> {
    let r = &raw.value;
    let mut given = Vec::new();
    if let Some(h) = &r.http {
        given.push(("http", h.referenced));
    }
    if let Some(t) = &r.tcp {
        given.push(("tcp", t.referenced));
    }
    if let Some(e) = &r.exec {
        given.push(("exec", e.referenced));
    }
    if let Some(n) = &r.notify {
        given.push(("notify", n.referenced));
    }
    // Point at the probe that comes second in the file.
    given.sort_by_key(|(_, loc)| (loc.line(), loc.column()));
    let probe = match given.as_slice() {
        [] => {
            return Err(at(
                &raw.referenced,
                "ready: expected exactly one probe of http, tcp, exec or notify; found none".into(),
            ))
        }
        [_, (second, loc), ..] => {
            return Err(at(
                loc,
                format!(
                    "ready: expected exactly one probe of http, tcp, exec or notify; found {} and {second}",
                    given[0].0
                ),
            ))
        }
        [("http", _)] => {
            let h = r.http.as_ref().expect("present");
            Probe::Http(parse_http_url(&h.value).map_err(|m| at(&h.referenced, m))?)
        }
        [("tcp", _)] => {
            let t = r.tcp.as_ref().expect("present");
            check_host_port(&t.value).map_err(|m| at(&t.referenced, format!("ready.tcp: {m}")))?;
            Probe::Tcp(t.value.clone())
        }
        [("exec", _)] => {
            let e = r.exec.as_ref().expect("present");
            if e.value.is_empty() || e.value[0].is_empty() {
                return Err(at(
                    &e.referenced,
                    "ready.exec: expected a non-empty argv list".into(),
                ));
            }
            Probe::Exec(e.value.clone())
        }
        [(_, _)] => {
            let n = r.notify.as_ref().expect("present");
            if !n.value {
                return Err(at(
                    &n.referenced,
                    "ready.notify: expected true (or remove it and use another probe)".into(),
                ));
            }
            Probe::Notify
        }
    };
    let timeout = duration(
        r.timeout.as_ref(),
        DEFAULT_READY_TIMEOUT,
        "ready.timeout",
        at,
    )?;
    Ok(Ready { probe, timeout })
}

fn duration(
    raw: Option<&Spanned<String>>,
    default: Duration,
    what: &str,
    at: &dyn Fn(&Location, String) -> ManifestError,
) -> Result<Duration, ManifestError> {
    match raw {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s.value.trim()).map_err(|e| {
            at(
                &s.referenced,
                format!(
                    "{what}: expected a duration like 500ms, 30s or 2m, got {:?} ({e})",
                    s.value
                ),
            )
        }),
    }
}

/// `restore.mode`, or the older `restore.lazy` (true: lazy, false: eager).
fn restore_mode(
    raw: Option<&RawRestore>,
    at: &dyn Fn(&Location, String) -> ManifestError,
) -> Result<RestoreMode, ManifestError> {
    let Some(r) = raw else {
        return Ok(RestoreMode::Auto);
    };
    let mode = match &r.mode {
        None => None,
        Some(m) => Some(match m.value.as_str() {
            "auto" => RestoreMode::Auto,
            "eager" => RestoreMode::Eager,
            "lazy" => RestoreMode::Lazy,
            other => {
                return Err(at(
                    &m.referenced,
                    format!("restore.mode: expected auto, eager or lazy, got {other:?}"),
                ))
            }
        }),
    };
    let lazy = r.lazy.as_ref().map(|l| {
        if l.value {
            RestoreMode::Lazy
        } else {
            RestoreMode::Eager
        }
    });
    match (mode, lazy) {
        (Some(m), Some(l)) if m != l => Err(at(
            &r.lazy.as_ref().expect("given").referenced,
            "restore.lazy contradicts restore.mode: give only restore.mode".into(),
        )),
        (m, l) => Ok(m.or(l).unwrap_or(RestoreMode::Auto)),
    }
}

fn check_host_port(s: &str) -> Result<u16, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("expected HOST:PORT, got {s:?}"))?;
    if host.is_empty() {
        return Err(format!("expected HOST:PORT, got {s:?} (empty host)"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("expected a port 1-65535 in {s:?}"))
}

/// `http://HOST[:PORT][/PATH]`; HTTPS is refused (probes are local and plain).
pub fn parse_http_url(url: &str) -> Result<HttpUrl, String> {
    let rest = match url.strip_prefix("http://") {
        Some(r) => r,
        None if url.starts_with("https://") => {
            return Err(format!(
                "ready.http: https is not supported, probe the plain-HTTP port instead: {url:?}"
            ))
        }
        None => {
            return Err(format!(
                "ready.http: expected http://HOST:PORT/PATH, got {url:?}"
            ))
        }
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if authority.starts_with('[') {
        // [::1]:8080
        let end = authority
            .find(']')
            .ok_or_else(|| format!("ready.http: unclosed '[' in {url:?}"))?;
        let host = &authority[..=end];
        match authority[end + 1..].strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None => (host, None),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("ready.http: no host in {url:?}"));
    }
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("ready.http: bad port in {url:?}"))?,
    };
    Ok(HttpUrl {
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

fn saphyr_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    let first = text.lines().next().unwrap_or("").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    // "line 4 column 3: unknown field ..." -> "unknown field ..."
    let msg = match first.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((pos, msg)) if pos.contains("column") => msg,
        _ => first,
    };
    // "... at line 3, column 1": the position is printed once, in front.
    match msg.rsplit_once(" at line ") {
        Some((head, pos))
            if pos.split_once(", column ").is_some_and(|(l, c)| {
                l.bytes().all(|b| b.is_ascii_digit()) && c.bytes().all(|b| b.is_ascii_digit())
            }) =>
        {
            head.to_string()
        }
        _ => msg.to_string(),
    }
}

fn invalid(path: &Path, text: &str, loc: &Location, mut message: String) -> ManifestError {
    // The parser may quote the offending value: never echo a huge one.
    if message.chars().count() > 2 * EXCERPT_CHARS {
        message = message.chars().take(2 * EXCERPT_CHARS).collect::<String>() + "...";
    }
    let (line, column) = if *loc == Location::UNKNOWN {
        (1, 1)
    } else {
        (loc.line().max(1), loc.column().max(1))
    };
    let excerpt = usize::try_from(line - 1)
        .ok()
        .and_then(|i| text.lines().nth(i))
        .map(|src| {
            // A window of the line around the column, never the whole of a
            // huge line.
            let col = usize::try_from(column - 1).unwrap_or(0);
            let chars: Vec<char> = src.chars().collect();
            let start = col.saturating_sub(EXCERPT_CHARS / 2).min(chars.len());
            let end = (start + EXCERPT_CHARS).min(chars.len());
            let (pre, post) = (
                if start > 0 { "..." } else { "" },
                if end < chars.len() { "..." } else { "" },
            );
            let shown: String = chars[start..end].iter().collect();
            let pad = col.saturating_sub(start) + pre.len();
            format!(
                "  {pre}{shown}{post}\n  {}^",
                " ".repeat(pad.min(EXCERPT_CHARS + 3))
            )
        });
    ManifestError::Invalid {
        path: path.to_path_buf(),
        line,
        column,
        message,
        excerpt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse("web", Path::new("web.yaml"), text)
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    const GOOD: &str = "\
exec: [\"/usr/bin/python3\", \"/srv/app/server.py\", \"--port\", \"8080\"]
workdir: /srv/app
env: { APP_MODE: \"prod\" }
ready:
  http: \"http://127.0.0.1:8080/health\"
  timeout: 60s
checkpoint:
  settle: 500ms
digest:
  files: [\"/srv/app/server.py\", \"conf/app.ini\"]
state: [\"/var/lib/app/data\"]
";

    #[test]
    fn the_documented_example_parses() {
        let m = parse(GOOD).unwrap();
        assert_eq!(m.exec[0], "/usr/bin/python3");
        assert_eq!(
            m.ready.probe,
            Probe::Http(HttpUrl {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/health".into()
            })
        );
        assert_eq!(m.ready.timeout, Duration::from_secs(60));
        assert_eq!(m.checkpoint.settle, Duration::from_millis(500));
        assert_eq!(
            m.digest_files,
            vec![
                PathBuf::from("/srv/app/server.py"),
                PathBuf::from("/srv/app/conf/app.ini")
            ]
        );
        assert_eq!(m.env["APP_MODE"], "prod");
        assert_eq!(m.state, vec![PathBuf::from("/var/lib/app/data")]);
        assert!(
            err("exec: [a]\nready: {tcp: \"h:1\"}\nstate: [rel]\n").starts_with("web.yaml:3:9:")
        );
    }

    #[test]
    fn unknown_key_is_positioned() {
        let e = err("exec: [a]\nready:\n  tcp: \"127.0.0.1:1\"\n  bogus: 1\n");
        assert!(e.starts_with("web.yaml:4:3: unknown field `bogus`"), "{e}");
        assert!(!e.contains("at line"), "the position once, in front: {e}");
    }

    #[test]
    fn wrong_type_is_positioned() {
        let e = err("exec: 3\nready: {tcp: \"h:1\"}\n");
        assert!(e.starts_with("web.yaml:1:7:"), "{e}");
    }

    #[test]
    fn two_probes_are_rejected_at_the_second() {
        let e = err("exec: [a]\nready:\n  tcp: \"h:1\"\n  http: \"http://h/\"\n");
        assert!(e.starts_with("web.yaml:4:9:"), "{e}");
        assert!(e.contains("found tcp and http"), "{e}");
    }

    #[test]
    fn no_probe_and_empty_exec_are_rejected() {
        assert!(err("exec: [a]\nready: {timeout: 1s}\n").contains("found none"));
        let e = err("exec: []\nready: {tcp: \"h:1\"}\n");
        assert!(
            e.starts_with("web.yaml:1:7:") && e.contains("non-empty argv"),
            "{e}"
        );
    }

    #[test]
    fn bad_durations_urls_and_paths_are_positioned() {
        let e = err("exec: [a]\nready:\n  tcp: \"h:1\"\n  timeout: soon\n");
        assert!(
            e.starts_with("web.yaml:4:12:") && e.contains("duration"),
            "{e}"
        );
        let e = err("exec: [a]\nready: {http: \"https://h/\"}\n");
        assert!(e.contains("https is not supported"), "{e}");
        let e = err("exec: [a]\nready: {tcp: \"nohost\"}\n");
        assert!(e.contains("HOST:PORT"), "{e}");
        let e = err("exec: [a]\nworkdir: rel\nready: {tcp: \"h:1\"}\n");
        assert!(e.starts_with("web.yaml:2:10:"), "{e}");
        let e = err("exec: [a]\nready: {tcp: \"h:1\"}\ndigest: {files: [rel]}\n");
        assert!(e.contains("needs a workdir"), "{e}");
    }

    #[test]
    fn missing_required_keys_are_reported() {
        assert!(err("ready: {tcp: \"h:1\"}\n").contains("exec"));
        assert!(err("exec: [a]\n").contains("ready"));
    }

    #[test]
    fn canonical_form_ignores_formatting_but_not_content() {
        let a = parse(GOOD).unwrap();
        let b = parse(&GOOD.replace("ready:", "# comment\nready:")).unwrap();
        assert_eq!(a.canonical(), b.canonical());
        let c = parse(&GOOD.replace("prod", "dev")).unwrap();
        assert_ne!(a.canonical(), c.canonical());
    }

    #[test]
    fn lazy_restore_is_an_option_outside_the_digest() {
        let auto = parse("exec: [a]\nready: {tcp: \"h:1\"}\n").unwrap();
        let lazy = parse("exec: [a]\nready: {tcp: \"h:1\"}\nrestore: {lazy: true}\n").unwrap();
        let eager = parse("exec: [a]\nready: {tcp: \"h:1\"}\nrestore: {mode: eager}\n").unwrap();
        assert_eq!(auto.restore_mode, RestoreMode::Auto);
        assert_eq!(lazy.restore_mode, RestoreMode::Lazy);
        assert_eq!(eager.restore_mode, RestoreMode::Eager);
        assert_eq!(eager.canonical(), lazy.canonical());
        assert!(
            err("exec: [a]\nready: {tcp: \"h:1\"}\nrestore: {mode: lazy, lazy: false}\n")
                .contains("contradicts")
        );
        assert!(
            err("exec: [a]\nready: {tcp: \"h:1\"}\nrestore: {mode: fast}\n")
                .contains("auto, eager or lazy")
        );
        assert!(
            err("exec: [a]\nready: {tcp: \"h:1\"}\nrestore: {lazzy: true}\n").contains("lazzy")
        );
    }

    #[test]
    fn http_urls_split() {
        let u = parse_http_url("http://localhost/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("localhost", 80, "/")
        );
        let u = parse_http_url("http://[::1]:9000/x?y=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("[::1]", 9000, "/x?y=1")
        );
        assert!(parse_http_url("http://h:0/").is_err());
    }
}

#[cfg(test)]
mod mode_tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse("db", Path::new("db.yaml"), text)
    }

    #[test]
    fn mode_defaults_to_warm_is_validated_and_is_part_of_the_key() {
        let base = "exec: [a]\nready: {tcp: \"h:1\"}\n";
        let warm = parse(base).unwrap();
        assert_eq!(warm.mode, Mode::Warm);
        let persist = parse(&format!("{base}mode: persist\n")).unwrap();
        assert_eq!(persist.mode, Mode::Persist);
        assert_ne!(
            warm.canonical(),
            persist.canonical(),
            "a ready-time image is never a persist image"
        );
        let e = parse(&format!("{base}mode: durable\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("db.yaml:3:7:") && e.contains("warm or persist"),
            "{e}"
        );
    }
}
