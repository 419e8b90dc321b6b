//! Signed images: the node that makes an image signs it, and a node that
//! pulls or imports one uses it only if a key its operator trusts signed it.
//!
//! An image's config lists the hash of every file, so whoever can push to
//! the repository can serve a self-consistent forgery; hashes alone prove
//! nothing about who made it. Signatures are cosign's (sigstore's
//! `SIGNATURE_SPEC.md`), so `cosign verify --key PREFIX.pub` checks them
//! too:
//!
//! ```text
//! <repo>:sha256-<hex of the image manifest's digest>.sig    an OCI image manifest
//!   config   application/vnd.oci.image.config.v1+json
//!   layers[] application/vnd.dev.cosign.simplesigning.v1+json   the payload:
//!     {"critical":{"identity":{"docker-reference":"<repo>"},
//!                  "image":{"docker-manifest-digest":"sha256:..."},
//!                  "type":"cosign container image signature"},
//!      "optional":null}
//!     annotations: dev.cosignproject.cosign/signature = base64(ECDSA P-256
//!                  SHA-256 signature of the payload, ASN.1 DER)
//! ```
//!
//! Keys (`warmer keygen PREFIX`): `PREFIX.pub` is a PEM `PUBLIC KEY`
//! (SubjectPublicKeyInfo), the format cosign's public keys have;
//! `PREFIX.key` is a PEM PKCS#8 `PRIVATE KEY`, mode 0600 (cosign's own
//! private keys are encrypted with a passphrase; warmer's signs unattended,
//! protected by its mode and owner like an ssh host key).
//!
//! Which keys: the manifest's `remote.sign` / `remote.verify`, else the trust
//! file (`/etc/warmer/trust.yaml`, or `WARMER_TRUST_FILE`) with the same two
//! keys for every service. A pull or import with no key to verify with is
//! refused: nothing unverified is restored as root.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
    ECDSA_P256_SHA256_ASN1_SIGNING,
};
use base64::Engine;
use serde::{Deserialize, Serialize};

/// cosign's media type of a simple-signing payload layer.
pub const PAYLOAD_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// cosign's annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// cosign's payload type.
pub const COSIGN_TYPE: &str = "cosign container image signature";
/// The trust file for every service.
pub const TRUST_FILE: &str = "/etc/warmer/trust.yaml";
/// Overrides [`TRUST_FILE`].
pub const TRUST_FILE_ENV: &str = "WARMER_TRUST_FILE";
/// No key file, payload or trust file warmer reads is larger.
const MAX_KEY_BYTES: u64 = 64 << 10;

/// DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1,
/// BIT STRING of the 65-byte uncompressed point).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{}: {what}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing the key file {}", path.display())]
    Untrusted {
        path: PathBuf,
        #[source]
        why: cache::fsutil::Untrusted,
    },
    #[error("the private key {} is readable by others (mode {mode:o}): make it 0600", path.display())]
    KeyReadable { path: PathBuf, mode: u32 },
    #[error("{}: not a {what} (expected a PEM {what} of an ECDSA P-256 key)", path.display())]
    BadKey { path: PathBuf, what: &'static str },
    #[error("{} exists: refusing to overwrite a key", .0.display())]
    Exists(PathBuf),
    #[error("the trust file {}: {what}", path.display())]
    TrustFile { path: PathBuf, what: String },
    #[error("cannot sign")]
    Crypto,
}

/// The keys a service signs and verifies with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    pub sign: Option<PathBuf>,
    pub verify: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    #[serde(default)]
    sign: Option<PathBuf>,
    #[serde(default)]
    verify: Vec<PathBuf>,
}

impl Trust {
    /// The manifest's own keys, else (each of the two separately) the trust
    /// file's. A missing trust file is no keys; a bad or untrusted one is an
    /// error (never silently no verification).
    pub fn of(remote: Option<&crate::manifest::Remote>) -> Result<Self, SignError> {
        let own = remote.map(|r| (r.sign.clone(), r.verify.clone()));
        let (sign, verify) = own.unwrap_or_default();
        if sign.is_some() && !verify.is_empty() {
            return Ok(Self { sign, verify });
        }
        let file = Self::file()?;
        Ok(Self {
            sign: sign.or(file.sign),
            verify: if verify.is_empty() {
                file.verify
            } else {
                verify
            },
        })
    }

    /// The trust file's keys (none if there is no file).
    pub fn file() -> Result<Self, SignError> {
        let path = std::env::var_os(TRUST_FILE_ENV)
            .map_or_else(|| PathBuf::from(TRUST_FILE), PathBuf::from);
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = read_trusted(&path)?;
        let t: TrustFile =
            serde_saphyr::from_str(&String::from_utf8_lossy(&text)).map_err(|e| {
                SignError::TrustFile {
                    path: path.clone(),
                    what: e.to_string(),
                }
            })?;
        for p in t.sign.iter().chain(&t.verify) {
            if !p.is_absolute() {
                return Err(SignError::TrustFile {
                    path,
                    what: format!("{}: key paths must be absolute", p.display()),
                });
            }
        }
        Ok(Self {
            sign: t.sign,
            verify: t.verify,
        })
    }
}

/// Reads a file root trusts: owned by root (or warmer's user), written by
/// no one else, up to `/`; bounded in size.
fn read_trusted(path: &Path) -> Result<Vec<u8>, SignError> {
    cache::fsutil::check_trusted(path, nix::unistd::geteuid().as_raw()).map_err(|why| {
        SignError::Untrusted {
            path: path.to_path_buf(),
            why,
        }
    })?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| SignError::Io {
            path: path.to_path_buf(),
            what: "open",
            source,
        })?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|source| SignError::Io {
            path: path.to_path_buf(),
            what: "read",
            source,
        })?;
    Ok(bytes)
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn unpem(label: &str, text: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(text).ok()?;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = text.split(&begin).nth(1)?.split(&end).next()?;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// `warmer keygen PREFIX`: a new P-256 key pair, `PREFIX.key` (0600) and
/// `PREFIX.pub`. Never overwrites.
pub fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf), SignError> {
    let key_path = PathBuf::from(format!("{}.key", prefix.display()));
    let pub_path = PathBuf::from(format!("{}.pub", prefix.display()));
    for p in [&key_path, &pub_path] {
        if p.symlink_metadata().is_ok() {
            return Err(SignError::Exists(p.clone()));
        }
    }
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| SignError::Crypto)?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
        .map_err(|_| SignError::Crypto)?;
    let mut spki = P256_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(pair.public_key().as_ref());
    let write = |path: &Path, mode: u32, text: String| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| SignError::Io {
                path: path.to_path_buf(),
                what: "create",
                source,
            })?;
        std::io::Write::write_all(&mut f, text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|source| SignError::Io {
                path: path.to_path_buf(),
                what: "write",
                source,
            })
    };
    write(&key_path, 0o600, pem("PRIVATE KEY", pkcs8.as_ref()))?;
    write(&pub_path, 0o644, pem("PUBLIC KEY", &spki))?;
    Ok((key_path, pub_path))
}

/// A private key, loaded for signing.
pub struct Signer {
    pair: EcdsaKeyPair,
}

impl Signer {
    /// Loads `path`: trusted up to `/`, and readable by its owner only.
    pub fn load(path: &Path) -> Result<Self, SignError> {
        let bytes = read_trusted(path)?;
        let mode = std::fs::metadata(path).map(|m| m.mode()).unwrap_or(0);
        if mode & 0o077 != 0 {
            return Err(SignError::KeyReadable {
                path: path.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
        let bad = || SignError::BadKey {
            path: path.to_path_buf(),
            what: "PRIVATE KEY",
        };
        let der = unpem("PRIVATE KEY", &bytes).ok_or_else(bad)?;
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der).map_err(|_| bad())?;
        Ok(Self { pair })
    }

    /// The base64 signature of `payload`.
    pub fn sign(&self, payload: &[u8]) -> Result<String, SignError> {
        let sig = self
            .pair
            .sign(&SystemRandom::new(), payload)
            .map_err(|_| SignError::Crypto)?;
        Ok(base64::engine::general_purpose::STANDARD.encode(sig.as_ref()))
    }
}

/// A public key, loaded for verifying.
#[derive(Debug, Clone)]
pub struct Verifier {
    pub path: PathBuf,
    point: Vec<u8>,
}

impl Verifier {
    pub fn load(path: &Path) -> Result<Self, SignError> {
        let bytes = read_trusted(path)?;
        let der = unpem("PUBLIC KEY", &bytes)
            .filter(|d| d.len() == P256_SPKI_PREFIX.len() + 65 && d.starts_with(&P256_SPKI_PREFIX))
            .ok_or_else(|| SignError::BadKey {
                path: path.to_path_buf(),
                what: "PUBLIC KEY",
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            point: der[P256_SPKI_PREFIX.len()..].to_vec(),
        })
    }

    /// Whether `signature` (base64) is this key's signature of `payload`.
    pub fn verifies(&self, payload: &[u8], signature: &str) -> bool {
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
            return false;
        };
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.point)
            .verify(payload, &sig)
            .is_ok()
    }
}

/// cosign's simple-signing payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct Payload {
    pub critical: Critical,
    #[serde(default)]
    pub optional: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Critical {
    pub identity: Identity,
    pub image: Image,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Identity {
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Image {
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

/// The payload that signs the image manifest `manifest_digest` of
/// `repository`.
pub fn payload(repository: &str, manifest_digest: &str) -> Vec<u8> {
    serde_json::to_vec(&Payload {
        critical: Critical {
            identity: Identity {
                docker_reference: repository.to_string(),
            },
            image: Image {
                docker_manifest_digest: manifest_digest.to_string(),
            },
            kind: COSIGN_TYPE.to_string(),
        },
        optional: None,
    })
    .expect("payload serializes")
}

/// cosign's signature artifact of one payload: (manifest, config) bytes, the
/// payload being the one layer. Stored in a registry under
/// [`signature_tag`], in an exported archive beside the image.
pub struct Artifact {
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub payload: Vec<u8>,
    pub payload_digest: String,
}

impl Artifact {
    /// Signs the image manifest `manifest_digest` of `repository`.
    pub fn new(
        signer: &Signer,
        repository: &str,
        manifest_digest: &str,
    ) -> Result<Self, SignError> {
        let payload = payload(repository, manifest_digest);
        let signature = signer.sign(&payload)?;
        let payload_digest = super::artifact::sha256_digest(&payload);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "",
            "config": {},
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [payload_digest]},
        }))
        .expect("config serializes");
        let config_digest = super::artifact::sha256_digest(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "size": config.len(),
                "digest": config_digest,
            },
            "layers": [{
                "mediaType": PAYLOAD_MEDIA_TYPE,
                "size": payload.len(),
                "digest": payload_digest,
                "annotations": {SIGNATURE_ANNOTATION: signature},
            }],
        }))
        .expect("manifest serializes");
        Ok(Self {
            manifest,
            config,
            config_digest,
            payload,
            payload_digest,
        })
    }
}

/// Signatures looked at per image, and the largest payload read.
pub const MAX_SIGNATURES: usize = 16;
pub const MAX_PAYLOAD: u64 = 64 << 10;

/// The (payload, signature) pairs a signature artifact's manifest holds,
/// each payload read by `read` (bounded by [`MAX_PAYLOAD`] and checked
/// against its digest).
pub fn signatures_in(
    manifest: &oci_client::manifest::OciImageManifest,
    read: &mut dyn FnMut(&oci_client::manifest::OciDescriptor) -> Option<Vec<u8>>,
) -> Vec<(Vec<u8>, String)> {
    let mut out = Vec::new();
    for layer in manifest.layers.iter().take(MAX_SIGNATURES) {
        let sig = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(SIGNATURE_ANNOTATION));
        let (Some(sig), true) = (sig, layer.media_type == PAYLOAD_MEDIA_TYPE) else {
            continue;
        };
        if u64::try_from(layer.size).unwrap_or(u64::MAX) > MAX_PAYLOAD {
            continue;
        }
        if let Some(payload) = read(layer).filter(|p| {
            p.len() as u64 <= MAX_PAYLOAD && super::artifact::sha256_digest(p) == layer.digest
        }) {
            out.push((payload, sig.clone()));
        }
    }
    out
}

/// A signature artifact's manifest (bounded like every manifest read).
pub fn parse_manifest(
    bytes: &[u8],
) -> Result<oci_client::manifest::OciImageManifest, super::RemoteError> {
    if bytes.len() > super::artifact::MAX_MANIFEST_BYTES {
        return Err(super::RemoteError::NotOurs(format!(
            "signature manifest of {} bytes",
            bytes.len()
        )));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| super::RemoteError::NotOurs(format!("unreadable signature manifest: {e}")))
}

/// The tag cosign stores the signatures of `manifest_digest` under.
pub fn signature_tag(manifest_digest: &str) -> String {
    manifest_digest.replacen(':', "-", 1) + ".sig"
}

/// Why no signature made an image acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("no key to verify images with: set remote.verify (or `verify:` in {TRUST_FILE}); warmer restores no image nobody verified")]
    NoKeys,
    #[error("the image is not signed")]
    Unsigned,
    #[error("no signature by a trusted key ({0})")]
    BadSignature(String),
}

/// Checks `signatures` ((payload, base64 signature) pairs) of the image whose
/// manifest has `manifest_digest`: one must be a good signature, by one of
/// `keys`, of a payload naming exactly that digest.
pub fn check(
    keys: &[Verifier],
    manifest_digest: &str,
    signatures: &[(Vec<u8>, String)],
) -> Result<PathBuf, Rejected> {
    if keys.is_empty() {
        return Err(Rejected::NoKeys);
    }
    if signatures.is_empty() {
        return Err(Rejected::Unsigned);
    }
    let mut why = Vec::new();
    for (payload, sig) in signatures {
        let Some(key) = keys.iter().find(|k| k.verifies(payload, sig)) else {
            why.push("a signature no trusted key made".to_string());
            continue;
        };
        match serde_json::from_slice::<Payload>(payload) {
            Ok(p) if p.critical.kind != COSIGN_TYPE => why.push("a payload of another type".into()),
            Ok(p) if p.critical.image.docker_manifest_digest != manifest_digest => {
                why.push(format!(
                    "a signature of another image ({})",
                    crate::errors::escape(&p.critical.image.docker_manifest_digest)
                ))
            }
            Ok(_) => return Ok(key.path.clone()),
            Err(_) => why.push("a payload that is not cosign's".into()),
        }
    }
    Err(Rejected::BadSignature(why.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_key_and_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = keygen(&dir.path().join("node")).unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        assert!(matches!(
            keygen(&dir.path().join("node")),
            Err(SignError::Exists(_))
        ));
        let (_, other_pub) = keygen(&dir.path().join("other")).unwrap();
        let signer = Signer::load(&key).unwrap();
        let ours = Verifier::load(&public).unwrap();
        let theirs = Verifier::load(&other_pub).unwrap();
        let m = format!("sha256:{}", "ab".repeat(32));
        let p = payload("127.0.0.1:5000/warmer/web", &m);
        let sig = signer.sign(&p).unwrap();
        let sigs = vec![(p.clone(), sig.clone())];
        assert_eq!(
            check(std::slice::from_ref(&ours), &m, &sigs),
            Ok(public.clone())
        );
        assert!(matches!(
            check(&[theirs], &m, &sigs),
            Err(Rejected::BadSignature(_))
        ));
        let other = format!("sha256:{}", "cd".repeat(32));
        assert!(matches!(
            check(std::slice::from_ref(&ours), &other, &sigs),
            Err(Rejected::BadSignature(w)) if w.contains("another image")
        ));
        // A payload changed after signing.
        let mut forged = p.clone();
        forged[10] ^= 1;
        assert!(check(std::slice::from_ref(&ours), &m, &[(forged, sig)]).is_err());
        assert_eq!(check(&[ours], &m, &[]), Err(Rejected::Unsigned));
        assert_eq!(check(&[], &m, &sigs), Err(Rejected::NoKeys));
        assert_eq!(signature_tag(&m), format!("sha256-{}.sig", "ab".repeat(32)));
    }

    #[test]
    fn a_private_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = keygen(&dir.path().join("k")).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .unwrap();
        assert!(matches!(
            Signer::load(&key),
            Err(SignError::KeyReadable { mode: 0o640, .. })
        ));
    }
}
