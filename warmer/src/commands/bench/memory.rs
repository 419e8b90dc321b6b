//! How fast this machine copies an image's pages from the page cache into
//! memory the copier has never touched: what CRIU does for every page it
//! restores before the tree runs (`pread` from `pages-*.img` into the
//! restored mapping, each page faulted in and zeroed first). With the pages
//! CRIU reports it restored, it is the floor of a warm restore's memory
//! movement, measured in the same bench.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

/// Copies up to `limit` bytes of `file` (read once before, so from the page
/// cache) into fresh anonymous memory in 1 MiB `pread`s: (MB/s, MB copied).
pub fn page_copy_rate(file: &Path, limit: u64) -> std::io::Result<(f64, f64)> {
    const CHUNK: usize = 1 << 20;
    let f = std::fs::File::open(file)?;
    let len = usize::try_from(f.metadata()?.len().min(limit)).unwrap_or(usize::MAX);
    if len == 0 {
        return Ok((f64::NAN, 0.0));
    }
    // Into the page cache first: the copy, not the disk, is measured.
    super::disk::sequential_rate(file, len as u64)?;
    let mut to = memmap2::MmapMut::map_anon(len)?;
    let t0 = Instant::now();
    let mut off = 0;
    while off < len {
        let end = (off + CHUNK).min(len);
        f.read_exact_at(&mut to[off..end], off as u64)?;
        off = end;
    }
    let secs = t0.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let mb = len as f64 / 1e6;
    Ok((if secs > 0.0 { mb / secs } else { f64::NAN }, mb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pages-1.img");
        std::fs::write(&p, vec![7u8; 3 << 20]).unwrap();
        let (rate, mb) = page_copy_rate(&p, 2 << 20).unwrap();
        assert!((mb - 2.097_152).abs() < 1e-9);
        assert!(rate > 0.0);
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(page_copy_rate(&empty, 1 << 20).unwrap().1, 0.0);
    }
}
