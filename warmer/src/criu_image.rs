//! Reading CRIU's image files, as far as warmer needs to: which regular
//! files the dumped tree held open, and how.
//!
//! An image file is a 32-bit magic (and for most images a second one naming
//! the image type), then entries: a little-endian u32 length and that many
//! bytes of a protobuf message (CRIU's `images/*.proto`, proto2). `files.img`
//! holds `file_entry { type = 1; id = 2; reg = 3 (reg_file_entry) ... }` and
//! `reg_file_entry { id = 1; flags = 2; pos = 3; name = 6; size = 8 }`.

use std::path::{Path, PathBuf};

/// CRIU's `IMG_COMMON_MAGIC` and `IMG_SERVICE_MAGIC` (criu/include/magic.h):
/// images that carry a second, per-type magic after them.
const COMMON_MAGICS: [u32; 2] = [0x5456_4319, 0x5510_5940];
/// `fd_types.REG` in fdinfo.proto.
const FD_TYPE_REG: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: malformed at byte {at}: {what}", path.display())]
    Malformed {
        path: PathBuf,
        at: usize,
        what: &'static str,
    },
}

/// A regular file the dumped tree held open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFile {
    pub path: String,
    /// open(2) flags as CRIU recorded them.
    pub flags: u64,
    /// The file's size at the dump, when recorded.
    pub size: Option<u64>,
}

impl OpenFile {
    /// Opened for writing without O_APPEND: a later write by anyone changes
    /// what the restored process expects (CRIU checks the size: "bad size").
    pub fn writes_in_place(&self) -> bool {
        let acc = self.flags & u64::from(libc::O_ACCMODE.unsigned_abs());
        let writable = acc == u64::from(libc::O_WRONLY.unsigned_abs())
            || acc == u64::from(libc::O_RDWR.unsigned_abs());
        writable && self.flags & u64::from(libc::O_APPEND.unsigned_abs()) == 0
    }
}

/// The `file_entry` sub-messages (field `field`) of every entry of type
/// `fd_type` in an image directory's `files.img`, and that file's path.
fn file_entries(
    images_dir: &Path,
    fd_type: u64,
    field: u64,
) -> Result<(PathBuf, Vec<Vec<u8>>), ImageError> {
    let path = images_dir.join("files.img");
    let bytes = std::fs::read(&path).map_err(|source| ImageError::Read {
        path: path.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries(&path, &bytes)? {
        let (mut kind, mut sub) = (None, None);
        for f in Fields::new(entry) {
            match f.map_err(|(at, what)| malformed(&path, at, what))? {
                (1, Value::Varint(v)) => kind = Some(v),
                (n, Value::Bytes(b)) if n == field => sub = Some(b.to_vec()),
                _ => {}
            }
        }
        if let (Some(k), Some(b)) = (kind, sub) {
            if k == fd_type {
                out.push(b);
            }
        }
    }
    Ok((path, out))
}

/// The regular files in an image directory's `files.img`.
pub fn open_files(images_dir: &Path) -> Result<Vec<OpenFile>, ImageError> {
    let (path, regs) = file_entries(images_dir, FD_TYPE_REG, 3)?;
    let mut out = Vec::new();
    for reg in &regs {
        let mut file = OpenFile {
            path: String::new(),
            flags: 0,
            size: None,
        };
        for field in Fields::new(reg) {
            let (num, value) = field.map_err(|(at, what)| malformed(&path, at, what))?;
            match (num, value) {
                (2, Value::Varint(v)) => file.flags = v,
                (6, Value::Bytes(b)) => file.path = String::from_utf8_lossy(b).into_owned(),
                (8, Value::Varint(v)) => file.size = Some(v),
                _ => {}
            }
        }
        out.push(file);
    }
    Ok(out)
}

fn malformed(path: &Path, at: usize, what: &'static str) -> ImageError {
    ImageError::Malformed {
        path: path.to_path_buf(),
        at,
        what,
    }
}

/// `fd_types.INETSK`, and `file_entry.isk`.
const FD_TYPE_INETSK: u64 = 4;
const TCP_ESTABLISHED: u64 = 1;

/// The established TCP connections an image holds (`inet_sk_entry`: family
/// 3, proto 5, state 6, src_port 7, dst_port 8, src_addr 11, dst_addr 12,
/// addresses as u32 words in network byte order).
pub fn tcp_connections(images_dir: &Path) -> Result<Vec<crate::criu::Conn>, ImageError> {
    let (path, isks) = file_entries(images_dir, FD_TYPE_INETSK, 4)?;
    let mut out = Vec::new();
    for isk in &isks {
        let (mut proto, mut state, mut sport, mut dport) = (0, 0, 0, 0);
        let (mut src, mut dst) = (Vec::new(), Vec::new());
        for field in Fields::new(isk) {
            match field.map_err(|(at, what)| malformed(&path, at, what))? {
                (5, Value::Varint(v)) => proto = v,
                (6, Value::Varint(v)) => state = v,
                (7, Value::Varint(v)) => sport = v,
                (8, Value::Varint(v)) => dport = v,
                (11, Value::Varint(v)) => src.push(v),
                (12, Value::Varint(v)) => dst.push(v),
                _ => {}
            }
        }
        if proto != 6 || state != TCP_ESTABLISHED {
            continue;
        }
        let (Some(a), Some(b)) = (ip_of(&src), ip_of(&dst)) else {
            continue;
        };
        let (Ok(sport), Ok(dport)) = (u16::try_from(sport), u16::try_from(dport)) else {
            continue;
        };
        out.push(crate::criu::Conn {
            a: std::net::SocketAddr::new(a, sport),
            b: std::net::SocketAddr::new(b, dport),
        });
    }
    Ok(out)
}

/// One (IPv4) or four (IPv6) u32 words, each holding network-order bytes.
fn ip_of(words: &[u64]) -> Option<std::net::IpAddr> {
    let bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| u32::try_from(*w).unwrap_or(0).to_le_bytes())
        .collect();
    match bytes.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// The entries of an image file, after its magic(s).
fn entries<'a>(path: &Path, bytes: &'a [u8]) -> Result<Vec<&'a [u8]>, ImageError> {
    let u32_at = |at: usize| -> Option<u32> {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let first = u32_at(0).ok_or_else(|| malformed(path, 0, "no magic"))?;
    let mut at = if COMMON_MAGICS.contains(&first) { 8 } else { 4 };
    let mut out = Vec::new();
    while at < bytes.len() {
        let len = u32_at(at).ok_or_else(|| malformed(path, at, "truncated entry length"))?;
        let len = usize::try_from(len).map_err(|_| malformed(path, at, "entry too long"))?;
        let body = bytes
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| malformed(path, at, "truncated entry"))?;
        out.push(body);
        at += 4 + len;
    }
    Ok(out)
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of one protobuf message: (field number, value).
struct Fields<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }

    fn varint(&mut self) -> Result<u64, (usize, &'static str)> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.at).ok_or((self.at, "truncated varint"))?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err((self.at, "varint too long"))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), (usize, &'static str)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.buf.len() {
            return None;
        }
        Some((|| {
            let key = self.varint()?;
            let (num, wire) = (key >> 3, key & 7);
            let value = match wire {
                0 => Value::Varint(self.varint()?),
                1 | 5 => {
                    let n = if wire == 1 { 8 } else { 4 };
                    if self.at + n > self.buf.len() {
                        return Err((self.at, "truncated fixed field"));
                    }
                    self.at += n;
                    Value::Fixed
                }
                2 => {
                    let len = usize::try_from(self.varint()?).map_err(|_| (self.at, "length"))?;
                    let end = self.at.checked_add(len).ok_or((self.at, "length"))?;
                    let b = self
                        .buf
                        .get(self.at..end)
                        .ok_or((self.at, "truncated bytes"))?;
                    self.at = end;
                    Value::Bytes(b)
                }
                _ => return Err((self.at, "unknown wire type")),
            };
            Ok((num, value))
        })())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = u8::try_from(v & 0x7f).unwrap();
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn field_bytes(num: u64, b: &[u8], out: &mut Vec<u8>) {
        varint(num << 3 | 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    fn field_varint(num: u64, v: u64, out: &mut Vec<u8>) {
        varint(num << 3, out);
        varint(v, out);
    }

    /// A files.img with one regular file and one pipe, as CRIU writes it.
    fn files_img(name: &str, flags: u64) -> Vec<u8> {
        let mut reg = Vec::new();
        field_varint(1, 7, &mut reg);
        field_varint(2, flags, &mut reg);
        field_varint(3, 0, &mut reg);
        field_bytes(6, name.as_bytes(), &mut reg);
        field_varint(8, 42, &mut reg);
        let mut e1 = Vec::new();
        field_varint(1, FD_TYPE_REG, &mut e1);
        field_varint(2, 7, &mut e1);
        field_bytes(3, &reg, &mut e1);
        let mut e2 = Vec::new();
        field_varint(1, 2, &mut e2); // PIPE
        field_varint(2, 8, &mut e2);
        let mut img = Vec::new();
        img.extend_from_slice(&0x5456_4319u32.to_le_bytes());
        img.extend_from_slice(&0x5630_3138u32.to_le_bytes());
        for e in [e1, e2] {
            img.extend_from_slice(&u32::try_from(e.len()).unwrap().to_le_bytes());
            img.extend_from_slice(&e);
        }
        img
    }

    #[test]
    fn regular_files_and_how_they_are_open() {
        let dir = tempfile::tempdir().unwrap();
        let rdwr = u64::try_from(libc::O_RDWR).unwrap();
        std::fs::write(
            dir.path().join("files.img"),
            files_img("/var/lib/db/data", rdwr),
        )
        .unwrap();
        let files = open_files(dir.path()).unwrap();
        assert_eq!(files.len(), 1, "the pipe is not a regular file");
        assert_eq!(files[0].path, "/var/lib/db/data");
        assert_eq!(files[0].size, Some(42));
        assert!(files[0].writes_in_place());
        let append = u64::try_from(libc::O_WRONLY | libc::O_APPEND).unwrap();
        std::fs::write(
            dir.path().join("files.img"),
            files_img("/var/log/x", append),
        )
        .unwrap();
        assert!(!open_files(dir.path()).unwrap()[0].writes_in_place());
    }

    #[test]
    fn established_tcp_connections_are_read_and_listeners_skipped() {
        let sk = |state: u64, sport: u64, dport: u64| {
            let mut isk = Vec::new();
            for (n, v) in [
                (1, 26),
                (2, 99),
                (3, 2),
                (4, 1),
                (5, 6),
                (6, state),
                (7, sport),
                (8, dport),
            ] {
                field_varint(n, v, &mut isk);
            }
            // 127.0.0.1 as CRIU stores it: network-order bytes in a u32.
            field_varint(11, u64::from(u32::from_le_bytes([127, 0, 0, 1])), &mut isk);
            field_varint(12, u64::from(u32::from_le_bytes([127, 0, 0, 2])), &mut isk);
            let mut e = Vec::new();
            field_varint(1, FD_TYPE_INETSK, &mut e);
            field_varint(2, 26, &mut e);
            field_bytes(4, &isk, &mut e);
            e
        };
        let mut img = Vec::new();
        img.extend_from_slice(&0x5456_4319u32.to_le_bytes());
        img.extend_from_slice(&0x5630_3138u32.to_le_bytes());
        for e in [sk(10, 8080, 0), sk(1, 8080, 51000)] {
            img.extend_from_slice(&u32::try_from(e.len()).unwrap().to_le_bytes());
            img.extend_from_slice(&e);
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("files.img"), img).unwrap();
        let conns = tcp_connections(dir.path()).unwrap();
        assert_eq!(
            conns,
            vec![crate::criu::Conn {
                a: "127.0.0.1:8080".parse().unwrap(),
                b: "127.0.0.2:51000".parse().unwrap()
            }]
        );
    }

    #[test]
    fn truncated_images_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let img = files_img("/x", 2);
        for cut in 0..img.len() {
            std::fs::write(dir.path().join("files.img"), &img[..cut]).unwrap();
            let _ = open_files(dir.path());
        }
        std::fs::write(dir.path().join("files.img"), &img[..img.len() - 3]).unwrap();
        assert!(matches!(
            open_files(dir.path()),
            Err(ImageError::Malformed { .. })
        ));
    }
}
