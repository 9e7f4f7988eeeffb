//! The one place errors become HTTP statuses: every handler returns
//! `Result<_, ApiError>`, and `From` impls map the engine's, the store's,
//! the agent's and validation errors. Bodies are `{"error": "…"}`.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bhatti_protocol::mux::MuxError;
use bhatti_protocol::{ClientError, ErrorCode};

use crate::api_types::{self, ValidationError};
use crate::auth::CapError;
use crate::engine::EngineError;
use crate::secrets::SecretsError;
use crate::store::StoreError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or a value is not allowed.
    #[error("{0}")]
    BadRequest(String),
    /// 401
    #[error("missing or invalid API key (send Authorization: Bearer bht_…)")]
    Unauthorized,
    /// 401 on the web shell's routes: the link's token is not live.
    #[error("this shell link is invalid, expired or revoked")]
    LinkRefused,
    /// 401 from a registry: its credentials were refused or missing
    /// (not the caller's API key).
    #[error("{0}")]
    RegistryUnauthorized(String),
    /// 403: the object exists but this cannot be done to it.
    #[error("{0}")]
    Forbidden(String),
    /// 404: absent, or another user's.
    #[error("{0}")]
    NotFound(String),
    /// 405
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: a name in use, or the sandbox's state does not allow it.
    #[error("{0}")]
    Conflict(String),
    /// 413
    #[error("{0}")]
    TooLarge(String),
    /// 426: a WebSocket route asked without the upgrade handshake.
    #[error("{0}")]
    UpgradeRequired(String),
    /// 429: a cap, or a rate limit (with the time until a retry may pass).
    #[error("{message}")]
    TooMany {
        message: String,
        retry_after: Option<Duration>,
    },
    /// 500: a bug or a host failure; logged.
    #[error("{0}")]
    Internal(String),
    /// 502: the guest agent failed or could not be reached.
    #[error("{0}")]
    BadGateway(String),
    /// 503: busy for now (with the time until a retry may pass).
    #[error("{message}")]
    Unavailable {
        message: String,
        retry_after: Duration,
    },
    /// 504: the guest did not answer in time.
    #[error("{0}")]
    Timeout(String),
    /// 507: the data disk (or its quota) is full.
    #[error("{0}")]
    InsufficientStorage(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::LinkRefused => StatusCode::UNAUTHORIZED,
            ApiError::RegistryUnauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UpgradeRequired(_) => StatusCode::UPGRADE_REQUIRED,
            ApiError::TooMany { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
        }
    }
}

impl ApiError {
    /// What a client is told (in the answer, in the event log): the log
    /// has the whole story; a client gets no host detail (paths, pids)
    /// beyond what it needs.
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => {
                "internal error; the daemon's log has the details (see X-Request-Id)".to_string()
            }
            ApiError::BadGateway(m) | ApiError::Timeout(m) | ApiError::InsufficientStorage(m) => {
                scrub_host_paths(m)
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal(_) => tracing::error!(status = status.as_u16(), "{self}"),
            ApiError::BadGateway(_) | ApiError::Timeout(_) | ApiError::InsufficientStorage(_) => {
                tracing::warn!(status = status.as_u16(), "{self}")
            }
            _ => tracing::debug!(status = status.as_u16(), "{self}"),
        }
        let message = self.public_message();
        let mut resp = (status, Json(api_types::ApiError::new(message))).into_response();
        let retry_after = match &self {
            ApiError::TooMany {
                retry_after: Some(d),
                ..
            }
            | ApiError::Unavailable { retry_after: d, .. } => Some(*d),
            _ => None,
        };
        // For the event log (the auth layer knows whose request it was).
        if let ApiError::TooMany { message, .. } = &self {
            resp.extensions_mut().insert(match retry_after {
                Some(_) => crate::events::Rejection::RateLimited(message.clone()),
                None => crate::events::Rejection::Quota(message.clone()),
            });
        }
        // RFC 9110 §15.5.22: a 426 names the protocol to upgrade to.
        if let ApiError::UpgradeRequired(_) = &self {
            resp.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        }
        if let Some(d) = retry_after {
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// Replaces absolute host paths (`/var/lib/bhatti/run/…`) in a message.
pub fn scrub_host_paths(message: &str) -> String {
    const HOST_ROOTS: &[&str] = &[
        "/var/", "/run/", "/tmp/", "/srv/", "/opt/", "/etc/", "/usr/", "/proc/", "/sys/", "/dev/",
    ];
    message
        .split_inclusive(|c: char| c.is_whitespace() || c == '\'' || c == '"' || c == '`')
        .map(|word| {
            let core = word.trim_end_matches(|c: char| {
                c.is_whitespace() || matches!(c, '\'' | '"' | '`' | ',' | ':' | ';' | ')')
            });
            let start = core.trim_start_matches(['(', '\'', '"', '`']);
            if HOST_ROOTS.iter().any(|r| start.starts_with(r)) {
                word.replacen(start, "<host path>", 1)
            } else {
                word.to_string()
            }
        })
        .collect()
}

/// Whether `e`, or an error it wraps, means the disk is full: ENOSPC or
/// EDQUOT, or SQLite's "database or disk is full". Errors that crossed a
/// process (QEMU's, a tool's stderr) arrive as text, so the text counts too.
pub fn is_no_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
                || io.kind() == std::io::ErrorKind::StorageFull
            {
                return true;
            }
        }
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = err.downcast_ref::<rusqlite::Error>() {
            if f.code == rusqlite::ErrorCode::DiskFull {
                return true;
            }
        }
        cur = err.source();
    }
    let text = e.to_string();
    [
        "No space left on device",
        "database or disk is full",
        "Disk quota exceeded",
    ]
    .iter()
    .any(|m| text.contains(m))
}

impl ApiError {
    /// 507 for `e` when it is a full disk (see [`is_no_space`]).
    fn no_space(e: &(dyn std::error::Error + 'static)) -> Option<ApiError> {
        is_no_space(e).then(|| {
            // The first line: a boot error's console tail stays in the log.
            let full = e.to_string();
            let first = full.lines().next().unwrap_or_default();
            ApiError::InsufficientStorage(format!("no space left on the data disk: {first}"))
        })
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl From<CapError> for ApiError {
    fn from(e: CapError) -> Self {
        if e.status() == 429 {
            ApiError::TooMany {
                message: e.to_string(),
                retry_after: None,
            }
        } else {
            ApiError::BadRequest(e.to_string())
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::NotFound(m),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::Limit(message) => ApiError::TooMany {
                message,
                retry_after: None,
            },
            other => {
                ApiError::no_space(&other).unwrap_or_else(|| ApiError::Internal(other.to_string()))
            }
        }
    }
}

impl From<SecretsError> for ApiError {
    fn from(e: SecretsError) -> Self {
        match e {
            SecretsError::Invalid(v) => v.into(),
            SecretsError::Store(s) => s.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::Agent(body) => {
                let m = body.message.clone();
                match body.code {
                    ErrorCode::NotFound => ApiError::NotFound(m),
                    ErrorCode::BadRequest => ApiError::BadRequest(m),
                    // A well-formed path whose kind does not fit (a
                    // directory read as a file, a file listed): the
                    // guest's state, not the request's form.
                    ErrorCode::NotAFile | ErrorCode::NotADirectory => ApiError::Conflict(m),
                    ErrorCode::PermissionDenied => ApiError::Forbidden(m),
                    ErrorCode::AlreadyExists => ApiError::Conflict(m),
                    ErrorCode::TooLarge => ApiError::TooLarge(m),
                    ErrorCode::LimitReached => ApiError::TooMany {
                        message: m,
                        retry_after: None,
                    },
                    _ => ApiError::BadGateway(format!("the guest agent failed: {e}")),
                }
            }
            // The engine closed it on purpose mid-request: a stop, a
            // cool-down to disk, a restart or a delete won the race.
            ClientError::Mux(MuxError::Shutdown) => ApiError::Conflict(
                "the sandbox was stopped, restarted or deleted while the request ran".into(),
            ),
            _ => ApiError::BadGateway(format!("the guest agent failed: {e}")),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        if !matches!(e, EngineError::Agent { .. }) {
            if let Some(full) = ApiError::no_space(&e) {
                return full;
            }
        }
        match e {
            EngineError::NotFound(id) => ApiError::NotFound(format!("no sandbox '{id}'")),
            EngineError::AlreadyExists(n) => {
                ApiError::Conflict(format!("a sandbox named '{n}' already exists"))
            }
            EngineError::Invalid(m) => ApiError::BadRequest(m),
            EngineError::State { message, .. } => ApiError::Conflict(message),
            EngineError::Agent { source, .. } => source.into(),
            EngineError::Boot { reason, .. } if reason.contains("did not answer within") => {
                ApiError::Timeout(format!("the guest did not answer in time: {reason}"))
            }
            e @ EngineError::Boot { .. } => {
                // The console tail is in the daemon's log, not the answer.
                let full = e.to_string();
                tracing::warn!("{full}");
                let short = full
                    .split("\n--- guest console")
                    .next()
                    .unwrap_or("")
                    .to_string();
                ApiError::BadGateway(short)
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod scrub_tests {
    use super::scrub_host_paths;

    #[test]
    fn host_paths_are_hidden_guest_words_kept() {
        assert_eq!(
            scrub_host_paths(
                "connecting to the agent at /var/lib/bhatti/run/sb-1/agent.sock: refused"
            ),
            "connecting to the agent at <host path>: refused"
        );
        assert_eq!(
            scrub_host_paths("reading '/run/bhatti/x' failed (/tmp/a/b)"),
            "reading '<host path>' failed (<host path>)"
        );
        assert_eq!(
            scrub_host_paths("no such file /home/lohar/x in the guest"),
            "no such file /home/lohar/x in the guest"
        );
    }
}

#[cfg(test)]
mod no_space_tests {
    use super::*;

    #[test]
    fn enospc_anywhere_in_the_chain_is_507() {
        let e = EngineError::Io {
            context: "copying the root disk to /var/lib/bhatti/sandboxes/x/rootfs.ext4".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let api = ApiError::from(e);
        assert_eq!(api.status(), StatusCode::INSUFFICIENT_STORAGE);
        assert!(api
            .to_string()
            .starts_with("no space left on the data disk: "));
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        let api = ApiError::from(StoreError::Sqlite(full));
        assert_eq!(api.status(), StatusCode::INSUFFICIENT_STORAGE);
        // Other I/O errors stay 500; a full guest disk is the guest's.
        let e = EngineError::Io {
            context: "x".into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        assert_eq!(
            ApiError::from(e).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
