//! warmer's own log: plain lines on a terminal, structured entries in the
//! journal.
//!
//! On a terminal (or any stderr that is not the journal) each event is one
//! line, `warmer[SERVICE]: [warning: |error: ]MESSAGE`. Under systemd, when
//! stderr is the unit's journal stream (`$JOURNAL_STREAM` names its device
//! and inode), events go to journald natively with their fields, so an
//! operator can filter: `journalctl SERVICE=web`, `journalctl DIGEST=...`,
//! `journalctl PHASE=restore`. The run's span carries `SERVICE` and `DIGEST`;
//! events carry `PHASE` and, where they apply, `READY_MS` and the like.
//!
//! `WARMER_LOG=debug|info|warn|error` sets the level (default info).

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

static SERVICE: OnceLock<String> = OnceLock::new();

/// Names the service in plain lines (`warmer[web]: ...`).
pub fn set_service(name: &str) {
    let _ = SERVICE.set(name.to_string());
}

fn level() -> LevelFilter {
    match std::env::var("WARMER_LOG").as_deref() {
        Ok("debug") => LevelFilter::DEBUG,
        Ok("trace") => LevelFilter::TRACE,
        Ok("warn") => LevelFilter::WARN,
        Ok("error") => LevelFilter::ERROR,
        _ => LevelFilter::INFO,
    }
}

/// Whether stderr is the journal stream systemd connected us to.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(md) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(md.dev()) && ino.parse() == Ok(md.ino())
}

/// Installs the global subscriber. Call once, early.
pub fn init() {
    let level = level();
    let journald = stderr_is_journal()
        .then(|| {
            tracing_journald::layer().ok().map(|l| {
                l.with_field_prefix(None)
                    .with_syslog_identifier("warmer".into())
            })
        })
        .flatten();
    let registry = tracing_subscriber::registry();
    let result = match journald {
        Some(j) => tracing::subscriber::set_global_default(registry.with(j.with_filter(level))),
        None => tracing::subscriber::set_global_default(registry.with(Plain.with_filter(level))),
    };
    if result.is_err() {
        eprintln!("warmer: a logger was already installed");
    }
}

/// One plain line per event.
struct Plain;

impl<S: Subscriber> Layer<S> for Plain {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut line = format!(
            "warmer[{}]: ",
            SERVICE.get().map(String::as_str).unwrap_or("")
        );
        match *event.metadata().level() {
            Level::ERROR => line.push_str("error: "),
            Level::WARN => line.push_str("warning: "),
            _ => {}
        }
        let mut v = Message(&mut line);
        event.record(&mut v);
        line.push('\n');
        // One write per line: lines of concurrent threads do not interleave.
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    }
}

struct Message<'a>(&'a mut String);

impl Visit for Message<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }
}
