//! `remote.repository` and the tags warmer puts after it, read by hand.
//!
//! The registry client parses a reference with one regular expression of
//! the whole distribution grammar, compiled on first use: ~50 ms on a 2-core
//! VM, which every `warmer run` of a service with a `remote:` paid while it
//! loaded its manifest (its restore then took 100 ms instead of 40). The
//! grammar is small; this is it, with the client's own limits (and no
//! implied `docker.io`: the host is written out).
//!
//! ```text
//! repository := host [":" port] "/" component ("/" component)*
//! host       := label ("." label)*     label: [A-Za-z0-9] or [A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]
//!               (with a "." or a port, or "localhost": otherwise it is a path)
//! component  := alnum (separator alnum)*   alnum: [a-z0-9]+
//! separator  := "." | "_" | "__" | "-"+
//! tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! ```

use oci_client::Reference;

/// The path after the host is at most this long (the client's limit).
const PATH_MAX: usize = 255;

/// `host[:port]` and the path of a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repository {
    pub registry: String,
    pub path: String,
}

impl Repository {
    /// Reads `host[:port]/path`; says what is wrong otherwise.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, path) = s
            .split_once('/')
            .ok_or("expected host[:port]/path: there is no path")?;
        let (name, port) = match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        };
        if !name.split('.').all(label) {
            return Err(format!("{host:?} is not a host name"));
        }
        if let Some(p) = port {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("{host:?}: the port is not a number"));
            }
        }
        if port.is_none() && !name.contains('.') && name != "localhost" {
            // What any registry client would read as a path on docker.io.
            return Err(format!(
                "{host:?} is not a host (no dot, no port, not localhost)"
            ));
        }
        if path.len() > PATH_MAX {
            return Err(format!("the path is longer than {PATH_MAX} characters"));
        }
        if let Some(c) = path.split('/').find(|c| !component(c)) {
            return Err(format!(
                "{c:?} is not a path component (lowercase letters and digits, separated by '.', '_', '__' or dashes)"
            ));
        }
        Ok(Repository {
            registry: host.to_string(),
            path: path.to_string(),
        })
    }

    /// The reference of `tag` in this repository.
    pub fn tagged(&self, tag: &str) -> Result<Reference, String> {
        if !valid_tag(tag) {
            return Err(format!("{tag:?} is not a tag"));
        }
        Ok(Reference::with_tag(
            self.registry.clone(),
            self.path.clone(),
            tag.to_string(),
        ))
    }
}

fn label(l: &str) -> bool {
    let b = l.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = c.as_bytes();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    // Between two runs of [a-z0-9]: ".", "_", "__" or dashes.
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|s| s == b'-')) {
            return false;
        }
    }
    true
}

fn valid_tag(t: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    (1..=128).contains(&b.len())
        && word(b[0])
        && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repository_with_its_host_reads_as_the_client_would() {
        for (s, registry, path) in [
            (
                "registry.example:5000/warmer/web",
                "registry.example:5000",
                "warmer/web",
            ),
            (
                "127.0.0.1:5000/warmer/slowweb",
                "127.0.0.1:5000",
                "warmer/slowweb",
            ),
            ("localhost/a", "localhost", "a"),
            ("localhost:5000/a/b/c", "localhost:5000", "a/b/c"),
            (
                "ghcr.io/org-1/my_app__x.y--z",
                "ghcr.io",
                "org-1/my_app__x.y--z",
            ),
            ("My-Registry.Example/x", "My-Registry.Example", "x"),
        ] {
            let r = Repository::parse(s).unwrap();
            assert_eq!(
                (r.registry.as_str(), r.path.as_str()),
                (registry, path),
                "{s}"
            );
            let tagged = r.tagged("0123abcd").unwrap();
            assert_eq!(tagged.whole(), format!("{s}:0123abcd"));
            assert_eq!(tagged.registry(), registry);
            assert_eq!(tagged.repository(), path);
        }
    }

    #[test]
    fn what_is_not_a_repository_is_refused_with_why() {
        for (s, why) in [
            ("web", "no path"),
            ("warmer/web", "not a host"),
            ("myhost/web", "not a host"),
            ("-bad.example/web", "not a host name"),
            ("bad-.example/web", "not a host name"),
            ("a..example/web", "not a host name"),
            ("host.example:/web", "port"),
            ("host.example:50x0/web", "port"),
            ("host.example/Web", "path component"),
            ("host.example/web/", "path component"),
            ("host.example//web", "path component"),
            ("host.example/web._x", "path component"),
            ("host.example/web___x", "path component"),
            ("host.example/_web", "path component"),
            ("host.example/web:tag", "path component"),
            ("host.example/web@sha256:00", "path component"),
        ] {
            let err = Repository::parse(s).unwrap_err();
            assert!(err.contains(why), "{s}: {err}");
        }
        let long = format!("host.example/{}", "a".repeat(256));
        assert!(Repository::parse(&long).unwrap_err().contains("longer"));
    }

    #[test]
    fn tags_follow_the_distribution_grammar() {
        let r = Repository::parse("host.example/web").unwrap();
        for ok in ["latest", "sha256-00ff.sig", "_x", &"a".repeat(128)] {
            assert!(r.tagged(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129)] {
            assert!(r.tagged(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn agrees_with_the_registry_clients_parser() {
        // The client's regex, on names both accept or both refuse.
        for s in [
            "registry.example:5000/warmer/web",
            "localhost/a",
            "ghcr.io/org-1/my_app__x.y--z",
            "host.example/web._x",
            "host.example/web___x",
            "host.example/Web",
            "h.example/a/b-c",
        ] {
            let ours = Repository::parse(s).is_ok();
            let theirs = Reference::try_from(format!("{s}:t").as_str())
                .is_ok_and(|r| s.split('/').next() == Some(r.registry()));
            assert_eq!(ours, theirs, "{s}");
        }
    }
}
