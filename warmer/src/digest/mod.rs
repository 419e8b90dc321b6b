//! The cache key of a service: sha256 over everything a restore depends on.
//!
//! Inputs: the manifest's canonical form; the bytes of the resolved `exec[0]`,
//! of every argument that names an existing script, jar or configuration file
//! (by extension: .py, .js, .jar, .conf, .yaml, ... but never under a `state`
//! path) and of `digest.files` (directories are walked); and the host facts:
//! the image format, the bytes of `warmer-init`, the CRIU version, the kernel
//! release, the CPU feature flags. The inputs are collected into a JSON
//! document (kept in the cache entry for humans) and the key is the sha256 of
//! that document. Any change gives a different key, and an image is only ever
//! looked up by the key it was made for.
//!
//! What an upgrade of warmer invalidates: only what a restore depends on.
//! The image maps `warmer-init`, so its bytes are an input (it is its own
//! crate with a pinned version, so a new warmer release leaves them alone);
//! warmer's own files in the image are versioned by
//! [`crate::image::IMAGE_FORMAT`]. warmer's version is not an input: a new
//! warmer restores the images of an older one with the same image format.
//!
//! [`Digester`] is the one way to answer "what is SVC's digest on this host
//! now": `run`, `status`, `cache` and `bench` all use it.

pub mod watch;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::manifest::Manifest;
use crate::memo::Memo;

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("service {service}: its user and groups")]
    Credentials {
        service: String,
        #[source]
        source: crate::sandbox::SandboxError,
    },
    #[error("service {service}: exec[0] {program:?} not found (searched {searched})")]
    ProgramNotFound {
        service: String,
        program: String,
        searched: String,
    },
    #[error("service {service}: cannot hash digest input {}", path.display())]
    Input {
        service: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read host fact {what}")]
    Host {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot compute digests without CRIU")]
    Criu(#[source] crate::criu::CriuError),
    #[error("cannot find {}", crate::process::init::INIT_BIN)]
    Init(#[source] io::Error),
}

/// Facts about this machine that a restore depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostFacts {
    /// [`crate::image::IMAGE_FORMAT`]: warmer's files in the image.
    pub image_format: u32,
    /// sha256 of `warmer-init`: every image maps it, so it must not change.
    pub init_sha256: String,
    pub criu_version: String,
    pub kernel: String,
    pub cpu_flags: String,
}

impl HostFacts {
    pub fn gather(criu_version: &str, init: &Path, memo: &mut Memo) -> Result<Self, DigestError> {
        let init_sha256 =
            memo.get("sha256", init, sha256_file)
                .map_err(|source| DigestError::Host {
                    what: "warmer-init",
                    source,
                })?;
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .map_err(|e| DigestError::Host {
                what: "kernel release",
                source: e.into(),
            })?;
        let cpuinfo =
            std::fs::read_to_string("/proc/cpuinfo").map_err(|source| DigestError::Host {
                what: "/proc/cpuinfo",
                source,
            })?;
        Ok(Self {
            image_format: crate::image::IMAGE_FORMAT,
            init_sha256,
            criu_version: criu_version.to_string(),
            kernel,
            cpu_flags: cpu_flags(&cpuinfo),
        })
    }

    /// Facts that could not be gathered; never used for a digest.
    pub fn unknown() -> Self {
        Self {
            image_format: crate::image::IMAGE_FORMAT,
            init_sha256: String::new(),
            criu_version: String::new(),
            kernel: String::new(),
            cpu_flags: String::new(),
        }
    }

    pub fn as_map(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("image_format", &self.image_format.to_string()),
            ("init_sha256", &self.init_sha256),
            ("criu_version", &self.criu_version),
            ("kernel", &self.kernel),
            ("cpu_flags", &self.cpu_flags),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

/// The first `flags` line of /proc/cpuinfo, sorted (order is not a feature).
fn cpu_flags(cpuinfo: &str) -> String {
    let line = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags") || l.starts_with("Features"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v)
        .unwrap_or("");
    let mut flags: Vec<&str> = line.split_whitespace().collect();
    flags.sort_unstable();
    flags.join(" ")
}

#[derive(Debug, Clone, Serialize)]
pub struct FileInput {
    pub path: PathBuf,
    pub sha256: String,
}

/// Everything the key is made of.
#[derive(Debug, Clone, Serialize)]
pub struct Inputs {
    pub manifest: serde_json::Value,
    /// The init's cwd (the service's run directory): the image refers to it.
    pub init_home: PathBuf,
    pub program: PathBuf,
    pub files: Vec<FileInput>,
    pub host: HostFacts,
    /// A sandboxed service's uid, gid and groups as resolved here: an image
    /// holds numbers, and a user made again with another uid must not get
    /// the old one's image. Absent without a sandbox.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<(u32, u32, Vec<u32>)>,
}

#[derive(Debug, Clone)]
pub struct ServiceDigest {
    pub hex: String,
    pub inputs: Inputs,
}

/// Answers "what is this service's digest on this host now": host facts
/// gathered once, file hashes remembered for the boot (see [`Memo`]).
pub struct Digester {
    pub host: HostFacts,
    memo: Memo,
    run_root: PathBuf,
}

impl Digester {
    /// With the CRIU and `warmer-init` this host would use (see
    /// [`crate::criu::Criu::locate`], [`crate::process::init::locate`]).
    pub fn open(dirs: &crate::dirs::Dirs) -> Result<Self, DigestError> {
        let mut memo = Memo::load(&dirs.run);
        let criu = crate::criu::Criu::locate_memo(&mut memo).map_err(DigestError::Criu)?;
        let init = crate::process::init::locate().map_err(DigestError::Init)?;
        Self::with_memo(dirs, &criu.version, &init.path, memo)
    }

    /// With a given CRIU version and init binary.
    pub fn new(
        dirs: &crate::dirs::Dirs,
        criu_version: &str,
        init: &Path,
    ) -> Result<Self, DigestError> {
        Self::with_memo(dirs, criu_version, init, Memo::load(&dirs.run))
    }

    fn with_memo(
        dirs: &crate::dirs::Dirs,
        criu_version: &str,
        init: &Path,
        mut memo: Memo,
    ) -> Result<Self, DigestError> {
        let host = HostFacts::gather(criu_version, init, &mut memo)?;
        memo.save();
        Ok(Self {
            host,
            memo,
            run_root: dirs.run.clone(),
        })
    }

    /// The digest of `manifest` now.
    pub fn digest(&mut self, manifest: &Manifest) -> Result<ServiceDigest, DigestError> {
        let home = self.run_root.join(&manifest.name);
        let d = compute(manifest, &self.host, &home, &mut self.memo);
        self.memo.save();
        d
    }
}

/// Resolves `exec[0]` the way execvp will for the service: a name with a `/`
/// is taken relative to the workdir, a bare name is searched in `PATH`.
pub fn resolve_program(
    manifest: &Manifest,
    path_var: Option<&str>,
) -> Result<PathBuf, DigestError> {
    let program = &manifest.exec[0];
    if program.contains('/') {
        let p = absolute(manifest, Path::new(program));
        if p.is_file() {
            return Ok(p);
        }
        return Err(DigestError::ProgramNotFound {
            service: manifest.name.clone(),
            program: program.clone(),
            searched: p.display().to_string(),
        });
    }
    let search = manifest
        .env
        .get("PATH")
        .map(String::as_str)
        .or(path_var)
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in search.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(DigestError::ProgramNotFound {
        service: manifest.name.clone(),
        program: program.clone(),
        searched: format!("PATH={search}"),
    })
}

/// File name extensions of code and configuration, taken as digest inputs
/// when they appear as arguments.
const PROGRAM_EXTENSIONS: &[&str] = &[
    "py",
    "pyc",
    "js",
    "mjs",
    "cjs",
    "ts",
    "rb",
    "pl",
    "pm",
    "php",
    "lua",
    "sh",
    "bash",
    "jar",
    "war",
    "ear",
    "class",
    "so",
    "conf",
    "cfg",
    "cnf",
    "ini",
    "yaml",
    "yml",
    "toml",
    "xml",
    "properties",
    "json",
];

fn is_program_like(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PROGRAM_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn absolute(manifest: &Manifest, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        manifest
            .workdir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/"))
            .join(p)
    }
}

/// Computes the key of `manifest` on this host.
fn compute(
    manifest: &Manifest,
    host: &HostFacts,
    init_home: &Path,
    memo: &mut Memo,
) -> Result<ServiceDigest, DigestError> {
    let path_var = std::env::var("PATH").ok();
    let program = resolve_program(manifest, path_var.as_deref())?;
    let mut paths = vec![program.clone()];
    // Arguments that name programs or configuration (a script, a jar, a
    // .conf) are inputs too: an interpreter's binary rarely changes, the
    // program it runs does. Data the service writes (logs, databases, state
    // paths) must not be: it would change the key on every run.
    for arg in &manifest.exec[1..] {
        let value = arg.split_once('=').map_or(arg.as_str(), |(_, v)| v);
        let p = absolute(manifest, Path::new(value));
        if is_program_like(&p) && p.is_file() && !manifest.state.iter().any(|s| p.starts_with(s)) {
            paths.push(p);
        }
    }
    paths.extend(manifest.digest_files.iter().cloned());
    // What the service's environment is made of (their hashes only).
    paths.extend(
        manifest
            .env_files
            .iter()
            .filter(|f| !f.optional || f.path.exists())
            .map(|f| f.path.clone()),
    );

    let mut files = Vec::new();
    for p in paths {
        hash_path(&manifest.name, &p, &manifest.state, &mut files, memo)?;
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files.dedup_by(|a, b| a.path == b.path);

    let credentials = match &manifest.sandbox {
        None => None,
        Some(s) => {
            let c = crate::sandbox::Credentials::resolve_with(s, Some(memo)).map_err(|source| {
                DigestError::Credentials {
                    service: manifest.name.clone(),
                    source,
                }
            })?;
            Some((c.uid, c.gid, c.groups))
        }
    };
    let inputs = Inputs {
        manifest: serde_json::from_str(&manifest.canonical()).expect("canonical form is JSON"),
        init_home: init_home.to_path_buf(),
        program,
        files,
        host: host.clone(),
        credentials,
    };
    let doc = serde_json::to_vec(&inputs).expect("inputs serialize");
    let hex = hex::encode(Sha256::digest(&doc));
    Ok(ServiceDigest { hex, inputs })
}

/// Hashes a file, or every file under a directory (sorted, symlinks not followed
/// below the top). A missing declared input is an error: a digest that silently
/// skips an input could restore a stale image.
/// Paths under `skip` (the manifest's `state:`: data the service writes) are
/// never inputs, even inside a `digest.files` directory.
fn hash_path(
    service: &str,
    path: &Path,
    skip: &[PathBuf],
    out: &mut Vec<FileInput>,
    memo: &mut Memo,
) -> Result<(), DigestError> {
    if skip.iter().any(|s| path.starts_with(s)) {
        return Ok(());
    }
    let err = |source| DigestError::Input {
        service: service.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let md = std::fs::metadata(path).map_err(err)?;
    if md.is_dir() {
        let mut children: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(err)?
            .filter_map(|d| d.ok())
            .filter(|d| d.file_type().is_ok_and(|t| !t.is_symlink()))
            .map(|d| d.path())
            .collect();
        children.sort();
        for c in children {
            hash_path(service, &c, skip, out, memo)?;
        }
        return Ok(());
    }
    out.push(FileInput {
        path: path.to_path_buf(),
        sha256: memo.get("sha256", path, sha256_file).map_err(err)?,
    });
    Ok(())
}

/// How the inputs of a service changed between two digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Same,
    /// Only files that did not exist before appeared (what a service writes
    /// among its own inputs when it first starts: `__pycache__`, Tomcat's
    /// `conf/Catalina/...`).
    OnlyNew(Vec<PathBuf>),
    /// Something that was an input changed or went (the reason names it).
    Changed(String),
}

/// Compares the inputs of `old` with those of `new`.
pub fn change(old: &ServiceDigest, new: &ServiceDigest) -> Change {
    if old.hex == new.hex {
        return Change::Same;
    }
    let before: std::collections::BTreeMap<&Path, &str> = old
        .inputs
        .files
        .iter()
        .map(|f| (f.path.as_path(), f.sha256.as_str()))
        .collect();
    let after: std::collections::BTreeMap<&Path, &str> = new
        .inputs
        .files
        .iter()
        .map(|f| (f.path.as_path(), f.sha256.as_str()))
        .collect();
    for (path, sum) in &before {
        match after.get(path) {
            None => return Change::Changed(format!("{} is gone", path.display())),
            Some(s) if s != sum => return Change::Changed(format!("{} changed", path.display())),
            Some(_) => {}
        }
    }
    let mut o = old.inputs.clone();
    let mut n = new.inputs.clone();
    o.files.clear();
    n.files.clear();
    if serde_json::to_value(&o).ok() != serde_json::to_value(&n).ok() {
        return Change::Changed("the manifest, program or host changed".into());
    }
    Change::OnlyNew(
        after
            .keys()
            .filter(|p| !before.contains_key(*p))
            .map(|p| p.to_path_buf())
            .collect(),
    )
}

/// Lowercase hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The first 12 hex digits of a digest, or of a cache key's digest with its
/// generation (`0123456789ab.3`), for messages.
pub fn short(digest_or_key: &str) -> String {
    match digest_or_key.rsplit_once('.') {
        Some((d, gen)) => format!("{}.{gen}", &d[..d.len().min(12)]),
        None => digest_or_key[..digest_or_key.len().min(12)].to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostFacts {
        HostFacts {
            image_format: 1,
            init_sha256: "00".into(),
            criu_version: "4.2.1".into(),
            kernel: "6.18.0".into(),
            cpu_flags: "avx2 sse4_2".into(),
        }
    }

    /// The key of `m` on host `h` (fixed run dir, no memo).
    fn key(m: &Manifest, h: &HostFacts) -> String {
        compute(m, h, Path::new("/run/warmer/svc"), &mut Memo::none())
            .unwrap()
            .hex
    }

    fn manifest(dir: &Path, extra: &str) -> Manifest {
        let text = format!(
            "exec: [\"/bin/sh\", \"{}/app.sh\"]\nready: {{tcp: \"127.0.0.1:1\"}}\n{extra}",
            dir.display()
        );
        Manifest::parse("svc", &dir.join("svc.yaml"), &text).unwrap()
    }

    #[test]
    fn every_input_changes_the_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.sh"), "echo 1").unwrap();
        std::fs::create_dir(dir.path().join("conf")).unwrap();
        std::fs::write(dir.path().join("conf/a.ini"), "a=1").unwrap();
        let extra = format!("digest: {{files: [\"{}/conf\"]}}\n", dir.path().display());
        let m = manifest(dir.path(), &extra);
        let base = compute(&m, &host(), Path::new("/run/warmer/svc"), &mut Memo::none()).unwrap();
        assert_eq!(base.hex, key(&m, &host()), "stable");
        assert_eq!(base.inputs.program, PathBuf::from("/bin/sh"));
        assert_eq!(base.inputs.files.len(), 3, "{:?}", base.inputs.files);

        std::fs::write(dir.path().join("app.sh"), "echo 2").unwrap();
        let script = key(&m, &host());
        assert_ne!(base.hex, script, "script argument is an input");

        std::fs::write(dir.path().join("conf/a.ini"), "a=2").unwrap();
        let conf = key(&m, &host());
        assert_ne!(script, conf, "files under a digest dir are inputs");

        let mut h = host();
        h.kernel = "6.19.0".into();
        assert_ne!(conf, key(&m, &h), "kernel is an input");
        let mut h = host();
        h.image_format = 2;
        assert_ne!(conf, key(&m, &h), "the image format is an input");
        let mut h = host();
        h.init_sha256 = "01".into();
        assert_ne!(conf, key(&m, &h), "warmer-init is an input");
        let mut h = host();
        h.criu_version = "4.3".into();
        assert_ne!(conf, key(&m, &h), "criu is an input");
        let mut h = host();
        h.cpu_flags = "sse4_2".into();
        assert_ne!(conf, key(&m, &h), "cpu flags are inputs");

        let m2 = manifest(dir.path(), &format!("{extra}env: {{A: b}}\n"));
        assert_ne!(conf, key(&m2, &host()), "env is an input");
    }

    #[test]
    fn data_file_arguments_are_not_inputs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.sh"), "echo 1").unwrap();
        std::fs::write(dir.path().join("app.log"), "x").unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("data/cfg.json"), "{}").unwrap();
        let text = format!(
            "exec: [\"/bin/sh\", \"{d}/app.sh\", \"--log={d}/app.log\", \"{d}/data/cfg.json\"]\nready: {{tcp: \"h:1\"}}\nstate: [\"{d}/data\"]\n",
            d = dir.path().display()
        );
        let m = Manifest::parse("svc", &dir.path().join("svc.yaml"), &text).unwrap();
        let d = compute(&m, &host(), Path::new("/run/warmer/svc"), &mut Memo::none()).unwrap();
        let names: Vec<_> = d.inputs.files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(
            names,
            vec![PathBuf::from("/bin/sh"), dir.path().join("app.sh")]
        );
    }

    #[test]
    fn missing_inputs_are_errors_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.sh"), "echo 1").unwrap();
        let m = manifest(dir.path(), "digest: {files: [\"/nonexistent/x\"]}\n");
        assert!(matches!(
            compute(&m, &host(), Path::new("/run/warmer/svc"), &mut Memo::none()),
            Err(DigestError::Input { .. })
        ));
        let text = "exec: [\"no-such-program-xyz\"]\nready: {tcp: \"h:1\"}\n";
        let m = Manifest::parse("svc", Path::new("svc.yaml"), text).unwrap();
        assert!(matches!(
            compute(&m, &host(), Path::new("/run/warmer/svc"), &mut Memo::none()),
            Err(DigestError::ProgramNotFound { .. })
        ));
    }

    #[test]
    fn state_inside_a_digest_dir_is_not_an_input_and_new_files_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.sh"), "echo 1").unwrap();
        let app = dir.path().join("site");
        std::fs::create_dir_all(app.join("db")).unwrap();
        std::fs::write(app.join("settings.py"), "A=1").unwrap();
        let extra = format!(
            "digest: {{files: [\"{}\"]}}\nstate: [\"{}\"]\n",
            app.display(),
            app.join("db").display()
        );
        let m = manifest(dir.path(), &extra);
        let d = |m: &Manifest| {
            compute(m, &host(), Path::new("/run/warmer/svc"), &mut Memo::none()).unwrap()
        };
        let base = d(&m);
        std::fs::write(app.join("db/db.sqlite3-journal"), "x").unwrap();
        assert_eq!(
            change(&base, &d(&m)),
            Change::Same,
            "state is never an input"
        );
        std::fs::create_dir(app.join("__pycache__")).unwrap();
        std::fs::write(app.join("__pycache__/settings.pyc"), "pyc").unwrap();
        let grown = d(&m);
        assert_eq!(
            change(&base, &grown),
            Change::OnlyNew(vec![app.join("__pycache__/settings.pyc")])
        );
        std::fs::write(app.join("settings.py"), "A=2").unwrap();
        assert!(
            matches!(change(&grown, &d(&m)), Change::Changed(w) if w.contains("settings.py changed"))
        );
    }

    #[test]
    fn cpu_flags_are_order_independent() {
        assert_eq!(
            cpu_flags("processor: 0\nflags\t\t: sse avx fpu\n"),
            cpu_flags("flags : fpu sse avx\n")
        );
    }
}
