//! A unit's `[Service]` settings as a manifest: what carries over, and
//! what does not (and why), as pure functions of the loaded unit.

use std::collections::BTreeMap;
use std::path::Path;

use super::cmdline;
use super::launchers::Foreground;
use super::unit::Unit;

/// What the operator chose on the command line.
#[derive(Debug, Clone, Default)]
pub struct Choices {
    /// A probe as `ready:` YAML (`http: "..."`), or `None` to decide.
    pub ready: Option<String>,
    /// `warm` or `persist`.
    pub mode: Option<String>,
}

/// What the service runs.
#[derive(Debug, Clone, Default)]
pub enum Start {
    /// The unit's `ExecStart=`.
    #[default]
    Unit,
    /// `--exec`: the operator's foreground command line instead.
    Given(Vec<String>),
    /// What a launcher in `ExecStart=` would have started
    /// ([`super::launchers`]).
    Launcher(Box<Foreground>),
}

/// The manifest's text, and the settings left behind.
#[derive(Debug, Clone)]
pub struct Translated {
    pub yaml: String,
    pub not_carried: Vec<(String, String)>,
    pub notes: Vec<String>,
    /// Lines `--enable` adds to the drop-in (a launcher's stop and reload).
    pub dropin: Vec<String>,
}

/// Settings the manifest carries, or that need nothing there.
const HANDLED: &[&str] = &[
    "Type",
    "ExecStart",
    "ExecStartPre",
    "Environment",
    "EnvironmentFile",
    "WorkingDirectory",
    "User",
    "Group",
    "SupplementaryGroups",
    "PrivateTmp",
    "ProtectSystem",
    "ProtectHome",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "NoNewPrivileges",
    "AmbientCapabilities",
    "CapabilityBoundingSet",
    "UMask",
    "RuntimeDirectory",
    "StateDirectory",
    "CacheDirectory",
    "LogsDirectory",
    "LimitNOFILE",
    "LimitNPROC",
    "LimitCORE",
    "LimitMEMLOCK",
    "LimitSTACK",
    "LimitAS",
    "LimitFSIZE",
    "LimitDATA",
    "TimeoutStartSec",
    "TimeoutStopSec",
    "TimeoutSec",
];

/// Settings the unit keeps under `--enable` (systemd's, not the
/// service's), so nothing is lost by leaving them out of the manifest.
const UNIT_KEEPS: &[&str] = &[
    "Restart",
    "RestartSec",
    "SuccessExitStatus",
    "SyslogIdentifier",
    "StandardOutput",
    "StandardError",
    "StandardInput",
    "ExecReload",
    "ExecStop",
    "ExecStopPost",
    "ExecStartPost",
    "KillMode",
    "KillSignal",
    "SendSIGKILL",
    "RemainAfterExit",
    "Slice",
    "Nice",
    "CPUQuota",
    "MemoryMax",
    "MemoryLimit",
    "TasksMax",
    "OOMScoreAdjust",
    "RuntimeDirectoryMode",
    "StateDirectoryMode",
    "CacheDirectoryMode",
    "LogsDirectoryMode",
    "RuntimeDirectoryPreserve",
    "NotifyAccess",
    "PIDFile",
    "GuessMainPID",
    "WatchdogSec",
    "RestartPreventExitStatus",
];

fn q(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

fn list(items: &[String]) -> String {
    format!(
        "[{}]",
        items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
    )
}

fn words(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| {
            cmdline::split(v)
                .unwrap_or_default()
                .into_iter()
                .map(|(w, _)| w)
        })
        .collect()
}

fn yes(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "on" => Some(true),
        "0" | "no" | "false" | "off" => Some(false),
        _ => None,
    }
}

/// A systemd time span (`90`, `20s`, `1min 30s`) as a manifest duration;
/// `None` for `0` and `infinity` (no limit: systemd's, not warmer's).
fn span(v: &str) -> Option<String> {
    let v = v.trim();
    let d = if v.bytes().all(|b| b.is_ascii_digit()) && !v.is_empty() {
        std::time::Duration::from_secs(v.parse().ok()?)
    } else {
        humantime::parse_duration(v).ok()?
    };
    (!d.is_zero()).then(|| humantime::format_duration(d).to_string())
}

/// Translates `unit` (with the environment its `EnvironmentFile=`s give at
/// adopt time, `file_env`) into a manifest.
pub fn translate(
    unit: &Unit,
    file_env: &BTreeMap<String, String>,
    choices: &Choices,
    start_with: &Start,
    digest_files: &[String],
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Translated, String> {
    const S: &str = "Service";
    let mut y = String::new();
    let mut not_carried = Vec::new();
    let mut notes = Vec::new();
    let env_values = unit.list(S, "Environment");
    let mut env = cmdline::assignments(&env_values);
    let mut expand_env = env.clone();
    expand_env.extend(file_env.clone());
    let ty = unit.get(S, "Type").unwrap_or_else(|| "simple".into());
    let starts = unit.list(S, "ExecStart");
    let fg = match start_with {
        Start::Launcher(f) => Some(f.as_ref()),
        _ => None,
    };
    let argv = match start_with {
        Start::Unit => {
            if ty == "forking" || ty == "oneshot" {
                return Err(format!(
                    "Type={ty}: warmer supervises a service that stays in the foreground (the parent of what it checkpoints); pass --exec 'COMMAND' that runs its daemon in the foreground (nginx: --exec \"/usr/sbin/nginx -g 'daemon off;'\"); the rest of the unit is carried over as usual"
                ));
            }
            let [start] = starts.as_slice() else {
                return Err(format!("expected one ExecStart=, found {}", starts.len()));
            };
            let exec = cmdline::exec(start, &expand_env)?;
            if exec.privileged {
                not_carried.push((
                    "ExecStart prefix + or !".into(),
                    "the service runs with the unit's user and sandbox".into(),
                ));
            }
            if start.contains('$') && !file_env.is_empty() {
                notes.push("ExecStart's variables were expanded from the unit's EnvironmentFile= now: adopt again after changing them".into());
            }
            exec.argv
        }
        Start::Given(argv) => {
            notes.push(format!("ExecStart={} replaced by --exec", starts.join(" ")));
            argv.clone()
        }
        Start::Launcher(f) => {
            notes.push(format!(
                "ExecStart={}: {} in the foreground",
                starts.join(" "),
                f.launcher
            ));
            notes.extend(f.notes.iter().cloned());
            f.argv.clone()
        }
    };
    y.push_str(&format!("exec: {}\n", list(&argv)));
    if let Some(w) = unit.get(S, "WorkingDirectory") {
        let w = w.trim_start_matches('-');
        if w.starts_with('/') {
            y.push_str(&format!("workdir: {}\n", q(w)));
        } else {
            not_carried.push((
                "WorkingDirectory".into(),
                format!("{w:?} is not an absolute path"),
            ));
        }
    }
    for (key, manifest_key) in [("User", "user"), ("Group", "group")] {
        let from_launcher = fg.map(|f| if key == "User" { &f.user } else { &f.group });
        if let Some(v) = unit
            .get(S, key)
            .filter(|v| !v.is_empty())
            .or(from_launcher.cloned())
        {
            y.push_str(&format!("{manifest_key}: {}\n", q(&v)));
        }
    }
    let groups = words(&unit.list(S, "SupplementaryGroups"));
    if !groups.is_empty() {
        y.push_str(&format!("supplementary_groups: {}\n", list(&groups)));
    }
    // The manifest's env: Environment= (and a launcher's) only; files stay files.
    if let Some(f) = fg {
        env.extend(f.env.clone());
    }
    env.retain(|k, _| !k.is_empty());
    if !env.is_empty() {
        y.push_str("env:\n");
        for (k, v) in &env {
            y.push_str(&format!("  {}: {}\n", q(k), q(v)));
        }
    }
    let files = unit.list(S, "EnvironmentFile");
    if !files.is_empty() {
        y.push_str(&format!("env_file: {}\n", list(&files)));
    }
    let mut pre = Vec::new();
    for p in unit.list(S, "ExecStartPre") {
        let e = cmdline::exec(&p, &expand_env)?;
        let mut argv = e.argv.clone();
        let mut prefix = String::new();
        if e.privileged {
            prefix.push('+');
        }
        if e.ignore_failure {
            prefix.push('-');
        }
        argv[0] = format!("{prefix}{}", argv[0]);
        pre.push(list(&argv));
    }
    if !pre.is_empty() {
        y.push_str(&format!("exec_start_pre: [{}]\n", pre.join(", ")));
    }
    // The sandbox.
    let mut sb = String::new();
    let paths = |key: &str,
                 manifest_key: &str,
                 sb: &mut String,
                 not_carried: &mut Vec<(String, String)>| {
        let mut keep = Vec::new();
        for w in words(&unit.list(S, key)) {
            let (optional, p) = match w.strip_prefix('-') {
                Some(p) => (true, p.trim_start_matches('+').to_string()),
                None => (false, w.trim_start_matches('+').to_string()),
            };
            let p = if p.len() > 1 {
                p.trim_end_matches('/').to_string()
            } else {
                p
            };
            if optional && !exists(Path::new(&p)) {
                not_carried.push((format!("{key}=-{p}"), "it does not exist here".into()));
                continue;
            }
            keep.push(p);
        }
        if !keep.is_empty() {
            sb.push_str(&format!("  {manifest_key}: {}\n", list(&keep)));
        }
        keep
    };
    let rw = paths(
        "ReadWritePaths",
        "read_write_paths",
        &mut sb,
        &mut not_carried,
    );
    paths(
        "ReadOnlyPaths",
        "read_only_paths",
        &mut sb,
        &mut not_carried,
    );
    paths(
        "InaccessiblePaths",
        "inaccessible_paths",
        &mut sb,
        &mut not_carried,
    );
    for (key, manifest_key) in [
        ("PrivateTmp", "private_tmp"),
        ("NoNewPrivileges", "no_new_privileges"),
    ] {
        if let Some(b) = unit.get(S, key).as_deref().and_then(yes) {
            sb.push_str(&format!("  {manifest_key}: {b}\n"));
        }
    }
    for (key, manifest_key, words_ok) in [
        ("ProtectSystem", "protect_system", &["full", "strict"][..]),
        ("ProtectHome", "protect_home", &["read-only", "tmpfs"][..]),
    ] {
        if let Some(v) = unit.get(S, key) {
            match yes(&v) {
                Some(b) => sb.push_str(&format!("  {manifest_key}: {b}\n")),
                None if words_ok.contains(&v.as_str()) => {
                    sb.push_str(&format!("  {manifest_key}: {v}\n"))
                }
                None => not_carried.push((format!("{key}={v}"), "not a value warmer knows".into())),
            }
        }
    }
    let caps = words(&unit.list(S, "AmbientCapabilities"));
    if !caps.is_empty() {
        sb.push_str(&format!("  ambient_capabilities: {}\n", list(&caps)));
    }
    if unit.get(S, "CapabilityBoundingSet").is_some() {
        // An empty assignment means no capabilities at all.
        let b = words(&unit.list(S, "CapabilityBoundingSet"));
        sb.push_str(&format!("  capability_bounding_set: {}\n", list(&b)));
    }
    if let Some(u) = unit.get(S, "UMask") {
        sb.push_str(&format!("  umask: {}\n", q(&u)));
    }
    let mut state = Vec::new();
    for (key, manifest_key, base) in [
        ("RuntimeDirectory", "runtime_directory", "/run"),
        ("StateDirectory", "state_directory", "/var/lib"),
        ("CacheDirectory", "cache_directory", "/var/cache"),
        ("LogsDirectory", "logs_directory", "/var/log"),
    ] {
        let mut names = words(&unit.list(S, key));
        if let (Some(f), "RuntimeDirectory") = (fg, key) {
            for n in &f.runtime_directory {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        if !names.is_empty() {
            sb.push_str(&format!("  {manifest_key}: {}\n", list(&names)));
            if key == "StateDirectory" {
                state.extend(names.iter().map(|n| format!("{base}/{n}")));
            }
        }
    }
    for (key, manifest_key) in [
        ("LimitNOFILE", "limit_nofile"),
        ("LimitNPROC", "limit_nproc"),
        ("LimitCORE", "limit_core"),
        ("LimitMEMLOCK", "limit_memlock"),
        ("LimitSTACK", "limit_stack"),
        ("LimitAS", "limit_as"),
        ("LimitFSIZE", "limit_fsize"),
        ("LimitDATA", "limit_data"),
    ] {
        if let Some(v) = unit.get(S, key) {
            let ok = v
                .split(':')
                .all(|p| p == "infinity" || p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty());
            if ok {
                sb.push_str(&format!("  {manifest_key}: {}\n", q(&v)));
            } else {
                not_carried.push((
                    format!("{key}={v}"),
                    "warmer takes numbers, SOFT:HARD or infinity".into(),
                ));
            }
        }
    }
    if !sb.is_empty() {
        y.push_str("sandbox:\n");
        y.push_str(&sb);
    }
    // Readiness.
    let ready = match (&choices.ready, ty.as_str()) {
        (Some(r), _) => r.clone(),
        (None, _) if fg.is_some() => fg.map(|f| f.ready.clone()).unwrap_or_default(),
        (None, "notify") => "notify: true".into(),
        (None, _) => {
            return Err(format!(
                "Type={ty}: warmer cannot tell when it is ready; pass --ready http://127.0.0.1:PORT/PATH, --ready tcp:HOST:PORT, --ready exec:COMMAND or --ready notify"
            ))
        }
    };
    y.push_str(&format!("ready:\n  {ready}\n"));
    let mut timeout = |key: &str| {
        let v = unit.get(S, key).or_else(|| unit.get(S, "TimeoutSec"))?;
        let t = span(&v);
        if t.is_none() {
            notes.push(format!(
                "{key}={v} (no limit): warmer's default applies; set it in the manifest to change it"
            ));
        }
        t
    };
    if let Some(t) = timeout("TimeoutStartSec") {
        y.push_str(&format!("  timeout: {t}\n"));
    }
    if let Some(t) = timeout("TimeoutStopSec") {
        y.push_str(&format!("stop:\n  timeout: {t}\n"));
    }
    if let Some(p) = fg.and_then(|f| f.pid_file.as_ref()) {
        y.push_str(&format!("pid_file: {}\n", q(p)));
    }
    if let Some(m) = &choices.mode {
        y.push_str(&format!("mode: {m}\n"));
    }
    // What the service writes that its memory depends on: its state
    // directories and the writable paths, but not its logs or temp files.
    for p in rw {
        if !(p.starts_with("/var/log")
            || p.starts_with("/tmp")
            || p.starts_with("/var/tmp")
            || p.starts_with("/run"))
        {
            state.push(p);
        }
    }
    if let Some(f) = fg {
        state.extend(f.state.iter().cloned());
    }
    state.sort();
    state.dedup();
    if !state.is_empty() {
        y.push_str(&format!("state: {}\n", list(&state)));
    }
    if !digest_files.is_empty() {
        y.push_str(&format!("digest:\n  files: {}\n", list(digest_files)));
    }
    for k in unit.keys(S) {
        if HANDLED.contains(&k.as_str()) || UNIT_KEEPS.contains(&k.as_str()) {
            continue;
        }
        not_carried.push((
            k,
            "not supported by warmer's sandbox (the service runs without it)".into(),
        ));
    }
    Ok(Translated {
        yaml: y,
        not_carried,
        notes,
        dropin: fg.map(|f| f.dropin.clone()).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOMCAT: &str = "[Service]\n\
        Environment=\"CATALINA_HOME=/usr/share/tomcat10\"\n\
        Environment=\"JAVA_OPTS=-Djava.awt.headless=true\"\n\
        Type=simple\n\
        ExecStartPre=+/usr/libexec/tomcat10/tomcat-update-policy.sh\n\
        ExecStart=/bin/sh /usr/libexec/tomcat10/tomcat-start.sh\n\
        SuccessExitStatus=143\n\
        User=tomcat\nGroup=tomcat\nPrivateTmp=yes\n\
        AmbientCapabilities=CAP_NET_BIND_SERVICE\nNoNewPrivileges=true\n\
        CacheDirectory=tomcat10\nCacheDirectoryMode=750\nProtectSystem=strict\n\
        ReadWritePaths=/etc/tomcat10/Catalina/\nReadWritePaths=/var/lib/tomcat10/webapps/\n\
        ReadWritePaths=/var/log/tomcat10/\nMemoryDenyWriteExecute=true\n";

    #[test]
    fn debians_tomcat_unit_becomes_a_valid_manifest() {
        let u = Unit::from_texts("tomcat10.service", &[("t".into(), TOMCAT.into())]);
        let t = translate(
            &u,
            &BTreeMap::new(),
            &Choices {
                ready: Some("http: \"http://127.0.0.1:8080/\"".into()),
                mode: None,
            },
            &Start::Unit,
            &["/usr/share/tomcat10/lib".into()],
            &|_| true,
        )
        .unwrap();
        let m = crate::manifest::Manifest::parse("tomcat10", Path::new("tomcat10.yaml"), &t.yaml)
            .unwrap_or_else(|e| panic!("{e}\n{}", t.yaml));
        assert_eq!(m.exec, ["/bin/sh", "/usr/libexec/tomcat10/tomcat-start.sh"]);
        let s = m.sandbox.unwrap();
        assert_eq!(s.user.as_deref(), Some("tomcat"));
        assert_eq!(s.protect_system, crate::manifest::ProtectSystem::Strict);
        assert_eq!(s.read_write_paths.len(), 3);
        assert_eq!(s.cache_directory, ["tomcat10"]);
        assert!(m.exec_start_pre[0].privileged);
        assert_eq!(m.env["CATALINA_HOME"], "/usr/share/tomcat10");
        assert_eq!(
            m.state,
            [
                std::path::PathBuf::from("/etc/tomcat10/Catalina"),
                "/var/lib/tomcat10/webapps".into()
            ],
            "not its logs"
        );
        assert!(
            t.not_carried
                .iter()
                .any(|(k, _)| k == "MemoryDenyWriteExecute"),
            "{:?}",
            t.not_carried
        );
        let no_ready = translate(
            &u,
            &BTreeMap::new(),
            &Choices::default(),
            &Start::Unit,
            &[],
            &|_| true,
        )
        .unwrap_err();
        assert!(no_ready.contains("--ready"), "{no_ready}");
    }

    #[test]
    fn environment_files_expand_exec_and_stay_files() {
        let u = Unit::from_texts(
            "prometheus.service",
            &[(
                "p".into(),
                "[Service]\nType=notify\nUser=prometheus\nEnvironmentFile=/etc/default/prometheus\nExecStart=/usr/bin/prometheus $ARGS\nCapabilityBoundingSet=\nLimitNOFILE=32768\nTimeoutStopSec=20s\n"
                    .into(),
            )],
        );
        let env: BTreeMap<String, String> = [("ARGS".to_string(), "--a --b".to_string())].into();
        let t = translate(&u, &env, &Choices::default(), &Start::Unit, &[], &|_| true).unwrap();
        let m = crate::manifest::Manifest::parse("p", Path::new("p.yaml"), &t.yaml)
            .unwrap_or_else(|e| panic!("{e}\n{}", t.yaml));
        assert_eq!(m.exec, ["/usr/bin/prometheus", "--a", "--b"]);
        assert_eq!(m.env_files[0].path, Path::new("/etc/default/prometheus"));
        assert!(m.env.is_empty(), "values stay in their file");
        assert_eq!(m.ready.probe, crate::manifest::Probe::Notify);
        assert_eq!(m.stop_timeout, std::time::Duration::from_secs(20));
        assert_eq!(m.sandbox.unwrap().capability_bounding_set, Some(vec![]));
        let forking = Unit::from_texts(
            "pg.service",
            &[(
                "p".into(),
                "[Service]\nType=forking\nExecStart=/bin/x\n".into(),
            )],
        );
        assert!(translate(
            &forking,
            &env,
            &Choices::default(),
            &Start::Unit,
            &[],
            &|_| true
        )
        .unwrap_err()
        .contains("forking"));
    }
}
