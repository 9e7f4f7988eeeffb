//! Volume backups to an S3-compatible object store (`docs/backups.md`).
//!
//! - [`BackupStore`] (s3.rs): the client made from `[backups]`, the object
//!   layout (`<prefix>/<owner>/<volume>/<id>.ext4.zst` and a JSON manifest
//!   `<id>.json` beside it), listing, deleting and keep-last-N retention.
//! - transfer.rs: [`BackupStore::backup`] streams a (consistent) copy of a
//!   volume through sha256 and zstd into a multipart upload, and
//!   [`BackupStore::restore`] streams it back into a temp file, checks the
//!   sha256 and renames it into place. Memory stays bounded by a few parts.
//! - service.rs: [`Backups`], the client and the `volume_backups` rows kept
//!   in step (start as a tracked task, list, restore, delete, retention,
//!   schedules), for the volume API handlers.
//! - schedule.rs: cron schedules with keep-last-N and the loop the daemon
//!   runs; the backup itself is a callback ([`schedule::ScheduledBackup`]).
//!
//! Nothing here knows volumes' records: the daemon passes an owner, a
//! volume name and id, and the path of the copy to back up, so volumes plug
//! in with a thin layer (the `volume_backups` and `backup_schedules` tables
//! are in store/backups.rs).

mod s3;
pub mod schedule;
mod service;
mod transfer;

pub use s3::{new_id, valid_id, BackupInfo, BackupStore, Target, SECRET_ENV};
pub use service::{Backups, ServiceError, Source};
pub use transfer::{RestoreInfo, PARTS_IN_FLIGHT};

use crate::config::BackupsConfig;

/// Why a backup operation failed. The messages are meant for API answers.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// `[backups]` has no endpoint.
    #[error("backups are not configured (set [backups] endpoint and bucket)")]
    NotConfigured,
    /// `[backups]` cannot make a client (e.g. the secret file is missing).
    #[error("invalid [backups] config: {0}")]
    Config(String),
    /// The store answered 401/403: wrong key, wrong secret, or no permission.
    #[error("the object store refused the credentials: {0}")]
    Credentials(String),
    /// The configured bucket does not exist.
    #[error("bucket '{bucket}' does not exist at {endpoint}")]
    NoBucket { bucket: String, endpoint: String },
    /// No backup with that id for that volume.
    #[error("no backup '{0}'")]
    NotFound(String),
    /// An id, owner or volume name that cannot be part of an object key.
    #[error("{0}")]
    BadName(String),
    /// The downloaded data does not match the manifest.
    #[error("backup '{id}' is corrupt: {why}")]
    Corrupt { id: String, why: String },
    /// Any other answer of the store (network down, 5xx after retries).
    #[error("object store error: {0}")]
    Store(String),
    /// Reading the source or writing the restored file.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The caller's cancellation token fired; the upload was aborted.
    #[error("the backup was cancelled")]
    Cancelled,
}

impl BackupError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
        let context = context.into();
        move |source| BackupError::Io { context, source }
    }
}

pub type Result<T, E = BackupError> = std::result::Result<T, E>;

/// True for `localhost` and loopback IP literals.
fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(a) => a.is_loopback(),
        url::Host::Ipv6(a) => a.is_loopback(),
    }
}

/// Checks `[backups]` at config load; the error names the key. An empty
/// endpoint (backups off) skips the rest.
pub fn validate_config(c: &BackupsConfig) -> std::result::Result<(), (&'static str, String)> {
    if c.endpoint.is_empty() {
        return Ok(());
    }
    let u = url::Url::parse(&c.endpoint)
        .map_err(|e| ("backups.endpoint", format!("is not a URL: {e}")))?;
    let host = u
        .host()
        .ok_or(("backups.endpoint", "has no host".to_string()))?;
    match u.scheme() {
        "https" => {}
        "http" if is_loopback(&host) => {}
        "http" => {
            return Err((
                "backups.endpoint",
                "http:// is allowed only for loopback addresses; use https://".into(),
            ))
        }
        s => {
            return Err((
                "backups.endpoint",
                format!("must be an http(s) URL, not {s}://"),
            ))
        }
    }
    if !(u.path() == "/" || u.path().is_empty()) || u.query().is_some() {
        return Err((
            "backups.endpoint",
            "must have no path or query (the bucket is `bucket`)".into(),
        ));
    }
    if !valid_bucket(&c.bucket) {
        return Err((
            "backups.bucket",
            "must be a bucket name (3-63 of a-z, 0-9, '.', '-')".into(),
        ));
    }
    if c.region.trim().is_empty() {
        return Err(("backups.region", "must not be empty".into()));
    }
    if c.access_key_id.trim().is_empty() {
        return Err(("backups.access_key_id", "must not be empty".into()));
    }
    if c.prefix
        .split('/')
        .any(|s| !s.is_empty() && !valid_segment(s))
    {
        return Err((
            "backups.prefix",
            "must be '/'-separated segments of A-Z, a-z, 0-9, '.', '_', '-'".into(),
        ));
    }
    if !(5..=5120).contains(&c.part_size_mb) {
        return Err(("backups.part_size_mb", "must be between 5 and 5120".into()));
    }
    if !(1..=19).contains(&c.compression_level) {
        return Err((
            "backups.compression_level",
            "must be between 1 and 19".into(),
        ));
    }
    if c.compression_threads > 64 {
        return Err((
            "backups.compression_threads",
            "must be between 0 and 64".into(),
        ));
    }
    Ok(())
}

fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
}

/// One segment of an object key: 1-128 of `A-Za-z0-9._-`, not `.`/`..`.
pub(crate) fn valid_segment(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> BackupsConfig {
        BackupsConfig {
            endpoint: "https://s3.example.com".into(),
            bucket: "backups".into(),
            access_key_id: "AKIA".into(),
            ..Default::default()
        }
    }

    #[test]
    fn off_by_default_and_checked_when_on() {
        assert!(validate_config(&BackupsConfig::default()).is_ok());
        assert!(validate_config(&on()).is_ok());
        for (key, c) in [
            (
                "backups.endpoint",
                BackupsConfig {
                    endpoint: "http://s3.example.com".into(),
                    ..on()
                },
            ),
            (
                "backups.endpoint",
                BackupsConfig {
                    endpoint: "ftp://127.0.0.1".into(),
                    ..on()
                },
            ),
            (
                "backups.endpoint",
                BackupsConfig {
                    endpoint: "https://s3.example.com/bucket".into(),
                    ..on()
                },
            ),
            (
                "backups.bucket",
                BackupsConfig {
                    bucket: "No_Such".into(),
                    ..on()
                },
            ),
            (
                "backups.access_key_id",
                BackupsConfig {
                    access_key_id: "".into(),
                    ..on()
                },
            ),
            (
                "backups.prefix",
                BackupsConfig {
                    prefix: "a/../b".into(),
                    ..on()
                },
            ),
            (
                "backups.part_size_mb",
                BackupsConfig {
                    part_size_mb: 4,
                    ..on()
                },
            ),
            (
                "backups.compression_level",
                BackupsConfig {
                    compression_level: 0,
                    ..on()
                },
            ),
        ] {
            assert_eq!(validate_config(&c).unwrap_err().0, key, "{c:?}");
        }
        for ep in [
            "http://127.0.0.1:9000",
            "http://localhost:9000",
            "http://[::1]:9000",
        ] {
            let c = BackupsConfig {
                endpoint: ep.into(),
                ..on()
            };
            assert!(validate_config(&c).is_ok(), "{ep}");
        }
    }

    #[test]
    fn segments() {
        assert!(valid_segment("vol-1.data_x"));
        for bad in ["", ".", "..", "a/b", "a b", "ä"] {
            assert!(!valid_segment(bad), "{bad:?}");
        }
    }
}
