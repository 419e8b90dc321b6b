//! A page server of warmer's own for `criu lazy-pages --page-server`: the
//! lazy daemon asks it for the pages it does not have, and it answers from
//! an image whose page files may still be arriving ([`Pages`]).
//!
//! The protocol, from CRIU 4.2's `criu/page-xfer.c` (`--ps-socket` hands
//! the daemon a socket warmer made: no port anyone else could ask pages
//! from):
//!
//! ```text
//! request   {u32 cmd = PS_IOV_GET (7), u64 nr_pages, u64 vaddr, u64 dst_id}   32 bytes
//!           dst_id = the task's pid in the image
//! answer    {u32 cmd = PS_IOV_ADD_F | PE_PRESENT << 16, u64 nr_pages (may be
//!            fewer than asked), u64 vaddr, u64 dst_id}  then nr_pages pages
//! end       {PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE}  answered with an i32 0
//! ```
//!
//! Requests are answered in order. What a page of the image is: the
//! image's own pagemaps say (each `PE_PRESENT` entry's pages follow the
//! previous ones in its `pages-<id>.img`). A page that cannot be had (the
//! registry gone, a frame that fails its hash) is never answered with
//! anything: `on_failure` runs first (it ends the tree, whose faults are
//! waiting on this answer), then the socket is closed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use prost::Message as _;

use crate::image::criu::proto::{PagemapEntry, PagemapHead};

const PS_IOV_GET: u32 = 7;
const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_BITS: u32 = 16;
const PE_PRESENT: u32 = 1 << 2;
/// The most pages one answer carries (the daemon asks again for the rest).
const MAX_ANSWER_PAGES: u64 = 256;

/// Where the bytes of an image's page files come from.
pub trait Pages: Send + Sync {
    /// Returns once bytes `off..off + len` of the page file `name` (in the
    /// images directory) hold the image's pages, verified; `Err` says why
    /// they never will.
    fn ready(&self, name: &str, off: u64, len: u64) -> Result<(), String>;
}

/// One run of pages: where its pages are in their file.
#[derive(Debug, Clone)]
struct Run {
    pages: u64,
    file: Arc<(String, File)>,
    off: u64,
}

/// Every task's runs, by image pid, then by address.
type Index = BTreeMap<u64, BTreeMap<u64, Run>>;

/// Reads the pagemaps of `images`: where each page of each task is.
fn index(images: &Path) -> std::io::Result<Index> {
    let page = super::working_set::page_size();
    let bad = |p: &Path, what: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {what}", p.display()),
        )
    };
    let mut out = Index::new();
    let mut files: BTreeMap<u32, Arc<(String, File)>> = BTreeMap::new();
    for d in std::fs::read_dir(images)? {
        let name = d?.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("pagemap-")?.strip_suffix(".img"))
            .and_then(|p| p.parse::<u64>().ok())
        else {
            continue;
        };
        let path = images.join(&name);
        let bytes = std::fs::read(&path)?;
        let (_, bodies) =
            crate::image::criu::frames(&bytes).map_err(|(_, what)| bad(&path, what))?;
        let Some((head, rest)) = bodies.split_first() else {
            continue;
        };
        let head = PagemapHead::decode(*head).map_err(|e| bad(&path, e.to_string()))?;
        let file = match files.get(&head.pages_id) {
            Some(f) => f.clone(),
            None => {
                let fname = format!("pages-{}.img", head.pages_id);
                let f = Arc::new((fname.clone(), File::open(images.join(&fname))?));
                files.insert(head.pages_id, f.clone());
                f
            }
        };
        let runs = out.entry(pid).or_default();
        let mut off = 0u64;
        for b in rest {
            let e = PagemapEntry::decode(*b).map_err(|e| bad(&path, e.to_string()))?;
            let n = e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages));
            if e.flags.unwrap_or(0) & PE_PRESENT == 0 {
                continue;
            }
            runs.insert(
                e.vaddr,
                Run {
                    pages: n,
                    file: file.clone(),
                    off,
                },
            );
            off += n * page;
        }
    }
    Ok(out)
}

/// A request, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Iov {
    cmd: u32,
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}

impl Iov {
    fn decode(b: &[u8; 32]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Iov {
            cmd: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&self.cmd.to_le_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_le_bytes());
        b
    }
}

/// Serves the image in `images` on `sock` until the daemon says it is done
/// (`Ok`), a page cannot be had or the daemon asks for nonsense
/// (`on_failure` has run; `Err`), or the daemon hangs up (`Err`).
pub fn serve(
    images: &Path,
    mut sock: UnixStream,
    pages: &dyn Pages,
    on_failure: &mut dyn FnMut(&str),
) -> Result<(), String> {
    let index = index(images).map_err(|e| format!("cannot read the image's pagemaps: {e}"))?;
    let page = super::working_set::page_size();
    let mut buf = Vec::new();
    let mut fail = |why: String| {
        on_failure(&why);
        Err(why)
    };
    loop {
        let mut req = [0u8; 32];
        if let Err(e) = sock.read_exact(&mut req) {
            // The daemon went away without saying it was done (killed with
            // its tree at a stop, or dead: its own supervision handles that).
            return Err(format!("the lazy-pages daemon hung up: {e}"));
        }
        let iov = Iov::decode(&req);
        match iov.cmd & ((1 << PS_CMD_BITS) - 1) {
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                let _ = sock.write_all(&0i32.to_le_bytes());
                return Ok(());
            }
            PS_IOV_GET => {}
            other => return fail(format!("the lazy-pages daemon sent command {other:#x}")),
        }
        // The lazy daemon names the task as its page read does: by its pid
        // in the image (not encoded as a dump's page server names it).
        let pid = iov.dst_id;
        let run = index
            .get(&pid)
            .and_then(|runs| runs.range(..=iov.vaddr).next_back())
            .filter(|(start, r)| iov.vaddr < *start + r.pages * page);
        let Some((start, run)) = run else {
            return fail(format!(
                "no page of task {pid} at {:#x} in the image",
                iov.vaddr
            ));
        };
        let skip = (iov.vaddr - start) / page;
        let n = iov.nr_pages.min(run.pages - skip).min(MAX_ANSWER_PAGES);
        if n == 0 {
            return fail(format!(
                "an empty request for task {pid} at {:#x}",
                iov.vaddr
            ));
        }
        let (name, file) = &*run.file;
        let off = run.off + skip * page;
        let len = n * page;
        if let Err(why) = pages.ready(name, off, len) {
            return fail(why);
        }
        buf.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
        if let Err(e) = file.read_exact_at(&mut buf, off) {
            return fail(format!("{name}: {e}"));
        }
        let answer = Iov {
            cmd: PS_IOV_ADD_F | (PE_PRESENT << PS_CMD_BITS),
            nr_pages: n,
            ..iov
        };
        if let Err(e) = sock
            .write_all(&answer.encode())
            .and_then(|()| sock.write_all(&buf))
        {
            return Err(format!("the lazy-pages daemon hung up: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of one task (pid 2): two runs of pages, the second after a
    /// run the file does not hold.
    fn image(dir: &Path) -> Vec<u8> {
        let page = crate::restore::working_set::page_size();
        let mut img = Vec::new();
        img.extend_from_slice(&0x5456_4319u32.to_le_bytes());
        img.extend_from_slice(&0x5630_3138u32.to_le_bytes());
        let mut frame = |body: Vec<u8>| {
            img.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
            img.extend_from_slice(&body);
        };
        frame(PagemapHead { pages_id: 7 }.encode_to_vec());
        for (vaddr, n, flags) in [
            (0x10000u64, 2u64, PE_PRESENT),
            (0x20000, 1, 0),
            (0x30000, 3, PE_PRESENT | 2),
        ] {
            frame(
                PagemapEntry {
                    vaddr,
                    compat_nr_pages: 0,
                    in_parent: None,
                    flags: Some(flags),
                    nr_pages: Some(n),
                }
                .encode_to_vec(),
            );
        }
        std::fs::write(dir.join("pagemap-2.img"), img).unwrap();
        let pages: Vec<u8> = (0..5 * page)
            .map(|i| u8::try_from(i / page + 1).unwrap())
            .collect();
        std::fs::write(dir.join("pages-7.img"), &pages).unwrap();
        pages
    }

    fn ask(sock: &mut UnixStream, vaddr: u64, n: u64) -> (Iov, Vec<u8>) {
        let req = Iov {
            cmd: PS_IOV_GET,
            nr_pages: n,
            vaddr,
            dst_id: 2,
        };
        sock.write_all(&req.encode()).unwrap();
        let mut head = [0u8; 32];
        sock.read_exact(&mut head).unwrap();
        let got = Iov::decode(&head);
        let mut data = vec![0u8; usize::try_from(got.nr_pages * 4096).unwrap()];
        sock.read_exact(&mut data).unwrap();
        (got, data)
    }

    /// Page files that are complete on disk.
    struct Local;
    impl Pages for Local {
        fn ready(&self, _: &str, _: u64, _: u64) -> Result<(), String> {
            Ok(())
        }
    }

    /// Pages that never come.
    struct Gone;
    impl Pages for Gone {
        fn ready(&self, name: &str, _: u64, _: u64) -> Result<(), String> {
            Err(format!("{name}: the registry is gone"))
        }
    }

    #[test]
    fn pages_are_served_from_where_the_pagemap_puts_them_and_failures_end_the_tree_first() {
        let dir = tempfile::tempdir().unwrap();
        let pages = image(dir.path());
        let (mut daemon, ours) = UnixStream::pair().unwrap();
        let images = dir.path().to_path_buf();
        let server = std::thread::spawn(move || {
            serve(&images, ours, &Local, &mut |why| panic!("gave up: {why}"))
        });
        // The second run's second page: file offset 2 pages + 1 page; an
        // answer never goes past its run.
        let (got, data) = ask(&mut daemon, 0x31000, 9);
        assert_eq!(got.cmd, PS_IOV_ADD_F | (PE_PRESENT << PS_CMD_BITS));
        assert_eq!((got.vaddr, got.nr_pages, got.dst_id), (0x31000, 2, 2));
        assert_eq!(data, pages[3 * 4096..5 * 4096]);
        let (got, data) = ask(&mut daemon, 0x10000, 1);
        assert_eq!(got.nr_pages, 1);
        assert_eq!(data, pages[..4096]);
        // Done: answered with 0.
        let close = Iov {
            cmd: PS_IOV_FORCE_CLOSE,
            nr_pages: 0,
            vaddr: 0,
            dst_id: 0,
        };
        daemon.write_all(&close.encode()).unwrap();
        let mut status = [0u8; 4];
        daemon.read_exact(&mut status).unwrap();
        assert_eq!(i32::from_le_bytes(status), 0);
        assert_eq!(server.join().unwrap(), Ok(()));

        // Pages that cannot be had: `on_failure` runs before the daemon
        // hears anything, and it hears nothing but the socket closing.
        let (mut daemon, ours) = UnixStream::pair().unwrap();
        let images = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            serve(&images, ours, &Gone, &mut |why| {
                tx.send(why.to_string()).unwrap()
            })
        });
        let req = Iov {
            cmd: PS_IOV_GET,
            nr_pages: 1,
            vaddr: 0x10000,
            dst_id: 2,
        };
        daemon.write_all(&req.encode()).unwrap();
        let mut rest = Vec::new();
        daemon.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing is served");
        assert!(rx.try_recv().unwrap().contains("registry is gone"));
        assert!(server.join().unwrap().is_err());

        // A page the image does not hold is never made up.
        let (mut daemon, ours) = UnixStream::pair().unwrap();
        let images = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            serve(&images, ours, &Local, &mut |why| {
                tx.send(why.to_string()).unwrap()
            })
        });
        let req = Iov {
            vaddr: 0x20000,
            ..req
        };
        daemon.write_all(&req.encode()).unwrap();
        let mut rest = Vec::new();
        daemon.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(rx.try_recv().unwrap().contains("no page of task 2"));
        assert!(server.join().unwrap().is_err());
    }

    #[test]
    fn requests_and_answers_have_criu_4_2s_layout() {
        let iov = Iov {
            cmd: PS_IOV_GET,
            nr_pages: 3,
            vaddr: 0x7f00_0000_1000,
            dst_id: 42,
        };
        let b = iov.encode();
        assert_eq!(b.len(), 32);
        assert_eq!(&b[0..4], &7u32.to_le_bytes());
        assert_eq!(&b[4..8], &[0, 0, 0, 0], "padding after the u32 command");
        assert_eq!(Iov::decode(&b), iov);
        assert_eq!(PS_IOV_ADD_F | (PE_PRESENT << PS_CMD_BITS), 0x0004_0006);
    }
}
