//! Who holds a listening TCP port: the service's own tree, or someone else.
//!
//! A probe that connects to a port another process already listens on
//! succeeds at once, though the service is still warming up (and will die
//! with EADDRINUSE). So for local `http`/`tcp` probes an answer counts only
//! when the listening socket belongs to a process of the service's PID
//! namespace (matched by socket inode, from /proc/net/tcp{,6} and the
//! processes' fds).

use std::collections::BTreeSet;

use nix::unistd::Pid;

/// Who listens on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A process of the service's own tree.
    Service,
    /// Someone else: pid and command name (or "unknown" if not found).
    Other(String),
    /// No listening socket on the port (yet).
    Nobody,
}

/// Inodes of the sockets listening on TCP `port` (IPv4 and IPv6).
pub fn listening_inodes(port: u16) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        out.extend(parse_listeners(&text, port));
    }
    out
}

/// The listening sockets on `port` in one /proc/net/tcp table.
fn parse_listeners(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            let (_, p) = local.rsplit_once(':')?;
            let p = u16::from_str_radix(p, 16).ok()?;
            // st 0A: TCP_LISTEN
            (p == port && *f.get(3)? == "0A").then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

/// Pids whose fds include one of `inodes`.
fn holders_of(inodes: &BTreeSet<u64>, only: Option<&BTreeSet<i32>>) -> Vec<i32> {
    let mut out = Vec::new();
    let pids: Vec<i32> = match only {
        Some(set) => set.iter().copied().collect(),
        None => all_pids(),
    };
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let hit = fds.filter_map(|d| d.ok()).any(|d| {
            std::fs::read_link(d.path()).ok().is_some_and(|t| {
                let t = t.to_string_lossy();
                t.strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|i| inodes.contains(&i))
            })
        });
        if hit {
            out.push(pid);
        }
    }
    out
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|d| d.ok())
        .filter_map(|d| d.file_name().to_str()?.parse().ok())
        .collect()
}

/// The processes of the tree under `init` (its descendants, walked through
/// /proc/PID/task/TID/children: no scan of every process).
fn tree_of(init: Pid) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    let mut todo = vec![init.as_raw()];
    while let Some(pid) = todo.pop() {
        if !out.insert(pid) {
            continue;
        }
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
        for t in tasks.into_iter().flatten().filter_map(|t| t.ok()) {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// The processes in the PID namespace whose init is `init`.
/// The processes (host PIDs) in the PID namespace of `init`.
pub fn namespace_pids(init: Pid) -> BTreeSet<i32> {
    namespace_of(init)
}

fn namespace_of(init: Pid) -> BTreeSet<i32> {
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let Some(want) = ns(init.as_raw()) else {
        return BTreeSet::new();
    };
    all_pids()
        .into_iter()
        .filter(|p| ns(*p).as_ref() == Some(&want))
        .collect()
}

/// Who listens on `port`, relative to the service whose init is `init`.
pub fn holder(port: u16, init: Pid) -> Holder {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return Holder::Nobody;
    }
    // The tree first (cheap); the whole namespace (orphans re-parented to
    // its init are in the tree anyway) only if that found nothing.
    if !holders_of(&inodes, Some(&tree_of(init))).is_empty()
        || !holders_of(&inodes, Some(&namespace_of(init))).is_empty()
    {
        return Holder::Service;
    }
    let others = holders_of(&inodes, None);
    Holder::Other(match others.first() {
        Some(pid) => {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("pid {pid} ({})", comm.trim())
        }
        None => "a process warmer cannot see".into(),
    })
}

/// The established TCP connections of the service whose init is `init`
/// (what a `--tcp-established` dump locks with iptables rules).
pub fn established(init: Pid) -> Vec<crate::criu::Conn> {
    connections(init)
        .into_iter()
        .filter(|(_, st)| *st == "ESTABLISHED")
        .map(|(c, _)| c)
        .collect()
}

/// The inodes of the sockets the processes hold open.
fn socket_inodes<'a>(pids: impl IntoIterator<Item = &'a i32>) -> BTreeSet<u64> {
    let mut ours = BTreeSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for d in fds.filter_map(|d| d.ok()) {
            if let Ok(t) = std::fs::read_link(d.path()) {
                let t = t.to_string_lossy();
                if let Some(i) = t
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    ours.insert(i);
                }
            }
        }
    }
    ours
}

/// The local addresses of the TCP sockets the tree under `root` listens
/// on (what `warmer adopt` takes a probe from), by port.
pub fn listening(root: Pid) -> Vec<std::net::SocketAddr> {
    let ours = socket_inodes(&tree_of(root));
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        out.extend(listeners_in(&text, &ours));
    }
    out.sort_by_key(|a| (a.port(), a.ip()));
    out.dedup_by_key(|a| a.port());
    out
}

/// The LISTEN sockets of one /proc/net/tcp table whose inode is in `ours`.
fn listeners_in(table: &str, ours: &BTreeSet<u64>) -> Vec<std::net::SocketAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ino = f.get(9)?.parse::<u64>().ok()?;
            (*f.get(3)? == "0A" && ours.contains(&ino)).then(|| proc_addr(f.get(1)?))?
        })
        .collect()
}

/// Every TCP connection (not listening sockets) of the service whose init
/// is `init`, with its state's name: what CRIU calls "Connected TCP socket".
pub fn connections(init: Pid) -> Vec<(crate::criu::Conn, &'static str)> {
    let ours = socket_inodes(&namespace_of(init));
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for l in text.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (Some(local), Some(remote), Some(st), Some(ino)) =
                (f.get(1), f.get(2), f.get(3), f.get(9))
            else {
                continue;
            };
            let state = u8::from_str_radix(st, 16).map_or("?", tcp_state_name);
            if state == "LISTEN" || !ino.parse::<u64>().is_ok_and(|i| ours.contains(&i)) {
                continue;
            }
            if let (Some(a), Some(b)) = (proc_addr(local), proc_addr(remote)) {
                out.push((crate::criu::Conn { a, b }, state));
            }
        }
    }
    out
}

/// The kernel's TCP states (include/net/tcp_states.h) by name.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "?",
    }
}

/// `0100007F:1F90` (or the 32-hex-digit IPv6 form) as in /proc/net/tcp.
fn proc_addr(s: &str) -> Option<std::net::SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..ip.len() / 8)
        .map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// Whether a probe address is on this machine (where ownership can be
/// checked): loopback, `localhost`, or the unspecified address.
pub fn is_local(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_found_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1\n\
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(
            parse_listeners(table, 8080),
            vec![4242],
            "the established one is not a listener"
        );
        assert_eq!(parse_listeners(table, 22), vec![99]);
        assert_eq!(
            listeners_in(table, &BTreeSet::from([4242, 4343])),
            vec!["127.0.0.1:8080".parse().unwrap()],
            "ours, and listening"
        );
        assert!(parse_listeners(table, 9).is_empty());
        assert_eq!(
            proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            proc_addr("00000000000000000000000001000000:0016"),
            Some("[::1]:22".parse().unwrap())
        );
    }

    #[test]
    fn a_port_this_test_holds_is_someone_elses_for_a_foreign_tree() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(!listening_inodes(port).is_empty());
        // PID 1's namespace is not ours only in containers; use a pid that
        // does not exist: its tree is empty, so the holder is "other".
        match holder(port, Pid::from_raw(i32::MAX - 1)) {
            Holder::Other(who) => assert!(who.contains(&std::process::id().to_string()), "{who}"),
            h => panic!("{h:?}"),
        }
        drop(l);
        assert_eq!(holder(port, Pid::from_raw(1)), Holder::Nobody);
        assert!(is_local("127.0.0.1") && is_local("[::1]") && is_local("localhost"));
        assert!(!is_local("10.1.2.3"));
    }
}
