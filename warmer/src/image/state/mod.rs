//! State a service keeps outside memory (manifest `state: [paths]`).
//!
//! A database directory, a ledger, a /dev/shm file the service maps: CRIU
//! restores memory, not disks, and memory and disk must agree. So the paths
//! are copied into the image while CRIU holds the service frozen (from CRIU's
//! `post-dump` action script: `warmer` itself, see [`hook`]), with a
//! fingerprint of every file (size, mtime, symlink target).
//!
//! The rule: **an image is never restored over newer data.** Before a restore
//! the live paths are compared with the fingerprints ([`drift`]):
//! - all the same: restore; nothing is copied.
//! - paths captured on a tmpfs (`/dev/shm`) are gone, after a reboot: they go
//!   back from the image ([`put_back`]), everything else being the same.
//! - anything else changed (the service wrote after the checkpoint): the
//!   image is older than the data and is not restored: cold start on the
//!   current data.
//!
//! A put-back is all or nothing: the data that was live is kept aside until
//! the restored service is ready ([`PutBack`]), brought back if the restore
//! fails, and brought back at the next start if warmer died meanwhile
//! ([`recover`]).
//!
//! ```text
//! <image>/state/index.json     [{path, kind, mode, uid, gid, mtime, ...}, ...]
//! <image>/state/<n>/...        the copy of path n (file, or directory tree)
//! ```
//!
//! The cache makes every stored file 0600 root, so modes, owners and times are
//! recorded in the index and re-applied on the way back.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};
use serde::{Deserialize, Serialize};

mod put_back;
pub mod written;

pub use put_back::{put_back, recover, PutBack, Recovered};

pub const STATE_DIR: &str = "state";
const INDEX: &str = "index.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state path {}: {what}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("state path {}: unsupported file type (only files, directories, symlinks)", path.display())]
    Unsupported { path: PathBuf },
    #[error("state index {}: {reason}", path.display())]
    Index { path: PathBuf, reason: String },
    #[error("state path {}: an earlier put-back was neither committed nor undone", path.display())]
    Pending { path: PathBuf },
}

pub(crate) fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { path, what, source }
}

/// One filesystem object of a captured path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Relative to the captured path ("" for the path itself).
    pub rel: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    /// Files: the size at the checkpoint (absent in indexes of older images).
    #[serde(default)]
    pub size: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Captured {
    pub path: PathBuf,
    /// `None`: the path did not exist at checkpoint time (so it must not at restore).
    pub nodes: Option<Vec<Node>>,
}

/// Copies `paths` into `<image_dir>/state/`.
pub fn capture(paths: &[PathBuf], image_dir: &Path) -> Result<(), StateError> {
    let root = image_dir.join(STATE_DIR);
    fs::create_dir_all(&root).map_err(io_err(&root, "create"))?;
    let mut index = Vec::new();
    for (n, path) in paths.iter().enumerate() {
        let dst = root.join(n.to_string());
        let nodes = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(path, "stat")(e)),
            Ok(_) => {
                let mut nodes = Vec::new();
                copy_out(path, Some(&dst), "", &mut nodes)?;
                Some(nodes)
            }
        };
        index.push(Captured {
            path: path.clone(),
            nodes,
        });
    }
    let idx = root.join(INDEX);
    fs::write(
        &idx,
        serde_json::to_vec_pretty(&index).expect("index serializes"),
    )
    .map_err(io_err(&idx, "write"))
}

fn node(rel: &str, kind: Kind, md: &fs::Metadata) -> Node {
    Node {
        rel: rel.to_string(),
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        atime: (md.atime(), md.atime_nsec()),
        mtime: (md.mtime(), md.mtime_nsec()),
        size: (kind == Kind::File).then(|| md.size()),
    }
}

/// How the live state paths compare with an image's captured state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// Every path is exactly as captured (absent ones still absent).
    Same,
    /// The same, except these paths, captured on a tmpfs, are gone (a reboot
    /// emptied it): they go back with the image.
    Vanished(Vec<PathBuf>),
    /// The data moved on since the checkpoint (the reason names the path):
    /// restoring would roll it back.
    Changed(String),
}

fn read_index(image_dir: &Path) -> Result<Vec<Captured>, StateError> {
    let idx = image_dir.join(STATE_DIR).join(INDEX);
    let bytes = fs::read(&idx).map_err(io_err(&idx, "read"))?;
    serde_json::from_slice(&bytes).map_err(|e| StateError::Index {
        path: idx.clone(),
        reason: e.to_string(),
    })
}

/// Compares everything on disk the image depends on with the live data:
/// the `state:` paths it captured ([`drift`]), then every other file it
/// holds open for writing ([`written::drift`]; `not_state`: the manifest's
/// exclusions). The first difference decides.
pub fn drift_all(image_dir: &Path, not_state: &[PathBuf]) -> Result<Drift, StateError> {
    let (declared, captured) = if has_state(image_dir) {
        (drift(image_dir)?, captured_paths(image_dir)?)
    } else {
        (Drift::Same, Vec::new())
    };
    if let Drift::Changed(_) = declared {
        return Ok(declared);
    }
    match written::drift(image_dir, &captured, not_state)? {
        Some(why) => Ok(Drift::Changed(why)),
        None => Ok(declared),
    }
}

/// Whether `path` (or, if it does not exist, its nearest existing ancestor)
/// is on a tmpfs: its contents do not survive a reboot.
fn on_tmpfs(path: &Path) -> bool {
    let mut p = Some(path);
    while let Some(cur) = p {
        if let Ok(s) = nix::sys::statfs::statfs(cur) {
            return s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC;
        }
        p = cur.parent();
    }
    false
}

/// Compares the live state paths with the fingerprints in `image_dir`.
pub fn drift(image_dir: &Path) -> Result<Drift, StateError> {
    let index = read_index(image_dir)?;
    let mut vanished = Vec::new();
    for (n, c) in index.iter().enumerate() {
        let live = fs::symlink_metadata(&c.path).is_ok();
        match (&c.nodes, live) {
            (None, false) => {}
            (None, true) => {
                return Ok(Drift::Changed(format!(
                    "{} was created after the checkpoint",
                    c.path.display()
                )))
            }
            (Some(_), false) if on_tmpfs(&c.path) => vanished.push(c.path.clone()),
            (Some(_), false) => {
                return Ok(Drift::Changed(format!(
                    "{} is gone since the checkpoint",
                    c.path.display()
                )))
            }
            (Some(nodes), true) => {
                let stored = image_dir.join(STATE_DIR).join(n.to_string());
                if let Some(why) = tree_differs(&c.path, &stored, nodes)? {
                    return Ok(Drift::Changed(why));
                }
            }
        }
    }
    Ok(if vanished.is_empty() {
        Drift::Same
    } else {
        Drift::Vanished(vanished)
    })
}

/// The first difference between the live tree at `root` and `nodes`.
fn tree_differs(root: &Path, stored: &Path, nodes: &[Node]) -> Result<Option<String>, StateError> {
    let mut live = Vec::new();
    copy_out(root, None, "", &mut live)?;
    let join = |base: &Path, rel: &str| {
        if rel.is_empty() {
            base.to_path_buf()
        } else {
            base.join(rel)
        }
    };
    let by_rel: std::collections::BTreeMap<&str, &Node> =
        live.iter().map(|n| (n.rel.as_str(), n)).collect();
    for want in nodes {
        let path = join(root, &want.rel);
        let Some(got) = by_rel.get(want.rel.as_str()) else {
            return Ok(Some(format!(
                "{} is gone since the checkpoint",
                path.display()
            )));
        };
        let changed = got.kind != want.kind
            || match want.kind {
                Kind::Dir => false,
                Kind::File => {
                    got.mtime != want.mtime || want.size.is_some_and(|s| got.size != Some(s))
                }
                Kind::Symlink => {
                    let target = fs::read_link(&path).map_err(io_err(&path, "readlink"))?;
                    let from = join(stored, &want.rel);
                    let saved = fs::read(&from).map_err(io_err(&from, "read"))?;
                    target.as_os_str().as_bytes() != saved.as_slice()
                }
            };
        if changed {
            return Ok(Some(format!(
                "{} changed since the checkpoint",
                path.display()
            )));
        }
    }
    let known: std::collections::BTreeSet<&str> = nodes.iter().map(|n| n.rel.as_str()).collect();
    if let Some(extra) = live.iter().find(|n| !known.contains(n.rel.as_str())) {
        return Ok(Some(format!(
            "{} was created after the checkpoint",
            join(root, &extra.rel).display()
        )));
    }
    Ok(None)
}

/// Records the tree at `src` as nodes and, with a `dst`, copies it there
/// (without one: only the listing, to compare a live tree with an image).
fn copy_out(
    src: &Path,
    dst: Option<&Path>,
    rel: &str,
    nodes: &mut Vec<Node>,
) -> Result<(), StateError> {
    let md = fs::symlink_metadata(src).map_err(io_err(src, "stat"))?;
    let ft = md.file_type();
    if ft.is_dir() {
        if let Some(dst) = dst {
            fs::create_dir(dst).map_err(io_err(dst, "create"))?;
        }
        nodes.push(node(rel, Kind::Dir, &md));
        let mut children: Vec<_> = fs::read_dir(src)
            .map_err(io_err(src, "list"))?
            .filter_map(|d| d.ok())
            .map(|d| d.file_name())
            .collect();
        children.sort();
        for c in children {
            let child_rel = if rel.is_empty() {
                c.to_string_lossy().into_owned()
            } else {
                format!("{rel}/{}", c.to_string_lossy())
            };
            let child_dst = dst.map(|d| d.join(&c));
            copy_out(&src.join(&c), child_dst.as_deref(), &child_rel, nodes)?;
        }
    } else if ft.is_file() {
        if let Some(dst) = dst {
            copy_regular(src, dst, &md)?;
        }
        nodes.push(node(rel, Kind::File, &md));
    } else if ft.is_symlink() {
        if let Some(dst) = dst {
            let target = fs::read_link(src).map_err(io_err(src, "readlink"))?;
            // Stored as a file holding the target: the cache stores files only.
            fs::write(dst, target.as_os_str().as_bytes()).map_err(io_err(dst, "write"))?;
        }
        nodes.push(node(rel, Kind::Symlink, &md));
    } else {
        return Err(StateError::Unsupported {
            path: src.to_path_buf(),
        });
    }
    Ok(())
}

/// Copies the regular file `src` (as `seen` by lstat) to `dst`: never
/// through a link, and never a FIFO or device swapped in after the look
/// (root reads a directory the service's user may write; an open of a FIFO
/// would block the dump, a device's could do anything).
fn copy_regular(src: &Path, dst: &Path, seen: &fs::Metadata) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut from = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(src)
        .map_err(io_err(src, "open"))?;
    let md = from.metadata().map_err(io_err(src, "stat"))?;
    if !md.is_file() || (md.dev(), md.ino()) != (seen.dev(), seen.ino()) {
        return Err(StateError::Unsupported {
            path: src.to_path_buf(),
        });
    }
    let mut to = fs::File::create(dst).map_err(io_err(dst, "create"))?;
    io::copy(&mut from, &mut to).map_err(io_err(src, "copy"))?;
    Ok(())
}

/// The CRIU action script's work: on `post-dump` (the service is still
/// frozen) copy the requested paths into the images directory and
/// fingerprint every file the tree holds open for writing
/// ([`written::capture`]). Other action points: nothing. The request's
/// contract is in [`crate::process::roles`].
pub fn hook(req: &crate::process::roles::ActionRequest) -> Result<(), StateError> {
    if !req.captures_state() {
        return Ok(());
    }
    let (dir, paths) = req.capture_plan().map_err(|e| StateError::Index {
        path: PathBuf::from("$".to_string() + crate::process::roles::STATE_PATHS_ENV),
        reason: e.to_string(),
    })?;
    // The tmpfs this dump leaves out as empty must be so, frozen.
    let empty = req.empty_dirs().map_err(|e| StateError::Index {
        path: PathBuf::from("$".to_string() + crate::process::roles::EMPTY_TMPFS_ENV),
        reason: e.to_string(),
    })?;
    for d in &empty {
        let has_entries = fs::read_dir(d).map_err(io_err(d, "list"))?.next().is_some();
        if has_entries {
            return Err(StateError::Index {
                path: d.clone(),
                reason: "a tmpfs left out of the image as empty was written before the freeze"
                    .into(),
            });
        }
    }
    if !paths.is_empty() {
        capture(&paths, &dir)?;
    }
    written::capture(&dir)
}

/// The paths an image captured.
pub fn captured_paths(image_dir: &Path) -> Result<Vec<PathBuf>, StateError> {
    Ok(read_index(image_dir)?.into_iter().map(|c| c.path).collect())
}

/// Whether an image carries captured state.
pub fn has_state(image_dir: &Path) -> bool {
    image_dir.join(STATE_DIR).join(INDEX).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tmpfs_left_out_as_empty_must_still_be_empty_when_frozen() {
        let t = tempfile::tempdir().unwrap();
        let (empty, written) = (t.path().join("var-tmp"), t.path().join("shm"));
        fs::create_dir(&empty).unwrap();
        fs::create_dir(&written).unwrap();
        let image = t.path().join("image");
        fs::create_dir(&image).unwrap();
        let req = |dirs: &[&Path]| crate::process::roles::ActionRequest {
            action: crate::process::roles::POST_DUMP.into(),
            image_dir: Some(image.clone()),
            state_paths: Some("[]".into()),
            empty_tmpfs: Some(serde_json::to_string(dirs).unwrap()),
        };
        hook(&req(&[&empty, &written])).unwrap();
        fs::write(written.join("PostgreSQL.1"), b"x").unwrap();
        let e = hook(&req(&[&empty, &written])).unwrap_err();
        assert!(e.to_string().contains("written before the freeze"), "{e}");
    }

    #[test]
    fn capture_and_put_back_restore_contents_modes_and_times() {
        let t = tempfile::tempdir().unwrap();
        let live = t.path().join("data");
        fs::create_dir(&live).unwrap();
        fs::write(live.join("dump.rdb"), b"version 1").unwrap();
        fs::set_permissions(live.join("dump.rdb"), fs::Permissions::from_mode(0o640)).unwrap();
        symlink("dump.rdb", live.join("latest")).unwrap();
        fs::create_dir(live.join("sub")).unwrap();
        fs::write(live.join("sub/x"), b"x").unwrap();
        let single = t.path().join("shm-file");
        fs::write(&single, b"shared").unwrap();
        let absent = t.path().join("absent");
        let before = fs::metadata(live.join("dump.rdb")).unwrap();

        let image = t.path().join("image");
        fs::create_dir(&image).unwrap();
        capture(&[live.clone(), single.clone(), absent.clone()], &image).unwrap();
        assert!(has_state(&image));

        // The service moves on after the checkpoint.
        fs::write(live.join("dump.rdb"), b"version 2, longer").unwrap();
        fs::write(live.join("new-file"), b"n").unwrap();
        fs::remove_file(&single).unwrap();
        fs::write(&absent, b"created later").unwrap();

        let all = captured_paths(&image).unwrap();
        put_back(&image, &all).unwrap().commit().unwrap();
        assert_eq!(fs::read(live.join("dump.rdb")).unwrap(), b"version 1");
        assert!(!live.join("new-file").exists());
        assert_eq!(fs::read(live.join("sub/x")).unwrap(), b"x");
        assert_eq!(
            fs::read_link(live.join("latest")).unwrap(),
            Path::new("dump.rdb")
        );
        assert_eq!(fs::read(&single).unwrap(), b"shared");
        assert!(!absent.exists(), "absent at checkpoint, absent after");
        let after = fs::metadata(live.join("dump.rdb")).unwrap();
        assert_eq!(after.mode() & 0o7777, 0o640);
        assert_eq!(after.mtime(), before.mtime());
        assert_eq!(after.mtime_nsec(), before.mtime_nsec());
        let leftovers: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .filter_map(|d| d.ok())
            .filter(|d| d.file_name().to_string_lossy().contains("warmer-"))
            .collect();
        assert!(leftovers.is_empty());
    }
}

#[cfg(test)]
mod drift_tests {
    use super::*;

    fn image_of(t: &Path, paths: &[PathBuf]) -> PathBuf {
        let image = t.join("image");
        fs::create_dir(&image).unwrap();
        capture(paths, &image).unwrap();
        image
    }

    #[test]
    fn untouched_data_is_the_same() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        fs::create_dir(&data).unwrap();
        fs::write(data.join("ledger"), "1\n").unwrap();
        symlink("ledger", data.join("current")).unwrap();
        let image = image_of(t.path(), &[data.clone(), t.path().join("absent")]);
        assert_eq!(drift(&image).unwrap(), Drift::Same);
    }

    #[test]
    fn every_kind_of_write_after_the_checkpoint_is_a_change() {
        type Edit = fn(&Path);
        let cases: [(&str, Edit); 6] = [
            ("append", |d| {
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .open(d.join("ledger"))
                    .unwrap();
                std::io::Write::write_all(&mut f, b"2\n").unwrap();
            }),
            ("same size, new bytes", |d| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                fs::write(d.join("ledger"), "9\n").unwrap();
            }),
            ("new file", |d| fs::write(d.join("journal"), "x").unwrap()),
            ("removed file", |d| {
                fs::remove_file(d.join("ledger")).unwrap()
            }),
            ("retargeted symlink", |d| {
                fs::remove_file(d.join("current")).unwrap();
                symlink("journal", d.join("current")).unwrap();
            }),
            ("whole dir gone", |d| fs::remove_dir_all(d).unwrap()),
        ];
        for (what, edit) in cases {
            let t = tempfile::tempdir().unwrap();
            let data = t.path().join("data");
            fs::create_dir(&data).unwrap();
            fs::write(data.join("ledger"), "1\n").unwrap();
            symlink("ledger", data.join("current")).unwrap();
            let image = image_of(t.path(), std::slice::from_ref(&data));
            edit(&data);
            match drift(&image).unwrap() {
                Drift::Changed(why) => {
                    assert!(why.contains(&*data.to_string_lossy()), "{what}: {why}")
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_path_created_after_the_checkpoint_is_a_change() {
        let t = tempfile::tempdir().unwrap();
        let later = t.path().join("later");
        let image = image_of(t.path(), std::slice::from_ref(&later));
        fs::write(&later, "new").unwrap();
        assert!(matches!(drift(&image).unwrap(), Drift::Changed(_)));
    }

    #[test]
    fn a_vanished_tmpfs_file_goes_back_but_a_vanished_disk_file_is_a_change() {
        let shm_dir = Path::new("/dev/shm");
        if !on_tmpfs(shm_dir) {
            panic!("/dev/shm is not a tmpfs here: cannot test the tmpfs rule");
        }
        let shm = tempfile::Builder::new()
            .prefix("warmer-drift-")
            .tempfile_in(shm_dir)
            .unwrap();
        let shm_path = shm.path().to_path_buf();
        let t = tempfile::tempdir().unwrap();
        let image = image_of(t.path(), std::slice::from_ref(&shm_path));
        drop(shm); // gone, as after a reboot
        assert_eq!(drift(&image).unwrap(), Drift::Vanished(vec![shm_path]));
    }
}
