//! Launchers: programs a `Type=forking` unit runs that start the real
//! daemon in the background and exit. warmer supervises a service in the
//! foreground (it must be the parent of what it checkpoints), so `adopt`
//! runs what the launcher would have started, as the launcher would have
//! started it: the same program, user, configuration and directories.
//!
//! Known: Debian's `pg_ctlcluster` (postgresql-common), which every
//! `postgresql@VERSION-CLUSTER.service` runs. Any other forking unit needs
//! `--exec` with its daemon's foreground command line.
//!
//! Pure: files are read through [`Host`], so the tests use Debian's own
//! configuration texts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the launcher's daemon needs, for the manifest and the drop-in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Foreground {
    /// The launcher, for messages (`pg_ctlcluster 15 main`).
    pub launcher: String,
    pub argv: Vec<String>,
    pub user: String,
    pub group: String,
    /// Names under /run (`runtime_directory:`).
    pub runtime_directory: Vec<String>,
    pub state: Vec<String>,
    /// Its configuration: digest inputs (a change means a cold start).
    pub digest_files: Vec<String>,
    pub pid_file: Option<String>,
    /// The readiness probe as manifest YAML (`exec: [...]`).
    pub ready: String,
    pub env: BTreeMap<String, String>,
    /// Lines for `adopt --enable`'s drop-in: how systemd's stop and reload
    /// reach the daemon through warmer.
    pub dropin: Vec<String>,
    pub notes: Vec<String>,
}

/// The host, as a launcher reads it.
pub trait Host {
    /// A file's text, read only when no one but root or `user` could have
    /// written it; `None` when it does not exist or is not trusted.
    fn read(&self, path: &Path, user: &str) -> Option<String>;
    /// The names of the owner and group of `path`.
    fn owner(&self, path: &Path) -> Option<(String, String)>;
    fn exists(&self, path: &Path) -> bool;
    /// The file names in `dir`.
    fn list(&self, dir: &Path) -> Vec<String>;
}

/// The real host.
pub struct Real;

/// Whether `user` may read `path` by its permission bits (owner, group or
/// its supplementary groups, others).
fn readable_by(path: &Path, user: &nix::unistd::User) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(path) else {
        return false;
    };
    let mode = md.mode();
    if md.uid() == user.uid.as_raw() {
        return mode & 0o400 != 0;
    }
    let groups = std::ffi::CString::new(user.name.as_bytes())
        .ok()
        .and_then(|n| nix::unistd::getgrouplist(&n, user.gid).ok())
        .unwrap_or_else(|| vec![user.gid]);
    if groups.iter().any(|g| g.as_raw() == md.gid()) {
        return mode & 0o040 != 0;
    }
    mode & 0o004 != 0
}

impl Host for Real {
    fn read(&self, path: &Path, user: &str) -> Option<String> {
        let u = nix::unistd::User::from_name(user).ok()??;
        // Only what the daemon itself could read: root reading, say,
        // /etc/shadow because a postgres-owned file `include`s it would put
        // a root-only file into a world-readable manifest's digest.
        if !readable_by(path, &u) {
            if path.exists() {
                tracing::warn!("{} is not readable by {user}: not followed", path.display());
            }
            return None;
        }
        match crate::manifest::read_trusted_as(path, u.uid.as_raw()) {
            Ok(t) => Some(t),
            Err(why) => {
                if path.exists() {
                    tracing::warn!("{why}");
                }
                None
            }
        }
    }
    fn owner(&self, path: &Path) -> Option<(String, String)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let user = nix::unistd::User::from_uid(m.uid().into()).ok()??.name;
        let group = nix::unistd::Group::from_gid(m.gid().into()).ok()??.name;
        Some((user, group))
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn list(&self, dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// The daemon a launcher in `argv` starts, if warmer knows the launcher:
/// `None` for a program it does not know, `Some(Err)` for a known one it
/// cannot follow (and why).
pub fn foreground(argv: &[String], host: &dyn Host) -> Option<Result<Foreground, String>> {
    let program = Path::new(argv.first()?).file_name()?.to_str()?;
    match program {
        "pg_ctlcluster" => Some(pg_ctlcluster(&argv[1..], host)),
        _ => None,
    }
}

/// Settings, and the files they came from.
#[derive(Default)]
struct Settings {
    values: BTreeMap<String, String>,
    files: Vec<String>,
}

/// `key = value` settings of a postgresql.conf-style file (also Debian's
/// `environment` and `pg_ctl.conf`), with `include`, `include_if_exists`
/// and `include_dir` followed as PostgreSQL does; later settings win.
fn pg_settings(path: &Path, host: &dyn Host, user: &str, out: &mut Settings, depth: u32) {
    if depth > 10 {
        return;
    }
    let Some(text) = host.read(path, user) else {
        return;
    };
    out.files.push(path.display().to_string());
    let dir = path.parent().unwrap_or(Path::new("/"));
    for line in text.lines() {
        let Some((key, value)) = pg_line(line) else {
            continue;
        };
        let rel = |v: &str| -> PathBuf {
            let p = Path::new(v);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };
        match key.as_str() {
            "include" | "include_if_exists" => {
                pg_settings(&rel(&value), host, user, out, depth + 1)
            }
            "include_dir" => {
                let d = rel(&value);
                for name in host.list(&d) {
                    if name.ends_with(".conf") && !name.starts_with('.') {
                        pg_settings(&d.join(name), host, user, out, depth + 1);
                    }
                }
            }
            _ => {
                out.values.insert(key, value);
            }
        }
    }
}

/// One `name = value` line (`=` optional), comments and quotes removed.
fn pg_line(line: &str) -> Option<(String, String)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let (key, rest) = line.split_at(end);
    let rest = rest.trim_start().trim_start_matches('=').trim_start();
    let value = if let Some(q) = rest.strip_prefix('\'') {
        // 'it''s' and 'a\'b' are both a quote.
        let mut v = String::new();
        let mut chars = q.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    v.push('\'');
                }
                '\'' => break,
                '\\' => {
                    if let Some(n) = chars.next() {
                        v.push(n);
                    }
                }
                c => v.push(c),
            }
        }
        v
    } else {
        rest.split('#').next().unwrap_or("").trim().to_string()
    };
    Some((key.to_ascii_lowercase(), value))
}

/// `pg_ctlcluster [--skip-systemctl-redirect] VERSION CLUSTER start` (or
/// `VERSION-CLUSTER`, `VERSION/CLUSTER`): the cluster's `postgres`, as its
/// owner, on its configuration, as postgresql-common starts it.
fn pg_ctlcluster(args: &[String], host: &dyn Host) -> Result<Foreground, String> {
    let mut words = Vec::new();
    for a in args {
        match a.as_str() {
            "--skip-systemctl-redirect" | "--force" | "--foreground" | "--stdlog" => {}
            a if a.starts_with('-') => {
                return Err(format!(
                    "pg_ctlcluster option {a} is not one adopt follows; write the manifest by hand"
                ))
            }
            a => words.push(a.to_string()),
        }
    }
    let (version, cluster, action) = match words.as_slice() {
        [vc, action] => {
            let Some((v, c)) = vc.split_once(['-', '/']) else {
                return Err(format!("pg_ctlcluster {vc}: expected VERSION-CLUSTER"));
            };
            (v.to_string(), c.to_string(), action.clone())
        }
        [v, c, action] => (v.clone(), c.clone(), action.clone()),
        _ => return Err("pg_ctlcluster: expected VERSION CLUSTER start".into()),
    };
    if action != "start" {
        return Err(format!(
            "pg_ctlcluster {version} {cluster} {action}: only start is a service"
        ));
    }
    if version.is_empty()
        || !version.chars().all(|c| c.is_ascii_digit() || c == '.')
        || cluster.is_empty()
        || cluster.contains('/')
    {
        return Err(format!("pg_ctlcluster: no cluster {version} {cluster}"));
    }
    let launcher = format!("pg_ctlcluster {version} {cluster}");
    let conf_dir = PathBuf::from(format!("/etc/postgresql/{version}/{cluster}"));
    let conf = conf_dir.join("postgresql.conf");
    if !host.exists(&conf) {
        return Err(format!("{launcher}: no {}", conf.display()));
    }
    // The cluster's owner: its configuration is theirs (pg_createcluster
    // gives it to them), and so must its data be.
    let Some((user, group)) = host.owner(&conf_dir) else {
        return Err(format!("{launcher}: no {}", conf_dir.display()));
    };
    if user == "root" {
        return Err(format!(
            "{launcher}: {} is root's; PostgreSQL runs as the owner of its cluster",
            conf_dir.display()
        ));
    }
    let mut settings = Settings::default();
    pg_settings(&conf, host, &user, &mut settings, 0);
    let s = &settings.values;
    if settings.files.is_empty() {
        return Err(format!(
            "{launcher}: {} is unreadable, or writable by someone other than root and {user}",
            conf.display()
        ));
    }
    let bin = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
    let postgres = bin.join("postgres");
    if !host.exists(&postgres) {
        return Err(format!(
            "{launcher}: no {} (is postgresql-{version} installed?)",
            postgres.display()
        ));
    }
    let data = s
        .get("data_directory")
        .cloned()
        .unwrap_or_else(|| format!("/var/lib/postgresql/{version}/{cluster}"));
    // Values from the owner's files that root acts on: plain paths only.
    let plain = |p: &str| p.starts_with('/') && !p.split('/').any(|c| c == "..");
    if !plain(&data) {
        return Err(format!(
            "{launcher}: data_directory {data:?} is not a plain absolute path"
        ));
    }
    match host.owner(Path::new(&data)) {
        Some((u, _)) if u == user => {}
        Some((u, _)) => {
            return Err(format!(
                "{launcher}: {data} is {u}'s, the cluster {user}'s; pg_ctlcluster would refuse too"
            ))
        }
        None => return Err(format!("{launcher}: no data directory {data}")),
    }
    let mut notes = Vec::new();
    let start_conf = host
        .read(&conf_dir.join("start.conf"), &user)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or("auto")
        .to_string();
    match start_conf.as_str() {
        "disabled" => {
            return Err(format!(
                "{launcher}: start.conf says disabled (pg_ctlcluster refuses to start it)"
            ))
        }
        "manual" => notes.push(format!(
            "{launcher}: start.conf says manual; warmer@ or the adopted unit starts it when enabled"
        )),
        _ => {}
    }
    let mut ctl = Settings::default();
    pg_settings(&conf_dir.join("pg_ctl.conf"), host, &user, &mut ctl, 0);
    if ctl
        .values
        .get("pg_ctl_options")
        .is_some_and(|o| !o.is_empty())
    {
        notes.push(format!(
            "{launcher}: pg_ctl.conf's pg_ctl_options are not carried over"
        ));
    }
    let mut env_settings = Settings::default();
    pg_settings(
        &conf_dir.join("environment"),
        host,
        &user,
        &mut env_settings,
        0,
    );
    let mut env = env_settings.values;
    env.retain(|k, _| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    // pg_ctlcluster's environment keys are upper case in the file; the
    // parser lowered them.
    let env: BTreeMap<String, String> = env
        .into_iter()
        .map(|(k, v)| (k.to_ascii_uppercase(), v))
        .collect();
    let port = s.get("port").cloned().unwrap_or_else(|| "5432".into());
    let sockets = s
        .get("unix_socket_directories")
        .cloned()
        .unwrap_or_else(|| "/var/run/postgresql".into());
    let socket_dir = sockets
        .split(',')
        .map(str::trim)
        .find(|d| !d.is_empty())
        .map(str::to_string);
    let mut runtime_directory = Vec::new();
    for d in [socket_dir.clone(), s.get("external_pid_file").cloned()]
        .into_iter()
        .flatten()
    {
        let d = if d.ends_with(".pid") {
            Path::new(&d)
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        } else {
            d
        };
        let under = d
            .strip_prefix("/var/run/")
            .or_else(|| d.strip_prefix("/run/"));
        let name_ok = |n: &&str| {
            !n.is_empty()
                && !n.starts_with('.')
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if let Some(name) = under.filter(name_ok) {
            if !runtime_directory.iter().any(|r| r == name) {
                runtime_directory.push(name.to_string());
            }
        }
    }
    // warmer (root) writes the host PID there: only a file right in a
    // runtime directory it made for the cluster's owner.
    let pid_file = s
        .get("external_pid_file")
        .filter(|p| !p.is_empty())
        .and_then(|p| {
            let path = Path::new(p);
            let dir = path.parent()?.to_str()?;
            let under = dir
                .strip_prefix("/var/run/")
                .or_else(|| dir.strip_prefix("/run/"))?;
            let file_ok = path
                .file_name()?
                .to_str()
                .is_some_and(|f| !f.starts_with('.'));
            (file_ok && runtime_directory.iter().any(|r| r == under)).then(|| p.clone())
        });
    if s.get("external_pid_file").is_some_and(|p| !p.is_empty()) && pid_file.is_none() {
        notes.push(format!(
            "{launcher}: external_pid_file is outside the cluster's runtime directory: warmer does not write it"
        ));
    }
    let isready = bin.join("pg_isready");
    let mut probe = vec![isready.display().to_string(), "-q".into()];
    match &socket_dir {
        Some(d) => probe.extend(["-h".into(), d.clone()]),
        None => probe.extend(["-h".into(), "127.0.0.1".into()]),
    }
    // As the cluster's owner, whose role always exists (as root, every
    // probe logs `role "root" does not exist`).
    probe.extend(["-p".into(), port.clone(), "-U".into(), user.clone()]);
    let ready = format!(
        "exec: [{}]",
        probe
            .iter()
            .map(|w| serde_json::to_string(w).expect("strings serialize"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    notes.push(format!(
        "{launcher} runs {} in the background as {user}; warmer runs it in the foreground, as {user}, and its log goes to the journal instead of /var/log/postgresql",
        postgres.display()
    ));
    // What the server reads at start: its settings, who may connect.
    let mut digest_files = settings.files.clone();
    for (key, default) in [("hba_file", "pg_hba.conf"), ("ident_file", "pg_ident.conf")] {
        let f = s
            .get(key)
            .cloned()
            .unwrap_or_else(|| conf_dir.join(default).display().to_string());
        if plain(&f) && host.exists(Path::new(&f)) {
            digest_files.push(f);
        }
    }
    Ok(Foreground {
        launcher,
        argv: vec![
            postgres.display().to_string(),
            "-D".into(),
            data.clone(),
            "-c".into(),
            format!("config_file={}", conf.display()),
        ],
        user,
        group,
        runtime_directory,
        state: vec![data],
        digest_files,
        pid_file,
        ready,
        env,
        // `pg_ctlcluster stop -m fast` is SIGINT to the postmaster; reload
        // is SIGHUP. pg_ctl would find the PID in postmaster.pid, which
        // holds the PID in the service's own namespace.
        dropin: vec![
            "KillSignal=SIGINT".into(),
            "ExecReload=".into(),
            "ExecReload=/bin/kill -HUP $MAINPID".into(),
        ],
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's files for cluster 15/main, as pg_createcluster writes them.
    struct Debian {
        files: BTreeMap<PathBuf, String>,
    }

    impl Debian {
        fn new() -> Self {
            let mut files = BTreeMap::new();
            files.insert(
                "/etc/postgresql/15/main/postgresql.conf".into(),
                "data_directory = '/var/lib/postgresql/15/main'\t\t# use data in another directory\n\
                 external_pid_file = '/var/run/postgresql/15-main.pid'\t\t\t# write an extra PID file\n\
                 port = 5432\t\t\t\t# (change requires restart)\n\
                 unix_socket_directories = '/var/run/postgresql'\t# comma-separated list\n\
                 #port = 1\n\
                 include_dir = 'conf.d'\n"
                    .into(),
            );
            files.insert(
                "/etc/postgresql/15/main/conf.d/local.conf".into(),
                "port=5433\n".into(),
            );
            files.insert(
                "/etc/postgresql/15/main/start.conf".into(),
                "# c\nauto\n".into(),
            );
            files.insert(
                "/etc/postgresql/15/main/environment".into(),
                "# environment variables\n".into(),
            );
            files.insert(
                "/etc/postgresql/15/main/pg_ctl.conf".into(),
                "pg_ctl_options = ''\n".into(),
            );
            files.insert("/usr/lib/postgresql/15/bin/postgres".into(), String::new());
            files.insert("/etc/postgresql/15/main".into(), String::new());
            files.insert("/etc/postgresql/15/main/pg_hba.conf".into(), String::new());
            files.insert("/var/lib/postgresql/15/main".into(), String::new());
            Debian { files }
        }
    }

    impl Host for Debian {
        fn read(&self, path: &Path, _user: &str) -> Option<String> {
            self.files.get(path).cloned()
        }
        fn owner(&self, path: &Path) -> Option<(String, String)> {
            self.files
                .contains_key(path)
                .then(|| ("postgres".into(), "postgres".into()))
        }
        fn exists(&self, path: &Path) -> bool {
            self.files.contains_key(path)
        }
        fn list(&self, dir: &Path) -> Vec<String> {
            self.files
                .keys()
                .filter(|p| p.parent() == Some(dir))
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        }
    }

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn debians_postgresql_unit_runs_postgres_as_its_owner() {
        let f = foreground(
            &argv("/usr/bin/pg_ctlcluster --skip-systemctl-redirect 15-main start"),
            &Debian::new(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            f.argv,
            argv("/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main -c config_file=/etc/postgresql/15/main/postgresql.conf")
        );
        assert_eq!(
            (f.user.as_str(), f.group.as_str()),
            ("postgres", "postgres")
        );
        assert_eq!(f.runtime_directory, ["postgresql"]);
        assert_eq!(f.state, ["/var/lib/postgresql/15/main"]);
        assert_eq!(
            f.digest_files,
            [
                "/etc/postgresql/15/main/postgresql.conf",
                "/etc/postgresql/15/main/conf.d/local.conf",
                "/etc/postgresql/15/main/pg_hba.conf"
            ]
        );
        assert_eq!(
            f.pid_file.as_deref(),
            Some("/var/run/postgresql/15-main.pid")
        );
        assert!(
            f.ready.contains("\"-p\", \"5433\""),
            "conf.d wins over postgresql.conf: {}",
            f.ready
        );
        assert!(f.dropin.contains(&"KillSignal=SIGINT".to_string()));
        assert!(f.env.is_empty());
        // The two-word form is the same cluster.
        let two = foreground(&argv("pg_ctlcluster 15 main start"), &Debian::new())
            .unwrap()
            .unwrap();
        assert_eq!(two.argv, f.argv);
    }

    #[test]
    fn what_pg_ctlcluster_would_refuse_is_refused() {
        let mut d = Debian::new();
        d.files.insert(
            "/etc/postgresql/15/main/start.conf".into(),
            "disabled\n".into(),
        );
        let e = foreground(&argv("pg_ctlcluster 15-main start"), &d)
            .unwrap()
            .unwrap_err();
        assert!(e.contains("disabled"), "{e}");
        for bad in [
            "pg_ctlcluster 15-main stop",
            "pg_ctlcluster 14-main start",
            "pg_ctlcluster -o -F 15-main start",
            "pg_ctlcluster ../../x-y start",
        ] {
            assert!(
                foreground(&argv(bad), &Debian::new()).unwrap().is_err(),
                "{bad}"
            );
        }
        assert!(foreground(&argv("/usr/sbin/nginx"), &Debian::new()).is_none());
        // What root would act on comes only from plain paths.
        let mut d = Debian::new();
        d.files.insert(
            "/etc/postgresql/15/main/conf.d/x.conf".into(),
            "external_pid_file = '/etc/passwd'\nunix_socket_directories = '/run/../etc'\n".into(),
        );
        let f = foreground(&argv("pg_ctlcluster 15-main start"), &d)
            .unwrap()
            .unwrap();
        assert_eq!(f.pid_file, None);
        assert!(f.runtime_directory.is_empty(), "{:?}", f.runtime_directory);
        d.files.insert(
            "/etc/postgresql/15/main/conf.d/y.conf".into(),
            "data_directory = '/var/lib/postgresql/../../../etc'\n".into(),
        );
        assert!(foreground(&argv("pg_ctlcluster 15-main start"), &d)
            .unwrap()
            .is_err());
    }

    #[test]
    fn root_follows_only_what_the_daemon_could_read() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        assert!(!readable_by(Path::new("/etc/shadow"), &nobody));
        assert!(readable_by(Path::new("/etc/passwd"), &nobody));
        assert_eq!(Real.read(Path::new("/etc/shadow"), "nobody"), None);
    }

    #[test]
    fn settings_lines_as_postgresql_reads_them() {
        assert_eq!(
            pg_line("a = 'it''s # here' # comment"),
            Some(("a".into(), "it's # here".into()))
        );
        assert_eq!(pg_line("Port 5432"), Some(("port".into(), "5432".into())));
        assert_eq!(pg_line("  # x = 1"), None);
    }
}
