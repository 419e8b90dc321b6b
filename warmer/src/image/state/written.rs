//! Implicit state: every regular file the image holds open for writing.
//!
//! An operator cannot be expected to know every file a daemon writes, but the
//! image knows: CRIU's `files.img` lists each file the tree had open, with
//! its flags and position. A file open for writing is data the restored
//! process will go on writing from where the image left it (ZooKeeper's
//! preallocated transaction log, written in place at the descriptor's
//! position: a restore over newer transactions overwrites them; Prometheus's
//! WAL, appended to: a restore brings back a memory that never saw the newer
//! samples). So each one is fingerprinted while the tree is still frozen
//! (CRIU's `post-dump`, the same moment `state:` paths are captured), and
//! an image is restored only while every one of them is exactly as captured.
//! Otherwise: cold start on the current data, and the reason names the file.
//!
//! The fingerprint: device and inode (the file was not replaced), size,
//! mtime and ctime to the nanosecond (any write; since Linux 6.13 a ctime
//! that was read is followed by a fine-grained one, so even a write in the
//! same clock tick shows), and a hash of the bytes at the descriptor's
//! position (where the next in-place write lands: a preallocated log's
//! zeros, whatever the clock does).
//!
//! Not state: kernel files (`/dev`, `/proc`, `/sys`), `/var/log`, paths under
//! `state:` (captured in full instead) and paths the manifest lists under
//! `not_state:` (the service's own logs elsewhere).
//!
//! ```text
//! <image>/state/written.json   {format_version, files: [{path, dev, ino, size,
//!                               mtime, ctime, pos, at_pos, append, absent}]}
//! ```

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{io_err, StateError, STATE_DIR};
use crate::image::criu::OpenFile;

const FILE: &str = "written.json";
/// The format of `written.json`.
pub const WRITTEN_VERSION: u32 = 1;
/// Bytes hashed at a file's position.
const WINDOW: u64 = 64 << 10;
/// Places that hold no data of the service's: kernel files, system logs.
const NEVER_STATE: &[&str] = &["/dev/", "/proc/", "/sys/", "/var/log/"];

/// One file's fingerprint at the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub path: PathBuf,
    /// The file was gone at the checkpoint (open but unlinked): it must still
    /// be gone (CRIU restores its contents from the image).
    pub absent: bool,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    /// The descriptor's position, and the sha256 of up to `WINDOW` bytes
    /// from there (empty past the end).
    pub pos: u64,
    pub at_pos: String,
    /// Opened with O_APPEND (writes land at the end whatever the position).
    pub append: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Written {
    format_version: u32,
    files: Vec<Fingerprint>,
}

/// Whether a file the image holds open with `flags` at `path` is state the
/// restore depends on. `declared`: the manifest's `state:` (captured in
/// full); `not_state`: what it says is not.
pub fn is_state(path: &Path, flags: u64, declared: &[PathBuf], not_state: &[PathBuf]) -> bool {
    let writable = {
        let acc = flags & u64::from(libc::O_ACCMODE.unsigned_abs());
        acc == u64::from(libc::O_WRONLY.unsigned_abs())
            || acc == u64::from(libc::O_RDWR.unsigned_abs())
    };
    writable
        && path.is_absolute()
        && !NEVER_STATE.iter().any(|p| path.starts_with(p))
        && !declared
            .iter()
            .chain(not_state)
            .any(|p| path.starts_with(p))
}

/// The files of `images_dir` that are open for writing (before exclusions:
/// which of them matter is decided at restore, by the manifest then).
fn writers(images_dir: &Path) -> Result<Vec<OpenFile>, StateError> {
    let files = match crate::image::criu::open_files(images_dir) {
        Ok(f) => f,
        // An image without files.img (no open files at all).
        Err(crate::image::criu::ImageError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(Vec::new())
        }
        Err(e) => {
            return Err(StateError::Index {
                path: images_dir.join("files.img"),
                reason: crate::errors::chain(&e),
            })
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    Ok(files
        .into_iter()
        .filter(|f| is_state(Path::new(&f.path), f.flags, &[], &[]))
        .filter(|f| seen.insert((f.path.clone(), f.pos)))
        .collect())
}

fn window_hash(file: &fs::File, pos: u64) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(usize::try_from(WINDOW).unwrap_or(0));
    let mut at = pos;
    let mut chunk = vec![0u8; 16 << 10];
    while (buf.len() as u64) < WINDOW {
        let want = usize::try_from(WINDOW - buf.len() as u64)
            .unwrap_or(chunk.len())
            .min(chunk.len());
        let n = file.read_at(&mut chunk[..want], at)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        at += n as u64;
    }
    Ok(hex::encode(sha2::Sha256::digest(&buf)))
}

fn fingerprint(path: &Path, pos: u64, append: bool) -> Result<Fingerprint, StateError> {
    let absent = |p: &Path| Fingerprint {
        path: p.to_path_buf(),
        absent: true,
        dev: 0,
        ino: 0,
        size: 0,
        mtime: (0, 0),
        ctime: (0, 0),
        pos,
        at_pos: String::new(),
        append,
    };
    // Only a regular file is read, never through a link, and never one
    // swapped in between the look and the open: the service's user may own
    // the directory, and an open of a FIFO or a device (a watchdog) is not
    // harmless. Anything else counts as the file being gone.
    let seen = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => m,
        Ok(_) => return Ok(absent(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(absent(path)),
        Err(e) => return Err(io_err(path, "stat")(e)),
    };
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(absent(path)),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(absent(path)),
        Err(e) => return Err(io_err(path, "open")(e)),
    };
    let md = file.metadata().map_err(io_err(path, "stat"))?;
    if !md.is_file() || (md.dev(), md.ino()) != (seen.dev(), seen.ino()) {
        // Replaced by something else since: never equal to a file.
        return Ok(absent(path));
    }
    Ok(Fingerprint {
        path: path.to_path_buf(),
        absent: false,
        dev: md.dev(),
        ino: md.ino(),
        size: md.size(),
        mtime: (md.mtime(), md.mtime_nsec()),
        ctime: (md.ctime(), md.ctime_nsec()),
        pos,
        at_pos: window_hash(&file, pos).map_err(io_err(path, "read"))?,
        append,
    })
}

/// At `post-dump` (the tree frozen): fingerprints every file `images_dir`'s
/// `files.img` holds open for writing into `state/written.json`.
pub fn capture(images_dir: &Path) -> Result<(), StateError> {
    let files = writers(images_dir)?
        .into_iter()
        .map(|f| {
            let append = f.flags & u64::from(libc::O_APPEND.unsigned_abs()) != 0;
            fingerprint(Path::new(&f.path), f.pos, append)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let root = images_dir.join(STATE_DIR);
    fs::create_dir_all(&root).map_err(io_err(&root, "create"))?;
    let out = root.join(FILE);
    let doc = Written {
        format_version: WRITTEN_VERSION,
        files,
    };
    fs::write(
        &out,
        serde_json::to_vec_pretty(&doc).expect("fingerprints serialize"),
    )
    .map_err(io_err(&out, "write"))
}

/// The first file the image holds open for writing that is not as it was
/// at the checkpoint (`Some(why)`), among those that are state by
/// [`is_state`]. An image made before warmer fingerprinted these files, yet
/// holding one open: `Some` too (nothing says it is unchanged).
pub fn drift(
    images_dir: &Path,
    declared: &[PathBuf],
    not_state: &[PathBuf],
) -> Result<Option<String>, StateError> {
    let path = images_dir.join(STATE_DIR).join(FILE);
    let bytes = match fs::File::open(&path) {
        Ok(f) => {
            let mut b = Vec::new();
            // Bounded: a few hundred bytes a file; 16 MiB is far beyond that.
            f.take(16 << 20)
                .read_to_end(&mut b)
                .map_err(io_err(&path, "read"))?;
            b
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let old = writers(images_dir)?;
            return Ok(old
                .iter()
                .find(|f| is_state(Path::new(&f.path), f.flags, declared, not_state))
                .map(|f| {
                    format!(
                        "the image holds {} open for writing and predates warmer's fingerprints of such files",
                        f.path
                    )
                }));
        }
        Err(e) => return Err(io_err(&path, "open")(e)),
    };
    let doc: Written = serde_json::from_slice(&bytes).map_err(|e| StateError::Index {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if doc.format_version > WRITTEN_VERSION {
        return Err(StateError::Index {
            path,
            reason: format!("unknown format_version {}", doc.format_version),
        });
    }
    // Flags are not kept: every file here was open for writing.
    let rw = u64::from(libc::O_RDWR.unsigned_abs());
    for want in doc
        .files
        .iter()
        .filter(|f| is_state(&f.path, rw, declared, not_state))
    {
        let now = fingerprint(&want.path, want.pos, want.append)?;
        if let Some(what) = differs(want, &now) {
            return Ok(Some(format!(
                "{} {what} since the checkpoint (the image holds it open for writing)",
                want.path.display()
            )));
        }
    }
    Ok(None)
}

/// How `now` differs from `then`, in words.
fn differs(then: &Fingerprint, now: &Fingerprint) -> Option<&'static str> {
    Some(match (then.absent, now.absent) {
        (true, true) => return None,
        (true, false) => "was created",
        (false, true) => "is gone",
        _ if (then.dev, then.ino) != (now.dev, now.ino) => "was replaced",
        _ if then.size != now.size => "changed size",
        _ if then.at_pos != now.at_pos => "was written at the image's position",
        _ if then.mtime != now.mtime || then.ctime != now.ctime => "was modified",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(f: i32) -> u64 {
        u64::try_from(f).unwrap()
    }

    #[test]
    fn writable_data_files_are_state_unless_excluded() {
        let none: &[PathBuf] = &[];
        let rw = flags(libc::O_RDWR);
        let append = flags(libc::O_WRONLY | libc::O_APPEND);
        let p = |s: &str| PathBuf::from(s);
        assert!(is_state(&p("/var/lib/zk/version-2/log.1"), rw, none, none));
        assert!(
            is_state(&p("/var/lib/prometheus/wal/00000000"), append, none, none),
            "appending is writing (the Prometheus WAL)"
        );
        assert!(is_state(
            &p("/srv/kafka/00000000000000000000.log"),
            rw,
            none,
            none
        ));
        assert!(!is_state(
            &p("/usr/lib/libc.so.6"),
            flags(libc::O_RDONLY),
            none,
            none
        ));
        assert!(!is_state(&p("/dev/null"), rw, none, none));
        assert!(!is_state(
            &p("/var/log/tomcat10/catalina.out"),
            append,
            none,
            none
        ));
        assert!(!is_state(
            &p("/var/lib/db/main"),
            rw,
            &[p("/var/lib/db")],
            none
        ));
        assert!(!is_state(
            &p("/opt/app/logs/a.txt"),
            append,
            none,
            &[p("/opt/app/logs")]
        ));
        assert!(!is_state(&p("relative"), rw, none, none));
    }

    fn fp(path: &str) -> Fingerprint {
        Fingerprint {
            path: path.into(),
            absent: false,
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (4, 5),
            ctime: (6, 7),
            pos: 0,
            at_pos: "h".into(),
            append: false,
        }
    }

    #[test]
    fn any_difference_is_named() {
        let a = fp("/d/f");
        assert_eq!(differs(&a, &a.clone()), None);
        let mut b = a.clone();
        b.ino = 9;
        assert_eq!(differs(&a, &b), Some("was replaced"));
        let mut b = a.clone();
        b.at_pos = "other".into();
        assert_eq!(differs(&a, &b), Some("was written at the image's position"));
        let mut b = a.clone();
        b.ctime = (6, 8);
        assert_eq!(differs(&a, &b), Some("was modified"));
        let mut b = a.clone();
        b.absent = true;
        assert_eq!(differs(&a, &b), Some("is gone"));
    }

    #[test]
    fn a_fifo_or_a_link_where_the_file_was_is_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // An open of a FIFO for reading would block forever here.
        assert!(fingerprint(&fifo, 0, false).unwrap().absent);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        assert!(fingerprint(&link, 0, false).unwrap().absent);
    }

    #[test]
    fn a_write_in_place_that_keeps_size_and_clock_is_seen_at_the_position() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.1");
        std::fs::write(&log, vec![0u8; 8192]).unwrap();
        let then = fingerprint(&log, 100, false).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
        f.write_at(b"txn 42\n", 100).unwrap();
        // Put the clock back as a coarse timestamp could have left it.
        let t = nix::sys::time::TimeSpec::new(then.mtime.0, then.mtime.1);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &log,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        let now = fingerprint(&log, 100, false).unwrap();
        assert_eq!(now.size, then.size);
        assert_eq!(now.mtime, then.mtime);
        assert_eq!(
            differs(&then, &now),
            Some("was written at the image's position")
        );
    }
}
