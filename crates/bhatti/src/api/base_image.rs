//! The image a create or a template names, as the engine needs it: the
//! ext4 to clone and the image config's user, working dir and env.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{ApiError, AppState};
use crate::image::ImageConfig;

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
    /// The image's defaults with `user` made explicit (kept in the
    /// sandbox's row: execs without a command, save-image).
    pub config: ImageConfig,
}

/// Resolves `image` for `owner` in the catalogue (a name of theirs, a
/// shared name, a reference pulled before); `None` is the engine's default
/// rootfs. Templates use this: an image they name must exist (404).
pub async fn base_image(
    st: &AppState,
    owner: &str,
    image: Option<&str>,
) -> Result<Option<BaseImage>, ApiError> {
    resolve(st, owner, image, false).await
}

/// [`base_image`], pulling a reference the catalogue does not have (for a
/// create).
pub async fn base_image_or_pull(
    st: &AppState,
    owner: &str,
    image: Option<&str>,
) -> Result<Option<BaseImage>, ApiError> {
    resolve(st, owner, image, true).await
}

async fn resolve(
    st: &AppState,
    owner: &str,
    image: Option<&str>,
    pull: bool,
) -> Result<Option<BaseImage>, ApiError> {
    let Some(image) = image else {
        return Ok(None);
    };
    let found = super::images::for_create(st, owner, image, pull).await?;
    let mut config = found.row.config.clone();
    config.user = found.user.clone();
    Ok(Some(BaseImage {
        name: found.row.name.clone(),
        path: PathBuf::from(&found.row.path),
        user: found.user,
        workdir: found.row.config.working_dir.clone(),
        env: found.row.config.env_pairs().into_iter().collect(),
        config,
    }))
}
