//! The daemon's side of backups: the client and the `volume_backups` rows
//! kept in step, so the volume API handlers only resolve the volume and
//! make its consistent copy.
//!
//! A backup is a row `running` first (one per volume; a second start is
//! [`StoreError::Conflict`]), then a tracked task that uploads and marks
//! it `done` or `failed`; the daemon's shutdown cancels and awaits those
//! tasks (an aborted upload leaves nothing in the bucket).

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::schedule;
use super::{new_id, BackupError, BackupInfo, BackupStore, RestoreInfo, Target};
use crate::store::backups::{self as rows, BackupRow, NewBackup, ScheduleRow};
use crate::store::{now_ms, Store, StoreError};

/// Why a backup request failed: the store's records or the bucket.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The copy a backup reads.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    /// Remove the file when the backup ends (a temporary copy).
    pub remove_after: bool,
}

/// Backups of a daemon: the client (None when `[backups]` is off), the
/// database, and the tasks running uploads.
#[derive(Clone)]
pub struct Backups {
    store: Store,
    client: Option<BackupStore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Backups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backups")
            .field("configured", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl Backups {
    pub fn new(store: Store, client: Option<BackupStore>) -> Backups {
        Backups {
            store,
            client,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        }
    }

    fn client(&self) -> Result<&BackupStore, BackupError> {
        self.client.as_ref().ok_or(BackupError::NotConfigured)
    }

    /// Records a running backup of `target` and uploads `source` in a
    /// tracked task; returns the row as it is now (`running`).
    pub async fn start(&self, target: Target, source: Source) -> Result<BackupRow, ServiceError> {
        let row = self.insert(&target).await?;
        let this = self.clone();
        let id = row.id.clone();
        self.tasks.spawn(async move {
            let _ = this.upload(&target, &id, &source).await;
        });
        Ok(row)
    }

    /// Like [`Backups::start`] but waits for the end (scheduled backups).
    pub async fn run(&self, target: Target, source: Source) -> Result<BackupRow, ServiceError> {
        let row = self.insert(&target).await?;
        self.upload(&target, &row.id, &source).await?;
        let (owner, id) = (row.owner.clone(), row.id.clone());
        self.store
            .run(move |c| rows::get(c, &owner, &id))
            .await?
            .ok_or_else(|| StoreError::NotFound(row.id.clone()).into())
    }

    async fn insert(&self, target: &Target) -> Result<BackupRow, ServiceError> {
        let client = self.client()?;
        let id = new_id();
        let (object_key, _) = client.keys(&target.owner, &target.volume_name, &id)?;
        let t = target.clone();
        Ok(self
            .store
            .run(move |c| {
                rows::insert_running(
                    c,
                    &NewBackup {
                        id: &id,
                        owner: &t.owner,
                        volume_name: &t.volume_name,
                        volume_id: &t.volume_id,
                        object_key: &object_key,
                    },
                )
            })
            .await?)
    }

    /// Uploads and records the outcome on the row.
    async fn upload(&self, target: &Target, id: &str, source: &Source) -> Result<(), ServiceError> {
        let r = self
            .client()?
            .backup(target, id, &source.path, &self.shutdown)
            .await;
        if source.remove_after {
            let _ = std::fs::remove_file(&source.path);
        }
        let id = id.to_string();
        match r {
            Ok(info) => {
                self.store
                    .run(move |c| {
                        rows::finish(c, &id, info.raw_bytes, info.stored_bytes, &info.sha256)
                    })
                    .await?;
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                self.store.run(move |c| rows::fail(c, &id, &msg)).await?;
                Err(e.into())
            }
        }
    }

    /// The volume's backups as the database records them, newest first.
    pub async fn list(
        &self,
        owner: &str,
        volume_name: &str,
    ) -> Result<Vec<BackupRow>, ServiceError> {
        let (o, v) = (owner.to_string(), volume_name.to_string());
        Ok(self.store.run(move |c| rows::list(c, &o, &v)).await?)
    }

    /// The volume's backups as the bucket's manifests record them (also
    /// those from before a lost database).
    pub async fn list_remote(
        &self,
        owner: &str,
        volume_name: &str,
    ) -> Result<Vec<BackupInfo>, ServiceError> {
        Ok(self.client()?.list(owner, volume_name).await?)
    }

    /// Restores backup `id` of the volume into `dest` (the volume's file
    /// while it is detached, or a new volume's).
    pub async fn restore(
        &self,
        owner: &str,
        volume_name: &str,
        id: &str,
        dest: &Path,
    ) -> Result<RestoreInfo, ServiceError> {
        let client = self.client()?;
        let info = client.get(owner, volume_name, id).await?;
        Ok(client.restore(&info, dest).await?)
    }

    /// Deletes backup `id` from the bucket, then its row. A running one is
    /// [`StoreError::Conflict`].
    pub async fn delete(
        &self,
        owner: &str,
        volume_name: &str,
        id: &str,
    ) -> Result<(), ServiceError> {
        let (o, i) = (owner.to_string(), id.to_string());
        let row = self.store.run(move |c| rows::get(c, &o, &i)).await?;
        if row
            .as_ref()
            .is_some_and(|r| r.state == rows::BackupState::Running)
        {
            return Err(StoreError::Conflict(format!("backup '{id}' is still running")).into());
        }
        self.client()?.delete(owner, volume_name, id).await?;
        let (o, i) = (owner.to_string(), id.to_string());
        self.store.run(move |c| rows::delete(c, &o, &i)).await?;
        Ok(())
    }

    /// Retention: keeps the newest `n` backups in the bucket and drops the
    /// rows of the deleted ones; returns their ids.
    pub async fn keep_last(
        &self,
        owner: &str,
        volume_name: &str,
        n: usize,
    ) -> Result<Vec<String>, ServiceError> {
        let gone: Vec<String> = self
            .client()?
            .keep_last(owner, volume_name, n)
            .await?
            .into_iter()
            .map(|b| b.id)
            .collect();
        let (o, ids) = (owner.to_string(), gone.clone());
        self.store
            .run(move |c| {
                for id in &ids {
                    rows::delete(c, &o, id)?;
                }
                Ok(())
            })
            .await?;
        Ok(gone)
    }

    /// Sets a volume's schedule (checked; `BackupError::BadName` with the
    /// reason when the cron or keep_last is bad).
    pub async fn set_schedule(
        &self,
        target: &Target,
        cron: &str,
        keep_last: u32,
    ) -> Result<ScheduleRow, ServiceError> {
        self.client()?;
        let parsed = schedule::validate(cron, keep_last).map_err(BackupError::BadName)?;
        let row = ScheduleRow {
            volume_id: target.volume_id.clone(),
            owner: target.owner.clone(),
            volume_name: target.volume_name.clone(),
            cron: cron.trim().to_string(),
            keep_last,
            next_at: schedule::next_after(&parsed, now_ms()).unwrap_or(i64::MAX),
            last_at: None,
            last_error: None,
        };
        let r = row.clone();
        self.store.run(move |c| rows::put_schedule(c, &r)).await?;
        Ok(row)
    }

    /// Cancels running uploads (they abort) and waits for their tasks.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
