//! Request and response bodies of the HTTP API, shared by the daemon and the
//! CLI, and the validation of everything a client sends.
//!
//! Request bodies reject unknown fields (a typo is an error, not a silently
//! ignored option). Every validation error names its field and says what is
//! allowed; the API answers it as `400 {"error": "<field>: <message>"}`.
//! Timestamps in responses are RFC 3339 UTC strings ([`rfc3339_ms`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod images;
pub use images::*;
mod volumes;
pub use volumes::*;
mod backups;
pub use backups::*;
pub mod schema;

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// A request value that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The field (JSON path), e.g. `name`, `env.FOO`, `labels`.
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

type VResult = Result<(), ValidationError>;

/// Longest sandbox/snapshot/user name.
pub const MAX_NAME_LEN: usize = 63;
/// Most environment entries in one request.
pub const MAX_ENV_ENTRIES: usize = 256;
/// Longest environment value (bytes).
pub const MAX_ENV_VALUE: usize = 32 * 1024;
/// Most labels on one sandbox.
pub const MAX_LABELS: usize = 64;
/// Longest label value (characters).
pub const MAX_LABEL_VALUE: usize = 256;
/// Largest `init` script (bytes).
pub const MAX_INIT: usize = 64 * 1024;
/// Longest guest path (bytes): Linux's `PATH_MAX` less its NUL.
pub const MAX_PATH: usize = 4095;
/// Longest component of a guest path (bytes): Linux's `NAME_MAX`.
pub const MAX_PATH_COMPONENT: usize = 255;
/// Most arguments in a command.
pub const MAX_ARGS: usize = 4096;
/// Largest command line, all arguments together (bytes).
pub const MAX_CMD_BYTES: usize = 256 * 1024;
/// Largest inline `stdin` of a buffered exec (bytes).
pub const MAX_STDIN: usize = 16 * 1024 * 1024;
/// Longest exec timeout (seconds).
pub const MAX_TIMEOUT_SEC: u64 = 24 * 3600;
/// Smallest memory a sandbox may have (MiB).
pub const MIN_MEMORY_MB: u32 = bhatti_engine::engine::MIN_MEMORY_MB;

fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A sandbox or checkpoint name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_name(field: &str, name: &str) -> VResult {
    if is_name(name) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "must be 1-{MAX_NAME_LEN} characters of lower-case letters, digits and '-', starting with a letter or digit (got {})",
                shown(name)
            ),
        ))
    }
}

/// A user name: the same rule as sandbox names.
pub fn validate_user_name(name: &str) -> VResult {
    validate_name("name", name)
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 256.
pub fn validate_env_key(field: &str, key: &str) -> VResult {
    let b = key.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 256
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "environment variable names must match [A-Za-z_][A-Za-z0-9_]* (got {})",
                shown(key)
            ),
        ))
    }
}

/// An environment map: valid names, values without NUL, bounded sizes.
pub fn validate_env(field: &str, env: &BTreeMap<String, String>) -> VResult {
    if env.len() > MAX_ENV_ENTRIES {
        return Err(ValidationError::new(
            field,
            format!("at most {MAX_ENV_ENTRIES} variables"),
        ));
    }
    for (k, v) in env {
        validate_env_key(field, k)?;
        if v.len() > MAX_ENV_VALUE {
            return Err(ValidationError::new(
                format!("{field}.{k}"),
                format!("value longer than {MAX_ENV_VALUE} bytes"),
            ));
        }
        if v.contains('\0') {
            return Err(ValidationError::new(
                format!("{field}.{k}"),
                "value contains a NUL byte",
            ));
        }
    }
    Ok(())
}

/// A path inside the guest: absolute, no NUL, no `..` component, at most
/// 4096 bytes.
pub fn validate_guest_path(field: &str, path: &str) -> VResult {
    if path.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if !path.starts_with('/') {
        return Err(ValidationError::new(
            field,
            format!("must be an absolute path (got {})", shown(path)),
        ));
    }
    if path.len() > MAX_PATH {
        return Err(ValidationError::new(
            field,
            format!("longer than {MAX_PATH} bytes"),
        ));
    }
    if path.contains('\0') {
        return Err(ValidationError::new(field, "contains a NUL byte"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(ValidationError::new(
            field,
            "must not contain '..' components",
        ));
    }
    if path.split('/').any(|c| c.len() > MAX_PATH_COMPONENT) {
        return Err(ValidationError::new(
            field,
            format!("has a component longer than {MAX_PATH_COMPONENT} bytes"),
        ));
    }
    Ok(())
}

/// vCPUs: 1 ..= `max` (and never above the engine's limit).
pub fn validate_cpus(cpus: u32, max: u32) -> VResult {
    let (min, max) = cpus_range(max);
    if cpus < min || cpus > max {
        return Err(ValidationError::new(
            "cpus",
            format!("must be between 1 and {max} (got {cpus})"),
        ));
    }
    Ok(())
}

/// Memory: the engine's minimum ..= `max` MiB.
pub fn validate_memory_mb(mb: u32, max: u32) -> VResult {
    let (_, max) = memory_mb_range(max);
    if mb < MIN_MEMORY_MB || mb > max {
        return Err(ValidationError::new(
            "memory_mb",
            format!("must be between {MIN_MEMORY_MB} and {max} (got {mb})"),
        ));
    }
    Ok(())
}

/// Root disk size: the engine's minimum ..= `max` MiB.
pub fn validate_disk_mb(mb: u64, max: u64) -> VResult {
    let (min, max) = disk_mb_range(max);
    if mb < min || mb > max {
        return Err(ValidationError::new(
            "disk_mb",
            format!("must be between {min} and {max} (got {mb})"),
        ));
    }
    Ok(())
}

/// The vCPUs allowed under a configured `max`.
pub fn cpus_range(max: u32) -> (u32, u32) {
    (1, max.min(bhatti_engine::engine::MAX_CPUS))
}

/// The memory (MiB) allowed under a configured `max`.
pub fn memory_mb_range(max: u32) -> (u32, u32) {
    (MIN_MEMORY_MB, max.min(bhatti_engine::engine::MAX_MEMORY_MB))
}

/// The root disk sizes (MiB) allowed under a configured `max`.
pub fn disk_mb_range(max: u64) -> (u64, u64) {
    (
        bhatti_engine::engine::MIN_DISK_MB,
        max.min(bhatti_engine::engine::MAX_DISK_MB),
    )
}

/// Labels: at most 64; keys `[A-Za-z0-9][A-Za-z0-9._/-]{0,62}`; values at
/// most 256 bytes without control characters.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> VResult {
    if labels.len() > MAX_LABELS {
        return Err(ValidationError::new(
            "labels",
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    for (k, v) in labels {
        let b = k.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'/' | b'-'));
        if !ok {
            return Err(ValidationError::new(
                "labels",
                format!("label keys must be 1-63 characters of letters, digits, '.', '_', '/', '-' starting with a letter or digit (got {})", shown(k)),
            ));
        }
        if v.chars().count() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(ValidationError::new(
                format!("labels.{k}"),
                format!(
                    "values must be at most {MAX_LABEL_VALUE} characters, none a control character"
                ),
            ));
        }
    }
    Ok(())
}

/// A command: at least the program, no NUL, bounded size.
pub fn validate_cmd(cmd: &[String]) -> VResult {
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err(ValidationError::new(
            "cmd",
            "must name a program, e.g. [\"ls\", \"-l\"]",
        ));
    }
    if cmd.len() > MAX_ARGS {
        return Err(ValidationError::new(
            "cmd",
            format!("at most {MAX_ARGS} arguments"),
        ));
    }
    if cmd.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_CMD_BYTES {
        return Err(ValidationError::new(
            "cmd",
            format!("longer than {MAX_CMD_BYTES} bytes in all"),
        ));
    }
    if cmd.iter().any(|a| a.contains('\0')) {
        return Err(ValidationError::new(
            "cmd",
            "arguments must not contain NUL bytes",
        ));
    }
    Ok(())
}

/// A value quoted for an error message, cut to a readable length.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(70).collect();
    if cut.len() < s.len() {
        format!("{:?}…", cut)
    } else {
        format!("{cut:?}")
    }
}

// ---------------------------------------------------------------------------
// Sandboxes
// ---------------------------------------------------------------------------

/// `POST /sandboxes`. Absent sizes take the daemon's defaults. Idempotent by
/// name: an existing name answers 200 with that sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CreateSandbox {
    /// The daemon picks one when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::Name>)]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    /// Environment of every command in the sandbox.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = schema::env)]
    pub env: BTreeMap<String, String>,
    /// Shell script run once at first boot, as the sandbox user, as the
    /// session `init` (listed with the sessions, its output theirs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// Never pause or snapshot this sandbox when idle.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub keep_hot: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = schema::labels)]
    pub labels: BTreeMap<String, String>,
    /// Names of the caller's secrets to put into the sandbox's environment.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = schema::secret_names)]
    pub secrets: Vec<String>,
    /// Start from this checkpoint (same as `POST /snapshots/{name}/resume`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::Name>)]
    pub from_snapshot: Option<String>,
    /// Root disk from this image: a catalogue name (the caller's, then
    /// shared) or a registry reference, pulled on demand.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::ImageRef>)]
    pub image: Option<String>,
    /// Start from this template (its image, sizes, env, secrets, init and
    /// keep_hot; fields given here override it).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::Name>)]
    pub template: Option<String>,
    /// Egress policy; absent: the daemon's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
    /// Volumes to mount (read-write by one sandbox, or read-only by many).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<SandboxVolume>,
    /// Empty volumes made for this sandbox and deleted with it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub new_volumes: Vec<NewSandboxVolume>,
    /// Files placed before anything runs in it (before `init`), once: at
    /// its first boot, or right after the restore of an instant create or
    /// fork. Under the user's home or `/workspace` the user owns them,
    /// elsewhere root.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<CreateFile>,
    /// Answer only once `init` has ended (or `vm.init_wait_timeout_secs`
    /// passed); `init` in the answer says how it ended.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub wait_init: bool,
}

/// One file of a create.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFile {
    /// Absolute and normalized; not under /proc, /sys or /dev.
    pub path: String,
    /// The bytes, base64 (standard alphabet, padded).
    #[schema(format = Byte)]
    pub content: String,
    /// Permission bits, at most 0o7777 (JSON has no octal: 0o600 is 384);
    /// default 0o644.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// Most files in one create.
pub const MAX_FILES: usize = bhatti_engine::engine::MAX_FILES;
/// Their decoded bytes together.
pub const MAX_FILES_BYTES: usize = bhatti_engine::engine::MAX_FILES_BYTES;

impl CreateFile {
    /// A local file's bytes for `path`.
    pub fn new(path: String, content: &[u8], mode: Option<u32>) -> CreateFile {
        CreateFile {
            path,
            content: bhatti_protocol::guest_config::base64_bytes::encode(content),
            mode,
        }
    }
}

/// The files of a create as the guest gets them: paths, modes, sizes and
/// base64 checked (field `files[i]…` in errors).
pub fn decode_files(
    files: &[CreateFile],
) -> Result<Vec<bhatti_protocol::guest_config::GuestFile>, ValidationError> {
    if files.len() > MAX_FILES {
        return Err(ValidationError::new(
            "files",
            format!("at most {MAX_FILES} files"),
        ));
    }
    let mut out = Vec::with_capacity(files.len());
    let mut total = 0usize;
    for (i, f) in files.iter().enumerate() {
        bhatti_engine::engine::validate_file_path(&f.path)
            .map_err(|m| ValidationError::new(format!("files[{i}].path"), m))?;
        if let Some(m) = f.mode.filter(|&m| m > 0o7777) {
            return Err(ValidationError::new(
                format!("files[{i}].mode"),
                format!("{m} ({m:#o}) is above 0o7777"),
            ));
        }
        // Checked before decoding: a huge body fails fast.
        total += f.content.len() / 4 * 3;
        if total > MAX_FILES_BYTES + 2 * files.len() {
            return Err(ValidationError::new(
                "files",
                format!("more than {MAX_FILES_BYTES} bytes together"),
            ));
        }
        let content = bhatti_protocol::guest_config::base64_bytes::decode(&f.content)
            .map_err(|m| ValidationError::new(format!("files[{i}].content"), m))?;
        out.push(bhatti_protocol::guest_config::GuestFile {
            path: f.path.clone(),
            mode: f.mode,
            content,
        });
    }
    bhatti_engine::engine::validate_files(&out).map_err(|m| ValidationError::new("files", m))?;
    Ok(out)
}

/// How a sandbox's `init` went, as its create saw it (the session `init`
/// in `GET /sandboxes/{id}/sessions` is the live truth).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InitView {
    /// `running` (still, when the create answered), `succeeded`, `failed`
    /// (a non-zero exit, or it did not start) or `timed_out` (the create
    /// stopped waiting; it runs on).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A sandbox's egress policy as clients send it (`network` in create and
/// PATCH). Rules are `CIDR`, `ADDR`, `CIDR:PORT` or `CIDR:LO-HI` (a port
/// means TCP and UDP). Deny rules win over allow rules; the daemon's
/// blocked ranges (private, link-local, metadata…) are never reachable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkPolicy {
    /// `allow` (everything but `deny`) or `deny` (nothing but `allow`).
    /// Absent: on create the daemon's default, on PATCH the current one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl NetworkPolicy {
    /// The policy it describes, `egress` defaulting to `default`.
    pub fn to_policy(
        &self,
        default: bhatti_engine::net::egress::Egress,
    ) -> Result<bhatti_engine::net::egress::EgressPolicy, ValidationError> {
        use bhatti_engine::net::egress::{EgressPolicy, EgressRule};
        let egress = match &self.egress {
            Some(e) => e
                .parse()
                .map_err(|m: String| ValidationError::new("network.egress", m))?,
            None => default,
        };
        let rules = |field: &str, v: &[String]| {
            v.iter()
                .map(|r| {
                    r.parse::<EgressRule>()
                        .map_err(|m| ValidationError::new(field, m))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        EgressPolicy {
            egress,
            allow: rules("network.allow", &self.allow)?,
            deny: rules("network.deny", &self.deny)?,
        }
        .normalized()
        .map_err(|m| ValidationError::new("network", m))
    }
}

/// A sandbox's network as `GET /sandboxes/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkView {
    pub ip: String,
    pub gateway: String,
    /// What its siblings resolve it by, e.g. `web.sb` (and plain `web`).
    pub dns_name: String,
    /// `allow` or `deny`.
    pub egress: String,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

/// Hard bounds a request is checked against (the config's `[vm]` maxima; the
/// user's caps are checked separately, by the daemon's `auth::EffectiveCaps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeBounds {
    pub max_cpus: u32,
    pub max_memory_mb: u32,
    pub max_disk_mb: u64,
}

impl CreateSandbox {
    /// Checks every field; sizes against `bounds`.
    pub fn validate(&self, bounds: &SizeBounds) -> VResult {
        if let Some(n) = &self.name {
            validate_name("name", n)?;
        }
        if let Some(c) = self.cpus {
            validate_cpus(c, bounds.max_cpus)?;
        }
        if let Some(m) = self.memory_mb {
            validate_memory_mb(m, bounds.max_memory_mb)?;
        }
        if let Some(d) = self.disk_mb {
            validate_disk_mb(d, bounds.max_disk_mb)?;
        }
        validate_env("env", &self.env)?;
        if let Some(init) = &self.init {
            if init.len() > MAX_INIT {
                return Err(ValidationError::new(
                    "init",
                    format!("longer than {MAX_INIT} bytes"),
                ));
            }
            if init.contains('\0') {
                return Err(ValidationError::new("init", "contains a NUL byte"));
            }
        }
        validate_labels(&self.labels)?;
        if self.secrets.len() > MAX_ENV_ENTRIES {
            return Err(ValidationError::new(
                "secrets",
                format!("at most {MAX_ENV_ENTRIES} secrets"),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.secrets {
            validate_secret_name(s).map_err(|e| ValidationError::new("secrets", e.message))?;
            if !seen.insert(s) {
                return Err(ValidationError::new(
                    "secrets",
                    format!("{s} is listed twice"),
                ));
            }
            if self.env.contains_key(s) {
                return Err(ValidationError::new(
                    "secrets",
                    format!("{s} is also set in env; set it in one place"),
                ));
            }
        }
        if let Some(snap) = &self.from_snapshot {
            validate_name("from_snapshot", snap)?;
        }
        if let Some(image) = &self.image {
            validate_image_ref("image", image)?;
        }
        if let Some(t) = &self.template {
            validate_name("template", t)?;
        }
        if self.from_snapshot.is_some() && (self.image.is_some() || self.template.is_some()) {
            return Err(ValidationError::new(
                "from_snapshot",
                "a fork takes its disk from the checkpoint: give no image or template",
            ));
        }
        if let Some(n) = &self.network {
            n.to_policy(Default::default())?;
        }
        validate_sandbox_volumes(&self.volumes, &self.new_volumes)?;
        if self.from_snapshot.is_some() && !(self.volumes.is_empty() && self.new_volumes.is_empty())
        {
            return Err(ValidationError::new(
                "from_snapshot",
                "a fork takes its volumes from the checkpoint: give no volumes",
            ));
        }
        decode_files(&self.files)?;
        if self.wait_init && self.from_snapshot.is_some() {
            return Err(ValidationError::new(
                "wait_init",
                "a fork's init ran in its source",
            ));
        }
        Ok(())
    }
}

/// Longest image name or reference.
pub const MAX_IMAGE_REF: usize = 255;

/// A catalogue name: 1–128 of `a-z 0-9 . _ : -`, starting with a letter or
/// digit (e.g. `python:3.12`, `my-app`).
pub fn validate_image_name(field: &str, name: &str) -> VResult {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b':' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("invalid image name {name:?}: use 1 to 128 of a-z, 0-9, '.', '_', ':' and '-', starting with a letter or digit"),
        ))
    }
}

/// A catalogue name or a registry reference (`[host[:port]/]path[:tag][@digest]`):
/// checked for shape only; the registry client parses it fully.
pub fn validate_image_ref(field: &str, r: &str) -> VResult {
    let ok = !r.is_empty()
        && r.len() <= MAX_IMAGE_REF
        && r.as_bytes()[0].is_ascii_alphanumeric()
        && r.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-' | b'/' | b'@')
        });
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!("invalid image name or reference {r:?}"),
        ))
    }
}

/// `POST /templates`: a named recipe for sandboxes, kept pre-booted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CreateTemplate {
    #[schema(value_type = schema::Name)]
    pub name: String,
    /// Catalogue image (absent: the default rootfs).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::ImageRef>)]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = schema::env)]
    pub env: BTreeMap<String, String>,
    /// Names of the owner's secrets, given to each sandbox when it is
    /// created (never to the pre-booted snapshot).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = schema::secret_names)]
    pub secrets: Vec<String>,
    /// Script run once, before the pre-booted snapshot is taken; every
    /// sandbox from the template starts with its result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub keep_hot: bool,
}

impl CreateTemplate {
    /// Checks every field; sizes against `bounds`.
    pub fn validate(&self, bounds: &SizeBounds) -> VResult {
        validate_name("name", &self.name)?;
        let as_create = CreateSandbox {
            cpus: self.cpus,
            memory_mb: self.memory_mb,
            disk_mb: self.disk_mb,
            env: self.env.clone(),
            init: self.init.clone(),
            secrets: self.secrets.clone(),
            image: self.image.clone(),
            ..Default::default()
        };
        as_create.validate(bounds)
    }
}

/// The state of a template's pre-booted snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PrebootedView {
    /// `none`, `building`, `ready` or `failed`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// RFC 3339, when ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_at: Option<String>,
    /// How long booting, `init` and the checkpoint took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
    /// The last lines of `init`'s output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_output: Option<String>,
}

/// A template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TemplateView {
    #[serde(flatten)]
    #[schema(schema_with = template_spec_schema)]
    pub spec: CreateTemplate,
    /// RFC 3339.
    pub created_at: String,
    pub prebooted: PrebootedView,
}

/// [`CreateTemplate`]'s schema without `additionalProperties: false`
/// (from `deny_unknown_fields`): flattened into [`TemplateView`], that
/// would forbid the view's own fields (found by schemathesis).
fn template_spec_schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::RefOr;
    use utoipa::PartialSchema;
    match CreateTemplate::schema() {
        RefOr::T(Schema::Object(mut o)) => {
            o.additional_properties = None;
            RefOr::T(Schema::Object(o))
        }
        other => other,
    }
}

/// `GET /templates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TemplateList {
    pub templates: Vec<TemplateView>,
}

/// `PATCH /sandboxes/{id}`: fields present are changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PatchSandbox {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_hot: Option<bool>,
    /// Replaces all labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::labels_or_null)]
    pub labels: Option<BTreeMap<String, String>>,
    /// A new name; siblings resolve it at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::Name>)]
    pub name: Option<String>,
    /// Replaces the egress policy; applies at once, also to open
    /// connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
}

impl PatchSandbox {
    pub fn validate(&self) -> VResult {
        if let Some(l) = &self.labels {
            validate_labels(l)?;
        }
        if let Some(n) = &self.name {
            validate_name("name", n)?;
        }
        if let Some(n) = &self.network {
            n.to_policy(Default::default())?;
        }
        Ok(())
    }
}

/// What the API says a sandbox is doing. Pausing and snapshotting to disk
/// when idle are invisible here (see [`Thermal`]): an idle sandbox is
/// `running`; `stopped` is only ever the result of `POST …/stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxStatus {
    Creating,
    Running,
    Stopped,
    Failed,
}

impl SandboxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Creating => "creating",
            SandboxStatus::Running => "running",
            SandboxStatus::Stopped => "stopped",
            SandboxStatus::Failed => "failed",
        }
    }
}

impl std::fmt::Display for SandboxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SandboxStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "creating" => SandboxStatus::Creating,
            "running" => SandboxStatus::Running,
            "stopped" => SandboxStatus::Stopped,
            "failed" => SandboxStatus::Failed,
            _ => return Err(format!("unknown sandbox status {s:?}")),
        })
    }
}

/// Where a sandbox is on the idle ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Thermal {
    /// vCPUs running.
    Hot,
    /// VMM alive, vCPUs paused.
    Warm,
    /// No VMM; memory on disk.
    Cold,
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SandboxView {
    pub id: String,
    pub name: String,
    pub status: SandboxStatus,
    pub thermal: Thermal,
    pub cpus: u32,
    pub memory_mb: u32,
    /// `None`: the base image's size.
    pub disk_mb: Option<u64>,
    pub keep_hot: bool,
    pub labels: BTreeMap<String, String>,
    /// The guest's address on its bridge, when networked.
    pub ip: Option<String>,
    /// Address, gateway, DNS name and egress policy, when networked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkView>,
    /// RFC 3339.
    pub created_at: String,
    /// Why it is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The image its root disk came from, when not the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The template it was created from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// How it came to be: `boot` (a fresh boot), `instant` (restored from
    /// a pre-booted snapshot) or `fork` (from a checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Idle timers and activity (`GET /sandboxes/{id}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thermal_info: Option<bhatti_engine::thermal::ThermalInfo>,
    /// How its `init` went, as its create saw it (absent: no init).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitView>,
    /// Its volumes: where each is mounted and how (`GET /sandboxes/{id}`
    /// and create answers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<SandboxVolumeView>,
}

/// A volume as a sandbox has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SandboxVolumeView {
    pub name: String,
    pub mount: String,
    pub read_only: bool,
}

/// `GET /sandboxes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxView>,
}

// ---------------------------------------------------------------------------
// Exec
// ---------------------------------------------------------------------------

/// `POST /sandboxes/{id}/exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments (no shell; use `["sh", "-c", "…"]` for one).
    #[schema(schema_with = schema::command, required = true)]
    pub cmd: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(schema_with = schema::env)]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute); default the user's home.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::GuestPath>)]
    pub cwd: Option<String>,
    /// Bytes written to the command's stdin, which is then closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill the command's process group after this many seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::timeout_sec)]
    pub timeout_sec: Option<u64>,
    /// Start it and return at once; it keeps running.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub detach: bool,
}

impl ExecRequest {
    pub fn validate(&self) -> VResult {
        validate_cmd(&self.cmd)?;
        validate_env("env", &self.env)?;
        if let Some(cwd) = &self.cwd {
            validate_guest_path("cwd", cwd)?;
        }
        if let Some(stdin) = &self.stdin {
            if stdin.len() > MAX_STDIN {
                return Err(ValidationError::new(
                    "stdin",
                    format!("longer than {MAX_STDIN} bytes"),
                ));
            }
        }
        if let Some(t) = self.timeout_sec {
            if t == 0 || t > MAX_TIMEOUT_SEC {
                return Err(ValidationError::new(
                    "timeout_sec",
                    format!("must be between 1 and {MAX_TIMEOUT_SEC} (got {t})"),
                ));
            }
        }
        Ok(())
    }
}

/// The buffered answer to an exec. Each of stdout and stderr holds at most
/// the daemon's `[limits] exec_output_max_bytes` bytes of output (default
/// 10 MiB); the command still runs to its end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecResult {
    /// The exit code; 128+n when killed by signal n.
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The timeout killed it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// The command printed more than the limit to stdout: `stdout` is the
    /// first bytes of it, the rest was dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdout_truncated: bool,
    /// Likewise for stderr.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stderr_truncated: bool,
}

/// One line of an `application/x-ndjson` exec stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    /// The last line when the command ran to its end.
    Exit {
        exit_code: i32,
    },
    /// The last line when the stream failed.
    Error {
        error: String,
    },
}

impl ExecEvent {
    /// The event as one NDJSON line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("ExecEvent serializes");
        s.push('\n');
        s
    }
}

/// Turns a byte stream into UTF-8 text chunks without splitting a character
/// across two chunks: an incomplete sequence at a chunk's end waits for the
/// next; invalid bytes become U+FFFD. One per output stream.
#[derive(Debug, Default)]
pub struct Utf8Chunker {
    pending: Vec<u8>,
}

impl Utf8Chunker {
    /// The text decodable so far ("" when all of `bytes` waits).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..good]).expect("valid prefix"));
                    match e.error_len() {
                        // Incomplete at the end: keep it for the next chunk.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    /// What is left at the end of the stream.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

// ---------------------------------------------------------------------------
// Files, checkpoints, secrets, users, errors
// ---------------------------------------------------------------------------

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One entry of `GET /sandboxes/{id}/files?path=…&ls=true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileEntry {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits, e.g. 420 (0o644).
    pub mode: u32,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// Modification time, Unix milliseconds.
    #[serde(default)]
    pub mtime_ms: i64,
    /// The same time, RFC 3339.
    pub modified_at: String,
}

impl From<&bhatti_protocol::message::FileStat> for FileEntry {
    fn from(s: &bhatti_protocol::message::FileStat) -> Self {
        use bhatti_protocol::message::FileKind as K;
        FileEntry {
            name: s.name.clone(),
            kind: match s.kind {
                K::File => FileKind::File,
                K::Dir => FileKind::Dir,
                K::Symlink => FileKind::Symlink,
                K::Other => FileKind::Other,
            },
            size: s.size,
            mode: s.mode & 0o7777,
            uid: s.uid,
            gid: s.gid,
            mtime_ms: s.mtime_ms,
            modified_at: rfc3339_ms(s.mtime_ms),
        }
    }
}

/// A directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileList {
    pub path: String,
    pub entries: Vec<FileEntry>,
    /// The directory had more entries than were listed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Query of `GET|PUT|HEAD /sandboxes/{id}/files`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileQuery {
    pub path: String,
    /// First line to return (0-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Most lines to return.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Most bytes to return.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// List a directory as JSON instead of reading a file.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ls: bool,
}

impl FileQuery {
    pub fn validate(&self) -> VResult {
        validate_guest_path("path", &self.path)
    }
}

/// `POST /sandboxes/{id}/checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    #[schema(value_type = schema::Name)]
    pub name: String,
}

impl CheckpointRequest {
    pub fn validate(&self) -> VResult {
        validate_name("name", &self.name)
    }
}

/// `POST /snapshots/{name}/resume`: the new sandbox's name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ResumeRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::Name>)]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_hot: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::labels_or_null)]
    pub labels: Option<BTreeMap<String, String>>,
}

impl ResumeRequest {
    pub fn validate(&self) -> VResult {
        if let Some(n) = &self.name {
            validate_name("name", n)?;
        }
        if let Some(l) = &self.labels {
            validate_labels(l)?;
        }
        Ok(())
    }
}

/// A checkpoint as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Checkpoint {
    pub name: String,
    /// The sandbox it was taken from.
    pub sandbox_id: String,
    pub size_bytes: u64,
    /// RFC 3339.
    pub created_at: String,
}

/// `PUT /secrets/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    /// The path's name, if given. Kept for clients that send it, left out
    /// of the document (a name that differs from the path's is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub name: Option<String>,
    /// UTF-8 text without NUL, at most 64 KiB (the schema's bound counts
    /// characters).
    #[schema(pattern = r"^[^\x00]*$", max_length = 65536)]
    pub value: String,
}

/// A secret as the API shows it: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecretView {
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
    pub updated_at: String,
}

/// A user as `bhatti user list --json` shows it (no key, no hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    pub id: String,
    pub name: String,
    /// Effective caps (overrides or the config's defaults).
    pub max_sandboxes: u32,
    pub max_cpus: u32,
    pub max_memory_mb: u32,
    pub max_snapshots: u32,
    /// RFC 3339.
    pub created_at: String,
}

/// `bhatti user create|rotate-key --json`: the key, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedKeyView {
    pub name: String,
    pub api_key: String,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    /// The VMM backend: `qemu` or `firecracker`.
    #[serde(default)]
    pub backend: String,
}

/// `POST /sandboxes/{id}/start`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct StartRequest {
    /// Boot from the disk, ignoring the memory snapshot.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
}

/// The answer to a detached exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExecDetached {
    pub pid: u32,
}

/// `PUT /sandboxes/{id}/files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WriteResult {
    pub bytes: u64,
}

/// How a session's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionExit {
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// One PTY session (`GET /sandboxes/{id}/sessions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionView {
    pub id: String,
    pub pid: u32,
    pub argv: Vec<String>,
    pub rows: u16,
    pub cols: u16,
    /// WebSocket clients attached now.
    pub attached: u32,
    /// `null` while it runs.
    pub exit: Option<SessionExit>,
    /// Offset of the next output byte.
    pub end_offset: u64,
    /// Oldest offset still replayable.
    pub start_offset: u64,
    pub started_unix_ms: i64,
    /// A piped session (`/exec/ws`), not a terminal.
    #[serde(default)]
    pub piped: bool,
}

impl From<&bhatti_protocol::message::SessionInfo> for SessionView {
    fn from(s: &bhatti_protocol::message::SessionInfo) -> Self {
        SessionView {
            id: s.id.clone(),
            pid: s.pid,
            argv: s.argv.clone(),
            rows: s.rows,
            cols: s.cols,
            attached: s.attached,
            exit: s.exit.map(|e| SessionExit {
                exit_code: e.exit_code,
                signal: e.signal,
            }),
            end_offset: s.end_offset,
            start_offset: s.start_offset,
            started_unix_ms: s.started_unix_ms,
            piped: s.piped,
        }
    }
}

/// `GET /sandboxes/{id}/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

/// `GET /snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointList {
    pub snapshots: Vec<Checkpoint>,
}

/// `GET /secrets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecretList {
    pub secrets: Vec<SecretView>,
}

/// Text frames of `GET /sandboxes/{id}/ws`, server → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ShellServerMessage {
    /// First frame: the session, and the offset of the first output byte
    /// that follows; `gap` is output asked for but no longer held.
    Session {
        id: String,
        offset: u64,
        gap: Option<ShellGap>,
    },
    /// Output `[from, to)` was lost to this client (it fell behind).
    Gap { from: u64, to: u64 },
    /// The session's process ended; `offset` is the end of its output.
    Exit { exit_code: i32, offset: u64 },
    /// This client detached; reattach from `offset`.
    Detached { offset: u64 },
    /// The bridge to the guest failed.
    Error { error: String },
}

/// Bytes `[from, to)` of a session's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShellGap {
    pub from: u64,
    pub to: u64,
}

/// Text frames of `GET /sandboxes/{id}/ws`, client → server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ShellClientMessage {
    Resize { rows: u16, cols: u16 },
    Detach,
}

/// `POST /sandboxes/{id}/shell-token`: a link that opens the sandbox's
/// terminal in a browser. The token is shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShellTokenView {
    /// `bhs_` + 64 hex characters.
    pub token: String,
    /// `/_shell/{id}#token=…`, absolute when the daemon has `[shell]
    /// public_url`; the token is in the fragment, which browsers never send.
    pub url: String,
    /// RFC 3339; the link is refused from then on.
    pub expires_at: String,
}

/// `GET /_shell/{id}/token`: the shell link's token is live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShellTokenCheck {
    pub sandbox_id: String,
    pub expires_at: String,
}

/// The first text message of `GET /sandboxes/{id}/exec/ws`: either a
/// command to start (`cmd`, with `env` and `cwd`) or a session to
/// reattach (`attach`, replaying from `offset`; default all that is held).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecWsStart {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// A session id, instead of `cmd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl ExecWsStart {
    pub fn validate(&self) -> VResult {
        match (&self.cmd, &self.attach) {
            (Some(cmd), None) => {
                validate_cmd(cmd)?;
                validate_env("env", &self.env)?;
                if let Some(cwd) = &self.cwd {
                    validate_guest_path("cwd", cwd)?;
                }
                if self.offset.is_some() {
                    return Err(ValidationError::new("offset", "only with attach"));
                }
            }
            (None, Some(id)) => {
                if id.is_empty() || id.len() > 64 {
                    return Err(ValidationError::new("attach", "must be a session id"));
                }
                if !self.env.is_empty() || self.cwd.is_some() {
                    return Err(ValidationError::new(
                        "attach",
                        "env and cwd are for a new command (cmd)",
                    ));
                }
            }
            _ => {
                return Err(ValidationError::new(
                    "cmd",
                    "give either cmd (a new command) or attach (a session id)",
                ))
            }
        }
        Ok(())
    }
}

/// Text messages of `GET /sandboxes/{id}/exec/ws`, server → client.
/// Output offsets count bytes of stdout and stderr together, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecWsServerMessage {
    /// First message: the session, and the offset of the first output
    /// byte that follows; `gap` is output asked for but no longer held.
    Started {
        session: String,
        pid: u32,
        offset: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gap: Option<ShellGap>,
    },
    /// Output bytes `[offset, end)`: `data` when they are UTF-8, else
    /// `data_b64` (standard base64). Reattach from `end` to resume.
    Stdout {
        offset: u64,
        end: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
    },
    /// Like `stdout`, from stderr.
    Stderr {
        offset: u64,
        end: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
    },
    /// Output `[from, to)` was lost to this client (it fell behind the
    /// scrollback); output continues at `to`.
    Gap { from: u64, to: u64 },
    /// The command ended; `offset` is the end of its output. Last message.
    Exit {
        exit_code: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        offset: u64,
    },
    /// The client asked to detach; reattach from `offset`. Last message.
    Detached { offset: u64 },
    /// A bad first message, or the bridge to the guest failed. Last message.
    Error { error: String },
}

/// Text messages of `GET /sandboxes/{id}/exec/ws`, client → server, after
/// the first. A binary message is stdin too; closing the socket detaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecWsClientMessage {
    /// Bytes for the command's stdin.
    Stdin { data: String },
    /// Close the command's stdin.
    Eof,
    /// Signal the command's process group.
    Signal { signal: i32 },
    /// Detach (the command runs on); the server answers `detached`.
    Detach,
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Every error body: `{"error": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiError {
    pub error: String,
}

impl ApiError {
    pub fn new(msg: impl Into<String>) -> ApiError {
        ApiError { error: msg.into() }
    }
}

impl From<&ValidationError> for ApiError {
    fn from(e: &ValidationError) -> Self {
        ApiError::new(e.to_string())
    }
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds, e.g.
/// `2024-05-01T12:34:56.789Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> SizeBounds {
        SizeBounds {
            max_cpus: 8,
            max_memory_mb: 8192,
            max_disk_mb: 10240,
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "0", "web-1", "a-", &"a".repeat(63)] {
            validate_name("name", ok).unwrap();
        }
        for bad in ["", "-a", "A", "a_b", "a.b", "a b", "ü", &"a".repeat(64)] {
            let e = validate_name("name", bad).unwrap_err();
            assert_eq!(e.field, "name");
            assert!(e.to_string().starts_with("name: must be 1-63"), "{e}");
        }
        let long = validate_name("name", &"X".repeat(500))
            .unwrap_err()
            .to_string();
        assert!(long.len() < 300, "{long}");
    }

    #[test]
    fn env_keys_and_values() {
        validate_env_key("env", "PATH").unwrap();
        validate_env_key("env", "_x1").unwrap();
        for bad in ["", "1A", "A-B", "A=B", "A B"] {
            assert!(validate_env_key("env", bad)
                .unwrap_err()
                .to_string()
                .contains("[A-Za-z_]"));
        }
        let mut env = BTreeMap::from([("A".to_string(), "x\0y".to_string())]);
        assert_eq!(validate_env("env", &env).unwrap_err().field, "env.A");
        env.insert("A".into(), "x".repeat(MAX_ENV_VALUE + 1));
        assert!(validate_env("env", &env).is_err());
        let many: BTreeMap<_, _> = (0..=MAX_ENV_ENTRIES)
            .map(|i| (format!("V{i}"), String::new()))
            .collect();
        assert!(validate_env("env", &many).is_err());
    }

    #[test]
    fn paths() {
        validate_guest_path("path", "/").unwrap();
        validate_guest_path("path", "/home/lohar/a b.txt").unwrap();
        validate_guest_path("path", "/a/..b/c..").unwrap();
        assert!(validate_guest_path("path", "").is_err());
        assert!(validate_guest_path("path", "rel/x")
            .unwrap_err()
            .to_string()
            .contains("absolute"));
        assert!(validate_guest_path("path", "/a/../etc")
            .unwrap_err()
            .to_string()
            .contains(".."));
        assert!(validate_guest_path("path", "/a\0b").is_err());
        assert!(validate_guest_path("path", &format!("/{}", "a".repeat(MAX_PATH))).is_err());
    }

    #[test]
    fn sizes() {
        validate_cpus(1, 8).unwrap();
        validate_cpus(8, 8).unwrap();
        assert_eq!(
            validate_cpus(0, 8).unwrap_err().to_string(),
            "cpus: must be between 1 and 8 (got 0)"
        );
        assert!(validate_cpus(9, 8).is_err());
        validate_memory_mb(128, 1024).unwrap();
        assert!(validate_memory_mb(127, 1024)
            .unwrap_err()
            .to_string()
            .starts_with("memory_mb:"));
        assert!(validate_memory_mb(2048, 1024).is_err());
        assert!(validate_disk_mb(0, 100).is_err());
        assert!(validate_disk_mb(63, 100).is_err());
        validate_disk_mb(100, 100).unwrap();
        // The API accepts exactly what the engine does.
        let spec = |m: u32, d: u64| bhatti_engine::engine::CreateSpec {
            memory_mb: m,
            disk_mb: Some(d),
            ..Default::default()
        };
        for (m, d) in [
            (127, 64),
            (128, 63),
            (128, 64),
            (262_144, 4 << 20),
            (262_145, 64),
        ] {
            assert_eq!(
                validate_memory_mb(m, u32::MAX).is_ok() && validate_disk_mb(d, u64::MAX).is_ok(),
                spec(m, d).validate().is_ok(),
                "{m} MiB, {d} MiB disk"
            );
        }
    }

    #[test]
    fn labels() {
        validate_labels(&BTreeMap::from([(
            "app.kubernetes.io/name".into(),
            "web".into(),
        )]))
        .unwrap();
        assert!(validate_labels(&BTreeMap::from([("".into(), "x".into())])).is_err());
        assert!(validate_labels(&BTreeMap::from([("-a".into(), "x".into())])).is_err());
        let e = validate_labels(&BTreeMap::from([("a".into(), "x\ny".into())])).unwrap_err();
        assert_eq!(e.field, "labels.a");
    }

    #[test]
    fn create_request() {
        let body = r#"{"name":"web","cpus":2,"memory_mb":1024,"env":{"A":"1"},"secrets":["TOKEN"],"labels":{"k":"v"},"keep_hot":true}"#;
        let c: CreateSandbox = serde_json::from_str(body).unwrap();
        c.validate(&bounds()).unwrap();
        assert!(c.keep_hot);
        // Empty body is valid: everything defaults.
        let c: CreateSandbox = serde_json::from_str("{}").unwrap();
        c.validate(&bounds()).unwrap();
        // Unknown fields are errors naming the field.
        let e = serde_json::from_str::<CreateSandbox>(r#"{"nmae":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nmae"), "{e}");
        let e = serde_json::from_str::<CreateSandbox>(r#"{"cpus":-1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid value"), "{e}");

        let bad = |c: CreateSandbox, field: &str| {
            let e = c.validate(&bounds()).unwrap_err();
            assert!(e.field.starts_with(field), "{e} should be about {field}");
        };
        bad(
            CreateSandbox {
                name: Some("Web".into()),
                ..Default::default()
            },
            "name",
        );
        bad(
            CreateSandbox {
                cpus: Some(9),
                ..Default::default()
            },
            "cpus",
        );
        bad(
            CreateSandbox {
                memory_mb: Some(16),
                ..Default::default()
            },
            "memory_mb",
        );
        bad(
            CreateSandbox {
                disk_mb: Some(0),
                ..Default::default()
            },
            "disk_mb",
        );
        bad(
            CreateSandbox {
                init: Some("a\0".into()),
                ..Default::default()
            },
            "init",
        );
        bad(
            CreateSandbox {
                secrets: vec!["lower".into()],
                ..Default::default()
            },
            "secrets",
        );
        bad(
            CreateSandbox {
                secrets: vec!["A".into(), "A".into()],
                ..Default::default()
            },
            "secrets",
        );
        bad(
            CreateSandbox {
                secrets: vec!["A".into()],
                env: BTreeMap::from([("A".into(), "x".into())]),
                ..Default::default()
            },
            "secrets",
        );
        bad(
            CreateSandbox {
                from_snapshot: Some("../x".into()),
                ..Default::default()
            },
            "from_snapshot",
        );
        // Round trip omits defaults.
        let c = CreateSandbox {
            name: Some("a".into()),
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"name":"a"}"#);
    }

    #[test]
    fn exec_request() {
        let r: ExecRequest =
            serde_json::from_str(r#"{"cmd":["ls","-l"],"cwd":"/tmp","timeout_sec":5}"#).unwrap();
        r.validate().unwrap();
        let e = |j: &str| {
            serde_json::from_str::<ExecRequest>(j)
                .unwrap()
                .validate()
                .unwrap_err()
                .field
        };
        assert_eq!(e(r#"{"cmd":[]}"#), "cmd");
        assert_eq!(e(r#"{"cmd":[""]}"#), "cmd");
        assert_eq!(e(r#"{"cmd":["a\u0000"]}"#), "cmd");
        assert_eq!(e(r#"{"cmd":["ls"],"cwd":"tmp"}"#), "cwd");
        assert_eq!(e(r#"{"cmd":["ls"],"timeout_sec":0}"#), "timeout_sec");
        assert_eq!(e(r#"{"cmd":["ls"],"env":{"1":"x"}}"#), "env");
        assert!(serde_json::from_str::<ExecRequest>(r#"{"cmd":"ls"}"#).is_err());
    }

    #[test]
    fn exec_events_wire_format() {
        assert_eq!(
            ExecEvent::Stdout {
                data: "hi\n".into()
            }
            .to_line(),
            "{\"type\":\"stdout\",\"data\":\"hi\\n\"}\n"
        );
        assert_eq!(
            serde_json::to_string(&ExecEvent::Exit { exit_code: 3 }).unwrap(),
            r#"{"type":"exit","exit_code":3}"#
        );
        assert_eq!(
            serde_json::to_string(&ExecEvent::Error { error: "x".into() }).unwrap(),
            r#"{"type":"error","error":"x"}"#
        );
        let back: ExecEvent = serde_json::from_str(r#"{"type":"stderr","data":"e"}"#).unwrap();
        assert_eq!(back, ExecEvent::Stderr { data: "e".into() });
        let r = ExecResult {
            exit_code: 0,
            stdout: "a".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"exit_code":0,"stdout":"a","stderr":""}"#
        );
    }

    #[test]
    fn utf8_chunker_never_splits_characters() {
        let text = "héllo → wörld 🎉";
        let bytes = text.as_bytes();
        for split in 0..bytes.len() {
            let mut c = Utf8Chunker::default();
            let mut out = c.push(&bytes[..split]);
            out.push_str(&c.push(&bytes[split..]));
            out.push_str(&c.finish());
            assert_eq!(out, text, "split at {split}");
        }
        let mut c = Utf8Chunker::default();
        assert_eq!(c.push(&[b'a', 0xff, b'b']), "a\u{fffd}b");
        assert_eq!(c.push(&[0xe2, 0x82]), "");
        assert_eq!(c.finish(), "\u{fffd}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_714_566_896_789), "2024-05-01T12:34:56.789Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn other_bodies() {
        assert!(serde_json::from_str::<PatchSandbox>(r#"{"cpus":2}"#).is_err());
        let p: PatchSandbox = serde_json::from_str(r#"{"keep_hot":true}"#).unwrap();
        p.validate().unwrap();
        assert!(CheckpointRequest { name: "Bad".into() }.validate().is_err());
        assert!(ResumeRequest {
            name: Some("x y".into()),
            ..Default::default()
        }
        .validate()
        .is_err());
        let q = FileQuery {
            path: "etc".into(),
            ..Default::default()
        };
        assert_eq!(q.validate().unwrap_err().field, "path");
        assert_eq!(
            serde_json::to_string(&ApiError::new("no sandbox 'x'")).unwrap(),
            r#"{"error":"no sandbox 'x'"}"#
        );
        let s: SandboxStatus = "stopped".parse().unwrap();
        assert_eq!(s, SandboxStatus::Stopped);
        assert!("paused".parse::<SandboxStatus>().is_err());
        let st = bhatti_protocol::message::FileStat {
            name: "a".into(),
            kind: bhatti_protocol::message::FileKind::Dir,
            size: 1,
            mode: 0o40755,
            uid: 1000,
            gid: 1000,
            mtime_ms: 0,
        };
        let fe = FileEntry::from(&st);
        assert_eq!((fe.kind, fe.mode), (FileKind::Dir, 0o755));
    }
}

/// The kinds of events the log records (`type` of [`EventView`]).
pub const EVENT_TYPES: &[&str] = &[
    "create",
    "create_failed",
    "destroy",
    "destroy_failed",
    "stop",
    "stop_failed",
    "start",
    "start_failed",
    "warm",
    "cold",
    "wake",
    "wake_failed",
    "cool_failed",
    "recovered",
    "daemon_start",
    "quota_rejected",
    "rate_limited",
];

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventView {
    /// Increasing, never reused: the cursor (`since`) of the next poll.
    pub id: i64,
    /// Unix milliseconds.
    pub at_unix_ms: i64,
    /// What happened: one of `create`, `create_failed`, `destroy`,
    /// `destroy_failed`, `stop`, `stop_failed`, `start`, `start_failed`,
    /// `warm`, `cold`, `wake`, `wake_failed`, `cool_failed`, `recovered`,
    /// `daemon_start`, `quota_rejected`, `rate_limited`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The sandbox's id; absent for events of no sandbox (a rejection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// How long the operation or transition took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// An error, the states of a transition, a count of coalesced rejections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `GET /events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventList {
    /// Oldest first.
    pub events: Vec<EventView>,
    /// The `since` of the next poll: the last event's id (or the `since`
    /// given, when there was none).
    pub next: i64,
}

/// Query of `GET /events`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only events with an id greater than this (the previous answer's `next`).
    #[serde(alias = "after")]
    #[param(maximum = 9223372036854775807_u64)]
    pub since: Option<u64>,
    /// Only these kinds: one, or several comma-separated.
    #[serde(rename = "type")]
    #[param(value_type = Option<schema::EventTypes>)]
    pub kind: Option<String>,
    /// Only this sandbox (id or name).
    pub sandbox: Option<String>,
    /// At most this many (default 100), oldest first.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// Most events one page of `GET /events` holds.
pub const MAX_EVENTS_PAGE: u32 = 1000;

impl EventsQuery {
    /// The kinds asked for (none: all), or the error for an unknown one.
    pub fn kinds(&self) -> Result<Vec<String>, ValidationError> {
        parse_event_types_exact(self.kind.as_deref().unwrap_or(""))
    }
}

/// `a,b` exactly as the API takes it (no spaces, no empty items; empty:
/// all kinds), the form [`schema::EventTypes`] documents.
pub fn parse_event_types_exact(s: &str) -> Result<Vec<String>, ValidationError> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    s.split(',').map(event_type).collect()
}

fn event_type(k: &str) -> Result<String, ValidationError> {
    if EVENT_TYPES.contains(&k) {
        return Ok(k.to_string());
    }
    Err(ValidationError::new(
        "type",
        format!(
            "unknown event type {k:?}; one of {}",
            EVENT_TYPES.join(", ")
        ),
    ))
}

/// `a, b` as a person types it (spaces and empty items dropped) → the
/// kinds, each checked against [`EVENT_TYPES`]; the CLI's form.
pub fn parse_event_types(s: &str) -> Result<Vec<String>, ValidationError> {
    s.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(event_type)
        .collect()
}

/// A listening TCP port in a guest (`GET /sandboxes/{id}/ports`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortView {
    pub port: u16,
    /// The addresses it listens on (`0.0.0.0`, `127.0.0.1`, `::`, …).
    pub addresses: Vec<String>,
    /// The alias it is published under, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<String>,
}

/// `GET /sandboxes/{id}/ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortList {
    pub ports: Vec<PortView>,
}

/// `POST /sandboxes/{id}/publish`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The guest port (1–65535).
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    /// Its public name: lowercase letters, digits and `-`; default
    /// `<sandbox name>-<port>` (which follows a rename).
    #[serde(default)]
    #[schema(value_type = Option<schema::Alias>)]
    pub alias: Option<String>,
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PublishedPort {
    pub id: String,
    pub sandbox_id: String,
    pub port: u16,
    pub alias: String,
    /// Where the public listener serves it (`null` when none is configured).
    pub url: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// `GET /sandboxes/{id}/publish`, `GET /ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PublishedList {
    pub published: Vec<PublishedPort>,
}

/// Longest secret name.
pub const MAX_SECRET_NAME_LEN: usize = 128;

/// Checks a secret name: `[A-Z_][A-Z0-9_]*`, at most 128 characters (it
/// becomes an environment variable name).
pub fn validate_secret_name(name: &str) -> Result<(), ValidationError> {
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_uppercase() || b == b'_');
    if name.is_empty()
        || name.len() > MAX_SECRET_NAME_LEN
        || !ok_first
        || !name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(ValidationError::new(
            "name",
            format!("secret names must match [A-Z_][A-Z0-9_]* and be at most {MAX_SECRET_NAME_LEN} characters (got {name:?})"),
        ));
    }
    Ok(())
}
