//! The image a create or a template names, as the engine needs it: the
//! ext4 to clone and the image config's user, working dir and env.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{ApiError, AppState};

/// A catalogue image resolved for a root disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    /// The catalogue name it was found under.
    pub name: String,
    pub path: PathBuf,
    pub user: Option<String>,
    pub workdir: Option<String>,
    /// The image config's env, under the sandbox's own.
    pub env: BTreeMap<String, String>,
}

/// Resolves `image` for `owner`; `None` is the engine's default rootfs.
pub async fn base_image(
    _st: &AppState,
    _owner: &str,
    image: Option<&str>,
) -> Result<Option<BaseImage>, ApiError> {
    match image {
        None => Ok(None),
        Some(name) => Err(ApiError::NotFound(format!("no image '{name}'"))),
    }
}
