//! Images that travel: a registry as the cache's second tier, and archives.
//!
//! - [`artifact`]: the one format (an OCI artifact: config = the entry's
//!   metadata, the small files in one layer ([`bundle`]), a layer per other
//!   payload file) and how one is checked and added
//!   to the cache.
//! - [`registry`]: push and pull over the OCI distribution API
//!   (`oci-client`), with auth ([`auth`]), TLS with the system's CA store,
//!   resumable downloads and deadlines; [`reference`](mod@reference): repository names.
//! - [`layout`]: `warmer export` / `warmer import`, the same artifact in an
//!   OCI image layout tarball.
//! - [`frames`]: page files as independent zstd frames (decompressed on every
//!   core; fetched and checked one by one); [`stream`]: a restore that begins
//!   before its pull ends.
//!
//! Where the warm path uses them: on a cache miss `warmer run` pulls the tag
//! named after the digest, bounded by `remote.timeout`
//! ([`crate::supervisor`]); after a checkpoint it pushes in the background.
//! A registry is not trusted more than the disk: a pulled entry is verified
//! like any other, and quarantined if damaged.

pub mod artifact;
pub mod auth;
pub mod bundle;
pub mod first_pages;
pub mod frames;
pub mod layout;
pub mod reference;
pub mod registry;
pub mod sign;
pub mod stream;
mod transfer;

use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong moving an image between here and elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error(transparent)]
    Digest(#[from] crate::digest::DigestError),
    #[error(transparent)]
    Select(#[from] cache::SelectError),
    #[error("{}: no remote: section (remote: {{repository: host[:port]/path}})", .0.display())]
    NoRemote(PathBuf),
    #[error("no current image of {service} (digest {digest}) in the cache: start the service once to make one")]
    NoCurrentImage { service: String, digest: String },
    #[error("remote.repository {repository:?}: {why} (expected host[:port]/path, e.g. registry.example:5000/warmer/web)")]
    Repository { repository: String, why: String },
    #[error("refusing the auth file {}", path.display())]
    UntrustedAuthFile {
        path: PathBuf,
        #[source]
        why: cache::fsutil::Untrusted,
    },
    #[error("auth file {}: {what}", path.display())]
    AuthFile { path: PathBuf, what: String },
    #[error("{}: not a file name", .0.display())]
    NotAFileName(PathBuf),
    #[error("registry {what}")]
    Registry {
        what: String,
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    #[error("no image {0} in the registry")]
    NotFound(String),
    #[error("registry {what}: no answer within {}", humantime::format_duration(*limit))]
    Timeout { what: String, limit: Duration },
    #[error("blob {expected}: content has digest {found} (tampered or corrupted), refused")]
    Tampered { expected: String, found: String },
    /// The text may quote an archive's or a registry's own names: shown
    /// escaped.
    #[error("not a warmer image: {}", crate::errors::escape(.0))]
    NotOurs(String),
    #[error("image is damaged: {}", crate::errors::escape(.0))]
    Damaged(String),
    #[error("the image is for digest {found}, expected {expected}")]
    WrongDigest { expected: String, found: String },
    #[error("the image was made on an incompatible host: {}", .0.join("; "))]
    HostDiffers(Vec<String>),
    #[error("I/O on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache")]
    Cache(#[source] cache::Error),
    #[error("image refused: {0}")]
    Rejected(#[from] sign::Rejected),
    #[error(transparent)]
    Sign(#[from] sign::SignError),
}

/// One line per phase of a transfer, for a person watching (stderr).
pub type Progress<'a> = &'a mut dyn FnMut(&str);

use std::collections::BTreeMap;
use std::path::Path;

use cache::{Cache, Entry};

use crate::dirs::Dirs;
use crate::manifest::{Manifest, Remote};

/// Refuses an image made for another digest or on an incompatible host.
pub fn check_config(
    config: &artifact::Config,
    digest: Option<&str>,
    here: &BTreeMap<String, String>,
) -> Result<(), RemoteError> {
    if let Some(d) = digest {
        if config.entry.digest != d {
            return Err(RemoteError::WrongDigest {
                expected: d.to_string(),
                found: config.entry.digest.clone(),
            });
        }
    }
    let differences = artifact::host_differences(&config.entry.host, here);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(RemoteError::HostDiffers(differences))
    }
}

fn remote_of(manifest: &Manifest) -> Result<&Remote, RemoteError> {
    manifest
        .remote
        .as_ref()
        .ok_or_else(|| RemoteError::NoRemote(manifest.path.clone()))
}

/// Pulls the image of `digest` for `manifest`'s service into `cache`, within
/// `limit`. The caller holds the service's cache lock.
pub fn pull(
    cache: &Cache,
    manifest: &Manifest,
    digest: &str,
    host: &BTreeMap<String, String>,
    limit: Option<std::time::Duration>,
    progress: Progress,
) -> Result<registry::Pulled, RemoteError> {
    match pull_or_stream(cache, manifest, digest, host, limit, Stream::No, progress)? {
        stream::Got::Pulled(p) => Ok(p),
        stream::Got::Streaming(_) => unreachable!("not asked to stream"),
    }
}

/// Whether a pull may hand an image back before its memory is all here,
/// for a lazy restore (see [`stream`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Pull it whole.
    No,
    /// Only an image restored in the host's user namespace.
    HostOnly,
    /// A sandboxed one too: CRIU gives its user namespace a userfaultfd
    /// ([`crate::criu::Criu::lazy_in_userns`]).
    Any,
}

/// [`pull`], or (with `may_stream`) for an image that can restore before its
/// pull ends, what such a restore starts from (see [`stream`]).
pub fn pull_or_stream(
    cache: &Cache,
    manifest: &Manifest,
    digest: &str,
    host: &BTreeMap<String, String>,
    limit: Option<std::time::Duration>,
    may_stream: Stream,
    progress: Progress,
) -> Result<stream::Got, RemoteError> {
    let remote = remote_of(manifest)?;
    let keys = verifiers(Some(remote))?;
    let registry = registry::Registry::new(remote)?;
    let check = |config: &artifact::Config| check_config(config, Some(digest), host);
    if may_stream != Stream::No {
        let in_userns = may_stream == Stream::Any;
        registry.pull_or_stream(cache, digest, limit, &keys, &check, in_userns, progress)
    } else {
        registry
            .pull(cache, digest, limit, &keys, &check, progress)
            .map(stream::Got::Pulled)
    }
}

/// Pushes `entry` to `manifest`'s remote repository.
pub fn push(
    cache: &Cache,
    manifest: &Manifest,
    entry: &Entry,
    progress: Progress,
) -> Result<registry::Pushed, RemoteError> {
    let remote = remote_of(manifest)?;
    let signer = signer(Some(remote))?;
    let registry = registry::Registry::new(remote)?;
    let scratch = cache.stage().map_err(RemoteError::Cache)?;
    let ws = cache.note(&entry.key, crate::restore::working_set::NOTE);
    registry.push(
        entry,
        ws.as_deref(),
        &scratch.data_dir(),
        signer.as_ref(),
        progress,
    )
}

/// The key a service with `remote` signs with, if it has one (its
/// manifest's, else the trust file's).
fn signer(remote: Option<&Remote>) -> Result<Option<sign::Signer>, RemoteError> {
    Ok(sign::Trust::of(remote)?
        .sign
        .as_deref()
        .map(sign::Signer::load)
        .transpose()?)
}

/// The keys an image of a service with `remote` must be signed by one of.
fn verifiers(remote: Option<&Remote>) -> Result<Vec<sign::Verifier>, RemoteError> {
    Ok(sign::Trust::of(remote)?
        .verify
        .iter()
        .map(|p| sign::Verifier::load(p))
        .collect::<Result<_, _>>()?)
}

/// Pushes `entry` unless the registry already has an image of its digest
/// (`None`): what a start that restored a local image does, so an image
/// whose push was cut short (the service stopped meanwhile) still travels.
pub fn push_if_missing(
    cache: &Cache,
    manifest: &Manifest,
    entry: &Entry,
    progress: Progress,
) -> Result<Option<registry::Pushed>, RemoteError> {
    let remote = remote_of(manifest)?;
    let signer = signer(Some(remote))?;
    let registry = registry::Registry::new(remote)?;
    if registry.has(&entry.meta.digest)? {
        return Ok(None);
    }
    let scratch = cache.stage().map_err(RemoteError::Cache)?;
    let ws = cache.note(&entry.key, crate::restore::working_set::NOTE);
    registry
        .push(
            entry,
            ws.as_deref(),
            &scratch.data_dir(),
            signer.as_ref(),
            progress,
        )
        .map(Some)
}

/// `warmer push SVC`: the image a start of SVC would restore now.
pub fn push_service(
    dirs: &Dirs,
    service: &str,
    progress: Progress,
) -> Result<registry::Pushed, RemoteError> {
    let (manifest, digest, _) = service_digest(dirs, service)?;
    let cache = Cache::open(&dirs.cache).map_err(RemoteError::Cache)?;
    let entry = cache
        .lookup(&digest)
        .map_err(RemoteError::Cache)?
        .filter(|e| e.stale.is_none())
        .ok_or_else(|| RemoteError::NoCurrentImage {
            service: service.to_string(),
            digest: digest[..12].to_string(),
        })?;
    verified(&cache, &entry)?;
    push(&cache, &manifest, &entry, progress)
}

/// An entry leaves this machine only whole: its shape, and its hashes
/// (free when stamped this boot), under its service's lock.
fn verified(cache: &Cache, entry: &Entry) -> Result<(), RemoteError> {
    let _lock = cache
        .lock_service(&entry.meta.service, true)
        .map_err(RemoteError::Cache)?;
    cache
        .check_shape(entry)
        .map_err(|p| RemoteError::Damaged(p.to_string()))?;
    cache
        .ensure_verified(entry, &mut |_, _| {})
        .map_err(|p| RemoteError::Damaged(p.to_string()))?;
    Ok(())
}

/// What `warmer pull` did.
#[derive(Debug, serde::Serialize)]
pub enum PullOutcome {
    /// The cache already has a usable image of the digest.
    Present(String),
    Pulled(registry::Pulled),
}

/// `warmer pull SVC`: fetch the image of SVC's digest on this host.
pub fn pull_service(
    dirs: &Dirs,
    service: &str,
    limit: Option<std::time::Duration>,
    progress: Progress,
) -> Result<PullOutcome, RemoteError> {
    let (manifest, digest, host) = service_digest(dirs, service)?;
    let cache = Cache::open(&dirs.cache).map_err(RemoteError::Cache)?;
    let _lock = cache
        .lock_service(service, true)
        .map_err(RemoteError::Cache)?;
    if let Some(e) = cache.lookup(&digest).map_err(RemoteError::Cache)? {
        if e.stale.is_none() {
            return Ok(PullOutcome::Present(e.key));
        }
    }
    pull(&cache, &manifest, &digest, &host, limit, progress).map(PullOutcome::Pulled)
}

fn service_digest(
    dirs: &Dirs,
    service: &str,
) -> Result<(Manifest, String, BTreeMap<String, String>), RemoteError> {
    let manifest = Manifest::find(&dirs.manifests, service)?;
    let mut digester = crate::digest::Digester::open(dirs)?;
    let digest = digester.digest(&manifest)?;
    Ok((manifest, digest.hex, digester.host.as_map()))
}

/// `warmer export SVC|DIGEST -o FILE`.
pub fn export(dirs: &Dirs, target: &str, out: &Path) -> Result<layout::Exported, RemoteError> {
    let cache = Cache::open(&dirs.cache).map_err(RemoteError::Cache)?;
    let entry = pick(dirs, &cache, target)?;
    verified(&cache, &entry)?;
    // Signed with the service's key (its manifest's, else the trust file's),
    // naming its repository, or else warmer/<service>, as its identity.
    let own = Manifest::find(&dirs.manifests, &entry.meta.service).ok();
    let remote = own.as_ref().and_then(|m| m.remote.as_ref());
    let signer = signer(remote)?;
    let identity = remote.map_or_else(
        || format!("warmer/{}", entry.meta.service),
        |r| r.repository.clone(),
    );
    let scratch = cache.stage().map_err(RemoteError::Cache)?;
    layout::export(
        &entry,
        cache
            .note(&entry.key, crate::restore::working_set::NOTE)
            .as_deref(),
        &scratch.data_dir(),
        out,
        signer.as_ref().map(|s| (s, identity.as_str())),
    )
}

/// What `warmer import` added.
#[derive(Debug, serde::Serialize)]
pub struct Imported {
    pub key: String,
    pub service: String,
    /// Whether a start of the service here would restore it (its manifest
    /// here gives the same digest), and if not, why not.
    pub restores_here: Result<(), String>,
}

/// `warmer import FILE`: verify an exported archive and add its image.
/// Refused when this host's facts differ from the image's.
pub fn import(dirs: &Dirs, archive: &Path) -> Result<Imported, RemoteError> {
    let cache = Cache::open(&dirs.cache).map_err(RemoteError::Cache)?;
    let scratch = cache.stage().map_err(RemoteError::Cache)?;
    let unpacked = layout::unpack(archive, &scratch.data_dir())?;
    let service = unpacked.config.entry.service.clone();
    crate::manifest::check_service_name(&service)
        .map_err(|e| RemoteError::NotOurs(crate::errors::escape(&e)))?;
    // Nothing of it is used before a trusted key's signature is found: the
    // service's manifest's keys here, else the trust file's.
    let own = Manifest::find(&dirs.manifests, &service).ok();
    let keys = verifiers(own.as_ref().and_then(|m| m.remote.as_ref()))?;
    sign::check(&keys, &unpacked.manifest_digest, &unpacked.signatures)?;
    let digester = crate::digest::Digester::open(dirs)?;
    check_config(&unpacked.config, None, &digester.host.as_map())?;
    let restores_here = match service_digest(dirs, &service) {
        Ok((_, d, _)) if d == unpacked.config.entry.digest => Ok(()),
        Ok((_, d, _)) => Err(format!(
            "{service}'s digest here is {} (its manifest, program or files differ from the image's)",
            &d[..12]
        )),
        Err(e) => Err(e.to_string()),
    };
    let _lock = cache
        .lock_service(&service, true)
        .map_err(RemoteError::Cache)?;
    let origin = format!("import {}", archive.display());
    let entry = layout::install(&cache, &unpacked, origin)?;
    Ok(Imported {
        key: entry.key,
        service,
        restores_here,
    })
}

/// The one entry `target` names (see [`cache::Target`]): for a service, the
/// generation its next start restores (else its newest); for a digest
/// prefix, that digest's current generation; for `DIGEST.GEN`, that one.
pub fn pick(dirs: &Dirs, cache: &Cache, target: &str) -> Result<Entry, RemoteError> {
    let entries = cache.select(target)?;
    let newest = |es: &[Entry]| es.iter().max_by_key(|e| e.meta.generation).cloned();
    let named_one = matches!(
        cache::Target::parse(target),
        cache::Target::Image {
            generation: Some(_),
            ..
        }
    );
    if named_one || entries.len() == 1 {
        return Ok(entries
            .into_iter()
            .next()
            .expect("select never returns none"));
    }
    // One digest (a prefix) or a service's digests: the current one.
    let digest = match entries.first().map(|e| e.meta.service.clone()) {
        Some(service) if service == target => match service_digest(dirs, target) {
            Ok((_, d, _)) if entries.iter().any(|e| e.meta.digest == d) => d,
            _ => newest(&entries).expect("not empty").meta.digest,
        },
        _ => entries[0].meta.digest.clone(),
    };
    match cache.lookup(&digest).map_err(RemoteError::Cache)? {
        Some(e) => Ok(e),
        None => Ok(newest(
            &entries
                .into_iter()
                .filter(|e| e.meta.digest == digest)
                .collect::<Vec<_>>(),
        )
        .expect("the digest has entries")),
    }
}
