//! OCI images as sandbox root disks: pull from a registry, apply layers onto a
//! directory, record the image config, build an ext4 disk with lohar in it.
//!
//! This is the library only; the daemon's store, API and CLI sit on top.
//!
//! - [`pull`]: fetch a ref's manifest, config and layer blobs into a cache
//!   directory (auth, host platform, progress, cancel, digest checks);
//! - [`unpack`]: apply layer tarballs in order (whiteouts, opaque dirs,
//!   owners, modes, links, xattrs), never writing outside the rootfs;
//! - [`config`]: the parts of the image config that become exec defaults;
//! - [`ext4`]: size, lohar injection and `mkfs.ext4 -d`.

pub mod config;
pub mod ext4;
pub mod pull;
pub mod unpack;

pub use config::ImageConfig;
pub use pull::{pull, PullAuth, PullProgress, Pulled, PulledLayer};

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A layer tarball is malformed or tries something we refuse (an entry
    /// outside the rootfs, an unsupported compression).
    #[error("layer: {0}")]
    Layer(String),
    /// The image reference does not parse.
    #[error("bad image reference {reference:?}: {message}")]
    BadReference {
        /// The reference as given.
        reference: String,
        /// The parser's complaint.
        message: String,
    },
    /// The registry refused our credentials (or wants some).
    #[error("registry {registry}: unauthorized (HTTP 401): {message}")]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// What the client said.
        message: String,
    },
    /// The registry does not have the repository, tag or digest.
    #[error("image {reference} not found: {message}")]
    NotFound {
        /// The reference as given.
        reference: String,
        /// What the registry said.
        message: String,
    },
    /// The registry answered, but not with what we need.
    #[error("registry: {0}")]
    Registry(String),
    /// The image config JSON is not usable.
    #[error("image config: {0}")]
    Config(String),
    /// The operation was cancelled; nothing partial was left behind.
    #[error("cancelled")]
    Cancelled,
    /// A host tool (`mkfs.ext4`) failed.
    #[error(transparent)]
    Cmd(#[from] crate::cmd::CmdError),
}

/// Applies a pulled image's layers, bottom first, onto `root` (an existing,
/// normally empty directory).
pub async fn unpack_pulled(pulled: &Pulled, root: &std::path::Path) -> Result<(), ImageError> {
    let layers: Vec<_> = pulled.layers.iter().map(|l| l.path.clone()).collect();
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || {
        for layer in &layers {
            let stats = unpack::apply_layer_file(&root, layer)?;
            tracing::debug!(layer = %layer.display(), ?stats, "image layer applied");
        }
        Ok(())
    })
    .await
    .map_err(|e| ImageError::Layer(format!("unpack task: {e}")))?
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
