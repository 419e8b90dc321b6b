//! The values a manifest's keys take: probes, durations, restore modes,
//! host:port pairs and http URLs, each checked with a positioned error.

use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::parse::{RawReady, RawRestore};
use super::*;

pub(super) fn validate_ready(
    raw: &Spanned<RawReady>,
    at: &dyn Fn(&Location, String) -> ManifestError,
) -> Result<Ready, ManifestError> {
    let r = &raw.value;
    let mut given = Vec::new();
    if let Some(h) = &r.http {
        given.push(("http", h.referenced));
    }
    if let Some(t) = &r.tcp {
        given.push(("tcp", t.referenced));
    }
    if let Some(e) = &r.exec {
        given.push(("exec", e.referenced));
    }
    if let Some(n) = &r.notify {
        given.push(("notify", n.referenced));
    }
    // Point at the probe that comes second in the file.
    given.sort_by_key(|(_, loc)| (loc.line(), loc.column()));
    let probe = match given.as_slice() {
        [] => {
            return Err(at(
                &raw.referenced,
                "ready: expected exactly one probe of http, tcp, exec or notify; found none".into(),
            ))
        }
        [_, (second, loc), ..] => {
            return Err(at(
                loc,
                format!(
                    "ready: expected exactly one probe of http, tcp, exec or notify; found {} and {second}",
                    given[0].0
                ),
            ))
        }
        [("http", _)] => {
            let h = r.http.as_ref().expect("present");
            Probe::Http(parse_http_url(&h.value).map_err(|m| at(&h.referenced, m))?)
        }
        [("tcp", _)] => {
            let t = r.tcp.as_ref().expect("present");
            check_host_port(&t.value).map_err(|m| at(&t.referenced, format!("ready.tcp: {m}")))?;
            Probe::Tcp(t.value.clone())
        }
        [("exec", _)] => {
            let e = r.exec.as_ref().expect("present");
            if e.value.is_empty() || e.value[0].is_empty() {
                return Err(at(
                    &e.referenced,
                    "ready.exec: expected a non-empty argv list".into(),
                ));
            }
            Probe::Exec(e.value.clone())
        }
        [(_, _)] => {
            let n = r.notify.as_ref().expect("present");
            if !n.value {
                return Err(at(
                    &n.referenced,
                    "ready.notify: expected true (or remove it and use another probe)".into(),
                ));
            }
            Probe::Notify
        }
    };
    let timeout = duration(
        r.timeout.as_ref(),
        DEFAULT_READY_TIMEOUT,
        "ready.timeout",
        at,
    )?;
    Ok(Ready { probe, timeout })
}

pub(super) fn duration(
    raw: Option<&Spanned<String>>,
    default: Duration,
    what: &str,
    at: &dyn Fn(&Location, String) -> ManifestError,
) -> Result<Duration, ManifestError> {
    let Some(s) = raw else {
        return Ok(default);
    };
    let d = humantime::parse_duration(s.value.trim()).map_err(|e| {
        at(
            &s.referenced,
            format!(
                "{what}: expected a duration like 500ms, 30s or 2m, got {:?} ({e})",
                s.value
            ),
        )
    })?;
    if d > MAX_DURATION {
        return Err(at(
            &s.referenced,
            format!(
                "{what}: {:?} is longer than the longest allowed, {}",
                s.value,
                humantime::format_duration(MAX_DURATION)
            ),
        ));
    }
    Ok(d)
}

/// `restore.mode`, or the older `restore.lazy` (true: lazy, false: eager).
pub(super) fn restore_mode(
    raw: Option<&RawRestore>,
    at: &dyn Fn(&Location, String) -> ManifestError,
) -> Result<RestoreMode, ManifestError> {
    let Some(r) = raw else {
        return Ok(RestoreMode::Auto);
    };
    let mode = match &r.mode {
        None => None,
        Some(m) => Some(match m.value.as_str() {
            "auto" => RestoreMode::Auto,
            "eager" => RestoreMode::Eager,
            "lazy" => RestoreMode::Lazy,
            other => {
                return Err(at(
                    &m.referenced,
                    format!("restore.mode: expected auto, eager or lazy, got {other:?}"),
                ))
            }
        }),
    };
    let lazy = r.lazy.as_ref().map(|l| {
        if l.value {
            RestoreMode::Lazy
        } else {
            RestoreMode::Eager
        }
    });
    match (mode, lazy) {
        (Some(m), Some(l)) if m != l => Err(at(
            &r.lazy.as_ref().expect("given").referenced,
            "restore.lazy contradicts restore.mode: give only restore.mode".into(),
        )),
        (m, l) => Ok(m.or(l).unwrap_or(RestoreMode::Auto)),
    }
}

pub(super) fn check_host_port(s: &str) -> Result<u16, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("expected HOST:PORT, got {s:?}"))?;
    if host.is_empty() {
        return Err(format!("expected HOST:PORT, got {s:?} (empty host)"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("expected a port 1-65535 in {s:?}"))
}

/// `http://HOST[:PORT][/PATH]`; HTTPS is refused (probes are local and plain).
pub fn parse_http_url(url: &str) -> Result<HttpUrl, String> {
    if url.starts_with("https://") {
        return Err(format!(
            "ready.http: https is not supported, probe the plain-HTTP port instead: {url:?}"
        ));
    }
    let expected = || format!("ready.http: expected http://HOST:PORT/PATH, got {url:?}");
    let parsed = url::Url::parse(url).map_err(|e| match e {
        url::ParseError::InvalidPort => format!("ready.http: bad port in {url:?}"),
        url::ParseError::EmptyHost => format!("ready.http: no host in {url:?}"),
        _ => expected(),
    })?;
    if parsed.scheme() != "http" || !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(expected());
    }
    let host = match parsed.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        Some(h) => h.to_string(),
        None => return Err(format!("ready.http: no host in {url:?}")),
    };
    let port = parsed.port_or_known_default().unwrap_or(80);
    if port == 0 {
        return Err(format!("ready.http: bad port in {url:?}"));
    }
    let mut path = parsed.path().to_string();
    if let Some(q) = parsed.query() {
        path.push('?');
        path.push_str(q);
    }
    Ok(HttpUrl { host, port, path })
}
