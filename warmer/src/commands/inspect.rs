//! `warmer inspect SVC|DIGEST`: what an image holds, from its files alone
//! (nothing is run or restored): the process tree with command lines, each
//! process's memory in the image, its open files and sockets, its
//! namespaces, and warmer's own record (when and why it was taken, on what
//! host, from where). CRIU's images are read with the types generated from
//! its own `.proto` files ([`crate::image::criu`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use cache::{Cache, Entry};
use serde::Serialize;

use crate::dirs::Dirs;
use crate::image::criu::proto::{self, FdTypes};
use crate::image::criu::{self as img, ImageError};

/// `pagemap_entry.flags` (criu/include/pagemap.h).
const PE_LAZY: u32 = 1 << 1;
const PE_PRESENT: u32 = 1 << 2;
/// A command line longer than this is cut (it is read from the image's pages).
const MAX_CMDLINE: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Pick(#[from] crate::remote::RemoteError),
    #[error("cannot read the image")]
    Image(#[from] ImageError),
    #[error("cache")]
    Cache(#[from] cache::Error),
}

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub key: String,
    pub service: String,
    pub digest: String,
    pub generation: u64,
    pub created: String,
    /// ready, on_demand or stop (see [`crate::image::Taken`]).
    pub taken: Option<String>,
    pub cold_start_ms: Option<u64>,
    /// Where the image came from; `None`: made on this machine.
    pub origin: Option<String>,
    pub stale: Option<String>,
    pub bytes: u64,
    pub host: BTreeMap<String, String>,
    /// `state:` paths captured with the image.
    pub state: Vec<String>,
    pub tcp_established: bool,
    pub criu_image_version: u32,
    pub processes: Vec<Process>,
    pub sockets: Vec<Socket>,
    /// Namespace images the dump holds (the tree's own namespaces).
    pub namespaces: Vec<String>,
    /// What its restores touched first, if learned.
    pub working_set: Option<WorkingSetSummary>,
}

#[derive(Debug, Serialize)]
pub struct WorkingSetSummary {
    pub memory_bytes: u64,
    pub file_bytes: u64,
    pub files: usize,
    pub restores: u32,
    pub settled: bool,
}

#[derive(Debug, Serialize)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
    pub threads: usize,
    pub comm: String,
    /// argv, read from the image's memory pages (`None` if not there).
    pub cmdline: Option<Vec<String>>,
    /// The names (never the values) of its environment variables, read from
    /// the image's pages: the image holds their values.
    pub env: Vec<String>,
    /// Of those, the ones whose names look like secrets (`*TOKEN*`,
    /// `*PASSWORD*`, `*SECRET*`, `*KEY*`, ...).
    pub secret_env: Vec<String>,
    /// Bytes of memory pages the image holds for the process.
    pub image_bytes: u64,
    /// Of those, pages a lazy restore may fetch on first touch.
    pub lazy_bytes: u64,
    pub mappings: usize,
    /// Namespace kind -> CRIU's id of it.
    pub namespaces: BTreeMap<String, u32>,
    pub fds: Vec<Fd>,
}

#[derive(Debug, Serialize)]
pub struct Fd {
    pub fd: u32,
    /// reg, pipe, inet, unix, eventfd, ...
    pub kind: String,
    pub what: String,
}

#[derive(Debug, Serialize)]
pub struct Socket {
    pub pid: u32,
    pub fd: u32,
    /// tcp, udp, tcp6, ...
    pub proto: String,
    /// listen, established, ...
    pub state: String,
    pub local: String,
    pub remote: Option<String>,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

/// Inspects the entry `target` names (see [`crate::remote::pick`]).
pub fn inspect(dirs: &Dirs, target: &str) -> Result<Inspection, InspectError> {
    let cache = Cache::open(&dirs.cache)?;
    let entry = crate::remote::pick(dirs, &cache, target)?;
    cache
        .check_shape(&entry)
        .map_err(|p| crate::remote::RemoteError::Damaged(p.to_string()))?;
    let mut i = describe(&entry)?;
    i.working_set = crate::restore::working_set::WorkingSet::load(&cache, &entry.key).map(|w| {
        let page = crate::restore::working_set::page_size();
        WorkingSetSummary {
            memory_bytes: w.bytes(),
            file_bytes: w.file_pages() * page,
            files: w.files.len(),
            restores: w.restores,
            settled: !w.learning(),
        }
    });
    Ok(i)
}

/// Reads everything [`Inspection`] shows from one entry's files.
pub fn describe(entry: &Entry) -> Result<Inspection, InspectError> {
    let dir = entry.data_dir();
    let info = crate::image::read(&dir).ok();
    let inventory: proto::InventoryEntry = img::read_one(&dir.join("inventory.img"))?;
    let files: BTreeMap<u32, proto::FileEntry> =
        img::files(&dir)?.into_iter().map(|f| (f.id, f)).collect();
    let page = page_size();
    let mut processes = Vec::new();
    let mut sockets = Vec::new();
    for p in img::read::<proto::PstreeEntry>(&dir.join("pstree.img"))? {
        let pid = p.pid;
        let core: Option<proto::CoreEntry> =
            img::read_one(&dir.join(format!("core-{pid}.img"))).ok();
        let ids: Option<proto::TaskKobjIdsEntry> =
            img::read_one(&dir.join(format!("ids-{pid}.img")))
                .ok()
                .or_else(|| core.as_ref().and_then(|c| c.ids));
        let mm: Option<proto::MmEntry> = img::read_one(&dir.join(format!("mm-{pid}.img"))).ok();
        let memory = Memory::read(&dir, pid, page).ok();
        let cmdline = match (&mm, &memory) {
            (Some(mm), Some(m)) => m.cmdline(&dir, mm.mm_arg_start, mm.mm_arg_end),
            _ => None,
        };
        let env: Vec<String> = match (&mm, &memory) {
            (Some(mm), Some(m)) => m
                .cmdline(&dir, mm.mm_env_start, mm.mm_env_end)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_string()))
                .collect(),
            _ => Vec::new(),
        };
        let secret_env = env
            .iter()
            .filter(|n| crate::process::hooks::looks_secret(n))
            .cloned()
            .collect();
        let mut fds = Vec::new();
        if let Some(ids) = &ids {
            let fdinfo = dir.join(format!("fdinfo-{}.img", ids.files_id));
            for fd in img::read::<proto::FdinfoEntry>(&fdinfo).unwrap_or_default() {
                let file = files.get(&fd.id);
                let (kind, what) = describe_file(fd.r#type, file);
                if let Some(sk) = file.and_then(|f| f.isk.as_ref()) {
                    sockets.push(socket(pid, fd.fd, sk));
                }
                fds.push(Fd {
                    fd: fd.fd,
                    kind,
                    what,
                });
            }
            fds.sort_by_key(|f| f.fd);
        }
        processes.push(Process {
            pid,
            ppid: p.ppid,
            pgid: p.pgid,
            sid: p.sid,
            threads: p.threads.len().max(1),
            comm: core
                .as_ref()
                .and_then(|c| c.tc.as_ref())
                .map(|tc| tc.comm.clone())
                .unwrap_or_default(),
            cmdline,
            env,
            secret_env,
            image_bytes: memory.as_ref().map_or(0, |m| m.present_pages * page),
            lazy_bytes: memory.as_ref().map_or(0, |m| m.lazy_pages * page),
            mappings: mm.as_ref().map_or(0, |m| m.vmas.len()),
            namespaces: ids.as_ref().map(namespaces_of).unwrap_or_default(),
            fds,
        });
    }
    let mut namespaces: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|d| {
            let name = d.file_name().to_string_lossy().into_owned();
            let kind = [
                ("netns-", "net"),
                ("utsns-", "uts"),
                ("ipcns-var-", "ipc"),
                ("mountpoints-", "mnt"),
                ("userns-", "user"),
                ("timens-", "time"),
                ("cgroup", "cgroup"),
            ]
            .iter()
            .find(|(prefix, _)| name.starts_with(prefix))?
            .1;
            Some(kind.to_string())
        })
        .collect();
    if processes.iter().any(|p| p.pid == 1) {
        namespaces.push("pid".into());
    }
    namespaces.sort();
    namespaces.dedup();
    Ok(Inspection {
        key: entry.key.clone(),
        service: entry.meta.service.clone(),
        digest: entry.meta.digest.clone(),
        generation: entry.meta.generation,
        created: entry.meta.created.clone(),
        taken: info.as_ref().map(|i| {
            serde_json::to_value(i.taken)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        }),
        cold_start_ms: entry.meta.cold_start_ms,
        origin: entry.meta.origin.clone(),
        stale: entry.stale.clone(),
        bytes: entry.meta.bytes,
        host: entry.meta.host.clone(),
        state: crate::image::state::captured_paths(&dir)
            .unwrap_or_default()
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        tcp_established: info.as_ref().is_some_and(|i| i.tcp_established),
        criu_image_version: inventory.img_version,
        processes,
        sockets,
        working_set: None,
        namespaces,
    })
}

fn namespaces_of(ids: &proto::TaskKobjIdsEntry) -> BTreeMap<String, u32> {
    [
        ("pid", ids.pid_ns_id),
        ("net", ids.net_ns_id),
        ("mnt", ids.mnt_ns_id),
        ("ipc", ids.ipc_ns_id),
        ("uts", ids.uts_ns_id),
        ("user", ids.user_ns_id),
        ("cgroup", ids.cgroup_ns_id),
        ("time", ids.time_ns_id),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_string(), v?)))
    .collect()
}

fn describe_file(kind: i32, file: Option<&proto::FileEntry>) -> (String, String) {
    let kind = FdTypes::try_from(kind)
        .map(|k| k.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("type {kind}"));
    let Some(f) = file else {
        return (kind, String::new());
    };
    let what = if let Some(r) = &f.reg {
        let acc = r.flags & libc::O_ACCMODE.unsigned_abs();
        let mode = if acc == libc::O_RDWR.unsigned_abs() {
            "rw"
        } else if acc == libc::O_WRONLY.unsigned_abs() {
            "w"
        } else {
            "r"
        };
        let append = if r.flags & libc::O_APPEND.unsigned_abs() != 0 {
            ", append"
        } else {
            ""
        };
        format!("{} ({mode}{append})", r.name)
    } else if let Some(sk) = &f.isk {
        let s = socket(0, 0, sk);
        match s.remote {
            Some(r) => format!("{} {} {} <-> {r}", s.proto, s.state, s.local),
            None => format!("{} {} {}", s.proto, s.state, s.local),
        }
    } else if let Some(u) = &f.usk {
        let name = String::from_utf8_lossy(&u.name).replace('\0', "@");
        if name.is_empty() {
            format!("unix (ino {}, peer {})", u.ino, u.peer)
        } else {
            format!("unix {name}")
        }
    } else if let Some(p) = &f.pipe {
        format!("pipe:[{}]", p.pipe_id)
    } else if let Some(t) = &f.tty {
        format!("tty (info {})", t.tty_info_id)
    } else {
        String::new()
    };
    (kind, what)
}

fn socket(pid: u32, fd: u32, sk: &proto::InetSkEntry) -> Socket {
    let proto = match (sk.proto, sk.family) {
        (6, 10) => "tcp6",
        (6, _) => "tcp",
        (17, 10) => "udp6",
        (17, _) => "udp",
        _ => "inet",
    };
    let state = match sk.state {
        img::TCP_ESTABLISHED => "established".to_string(),
        img::TCP_LISTEN => "listen".to_string(),
        7 if sk.proto == 17 => "open".to_string(),
        s => u8::try_from(s)
            .map(crate::process::ports::tcp_state_name)
            .unwrap_or("?")
            .to_ascii_lowercase()
            .replace('_', "-"),
    };
    let (local, remote) = match img::inet_addrs(sk) {
        Some((a, b)) => (
            a.to_string(),
            (sk.state == img::TCP_ESTABLISHED).then(|| b.to_string()),
        ),
        None => ("?".into(), None),
    };
    Socket {
        pid,
        fd,
        proto: proto.into(),
        state,
        local,
        remote,
    }
}

/// A process's pagemap: which of its pages the image holds, and where.
struct Memory {
    pages_file: String,
    /// (vaddr, pages, offset in the pages file in pages) of present ranges.
    ranges: Vec<(u64, u64, u64)>,
    present_pages: u64,
    lazy_pages: u64,
    page: u64,
}

impl Memory {
    fn read(dir: &Path, pid: u32, page: u64) -> Result<Self, ImageError> {
        // The first entry is a pagemap_head { pages_id = 1 }, which decodes
        // as a pagemap_entry with vaddr = pages_id.
        let mut entries =
            img::read::<proto::PagemapEntry>(&dir.join(format!("pagemap-{pid}.img")))?.into_iter();
        let head = entries.next().map_or(0, |h| h.vaddr);
        let mut m = Memory {
            pages_file: format!("pages-{head}.img"),
            ranges: Vec::new(),
            present_pages: 0,
            lazy_pages: 0,
            page,
        };
        for e in entries {
            let n = e.nr_pages.unwrap_or(u64::from(e.compat_nr_pages));
            let present = match e.flags {
                Some(f) => f & PE_PRESENT != 0,
                None => !e.in_parent.unwrap_or(false),
            };
            if present {
                m.ranges.push((e.vaddr, n, m.present_pages));
                m.present_pages += n;
                if e.flags.is_some_and(|f| f & PE_LAZY != 0) {
                    m.lazy_pages += n;
                }
            }
        }
        Ok(m)
    }

    /// The NUL-separated strings in [start, end) of the process's memory.
    fn cmdline(&self, dir: &Path, start: u64, end: u64) -> Option<Vec<String>> {
        let len = end.checked_sub(start)?.min(MAX_CMDLINE);
        let mut file = File::open(dir.join(&self.pages_file)).ok()?;
        let mut out = Vec::with_capacity(usize::try_from(len).ok()?);
        let mut addr = start;
        while addr < start + len {
            let &(vaddr, pages, at) = self
                .ranges
                .iter()
                .find(|(v, n, _)| addr >= *v && addr < v + n * self.page)?;
            let range_end = (vaddr + pages * self.page).min(start + len);
            file.seek(SeekFrom::Start(at * self.page + (addr - vaddr)))
                .ok()?;
            let mut chunk = vec![0u8; usize::try_from(range_end - addr).ok()?];
            file.read_exact(&mut chunk).ok()?;
            out.extend_from_slice(&chunk);
            addr = range_end;
        }
        let args: Vec<String> = out
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let mut args = args;
        while args.last().is_some_and(String::is_empty) {
            args.pop();
        }
        Some(args)
    }
}

/// The table for people.
pub fn render(i: &Inspection) -> String {
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    let mut out = String::new();
    out.push_str(&format!(
        "image {} (service {}, generation {})\n",
        i.key, i.service, i.generation
    ));
    let why = match i.taken.as_deref() {
        Some("ready") => "when the service became ready",
        Some("on_demand") => "by `warmer checkpoint`",
        Some("stop") => "at the service's stop (persist)",
        _ => "(unknown)",
    };
    out.push_str(&format!("  taken    {} {why}\n", i.created));
    if let Some(c) = i.cold_start_ms {
        out.push_str(&format!("  cold     {c} ms to ready on its maker\n"));
    }
    out.push_str(&format!(
        "  from     {}\n",
        i.origin.as_deref().unwrap_or("made on this machine")
    ));
    if let Some(s) = &i.stale {
        out.push_str(&format!("  stale    {s}\n"));
    }
    out.push_str(&format!(
        "  size     {} in the cache; CRIU image version {}\n",
        mb(i.bytes),
        i.criu_image_version
    ));
    let fact = |k: &str| i.host.get(k).map(String::as_str).unwrap_or("?");
    out.push_str(&format!(
        "  host     kernel {}, CRIU {}, image format {}, {} CPU flags\n",
        fact("kernel"),
        fact("criu_version"),
        fact("image_format"),
        fact("cpu_flags").split_whitespace().count()
    ));
    if !i.state.is_empty() {
        out.push_str(&format!("  state    {}\n", i.state.join(", ")));
    }
    if let Some(w) = &i.working_set {
        out.push_str(&format!(
            "  working set {} of memory first, {} of {} files asked for after a boot; learned from {} restores{}\n",
            mb(w.memory_bytes),
            mb(w.file_bytes),
            w.files,
            w.restores,
            if w.settled { ", settled" } else { "" }
        ));
    }
    out.push_str(&format!(
        "  namespaces of its own: {}\n",
        if i.namespaces.is_empty() {
            "none".to_string()
        } else {
            i.namespaces.join(", ")
        }
    ));
    out.push_str(&format!(
        "\n{:>6} {:>6} {:>7} {:>10}  COMMAND\n",
        "PID", "PPID", "THREADS", "MEMORY"
    ));
    for p in &i.processes {
        let cmd = match &p.cmdline {
            Some(a) if !a.is_empty() => a.join(" "),
            _ => format!("[{}]", p.comm),
        };
        out.push_str(&format!(
            "{:>6} {:>6} {:>7} {:>10}  {}\n",
            p.pid,
            p.ppid,
            p.threads,
            mb(p.image_bytes),
            crate::errors::escape(&cmd)
        ));
        if !p.secret_env.is_empty() {
            out.push_str(&format!(
                "{:>33}  holds secrets in its environment: {}\n",
                "",
                crate::errors::escape(&p.secret_env.join(", "))
            ));
        }
    }
    if !i.sockets.is_empty() {
        out.push_str("\nSOCKETS\n");
        for s in &i.sockets {
            let remote = s
                .remote
                .as_deref()
                .map(|r| format!(" <-> {r}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  pid {:<5} fd {:<4} {:<5} {:<12} {}{remote}\n",
                s.pid, s.fd, s.proto, s.state, s.local
            ));
        }
    }
    out.push_str("\nOPEN FILES\n");
    for p in &i.processes {
        for f in &p.fds {
            out.push_str(&format!(
                "  pid {:<5} fd {:<4} {:<10} {}\n",
                p.pid, f.fd, f.kind, f.what
            ));
        }
    }
    out
}
