//! Bodies of `/volumes` and the `volumes`/`new_volumes` of a create.

use serde::{Deserialize, Serialize};

use crate::{validate_name, VResult, ValidationError};

/// Smallest volume (MiB).
pub const MIN_VOLUME_MB: u64 = 32;
/// Largest volume (MiB): 1 TiB.
pub const MAX_VOLUME_MB: u64 = 1 << 20;

/// A volume size: [`MIN_VOLUME_MB`] ..= [`MAX_VOLUME_MB`].
pub fn validate_volume_mb(field: &str, mb: u64) -> VResult {
    if (MIN_VOLUME_MB..=MAX_VOLUME_MB).contains(&mb) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("must be {MIN_VOLUME_MB} to {MAX_VOLUME_MB} MiB (got {mb})"),
        ))
    }
}

/// A volume's mount point in the guest.
pub fn validate_mount(field: &str, mount: &str) -> VResult {
    bhatti_engine::engine::validate_mount_point(mount).map_err(|m| ValidationError::new(field, m))
}

/// `POST /volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// Unique among the caller's volumes.
    #[schema(value_type = crate::schema::Name)]
    pub name: String,
    /// Size in MiB.
    #[schema(minimum = 32, maximum = 1048576)]
    pub size_mb: u64,
}

impl CreateVolume {
    pub fn validate(&self) -> VResult {
        validate_name("name", &self.name)?;
        validate_volume_mb("size_mb", self.size_mb)
    }
}

/// `POST /volumes/{name}/resize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolume {
    /// The new size in MiB; must be larger than the current one.
    #[schema(minimum = 32, maximum = 1048576)]
    pub size_mb: u64,
}

/// `POST /volumes/{name}/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneVolume {
    /// The new volume's name.
    #[schema(value_type = crate::schema::Name)]
    pub name: String,
}

/// A sandbox that has the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeAttachmentView {
    /// Sandbox id.
    pub sandbox: String,
    pub sandbox_name: String,
    pub mount: String,
    pub read_only: bool,
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeView {
    pub id: String,
    pub name: String,
    pub size_mb: u64,
    /// The sandbox (id) the volume goes with, if it was made by its
    /// `new_volumes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_for: Option<String>,
    pub attachments: Vec<VolumeAttachmentView>,
    pub created_at: String,
}

/// `GET /volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeList {
    pub volumes: Vec<VolumeView>,
}

/// One entry of a create's `volumes`: an existing volume (or one made now,
/// with `auto_create`) mounted at `mount`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxVolume {
    /// The volume's name.
    pub name: String,
    /// Absolute mount point in the guest; not `/`, a system directory
    /// (`/bin`, `/boot`, `/dev`, `/etc`, `/lib*`, `/proc`, `/run`, `/sbin`,
    /// `/sys`, `/usr`, `/var`, `/tmp`) or below `/proc`, `/sys`, `/dev`.
    pub mount: String,
    /// Mount it read-only (then other sandboxes may too).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Create the volume (with `size_mb`) if the caller has none of that
    /// name.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_create: bool,
    /// Size of an auto-created volume, MiB; default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mb: Option<u64>,
}

/// Size of an auto-created volume when the request gives none (MiB).
pub const DEFAULT_VOLUME_MB: u64 = 1024;

/// One entry of a create's `new_volumes`: an empty volume made for this
/// sandbox and deleted with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSandboxVolume {
    /// Absolute mount point in the guest (the rules of `volumes`).
    pub mount: String,
    /// Size in MiB.
    pub size_mb: u64,
}

/// Checks a create's `volumes` and `new_volumes` together.
pub fn validate_sandbox_volumes(vols: &[SandboxVolume], new: &[NewSandboxVolume]) -> VResult {
    let max = bhatti_engine::engine::MAX_VOLUMES;
    if vols.len() + new.len() > max {
        return Err(ValidationError::new(
            "volumes",
            format!("at most {max} volumes (with new_volumes) per sandbox"),
        ));
    }
    let mut mounts = std::collections::BTreeSet::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, v) in vols.iter().enumerate() {
        validate_name(&format!("volumes[{i}].name"), &v.name)?;
        validate_mount(&format!("volumes[{i}].mount"), &v.mount)?;
        if let Some(mb) = v.size_mb {
            if !v.auto_create {
                return Err(ValidationError::new(
                    format!("volumes[{i}].size_mb"),
                    "only with auto_create",
                ));
            }
            validate_volume_mb(&format!("volumes[{i}].size_mb"), mb)?;
        }
        if !names.insert(v.name.as_str()) {
            return Err(ValidationError::new(
                format!("volumes[{i}].name"),
                format!("volume '{}' is listed twice", v.name),
            ));
        }
        if !mounts.insert(v.mount.as_str()) {
            return Err(ValidationError::new(
                format!("volumes[{i}].mount"),
                format!("two volumes are mounted at {}", v.mount),
            ));
        }
    }
    for (i, v) in new.iter().enumerate() {
        validate_mount(&format!("new_volumes[{i}].mount"), &v.mount)?;
        validate_volume_mb(&format!("new_volumes[{i}].size_mb"), v.size_mb)?;
        if !mounts.insert(v.mount.as_str()) {
            return Err(ValidationError::new(
                format!("new_volumes[{i}].mount"),
                format!("two volumes are mounted at {}", v.mount),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str, mount: &str) -> SandboxVolume {
        SandboxVolume {
            name: name.into(),
            mount: mount.into(),
            ..Default::default()
        }
    }

    #[test]
    fn sandbox_volumes() {
        let n = |mount: &str| NewSandboxVolume {
            mount: mount.into(),
            size_mb: 64,
        };
        assert!(validate_sandbox_volumes(&[v("a", "/a"), v("b", "/b")], &[n("/c")]).is_ok());
        let dup = validate_sandbox_volumes(&[v("a", "/a")], &[n("/a")]).unwrap_err();
        assert_eq!(dup.field, "new_volumes[0].mount");
        assert!(validate_sandbox_volumes(&[v("a", "/a"), v("a", "/b")], &[]).is_err());
        let etc = validate_sandbox_volumes(&[v("a", "/etc")], &[]).unwrap_err();
        assert_eq!(etc.field, "volumes[0].mount");
        assert!(validate_sandbox_volumes(&[v("A", "/a")], &[]).is_err());
        let mut sized = v("a", "/a");
        sized.size_mb = Some(64);
        assert!(validate_sandbox_volumes(std::slice::from_ref(&sized), &[]).is_err());
        sized.auto_create = true;
        assert!(validate_sandbox_volumes(&[sized], &[]).is_ok());
        let tiny = NewSandboxVolume {
            mount: "/t".into(),
            size_mb: 1,
        };
        assert!(validate_sandbox_volumes(&[], &[tiny]).is_err());
        assert!(CreateVolume {
            name: "x".into(),
            size_mb: MAX_VOLUME_MB + 1
        }
        .validate()
        .is_err());
    }
}
