//! Bodies of `/images`, `/tasks` and `POST /sandboxes/{id}/save-image`.

use serde::{Deserialize, Serialize};

use crate::{validate_image_name, validate_image_ref, VResult, ValidationError};

/// Registry credentials of a pull: `{username, password}` or `{token}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum RegistryAuth {
    /// HTTP basic credentials (also used to get a bearer token).
    Basic {
        #[schema(min_length = 1)]
        username: String,
        password: String,
    },
    /// A bearer token used as is.
    Token {
        #[schema(min_length = 1)]
        token: String,
    },
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Self::Token { .. } => f.write_str("Token(<redacted>)"),
        }
    }
}

/// `POST /images/pull`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    /// The registry reference, e.g. `docker.io/library/python:3.12`.
    #[serde(rename = "ref")]
    #[schema(value_type = crate::schema::ImageRef)]
    pub reference: String,
    /// The catalogue name; default: the repository's last component and
    /// the tag (`python:3.12`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::schema::ImageName>)]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schema::registry_auth)]
    pub auth: Option<RegistryAuth>,
}

impl PullImage {
    pub fn validate(&self) -> VResult {
        validate_image_ref("ref", &self.reference)?;
        if let Some(n) = &self.name {
            validate_image_name("name", n)?;
        }
        match &self.auth {
            Some(RegistryAuth::Basic { username, .. }) if username.is_empty() => {
                Err(ValidationError::new("auth.username", "must not be empty"))
            }
            Some(RegistryAuth::Token { token }) if token.is_empty() => {
                Err(ValidationError::new("auth.token", "must not be empty"))
            }
            _ => Ok(()),
        }
    }
}

/// `POST /sandboxes/{id}/save-image`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SaveImage {
    pub name: String,
}

/// The runtime defaults an image gives execs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageConfigView {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Entrypoint followed by cmd: what an exec with an empty `cmd` runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

/// An image in the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageView {
    pub name: String,
    /// Shared by the daemon's config (every user sees it; nobody deletes it).
    pub shared: bool,
    /// `pull`, `import`, `save` or `shared`.
    pub source: String,
    /// The registry reference it was pulled from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The image manifest's digest (pulls and OCI imports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The disk's apparent size.
    pub size_bytes: u64,
    pub config: ImageConfigView,
    /// RFC 3339.
    pub created_at: String,
}

/// `GET /images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageList {
    pub images: Vec<ImageView>,
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// What a running pull is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskPhase {
    Resolving,
    Downloading,
    Unpacking,
    Building,
}

/// Bytes done of a total (layer bytes while downloading).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskProgress {
    pub done: u64,
    pub total: u64,
}

/// A long operation (`POST /images/pull`), followed with `GET /tasks/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskView {
    pub id: String,
    /// `pull`.
    pub kind: String,
    pub state: TaskState,
    pub phase: TaskPhase,
    pub progress: TaskProgress,
    /// The reference being pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The catalogue entry, once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageView>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The HTTP status the failure would have as an answer (400 bad
    /// reference, 401 unauthorized, 404 not found, 429 quota, 502 registry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_status: Option<u16>,
    /// RFC 3339.
    pub created_at: String,
}

/// `POST /images/pull`'s answer (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskAccepted {
    pub task: TaskView,
}

/// `GET /tasks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskList {
    pub tasks: Vec<TaskView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_bodies_parse_and_validate() {
        let p: PullImage = serde_json::from_str(
            r#"{"ref":"127.0.0.1:5000/t/py:3.12","auth":{"username":"u","password":"p"}}"#,
        )
        .unwrap();
        assert!(matches!(p.auth, Some(RegistryAuth::Basic { .. })));
        p.validate().unwrap();
        let p: PullImage = serde_json::from_str(r#"{"ref":"x","auth":{"token":"t"}}"#).unwrap();
        assert!(matches!(p.auth, Some(RegistryAuth::Token { .. })));
        assert!(format!("{:?}", p.auth).contains("redacted"));
        assert!(serde_json::from_str::<PullImage>(r#"{"ref":"x","auth":{"user":"u"}}"#).is_err());
        let bad: PullImage = serde_json::from_str(r#"{"ref":"x y"}"#).unwrap();
        assert!(bad.validate().unwrap_err().to_string().starts_with("ref:"));
        let bad: PullImage = serde_json::from_str(r#"{"ref":"x","name":"A"}"#).unwrap();
        assert!(bad.validate().unwrap_err().to_string().starts_with("name:"));
    }
}
