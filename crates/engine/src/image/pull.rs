//! Pulling an image from an OCI registry into a local cache directory.
//!
//! A pull resolves the ref to a digest first (a HEAD request): if that digest
//! is already cached, it returns at once without downloading anything.
//! Otherwise the manifest for the host's platform, its config and its layers
//! are fetched into a staging directory next to the cache entry, layers
//! streamed to files while their sha256 is checked, and the staging directory
//! is renamed into place only once everything is there and verified. An error
//! or a cancel removes the staging directory: nothing partial is left behind.
//!
//! Cache layout: `<cache>/<alg>-<hex>/` (the ref's digest) holding
//! `image.json` ([`Pulled`] minus paths), `config.json` (the raw image
//! config) and `layers/<alg>-<hex>` (the blobs as the registry serves them,
//! still compressed).
//!
//! Registries on loopback (`localhost`, `127.*`, `[::1]`) are spoken to over
//! plain HTTP, as local test and mirror registries usually are; all others
//! over HTTPS (rustls with the ring provider and the host's root CAs).

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::{ImageConfig, ImageError};

/// Image configs are a few KiB; more than this is not an image config.
const MAX_CONFIG_BYTES: i64 = 16 << 20;
/// The record of a cache entry; written last, so its presence means complete.
const RECORD: &str = "image.json";

/// Credentials for a registry.
#[derive(Clone, Default)]
pub enum PullAuth {
    /// No credentials (public images; the registry may still hand out an
    /// anonymous bearer token).
    #[default]
    Anonymous,
    /// HTTP basic credentials (also used to obtain a bearer token when the
    /// registry asks for one).
    Basic {
        /// User name.
        username: String,
        /// Password or access token.
        password: String,
    },
    /// A bearer token used as is.
    Bearer(String),
}

impl std::fmt::Debug for PullAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Self::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

impl PullAuth {
    fn to_oci(&self) -> RegistryAuth {
        match self {
            Self::Anonymous => RegistryAuth::Anonymous,
            Self::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Self::Bearer(token) => RegistryAuth::Bearer(token.clone()),
        }
    }
}

/// How far a pull is, in layer bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullProgress {
    /// Layer bytes downloaded so far.
    pub done: u64,
    /// All layers' bytes, from the manifest.
    pub total: u64,
}

/// One layer blob in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledLayer {
    /// `sha256:<hex>`, verified.
    pub digest: String,
    /// The media type from the manifest (tells the compression).
    pub media_type: String,
    /// Size in bytes.
    pub size: u64,
    /// The blob's file (filled in on load; not stored).
    #[serde(skip)]
    pub path: PathBuf,
}

/// A pulled image: everything needed to unpack it and record its defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulled {
    /// The ref as asked for.
    pub reference: String,
    /// What the ref resolved to (an index's digest for multi-platform refs).
    pub ref_digest: String,
    /// The host platform's image manifest digest.
    pub manifest_digest: String,
    /// The runtime defaults from the image config.
    pub config: ImageConfig,
    /// The layers, bottom first.
    pub layers: Vec<PulledLayer>,
    /// The cache entry directory (filled in on load; not stored).
    #[serde(skip)]
    pub dir: PathBuf,
    /// True if this pull found the image already cached (nothing downloaded).
    #[serde(skip)]
    pub cached: bool,
}

/// Pulls `reference` into `cache` (created if missing). `progress` is called
/// as layer bytes arrive; `cancel` stops the pull, removes what it had
/// fetched and returns [`ImageError::Cancelled`].
pub async fn pull(
    reference: &str,
    auth: &PullAuth,
    cache: &Path,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<Pulled, ImageError> {
    let image: Reference =
        reference
            .parse()
            .map_err(|e: oci_client::ParseError| ImageError::BadReference {
                reference: reference.to_owned(),
                message: e.to_string(),
            })?;
    let registry = image.resolve_registry().to_owned();
    let client = client_for(&registry);
    let auth = auth.to_oci();
    let map = |e| registry_error(&registry, reference, e);

    let ref_digest = tokio::select! {
        d = client.fetch_manifest_digest(&image, &auth) => d.map_err(map)?,
        _ = cancel.cancelled() => return Err(ImageError::Cancelled),
    };
    let dir = cache.join(digest_file_name(&ref_digest)?);
    if let Some(mut found) = load(&dir)? {
        found.cached = true;
        return Ok(found);
    }

    tokio::fs::create_dir_all(cache)
        .await
        .map_err(|e| ImageError::io(format!("creating {}", cache.display()), e))?;
    let staging = cache.join(format!(".pull-{}", hex::encode(rand::random::<[u8; 8]>())));
    let work = fetch(
        &client,
        &image,
        &auth,
        &registry,
        reference,
        &ref_digest,
        &staging,
        progress,
        cancel,
    );
    let result = tokio::select! {
        r = work => r,
        _ = cancel.cancelled() => Err(ImageError::Cancelled),
    };
    let result = match result {
        Ok(()) => match tokio::fs::rename(&staging, &dir).await {
            Ok(()) => Ok(()),
            // A concurrent pull of the same image won: use its entry.
            Err(_) if dir.join(RECORD).exists() => Ok(()),
            Err(e) => Err(ImageError::io(
                format!("renaming into {}", dir.display()),
                e,
            )),
        },
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_dir_all(&staging).await;
    result?;
    load(&dir)?.ok_or_else(|| ImageError::Registry(format!("{} vanished", dir.display())))
}

/// Downloads manifest, config and layers into `staging`, record last.
#[allow(clippy::too_many_arguments)]
async fn fetch(
    client: &Client,
    image: &Reference,
    auth: &RegistryAuth,
    registry: &str,
    reference: &str,
    ref_digest: &str,
    staging: &Path,
    progress: &(dyn Fn(PullProgress) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<(), ImageError> {
    let map = |e| registry_error(registry, reference, e);
    let layers_dir = staging.join("layers");
    tokio::fs::create_dir_all(&layers_dir)
        .await
        .map_err(|e| ImageError::io(format!("creating {}", layers_dir.display()), e))?;
    let (manifest, manifest_digest) = client.pull_image_manifest(image, auth).await.map_err(map)?;
    if manifest.config.size > MAX_CONFIG_BYTES {
        return Err(ImageError::Registry(format!(
            "image config of {} bytes is too large",
            manifest.config.size
        )));
    }
    let mut config_json = Vec::new();
    client
        .pull_blob(image, &manifest.config, &mut config_json)
        .await
        .map_err(map)?;
    let config = ImageConfig::from_oci_json(&config_json)?;
    write_file(&staging.join("config.json"), &config_json).await?;

    let total: u64 = manifest
        .layers
        .iter()
        .map(|l| u64::try_from(l.size).unwrap_or(0))
        .sum();
    let mut done = 0u64;
    progress(PullProgress { done, total });
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for layer in &manifest.layers {
        check_layer_media_type(&layer.media_type)?;
        let path = layers_dir.join(digest_file_name(&layer.digest)?);
        fetch_layer(
            client,
            image,
            layer,
            &path,
            (registry, reference),
            cancel,
            &mut |n| {
                done += n;
                progress(PullProgress { done, total });
            },
        )
        .await?;
        layers.push(PulledLayer {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
            size: u64::try_from(layer.size).unwrap_or(0),
            path: PathBuf::new(),
        });
    }
    let record = Pulled {
        reference: reference.to_owned(),
        ref_digest: ref_digest.to_owned(),
        manifest_digest,
        config,
        layers,
        dir: PathBuf::new(),
        cached: false,
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| ImageError::Config(e.to_string()))?;
    write_file(&staging.join(RECORD), &json).await
}

/// Streams one layer blob to `path`, checking its size and sha256.
async fn fetch_layer(
    client: &Client,
    image: &Reference,
    layer: &OciDescriptor,
    path: &Path,
    (registry, reference): (&str, &str),
    cancel: &CancellationToken,
    on_bytes: &mut (dyn FnMut(u64) + Send),
) -> Result<(), ImageError> {
    let want_hex = layer
        .digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::Registry(format!("unsupported digest {}", layer.digest)))?;
    let want_size = u64::try_from(layer.size).unwrap_or(0);
    let mut stream = client
        .pull_blob_stream(image, layer)
        .await
        .map_err(|e| registry_error(registry, reference, e))?
        .stream;
    let file = tokio::fs::File::create(path)
        .await
        .map_err(|e| ImageError::io(format!("creating {}", path.display()), e))?;
    let mut out = tokio::io::BufWriter::new(file);
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        // Also checked here, not only by the caller's select: a fast local
        // registry may never leave the stream pending.
        if cancel.is_cancelled() {
            return Err(ImageError::Cancelled);
        }
        let chunk = chunk
            .map_err(|e| ImageError::Registry(format!("reading layer {}: {e}", layer.digest)))?;
        got += chunk.len() as u64;
        if got > want_size {
            return Err(ImageError::Registry(format!(
                "layer {} is larger than the manifest says ({want_size} bytes)",
                layer.digest
            )));
        }
        hasher.update(&chunk);
        out.write_all(&chunk)
            .await
            .map_err(|e| ImageError::io(format!("writing {}", path.display()), e))?;
        on_bytes(chunk.len() as u64);
    }
    out.flush()
        .await
        .map_err(|e| ImageError::io(format!("writing {}", path.display()), e))?;
    let got_hex = hex::encode(hasher.finalize());
    if got != want_size || got_hex != want_hex {
        return Err(ImageError::Registry(format!(
            "layer {} does not match its digest (got sha256:{got_hex}, {got} bytes)",
            layer.digest
        )));
    }
    Ok(())
}

/// Reads a complete cache entry, if there is one.
fn load(dir: &Path) -> Result<Option<Pulled>, ImageError> {
    let record = dir.join(RECORD);
    let json = match std::fs::read(&record) {
        Ok(j) => j,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ImageError::io(format!("reading {}", record.display()), e)),
    };
    let mut pulled: Pulled = serde_json::from_slice(&json)
        .map_err(|e| ImageError::Config(format!("{}: {e}", record.display())))?;
    for layer in &mut pulled.layers {
        layer.path = dir.join("layers").join(digest_file_name(&layer.digest)?);
    }
    pulled.dir = dir.to_path_buf();
    Ok(Some(pulled))
}

/// `sha256:<64 hex>` → `sha256-<hex>`; anything else is refused, as digests
/// from the registry become file names.
fn digest_file_name(digest: &str) -> Result<String, ImageError> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if !ok {
        return Err(ImageError::Registry(format!(
            "unsupported digest {digest:?}"
        )));
    }
    Ok(digest.replacen(':', "-", 1))
}

fn check_layer_media_type(media_type: &str) -> Result<(), ImageError> {
    use oci_client::manifest::*;
    match media_type {
        IMAGE_LAYER_MEDIA_TYPE
        | IMAGE_LAYER_GZIP_MEDIA_TYPE
        | IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE
        | IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE
        | IMAGE_LAYER_NONDISTRIBUTABLE_MEDIA_TYPE
        | IMAGE_LAYER_NONDISTRIBUTABLE_GZIP_MEDIA_TYPE => Ok(()),
        other => Err(ImageError::Registry(format!(
            "layer media type {other} is not a tar or gzip image layer"
        ))),
    }
}

async fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    tokio::fs::write(path, bytes)
        .await
        .map_err(|e| ImageError::io(format!("writing {}", path.display()), e))
}

/// A client for one registry: plain HTTP on loopback, HTTPS elsewhere.
fn client_for(registry: &str) -> Client {
    // reqwest is built without a default crypto provider (so no aws-lc-sys
    // and its C build); use ring. Already installed is fine. rustls 0.23.48
    // deprecates ring's provider for lacking post-quantum key exchange,
    // which registries do not need.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let protocol = if is_loopback(registry) {
        ClientProtocol::HttpsExcept(vec![registry.to_owned()])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(std::time::Duration::from_secs(30)),
        read_timeout: Some(std::time::Duration::from_secs(120)),
        ..Default::default()
    })
}

fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        registry.split(':').next().unwrap_or_default()
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Turns the client's errors into ours, with a 401 and a 404 always
/// recognisable.
fn registry_error(registry: &str, reference: &str, e: OciDistributionError) -> ImageError {
    use oci_client::errors::OciErrorCode;
    let not_found = || ImageError::NotFound {
        reference: reference.to_owned(),
        message: e.to_string(),
    };
    match &e {
        OciDistributionError::ImageManifestNotFoundError(_)
        | OciDistributionError::ServerError { code: 404, .. } => return not_found(),
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|x| {
                matches!(
                    x.code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) =>
        {
            return not_found()
        }
        _ => {}
    }
    let unauthorized = ImageError::Unauthorized {
        registry: registry.to_owned(),
        message: e.to_string(),
    };
    match &e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => unauthorized,
        OciDistributionError::ServerError { code: 401, .. } => unauthorized,
        OciDistributionError::RegistryError { envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|x| matches!(x.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
        {
            unauthorized
        }
        _ => ImageError::Registry(format!("{registry}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised() {
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("127.1.2.3"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry-1.docker.io"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }

    #[test]
    fn digests_become_safe_file_names() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            digest_file_name(&d).unwrap(),
            format!("sha256-{}", "ab".repeat(32))
        );
        for bad in [
            "sha256:../../etc",
            "md5:00",
            "sha256:AB",
            &format!("sha256:{}/", "a".repeat(63)),
        ] {
            assert!(digest_file_name(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_bad_reference_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        let err = pull(
            "Not A Ref!!",
            &PullAuth::Anonymous,
            t.path(),
            &|_| {},
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ImageError::BadReference { .. }), "{err}");
        assert!(err.to_string().contains("bad image reference"), "{err}");
    }
}
