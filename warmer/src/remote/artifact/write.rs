//! An entry made into an artifact: its layers (compressed where it pays),
//! config and manifest.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use cache::{Entry, Meta};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use sha2::{Digest as _, Sha256};

use super::*;
use crate::remote::{bundle, first_pages, RemoteError};

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
pub(super) fn file_sha256(path: &Path) -> Result<(String, u64), RemoteError> {
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
    let mut index = crate::remote::frames::Index {
        frame_bytes: crate::remote::frames::FRAME as u64,
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
        let raw_len = crate::remote::frames::compress(
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
                    crate::remote::frames::FramedFile {
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
