//! A cache entry as an OCI artifact, the one format of the registry tier and
//! of `warmer export` / `warmer import`.
//!
//! - The manifest is an OCI image manifest with `artifactType`
//!   [`ARTIFACT_TYPE`], tagged (in a registry) or named (in a layout) after
//!   the entry's digest, the 64 hex characters of its cache key.
//! - The config blob ([`CONFIG_TYPE`]) is [`Config`]: the entry's own
//!   `meta.json` (service, digest, generation, host facts, when it was made,
//!   and the BLAKE3 of every payload file).
//! - The small payload files (not pages) together, as one layer
//!   ([`super::bundle`]): one request instead of tens.
//! - One layer per other payload file, titled with its path
//!   (`org.opencontainers.image.title`), zstd-compressed ([`FILE_ZSTD_TYPE`],
//!   in independent frames a puller decompresses on every core:
//!   [`super::frames`]) when that saves at least a tenth, else raw
//!   ([`FILE_TYPE`]). Identical
//!   files (across generations, across services) are identical blobs: a
//!   registry stores and sends them once.
//! - When the image's working set was learned ([`crate::restore::working_set`]),
//!   one more layer ([`WORKING_SET_TYPE`], titled `working-set`) carries it,
//!   so a node that pulls the image restores what its service touches first
//!   from the first restore on. It is not a payload file: it becomes the
//!   entry's note, and an unreadable one is dropped, never the image.
//!
//! - The page files' frames ([`FRAMES_TYPE`], titled `frames`: each frame's
//!   compressed length and sha256, [`super::frames::Index`]), so a node can
//!   fetch and check any part of a page file by range and restore before
//!   its pull ends ([`super::stream`]). Not a payload file either.
//!
//! Reading one back trusts nothing: every blob is checked against its sha256
//! as it arrives, a layer never decompresses past the size the config
//! records, its title must be a plain relative path, and the cache publishes
//! the entry only if every file's BLAKE3 matches the config
//! ([`cache::NewEntry::expected_files`]). A config for another digest, or
//! made on a host with different facts, is refused with the difference.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use cache::{Cache, Entry, Meta};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{bundle, first_pages, RemoteError};

pub const ARTIFACT_TYPE: &str = "application/vnd.warmer.image.v1";
pub const CONFIG_TYPE: &str = "application/vnd.warmer.image.config.v1+json";
pub const FILE_TYPE: &str = "application/vnd.warmer.image.file.v1";
pub const FILE_ZSTD_TYPE: &str = "application/vnd.warmer.image.file.v1+zstd";
pub const WORKING_SET_TYPE: &str = "application/vnd.warmer.working-set.v1+json";
/// The frames of the page files ([`super::frames::Index`]).
pub const FRAMES_TYPE: &str = "application/vnd.warmer.frames.v1+json";
const FRAMES_TITLE: &str = "frames";
/// A frame index is one line per MiB of pages.
pub const MAX_FRAMES_BYTES: i64 = 16 << 20;

/// CRIU's memory pages (what a restore can be served from by range).
pub fn is_page_file(path: &str) -> bool {
    path.starts_with("pages-") && path.ends_with(".img") && !path.contains('/')
}
pub const TITLE: &str = "org.opencontainers.image.title";
/// The title of the working set's layer.
const WORKING_SET_TITLE: &str = "working-set";
/// A working set is a few KiB to a few MiB of JSON.
const MAX_WORKING_SET_BYTES: i64 = 16 << 20;
/// The artifact version this code writes and reads.
pub const ARTIFACT_VERSION: u32 = 1;
/// A config is a few KiB of JSON; anything much bigger is not ours.
pub const MAX_CONFIG_BYTES: i64 = 8 << 20;
/// Manifests likewise (one descriptor per file).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// zstd level: fast to make (images are made at ready time), and CRIU's
/// page files compress well even at low levels.
const ZSTD_LEVEL: i32 = 3;

/// The config blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub warmer_artifact: u32,
    pub entry: Meta,
}

/// A blob on local disk whose sha256 is `desc.digest`.
#[derive(Debug, Clone)]
pub struct Blob {
    pub desc: OciDescriptor,
    pub path: PathBuf,
}

/// An entry made ready to leave this machine.
#[derive(Debug)]
pub struct Prepared {
    pub manifest: OciImageManifest,
    /// The manifest as sent; its sha256 is the manifest digest.
    pub manifest_bytes: Vec<u8>,
    pub config: Vec<u8>,
    pub config_desc: OciDescriptor,
    pub layers: Vec<Blob>,
    /// Payload bytes before compression.
    pub raw_bytes: u64,
}

impl Prepared {
    /// Bytes of all blobs as sent (compressed where it paid).
    pub fn wire_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|b| u64::try_from(b.desc.size).unwrap_or(0))
            .sum::<u64>()
            + self.config.len() as u64
            + self.manifest_bytes.len() as u64
    }
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A layer's blob: its media type, title, digest and size, and where it is.
fn layer(media_type: &str, title: &str, digest: String, size: i64, path: PathBuf) -> Blob {
    Blob {
        desc: OciDescriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: None,
            artifact_type: None,
            annotations: Some(BTreeMap::from([(TITLE.to_string(), title.to_string())])),
        },
        path,
    }
}

/// A file's sha256 digest and size.
fn file_sha256(path: &Path) -> Result<(String, u64), RemoteError> {
    let mut hashing = Hashing {
        inner: io::sink(),
        hash: Sha256::new(),
        len: 0,
    };
    File::open(path)
        .and_then(|mut f| io::copy(&mut f, &mut hashing))
        .map_err(io_err(path))?;
    let digest = format!("sha256:{}", hex::encode(hashing.hash.finalize()));
    Ok((digest, hashing.len))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RemoteError + '_ {
    move |source| RemoteError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Builds the artifact of `entry` (with its working set, if one was learned);
/// compressed layers are written under `scratch` (which must outlive the
/// result), raw ones point into the entry.
pub fn prepare(
    entry: &Entry,
    working_set: Option<&[u8]>,
    scratch: &Path,
) -> Result<Prepared, RemoteError> {
    let data = entry.data_dir();
    let mut layers = Vec::new();
    let mut index = super::frames::Index {
        frame_bytes: super::frames::FRAME as u64,
        ..Default::default()
    };
    // The small files first, in one blob.
    let small: Vec<&cache::FileSum> = entry
        .meta
        .files
        .iter()
        .filter(|f| bundle::holds(f))
        .collect();
    if !small.is_empty() {
        let path = scratch.join(bundle::TITLE);
        bundle::pack(&data, &small, &path, ZSTD_LEVEL).map_err(io_err(&path))?;
        let (digest, size) = file_sha256(&path)?;
        layers.push(layer(
            bundle::BUNDLE_TYPE,
            bundle::TITLE,
            digest,
            i64::try_from(size).unwrap_or(i64::MAX),
            path,
        ));
    }
    for (i, file) in entry.meta.files.iter().enumerate() {
        if bundle::holds(file) {
            continue;
        }
        let src = data.join(&file.path);
        let packed = scratch.join(format!("{i}.zst"));
        // One read: the raw file's sha256 and its compressed form together,
        // in frames a puller decompresses on every core (see `frames`).
        let mut input = File::open(&src).map_err(io_err(&src))?;
        let out = File::create(&packed).map_err(io_err(&packed))?;
        let mut raw_hash = Sha256::new();
        let mut hashing = Hashing {
            inner: io::BufWriter::with_capacity(1 << 20, out),
            hash: Sha256::new(),
            len: 0,
        };
        let mut framed = Vec::new();
        let raw_len = super::frames::compress(
            &mut input,
            &mut hashing,
            ZSTD_LEVEL,
            &mut |c| raw_hash.update(c),
            &mut |f| framed.push((f.len() as u64, hex::encode(Sha256::digest(f)))),
        )
        .and_then(|n| hashing.flush().map(|()| n))
        .map_err(io_err(&packed))?;
        if raw_len != file.size {
            return Err(RemoteError::Damaged(format!(
                "{}: size {raw_len}, recorded {}",
                file.path, file.size
            )));
        }
        let (media_type, digest, size, path) = if hashing.len * 10 <= raw_len * 9 {
            let digest = hex::encode(hashing.hash.finalize());
            if is_page_file(&file.path) {
                index.files.insert(
                    file.path.clone(),
                    super::frames::FramedFile {
                        digest: format!("sha256:{digest}"),
                        frames: framed,
                    },
                );
            }
            (FILE_ZSTD_TYPE, digest, hashing.len, packed)
        } else {
            let _ = fs::remove_file(&packed);
            (FILE_TYPE, hex::encode(raw_hash.finalize()), raw_len, src)
        };
        layers.push(layer(
            media_type,
            &file.path,
            format!("sha256:{digest}"),
            i64::try_from(size).unwrap_or(i64::MAX),
            path,
        ));
    }
    // What a fresh node reads before its restore can start, in one blob
    // (a sandboxed image too: a node whose CRIU can give the sandbox a
    // userfaultfd restores it lazily; the others pull whole and skip it).
    let ws = working_set.and_then(parse_working_set);
    let first: Vec<first_pages::Range> =
        crate::restore::working_set::file_ranges(&data, ws.as_ref())
            .into_iter()
            .filter_map(|(p, off, len)| {
                let name = p.file_name()?.to_str()?.to_string();
                index.files.contains_key(&name).then_some((name, off, len))
            })
            .collect();
    if !first.is_empty() {
        let path = scratch.join(first_pages::TITLE);
        first_pages::pack(&data, &first, &path, ZSTD_LEVEL).map_err(io_err(&path))?;
        let (digest, size) = file_sha256(&path)?;
        layers.push(layer(
            first_pages::FIRST_PAGES_TYPE,
            first_pages::TITLE,
            digest,
            i64::try_from(size).unwrap_or(i64::MAX),
            path,
        ));
    }
    if !index.files.is_empty() {
        let bytes = serde_json::to_vec(&index).expect("the frame index serializes");
        let path = scratch.join(FRAMES_TITLE);
        fs::write(&path, &bytes).map_err(io_err(&path))?;
        layers.push(layer(
            FRAMES_TYPE,
            FRAMES_TITLE,
            sha256_digest(&bytes),
            i64::try_from(bytes.len()).unwrap_or(i64::MAX),
            path,
        ));
    }
    if let Some(ws) = working_set {
        let path = scratch.join(WORKING_SET_TITLE);
        fs::write(&path, ws).map_err(io_err(&path))?;
        layers.push(layer(
            WORKING_SET_TYPE,
            WORKING_SET_TITLE,
            sha256_digest(ws),
            i64::try_from(ws.len()).unwrap_or(i64::MAX),
            path,
        ));
    }
    let config = serde_json::to_vec(&Config {
        warmer_artifact: ARTIFACT_VERSION,
        entry: Meta {
            origin: None,
            ..entry.meta.clone()
        },
    })
    .expect("config serializes");
    let config_desc = OciDescriptor {
        media_type: CONFIG_TYPE.into(),
        digest: sha256_digest(&config),
        size: config.len() as i64,
        urls: None,
        artifact_type: None,
        annotations: None,
    };
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.into()),
        config: config_desc.clone(),
        layers: layers.iter().map(|b| b.desc.clone()).collect(),
        subject: None,
        artifact_type: Some(ARTIFACT_TYPE.into()),
        annotations: Some(BTreeMap::from([
            (
                "org.opencontainers.image.created".to_string(),
                entry.meta.created.clone(),
            ),
            ("vnd.warmer.service".to_string(), entry.meta.service.clone()),
            (
                "vnd.warmer.generation".to_string(),
                entry.meta.generation.to_string(),
            ),
        ])),
    };
    let manifest_bytes = serde_json::to_vec(&manifest).expect("manifest serializes");
    Ok(Prepared {
        manifest,
        manifest_bytes,
        config,
        config_desc,
        layers,
        raw_bytes: entry.meta.bytes,
    })
}

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

/// A layer's file path: relative, plain components only.
pub fn title(layer: &OciDescriptor) -> Result<&str, RemoteError> {
    let t = layer
        .annotations
        .as_ref()
        .and_then(|a| a.get(TITLE))
        .ok_or_else(|| RemoteError::NotOurs(format!("layer {} has no title", layer.digest)))?;
    if !plain_path(t) {
        return Err(RemoteError::NotOurs(format!("layer title {t:?}")));
    }
    Ok(t)
}

/// A plain file name (CRIU's images, restore.json), or one under `state/`
/// (captured state paths): nothing else is an image file's path.
pub fn plain_path(t: &str) -> bool {
    let path = Path::new(t);
    let normal = !t.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    normal && (path.components().count() == 1 || t.starts_with("state/"))
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
    /// (see `super::stream`).
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
        super::frames::unpack(blob, out, limit, super::frames::threads())
    } else {
        let mut out = out;
        File::open(blob).and_then(|input| io::copy(&mut input.take(limit + 1), &mut out))
    }
    .map_err(|e| unpack_err(layer, dest, e))?;
    check_unpacked(layer, copied, limit)
}

/// A failure writing a payload file: a full disk is the disk's, anything
/// else the image's.
pub(super) fn unpack_err(layer: &OciDescriptor, dest: &Path, e: io::Error) -> RemoteError {
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
            // (`super::stream`).
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn host_differences_name_what_differs() {
        let here = map(&[
            ("kernel", "6.18"),
            ("criu_version", "4.2.1"),
            ("cpu_flags", "avx fpu sse"),
        ]);
        assert!(host_differences(&here, &here).is_empty());
        let image = map(&[
            ("kernel", "6.1"),
            ("criu_version", "4.2.1"),
            ("cpu_flags", "avx avx512f fpu sse"),
        ]);
        let d = host_differences(&image, &here);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].contains("lacks 1 (avx512f)"), "{d:?}");
        assert_eq!(d[1], "kernel: image 6.1, here 6.18");
    }

    #[test]
    fn titles_must_be_plain_relative_paths() {
        let desc = |t: &str| OciDescriptor {
            media_type: FILE_TYPE.into(),
            digest: "sha256:00".into(),
            size: 1,
            urls: None,
            artifact_type: None,
            annotations: Some(BTreeMap::from([(TITLE.to_string(), t.to_string())])),
        };
        assert_eq!(title(&desc("pages-1.img")).unwrap(), "pages-1.img");
        assert_eq!(title(&desc("state/0/db")).unwrap(), "state/0/db");
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "./a",
            "sub/x.img",
            "state/../x",
        ] {
            assert!(title(&desc(bad)).is_err(), "{bad:?}");
        }
    }

    /// A published entry of `files` in a cache of its own.
    fn entry_of(dir: &Path, files: &[(&str, Vec<u8>)]) -> (Cache, Entry) {
        let cache = Cache::open(dir.join("made")).unwrap();
        let staging = cache.stage().unwrap();
        for (path, bytes) in files {
            let dest = staging.data_dir().join(path);
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            fs::write(dest, bytes).unwrap();
        }
        let entry = cache
            .publish(
                staging,
                cache::NewEntry {
                    service: "web".into(),
                    digest: "ab".repeat(32),
                    ..Default::default()
                },
            )
            .unwrap();
        (cache, entry)
    }

    /// Stages `manifest`'s layers from `blobs` (as a pull would, every
    /// blob at hand) into a fresh cache; publishes them.
    fn install_from(
        dir: &Path,
        config: &Config,
        manifest: &OciImageManifest,
        blobs: &BTreeMap<String, PathBuf>,
    ) -> Result<Entry, RemoteError> {
        let cache = Cache::open(dir.join("pulled")).unwrap();
        let mut fetch = |layer: &OciDescriptor, _: Option<Target<'_>>| {
            Ok(Fetched::Blob(blobs[&layer.digest].clone()))
        };
        install(&cache, config, manifest, &mut fetch, "test".into())
    }

    fn image_files() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("core-1.img", b"core".to_vec()),
            ("pstree.img", vec![1, 2, 3]),
            ("pagemap-1.img", vec![9; 300]),
            // Page files and big files are layers of their own.
            ("pages-1.img", vec![7; 300 << 10]),
            (
                "big.img",
                (0..300u32 << 10).map(|i| (i % 251) as u8).collect(),
            ),
            ("state/0/db", b"rows".to_vec()),
        ]
    }

    #[test]
    fn an_image_travels_with_its_small_files_in_one_bundle_and_comes_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let files = image_files();
        let (_, entry) = entry_of(dir.path(), &files);
        let scratch = dir.path().join("scratch");
        fs::create_dir_all(&scratch).unwrap();
        let prepared = prepare(&entry, None, &scratch).unwrap();
        let kinds: Vec<(&str, &str)> = prepared
            .manifest
            .layers
            .iter()
            .map(|l| (l.media_type.as_str(), title(l).unwrap()))
            .collect();
        assert_eq!(kinds[0], (bundle::BUNDLE_TYPE, bundle::TITLE), "{kinds:?}");
        let own: BTreeSet<&str> = kinds[1..].iter().map(|k| k.1).collect();
        assert!(
            own.contains("pages-1.img") && own.contains("big.img"),
            "{kinds:?}"
        );
        assert_eq!(kinds.len(), 1 + own.len(), "{kinds:?}");
        check_manifest(&prepared.manifest).unwrap();
        let config = parse_config(&prepared.config).unwrap();
        let blobs = prepared
            .layers
            .iter()
            .map(|b| (b.desc.digest.clone(), b.path.clone()))
            .collect();
        let got = install_from(dir.path(), &config, &prepared.manifest, &blobs).unwrap();
        for (path, bytes) in &files {
            assert_eq!(
                &fs::read(got.data_dir().join(path)).unwrap(),
                bytes,
                "{path}"
            );
        }
    }

    #[test]
    fn an_image_of_one_layer_per_file_an_older_warmer_pushed_still_installs() {
        let dir = tempfile::tempdir().unwrap();
        let files = image_files();
        let (_, entry) = entry_of(dir.path(), &files);
        let config = Config {
            warmer_artifact: ARTIFACT_VERSION,
            entry: entry.meta.clone(),
        };
        let mut blobs = BTreeMap::new();
        let mut layers = Vec::new();
        for f in &entry.meta.files {
            let path = entry.data_dir().join(&f.path);
            let (digest, size) = file_sha256(&path).unwrap();
            blobs.insert(digest.clone(), path);
            layers.push(OciDescriptor {
                media_type: FILE_TYPE.into(),
                digest,
                size: size as i64,
                urls: None,
                artifact_type: None,
                annotations: Some(BTreeMap::from([(TITLE.to_string(), f.path.clone())])),
            });
        }
        let scratch = dir.path().join("scratch");
        fs::create_dir_all(&scratch).unwrap();
        let mut manifest = prepare(&entry, None, &scratch).unwrap().manifest;
        manifest.layers = layers.clone();
        let got = install_from(dir.path(), &config, &manifest, &blobs).unwrap();
        for (path, bytes) in &files {
            assert_eq!(
                &fs::read(got.data_dir().join(path)).unwrap(),
                bytes,
                "{path}"
            );
        }
        // A manifest that leaves a recorded file out is refused before
        // anything could restore from it.
        manifest.layers = layers[1..].to_vec();
        let err = install_from(&dir.path().join("again"), &config, &manifest, &blobs)
            .unwrap_err()
            .to_string();
        assert!(err.contains("in no layer"), "{err}");
    }

    #[test]
    fn foreign_manifests_are_refused() {
        let m = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:00","size":2},"layers":[]}"#;
        let e = parse_manifest(m).unwrap_err().to_string();
        assert!(e.contains("config media type"), "{e}");
        assert!(parse_config(br#"{"warmer_artifact":9,"entry":{}}"#).is_err());
    }
}
