//! YAML -> raw form (positions kept) -> validated [`Manifest`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use super::error::{invalid, keep, saphyr_message};
use super::fields::*;
use super::*;

// ---------------------------------------------------------------- raw form

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawManifest {
    pub(super) exec: Spanned<Vec<String>>,
    #[serde(default)]
    pub(super) workdir: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) pid_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) env: Option<Spanned<BTreeMap<String, String>>>,
    pub(super) ready: Spanned<RawReady>,
    #[serde(default)]
    pub(super) checkpoint: Option<RawCheckpoint>,
    #[serde(default)]
    pub(super) digest: Option<RawDigest>,
    #[serde(default)]
    pub(super) stop: Option<RawStop>,
    #[serde(default)]
    pub(super) cache: Option<RawCache>,
    #[serde(default)]
    pub(super) state: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) not_state: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) hooks: Option<Spanned<RawHooks>>,
    #[serde(default)]
    pub(super) restore: Option<RawRestore>,
    #[serde(default)]
    pub(super) mode: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) remote: Option<Spanned<RawRemote>>,
    #[serde(default)]
    pub(super) user: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) group: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) supplementary_groups: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) sandbox: Option<Spanned<super::sandbox::RawSandbox>>,
    #[serde(default)]
    pub(super) exec_start_pre: Vec<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) env_file: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRemote {
    pub(super) repository: Spanned<String>,
    #[serde(default)]
    pub(super) push: Option<bool>,
    #[serde(default)]
    pub(super) insecure: Option<bool>,
    #[serde(default)]
    pub(super) timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) ca_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) sign: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) verify: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRestore {
    #[serde(default)]
    pub(super) mode: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) lazy: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) signal: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReady {
    #[serde(default)]
    pub(super) http: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) tcp: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) exec: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) notify: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCheckpoint {
    #[serde(default)]
    pub(super) settle: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) enabled: Option<bool>,
    #[serde(default)]
    pub(super) tcp_established: Option<bool>,
    #[serde(default)]
    pub(super) timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) forbid_env: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHooks {
    #[serde(default)]
    pub(super) before_checkpoint: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) after_restore: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDigest {
    #[serde(default)]
    pub(super) files: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStop {
    #[serde(default)]
    pub(super) timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    #[serde(default)]
    pub(super) keep: Option<Spanned<u32>>,
}

impl Manifest {
    /// Parses and validates manifest text. `path` is used in messages.
    pub fn parse(name: &str, path: &Path, text: &str) -> Result<Self, ManifestError> {
        let at = |loc: &Location, message: String| invalid(path, text, loc, message);
        let raw: RawManifest = serde_saphyr::from_str(text).map_err(|e| {
            let loc = e.location().unwrap_or(Location::UNKNOWN);
            at(&loc, saphyr_message(&e))
        })?;

        // Every section is checked, so one run reports every problem: a
        // section's first error is collected and a stand-in value used.
        let mut errors = Vec::new();
        let exec = raw.exec.value.clone();
        let checked = (|| {
            if exec.is_empty() || exec[0].is_empty() {
                return Err(at(
                    &raw.exec.referenced,
                    "exec: expected a non-empty argv list, e.g. [\"/usr/bin/app\", \"--flag\"]"
                        .into(),
                ));
            }
            if exec.iter().any(|a| a.contains('\0')) {
                return Err(at(
                    &raw.exec.referenced,
                    "exec: NUL byte in argument".into(),
                ));
            }
            Ok(())
        })();
        keep(&mut errors, checked, ());

        let workdir = (|| {
            Ok(match &raw.workdir {
                Some(w) if !Path::new(&w.value).is_absolute() => {
                    return Err(at(
                        &w.referenced,
                        format!("workdir: expected an absolute path, got {:?}", w.value),
                    ))
                }
                Some(w) => Some(PathBuf::from(&w.value)),
                None => None,
            })
        })();
        let workdir = keep(&mut errors, workdir, None);
        let pid_file = (|| {
            Ok(match &raw.pid_file {
                Some(p)
                    if !Path::new(&p.value).is_absolute()
                        || Path::new(&p.value).file_name().is_none() =>
                {
                    return Err(at(
                        &p.referenced,
                        format!(
                            "pid_file: expected an absolute path of a file, got {:?}",
                            p.value
                        ),
                    ))
                }
                Some(p) => Some(PathBuf::from(&p.value)),
                None => None,
            })
        })();
        let pid_file = keep(&mut errors, pid_file, None);

        let env = raw
            .env
            .as_ref()
            .map(|e| e.value.clone())
            .unwrap_or_default();
        let checked = (|| {
            if let Some(bad) = env
                .keys()
                .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
            {
                let loc = raw
                    .env
                    .as_ref()
                    .map(|e| e.referenced)
                    .unwrap_or(Location::UNKNOWN);
                return Err(at(&loc, format!("env: invalid variable name {bad:?}")));
            }
            Ok(())
        })();
        keep(&mut errors, checked, ());

        let ready = keep(
            &mut errors,
            validate_ready(&raw.ready, &at),
            Ready {
                probe: Probe::Notify,
                timeout: DEFAULT_READY_TIMEOUT,
            },
        );

        let default_checkpoint = Checkpoint {
            enabled: true,
            settle: DEFAULT_SETTLE,
            tcp_established: false,
            timeout: DEFAULT_CHECKPOINT_TIMEOUT,
            forbid_env: Vec::new(),
        };
        let checkpoint = (|| {
            Ok(match &raw.checkpoint {
                Some(c) => Checkpoint {
                    enabled: c.enabled.unwrap_or(true),
                    settle: duration(c.settle.as_ref(), DEFAULT_SETTLE, "checkpoint.settle", &at)?,
                    tcp_established: c.tcp_established.unwrap_or(false),
                    timeout: duration(
                        c.timeout.as_ref(),
                        DEFAULT_CHECKPOINT_TIMEOUT,
                        "checkpoint.timeout",
                        &at,
                    )?,
                    forbid_env: {
                        let mut names = Vec::new();
                        for n in &c.forbid_env {
                            let ok = !n.value.is_empty()
                                && n.value
                                    .chars()
                                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '*');
                            if !ok {
                                return Err(at(
                                    &n.referenced,
                                    format!("checkpoint.forbid_env: expected a variable name (letters, digits, _ and * as a wildcard), got {:?}", n.value),
                                ));
                            }
                            names.push(n.value.clone());
                        }
                        names
                    },
                },
                None => default_checkpoint.clone(),
            })
        })();
        let checkpoint = keep(&mut errors, checkpoint, default_checkpoint);

        let digest_files = (|| {
            let mut digest_files = Vec::new();
            for f in raw.digest.iter().flat_map(|d| d.files.iter()) {
                let p = Path::new(&f.value);
                let abs = if p.is_absolute() {
                    p.to_path_buf()
                } else if let Some(w) = &workdir {
                    w.join(p)
                } else {
                    return Err(at(
                        &f.referenced,
                        format!(
                        "digest.files: relative path {:?} needs a workdir (or make it absolute)",
                        f.value
                    ),
                    ));
                };
                digest_files.push(abs);
            }
            Ok(digest_files)
        })();
        let digest_files = keep(&mut errors, digest_files, Vec::new());

        let stop_timeout = duration(
            raw.stop.as_ref().and_then(|s| s.timeout.as_ref()),
            DEFAULT_STOP_TIMEOUT,
            "stop.timeout",
            &at,
        );
        let stop_timeout = keep(&mut errors, stop_timeout, DEFAULT_STOP_TIMEOUT);

        let generations = (|| {
            Ok(match raw.cache.as_ref().and_then(|c| c.keep.as_ref()) {
                Some(k) if k.value == 0 => return Err(at(
                    &k.referenced,
                    "cache.keep: expected at least 1 (use checkpoint.enabled: false to keep none)"
                        .into(),
                )),
                Some(k) => k.value,
                None => DEFAULT_KEEP,
            })
        })();
        let generations = keep(&mut errors, generations, DEFAULT_KEEP);

        let mode = (|| {
            Ok(match raw.mode.as_ref() {
                None => Mode::Warm,
                Some(m) => match m.value.as_str() {
                    "warm" => Mode::Warm,
                    "persist" => Mode::Persist,
                    other => {
                        return Err(at(
                            &m.referenced,
                            format!("mode: expected warm or persist, got {other:?}"),
                        ))
                    }
                },
            })
        })();
        let mode = keep(&mut errors, mode, Mode::Warm);

        let absolute_paths = |key: &str, list: &[Spanned<String>]| {
            let mut out = Vec::new();
            for p in list {
                let path = Path::new(&p.value);
                if !path.is_absolute() || path.parent().is_none() {
                    return Err(at(
                        &p.referenced,
                        format!(
                            "{key}: expected an absolute path below /, got {:?}",
                            p.value
                        ),
                    ));
                }
                out.push(path.to_path_buf());
            }
            Ok(out)
        };
        let state = keep(&mut errors, absolute_paths("state", &raw.state), Vec::new());
        let not_state = keep(
            &mut errors,
            absolute_paths("not_state", &raw.not_state),
            Vec::new(),
        );

        let remote = (|| {
            Ok(match raw.remote.as_ref() {
                None => None,
                Some(r) => {
                    let repo = &r.value.repository;
                    // The distribution grammar; warmer adds the tag (the
                    // digest), and the host must be written out (no implied
                    // docker.io).
                    if let Err(why) = crate::remote::reference::Repository::parse(&repo.value) {
                        return Err(at(
                        &repo.referenced,
                        format!(
                            "remote.repository: expected host[:port]/path without tag or scheme, e.g. registry.example:5000/warmer/web, got {:?} ({why})",
                            repo.value
                        ),
                    ));
                    }
                    if mode == Mode::Persist {
                        return Err(at(
                        &r.referenced,
                        "remote: a persist-mode image holds this machine's data at its stop; it does not travel (use mode: warm)".into(),
                    ));
                    }
                    let ca_file = match &r.value.ca_file {
                        Some(c) if !Path::new(&c.value).is_absolute() => {
                            return Err(at(
                                &c.referenced,
                                format!(
                                    "remote.ca_file: expected an absolute path, got {:?}",
                                    c.value
                                ),
                            ))
                        }
                        c => c.as_ref().map(|c| PathBuf::from(&c.value)),
                    };
                    let sign = r
                        .value
                        .sign
                        .as_ref()
                        .map(|s| absolute_paths("remote.sign", std::slice::from_ref(s)))
                        .transpose()?
                        .and_then(|mut v| v.pop());
                    let verify = absolute_paths("remote.verify", &r.value.verify)?;
                    Some(Remote {
                        repository: repo.value.clone(),
                        push: r.value.push.unwrap_or(false),
                        insecure: r.value.insecure.unwrap_or(false),
                        timeout: duration(
                            r.value.timeout.as_ref(),
                            DEFAULT_REMOTE_TIMEOUT,
                            "remote.timeout",
                            &at,
                        )?,
                        ca_file,
                        sign,
                        verify,
                    })
                }
            })
        })();
        let remote = keep(&mut errors, remote, None);
        let restore_mode = keep(
            &mut errors,
            restore_mode(raw.restore.as_ref(), &at),
            RestoreMode::Auto,
        );
        let restore_timeout = duration(
            raw.restore.as_ref().and_then(|r| r.timeout.as_ref()),
            DEFAULT_RESTORE_TIMEOUT,
            "restore.timeout",
            &at,
        );
        let restore_timeout = keep(&mut errors, restore_timeout, DEFAULT_RESTORE_TIMEOUT);
        let restore_signal = (|| {
            let Some(s) = raw.restore.as_ref().and_then(|r| r.signal.as_ref()) else {
                return Ok(None);
            };
            let name = s.value.trim().to_ascii_uppercase();
            let name = if name.starts_with("SIG") {
                name
            } else {
                format!("SIG{name}")
            };
            match name.parse::<nix::sys::signal::Signal>() {
                Ok(sig)
                    if !matches!(
                        sig,
                        nix::sys::signal::Signal::SIGKILL | nix::sys::signal::Signal::SIGSTOP
                    ) =>
                {
                    Ok(Some(sig))
                }
                _ => Err(at(
                    &s.referenced,
                    format!(
                        "restore.signal: expected a signal name like SIGUSR2 or HUP, got {:?}",
                        s.value
                    ),
                )),
            }
        })();
        let restore_signal = keep(&mut errors, restore_signal, None);
        let hooks = (|| {
            let Some(h) = raw.hooks.as_ref() else {
                return Ok(None);
            };
            let argv = |name: &str, v: &Option<Spanned<Vec<String>>>| {
                match v {
                Some(a) if a.value.is_empty() || a.value[0].is_empty() => Err(at(
                    &a.referenced,
                    format!("hooks.{name}: expected a non-empty argv, e.g. [\"/usr/bin/curl\", \"-fsS\", \"http://127.0.0.1:8080/reseed\"]"),
                )),
                Some(a) => Ok(Some(a.value.clone())),
                None => Ok(None),
            }
            };
            Ok(Some(Hooks {
                before_checkpoint: argv("before_checkpoint", &h.value.before_checkpoint)?,
                after_restore: argv("after_restore", &h.value.after_restore)?,
                timeout: duration(
                    h.value.timeout.as_ref(),
                    DEFAULT_HOOK_TIMEOUT,
                    "hooks.timeout",
                    &at,
                )?,
            }))
        })();
        let hooks = keep(&mut errors, hooks, None);
        let sandbox = super::sandbox::validate(
            raw.user.as_ref(),
            raw.group.as_ref(),
            &raw.supplementary_groups,
            raw.sandbox.as_ref(),
            &at,
        );
        let sandbox = keep(&mut errors, sandbox, None);
        let env_files = (|| {
            let mut out = Vec::new();
            for f in &raw.env_file {
                let (optional, p) = match f.value.strip_prefix('-') {
                    Some(rest) => (true, rest),
                    None => (false, f.value.as_str()),
                };
                if !Path::new(p).is_absolute() || p.contains('\0') {
                    return Err(at(
                        &f.referenced,
                        format!("env_file: expected an absolute path (\"-\" in front: may be missing), got {:?}", f.value),
                    ));
                }
                out.push(EnvFile {
                    path: PathBuf::from(p),
                    optional,
                });
            }
            Ok(out)
        })();
        let env_files = keep(&mut errors, env_files, Vec::new());
        let exec_start_pre = keep(
            &mut errors,
            super::sandbox::exec_steps(&raw.exec_start_pre, &at),
            Vec::new(),
        );
        if !errors.is_empty() {
            return Err(ManifestError::all(errors));
        }

        Ok(Manifest {
            version: MANIFEST_VERSION,
            name: name.to_string(),
            mode,
            exec,
            workdir,
            pid_file,
            env,
            ready,
            checkpoint,
            digest_files,
            stop_timeout,
            keep: generations,
            state,
            not_state,
            hooks,
            sandbox,
            exec_start_pre,
            env_files,
            restore_signal,
            restore_mode,
            restore_timeout,
            remote,
            path: path.to_path_buf(),
        })
    }
}
