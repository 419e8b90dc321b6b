//! Warnings `warmer validate` can give from what an image shows about the
//! service (things the manifest alone cannot tell).

use std::path::Path;

use crate::image::criu::OpenFile;
use crate::image::state::written::is_state;
use crate::manifest::{Manifest, Mode};

/// Files the image holds open for writing (in place or appending) that are
/// neither under `state:` nor `not_state:`: warmer treats them as state
/// (see [`crate::image::state::written`]), so a write after the checkpoint
/// makes the next start cold. Said once per file, with what to do about it.
pub fn unsaved_writes(m: &Manifest, files: &[OpenFile]) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    files
        .iter()
        .filter(|f| is_state(Path::new(&f.path), f.flags, &m.state, &m.not_state))
        .filter(|f| seen.insert(f.path.clone()))
        .map(|f| {
            let dir = Path::new(&f.path)
                .parent()
                .map_or_else(|| f.path.clone(), |d| d.display().to_string());
            let persist = if m.mode == Mode::Persist {
                ""
            } else {
                "; for restores across restarts, `mode: persist`"
            };
            format!(
                "the service's image holds {} open for writing, outside `state:`: warmer treats it as state, so once the service writes it after the checkpoint the next start is cold (list {dir} under `state:` to capture it{persist}; under `not_state:` if it is a log)",
                f.path
            )
        })
        .collect()
}

/// A manifest that pushes its images while giving the service environment
/// variables that look like secrets: the values travel in the image.
pub fn pushed_secrets(m: &Manifest) -> Vec<String> {
    if !m.remote.as_ref().is_some_and(|r| r.push) {
        return Vec::new();
    }
    let names: Vec<&str> = m
        .env
        .keys()
        .map(String::as_str)
        .filter(|n| crate::process::hooks::looks_secret(n))
        .collect();
    if names.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "remote.push sends the service's memory to the registry, and env gives it {}: their values travel in every pushed image (checkpoint.forbid_env refuses such a checkpoint; or remote: {{push: false}})",
        names.join(", ")
    )]
}

/// Settings a sandbox changes the meaning of: lazy restores (only with a
/// CRIU that gives the service's user namespace a userfaultfd:
/// `lazy_in_userns`, else always eager) and `tcp_established` (connections
/// come back closed: TCP repair needs CAP_NET_ADMIN over the host's
/// network).
pub fn sandbox_limits(m: &Manifest, lazy_in_userns: bool) -> Vec<String> {
    if m.sandbox.is_none() {
        return Vec::new();
    }
    let mut out = Vec::new();
    if m.restore_mode == crate::manifest::RestoreMode::Lazy && !lazy_in_userns {
        out.push(format!(
            "restore.mode: lazy with a user or sandbox: {}",
            crate::restore::NO_USERFAULTFD
        ));
    }
    if m.checkpoint.tcp_established {
        out.push("checkpoint.tcp_established with a user or sandbox: established connections are dumped but come back closed (TCP repair needs CAP_NET_ADMIN over the host's network), as after a peer's reset".to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandboxed_lazy_and_tcp_established_are_explained() {
        let m = Manifest::parse(
            "w",
            Path::new("w.yaml"),
            "exec: [a]\nready: {tcp: \"h:1\"}\nuser: nobody\nrestore: {mode: lazy}\ncheckpoint: {tcp_established: true}\n",
        )
        .unwrap();
        let w = sandbox_limits(&m, false);
        assert_eq!(w.len(), 2, "{w:?}");
        let w = sandbox_limits(&m, true);
        assert_eq!(w.len(), 1, "a CRIU that can restores lazily: {w:?}");
        assert!(w[0].contains("tcp_established"), "{w:?}");
        let plain = Manifest::parse(
            "w",
            Path::new("w.yaml"),
            "exec: [a]\nready: {tcp: \"h:1\"}\nrestore: {mode: lazy}\n",
        )
        .unwrap();
        assert!(sandbox_limits(&plain, false).is_empty());
    }

    fn file(path: &str, flags: i32) -> OpenFile {
        OpenFile {
            path: path.into(),
            flags: u64::try_from(flags).unwrap(),
            size: None,
            pos: 0,
        }
    }

    #[test]
    fn every_written_file_outside_state_and_not_state_is_reported_once() {
        let m = Manifest::parse(
            "db",
            Path::new("db.yaml"),
            "exec: [a]\nready: {tcp: \"h:1\"}\nstate: [\"/var/lib/db/wal\"]\nnot_state: [\"/srv/app/logs\"]\n",
        )
        .unwrap();
        let files = [
            file("/var/lib/db/main.db", libc::O_RDWR),
            file("/var/lib/db/main.db", libc::O_RDWR),
            file("/var/lib/db/wal/0001", libc::O_RDWR),
            file("/var/lib/db/audit", libc::O_WRONLY | libc::O_APPEND),
            file("/srv/app/logs/app.log", libc::O_WRONLY | libc::O_APPEND),
            file("/var/log/db.log", libc::O_WRONLY | libc::O_APPEND),
            file("/usr/lib/libc.so.6", libc::O_RDONLY),
        ];
        let w = unsaved_writes(&m, &files);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("/var/lib/db/main.db")
                && w[0].contains("list /var/lib/db under `state:`"),
            "{}",
            w[0]
        );
        assert!(w[0].contains("mode: persist"));
        assert!(
            w[1].contains("/var/lib/db/audit"),
            "appending is writing: {}",
            w[1]
        );
    }
}
