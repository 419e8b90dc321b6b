//! The registry documents and blobs beyond what the client does for us:
//! manifests read with a size bound, cosign signatures stored and fetched
//! beside an image, blobs downloaded resumably and verified as they arrive,
//! files uploaded in chunks.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::registry::{blob_err, io_err, registry_err, Registry, PUSH_CHUNK};
use super::sign::{self, Signer};
use super::{artifact, RemoteError};

impl Registry {
    /// GETs the manifest `reference` names, reading at most
    /// [`artifact::MAX_MANIFEST_BYTES`] of it (a registry that answers with
    /// gigabytes is cut off there). `None`: there is none. Returns the bytes
    /// and their sha256 digest (the caller compares it with what it expects).
    pub(super) async fn manifest_bounded(
        &self,
        reference: &Reference,
    ) -> Result<Option<(Vec<u8>, String)>, RemoteError> {
        let what = format!("lookup of {}", reference.whole());
        let token = self
            .client
            .auth(reference, &self.auth, oci_client::RegistryOperation::Pull)
            .await
            .map_err(registry_err(what.clone()))?;
        let registry = reference.resolve_registry();
        let scheme = if self.insecure { "http" } else { "https" };
        let url = format!(
            "{scheme}://{registry}/v2/{}/manifests/{}",
            reference.repository(),
            reference.tag().unwrap_or("latest")
        );
        let mut req = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, OCI_IMAGE_MEDIA_TYPE);
        req = match (&token, &self.auth) {
            (Some(t), _) => req.bearer_auth(t),
            (None, RegistryAuth::Basic(u, p)) => req.basic_auth(u, Some(p)),
            _ => req,
        };
        let transport = |e: reqwest::Error| RemoteError::Io {
            path: PathBuf::from(&url),
            source: std::io::Error::other(e.to_string()),
        };
        let mut res = req.send().await.map_err(transport)?;
        if res.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !res.status().is_success() {
            return Err(RemoteError::Io {
                path: PathBuf::from(&url),
                source: std::io::Error::other(format!("the registry answered {}", res.status())),
            });
        }
        let limit = artifact::MAX_MANIFEST_BYTES;
        if res.content_length().is_some_and(|n| n > limit as u64) {
            return Err(RemoteError::NotOurs(format!(
                "a manifest of {} bytes (at most {limit} are read)",
                res.content_length().unwrap_or(0)
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > limit {
                return Err(RemoteError::NotOurs(format!(
                    "a manifest of more than {limit} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let digest = artifact::sha256_digest(&body);
        if let Some(said) = res
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            if said != digest {
                return Err(RemoteError::Tampered {
                    expected: said.to_string(),
                    found: digest,
                });
            }
        }
        Ok(Some((body, digest)))
    }

    /// Stores cosign's signature artifact of the image manifest
    /// `manifest_digest` (see [`super::sign`]).
    pub(super) async fn push_signature(
        &self,
        manifest_digest: &str,
        signer: &Signer,
    ) -> Result<(), RemoteError> {
        let reference = Self::parse_ref(&self.repository, &sign::signature_tag(manifest_digest))?;
        let sig = sign::Artifact::new(signer, &self.repository, manifest_digest)?;
        let (payload, payload_digest, config, config_digest, manifest) = (
            sig.payload,
            sig.payload_digest,
            sig.config,
            sig.config_digest,
            sig.manifest,
        );
        let client = &self.client;
        client
            .push_blob(&reference, payload, &payload_digest)
            .await
            .map_err(registry_err("upload of the signature"))?;
        client
            .push_blob(&reference, config, &config_digest)
            .await
            .map_err(registry_err("upload of the signature's config"))?;
        client
            .push_manifest_raw(
                &reference,
                manifest,
                OCI_IMAGE_MEDIA_TYPE.parse().expect("valid header value"),
            )
            .await
            .map_err(registry_err("upload of the signature's manifest"))?;
        Ok(())
    }

    /// The (payload, signature) pairs stored as cosign signatures of the
    /// image manifest `manifest_digest`; none if it has none. Every document
    /// read is bounded.
    pub(super) async fn signatures(
        &self,
        manifest_digest: &str,
    ) -> Result<Vec<(Vec<u8>, String)>, RemoteError> {
        let reference = Self::parse_ref(&self.repository, &sign::signature_tag(manifest_digest))?;
        let client = &self.client;
        let Some((bytes, _)) = self.manifest_bounded(&reference).await? else {
            return Ok(Vec::new());
        };
        let manifest = sign::parse_manifest(&bytes)?;
        let mut payloads = Vec::new();
        for layer in manifest.layers.iter().take(sign::MAX_SIGNATURES) {
            if u64::try_from(layer.size).unwrap_or(u64::MAX) > sign::MAX_PAYLOAD {
                continue;
            }
            let mut payload = Capped::new(usize::try_from(sign::MAX_PAYLOAD).unwrap_or(usize::MAX));
            client
                .pull_blob(&reference, layer, &mut payload)
                .await
                .map_err(|e| blob_err(layer, e))?;
            payloads.push((layer.digest.clone(), payload.buf));
        }
        Ok(sign::signatures_in(&manifest, &mut |layer| {
            payloads
                .iter()
                .find(|(d, _)| *d == layer.digest)
                .map(|(_, p)| p.clone())
        }))
    }
}

/// A file as a stream of chunks, read as the upload asks for them.
pub(super) fn file_chunks(
    path: &Path,
) -> Result<
    impl futures_util::Stream<Item = Result<bytes::Bytes, OciDistributionError>> + Send + 'static,
    RemoteError,
> {
    let mut file = File::open(path).map_err(io_err(path))?;
    Ok(futures_util::stream::iter(std::iter::from_fn(move || {
        let mut buf = vec![0u8; PUSH_CHUNK];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => return Some(Err(OciDistributionError::IoError(e))),
            }
        }
        (filled > 0).then(|| {
            buf.truncate(filled);
            Ok(bytes::Bytes::from(buf))
        })
    })))
}

/// One blob downloaded.
pub(super) struct Downloaded {
    pub path: PathBuf,
    /// Bytes fetched now (a resumed download counts only the rest).
    pub fetched: u64,
    /// The sink saw the whole blob, from its first byte.
    pub streamed: bool,
}

/// Downloads one blob into `dir` (named by its hex digest), continuing a
/// partial download. The blob is renamed into place only after its sha256
/// matched. A download from the first byte also hands every chunk to
/// `sink` as it arrives (to decompress it meanwhile).
pub(super) async fn download(
    client: &Client,
    reference: &Reference,
    layer: &OciDescriptor,
    dir: &Path,
    mut sink: Option<&mut super::frames::Sink>,
) -> Result<Downloaded, RemoteError> {
    let hex = layer
        .digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| RemoteError::NotOurs(format!("blob digest {:?}", layer.digest)))?;
    let size = u64::try_from(layer.size)
        .map_err(|_| RemoteError::NotOurs(format!("blob size {}", layer.size)))?;
    let done = dir.join(hex);
    if fs::metadata(&done).is_ok_and(|m| m.len() == size) {
        return Ok(Downloaded {
            path: done,
            fetched: 0,
            streamed: false,
        });
    }
    let part = dir.join(format!("{hex}.part"));
    let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let mut stream = if have > 0 && have < size {
        match client
            .pull_blob_stream_partial(reference, layer, have, None)
            .await
            .map_err(|e| blob_err(layer, e))?
        {
            BlobResponse::Partial(s) => s,
            BlobResponse::Full(s) => {
                let _ = fs::remove_file(&part);
                s
            }
        }
    } else {
        let _ = fs::remove_file(&part);
        client
            .pull_blob_stream(reference, layer)
            .await
            .map_err(|e| blob_err(layer, e))?
    };
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&part)
        .map_err(io_err(&part))?;
    let mut len = out.metadata().map_err(io_err(&part))?.len();
    let start = len;
    if start > 0 {
        sink = None;
    }
    let streamed = sink.is_some();
    // The digest of the whole blob, as it is written: what a resumed
    // download already has first.
    let mut hash = <sha2::Sha256 as sha2::Digest>::new();
    if start > 0 {
        let mut f = File::open(&part).map_err(io_err(&part))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io_err(&part))?;
            if n == 0 {
                break;
            }
            sha2::Digest::update(&mut hash, &buf[..n]);
        }
    }
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            match e
                .get_ref()
                .and_then(|i| i.downcast_ref::<oci_client::errors::DigestError>())
            {
                Some(oci_client::errors::DigestError::VerificationError { expected, actual }) => {
                    RemoteError::Tampered {
                        expected: expected.clone(),
                        found: actual.clone(),
                    }
                }
                _ => RemoteError::Io {
                    path: part.clone(),
                    source: e,
                },
            }
        })?;
        len += chunk.len() as u64;
        if len > size {
            let _ = fs::remove_file(&part);
            return Err(RemoteError::Tampered {
                expected: layer.digest.clone(),
                found: format!("more than its {size} bytes"),
            });
        }
        sha2::Digest::update(&mut hash, &chunk);
        out.write_all(&chunk).map_err(io_err(&part))?;
        if let Some(sink) = sink.as_deref_mut() {
            sink.push(&chunk).map_err(io_err(&part))?;
        }
    }
    drop(out);
    let found = format!("sha256:{}", hex::encode(sha2::Digest::finalize(hash)));
    if found != layer.digest {
        let _ = fs::remove_file(&part);
        return Err(RemoteError::Tampered {
            expected: layer.digest.clone(),
            found,
        });
    }
    fs::rename(&part, &done).map_err(io_err(&done))?;
    Ok(Downloaded {
        path: done,
        fetched: len - start,
        streamed,
    })
}

/// A buffer a blob is read into that refuses to grow past `limit`: a
/// registry that sends more than a small document may hold ends the read
/// there, whatever it declared.
pub(super) struct Capped {
    pub(super) buf: Vec<u8>,
    limit: usize,
}

impl Capped {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
        }
    }
}

impl tokio::io::AsyncWrite for Capped {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.buf.len() + data.len() > self.limit {
            return std::task::Poll::Ready(Err(std::io::Error::other(format!(
                "more than the {} bytes such a document may have",
                self.limit
            ))));
        }
        self.buf.extend_from_slice(data);
        std::task::Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWrite;

    #[test]
    fn a_capped_buffer_refuses_to_grow_past_its_limit() {
        let mut c = Capped::new(8);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut write =
            |c: &mut Capped, data: &[u8]| match std::pin::Pin::new(c).poll_write(&mut cx, data) {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => unreachable!("never pending"),
            };
        assert_eq!(write(&mut c, b"12345").unwrap(), 5);
        assert!(write(&mut c, b"6789").is_err(), "9 bytes > 8");
        assert_eq!(c.buf, b"12345");
    }
}
