//! Bodies of `/volumes/{name}/backups`, `/restore` and `/backup-schedule`.

use serde::{Deserialize, Serialize};

use crate::{validate_name, VResult, ValidationError};

/// One backup of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupView {
    /// Time-sortable id (`20261205T083000123Z-1a2b3c4d`).
    pub id: String,
    /// The volume's name.
    pub volume: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// Size of the volume file (0 until done).
    pub raw_bytes: u64,
    /// Size of the compressed object (0 until done).
    pub stored_bytes: u64,
    /// sha256 of the volume file (empty until done).
    pub sha256: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// `GET /volumes/{name}/backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupList {
    /// Newest first.
    pub backups: Vec<BackupView>,
}

/// `POST /volumes/{name}/restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreVolume {
    /// The backup's id.
    pub backup: String,
    /// Restore into a new volume of this name instead of the volume itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub into: Option<String>,
}

impl RestoreVolume {
    pub fn validate(&self) -> VResult {
        if self.backup.is_empty() || self.backup.len() > 128 {
            return Err(ValidationError::new("backup", "must be a backup id"));
        }
        if let Some(n) = &self.into {
            validate_name("into", n)?;
        }
        Ok(())
    }
}

/// What a restore wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestoreResult {
    /// The volume restored into (the volume itself, or `into`).
    pub volume: String,
    pub backup: String,
    pub raw_bytes: u64,
    /// sha256 of the restored file (checked against the backup's).
    pub sha256: String,
}

/// `PUT /volumes/{name}/backup-schedule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetBackupSchedule {
    /// 5-field cron expression (minute hour day-of-month month
    /// day-of-week), in UTC; `@daily`, `@hourly` … too.
    pub cron: String,
    /// Backups to keep (1 to 1000); older ones are deleted after each
    /// scheduled backup.
    pub keep_last: u32,
}

/// A volume's backup schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupScheduleView {
    pub volume: String,
    pub cron: String,
    pub keep_last: u32,
    /// The next run (absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<String>,
    /// Why the last run failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
