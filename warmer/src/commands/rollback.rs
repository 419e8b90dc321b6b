//! `warmer rollback SVC [--to GEN]`: choose an earlier image generation for
//! the next start. Explicit only: a restart never goes back by itself.
//!
//! A generation can be chosen only if restoring it cannot roll the service's
//! data back behind the user's back:
//! - it must be of the service's current digest (an image of an older program
//!   cannot run the current one);
//! - a warm-mode service with `state:` is refused: its memory would no longer
//!   match its data;
//! - a persist-mode service is refused once its data has moved on since that
//!   generation was taken.

use cache::{Cache, Entry};

use crate::digest::short;
use crate::digest::{DigestError, Digester};
use crate::dirs::Dirs;
use crate::image::state::Drift;
use crate::manifest::{Manifest, ManifestError, Mode};

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("cannot compute the service's digest")]
    Digest(#[from] DigestError),
    #[error(transparent)]
    Cache(#[from] cache::Error),
    #[error("service {service} has no image of its current version to go back to")]
    NoImages { service: String },
    #[error(
        "service {service} has no generation {gen} of its current version (it has: {available})"
    )]
    NoSuchGeneration {
        service: String,
        gen: u64,
        available: String,
    },
    #[error("generation {gen} of {service} was made for another version of the service (image {key}): it cannot run the current program")]
    OtherVersion {
        service: String,
        gen: u64,
        key: String,
    },
    #[error("service {service} has no generation older than the current one ({current})")]
    NothingOlder { service: String, current: u64 },
    #[error("refused: {service} keeps `state:` in warm mode, so an older image's memory would not match its current data (use mode: persist, or remove the data to start fresh)")]
    WarmState { service: String },
    #[error("refused: the data of {service} has moved on since generation {gen} was taken ({why}); restoring it would roll the data back")]
    DataMovedOn {
        service: String,
        gen: u64,
        why: String,
    },
    #[error("cannot compare the service's data with generation {gen}")]
    Drift {
        gen: u64,
        #[source]
        source: crate::image::state::StateError,
    },
}

/// The generation chosen.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RolledBack {
    pub service: String,
    pub key: String,
    pub generation: u64,
    pub created: String,
    /// The generation the next start would have restored before.
    pub previous: Option<u64>,
}

/// Pins generation `to` (default: the one before the current) of `service`'s
/// current digest for its next start.
pub fn rollback(dirs: &Dirs, service: &str, to: Option<u64>) -> Result<RolledBack, RollbackError> {
    let manifest = Manifest::find(&dirs.manifests, service)?;
    let digest = Digester::open(dirs)?.digest(&manifest)?.hex;
    let cache = Cache::open(&dirs.cache)?;
    let _lock = cache.lock_service(service, true)?;
    let all: Vec<Entry> = cache
        .list()?
        .into_iter()
        .flatten()
        .filter(|e| e.meta.service == service)
        .collect();
    let mut mine: Vec<&Entry> = all.iter().filter(|e| e.meta.digest == digest).collect();
    mine.sort_by_key(|e| e.meta.generation);
    if mine.is_empty() {
        return Err(RollbackError::NoImages {
            service: service.into(),
        });
    }
    let current = cache.lookup(&digest)?.map(|e| e.meta.generation);
    let target = match to {
        Some(gen) => match mine.iter().find(|e| e.meta.generation == gen) {
            Some(e) => *e,
            None => {
                if let Some(other) = all.iter().find(|e| e.meta.generation == gen) {
                    return Err(RollbackError::OtherVersion {
                        service: service.into(),
                        gen,
                        key: short(&other.key),
                    });
                }
                return Err(RollbackError::NoSuchGeneration {
                    service: service.into(),
                    gen,
                    available: mine
                        .iter()
                        .map(|e| e.meta.generation.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        },
        None => {
            let cur = current.unwrap_or(u64::MAX);
            *mine.iter().rev().find(|e| e.meta.generation < cur).ok_or(
                RollbackError::NothingOlder {
                    service: service.into(),
                    current: cur,
                },
            )?
        }
    };
    check_allowed(&manifest, target)?;
    cache.clear_stale(&target.key)?;
    cache.pin(&target.key)?;
    Ok(RolledBack {
        service: service.into(),
        key: target.key.clone(),
        generation: target.meta.generation,
        created: target.meta.created.clone(),
        previous: current,
    })
}

/// The rules in the module docs, for one generation.
fn check_allowed(manifest: &Manifest, target: &Entry) -> Result<(), RollbackError> {
    let data = target.data_dir();
    let gen = target.meta.generation;
    if crate::image::state::has_state(&data) && manifest.mode == Mode::Warm {
        return Err(RollbackError::WarmState {
            service: manifest.name.clone(),
        });
    }
    match crate::image::state::drift_all(&data, &manifest.not_state)
        .map_err(|source| RollbackError::Drift { gen, source })?
    {
        Drift::Same | Drift::Vanished(_) => Ok(()),
        Drift::Changed(why) => Err(RollbackError::DataMovedOn {
            service: manifest.name.clone(),
            gen,
            why,
        }),
    }
}
