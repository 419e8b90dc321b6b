//! Push and pull over the OCI distribution API.
//!
//! A [`Registry`] is one `remote.repository` with its credentials and a
//! current-thread tokio runtime of its own (warmer is otherwise synchronous).
//! Every request has a connect bound and a stall bound; a whole pull has the
//! caller's deadline. Downloads land in the cache's `incoming/<digest>/`: a
//! blob is renamed into place only once its sha256 matched, and a pull that
//! broke off continues where it stopped (HTTP range requests), so even a
//! start whose bound cuts a big pull short leaves the next one further on.

use std::fs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cache::{Cache, Entry};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::artifact::{self, Config};
use super::sign::{self, Signer, Verifier};
use super::transfer::{download, file_chunks, Capped};
use super::{auth, frames, Progress, RemoteError};
use crate::manifest::Remote;

/// Connecting to a registry that is down or unroutable gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A transfer that delivers nothing for this long is abandoned.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Upload chunk size (a PATCH each).
pub(super) const PUSH_CHUNK: usize = 8 << 20;

pub struct Registry {
    /// Shared with the frames a streaming restore still fetches after the
    /// pull returned (`super::stream`).
    pub(super) rt: std::sync::Arc<tokio::runtime::Runtime>,
    pub(super) client: Client,
    /// For the documents read with a size bound (manifests): the registry
    /// client reads a manifest whole, whatever its size.
    pub(super) http: reqwest::Client,
    pub(super) insecure: bool,
    pub(super) auth: RegistryAuth,
    pub(super) repository: String,
}

/// What a push sent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    pub reference: String,
    pub manifest_digest: String,
    /// Payload bytes, uncompressed.
    pub raw_bytes: u64,
    /// Bytes of all blobs as stored (compressed where it paid).
    pub wire_bytes: u64,
    /// Of those, bytes actually uploaded (blobs the registry lacked).
    pub sent_bytes: u64,
    pub blobs: usize,
    pub blobs_present: usize,
    /// A cosign signature was pushed with it.
    pub signed: bool,
    pub ms: u64,
}

/// An image's manifest and config, verified.
pub(super) struct Head {
    pub reference: Reference,
    pub manifest: oci_client::manifest::OciImageManifest,
    pub manifest_digest: String,
    pub config: Config,
}

/// What a pull fetched.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pulled {
    pub key: String,
    pub reference: String,
    pub manifest_digest: String,
    /// Bytes downloaded now (resumed blobs count only the rest).
    pub fetched_bytes: u64,
    pub raw_bytes: u64,
    pub ms: u64,
}

pub(super) fn registry_err(
    what: impl Into<String>,
) -> impl FnOnce(OciDistributionError) -> RemoteError {
    let what = what.into();
    move |e| RemoteError::Registry {
        what,
        source: Box::new(e),
    }
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RemoteError + '_ {
    move |source| RemoteError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Blobs below this size are fetched before the others, several at once.
const SMALL_BLOB: u64 = 1 << 20;
/// How many small blobs are fetched at once.
const PARALLEL_BLOBS: usize = 8;

/// Runs `fut` to completion unless `deadline` passes first.
fn bounded<T>(
    rt: &tokio::runtime::Runtime,
    deadline: Option<(Instant, Duration)>,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, RemoteError>>,
) -> Result<T, RemoteError> {
    match deadline {
        None => rt.block_on(fut),
        Some((at, limit)) => {
            let left = at.saturating_duration_since(Instant::now());
            rt.block_on(async { tokio::time::timeout(left, fut).await })
                .unwrap_or_else(|_| {
                    Err(RemoteError::Timeout {
                        what: what.to_string(),
                        limit,
                    })
                })
        }
    }
}

impl Registry {
    pub fn new(remote: &Remote) -> Result<Self, RemoteError> {
        let (config, host) = Self::client_config(remote)?;
        let mut http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(STALL_TIMEOUT)
            .user_agent(concat!("warmer/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(3));
        for c in &config.extra_root_certificates {
            let cert = reqwest::Certificate::from_pem(&c.data).map_err(|e| RemoteError::Io {
                path: remote.ca_file.clone().unwrap_or_default(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            })?;
            http = http.add_root_certificate(cert);
        }
        let http = http.build().map_err(|e| RemoteError::Io {
            path: PathBuf::from("http client"),
            source: std::io::Error::other(e.to_string()),
        })?;
        let client = Client::try_from(config).map_err(registry_err("client setup"))?;
        let auth = auth::credentials(&host)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("registry")
            .enable_all()
            .build()
            .map_err(io_err(Path::new("tokio runtime")))?;
        let rt = std::sync::Arc::new(rt);
        Ok(Self {
            rt,
            client,
            http,
            insecure: remote.insecure,
            auth,
            repository: remote.repository.clone(),
        })
    }

    /// The registry client's configuration for `remote`, and its host.
    pub(super) fn client_config(remote: &Remote) -> Result<(ClientConfig, String), RemoteError> {
        let reference = Self::parse_ref(&remote.repository, "latest")?;
        let host = reference.resolve_registry().to_string();
        let mut extra_root_certificates = Vec::new();
        if let Some(ca) = &remote.ca_file {
            let data = fs::read(ca).map_err(io_err(ca))?;
            extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let config = ClientConfig {
            protocol: if remote.insecure {
                ClientProtocol::HttpsExcept(vec![host.clone()])
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(STALL_TIMEOUT),
            user_agent: concat!("warmer/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        Ok((config, host))
    }

    pub(super) fn parse_ref(repository: &str, tag: &str) -> Result<Reference, RemoteError> {
        super::reference::Repository::parse(repository)
            .and_then(|r| r.tagged(tag))
            .map_err(|why| RemoteError::Repository {
                repository: repository.to_string(),
                why,
            })
    }

    /// The reference of `digest`'s image: the repository, tagged with it.
    pub fn reference(&self, digest: &str) -> Result<Reference, RemoteError> {
        Self::parse_ref(&self.repository, digest)
    }

    /// Uploads `entry` as the image tagged with its digest, and with a
    /// `signer`, its cosign signature. Blobs the registry already has are
    /// not sent again.
    pub fn push(
        &self,
        entry: &Entry,
        working_set: Option<&[u8]>,
        scratch: &Path,
        signer: Option<&Signer>,
        progress: Progress,
    ) -> Result<Pushed, RemoteError> {
        let t = Instant::now();
        let reference = self.reference(&entry.meta.digest)?;
        progress(&format!(
            "preparing {} ({} MB in {} files)",
            entry.key,
            entry.meta.bytes / 1_000_000,
            entry.meta.files.len()
        ));
        let prepared = artifact::prepare(entry, working_set, scratch)?;
        let mut sent = 0u64;
        let mut present = 0usize;
        let client = &self.client;
        self.rt.block_on(async {
            client
                .store_auth_if_needed(reference.resolve_registry(), &self.auth)
                .await;
            let blobs = prepared.layers.len();
            for (i, blob) in prepared.layers.iter().enumerate() {
                let size = u64::try_from(blob.desc.size).unwrap_or(0);
                if client
                    .blob_exists(&reference, &blob.desc.digest)
                    .await
                    .map_err(registry_err(format!("check of blob {}", blob.desc.digest)))?
                {
                    present += 1;
                    continue;
                }
                if size > 16 << 20 {
                    progress(&format!(
                        "uploading {}/{blobs}: {} MB",
                        i + 1,
                        size / 1_000_000
                    ));
                }
                let chunks = file_chunks(&blob.path)?;
                client
                    .push_blob_stream(&reference, chunks, &blob.desc.digest, Some(size))
                    .await
                    .map_err(registry_err(format!("upload of blob {}", blob.desc.digest)))?;
                sent += size;
            }
            if !client
                .blob_exists(&reference, &prepared.config_desc.digest)
                .await
                .map_err(registry_err("check of the config"))?
            {
                client
                    .push_blob(
                        &reference,
                        prepared.config.clone(),
                        &prepared.config_desc.digest,
                    )
                    .await
                    .map_err(registry_err("upload of the config"))?;
            }
            // The signature first: once the image's tag appears, a node that
            // pulls it finds its signature too.
            if let Some(signer) = signer {
                let digest = artifact::sha256_digest(&prepared.manifest_bytes);
                self.push_signature(&digest, signer).await?;
            }
            client
                .push_manifest_raw(
                    &reference,
                    prepared.manifest_bytes.clone(),
                    OCI_IMAGE_MEDIA_TYPE.parse().expect("valid header value"),
                )
                .await
                .map_err(registry_err("upload of the manifest"))?;
            Ok::<(), RemoteError>(())
        })?;
        Ok(Pushed {
            reference: reference.whole(),
            manifest_digest: artifact::sha256_digest(&prepared.manifest_bytes),
            raw_bytes: prepared.raw_bytes,
            wire_bytes: prepared.wire_bytes(),
            sent_bytes: sent,
            blobs: prepared.layers.len(),
            blobs_present: present,
            signed: signer.is_some(),
            ms: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Whether the registry has an image tagged with `digest` (a HEAD).
    pub fn has(&self, digest: &str) -> Result<bool, RemoteError> {
        let reference = self.reference(digest)?;
        let limit = STALL_TIMEOUT;
        bounded(
            &self.rt,
            Some((crate::process::clock::deadline(limit), limit)),
            "lookup",
            async {
                match self
                    .client
                    .fetch_manifest_digest(&reference, &self.auth)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if not_found(&e) => Ok(false),
                    Err(e) => Err(registry_err(format!("lookup of {}", reference.whole()))(e)),
                }
            },
        )
    }

    /// Fetches `digest`'s image into `cache` as a new generation, all of it
    /// within `limit` if given. `check` sees the image's config before any
    /// layer is fetched (digest, host facts). The caller holds the service's
    /// cache lock. `Err(NotFound)`: the registry has no such image.
    pub fn pull(
        &self,
        cache: &Cache,
        digest: &str,
        limit: Option<Duration>,
        keys: &[Verifier],
        check: &dyn Fn(&Config) -> Result<(), RemoteError>,
        progress: Progress,
    ) -> Result<Pulled, RemoteError> {
        let t = Instant::now();
        let deadline = limit.map(|l| (t + l, l));
        let head = self.head(digest, deadline, keys, check, progress)?;
        self.fetch_all(cache, digest, head, t, deadline, progress)
    }

    /// The image's manifest (signed by one of `keys`) and config (checked
    /// by `check`), within `deadline`.
    pub(super) fn head(
        &self,
        digest: &str,
        deadline: Option<(Instant, Duration)>,
        keys: &[Verifier],
        check: &dyn Fn(&Config) -> Result<(), RemoteError>,
        progress: Progress,
    ) -> Result<Head, RemoteError> {
        let reference = self.reference(digest)?;
        let client = &self.client;
        let (manifest_bytes, manifest_digest) = bounded(&self.rt, deadline, "lookup", async {
            client
                .store_auth_if_needed(reference.resolve_registry(), &self.auth)
                .await;
            self.manifest_bounded(&reference)
                .await?
                .ok_or_else(|| RemoteError::NotFound(reference.whole()))
        })?;
        // Nothing of the image is used before a trusted key's signature of
        // exactly this manifest is found.
        if keys.is_empty() {
            return Err(RemoteError::Rejected(sign::Rejected::NoKeys));
        }
        let signatures = bounded(
            &self.rt,
            deadline,
            "signature lookup",
            self.signatures(&manifest_digest),
        )?;
        let signer = sign::check(keys, &manifest_digest, &signatures)?;
        progress(&format!("signed by {}", signer.display()));
        let manifest = artifact::parse_manifest(&manifest_bytes)?;
        let mut config_bytes =
            Capped::new(usize::try_from(artifact::MAX_CONFIG_BYTES).unwrap_or(usize::MAX));
        bounded(&self.rt, deadline, "config download", async {
            client
                .pull_blob(&reference, &manifest.config, &mut config_bytes)
                .await
                .map_err(|e| blob_err(&manifest.config, e))
        })?;
        let config = artifact::parse_config(&config_bytes.buf)?;
        if config.entry.digest != digest {
            return Err(RemoteError::WrongDigest {
                expected: digest.to_string(),
                found: config.entry.digest,
            });
        }
        check(&config)?;
        Ok(Head {
            reference,
            manifest,
            manifest_digest,
            config,
        })
    }

    /// The small blobs among `layers` into `incoming`, many at once: a
    /// registry answers each after a round trip or two, which one by one
    /// added up to most of a pull of a 20-file image (a few ms each). Returns
    /// the bytes fetched now.
    pub(super) fn prefetch_small(
        &self,
        reference: &Reference,
        layers: &[OciDescriptor],
        incoming: &Path,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<u64, RemoteError> {
        let client = &self.client;
        bounded(&self.rt, deadline, "download", async {
            use futures_util::{StreamExt as _, TryStreamExt as _};
            futures_util::stream::iter(
                layers
                    .iter()
                    .filter(|l| u64::try_from(l.size).is_ok_and(|n| n < SMALL_BLOB))
                    // Read only by a restore that begins before the pull ends,
                    // which fetches them itself (`super::stream`).
                    .filter(|l| {
                        l.media_type != artifact::FRAMES_TYPE
                            && l.media_type != super::first_pages::FIRST_PAGES_TYPE
                    })
                    .map(|l| download(client, reference, l, incoming, None)),
            )
            .buffer_unordered(PARALLEL_BLOBS)
            .try_fold(0u64, |n, d| async move { Ok(n + d.fetched) })
            .await
        })
    }

    /// One layer into `incoming`, within `deadline`; a compressed file is
    /// decompressed into `target` while it downloads (its frames on every
    /// core), and counts only once its digest held. Also returns the bytes
    /// fetched now.
    pub(super) fn fetch_layer(
        &self,
        reference: &Reference,
        layer: &OciDescriptor,
        incoming: &Path,
        target: Option<artifact::Target<'_>>,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<(artifact::Fetched, u64), RemoteError> {
        let size = u64::try_from(layer.size).unwrap_or(0);
        let mut sink = match &target {
            Some(t) if layer.media_type == artifact::FILE_ZSTD_TYPE && size >= SMALL_BLOB => t
                .out
                .try_clone()
                .and_then(|out| frames::Sink::new(out, t.limit, frames::threads()))
                .ok(),
            _ => None,
        };
        let got = bounded(
            &self.rt,
            deadline,
            "download",
            download(&self.client, reference, layer, incoming, sink.as_mut()),
        )?;
        if let Some(sink) = sink {
            let written = sink.finish();
            if got.streamed {
                match written {
                    Ok(Some(n)) => return Ok((artifact::Fetched::Unpacked(n), got.fetched)),
                    Ok(None) => {}
                    Err(e) => {
                        return Err(artifact::unpack_err(
                            layer,
                            Path::new(artifact::title(layer)?),
                            e,
                        ))
                    }
                }
            }
        }
        Ok((artifact::Fetched::Blob(got.path), got.fetched))
    }

    /// Fetches every layer of `head` and adds the image to `cache`.
    pub(super) fn fetch_all(
        &self,
        cache: &Cache,
        digest: &str,
        head: Head,
        t: Instant,
        deadline: Option<(Instant, Duration)>,
        progress: Progress,
    ) -> Result<Pulled, RemoteError> {
        let Head {
            reference,
            manifest,
            manifest_digest,
            config,
        } = head;
        let incoming = cache.incoming(digest).map_err(RemoteError::Cache)?;
        let total: u64 = manifest
            .layers
            .iter()
            .map(|l| u64::try_from(l.size).unwrap_or(0))
            .sum();
        let mut fetched = self.prefetch_small(&reference, &manifest.layers, &incoming, deadline)?;
        let count = manifest.layers.len();
        let mut done = 0usize;
        let mut fetch = |layer: &OciDescriptor,
                         target: Option<artifact::Target<'_>>|
         -> Result<artifact::Fetched, RemoteError> {
            done += 1;
            let size = u64::try_from(layer.size).unwrap_or(0);
            if size > 16 << 20 {
                progress(&format!(
                    "downloading {done}/{count}: {} MB of {} MB",
                    size / 1_000_000,
                    total / 1_000_000
                ));
            }
            let (got, n) = self.fetch_layer(&reference, layer, &incoming, target, deadline)?;
            fetched += n;
            Ok(got)
        };
        let origin = format!("{}@{manifest_digest}", reference.whole());
        let entry = artifact::install(cache, &config, &manifest, &mut fetch, origin)?;
        let _ = cache.drop_incoming(digest);
        Ok(Pulled {
            key: entry.key,
            reference: reference.whole(),
            manifest_digest,
            fetched_bytes: fetched,
            raw_bytes: entry.meta.bytes,
            ms: u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// The registry says it has no such image (or repository).
fn not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                oci_client::errors::OciErrorCode::ManifestUnknown
                    | oci_client::errors::OciErrorCode::NameUnknown
            )
        }),
        OciDistributionError::ServerError { code, .. } => *code == 404,
        _ => false,
    }
}

pub(super) fn blob_err(layer: &OciDescriptor, e: OciDistributionError) -> RemoteError {
    match e {
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
            expected,
            actual,
        }) => RemoteError::Tampered {
            expected,
            found: actual,
        },
        e => registry_err(format!("download of blob {}", layer.digest))(e),
    }
}
