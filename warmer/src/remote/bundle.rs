//! An image's small files as one layer ([`BUNDLE_TYPE`], titled `bundle`).
//!
//! CRIU writes tens of files of a few bytes to a few KiB (the tree, each
//! task's core, fds and pagemap, the mounts), and a registry answers each
//! blob request after a round trip and some work of its own: Debian's
//! docker-registry took 3-18 ms a blob on a 2-core VM, and the 22 small
//! files of slowweb's image ~100 ms of a fresh node's start even 8 at a
//! time; across a WAN each is a round trip or more. In one blob they are
//! one request. The bundle is a tar (regular files only, mode 0600, owner
//! 0, mtime 0, the config's file order), zstd-compressed: the same files
//! make the same blob, so a registry still stores it once.
//!
//! Page files never go in it (they are fetched by range, see
//! [`super::stream`]), nor anything over [`FILE_MAX`] (its own layer
//! dedupes across generations). Unpacking trusts nothing the tar says: a
//! member must be a regular file the config records, with a plain relative
//! path, the size recorded, and not written before; and the whole never
//! decompresses past what those files can take.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use cache::FileSum;

pub const BUNDLE_TYPE: &str = "application/vnd.warmer.image.bundle.v1+tar+zstd";
pub const TITLE: &str = "bundle";
/// A file at most this big goes in the bundle.
pub const FILE_MAX: u64 = 256 << 10;
/// The largest bundle blob a puller takes (a few KiB to a few MiB in practice).
pub const MAX_BYTES: i64 = 256 << 20;
/// A tar header, and GNU's long-name block and header.
const HEADERS: u64 = 3 * 512;

/// Whether `file` travels in the bundle.
pub fn holds(file: &FileSum) -> bool {
    file.size <= FILE_MAX && !super::artifact::is_page_file(&file.path)
}

/// Writes the bundle of `files` (read from `data`) to `out`, compressed at
/// `level`.
pub fn pack(data: &Path, files: &[&FileSum], out: &Path, level: i32) -> io::Result<()> {
    let file = File::create(out)?;
    let zstd = zstd::stream::Encoder::new(io::BufWriter::new(file), level)?;
    let mut tar = tar::Builder::new(zstd);
    tar.mode(tar::HeaderMode::Deterministic);
    for f in files {
        let src = data.join(&f.path);
        let input = File::open(&src)?;
        let size = input.metadata()?.len();
        if size != f.size {
            return Err(io::Error::other(format!(
                "{}: size {size}, recorded {}",
                f.path, f.size
            )));
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o600);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, &f.path, input.take(size))?;
    }
    tar.into_inner()?.finish()?.flush()
}

/// Unpacks the bundle `blob` (its digest already checked) into `data`, a
/// staging directory of nothing but what this pull wrote. `files` is the
/// config's list. Returns the paths written.
pub fn unpack(blob: &Path, data: &Path, files: &[FileSum]) -> Result<BTreeSet<String>, String> {
    let limit: u64 = files
        .iter()
        .filter(|f| holds(f))
        .map(|f| f.size.div_ceil(512) * 512 + HEADERS)
        .sum::<u64>()
        + 2 * 512;
    let input = File::open(blob).map_err(|e| format!("{}: {e}", blob.display()))?;
    let zstd = zstd::stream::Decoder::new(input).map_err(|e| format!("bundle: {e}"))?;
    let mut tar = tar::Archive::new(zstd.take(limit));
    let mut written = BTreeSet::new();
    let entries = tar.entries().map_err(|e| format!("bundle: {e}"))?;
    for member in entries {
        let mut member = member.map_err(|e| format!("bundle: {e}"))?;
        let path = member
            .path()
            .map_err(|e| format!("bundle: {e}"))?
            .to_str()
            .ok_or("bundle: a member's name is not UTF-8")?
            .to_string();
        if !member.header().entry_type().is_file() {
            return Err(format!("bundle: {path:?} is not a regular file"));
        }
        if !super::artifact::plain_path(&path) {
            return Err(format!("bundle: {path:?} is not an image file's path"));
        }
        let recorded = files
            .iter()
            .find(|f| f.path == path && holds(f))
            .ok_or_else(|| format!("bundle: {path:?} is not in the config"))?;
        let size = member.header().size().map_err(|e| format!("bundle: {e}"))?;
        if size != recorded.size {
            return Err(format!(
                "bundle: {path:?} holds {size} bytes, the config says {}",
                recorded.size
            ));
        }
        let dest = data.join(&path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        // create_new: a member named twice, or a file a layer wrote, is refused.
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&dest)
            .map_err(|e| format!("bundle: {path:?}: {e}"))?;
        let n = io::copy(&mut (&mut member).take(size), &mut out)
            .map_err(|e| format!("bundle: {path:?}: {e}"))?;
        if n != size {
            return Err(format!("bundle: {path:?} ends after {n} of {size} bytes"));
        }
        written.insert(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(path: &str, size: u64) -> FileSum {
        FileSum {
            path: path.into(),
            size,
            blake3: String::new(),
        }
    }

    /// A bundle of raw members, as a hostile pusher could write one.
    fn hostile(dir: &Path, members: &[(&str, tar::EntryType, &[u8])]) -> std::path::PathBuf {
        let out = dir.join("hostile.tar.zst");
        let zstd = zstd::stream::Encoder::new(File::create(&out).unwrap(), 1).unwrap();
        let mut tar = tar::Builder::new(zstd);
        for (name, kind, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_entry_type(*kind);
            h.set_mode(0o600);
            // Names set raw: `append_data` itself refuses "..".
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            tar.append(&h, *data).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
        out
    }

    #[test]
    fn small_files_travel_together_and_come_back_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        fs::create_dir_all(src.join("state/0")).unwrap();
        fs::create_dir_all(&dst).unwrap();
        let long = format!("state/0/{}", "n".repeat(150));
        let contents: Vec<(String, Vec<u8>)> = vec![
            ("core-1.img".into(), b"core".to_vec()),
            ("empty.img".into(), Vec::new()),
            (long.clone(), vec![7u8; 5000]),
        ];
        for (p, c) in &contents {
            fs::write(src.join(p), c).unwrap();
        }
        let sums: Vec<FileSum> = contents
            .iter()
            .map(|(p, c)| sum(p, c.len() as u64))
            .chain([sum("pages-1.img", 8192)])
            .collect();
        let held: Vec<&FileSum> = sums.iter().filter(|f| holds(f)).collect();
        assert_eq!(held.len(), 3, "page files are never bundled");
        let (a, b) = (dir.path().join("a.zst"), dir.path().join("b.zst"));
        pack(&src, &held, &a, 3).unwrap();
        pack(&src, &held, &b, 3).unwrap();
        assert_eq!(
            fs::read(&a).unwrap(),
            fs::read(&b).unwrap(),
            "deterministic"
        );
        let written = unpack(&a, &dst, &sums).unwrap();
        assert_eq!(written.len(), 3);
        for (p, c) in &contents {
            assert_eq!(&fs::read(dst.join(p)).unwrap(), c, "{p}");
        }
    }

    #[test]
    fn a_hostile_bundle_writes_nothing_outside_and_nothing_unrecorded() {
        use tar::EntryType::{Regular, Symlink};
        let files = [sum("core-1.img", 4), sum("fds-1.img", 4)];
        for (members, why) in [
            (
                vec![("../escape.img", Regular, &b"evil"[..])],
                "not an image file",
            ),
            (
                vec![("/etc/evil.img", Regular, &b"evil"[..])],
                "not an image file",
            ),
            (
                vec![("sub/x.img", Regular, &b"evil"[..])],
                "not an image file",
            ),
            (
                vec![("core-1.img", Symlink, &b""[..])],
                "not a regular file",
            ),
            (
                vec![("other.img", Regular, &b"evil"[..])],
                "not in the config",
            ),
            (
                vec![("core-1.img", Regular, &b"longer"[..])],
                "holds 6 bytes",
            ),
            (
                vec![
                    ("core-1.img", Regular, &b"core"[..]),
                    ("core-1.img", Regular, &b"core"[..]),
                ],
                "exists",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            fs::create_dir_all(&data).unwrap();
            let blob = hostile(dir.path(), &members);
            let err = unpack(&blob, &data, &files).unwrap_err();
            assert!(err.contains(why), "{members:?}: {err}");
            assert!(!dir.path().join("escape.img").exists());
        }
    }

    #[test]
    fn a_bundle_never_decompresses_past_what_its_files_can_take() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir_all(&data).unwrap();
        // A member the config records at 4 bytes, declared and sent at 64 MiB.
        let big = vec![0u8; 64 << 20];
        let blob = hostile(dir.path(), &[("core-1.img", tar::EntryType::Regular, &big)]);
        assert!(fs::metadata(&blob).unwrap().len() < 1 << 20);
        let err = unpack(&blob, &data, &[sum("core-1.img", 4)]).unwrap_err();
        assert!(err.contains("holds 67108864 bytes"), "{err}");
        assert_eq!(fs::read_dir(&data).unwrap().count(), 0);
    }
}
