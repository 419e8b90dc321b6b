//! Naming entries on a command line: the one rule every command that takes
//! an image follows (`cache rm`, `cache verify`, `inspect`, `push`,
//! `export`, `rollback --to` aside, which takes a generation).
//!
//! - a service name: its entries;
//! - a digest prefix of 6+ hex digits: the entries of the one digest it
//!   names (more than one digest: ambiguous);
//! - `<digest prefix>.<generation>`, as `warmer cache ls` prints it
//!   (`0123456789ab.3`): that one entry.

use crate::error::Error;
use crate::key::split_key;
use crate::store::{Cache, Entry};

/// What a command-line argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Service(String),
    Image {
        digest_prefix: String,
        generation: Option<u64>,
    },
}

/// The shortest digest prefix accepted.
pub const MIN_PREFIX: usize = 6;

impl Target {
    pub fn parse(s: &str) -> Target {
        let (prefix, generation) = match s.rsplit_once('.') {
            Some((p, g)) if !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()) => {
                (p, g.parse::<u64>().ok())
            }
            _ => (s, None),
        };
        let hex = prefix.len() >= MIN_PREFIX && prefix.bytes().all(|b| b.is_ascii_hexdigit());
        if hex && (generation.is_some() || !s.contains('.')) {
            Target::Image {
                digest_prefix: prefix.to_ascii_lowercase(),
                generation,
            }
        } else {
            Target::Service(s.to_string())
        }
    }
}

/// Why a target names nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(transparent)]
    Cache(#[from] Error),
    #[error("no cache entry matches {0:?} (a service name, a digest prefix of 6+ hex digits, or DIGEST.GEN as `warmer cache ls` prints it)")]
    NoMatch(String),
    #[error("{target:?} matches {count} digests; give more digits")]
    Ambiguous { target: String, count: usize },
}

impl Cache {
    /// The entries `target` names (see the module page), oldest generation
    /// first. A service name also matches a digest-looking name only when a
    /// service of that name has entries.
    pub fn select(&self, target: &str) -> Result<Vec<Entry>, SelectError> {
        let mut all: Vec<Entry> = self.list()?.into_iter().flatten().collect();
        all.sort_by_key(|e| e.meta.generation);
        let by_service: Vec<Entry> = all
            .iter()
            .filter(|e| e.meta.service == target)
            .cloned()
            .collect();
        if !by_service.is_empty() {
            return Ok(by_service);
        }
        let Target::Image {
            digest_prefix,
            generation,
        } = Target::parse(target)
        else {
            return Err(SelectError::NoMatch(target.to_string()));
        };
        let matching: Vec<Entry> = all
            .into_iter()
            .filter(|e| e.meta.digest.starts_with(&digest_prefix))
            .filter(|e| generation.is_none_or(|g| split_key(&e.key).is_ok_and(|(_, eg)| eg == g)))
            .collect();
        let mut digests: Vec<&str> = matching.iter().map(|e| e.meta.digest.as_str()).collect();
        digests.sort_unstable();
        digests.dedup();
        match digests.len() {
            0 => Err(SelectError::NoMatch(target.to_string())),
            1 => Ok(matching),
            count => Err(SelectError::Ambiguous {
                target: target.to_string(),
                count,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_ls_prints_them() {
        let img = |p: &str, g| Target::Image {
            digest_prefix: p.into(),
            generation: g,
        };
        assert_eq!(Target::parse("0123456789AB"), img("0123456789ab", None));
        assert_eq!(
            Target::parse("0123456789ab.3"),
            img("0123456789ab", Some(3))
        );
        assert_eq!(Target::parse("abc"), Target::Service("abc".into()));
        assert_eq!(Target::parse("web.v2"), Target::Service("web.v2".into()));
        assert_eq!(
            Target::parse("cafe12.x"),
            Target::Service("cafe12.x".into())
        );
        assert_eq!(Target::parse("slowweb"), Target::Service("slowweb".into()));
    }
}
