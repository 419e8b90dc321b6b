//! Putting captured state back (a `state:` path on a tmpfs a reboot
//! emptied), all or nothing, and recovering from a put-back a crash
//! interrupted: the data that was live is kept aside until the restore is
//! committed or undone, and data written since the put-back is the newest.

use super::*;

/// The names beside a state path that a put-back uses: the fresh copy being
/// built, the live data moved aside, and a marker saying the path did not
/// exist before (so an undo removes it).
fn aside(path: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    (
        path.with_file_name(format!(".{name}.warmer-new")),
        path.with_file_name(format!(".{name}.warmer-old")),
        path.with_file_name(format!(".{name}.warmer-absent")),
    )
}

/// A put-back that is not final yet: the data that was live before is kept
/// beside each path until [`PutBack::commit`] (the restored service is ready)
/// or brought back by [`PutBack::undo`] (the restore failed). If warmer dies
/// in between, the next start finds the leftovers and [`recover`] undoes it:
/// whatever happens, the service's data is never lost to a failed restore.
#[derive(Debug)]
#[must_use = "a put-back must be committed or undone"]
pub struct PutBack {
    paths: Vec<PathBuf>,
}

impl PutBack {
    /// The restore succeeded: drop the data that was live before.
    pub fn commit(self) -> Result<(), StateError> {
        commit_paths(&self.paths)
    }

    /// The restore failed: put the data that was live before back, exactly.
    pub fn undo(self) -> Result<(), StateError> {
        undo_paths(&self.paths)
    }
}

/// Brings back the live data of put-backs that were neither committed nor
/// undone (warmer was killed during a restore). Returns the paths recovered.
pub fn recover(paths: &[PathBuf]) -> Result<Recovered, StateError> {
    let pending: Vec<PathBuf> = paths
        .iter()
        .filter(|p| {
            let (_, old, absent) = aside(p);
            fs::symlink_metadata(old).is_ok() || fs::symlink_metadata(absent).is_ok()
        })
        .cloned()
        .collect();
    // Data a restored service wrote after the put-back (it ran, even if no
    // warmer supervised it any more) is the newest data: it stays, and what
    // was set aside goes. Data as it was put back: the put-back is undone.
    let (written, untouched): (Vec<PathBuf>, Vec<PathBuf>) =
        pending.into_iter().partition(|p| written_since_put_back(p));
    commit_paths(&written)?;
    undo_paths(&untouched)?;
    // A copy that was being built when warmer died.
    for p in paths {
        remove_any(&aside(p).0)?;
    }
    Ok(Recovered {
        put_back_undone: untouched,
        kept_newer: written,
    })
}

/// What [`recover`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Paths whose interrupted put-back was undone (the data set aside is
    /// live again).
    pub put_back_undone: Vec<PathBuf>,
    /// Paths a restored service wrote after the put-back: kept as they are.
    pub kept_newer: Vec<PathBuf>,
}

/// The listing of a put-back path right after it was put back.
fn put_marker(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.warmer-put"))
}

/// Records `path` as it is once put back.
fn mark_put(path: &Path) -> Result<(), StateError> {
    let mut nodes = Vec::new();
    if fs::symlink_metadata(path).is_ok() {
        copy_out(path, None, "", &mut nodes)?;
    }
    let marker = put_marker(path);
    fs::write(
        &marker,
        serde_json::to_vec(&nodes).expect("nodes serialize"),
    )
    .map_err(io_err(&marker, "write"))
}

/// Whether `path` changed since it was put back (no marker: the put-back
/// never finished, so nothing ran on it).
fn written_since_put_back(path: &Path) -> bool {
    let Ok(bytes) = fs::read(put_marker(path)) else {
        return false;
    };
    let Ok(then) = serde_json::from_slice::<Vec<Node>>(&bytes) else {
        return false;
    };
    let mut now = Vec::new();
    if fs::symlink_metadata(path).is_ok() && copy_out(path, None, "", &mut now).is_err() {
        return true;
    }
    // Access times move with reads alone.
    let strip = |v: &[Node]| -> Vec<Node> {
        v.iter()
            .cloned()
            .map(|mut n| {
                n.atime = (0, 0);
                n
            })
            .collect()
    };
    strip(&now) != strip(&then)
}

fn commit_paths(paths: &[PathBuf]) -> Result<(), StateError> {
    for path in paths {
        let (_, old, absent) = aside(path);
        remove_any(&old)?;
        remove_any(&absent)?;
        remove_any(&put_marker(path))?;
    }
    Ok(())
}

fn undo_paths(paths: &[PathBuf]) -> Result<(), StateError> {
    for path in paths.iter().rev() {
        let (_, old, absent) = aside(path);
        if fs::symlink_metadata(&old).is_ok() {
            remove_any(path)?;
            fs::rename(&old, path).map_err(io_err(path, "restore the live data"))?;
        } else if fs::symlink_metadata(&absent).is_ok() {
            remove_any(path)?;
            remove_any(&absent)?;
        }
        remove_any(&put_marker(path))?;
    }
    Ok(())
}

/// Puts the captured paths named in `only` back as they were at checkpoint
/// time (the rule above allows it only for paths that vanished with a
/// tmpfs; tests and the bench's bare-CRIU baseline pass every path). Each
/// path is rebuilt beside the original and swapped in by rename; what was
/// live is kept aside until the returned [`PutBack`] is committed or undone.
/// A failure midway undoes the paths already swapped.
pub fn put_back(image_dir: &Path, only: &[PathBuf]) -> Result<PutBack, StateError> {
    let root = image_dir.join(STATE_DIR);
    let index = read_index(image_dir)?;
    let mut done = PutBack { paths: Vec::new() };
    for (n, c) in index.iter().enumerate() {
        if !only.contains(&c.path) {
            continue;
        }
        let one =
            put_back_one(&root.join(n.to_string()), c, &mut done).and_then(|()| mark_put(&c.path));
        if let Err(e) = one {
            if let Err(undo) = undo_paths(&done.paths) {
                tracing::error!(
                    "undoing a failed put-back failed too: {}",
                    crate::errors::chain(&undo)
                );
            }
            return Err(e);
        }
    }
    Ok(done)
}

fn put_back_one(src: &Path, c: &Captured, done: &mut PutBack) -> Result<(), StateError> {
    let (fresh, old, absent) = aside(&c.path);
    remove_any(&fresh)?;
    // Leftovers of an earlier put-back are recovered before any restore
    // starts; one still here means that recovery did not run: refuse.
    if fs::symlink_metadata(&old).is_ok() || fs::symlink_metadata(&absent).is_ok() {
        return Err(StateError::Pending {
            path: c.path.clone(),
        });
    }
    if let Some(nodes) = &c.nodes {
        if let Some(parent) = c.path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent, "create"))?;
        }
        // Contents first, then metadata deepest-first (a directory's
        // mtime changes while its children are created).
        for node in nodes {
            let (from, to) = if node.rel.is_empty() {
                (src.to_path_buf(), fresh.clone())
            } else {
                (src.join(&node.rel), fresh.join(&node.rel))
            };
            match node.kind {
                Kind::Dir => fs::create_dir(&to).map_err(io_err(&to, "create"))?,
                Kind::File => {
                    fs::copy(&from, &to).map_err(io_err(&from, "copy"))?;
                }
                Kind::Symlink => {
                    let target = fs::read(&from).map_err(io_err(&from, "read"))?;
                    symlink(OsStr::from_bytes(&target), &to).map_err(io_err(&to, "symlink"))?;
                }
            }
        }
        for node in nodes.iter().rev() {
            let to = if node.rel.is_empty() {
                fresh.clone()
            } else {
                fresh.join(&node.rel)
            };
            apply_meta(&to, node)?;
        }
    }
    if fs::symlink_metadata(&c.path).is_ok() {
        fs::rename(&c.path, &old).map_err(io_err(&c.path, "move aside"))?;
    } else {
        fs::write(&absent, b"").map_err(io_err(&absent, "mark"))?;
    }
    done.paths.push(c.path.clone());
    if c.nodes.is_some() {
        fs::rename(&fresh, &c.path).map_err(io_err(&c.path, "put back"))?;
    }
    Ok(())
}

fn apply_meta(path: &Path, node: &Node) -> Result<(), StateError> {
    fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(Uid::from_raw(node.uid)),
        Some(Gid::from_raw(node.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| io_err(path, "chown")(e.into()))?;
    if node.kind != Kind::Symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(node.mode))
            .map_err(io_err(path, "chmod"))?;
    }
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::new(node.atime.0, node.atime.1),
        &TimeSpec::new(node.mtime.0, node.mtime.1),
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_err(path, "set times")(e.into()))
}

fn remove_any(path: &Path) -> Result<(), StateError> {
    match fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(md) if md.is_dir() => fs::remove_dir_all(path).map_err(io_err(path, "remove")),
        Ok(_) => fs::remove_file(path).map_err(io_err(path, "remove")),
    }
}

#[cfg(test)]
mod undo_tests {
    use super::*;

    /// A live data dir, an image of its old state, and the newer live state.
    fn setup(t: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let live = t.join("data");
        fs::create_dir(&live).unwrap();
        fs::write(live.join("ledger"), b"1\n").unwrap();
        let absent = t.join("later");
        let image = t.join("image");
        fs::create_dir(&image).unwrap();
        capture(&[live.clone(), absent.clone()], &image).unwrap();
        fs::write(live.join("ledger"), b"1\n2\n3\n").unwrap();
        fs::write(&absent, b"made after the checkpoint").unwrap();
        (live, absent, image)
    }

    fn leftovers(t: &Path) -> Vec<String> {
        fs::read_dir(t)
            .unwrap()
            .filter_map(|d| d.ok())
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("warmer-"))
            .collect()
    }

    #[test]
    fn undo_brings_back_exactly_the_newer_data() {
        let t = tempfile::tempdir().unwrap();
        let (live, absent, image) = setup(t.path());
        let pb = put_back(&image, &captured_paths(&image).unwrap()).unwrap();
        assert_eq!(fs::read(live.join("ledger")).unwrap(), b"1\n");
        assert!(!absent.exists());
        pb.undo().unwrap();
        assert_eq!(fs::read(live.join("ledger")).unwrap(), b"1\n2\n3\n");
        assert_eq!(fs::read(&absent).unwrap(), b"made after the checkpoint");
        assert!(leftovers(t.path()).is_empty(), "{:?}", leftovers(t.path()));
    }

    #[test]
    fn a_put_back_interrupted_by_a_crash_is_recovered_at_the_next_start() {
        let t = tempfile::tempdir().unwrap();
        let (live, absent, image) = setup(t.path());
        // warmer dies after the put-back: neither commit nor undo runs.
        std::mem::forget(put_back(&image, &captured_paths(&image).unwrap()).unwrap());
        let got = recover(&[live.clone(), absent.clone()]).unwrap();
        assert_eq!(got.put_back_undone.len(), 2);
        assert!(got.kept_newer.is_empty());
        assert_eq!(fs::read(live.join("ledger")).unwrap(), b"1\n2\n3\n");
        assert_eq!(fs::read(&absent).unwrap(), b"made after the checkpoint");
        assert!(leftovers(t.path()).is_empty());
        assert_eq!(
            recover(std::slice::from_ref(&live)).unwrap(),
            Recovered::default(),
            "nothing pending"
        );
    }

    #[test]
    fn data_a_restored_service_wrote_after_an_interrupted_put_back_is_kept() {
        let t = tempfile::tempdir().unwrap();
        let (live, absent, image) = setup(t.path());
        std::mem::forget(put_back(&image, &captured_paths(&image).unwrap()).unwrap());
        // The restored tree ran on (no warmer left) and acknowledged writes.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(live.join("ledger"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"acked-after-restore\n").unwrap();
        let got = recover(&[live.clone(), absent.clone()]).unwrap();
        assert_eq!(got.kept_newer, vec![live.clone()]);
        assert_eq!(got.put_back_undone, vec![absent.clone()]);
        assert_eq!(
            fs::read(live.join("ledger")).unwrap(),
            b"1\nacked-after-restore\n",
            "the newest data stays"
        );
        assert!(leftovers(t.path()).is_empty(), "{:?}", leftovers(t.path()));
    }

    #[test]
    fn a_path_that_did_not_exist_is_removed_again_by_undo() {
        let t = tempfile::tempdir().unwrap();
        let shm = t.path().join("shm-file");
        fs::write(&shm, b"mapped").unwrap();
        let image = t.path().join("image");
        fs::create_dir(&image).unwrap();
        capture(std::slice::from_ref(&shm), &image).unwrap();
        fs::remove_file(&shm).unwrap(); // gone after a reboot
        let pb = put_back(&image, &captured_paths(&image).unwrap()).unwrap();
        assert_eq!(fs::read(&shm).unwrap(), b"mapped");
        pb.undo().unwrap();
        assert!(!shm.exists());
        assert!(leftovers(t.path()).is_empty());
    }
}
