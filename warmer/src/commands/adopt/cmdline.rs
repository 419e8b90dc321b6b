//! systemd's command lines (`ExecStart=`) and `Environment=` assignments:
//! words split on whitespace, single and double quotes, C-style backslash
//! escapes, `$VAR` (split into words) and `${VAR}` (one word) expansion,
//! and the `@-:+!` prefixes (systemd.service(5), "Command lines").

use std::collections::BTreeMap;

/// Splits a line into words (quotes and escapes removed). `None`: an
/// unterminated quote.
pub fn split(line: &str) -> Option<Vec<(String, bool)>> {
    // (word, whether it was one bare `$VAR`: expanded into several words)
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push((std::mem::take(&mut cur), quoted));
                    in_word = false;
                    quoted = false;
                }
            }
            '"' | '\'' => {
                in_word = true;
                quoted = true;
                loop {
                    match chars.next()? {
                        q if q == c => break,
                        '\\' if c == '"' => cur.push(escape(chars.next()?)),
                        other => cur.push(other),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(escape(n));
                }
            }
            other => {
                in_word = true;
                cur.push(other);
            }
        }
    }
    if in_word {
        words.push((cur, quoted));
    }
    Some(words)
}

fn escape(c: char) -> char {
    match c {
        'n' => '\n',
        't' => '\t',
        'r' => '\r',
        other => other,
    }
}

/// Expands `$VAR` (a whole unquoted word: split on whitespace into words;
/// unset: no word) and `${VAR}` (inside a word: its value, unset: empty);
/// `$$` is a `$`.
pub fn expand(words: &[(String, bool)], env: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (w, quoted) in words {
        if !quoted
            && w.len() > 1
            && w.starts_with('$')
            && !w.starts_with("${")
            && !w.starts_with("$$")
        {
            let name = &w[1..];
            if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                if let Some(v) = env.get(name) {
                    out.extend(v.split_whitespace().map(String::from));
                }
                continue;
            }
        }
        let mut s = String::new();
        let mut rest = w.as_str();
        while let Some(i) = rest.find('$') {
            s.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(a) = after.strip_prefix('$') {
                s.push('$');
                rest = a;
            } else if let Some(a) = after.strip_prefix('{') {
                match a.find('}') {
                    Some(end) => {
                        s.push_str(env.get(&a[..end]).map_or("", String::as_str));
                        rest = &a[end + 1..];
                    }
                    None => {
                        s.push('$');
                        rest = after;
                    }
                }
            } else {
                s.push('$');
                rest = after;
            }
        }
        s.push_str(rest);
        out.push(s);
    }
    out
}

/// A parsed `Exec*=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub argv: Vec<String>,
    /// `-`: failure ignored.
    pub ignore_failure: bool,
    /// `+`, `!` or `!!`: with full privileges.
    pub privileged: bool,
    /// `@`: `argv[0]` given apart (dropped: warmer runs the program as
    /// itself).
    pub custom_argv0: bool,
}

/// Parses an `Exec*=` value with its prefixes, expanding variables from
/// `env` (unless `:`).
pub fn exec(value: &str, env: &BTreeMap<String, String>) -> Result<Exec, String> {
    let mut v = value.trim();
    let (mut ignore_failure, mut privileged, mut custom_argv0, mut no_expand) =
        (false, false, false, false);
    loop {
        match v.chars().next() {
            Some('-') => ignore_failure = true,
            Some('+') | Some('!') => privileged = true,
            Some('@') => custom_argv0 = true,
            Some(':') => no_expand = true,
            _ => break,
        }
        v = &v[1..];
    }
    let words = split(v).ok_or_else(|| format!("unterminated quote in {value:?}"))?;
    let mut argv = if no_expand {
        words.into_iter().map(|(w, _)| w).collect()
    } else {
        expand(&words, env)
    };
    if custom_argv0 && argv.len() > 1 {
        argv.remove(1);
    }
    if argv.is_empty() {
        return Err(format!("empty command line {value:?}"));
    }
    Ok(Exec {
        argv,
        ignore_failure,
        privileged,
        custom_argv0,
    })
}

/// `Environment=` values: `KEY=VALUE` words, quotes allowed.
pub fn assignments(values: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for v in values {
        for (w, _) in split(v).unwrap_or_default() {
            if let Some((k, val)) = w.split_once('=') {
                out.insert(k.to_string(), val.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_split_expand_and_take_prefixes() {
        let env: BTreeMap<String, String> = [("ARGS", "--a 1 --b"), ("X", "x y")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let e = exec(
            "-/usr/bin/prometheus $ARGS \"quoted $X\" pre${X}post $$HOME",
            &env,
        )
        .unwrap();
        assert!(e.ignore_failure && !e.privileged);
        assert_eq!(
            e.argv,
            [
                "/usr/bin/prometheus",
                "--a",
                "1",
                "--b",
                "quoted $X",
                "prex ypost",
                "$HOME"
            ]
        );
        let e = exec("+/bin/sh -c 'echo a\\tb'", &env).unwrap();
        assert!(e.privileged);
        assert_eq!(e.argv, ["/bin/sh", "-c", "echo a\\tb"]);
        assert_eq!(
            exec("@/bin/x name --y", &env).unwrap().argv,
            ["/bin/x", "--y"]
        );
        assert_eq!(exec("/bin/x $UNSET", &env).unwrap().argv, ["/bin/x"]);
        assert!(exec("/bin/x \"open", &env).is_err());
        let a = assignments(&["\"A=1 2\" B=3".into(), "C=\"q\"".into()]);
        assert_eq!(a["A"], "1 2");
        assert_eq!(a["B"], "3");
        assert_eq!(a["C"], "q");
    }
}
