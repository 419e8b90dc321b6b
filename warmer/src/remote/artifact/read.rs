//! An artifact read back: its manifest and config checked, its layers
//! written to a staging entry (never past the sizes the config records),
//! published only when every file matches.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cache::{Cache, Entry};
use oci_client::manifest::{OciDescriptor, OciImageManifest};

use super::*;
use crate::remote::{bundle, first_pages, RemoteError};

/// Parses a manifest and checks it is a warmer image this code can read.
pub fn parse_manifest(bytes: &[u8]) -> Result<OciImageManifest, RemoteError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(RemoteError::NotOurs(format!(
            "manifest of {} bytes",
            bytes.len()
        )));
    }
    let manifest: OciImageManifest = serde_json::from_slice(bytes)
        .map_err(|e| RemoteError::NotOurs(format!("unreadable manifest: {e}")))?;
    check_manifest(&manifest)?;
    Ok(manifest)
}

pub fn check_manifest(manifest: &OciImageManifest) -> Result<(), RemoteError> {
    if manifest.config.media_type != CONFIG_TYPE {
        return Err(RemoteError::NotOurs(format!(
            "config media type {:?}, expected {CONFIG_TYPE}",
            manifest.config.media_type
        )));
    }
    if !(0..=MAX_CONFIG_BYTES).contains(&manifest.config.size) {
        return Err(RemoteError::NotOurs(format!(
            "config of {} bytes",
            manifest.config.size
        )));
    }
    let (mut bundles, mut firsts) = (0, 0);
    for layer in &manifest.layers {
        if layer.media_type == FRAMES_TYPE {
            if !(0..=MAX_FRAMES_BYTES).contains(&layer.size) {
                return Err(RemoteError::NotOurs(format!(
                    "frame index of {} bytes",
                    layer.size
                )));
            }
            continue;
        }
        if layer.media_type == WORKING_SET_TYPE {
            if !(0..=MAX_WORKING_SET_BYTES).contains(&layer.size) {
                return Err(RemoteError::NotOurs(format!(
                    "working set of {} bytes",
                    layer.size
                )));
            }
            continue;
        }
        if layer.media_type == first_pages::FIRST_PAGES_TYPE {
            firsts += 1;
            if firsts > 1 || !(0..=first_pages::MAX_BYTES).contains(&layer.size) {
                return Err(RemoteError::NotOurs(format!(
                    "a second first-pages layer, or one of {} bytes",
                    layer.size
                )));
            }
            continue;
        }
        if layer.media_type == bundle::BUNDLE_TYPE {
            bundles += 1;
            if bundles > 1 || !(0..=bundle::MAX_BYTES).contains(&layer.size) {
                return Err(RemoteError::NotOurs(format!(
                    "a second bundle, or one of {} bytes",
                    layer.size
                )));
            }
            continue;
        }
        if layer.media_type != FILE_TYPE && layer.media_type != FILE_ZSTD_TYPE {
            return Err(RemoteError::NotOurs(format!(
                "layer media type {:?}",
                layer.media_type
            )));
        }
        title(layer)?;
    }
    Ok(())
}

/// Parses a config blob (already checked against its digest).
pub fn parse_config(bytes: &[u8]) -> Result<Config, RemoteError> {
    let config: Config = serde_json::from_slice(bytes)
        .map_err(|e| RemoteError::NotOurs(format!("unreadable config: {e}")))?;
    if config.warmer_artifact != ARTIFACT_VERSION {
        return Err(RemoteError::NotOurs(format!(
            "artifact version {}, this warmer reads {ARTIFACT_VERSION}",
            config.warmer_artifact
        )));
    }
    Ok(config)
}

/// Where this host differs from the one an image was made on, in the facts
/// a restore depends on (empty: compatible).
pub fn host_differences(
    image: &BTreeMap<String, String>,
    here: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (key, theirs) in image {
        let ours = here.get(key).map(String::as_str).unwrap_or("");
        if theirs == ours {
            continue;
        }
        if key == "cpu_flags" {
            let ours: Vec<&str> = ours.split_whitespace().collect();
            let missing: Vec<&str> = theirs
                .split_whitespace()
                .filter(|f| !ours.contains(f))
                .collect();
            let extra = ours.len() + missing.len() - theirs.split_whitespace().count();
            out.push(if missing.is_empty() {
                format!("CPU flags: this host has {extra} the image's host lacked")
            } else {
                format!(
                    "CPU flags: this host lacks {} ({})",
                    missing.len(),
                    missing.join(" ")
                )
            });
        } else if key == "init_sha256" {
            out.push("warmer-init differs".to_string());
        } else {
            let name = match key.as_str() {
                "criu_version" => "CRIU",
                "kernel" => "kernel",
                "image_format" => "image format",
                other => other,
            };
            out.push(format!("{name}: image {theirs}, here {ours}"));
        }
    }
    out
}

/// Where a payload layer's file is written: new and empty, at most `limit`
/// bytes (the size the config records).
pub struct Target<'a> {
    pub out: &'a File,
    pub limit: u64,
}

/// What a fetch handed back.
pub enum Fetched {
    /// A local file holding the layer's blob, checked against its digest.
    Blob(PathBuf),
    /// The blob (checked against its digest) was decompressed into the
    /// target as it arrived: this many bytes.
    Unpacked(u64),
    /// The file is written later, by range, before the entry is published
    /// (see `crate::remote::stream`).
    Later,
}

/// How [`install`] gets each layer.
pub type Fetch<'f> =
    dyn FnMut(&OciDescriptor, Option<Target<'_>>) -> Result<Fetched, RemoteError> + 'f;

/// Writes a layer's payload file from its verified blob, never past `limit`
/// bytes (a compressed bomb stops there).
fn unpack(
    layer: &OciDescriptor,
    blob: &Path,
    dest: &Path,
    out: &File,
    limit: u64,
) -> Result<(), RemoteError> {
    let copied = if layer.media_type == FILE_ZSTD_TYPE {
        crate::remote::frames::unpack(blob, out, limit, crate::remote::frames::threads())
    } else {
        let mut out = out;
        File::open(blob).and_then(|input| io::copy(&mut input.take(limit + 1), &mut out))
    }
    .map_err(|e| unpack_err(layer, dest, e))?;
    check_unpacked(layer, copied, limit)
}

/// A failure writing a payload file: a full disk is the disk's, anything
/// else the image's.
pub(in crate::remote) fn unpack_err(
    layer: &OciDescriptor,
    dest: &Path,
    e: io::Error,
) -> RemoteError {
    if e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC) {
        RemoteError::Io {
            path: dest.to_path_buf(),
            source: e,
        }
    } else {
        RemoteError::Damaged(format!("layer {}: {e}", layer.digest))
    }
}

fn check_unpacked(layer: &OciDescriptor, copied: u64, limit: u64) -> Result<(), RemoteError> {
    if copied > limit {
        return Err(RemoteError::Damaged(format!(
            "layer {} unpacks to more than the {limit} bytes recorded",
            layer.digest
        )));
    }
    Ok(())
}

/// Adds the artifact to the cache as a new generation of its digest.
/// `fetch` hands back a layer, checked against its digest: as a local blob,
/// or (given a target) already decompressed into it. The caller holds the
/// service's cache lock.
pub fn install(
    cache: &Cache,
    config: &Config,
    manifest: &OciImageManifest,
    fetch: &mut Fetch<'_>,
    origin: String,
) -> Result<Entry, RemoteError> {
    let staged = stage(cache, config, manifest, fetch)?;
    publish(cache, config, staged, origin)
}

/// An artifact's files written to a staging entry, not yet published.
pub struct Staged {
    pub staging: cache::Staging,
    /// The working set layer's bytes, if it had one.
    pub working_set: Option<Vec<u8>>,
}

/// Writes the artifact's files into a new staging entry. A layer `fetch`
/// answers [`Fetched::Later`] for is left as a sparse file of its size, to
/// be written before [`publish`].
pub fn stage(
    cache: &Cache,
    config: &Config,
    manifest: &OciImageManifest,
    fetch: &mut Fetch<'_>,
) -> Result<Staged, RemoteError> {
    let meta = &config.entry;
    let staging = cache.stage().map_err(RemoteError::Cache)?;
    let data = staging.data_dir();
    let mut working_set = None;
    let mut written = std::collections::BTreeSet::new();
    for layer in &manifest.layers {
        if layer.media_type == FRAMES_TYPE || layer.media_type == first_pages::FIRST_PAGES_TYPE {
            // Only a restore that starts before the pull ends reads them
            // (`crate::remote::stream`).
            continue;
        }
        if layer.media_type == bundle::BUNDLE_TYPE {
            let Fetched::Blob(blob) = fetch(layer, None)? else {
                return Err(RemoteError::Damaged("the bundle was not fetched".into()));
            };
            written
                .extend(bundle::unpack(&blob, &data, &meta.files).map_err(RemoteError::Damaged)?);
            continue;
        }
        if layer.media_type == WORKING_SET_TYPE {
            let Fetched::Blob(blob) = fetch(layer, None)? else {
                return Err(RemoteError::Damaged(
                    "the working set layer was not fetched".into(),
                ));
            };
            let limit = u64::try_from(MAX_WORKING_SET_BYTES).unwrap_or(0);
            let mut bytes = Vec::new();
            File::open(&blob)
                .and_then(|f| f.take(limit).read_to_end(&mut bytes))
                .map_err(io_err(&blob))?;
            working_set = Some(bytes);
            continue;
        }
        let path = title(layer)?;
        let recorded =
            meta.files.iter().find(|f| f.path == path).ok_or_else(|| {
                RemoteError::Damaged(format!("layer {path:?} is not in the config"))
            })?;
        let dest = data.join(path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&dest)
            .map_err(io_err(&dest))?;
        let limit = recorded.size;
        match fetch(layer, Some(Target { out: &out, limit }))? {
            Fetched::Blob(blob) => {
                // Whatever an attempt to unpack it on arrival left is gone.
                out.set_len(0).map_err(io_err(&dest))?;
                unpack(layer, &blob, &dest, &out, limit)?;
            }
            Fetched::Unpacked(n) => check_unpacked(layer, n, limit)?,
            Fetched::Later => out.set_len(limit).map_err(io_err(&dest))?,
        }
        written.insert(path.to_string());
    }
    // A restore may begin from the staging entry before it is published
    // (and checked whole): every file the config records is there.
    if let Some(f) = meta.files.iter().find(|f| !written.contains(&f.path)) {
        return Err(RemoteError::Damaged(format!(
            "{:?} is in the config but in no layer",
            f.path
        )));
    }
    Ok(Staged {
        staging,
        working_set,
    })
}

/// Publishes a staged artifact (every file checked against the config's
/// BLAKE3), and keeps its working set as the entry's note.
pub fn publish(
    cache: &Cache,
    config: &Config,
    staged: Staged,
    origin: String,
) -> Result<Entry, RemoteError> {
    let meta = &config.entry;
    let entry = cache
        .publish(
            staged.staging,
            cache::NewEntry {
                service: meta.service.clone(),
                digest: meta.digest.clone(),
                inputs: meta.inputs.clone(),
                host: meta.host.clone(),
                cold_start_ms: meta.cold_start_ms,
                origin: Some(origin),
                expected_files: Some(meta.files.clone()),
                // It can be fetched again; verification catches a torn one.
                no_sync: true,
                created: Some((meta.created.clone(), meta.created_unix)),
            },
        )
        .map_err(RemoteError::Cache)?;
    if let Some(ws) = staged.working_set.as_deref().and_then(parse_working_set) {
        if let Err(e) = ws.save(cache, &entry.key) {
            tracing::warn!(
                "the image's working set is not kept: {}",
                crate::errors::chain(&e)
            );
        }
    }
    Ok(entry)
}

/// A working set layer's bytes, if well-formed (only flags of the image's
/// own pages follow from it; still, only a well-formed one is used).
pub fn parse_working_set(bytes: &[u8]) -> Option<crate::restore::working_set::WorkingSet> {
    serde_json::from_slice(bytes)
        .map_err(|e| tracing::warn!("the image's working set is unreadable, dropped: {e}"))
        .ok()
}
