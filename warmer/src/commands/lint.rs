//! Warnings `warmer validate` can give from what an image shows about the
//! service (things the manifest alone cannot tell).

use std::path::Path;

use crate::image::criu::OpenFile;
use crate::manifest::{Manifest, Mode};

/// Places whose files are scratch or not data: a write there does not need
/// `state:` (a tmpfs, devices, kernel files, logs).
const NOT_DATA: &[&str] = &[
    "/tmp/",
    "/dev/",
    "/proc/",
    "/sys/",
    "/run/",
    "/var/log/",
    "/var/tmp/",
];

/// Files the image holds open for writing in place (not appending) outside
/// the manifest's `state:`: if the service writes them after the checkpoint,
/// CRIU refuses the restore ("bad size"), or restores memory that no longer
/// matches them. One warning per file.
pub fn unsaved_writes(m: &Manifest, files: &[OpenFile]) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    files
        .iter()
        .filter(|f| f.writes_in_place())
        .filter(|f| !NOT_DATA.iter().any(|p| f.path.starts_with(p)))
        .filter(|f| !f.path.ends_with(".log"))
        .filter(|f| !m.state.iter().any(|s| Path::new(&f.path).starts_with(s)))
        .filter(|f| seen.insert(f.path.clone()))
        .map(|f| {
            let dir = Path::new(&f.path)
                .parent()
                .map_or_else(|| f.path.clone(), |d| d.display().to_string());
            let persist = if m.mode == Mode::Persist {
                ""
            } else {
                " and, if it must survive restarts as written, `mode: persist`"
            };
            format!(
                "the service's image holds {} open for writing, outside `state:`: a write after the checkpoint makes restores fail (CRIU: bad size) or roll it back; list {dir} under `state:`{persist}",
                f.path
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, flags: i32) -> OpenFile {
        OpenFile {
            path: path.into(),
            flags: u64::try_from(flags).unwrap(),
            size: None,
        }
    }

    #[test]
    fn only_in_place_writes_of_data_outside_state_are_reported() {
        let m = Manifest::parse(
            "db",
            Path::new("db.yaml"),
            "exec: [a]\nready: {tcp: \"h:1\"}\nstate: [\"/var/lib/db/wal\"]\n",
        )
        .unwrap();
        let files = [
            file("/var/lib/db/main.db", libc::O_RDWR),
            file("/var/lib/db/main.db", libc::O_RDWR),
            file("/var/lib/db/wal/0001", libc::O_RDWR),
            file("/var/lib/db/audit", libc::O_WRONLY | libc::O_APPEND),
            file("/tmp/scratch", libc::O_RDWR),
            file("/srv/app/app.log", libc::O_WRONLY),
            file("/usr/lib/libc.so.6", libc::O_RDONLY),
        ];
        let w = unsaved_writes(&m, &files);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("/var/lib/db/main.db")
                && w[0].contains("list /var/lib/db under `state:`"),
            "{}",
            w[0]
        );
        assert!(w[0].contains("mode: persist"));
    }
}
