//! Sealing a staged payload: every file's checksum listed (and fsync'd),
//! checked against what its maker said it published.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use std::io;

use crate::checksum::{hash_file, FileSum};
use crate::error::{Error, Problem};
use crate::fsutil::{self, Durability};
use crate::store::fsync_dir;

pub(crate) fn relative(base: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(base).unwrap_or(path).to_string_lossy();
    if rel.is_empty() {
        ".".to_string()
    } else {
        rel.into_owned()
    }
}

/// Makes every staged file private and durable and records its checksum.
/// The staged files are exactly the expected ones (paths, sizes, hashes).
pub(crate) fn check_expected(expected: &[FileSum], found: &[FileSum]) -> Result<(), Problem> {
    let mut want: Vec<&FileSum> = expected.iter().collect();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    for f in found {
        match want.binary_search_by(|w| w.path.as_str().cmp(&f.path)) {
            Err(_) => {
                return Err(Problem::Unexpected {
                    path: f.path.clone(),
                })
            }
            Ok(i) if want[i].size != f.size => {
                return Err(Problem::Size {
                    path: f.path.clone(),
                    expected: want[i].size,
                    found: f.size,
                })
            }
            Ok(i) if want[i].blake3 != f.blake3 => {
                return Err(Problem::Checksum {
                    path: f.path.clone(),
                })
            }
            Ok(_) => {}
        }
    }
    if let Some(missing) = want
        .iter()
        .find(|w| !found.iter().any(|f| f.path == w.path))
    {
        return Err(Problem::Missing {
            path: missing.path.clone(),
        });
    }
    Ok(())
}

pub(crate) fn seal_tree(
    base: &Path,
    dir: &Path,
    out: &mut Vec<FileSum>,
    sync: bool,
) -> Result<(), Error> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(Error::io(dir))?;
    for dent in fs::read_dir(dir).map_err(Error::io(dir))? {
        let dent = dent.map_err(Error::io(dir))?;
        let path = dent.path();
        let ft = dent.file_type().map_err(Error::io(&path))?;
        if ft.is_dir() {
            seal_tree(base, &path, out, sync)?;
            if sync {
                fsync_dir(&path)?;
            }
        } else if ft.is_file() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(Error::io(&path))?;
            let mut file = File::open(&path).map_err(Error::io(&path))?;
            let (blake3, size) = hash_file(&mut file).map_err(Error::io(&path))?;
            if sync {
                file.sync_all().map_err(Error::io(&path))?;
            }
            out.push(FileSum {
                path: relative(base, &path),
                size,
                blake3,
            });
        } else {
            return Err(Error::Io {
                path,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "only regular files and directories can be stored",
                ),
            });
        }
    }
    Ok(())
}

/// Writes `dir/name` durably (see [`crate::fsutil::write_atomic`]).
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), Error> {
    fsutil::write_atomic(dir, name, bytes, 0o600, Durability::Fsync)
        .map_err(Error::io(dir.join(name)))
}
