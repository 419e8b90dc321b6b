//! Registry credentials, the way container tools keep them: a
//! Docker/Podman-style `auth.json` (`REGISTRY_AUTH_FILE`, else
//! `/etc/warmer/auth.json`):
//!
//! ```json
//! {"auths": {"registry.example:5000": {"auth": "base64(user:password)"}}}
//! ```
//!
//! `username`/`password` fields and a `registrytoken` (sent as a bearer
//! token) are accepted too. Basic credentials also serve registries that
//! answer with a bearer-token challenge: the client exchanges them at the
//! token service. The file holds secrets and decides what root restores: it
//! must be owned by root (or the running user) and writable by no one else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::RemoteError;

pub const DEFAULT_AUTH_FILE: &str = "/etc/warmer/auth.json";

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// The auth file in effect.
pub fn auth_file() -> PathBuf {
    std::env::var_os("REGISTRY_AUTH_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AUTH_FILE))
}

/// Credentials for `registry` (`host[:port]`): anonymous when there is no
/// auth file or no entry for it.
pub fn credentials(registry: &str) -> Result<RegistryAuth, RemoteError> {
    let path = auth_file();
    if !path.exists() {
        return Ok(RegistryAuth::Anonymous);
    }
    let uid = nix::unistd::geteuid().as_raw();
    cache::fsutil::check_trusted(&path, uid).map_err(|why| RemoteError::UntrustedAuthFile {
        path: path.clone(),
        why,
    })?;
    // Passwords: readable by its owner only, as ssh insists for keys.
    let mode =
        std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&path).map_err(|source| {
            RemoteError::Io {
                path: path.clone(),
                source,
            }
        })?);
    if mode & 0o077 != 0 {
        return Err(RemoteError::AuthFile {
            path,
            what: format!(
                "readable by others (mode {:o}): it holds passwords; make it 0600",
                mode & 0o7777
            ),
        });
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(
            std::fs::File::open(&path).map_err(|source| RemoteError::Io {
                path: path.clone(),
                source,
            })?,
            1 << 20,
        ),
        &mut text,
    )
    .map_err(|source| RemoteError::Io {
        path: path.clone(),
        source,
    })?;
    lookup(&path, &text, registry)
}

fn lookup(path: &Path, text: &str, registry: &str) -> Result<RegistryAuth, RemoteError> {
    let bad = |what: String| RemoteError::AuthFile {
        path: path.to_path_buf(),
        what,
    };
    let file: AuthFile = serde_json::from_str(text).map_err(|e| {
        bad(format!(
            "line {}, column {}: {e} (expected {{\"auths\": {{\"host:port\": {{\"auth\": \"...\"}}}}}})",
            e.line(),
            e.column()
        ))
    })?;
    let found = file.auths.iter().find(|(k, _)| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        k.trim_end_matches('/') == registry || k.split('/').next() == Some(registry)
    });
    let Some((key, entry)) = found else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = &entry.registrytoken {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let Some(auth) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| bad(format!("{key}: auth is not base64: {e}")))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| bad(format!("{key}: auth is not UTF-8")))?;
        let (user, pass) = decoded
            .split_once(':')
            .ok_or_else(|| bad(format!("{key}: auth is not base64 of user:password")))?;
        return Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.clone(), p.clone())),
        _ => Err(bad(format!(
            "{key}: expected \"auth\", \"username\"+\"password\" or \"registrytoken\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(text: &str, reg: &str) -> Result<RegistryAuth, RemoteError> {
        lookup(Path::new("auth.json"), text, reg)
    }

    #[test]
    fn docker_style_entries() {
        let text = r#"{"auths": {"reg:5000": {"auth": "dTpwOng="}, "https://other": {"username": "a", "password": "b"}, "tok": {"registrytoken": "T"}}}"#;
        assert!(
            matches!(get(text, "reg:5000").unwrap(), RegistryAuth::Basic(u, p) if u == "u" && p == "p:x")
        );
        assert!(
            matches!(get(text, "other").unwrap(), RegistryAuth::Basic(u, p) if u == "a" && p == "b")
        );
        assert!(matches!(get(text, "tok").unwrap(), RegistryAuth::Bearer(t) if t == "T"));
        assert!(matches!(
            get(text, "elsewhere").unwrap(),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn bad_files_say_where() {
        let e = get("{\"auths\": {\"r\": {\"auth\": 1}}}", "r")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = get(r#"{"auths": {"r": {"auth": "!!"}}}"#, "r")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not base64"), "{e}");
        let e = get(r#"{"auths": {"r": {}}}"#, "r").unwrap_err().to_string();
        assert!(e.contains("expected"), "{e}");
    }
}
