//! The pages a restore reads before its tree runs, as one layer
//! ([`FIRST_PAGES_TYPE`], titled `first-pages`): what a fresh node needs
//! before it can start a restore that begins before its pull ends
//! ([`super::stream`]), in one request.
//!
//! Those pages (private file mappings' pages, never restored lazily, and the
//! working set's: [`crate::restore::working_set::file_ranges`]) are scattered
//! across the page files: Python ML's 6.9 MB in 370 ranges fall in 63 of its
//! 126 frames of 1 MiB, 63 MB and 18 range requests to fetch, check and
//! decompress before CRIU could start. Copied out at push time, they are one
//! blob of ~2 MB.
//!
//! The blob is zstd of one line of JSON (the ranges: `[[file, offset,
//! length], ...]`, in file order) and then the ranges' bytes, in that order.
//! A puller checks the blob's sha256 (the signed manifest names it), that
//! every range lies in a page file of the image, and that the bytes are
//! exactly as many as the ranges say; the whole page files are still
//! fetched behind the restore and published only if every file's BLAKE3
//! matches the config.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const FIRST_PAGES_TYPE: &str = "application/vnd.warmer.first-pages.v1+zstd";
pub const TITLE: &str = "first-pages";
/// The largest blob a puller takes.
pub const MAX_BYTES: i64 = 512 << 20;
/// The ranges' line, at most.
const MAX_HEAD: u64 = 16 << 20;
/// Bytes copied at a time.
const CHUNK: usize = 1 << 20;

/// (file in the image, offset, length).
pub type Range = (String, u64, u64);

/// Writes the first-pages blob of `ranges` (read from `data`) to `out`.
pub fn pack(data: &Path, ranges: &[Range], out: &Path, level: i32) -> io::Result<()> {
    let file = File::create(out)?;
    let mut z = zstd::stream::Encoder::new(io::BufWriter::new(file), level)?;
    serde_json::to_writer(&mut z, ranges).map_err(io::Error::other)?;
    z.write_all(b"\n")?;
    let mut buf = Vec::new();
    for (name, off, len) in ranges {
        let f = File::open(data.join(name))?;
        buf.resize(usize::try_from(*len).map_err(io::Error::other)?, 0);
        f.read_exact_at(&mut buf, *off)?;
        z.write_all(&buf)?;
    }
    z.finish()?.flush()
}

/// Writes the ranges of the first-pages `blob` (digest checked) into the
/// page files of `data` (staged at their full size); `sizes` are the page
/// files the image has. Returns the ranges written.
pub fn unpack(
    blob: &Path,
    data: &Path,
    sizes: &std::collections::BTreeMap<String, u64>,
) -> Result<BTreeSet<Range>, String> {
    let input = File::open(blob).map_err(|e| format!("first pages: {e}"))?;
    let z = zstd::stream::Decoder::new(input).map_err(|e| format!("first pages: {e}"))?;
    let mut r = io::BufReader::new(z);
    let mut line = Vec::new();
    (&mut r)
        .take(MAX_HEAD)
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("first pages: {e}"))?;
    let ranges: Vec<Range> =
        serde_json::from_slice(&line).map_err(|e| format!("first pages: the ranges: {e}"))?;
    let mut total = 0u64;
    for (name, off, len) in &ranges {
        let size = sizes
            .get(name)
            .ok_or_else(|| format!("first pages: {name:?} is not a page file of the image"))?;
        if off.checked_add(*len).is_none_or(|end| end > *size) {
            return Err(format!(
                "first pages: {name:?} {off}+{len} is past its {size} bytes"
            ));
        }
        total += len;
    }
    // Never more than the page files hold, whatever the ranges overlap.
    let whole: u64 = sizes.values().sum();
    if total > whole {
        return Err(format!(
            "first pages: {total} bytes of ranges, more than the page files' {whole}"
        ));
    }
    let mut buf = vec![0u8; CHUNK];
    for (name, off, len) in &ranges {
        let out = std::fs::OpenOptions::new()
            .write(true)
            .open(data.join(name))
            .map_err(|e| format!("first pages: {name}: {e}"))?;
        let mut done = 0u64;
        while done < *len {
            let n = usize::try_from((*len - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            r.read_exact(&mut buf[..n])
                .map_err(|e| format!("first pages: {name}: {e}"))?;
            out.write_all_at(&buf[..n], off + done)
                .map_err(|e| format!("first pages: {name}: {e}"))?;
            done += n as u64;
        }
    }
    if r.read(&mut [0u8; 1]).map_err(|e| e.to_string())? != 0 {
        return Err(format!(
            "first pages: more than the {total} bytes its ranges hold"
        ));
    }
    Ok(ranges.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_first_pages_land_where_they_were_and_nothing_else_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        let pages: Vec<u8> = (0..64u32 << 10).map(|i| (i % 253) as u8).collect();
        std::fs::write(src.join("pages-1.img"), &pages).unwrap();
        std::fs::File::create(dst.join("pages-1.img"))
            .unwrap()
            .set_len(pages.len() as u64)
            .unwrap();
        let ranges = vec![
            ("pages-1.img".to_string(), 4096, 8192),
            ("pages-1.img".to_string(), 40960, 4096),
        ];
        let blob = dir.path().join("first");
        pack(&src, &ranges, &blob, 3).unwrap();
        let sizes = BTreeMap::from([("pages-1.img".to_string(), pages.len() as u64)]);
        let got = unpack(&blob, &dst, &sizes).unwrap();
        assert_eq!(got.len(), 2);
        let back = std::fs::read(dst.join("pages-1.img")).unwrap();
        assert_eq!(&back[4096..12288], &pages[4096..12288]);
        assert_eq!(&back[40960..45056], &pages[40960..45056]);
        assert!(back[..4096].iter().all(|&b| b == 0), "only the ranges");
        assert!(
            back[12288..40960].iter().all(|&b| b == 0),
            "only the ranges"
        );
    }

    #[test]
    fn ranges_outside_the_image_or_bytes_that_do_not_add_up_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = BTreeMap::from([("pages-1.img".to_string(), 8192u64)]);
        let raw = |head: &str, body: &[u8]| {
            let p = dir.path().join("blob");
            let mut z = zstd::stream::Encoder::new(File::create(&p).unwrap(), 1).unwrap();
            z.write_all(head.as_bytes()).unwrap();
            z.write_all(b"\n").unwrap();
            z.write_all(body).unwrap();
            z.finish().unwrap();
            p
        };
        std::fs::File::create(dir.path().join("pages-1.img"))
            .unwrap()
            .set_len(8192)
            .unwrap();
        for (head, body, why) in [
            (
                r#"[["../etc/passwd",0,4]]"#,
                &b"evil"[..],
                "not a page file",
            ),
            (r#"[["core-1.img",0,4]]"#, &b"evil"[..], "not a page file"),
            (r#"[["pages-1.img",8190,4]]"#, &b"evil"[..], "past its"),
            (
                r#"[["pages-1.img",18446744073709551615,4]]"#,
                &b"evil"[..],
                "past its",
            ),
            (r#"[["pages-1.img",0,8]]"#, &b"evil"[..], "pages-1.img"),
            (r#"[["pages-1.img",0,2]]"#, &b"evil"[..], "more than"),
            (
                r#"[["pages-1.img",0,8192],["pages-1.img",0,8192]]"#,
                &b""[..],
                "more than the page files'",
            ),
            ("not json", &b""[..], "the ranges"),
        ] {
            let err = unpack(&raw(head, body), dir.path(), &sizes).unwrap_err();
            assert!(err.contains(why), "{head}: {err}");
        }
    }
}
