//! Ending what an earlier run of the same service left behind.
//!
//! A `kill -9` of warmer normally takes its service with it (the init's
//! PDEATHSIG). Not always: killed during `criu restore`, the restored tree's
//! parent was CRIU, not warmer, so nothing fires; the tree stays, stopped,
//! holding the service's port. Before anything starts, the next `warmer run`
//! (which holds the service's run lock, so no live warmer owns such a tree)
//! finds them by what only they can look like: a namespace init whose
//! arguments name this service and its run directory, and CRIU processes
//! working in that run directory. Killing the init ends its whole PID
//! namespace.

use std::path::Path;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// What was found and killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    pub pid: i32,
    pub what: String,
}

/// Kills every leftover of `service` (run directory `run_dir`). Returns them.
pub fn end(service: &str, run_dir: &Path) -> Vec<Leftover> {
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.filter_map(|d| d.ok()) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if u32::try_from(pid).is_ok_and(|p| p == me) {
            continue;
        }
        let Ok(raw) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if let Some(what) = classify(&argv, service, run_dir) {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                found.push(Leftover { pid, what });
            }
        }
    }
    found
}

/// Whether `argv` is a leftover of `service`: its namespace init, or CRIU
/// (restore, dump or lazy-pages) working in its run directory.
pub fn classify(argv: &[String], service: &str, run_dir: &Path) -> Option<String> {
    let home = run_dir.to_string_lossy();
    let first = argv.first()?;
    let is_init = first.ends_with(crate::process::init::INIT_BIN)
        || argv
            .get(1)
            .is_some_and(|a| a == crate::process::roles::INIT_ARG);
    if is_init {
        // warmer-init SERVICE HOME -- ...   or   warmer __init SERVICE HOME -- ...
        let rest = if first.ends_with(crate::process::init::INIT_BIN) {
            &argv[1..]
        } else {
            &argv[2..]
        };
        if rest.first().is_some_and(|s| s == service)
            && rest.get(1).is_some_and(|h| *h == home)
            && rest.get(2).is_some_and(|s| s == "--")
        {
            return Some("the service's namespace init from an earlier run".into());
        }
        return None;
    }
    let is_criu = Path::new(first).file_name().is_some_and(|n| n == "criu");
    let in_our_dir = argv
        .windows(2)
        .any(|w| w[0] == "--work-dir" && w[1] == home);
    (is_criu && in_our_dir).then(|| {
        format!(
            "criu {} from an earlier run",
            argv.get(1).map_or("", String::as_str)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn only_this_services_init_and_criu_are_leftovers() {
        let run = Path::new("/run/warmer/web");
        assert!(classify(
            &v(&["warmer-init", "web", "/run/warmer/web", "--", "app"]),
            "web",
            run
        )
        .is_some());
        assert!(classify(
            &v(&[
                "/usr/local/bin/warmer",
                "__init",
                "web",
                "/run/warmer/web",
                "--",
                "app"
            ]),
            "web",
            run
        )
        .is_some());
        assert!(classify(
            &v(&["warmer-init", "db", "/run/warmer/db", "--", "app"]),
            "web",
            run
        )
        .is_none());
        assert!(
            classify(
                &v(&["warmer-init", "web", "/other/run/web", "--", "app"]),
                "web",
                run
            )
            .is_none(),
            "another run dir: another installation"
        );
        assert!(classify(
            &v(&[
                "/usr/local/sbin/criu",
                "restore",
                "--work-dir",
                "/run/warmer/web"
            ]),
            "web",
            run
        )
        .is_some());
        assert!(classify(
            &v(&[
                "/usr/local/sbin/criu",
                "restore",
                "--work-dir",
                "/run/warmer/db"
            ]),
            "web",
            run
        )
        .is_none());
        assert!(classify(&v(&["python3", "web", "/run/warmer/web", "--"]), "web", run).is_none());
    }
}
