//! `warmer export` / `warmer import`: the registry's artifact in an OCI
//! image layout tarball (`oci-layout`, `index.json`, `blobs/sha256/...`),
//! for machines without a registry between them. Layers are compressed
//! inside (zstd, where it pays); the tar around them is not. Tools that
//! read OCI layouts (`oras`, `skopeo copy oci-archive:...`) can carry it on
//! into a registry.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cache::{Cache, Entry};
use oci_client::manifest::{OciDescriptor, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::artifact::{self, Config};
use super::sign::{self, Signer};
use super::RemoteError;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// `index.json` and `oci-layout` are small.
const MAX_SMALL: u64 = 1 << 20;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    manifests: Vec<IndexEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    pub key: String,
    pub path: PathBuf,
    pub raw_bytes: u64,
    pub archive_bytes: u64,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RemoteError + '_ {
    move |source| RemoteError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn append(
    tar: &mut tar::Builder<impl Write>,
    name: &str,
    size: u64,
    mtime: u64,
    data: impl Read,
    out: &Path,
) -> Result<(), RemoteError> {
    let mut header = tar::Header::new_ustar();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, name, data)
        .map_err(io_err(out))
}

/// Writes `entry` as an OCI layout tarball to `out` (atomically; mode 0600:
/// an image holds the service's memory, secrets included).
/// `signer`: the key and the identity (a repository) to sign the image with;
/// the signature travels in the archive beside it, as cosign's artifact.
pub fn export(
    entry: &Entry,
    working_set: Option<&[u8]>,
    scratch: &Path,
    out: &Path,
    signer: Option<(&Signer, &str)>,
) -> Result<Exported, RemoteError> {
    let prepared = artifact::prepare(entry, working_set, scratch)?;
    let manifest_digest = artifact::sha256_digest(&prepared.manifest_bytes);
    let signature = signer
        .map(|(s, identity)| sign::Artifact::new(s, identity, &manifest_digest))
        .transpose()?;
    let mut manifests = vec![IndexEntry {
        media_type: OCI_IMAGE_MEDIA_TYPE.into(),
        digest: manifest_digest.clone(),
        size: prepared.manifest_bytes.len() as i64,
        artifact_type: Some(artifact::ARTIFACT_TYPE.into()),
        annotations: Some(BTreeMap::from([(
            REF_NAME.to_string(),
            entry.meta.digest.clone(),
        )])),
    }];
    if let Some(sig) = &signature {
        manifests.push(IndexEntry {
            media_type: OCI_IMAGE_MEDIA_TYPE.into(),
            digest: artifact::sha256_digest(&sig.manifest),
            size: sig.manifest.len() as i64,
            artifact_type: None,
            annotations: Some(BTreeMap::from([(
                REF_NAME.to_string(),
                sign::signature_tag(&manifest_digest),
            )])),
        });
    }
    let index = Index {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.into()),
        manifests,
    };
    let index = serde_json::to_vec(&index).expect("index serializes");
    let name = out
        .file_name()
        .ok_or_else(|| RemoteError::NotAFileName(out.to_path_buf()))?;
    let tmp = out.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let mtime = entry.meta.created_unix;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let result = (|| {
        append(
            &mut tar,
            "oci-layout",
            layout.len() as u64,
            mtime,
            &layout[..],
            out,
        )?;
        append(
            &mut tar,
            "index.json",
            index.len() as u64,
            mtime,
            &index[..],
            out,
        )?;
        let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
        let m = &prepared.manifest_bytes;
        append(
            &mut tar,
            &blob(&manifest_digest),
            m.len() as u64,
            mtime,
            &m[..],
            out,
        )?;
        let c = &prepared.config;
        append(
            &mut tar,
            &blob(&prepared.config_desc.digest),
            c.len() as u64,
            mtime,
            &c[..],
            out,
        )?;
        if let Some(sig) = &signature {
            for bytes in [&sig.manifest, &sig.config, &sig.payload] {
                append(
                    &mut tar,
                    &blob(&artifact::sha256_digest(bytes)),
                    bytes.len() as u64,
                    mtime,
                    &bytes[..],
                    out,
                )?;
            }
        }
        let mut written = std::collections::BTreeSet::new();
        for layer in &prepared.layers {
            if !written.insert(layer.desc.digest.clone()) {
                continue;
            }
            let f = File::open(&layer.path).map_err(io_err(&layer.path))?;
            let size = f.metadata().map_err(io_err(&layer.path))?.len();
            append(&mut tar, &blob(&layer.desc.digest), size, mtime, f, out)?;
        }
        let w = tar.into_inner().map_err(io_err(out))?;
        let f = w.into_inner().map_err(|e| RemoteError::Io {
            path: out.to_path_buf(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(io_err(out))
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, out).map_err(io_err(out))?;
    let archive_bytes = fs::metadata(out).map_err(io_err(out))?.len();
    Ok(Exported {
        key: entry.key.clone(),
        path: out.to_path_buf(),
        raw_bytes: entry.meta.bytes,
        archive_bytes,
    })
}

/// An archive unpacked and checked: every blob matched its digest.
pub struct Unpacked {
    pub config: Config,
    pub manifest: oci_client::manifest::OciImageManifest,
    pub manifest_digest: String,
    /// cosign signatures of the image that came with it: (payload, base64).
    pub signatures: Vec<(Vec<u8>, String)>,
    blobs: PathBuf,
}

impl Unpacked {
    /// The verified local file of a layer.
    pub fn blob(&self, layer: &OciDescriptor) -> Result<PathBuf, RemoteError> {
        let hex = layer.digest.trim_start_matches("sha256:");
        let path = self.blobs.join(hex);
        let size = fs::metadata(&path).map(|m| m.len()).ok();
        if size != u64::try_from(layer.size).ok() {
            return Err(RemoteError::Damaged(format!(
                "blob {} is missing from the archive or has the wrong size",
                layer.digest
            )));
        }
        Ok(path)
    }
}

/// Unpacks `archive` into `scratch`, checking every blob against its name
/// as it is written; then reads the warmer image the index names.
pub fn unpack(archive: &Path, scratch: &Path) -> Result<Unpacked, RemoteError> {
    let file = File::open(archive).map_err(io_err(archive))?;
    let blobs = scratch.join("blobs");
    fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
    let mut index_bytes = None;
    let mut tar = tar::Archive::new(io::BufReader::new(file));
    for item in tar.entries().map_err(io_err(archive))? {
        let mut item = item.map_err(io_err(archive))?;
        let path = item.path().map_err(io_err(archive))?.into_owned();
        let name = path.to_string_lossy().trim_start_matches("./").to_string();
        let kind = item.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() {
            return Err(RemoteError::NotOurs(format!(
                "{name}: not a regular file in the archive"
            )));
        }
        if name == "index.json" {
            let mut buf = Vec::new();
            (&mut item)
                .take(MAX_SMALL + 1)
                .read_to_end(&mut buf)
                .map_err(io_err(archive))?;
            index_bytes = Some(buf);
            continue;
        }
        if name == "oci-layout" {
            continue;
        }
        let Some(hex) = name
            .strip_prefix("blobs/sha256/")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        else {
            return Err(RemoteError::NotOurs(format!(
                "unexpected file {name} in the archive"
            )));
        };
        let dest = blobs.join(hex);
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&dest)
            .map_err(io_err(&dest))?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = item.read(&mut buf).map_err(io_err(archive))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err(&dest))?;
        }
        let found = hex::encode(hash.finalize());
        if found != hex {
            return Err(RemoteError::Tampered {
                expected: format!("sha256:{hex}"),
                found: format!("sha256:{found}"),
            });
        }
    }
    let index_bytes =
        index_bytes.ok_or_else(|| RemoteError::NotOurs("no index.json in the archive".into()))?;
    let index: Index = serde_json::from_slice(&index_bytes)
        .map_err(|e| RemoteError::NotOurs(format!("index.json: {e}")))?;
    let chosen = index
        .manifests
        .iter()
        .find(|m| m.artifact_type.as_deref() == Some(artifact::ARTIFACT_TYPE))
        .or_else(|| index.manifests.first())
        .ok_or_else(|| RemoteError::NotOurs("index.json names no manifest".into()))?;
    let read_blob = |digest: &str, limit: u64| -> Result<Vec<u8>, RemoteError> {
        let path = blobs.join(digest.trim_start_matches("sha256:"));
        let md = fs::metadata(&path).map_err(|_| {
            RemoteError::Damaged(format!("blob {digest} is missing from the archive"))
        })?;
        if md.len() > limit {
            return Err(RemoteError::NotOurs(format!(
                "blob {digest} of {} bytes",
                md.len()
            )));
        }
        fs::read(&path).map_err(io_err(&path))
    };
    let manifest_bytes = read_blob(&chosen.digest, artifact::MAX_MANIFEST_BYTES as u64)?;
    let manifest = artifact::parse_manifest(&manifest_bytes)?;
    let config_bytes = read_blob(&manifest.config.digest, artifact::MAX_CONFIG_BYTES as u64)?;
    let config = artifact::parse_config(&config_bytes)?;
    let tag = sign::signature_tag(&chosen.digest);
    let signatures = match index.manifests.iter().find(|m| {
        m.annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .is_some_and(|r| *r == tag)
    }) {
        None => Vec::new(),
        Some(m) => {
            let bytes = read_blob(&m.digest, artifact::MAX_MANIFEST_BYTES as u64)?;
            let sig_manifest = sign::parse_manifest(&bytes)?;
            sign::signatures_in(&sig_manifest, &mut |layer| {
                read_blob(&layer.digest, sign::MAX_PAYLOAD).ok()
            })
        }
    };
    Ok(Unpacked {
        config,
        manifest,
        manifest_digest: chosen.digest.clone(),
        signatures,
        blobs,
    })
}

/// Adds an unpacked archive's image to the cache. The caller holds the
/// service's cache lock and has checked the config (host facts).
pub fn install(cache: &Cache, unpacked: &Unpacked, origin: String) -> Result<Entry, RemoteError> {
    artifact::install(
        cache,
        &unpacked.config,
        &unpacked.manifest,
        &mut |layer, _| unpacked.blob(layer).map(artifact::Fetched::Blob),
        origin,
    )
}
