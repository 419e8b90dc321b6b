//! Printing errors.

/// An error and its sources on one line: `context: cause: root cause`.
/// Messages state their own context and keep causes in `#[source]`, so each
/// part appears once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// An untrusted string (from an archive, a registry, an image, a log) as it
/// may be shown to a person: control characters escaped, so it cannot
/// rewrite the terminal; bounded.
pub fn escape(s: &str) -> String {
    const MAX: usize = 512;
    let mut out: String = s
        .chars()
        .take(MAX)
        .flat_map(|c| {
            let keep = !c.is_control();
            let escaped: Vec<char> = if keep {
                vec![c]
            } else {
                c.escape_default().collect()
            };
            escaped
        })
        .collect();
    if s.chars().count() > MAX {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn untrusted_strings_cannot_drive_the_terminal() {
        assert_eq!(escape("web\u{1b}]0;x\u{7}"), "web\\u{1b}]0;x\\u{7}");
        assert_eq!(escape("plain é"), "plain é");
        assert!(escape(&"a".repeat(600)).ends_with("..."));
    }

    #[test]
    fn each_part_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}
