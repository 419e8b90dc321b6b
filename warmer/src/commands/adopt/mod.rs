//! `warmer adopt UNIT`: an installed systemd service turned into a manifest
//! (its command line, environment, user, sandbox, directories, limits and
//! pre-start steps), and with `--enable` warmed under its own name by a
//! drop-in; `warmer unadopt UNIT` removes the drop-in again.
//!
//! [`unit`](mod@unit) reads unit files as systemd does, [`cmdline`] splits and
//! expands their command lines, [`launchers`] follows a `Type=forking`
//! unit's launcher to the daemon it starts (Debian's `pg_ctlcluster`),
//! [`translate`] maps settings to manifest keys (pure, tested on Debian's
//! units), [`trial`] starts a service once to see the port it listens on;
//! this file does the I/O: the
//! search path, the package database, writing the manifest and the drop-in.

pub mod cmdline;
pub mod launchers;
pub mod translate;
pub mod trial;
pub mod unit;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use translate::Choices;

/// The drop-in `--enable` writes (and `unadopt` removes).
pub const DROPIN: &str = "warmer-adopt.conf";

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("{0}")]
    Unit(String),
    #[error("{unit}: {why}")]
    Translate { unit: String, why: String },
    #[error("{} exists; pass --force to replace it", .0.display())]
    Exists(PathBuf),
    #[error(
        "--ready {0:?}: expected http://HOST:PORT/PATH, tcp:HOST:PORT, exec:COMMAND or notify"
    )]
    Ready(String),
    #[error("--mode {0:?}: expected warm or persist")]
    Mode(String),
    #[error("--exec {0:?}: {1}")]
    Exec(String, String),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the manifest written for {unit} does not validate (removed): {why}")]
    Invalid { unit: String, why: String },
    #[error("{unit} is not adopted (no {})", path.display())]
    NotAdopted { unit: String, path: PathBuf },
}

/// What `adopt` was asked.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub unit: String,
    /// `--exec`: the foreground command line instead of `ExecStart=`.
    pub exec: Option<String>,
    pub ready: Option<String>,
    pub mode: Option<String>,
    pub force: bool,
    pub enable: bool,
}

/// What `adopt` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Adopted {
    pub service: String,
    pub manifest: PathBuf,
    pub dropin: Option<PathBuf>,
    pub not_carried: Vec<(String, String)>,
    pub notes: Vec<String>,
}

/// What `warmer adopt` prints.
pub fn render(a: &Adopted, unit: &str) -> String {
    let mut out = format!("wrote {} (service {})\n", a.manifest.display(), a.service);
    for (k, why) in &a.not_carried {
        out.push_str(&format!("  not carried over: {k}: {why}\n"));
    }
    for n in &a.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    if let Some(d) = &a.dropin {
        out.push_str(&format!(
            "installed {}: `systemctl restart {unit}` now runs it through warmer\n",
            d.display()
        ));
    }
    out
}

/// The unit search path: `WARMER_UNIT_PATH` (colon-separated, for tests and
/// other roots) or systemd's.
pub fn search_path() -> Vec<PathBuf> {
    match std::env::var("WARMER_UNIT_PATH") {
        Ok(p) if !p.is_empty() => p.split(':').map(PathBuf::from).collect(),
        _ => unit::SEARCH_PATH.iter().map(PathBuf::from).collect(),
    }
}

fn unit_name(unit: &str) -> String {
    if unit.contains('.') {
        unit.to_string()
    } else {
        format!("{unit}.service")
    }
}

/// The service name of a unit: `tomcat10.service` is `tomcat10`,
/// `postgresql@15-main.service` is `postgresql-15-main`.
pub fn service_name(unit: &str) -> String {
    let n = unit_name(unit);
    n.strip_suffix(".service").unwrap_or(&n).replace('@', "-")
}

/// `--ready` as the manifest's probe.
fn ready_yaml(r: &str) -> Result<String, AdoptError> {
    let q = |s: &str| serde_json::to_string(s).expect("strings serialize");
    if r == "notify" {
        Ok("notify: true".into())
    } else if r.starts_with("http://") {
        Ok(format!("http: {}", q(r)))
    } else if let Some(hp) = r.strip_prefix("tcp:") {
        Ok(format!("tcp: {}", q(hp)))
    } else if let Some(cmd) = r.strip_prefix("exec:") {
        let words: Vec<String> = cmdline::split(cmd)
            .unwrap_or_default()
            .into_iter()
            .map(|(w, _)| q(&w))
            .collect();
        if words.is_empty() {
            return Err(AdoptError::Ready(r.into()));
        }
        Ok(format!("exec: [{}]", words.join(", ")))
    } else {
        Err(AdoptError::Ready(r.into()))
    }
}

/// The environment the unit's `EnvironmentFile=`s give now (for `$VAR` in
/// its command lines).
fn file_env(u: &unit::Unit) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for f in u.list("Service", "EnvironmentFile") {
        let p = Path::new(f.trim_start_matches('-'));
        match crate::manifest::read_trusted(p) {
            Ok(t) => env.extend(crate::manifest::parse_env_file(&t)),
            Err(why) if p.exists() => tracing::warn!("{why}: its variables are not expanded"),
            Err(_) => {}
        }
    }
    env
}

/// The files of the package that owns the service's program (its jars,
/// libraries, scripts and configuration): digest inputs, so an upgrade of
/// the package means a cold start.
fn package_files(argv: &[String]) -> (Vec<String>, Option<String>) {
    let owner = |p: &str| -> Option<String> {
        let out = Command::new("dpkg").args(["-S", p]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| !l.starts_with("diversion"))?;
        Some(
            line.split(':')
                .next()?
                .split(',')
                .next()?
                .trim()
                .to_string(),
        )
    };
    let mut pkgs: Vec<String> = Vec::new();
    for (i, a) in argv.iter().enumerate() {
        if a.starts_with('/') && Path::new(a).is_file() {
            if let Some(p) = owner(a) {
                // The interpreter's package (dash for /bin/sh) only when
                // nothing else is found.
                if i == 0 && argv.len() > 1 {
                    pkgs.push(format!("\0{p}"));
                } else {
                    pkgs.push(p);
                }
            }
        }
    }
    let program_pkg = pkgs
        .iter()
        .find(|p| !p.starts_with('\0'))
        .or(pkgs.first())
        .map(|p| p.trim_start_matches('\0').to_string());
    let Some(pkg) = program_pkg else {
        return (Vec::new(), None);
    };
    let Ok(out) = Command::new("dpkg").args(["-L", &pkg]).output() else {
        return (Vec::new(), Some(pkg));
    };
    let wanted = |p: &str| {
        let ext_ok = [
            ".jar",
            ".so",
            ".py",
            ".js",
            ".conf",
            ".xml",
            ".properties",
            ".yml",
            ".yaml",
            ".sh",
            ".policy",
        ]
        .iter()
        .any(|e| p.ends_with(e))
            || p.contains(".so.");
        (p.starts_with("/etc/") || ext_ok || argv.iter().any(|a| a == p))
            && ![
                "/usr/share/doc",
                "/usr/share/man",
                "/etc/cron",
                "/etc/logrotate.d",
                "/etc/rsyslog.d",
                "/usr/lib/sysusers.d",
                "/usr/lib/tmpfiles.d",
            ]
            .iter()
            .any(|d| p.starts_with(d))
    };
    let mut files: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|p| wanted(p))
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .map(String::from)
        .collect();
    files.sort();
    (files, Some(pkg))
}

/// Reads UNIT, writes `<manifest_dir>/<service>.yaml` (validated), and with
/// `enable` the drop-in that runs the unit through warmer.
pub fn adopt(manifest_dir: &Path, req: &Request) -> Result<Adopted, AdoptError> {
    let search = search_path();
    let name = unit_name(&req.unit);
    let u = unit::Unit::load(&name, &search).map_err(AdoptError::Unit)?;
    let service = service_name(&name);
    crate::manifest::check_service_name(&service).map_err(AdoptError::Unit)?;
    let manifest = manifest_dir.join(format!("{service}.yaml"));
    if manifest.exists() && !req.force {
        return Err(AdoptError::Exists(manifest));
    }
    if let Some(m) = &req.mode {
        if m != "warm" && m != "persist" {
            return Err(AdoptError::Mode(m.clone()));
        }
    }
    let choices = Choices {
        ready: req.ready.as_deref().map(ready_yaml).transpose()?,
        mode: req.mode.clone(),
    };
    let env = file_env(&u);
    let translate_err = |why| AdoptError::Translate {
        unit: name.clone(),
        why,
    };
    // What runs: --exec, or what the unit's ExecStart (or its launcher)
    // starts; its argv first, for the package lookup.
    let mut unit_env = cmdline::assignments(&u.list("Service", "Environment"));
    unit_env.extend(env.clone());
    let start_argv = u
        .list("Service", "ExecStart")
        .first()
        .and_then(|s| cmdline::exec(s, &unit_env).ok())
        .map(|e| e.argv)
        .unwrap_or_default();
    let start_with = match &req.exec {
        Some(cmd) => {
            let e =
                cmdline::exec(cmd, &unit_env).map_err(|why| AdoptError::Exec(cmd.clone(), why))?;
            if e.argv.first().is_none_or(|p| !p.starts_with('/')) {
                return Err(AdoptError::Exec(
                    cmd.clone(),
                    "expected an absolute program path".into(),
                ));
            }
            translate::Start::Given(e.argv)
        }
        None => match launchers::foreground(&start_argv, &launchers::Real) {
            Some(Ok(f)) => translate::Start::Launcher(Box::new(f)),
            Some(Err(why)) => return Err(translate_err(why)),
            None => translate::Start::Unit,
        },
    };
    let argv = match &start_with {
        translate::Start::Unit => start_argv,
        translate::Start::Given(a) => a.clone(),
        translate::Start::Launcher(f) => f.argv.clone(),
    };
    let (mut files, pkg) = package_files(&argv);
    if let translate::Start::Launcher(f) = &start_with {
        files.extend(f.digest_files.iter().cloned());
    }
    let exists = |p: &Path| p.exists();
    let mut choices = choices;
    let mut trial_note = None;
    let has_probe = choices.ready.is_some()
        || matches!(&start_with, translate::Start::Launcher(_))
        || u.get("Service", "Type").as_deref() == Some("notify");
    if !has_probe {
        // Started once as the manifest would start it, to see its port.
        let trial_choices = Choices {
            ready: Some(trial::NEVER_READY.into()),
            mode: None,
        };
        let t = translate::translate(&u, &env, &trial_choices, &start_with, &files, &exists)
            .map_err(translate_err)?;
        let yaml = format!("{}checkpoint:\n  enabled: false\n", t.yaml);
        tracing::info!(
            "{name} has no readiness probe: starting it once to see the port it listens on"
        );
        let ask = "pass --ready http://HOST:PORT/PATH, tcp:HOST:PORT, exec:COMMAND or notify";
        let ports = trial::listening_ports(&service, &yaml, trial::WINDOW)
            .map_err(|why| translate_err(format!("{why}\n{ask}")))?;
        match ports.as_slice() {
            [one] => {
                let target = trial::probe_target(one);
                choices.ready = Some(format!("tcp: {}", serde_json::to_string(&target).expect("strings serialize")));
                trial_note = Some(format!(
                    "readiness: tcp {target}, the one port it listened on in a trial start; pass --ready for another probe (an HTTP path is a stronger one)"
                ));
            }
            [] => {
                return Err(translate_err(format!(
                    "in a trial start it listened on no TCP port within {}s (is {name} running already?); {ask}",
                    trial::WINDOW.as_secs()
                )))
            }
            many => {
                let list: Vec<String> = many.iter().map(trial::probe_target).collect();
                return Err(translate_err(format!(
                    "in a trial start it listened on {}; {ask}",
                    list.join(", ")
                )));
            }
        }
    }
    let mut t = translate::translate(&u, &env, &choices, &start_with, &files, &exists)
        .map_err(translate_err)?;
    t.notes.extend(trial_note);
    let mut text = format!(
        "# Adopted from {name} by `warmer adopt` ({}).\n",
        u.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(p) = &pkg {
        text.push_str(&format!(
            "# digest.files: the files of package {p} (dpkg -L).\n"
        ));
    }
    for n in &t.notes {
        text.push_str(&format!("# Note: {n}.\n"));
    }
    if !t.not_carried.is_empty() {
        text.push_str("# Not carried over:\n");
        for (k, why) in &t.not_carried {
            text.push_str(&format!("#   {k}: {why}\n"));
        }
    }
    text.push_str(&t.yaml);
    // Environment= values may be secrets: then only root reads the file.
    let secret = u
        .list("Service", "Environment")
        .iter()
        .flat_map(|v| cmdline::assignments(std::slice::from_ref(v)).into_keys())
        .any(|k| crate::process::hooks::looks_secret(&k));
    let mode = if secret { 0o600 } else { 0o644 };
    std::fs::create_dir_all(manifest_dir).map_err(|source| AdoptError::Write {
        path: manifest_dir.to_path_buf(),
        source,
    })?;
    cache::fsutil::write_atomic(
        manifest_dir,
        &format!("{service}.yaml"),
        text.as_bytes(),
        mode,
        cache::fsutil::Durability::Atomic,
    )
    .map_err(|source| AdoptError::Write {
        path: manifest.clone(),
        source,
    })?;
    if let Err(e) = crate::manifest::Manifest::load(&manifest) {
        let _ = std::fs::remove_file(&manifest);
        return Err(AdoptError::Invalid {
            unit: name,
            why: crate::errors::chain(&e),
        });
    }
    let mut notes = t.notes.clone();
    if secret {
        notes.push("its Environment= holds secret-looking names: the manifest is 0600".into());
    }
    let dropin = if req.enable {
        let m = crate::manifest::Manifest::load(&manifest).map_err(|e| AdoptError::Invalid {
            unit: name.clone(),
            why: crate::errors::chain(&e),
        })?;
        Some(enable(&search, &name, &service, &m, &t.dropin)?)
    } else {
        None
    };
    Ok(Adopted {
        service,
        manifest,
        dropin,
        not_carried: t.not_carried,
        notes,
    })
}

/// The drop-in's text: the unit runs `warmer run SERVICE`, its sandbox
/// moved into the manifest (systemd must not apply it to warmer and CRIU).
/// `ExecStop=` is reset: warmer stops the service itself (in order, and a
/// persist-mode service with its stop-time checkpoint). `extra`: a
/// launcher's lines (its stop signal, its reload).
pub fn dropin_text(
    warmer: &Path,
    service: &str,
    m: &crate::manifest::Manifest,
    extra: &[String],
) -> String {
    let start = m.ready.timeout + m.restore_timeout + std::time::Duration::from_secs(30);
    let stop = m.stop_timeout + std::time::Duration::from_secs(30);
    let mut extra = extra.join("\n");
    if !extra.is_empty() {
        extra = format!("# How the service stops and reloads under warmer:\n{extra}\n");
    }
    format!(
        "# Written by `warmer adopt --enable`; `warmer unadopt` removes it.\n\
         [Service]\n\
         Type=notify\n\
         NotifyAccess=main\n\
         ExecStartPre=\n\
         ExecStart=\n\
         ExecStart={} run {service}\n\
         ExecStop=\n\
         KillMode=mixed\n\
         TimeoutStartSec={}\n\
         TimeoutStopSec={}\n\
         # The service's user and sandbox are warmer's to apply (in the manifest):\n\
         User=\n\
         Group=\n\
         SupplementaryGroups=\n\
         DynamicUser=no\n\
         PrivateTmp=no\n\
         PrivateDevices=no\n\
         PrivateUsers=no\n\
         ProtectSystem=no\n\
         ProtectHome=no\n\
         ProtectKernelTunables=no\n\
         ProtectKernelModules=no\n\
         ProtectControlGroups=no\n\
         ReadWritePaths=\n\
         ReadOnlyPaths=\n\
         InaccessiblePaths=\n\
         NoNewPrivileges=no\n\
         AmbientCapabilities=\n\
         CapabilityBoundingSet=~\n\
         RestrictNamespaces=no\n\
         SystemCallFilter=\n\
         SystemCallArchitectures=\n\
         MemoryDenyWriteExecute=no\n\
         LockPersonality=no\n\
         RestrictRealtime=no\n\
         RestrictAddressFamilies=\n\
         DevicePolicy=auto\n\
         DeviceAllow=\n\
         RemoveIPC=no\n\
         {extra}",
        warmer.display(),
        humantime::format_duration(start),
        humantime::format_duration(stop),
    )
}

fn dropin_path(search: &[PathBuf], unit: &str) -> PathBuf {
    search
        .first()
        .cloned()
        .unwrap_or_else(|| PathBuf::from(unit::SEARCH_PATH[0]))
        .join(format!("{unit}.d"))
        .join(DROPIN)
}

fn daemon_reload() {
    if Path::new("/run/systemd/system").is_dir() && std::env::var_os("WARMER_UNIT_PATH").is_none() {
        let _ = Command::new("systemctl").arg("daemon-reload").status();
    }
}

fn enable(
    search: &[PathBuf],
    unit: &str,
    service: &str,
    m: &crate::manifest::Manifest,
    extra: &[String],
) -> Result<PathBuf, AdoptError> {
    let path = dropin_path(search, unit);
    let dir = path.parent().expect("a drop-in has a directory");
    std::fs::create_dir_all(dir).map_err(|source| AdoptError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let warmer = std::env::current_exe().map_err(|source| AdoptError::Write {
        path: path.clone(),
        source,
    })?;
    cache::fsutil::write_atomic(
        dir,
        DROPIN,
        dropin_text(&warmer, service, m, extra).as_bytes(),
        0o644,
        cache::fsutil::Durability::Atomic,
    )
    .map_err(|source| AdoptError::Write {
        path: path.clone(),
        source,
    })?;
    daemon_reload();
    Ok(path)
}

/// Removes the drop-in of `adopt --enable` (the unit is then as its package
/// shipped it); the manifest stays. Returns the removed path.
pub fn unadopt(unit: &str) -> Result<PathBuf, AdoptError> {
    let name = unit_name(unit);
    let path = dropin_path(&search_path(), &name);
    std::fs::remove_file(&path).map_err(|_| AdoptError::NotAdopted {
        unit: name.clone(),
        path: path.clone(),
    })?;
    if let Some(dir) = path.parent() {
        // Only if nothing else is in it.
        let _ = std::fs::remove_dir(dir);
    }
    daemon_reload();
    Ok(path)
}
