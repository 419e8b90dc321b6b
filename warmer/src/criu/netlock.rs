//! CRIU's network lock: the per-connection DROP rules a `--tcp-established`
//! dump adds, found and removed when no restore will lift them.

use std::process::Command;

/// CRIU's mark for its own packets (soccr.h `SOCCR_MARK`): the per-connection
/// DROP rules of a `--tcp-established` network lock all carry `! --mark 0xc114`.
const LOCK_MARK: &str = "0xc114";

/// One TCP connection: its two endpoints, in either order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub a: std::net::SocketAddr,
    pub b: std::net::SocketAddr,
}

/// The connections a stop-time `--tcp-established` dump left locked: CRIU
/// keeps their DROP rules for the restore to lift. An image that is never
/// restored (removed, quarantined, superseded, or the start went cold)
/// would leave its peers' packets dropped for good, so the connections are
/// recorded here and their rules removed once the next start is ready
/// (a successful restore has lifted them already).
///
/// ```text
/// <run>/<svc>/network-locks.json   {format_version, conns: [[a, b], ...]}
/// ```
pub mod locks {
    use std::path::Path;

    use super::{clear_network_locks, Conn};

    const FILE: &str = "network-locks.json";
    const VERSION: u32 = 1;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Locks {
        format_version: u32,
        conns: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    }

    /// Records `conns` as locked by a dump that ended the tree.
    pub fn record(run_dir: &Path, conns: &[Conn]) -> std::io::Result<()> {
        let doc = Locks {
            format_version: VERSION,
            conns: conns.iter().map(|c| (c.a, c.b)).collect(),
        };
        cache::fsutil::write_atomic(
            run_dir,
            FILE,
            &serde_json::to_vec(&doc).expect("serializes"),
            0o600,
            cache::fsutil::Durability::Atomic,
        )
    }

    /// Removes the rules of the recorded connections, except those in
    /// `lifted` (a restore of the image they belong to lifted those itself);
    /// returns how many rules went.
    pub fn release(run_dir: &Path, lifted: &[Conn]) -> usize {
        let path = run_dir.join(FILE);
        let Ok(bytes) = std::fs::read(&path) else {
            return 0;
        };
        let conns: Vec<Conn> = serde_json::from_slice::<Locks>(&bytes)
            .map(|l| {
                l.conns
                    .into_iter()
                    .map(|(a, b)| Conn { a, b })
                    .collect::<Vec<Conn>>()
            })
            .unwrap_or_default()
            .into_iter()
            .filter(|c| !lifted.contains(c))
            .collect();
        let removed = clear_network_locks(&conns);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
        removed
    }
}

impl Conn {
    fn matches(&self, x: std::net::SocketAddr, y: std::net::SocketAddr) -> bool {
        (self.a == x && self.b == y) || (self.a == y && self.b == x)
    }
}

/// The endpoints a lock rule names: (`-s` with `--sport`, `-d` with `--dport`).
fn rule_endpoints(line: &str) -> Option<(std::net::SocketAddr, std::net::SocketAddr)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |flag: &str| {
        words
            .windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].split('/').next().unwrap_or(w[1]))
    };
    let ip = |s: &str| s.parse::<std::net::IpAddr>().ok();
    let port = |s: &str| s.parse::<u16>().ok();
    Some((
        std::net::SocketAddr::new(ip(after("-s")?)?, port(after("--sport")?)?),
        std::net::SocketAddr::new(ip(after("-d")?)?, port(after("--dport")?)?),
    ))
}

/// The `iptables -D` argument lists that remove CRIU's connection-lock rules
/// for the connections `only` (those of the dump or restore that failed: a
/// rule of another service's checkpoint in progress stays) found in
/// `iptables-save -t filter` output.
pub fn lock_rule_deletions(save: &str, only: &[Conn]) -> Vec<Vec<String>> {
    save.lines()
        .filter(|l| l.starts_with("-A ") && l.contains(LOCK_MARK) && l.ends_with("-j DROP"))
        .filter(|l| rule_endpoints(l).is_some_and(|(x, y)| only.iter().any(|c| c.matches(x, y))))
        .map(|l| {
            let mut args: Vec<String> = vec!["-t".into(), "filter".into(), "-D".into()];
            args.extend(l.split_whitespace().skip(1).map(String::from));
            args
        })
        .collect()
}

/// Removes the network-lock rules a failed `--tcp-established` dump or
/// restore of the connections `only` left behind (they would drop those
/// connections for good). Returns how many were removed.
pub fn clear_network_locks(only: &[Conn]) -> usize {
    if only.is_empty() {
        return 0;
    }
    let mut removed = 0;
    for (save, tool) in [
        ("iptables-save", "iptables"),
        ("ip6tables-save", "ip6tables"),
    ] {
        let Ok(out) = Command::new(save).args(["-t", "filter"]).output() else {
            continue;
        };
        for args in lock_rule_deletions(&String::from_utf8_lossy(&out.stdout), only) {
            if Command::new(tool)
                .args(&args)
                .status()
                .is_ok_and(|s| s.success())
            {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_lock_rules_are_found_and_only_they() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n\
            -A INPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m tcp --sport 8080 --dport 4242 -m mark ! --mark 0xc114 -j DROP\n\
            -A INPUT -p tcp --dport 22 -j ACCEPT\n\
            -A OUTPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m tcp --sport 4242 --dport 8080 -m mark ! --mark 0xc114 -j DROP\nCOMMIT\n";
        let ours = Conn {
            a: "127.0.0.1:8080".parse().unwrap(),
            b: "127.0.0.1:4242".parse().unwrap(),
        };
        let d = lock_rule_deletions(save, &[ours]);
        assert_eq!(d.len(), 2);
        let theirs = Conn {
            a: "127.0.0.1:9090".parse().unwrap(),
            b: "127.0.0.1:4242".parse().unwrap(),
        };
        assert!(
            lock_rule_deletions(save, &[theirs]).is_empty(),
            "another service's rules stay"
        );
        assert_eq!(d[0][..4], ["-t", "filter", "-D", "INPUT"]);
        assert_eq!(d[1][3], "OUTPUT");
        assert!(d[0].ends_with(&["-j".to_string(), "DROP".to_string()]));
    }
}
