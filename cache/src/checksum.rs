//! Per-file checksums.
//!
//! BLAKE3: several times faster than SHA-256 on one core, and it can spread a
//! large file over every core (see README, "Integrity cost").

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The name recorded in the metadata next to every checksum.
pub const HASH_ALGORITHM: &str = "blake3";

/// Files at least this large are hashed with every core.
const PARALLEL_THRESHOLD: u64 = 16 << 20;

/// One payload file as recorded at publish time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    /// Path relative to the entry's `data/` directory, `/`-separated.
    pub path: String,
    pub size: u64,
    /// Lowercase hex BLAKE3 of the contents.
    pub blake3: String,
}

/// How many cores a verification may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cores {
    /// Large files are hashed with every core (fastest alone).
    All,
    /// One core: for hashing alongside other work (a CRIU restore).
    One,
}

/// Hashes an open file from its start with every core; returns (hex digest,
/// bytes read).
pub fn hash_file(file: &mut File) -> io::Result<(String, u64)> {
    hash_file_with(file, Cores::All)
}

/// [`hash_file`] with a choice of cores.
pub fn hash_file_with(file: &mut File, cores: Cores) -> io::Result<(String, u64)> {
    let len = file.metadata()?.len();
    let mut hasher = blake3::Hasher::new();
    if len >= PARALLEL_THRESHOLD && cores == Cores::All {
        // update_mmap_rayon maps the file read-only; the store's
        // files are 0600 root and never modified in place, so the mapping cannot
        // change underneath us except through tampering, which the hash detects.
        hasher.update_mmap_rayon(path_of(file)?)?;
        return Ok((hasher.finalize().to_hex().to_string(), len));
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().to_hex().to_string(), total))
}

/// The /proc path of an open file, so the mmap path hashes exactly the file
/// that was opened (and checked) rather than whatever the name points to now.
fn path_of(file: &File) -> io::Result<std::path::PathBuf> {
    use std::os::fd::AsRawFd;
    let p = Path::new("/proc/self/fd").join(file.as_raw_fd().to_string());
    Ok(p)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn small_and_large_files_hash_like_blake3_reference() {
        for size in [0usize, 5, 300_000, (PARALLEL_THRESHOLD as usize) + 7] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&data).unwrap();
            let mut f2 = f.try_clone().unwrap();
            use std::io::Seek;
            f2.seek(io::SeekFrom::Start(0)).unwrap();
            let (hex, n) = hash_file(&mut f2).unwrap();
            assert_eq!(n, size as u64);
            assert_eq!(hex, blake3::hash(&data).to_hex().to_string());
        }
    }
}
