//! How the command line writes its results: stdout that may close early,
//! JSON, sizes.

use std::io::Write;

use super::exit;

/// Writes to stdout; a closed stdout (`warmer cache ls | head`) ends the
/// program quietly, as CLI tools do.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("warmer: cannot write to stdout: {e}");
        std::process::exit(i32::from(exit::SOFTWARE));
    }
}

pub fn json<T: serde::Serialize>(value: &T) -> String {
    let mut s = serde_json::to_string_pretty(value).expect("output serializes");
    s.push('\n');
    s
}

pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
