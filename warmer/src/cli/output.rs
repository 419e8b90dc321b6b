//! How the command line writes its results: stdout that may close early,
//! JSON, sizes.

use std::io::Write;
use std::process::ExitCode;

use super::exit;
use crate::errors::chain;

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

/// A command's result: `text` of its value on stdout and exit 0, or
/// `warmer CMD: why` on stderr and exit 1.
pub fn report<T, E: std::error::Error>(
    cmd: &str,
    result: Result<T, E>,
    text: impl FnOnce(T) -> String,
) -> ExitCode {
    match result {
        Ok(value) => {
            emit(&text(value));
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("warmer {cmd}: {}", chain(&e));
            ExitCode::from(exit::FAILURE)
        }
    }
}
