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
//!
//! Writing one is `write.rs` ([`prepare`]); reading one back is `read.rs`.

use std::io;
use std::path::{Component, Path, PathBuf};

use cache::Meta;
use oci_client::manifest::OciDescriptor;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::RemoteError;

mod read;
mod write;

pub(super) use read::unpack_err;
pub use read::{
    check_manifest, host_differences, install, parse_config, parse_manifest, parse_working_set,
    publish, stage, Fetch, Fetched, Staged, Target,
};
pub use write::{prepare, Prepared};

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

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RemoteError + '_ {
    move |source| RemoteError::Io {
        path: path.to_path_buf(),
        source,
    }
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

#[cfg(test)]
mod tests {
    use super::write::file_sha256;
    use super::*;
    use crate::remote::bundle;
    use cache::{Cache, Entry};
    use oci_client::manifest::OciImageManifest;
    use std::collections::{BTreeMap, BTreeSet};
    use std::fs;

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
