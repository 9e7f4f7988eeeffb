//! The object-store client and the layout of backups in the bucket.
//!
//! A backup is two objects under `<prefix>/<owner>/<volume>/`: the data
//! `<id>.ext4.zst` and its manifest `<id>.json` ([`BackupInfo`]). The
//! manifest is written only after the data upload completed and is deleted
//! first, so a listing (which reads manifests) never shows a backup whose
//! data is missing or partial.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};

use super::{valid_segment, BackupError, Result};
use crate::config::BackupsConfig;

/// Environment variable with the secret access key (wins over the config's
/// inline `secret_access_key`; `secret_access_key_file` wins over it).
pub const SECRET_ENV: &str = "BHATTI_BACKUPS_SECRET_ACCESS_KEY";

/// Whose volume a backup is of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub owner: String,
    pub volume_name: String,
    /// The volume's id at backup time (a volume re-created under the same
    /// name gets a new one); informational.
    pub volume_id: String,
}

/// One backup, as its manifest object records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    pub id: String,
    pub owner: String,
    pub volume_name: String,
    pub volume_id: String,
    /// Key of the data object in the bucket.
    pub object_key: String,
    /// Bytes of the volume file.
    pub raw_bytes: u64,
    /// Bytes of the compressed object.
    pub stored_bytes: u64,
    /// sha256 of the volume file (lower-case hex).
    pub sha256: String,
    /// Always "zstd".
    pub compression: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// The configured bucket and prefix.
#[derive(Debug, Clone)]
pub struct BackupStore {
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) prefix: String,
    pub(super) bucket: String,
    pub(super) endpoint: String,
    pub(super) part_size: usize,
    pub(super) level: i32,
    pub(super) threads: u32,
}

/// The secret: the file, else the environment, else the inline value.
fn secret(c: &BackupsConfig) -> Result<String> {
    if !c.secret_access_key_file.is_empty() {
        let s = std::fs::read_to_string(&c.secret_access_key_file).map_err(|e| {
            BackupError::Config(format!(
                "cannot read secret_access_key_file {}: {e}",
                c.secret_access_key_file
            ))
        })?;
        return Ok(s.trim_end().to_string());
    }
    if let Some(s) = std::env::var(SECRET_ENV).ok().filter(|s| !s.is_empty()) {
        return Ok(s);
    }
    if c.secret_access_key.is_empty() {
        return Err(BackupError::Config(format!(
            "no secret access key (set secret_access_key, secret_access_key_file or {SECRET_ENV})"
        )));
    }
    Ok(c.secret_access_key.clone())
}

impl BackupStore {
    /// The client for `[backups]`, or `None` when backups are off.
    pub fn from_config(c: &BackupsConfig) -> Result<Option<BackupStore>> {
        if c.endpoint.is_empty() {
            return Ok(None);
        }
        super::validate_config(c).map_err(|(k, m)| BackupError::Config(format!("{k} {m}")))?;
        // SigV4 signs with ring; TLS needs a process-wide rustls provider
        // (reqwest is built without one). Installing twice is harmless.
        // rustls deprecates ring's provider for lacking post-quantum key
        // exchange, as the engine's registry client notes too.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = url::Url::parse(&c.endpoint).map_err(|e| BackupError::Config(e.to_string()))?;
        let ip_or_local = match url.host() {
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            Some(_) => true,
            None => false,
        };
        let store = AmazonS3Builder::new()
            .with_endpoint(c.endpoint.trim_end_matches('/'))
            .with_bucket_name(&c.bucket)
            .with_region(&c.region)
            .with_access_key_id(&c.access_key_id)
            .with_secret_access_key(secret(c)?)
            .with_virtual_hosted_style_request(!(c.path_style || ip_or_local))
            // Before with_allow_http, which is one of the client options.
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(300)),
            )
            // validate_config allowed http:// for loopback endpoints only.
            .with_allow_http(url.scheme() == "http")
            // Fail within seconds on refused credentials (never retried)
            // and within a minute on a store that is down.
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(60),
                ..Default::default()
            })
            .build()
            .map_err(|e| BackupError::Config(e.to_string()))?;
        Ok(Some(BackupStore {
            store: Arc::new(store),
            prefix: c.prefix.trim_matches('/').to_string(),
            bucket: c.bucket.clone(),
            endpoint: c.endpoint.clone(),
            part_size: (c.part_size_mb as usize) << 20,
            level: c.compression_level,
            threads: c.compression_threads,
        }))
    }

    /// `<prefix>/<owner>/<volume>`, after checking both names.
    pub(super) fn dir(&self, owner: &str, volume: &str) -> Result<String> {
        for (what, s) in [("owner", owner), ("volume name", volume)] {
            if !valid_segment(s) {
                return Err(BackupError::BadName(format!(
                    "{what} {s:?} cannot be part of an object key"
                )));
            }
        }
        Ok(if self.prefix.is_empty() {
            format!("{owner}/{volume}")
        } else {
            format!("{}/{owner}/{volume}", self.prefix)
        })
    }

    pub(super) fn keys(&self, owner: &str, volume: &str, id: &str) -> Result<(String, String)> {
        if !valid_id(id) {
            return Err(BackupError::BadName(format!("{id:?} is not a backup id")));
        }
        let d = self.dir(owner, volume)?;
        Ok((format!("{d}/{id}.ext4.zst"), format!("{d}/{id}.json")))
    }

    /// Maps the store's error: 401/403 and missing buckets get their own
    /// kinds, so callers can say what is wrong.
    pub(super) fn err(&self, e: object_store::Error) -> BackupError {
        // The whole chain: the top level alone often says only "builder
        // error" or "error sending request".
        let mut text = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            let t = s.to_string();
            if !text.contains(&t) {
                text = format!("{text}: {t}");
            }
            src = s.source();
        }
        match e {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => BackupError::Credentials(text),
            _ if text.contains("NoSuchBucket") => BackupError::NoBucket {
                bucket: self.bucket.clone(),
                endpoint: self.endpoint.clone(),
            },
            _ if text.contains("InvalidAccessKeyId")
                || text.contains("SignatureDoesNotMatch")
                || text.contains("AccessDenied") =>
            {
                BackupError::Credentials(text)
            }
            _ => BackupError::Store(text),
        }
    }

    /// One cheap request that fails the way real ones would (credentials,
    /// bucket); for the daemon's start and `bhatti doctor`-style checks.
    pub async fn check(&self) -> Result<()> {
        let p = ObjPath::from(self.prefix.as_str());
        self.store
            .list_with_delimiter(Some(&p))
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The volume's backups, newest first. Manifests that do not parse are
    /// skipped with a warning.
    pub async fn list(&self, owner: &str, volume: &str) -> Result<Vec<BackupInfo>> {
        let dir = ObjPath::from(self.dir(owner, volume)?);
        let metas: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.err(e))?;
        // Manifests are small: read 8 at a time.
        let manifests: Vec<(ObjPath, Result<BackupInfo>)> = futures_util::stream::iter(
            metas
                .into_iter()
                .filter(|m| m.location.as_ref().ends_with(".json")),
        )
        .map(|m| async move {
            let r = self.manifest(&m.location).await;
            (m.location, r)
        })
        .buffer_unordered(8)
        .collect()
        .await;
        let mut out = Vec::new();
        for (location, r) in manifests {
            match r {
                Ok(i) => out.push(i),
                Err(BackupError::Corrupt { why, .. }) => {
                    tracing::warn!(key = %location, "skipping backup manifest: {why}")
                }
                // Deleted between the listing and the read.
                Err(BackupError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        Ok(out)
    }

    async fn manifest(&self, key: &ObjPath) -> Result<BackupInfo> {
        let bytes = match self.store.get(key).await {
            Ok(r) => r.bytes().await.map_err(|e| self.err(e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BackupError::NotFound(key.to_string()))
            }
            Err(e) => return Err(self.err(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| BackupError::Corrupt {
            id: key.to_string(),
            why: format!("manifest: {e}"),
        })
    }

    /// One backup's manifest.
    pub async fn get(&self, owner: &str, volume: &str, id: &str) -> Result<BackupInfo> {
        let (_, manifest) = self.keys(owner, volume, id)?;
        match self.manifest(&ObjPath::from(manifest)).await {
            Err(BackupError::NotFound(_)) => Err(BackupError::NotFound(id.to_string())),
            r => r,
        }
    }

    pub(super) async fn put_manifest(&self, info: &BackupInfo) -> Result<()> {
        let (_, key) = self.keys(&info.owner, &info.volume_name, &info.id)?;
        let json =
            serde_json::to_vec_pretty(info).map_err(|e| BackupError::Store(e.to_string()))?;
        self.store
            .put(&ObjPath::from(key), PutPayload::from(json))
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Deletes a backup: the manifest first (it then no longer lists),
    /// then the data. Deleting a missing backup is not an error.
    pub async fn delete(&self, owner: &str, volume: &str, id: &str) -> Result<()> {
        let (data, manifest) = self.keys(owner, volume, id)?;
        for k in [manifest, data] {
            match self.store.delete(&ObjPath::from(k)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(())
    }

    /// Retention: deletes all but the newest `n` backups of the volume
    /// (n ≥ 1) and returns the deleted ones. A failed listing deletes
    /// nothing.
    pub async fn keep_last(&self, owner: &str, volume: &str, n: usize) -> Result<Vec<BackupInfo>> {
        let n = n.max(1);
        let old: Vec<BackupInfo> = self
            .list(owner, volume)
            .await?
            .into_iter()
            .skip(n)
            .collect();
        for b in &old {
            self.delete(owner, volume, &b.id).await?;
        }
        Ok(old)
    }
}

/// A new backup id: time-sortable (`YYYYMMDDTHHMMSSmmmZ`) plus 4 random
/// bytes, so ids of one volume sort by age and never collide.
pub fn new_id() -> String {
    let mut b = [0u8; 4];
    rand::fill(&mut b);
    format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%3fZ"),
        hex::encode(b)
    )
}

/// Ids are key segments of at most 64 bytes.
pub fn valid_id(id: &str) -> bool {
    id.len() <= 64 && valid_segment(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(prefix: &str) -> BackupStore {
        BackupStore::from_config(&BackupsConfig {
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "bkt".into(),
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
            prefix: prefix.into(),
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn layout() {
        let s = store("/bhatti/prod/");
        let (d, m) = s.keys("u-1", "data", "20260101T000000000Z-00ff").unwrap();
        assert_eq!(d, "bhatti/prod/u-1/data/20260101T000000000Z-00ff.ext4.zst");
        assert_eq!(m, "bhatti/prod/u-1/data/20260101T000000000Z-00ff.json");
        assert_eq!(store("").dir("u", "v").unwrap(), "u/v");
        assert!(matches!(
            s.keys("u", "../x", "a"),
            Err(BackupError::BadName(_))
        ));
        assert!(matches!(
            s.keys("u", "v", "a/b"),
            Err(BackupError::BadName(_))
        ));
    }

    #[test]
    fn ids_sort_by_time_and_are_valid() {
        let a = new_id();
        std::thread::sleep(Duration::from_millis(2));
        let b = new_id();
        assert!(valid_id(&a) && valid_id(&b), "{a} {b}");
        assert!(a < b, "{a} {b}");
    }

    #[test]
    fn off_without_endpoint_and_secret_required() {
        assert!(BackupStore::from_config(&BackupsConfig::default())
            .unwrap()
            .is_none());
        let c = BackupsConfig {
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "bkt".into(),
            access_key_id: "k".into(),
            secret_access_key_file: "/nonexistent/secret".into(),
            ..Default::default()
        };
        let e = BackupStore::from_config(&c).unwrap_err();
        assert!(e.to_string().contains("secret_access_key_file"), "{e}");
    }
}
