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

mod error;
mod fields;
pub mod keys;
mod parse;
pub mod sandbox;

pub use error::ManifestError;
pub use fields::parse_http_url;
pub use sandbox::{ExecStep, Limit, ProtectHome, ProtectSystem, Sandbox};

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

/// The schema version of manifests this warmer reads. Part of the digest.
pub const MANIFEST_VERSION: u32 = 1;
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
    /// No checkpoint while a process of the service has an environment
    /// variable matching one of these (`*` matches any run of characters).
    #[serde(skip)]
    pub forbid_env: Vec<String>,
}

/// Commands warmer runs around checkpoints and restores, inside the
/// service's namespaces, with its credentials and environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hooks {
    /// Before every checkpoint (ready-time, on request, at a persist stop):
    /// close connections, drop secrets. Failing: no checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before_checkpoint: Option<Vec<String>>,
    /// After CRIU restored the tree, before the readiness probe: reseed,
    /// reconnect, re-read credentials. Failing: the restore is undone, cold
    /// start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_restore: Option<Vec<String>>,
    /// Each hook must end within this.
    #[serde(with = "millis")]
    pub timeout: Duration,
}

pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);

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

/// An `env_file:` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvFile {
    pub path: PathBuf,
    /// `-` in front: a missing file is no error.
    pub optional: bool,
}

/// Reads a unit, drop-in or environment file root will act on: only one no
/// one but root could have written (through any link, up to `/`), and at
/// most 1 MiB (checked on what is read, not on a size looked at first).
pub fn read_trusted(p: &Path) -> Result<String, String> {
    read_trusted_as(p, nix::unistd::geteuid().as_raw())
}

/// [`read_trusted`], with `uid` trusted besides root: for a daemon's own
/// configuration that its packaging gives to its user (PostgreSQL's is
/// `postgres`'s), read to start that daemon as that user.
pub fn read_trusted_as(p: &Path, uid: u32) -> Result<String, String> {
    cache::fsutil::check_trusted(p, uid)
        .map_err(|why| format!("refusing {}: {why}", p.display()))?;
    let f = std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(f, MAX_MANIFEST_BYTES as u64 + 1),
        &mut bytes,
    )
    .map_err(|e| format!("{}: {e}", p.display()))?;
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(format!(
            "{}: larger than {MAX_MANIFEST_BYTES} bytes",
            p.display()
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", p.display()))
}

/// Parses an environment file as systemd does: `KEY=VALUE` lines, `#` and
/// `;` comments, values optionally in single or double quotes (`\` escapes
/// in double quotes).
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let k = k.trim();
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        let v = v.trim();
        let value = if v.len() >= 2 && v.starts_with('\'') && v.ends_with('\'') {
            v[1..v.len() - 1].to_string()
        } else if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
            let mut s = String::new();
            let mut chars = v[1..v.len() - 1].chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        s.push(n);
                    }
                } else {
                    s.push(c);
                }
            }
            s
        } else {
            v.to_string()
        };
        out.push((k.to_string(), value));
    }
    out
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
    /// The private key this node signs what it pushes with
    /// (`warmer keygen`); else the trust file's.
    pub sign: Option<PathBuf>,
    /// Public keys a pulled or imported image must be signed by one of;
    /// else the trust file's. None at all: nothing is pulled.
    pub verify: Vec<PathBuf>,
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
    /// What runs around checkpoints and restores. Part of the digest (a
    /// hook that drops a secret changes what an image holds), absent from
    /// it when there are none (older manifests keep their digests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
    /// Its user, group and sandbox (`user:`, `sandbox:`...): with one, the
    /// service runs in namespaces of its own (see [`crate::sandbox`]). What
    /// the image holds (credentials, mounts): part of the digest, absent
    /// from it when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    /// Files of `KEY=VALUE` lines read into the service's environment at
    /// every start (`EnvironmentFile=`), after `env`: their values never
    /// enter the manifest, the digest's record or an image's metadata (only
    /// the files' hashes do). Absent from the digest's view when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env_files: Vec<EnvFile>,
    /// Steps before a cold start (`ExecStartPre=`). Absent from the digest
    /// when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exec_start_pre: Vec<ExecStep>,
    /// Sent to the service's main process after each restore, before the
    /// probe (`restore.signal`): how a service learns it was restored.
    #[serde(skip)]
    pub restore_signal: Option<nix::sys::signal::Signal>,
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
/// No duration of a manifest (timeouts, settle) may be longer: a week is
/// more than any start, dump or stop should take, and far from where adding
/// it to a clock could overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
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

    /// Loads a manifest file; the service name is the file stem. A manifest
    /// says what runs as root: before a byte of it is read, it (through any
    /// symlink) and every directory above it must be owned by root (or
    /// warmer's own user) and writable by no one else, for every command
    /// alike (`run`, `validate`, `status`, ...).
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        cache::fsutil::check_trusted(path, nix::unistd::geteuid().as_raw()).map_err(|why| {
            ManifestError::Untrusted {
                path: path.to_path_buf(),
                why,
            }
        })?;
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
}

impl Manifest {
    /// The canonical form hashed into the digest: sorted-key JSON of the
    /// validated manifest.
    pub fn canonical(&self) -> String {
        serde_json::to_string(self).expect("a manifest always serializes")
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
    fn remote_repositories_use_the_distribution_grammar_with_an_explicit_host() {
        let remote = |r: &str| {
            parse(&format!(
                "exec: [a]\nready: {{tcp: \"h:1\"}}\nremote: {{repository: \"{r}\"}}\n"
            ))
        };
        for ok in [
            "127.0.0.1:5000/warmer/web",
            "registry.example/w",
            "localhost/warmer/web",
        ] {
            assert!(remote(ok).is_ok(), "{ok}");
        }
        // No tag or digest (warmer tags with the digest), no scheme, and no
        // host left for the client to read as docker.io.
        for bad in [
            "registry.example/w:latest",
            "registry.example/w@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "http://registry.example/w",
            "myregistry/w",
            "w",
            "",
        ] {
            assert!(remote(bad).is_err(), "{bad}");
        }
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
