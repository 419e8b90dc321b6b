//! systemd unit files as systemd reads them: the unit and its drop-ins from
//! the search path, `key=value` lines in sections, continuation lines,
//! comments, specifiers (`%i`, `%n`, ...), and lists an empty assignment
//! resets.

use std::path::PathBuf;

/// The system unit search path, highest priority first (systemd.unit(5)).
pub const SEARCH_PATH: &[&str] = &[
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// A loaded unit: every assignment of the unit file and then its drop-ins,
/// in order.
#[derive(Debug, Clone, Default)]
pub struct Unit {
    /// `tomcat10.service`, `postgresql@15-main.service`.
    pub name: String,
    /// The files read, unit first.
    pub files: Vec<PathBuf>,
    entries: Vec<(String, String, String)>,
}

/// Parses one unit file's text into (section, key, value) assignments.
pub fn parse(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = if pending.is_empty() {
            raw.trim().to_string()
        } else {
            // A continued line: comments inside it are skipped.
            let t = raw.trim();
            if t.starts_with('#') || t.starts_with(';') {
                continue;
            }
            format!("{pending} {t}")
        };
        if let Some(stripped) = line.strip_suffix('\\') {
            pending = stripped.trim_end().to_string();
            continue;
        }
        pending.clear();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            section = line[1..line.len() - 1].to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// `\xHH` escapes of a unit name undone (`%I`).
fn unescape(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() + 1 && b.get(i + 1) == Some(&b'x') {
            if let Some(v) = s
                .get(i + 2..i + 4)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(if b[i] == b'-' { b'/' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces the specifiers systemd expands in unit files.
pub fn specifiers(value: &str, name: &str) -> String {
    let stem = name.rsplit_once('.').map_or(name, |(s, _)| s);
    let (prefix, instance) = match stem.split_once('@') {
        Some((p, i)) => (p, i),
        None => (stem, ""),
    };
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('i') => out.push_str(instance),
            Some('I') => out.push_str(&unescape(instance)),
            Some('n') => out.push_str(name),
            Some('N') => out.push_str(stem),
            Some('p') => out.push_str(prefix),
            Some('P') => out.push_str(&unescape(prefix)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

impl Unit {
    /// Builds a unit from file texts (the unit's, then its drop-ins').
    pub fn from_texts(name: &str, texts: &[(PathBuf, String)]) -> Self {
        let mut u = Unit {
            name: name.to_string(),
            ..Unit::default()
        };
        for (path, text) in texts {
            u.files.push(path.clone());
            u.entries.extend(
                parse(text)
                    .into_iter()
                    .map(|(s, k, v)| (s, k, specifiers(&v, name))),
            );
        }
        u
    }

    /// Finds `name` (a `.service` is added when missing) in `search` and
    /// reads it with its drop-ins. A template instance (`foo@bar.service`)
    /// falls back to `foo@.service`.
    pub fn load(name: &str, search: &[PathBuf]) -> Result<Self, String> {
        let name = if name.contains('.') {
            name.to_string()
        } else {
            format!("{name}.service")
        };
        let template = name
            .split_once('@')
            .map(|(p, rest)| format!("{p}@{}", &rest[rest.find('.').unwrap_or(rest.len())..]));
        let mut candidates = vec![name.clone()];
        candidates.extend(template.clone());
        let main = search
            .iter()
            .flat_map(|d| candidates.iter().map(move |c| d.join(c)))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                format!(
                    "no unit {name} in {}",
                    search
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        let mut texts = vec![(main.clone(), crate::manifest::read_trusted(&main)?)];
        // Drop-ins: every NAME.d/*.conf on the path; the same file name in
        // a higher-priority directory wins; applied in file-name order.
        let mut dropins: std::collections::BTreeMap<String, PathBuf> = Default::default();
        for d in search.iter().rev() {
            for c in candidates.iter().rev() {
                let dir = d.join(format!("{c}.d"));
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "conf") {
                        dropins.insert(e.file_name().to_string_lossy().into_owned(), p);
                    }
                }
            }
        }
        for p in dropins.into_values() {
            let t = crate::manifest::read_trusted(&p)?;
            texts.push((p, t));
        }
        Ok(Self::from_texts(&name, &texts))
    }

    /// Every value of `key` in `section`, an empty assignment resetting
    /// what came before (list settings).
    pub fn list(&self, section: &str, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (s, k, v) in &self.entries {
            if s == section && k == key {
                if v.is_empty() {
                    out.clear();
                } else {
                    out.push(v.clone());
                }
            }
        }
        out
    }

    /// The last value of `key` in `section` (single-valued settings).
    pub fn get(&self, section: &str, key: &str) -> Option<String> {
        self.entries
            .iter()
            .rev()
            .find(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.clone())
    }

    /// Every key set in `section`, once, in order.
    pub fn keys(&self, section: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (s, k, _) in &self.entries {
            if s == section && !out.contains(k) {
                out.push(k.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_parse_with_continuations_comments_and_resets() {
        let u = Unit::from_texts(
            "postgresql@15-main.service",
            &[
                (
                    "a".into(),
                    "[Service]\n# c\nExecStart=/bin/a \\\n  --x %i\nReadWritePaths=/a\nReadWritePaths=/b\nUser=x\n"
                        .into(),
                ),
                ("b".into(), "[Service]\nReadWritePaths=\nReadWritePaths=/c\nUser=y\n".into()),
            ],
        );
        assert_eq!(u.get("Service", "ExecStart").unwrap(), "/bin/a --x 15-main");
        assert_eq!(u.list("Service", "ReadWritePaths"), ["/c"]);
        assert_eq!(u.get("Service", "User").unwrap(), "y");
        assert_eq!(
            specifiers("%p %I %N %%", "foo@a-b.service"),
            "foo a/b foo@a-b %"
        );
    }
}
