//! The commands that check a machine and its manifests: `validate` and
//! `check`.

use std::path::PathBuf;
use std::process::ExitCode;

use super::exit;
use crate::dirs::Dirs;
use crate::errors::chain;
use crate::{criu, manifest};

/// `warmer validate`: each manifest checked, with what its current image shows.
pub fn validate(dirs: &Dirs, files: &[PathBuf]) -> ExitCode {
    let mut bad = false;
    let mut digester = None;
    for f in files {
        match manifest::Manifest::load(f) {
            Ok(m) => {
                println!("{}: ok", f.display());
                if let Err(e) =
                    crate::digest::resolve_program(&m, std::env::var("PATH").ok().as_deref())
                {
                    eprintln!("{}: warning: {e}", f.display());
                }
                // What the service's current image shows, where there is one.
                if digester.is_none() {
                    digester = crate::digest::Digester::open(dirs).ok();
                }
                let entry = digester
                    .as_mut()
                    .and_then(|d| d.digest(&m).ok())
                    .zip(
                        // Only an existing cache: validate creates nothing.
                        dirs.cache
                            .join("VERSION")
                            .exists()
                            .then(|| cache::Cache::open(&dirs.cache).ok())
                            .flatten(),
                    )
                    .and_then(|(d, c)| c.lookup(&d.hex).ok().flatten());
                for w in crate::commands::lint::pushed_secrets(&m).into_iter().chain(
                    crate::commands::lint::sandbox_limits(
                        &m,
                        m.sandbox.is_some() && crate::criu::Criu::located_lazy_in_userns(&dirs.run),
                    ),
                ) {
                    eprintln!("{}: warning: {w}", f.display());
                }
                if let Some(e) = entry {
                    if let Ok(open) = crate::image::criu::open_files(&e.data_dir()) {
                        for w in crate::commands::lint::unsaved_writes(&m, &open) {
                            eprintln!("{}: warning: {w}", f.display());
                        }
                    }
                    if m.remote.as_ref().is_some_and(|r| r.push) {
                        if let Ok(i) = crate::commands::inspect::inspect(dirs, &e.key) {
                            let names: std::collections::BTreeSet<&String> =
                                i.processes.iter().flat_map(|p| &p.secret_env).collect();
                            if !names.is_empty() {
                                eprintln!(
                                    "{}: warning: remote.push sends the service's memory to the registry, and its image holds environment variables that look like secrets: {} (keep them out: checkpoint.forbid_env, a before_checkpoint hook, or remote: {{push: false}})",
                                    f.display(),
                                    crate::errors::escape(
                                        &names.into_iter().cloned().collect::<Vec<_>>().join(", ")
                                    )
                                );
                            }
                        }
                    }
                }
            }
            Err(e) => {
                bad = true;
                for one in e.each() {
                    eprintln!("{one}");
                    if let Some(x) = one.excerpt() {
                        eprintln!("{x}");
                    }
                }
            }
        }
    }
    ExitCode::from(if bad { exit::DATAERR } else { exit::OK })
}

/// `warmer check`: whether this machine's CRIU can do what warmer needs.
pub fn check() -> ExitCode {
    let c = match criu::Criu::locate() {
        Ok(c) => c,
        Err(e) => {
            println!("criu: FAIL: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    println!(
        "criu: {} (version {}, need >= {}.{}): ok",
        c.bin.display(),
        c.version,
        criu::MIN_VERSION.0,
        criu::MIN_VERSION.1
    );
    match c.check() {
        Ok(r) if r.ok => {
            println!("criu check: ok: {}", r.lines.join(" / "));
            if c.lazy_in_userns(&mut crate::memo::Memo::none()) {
                println!("sandboxed services: lazy restores (CRIU opens /dev/userfaultfd)");
            } else {
                println!(
                    "sandboxed services: eager restores only: {}",
                    crate::restore::NO_USERFAULTFD
                );
            }
            if c.has_feature(&mut crate::memo::Memo::none(), criu::QUIET_BACKGROUND) {
                println!(
                    "lazy restores: the memory nobody asked for follows once the service is quiet (criu lazy-pages --lazy-bg-idle)"
                );
            } else {
                println!(
                    "lazy restores: the memory nobody asked for follows at once, racing the service's first faults (this CRIU has no --lazy-bg-idle; scripts/install-criu.sh builds one that has)"
                );
            }
            ExitCode::from(exit::OK)
        }
        Ok(r) => {
            println!(
                "criu check: FAIL ({}):\n  {}",
                r.status,
                r.lines.join("\n  ")
            );
            println!(
                "hint: run as root; on kernels >= 6.16 use CRIU >= 4.2 (scripts/install-criu.sh)"
            );
            ExitCode::from(exit::UNAVAILABLE)
        }
        Err(e) => {
            println!("criu check: FAIL: {}", chain(&e));
            ExitCode::from(exit::UNAVAILABLE)
        }
    }
}
