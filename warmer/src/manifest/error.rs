//! Manifest errors: every one positioned as `FILE:LINE:COL`, with an excerpt
//! of the offending line; all of a file's problems together.

use std::path::{Path, PathBuf};

use serde_saphyr::Location;

use super::EXCERPT_CHARS;

/// A manifest that failed to load, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: cannot read manifest", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
        /// The offending source line with a caret under the column.
        excerpt: Option<String>,
    },
    #[error("{}: {reason}", path.display())]
    Name { path: PathBuf, reason: String },
    /// More than one problem in one file, each an `Invalid`, in file order.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ManifestError>),
    #[error("no manifest for service {service:?} in {} (looked for {service}.yaml and {service}.yml)", dir.display())]
    NotFound { service: String, dir: PathBuf },
    #[error("refusing manifest {}: someone other than root could have written it", path.display())]
    Untrusted {
        path: PathBuf,
        #[source]
        why: cache::fsutil::Untrusted,
    },
}

/// A section's value, or (its error collected) a stand-in.
pub(super) fn keep<T>(
    errors: &mut Vec<ManifestError>,
    r: Result<T, ManifestError>,
    fallback: T,
) -> T {
    r.unwrap_or_else(|e| {
        errors.push(e);
        fallback
    })
}

impl ManifestError {
    /// One error as itself, several as [`ManifestError::Several`] (in file order).
    pub(super) fn all(mut errors: Vec<ManifestError>) -> Self {
        if errors.len() == 1 {
            return errors.remove(0);
        }
        let pos = |e: &ManifestError| match e {
            ManifestError::Invalid { line, column, .. } => (*line, *column),
            _ => (0, 0),
        };
        errors.sort_by_key(pos);
        ManifestError::Several(errors)
    }

    /// Each problem on its own (one, or the parts of `Several`).
    pub fn each(&self) -> Vec<&ManifestError> {
        match self {
            ManifestError::Several(v) => v.iter().collect(),
            e => vec![e],
        }
    }

    /// The source line and a caret, for printing under the message.
    pub fn excerpt(&self) -> Option<&str> {
        match self {
            ManifestError::Invalid { excerpt, .. } => excerpt.as_deref(),
            _ => None,
        }
    }
}

pub(super) fn saphyr_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    let first = text.lines().next().unwrap_or("").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    // "line 4 column 3: unknown field ..." -> "unknown field ..."
    let msg = match first.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((pos, msg)) if pos.contains("column") => msg,
        _ => first,
    };
    // "... at line 3, column 1": the position is printed once, in front.
    match msg.rsplit_once(" at line ") {
        Some((head, pos))
            if pos.split_once(", column ").is_some_and(|(l, c)| {
                l.bytes().all(|b| b.is_ascii_digit()) && c.bytes().all(|b| b.is_ascii_digit())
            }) =>
        {
            head.to_string()
        }
        _ => msg.to_string(),
    }
}

pub(super) fn invalid(
    path: &Path,
    text: &str,
    loc: &Location,
    mut message: String,
) -> ManifestError {
    // The parser may quote the offending value: never echo a huge one.
    if message.chars().count() > 2 * EXCERPT_CHARS {
        message = message.chars().take(2 * EXCERPT_CHARS).collect::<String>() + "...";
    }
    let (line, column) = if *loc == Location::UNKNOWN {
        (1, 1)
    } else {
        (loc.line().max(1), loc.column().max(1))
    };
    let excerpt = usize::try_from(line - 1)
        .ok()
        .and_then(|i| text.lines().nth(i))
        .map(|src| {
            // A window of the line around the column, never the whole of a
            // huge line.
            let col = usize::try_from(column - 1).unwrap_or(0);
            let chars: Vec<char> = src.chars().collect();
            let start = col.saturating_sub(EXCERPT_CHARS / 2).min(chars.len());
            let end = (start + EXCERPT_CHARS).min(chars.len());
            let (pre, post) = (
                if start > 0 { "..." } else { "" },
                if end < chars.len() { "..." } else { "" },
            );
            let shown: String = chars[start..end].iter().collect();
            let pad = col.saturating_sub(start) + pre.len();
            format!(
                "  {pre}{shown}{post}\n  {}^",
                " ".repeat(pad.min(EXCERPT_CHARS + 3))
            )
        });
    ManifestError::Invalid {
        path: path.to_path_buf(),
        line,
        column,
        message,
        excerpt,
    }
}
