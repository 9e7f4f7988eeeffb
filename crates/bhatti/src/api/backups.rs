//! `/volumes/{name}/backups`, `/restore` and `/backup-schedule`: the
//! volume side of [`crate::backups::Backups`] (see `docs/backups.md`).
//!
//! A backup reads a consistent copy: the volume is claimed (no resize or
//! clone meanwhile), reflinked or copied into `<data_dir>/backup-copies/`,
//! released, and the copy is uploaded and removed. A volume a sandbox has
//! read-write is copied the way `save-image` copies a root disk: the guest
//! flushes its filesystems and its vCPUs stop while the copy is taken.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::{ApiError, AppState, AppStateRef, Caller, JsonBody};
use crate::api_types::{
    rfc3339_ms, validate_name, BackupList, BackupScheduleView, BackupView, RestoreResult,
    RestoreVolume, SetBackupSchedule,
};
use crate::auth::RequestClass;
use crate::backups::{BackupError, ServiceError, Source, Target};
use crate::store::backups::{self as rows, BackupRow, ScheduleRow};
use crate::store::volumes::{self, Claim, NewVolume, VolumeRow};
use crate::store::StoreError;

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Store(s) => s.into(),
            ServiceError::Backup(b) => match b {
                BackupError::NotConfigured => ApiError::Conflict(b.to_string()),
                BackupError::NotFound(_) => ApiError::NotFound(b.to_string()),
                BackupError::BadName(_) => ApiError::BadRequest(b.to_string()),
                BackupError::Credentials(_)
                | BackupError::NoBucket { .. }
                | BackupError::Corrupt { .. }
                | BackupError::Store(_) => ApiError::BadGateway(b.to_string()),
                BackupError::Config(_) | BackupError::Io { .. } | BackupError::Cancelled => {
                    ApiError::Internal(b.to_string())
                }
            },
        }
    }
}

/// Where consistent copies wait for their upload (emptied at start).
pub(crate) fn copies_dir(st: &AppState) -> PathBuf {
    st.config.data_dir.join("backup-copies")
}

fn view(b: BackupRow) -> BackupView {
    BackupView {
        id: b.id,
        volume: b.volume_name,
        state: b.state.as_str().to_string(),
        raw_bytes: b.raw_bytes,
        stored_bytes: b.stored_bytes,
        sha256: b.sha256,
        error: b.error,
        created_at: rfc3339_ms(b.created_at),
        finished_at: b.finished_at.map(rfc3339_ms),
    }
}

fn schedule_view(s: ScheduleRow) -> BackupScheduleView {
    BackupScheduleView {
        volume: s.volume_name,
        cron: s.cron,
        keep_last: s.keep_last,
        next_at: (s.next_at != i64::MAX).then(|| rfc3339_ms(s.next_at)),
        last_at: s.last_at.map(rfc3339_ms),
        last_error: s.last_error,
    }
}

fn target(v: &VolumeRow) -> Target {
    Target {
        owner: v.owner.clone(),
        volume_name: v.name.clone(),
        volume_id: v.id.clone(),
    }
}

/// Claims the volume and makes its consistent copy; the volume is free
/// again when this returns.
async fn consistent_copy(
    st: &AppState,
    owner: &str,
    name: &str,
) -> Result<(VolumeRow, Source), ApiError> {
    let (o, n) = (owner.to_owned(), name.to_owned());
    let (v, busy) = st
        .store
        .run(move |c| volumes::claim(c, &o, &n, Claim::BackupSource))
        .await?;
    let path = copies_dir(st).join(format!("{}-{}.ext4", v.id, crate::backups::new_id()));
    let vid = v.id.clone();
    let writer = st
        .store
        .read(move |c| volumes::attachments(c, &vid))
        .await?
        .into_iter()
        .find(|a| !a.read_only);
    let r = match &writer {
        Some(_) if std::fs::create_dir_all(copies_dir(st)).is_err() => Err(ApiError::Internal(
            "creating the backup copies' directory".into(),
        )),
        Some(a) => st
            .engine
            .save_volume(&a.sandbox_id, &v.path, &path)
            .await
            .map(drop)
            .map_err(ApiError::from),
        None => crate::storage::clone_volume(&v.path, &path)
            .await
            .map(drop)
            .map_err(|e| ApiError::Internal(format!("copying the volume: {e}"))),
    };
    drop(busy);
    if let Err(e) = r {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok((
        v,
        Source {
            path,
            remove_after: true,
        },
    ))
}

/// Starts a backup of a volume; answers with the `running` backup. Poll
/// `GET /volumes/{name}/backups/{id}` for its end.
#[utoipa::path(post, path = "/volumes/{name}/backups", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path)),
    responses((status = 202, body = BackupView), (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "backups not configured, or a backup, resize or clone of the volume runs"),
        (status = 502, body = crate::api_types::ApiError, description = "the object store refused")))]
pub async fn create(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    let state = st.clone();
    st.detached(async move {
        // Refuse early when off, before copying anything.
        if state.config.backups.endpoint.is_empty() {
            return Err(ServiceError::from(BackupError::NotConfigured).into());
        }
        let (v, source) = consistent_copy(&state, &caller.user.id, &name).await?;
        let row = match state.backups.start(target(&v), source.clone()).await {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&source.path);
                return Err(e.into());
            }
        };
        tracing::info!(volume = %v.name, backup = %row.id, "volume backup started");
        Ok((StatusCode::ACCEPTED, Json(view(row))).into_response())
    })
    .await
}

/// The volume's backups (also of a deleted volume of that name), newest
/// first.
#[utoipa::path(get, path = "/volumes/{name}/backups", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path)),
    responses((status = 200, body = BackupList), (status = 400, body = crate::api_types::ApiError)))]
pub async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<BackupList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    validate_name("name", &name)?;
    let rows = st.backups.list(&caller.user.id, &name).await?;
    Ok(Json(BackupList {
        backups: rows.into_iter().map(view).collect(),
    }))
}

async fn backup_row(
    st: &AppState,
    owner: &str,
    name: &str,
    id: &str,
) -> Result<BackupRow, ApiError> {
    let (o, i) = (owner.to_owned(), id.to_owned());
    st.store
        .read(move |c| rows::get(c, &o, &i))
        .await?
        .filter(|b| b.volume_name == name)
        .ok_or_else(|| ApiError::NotFound(format!("no backup '{id}' of volume '{name}'")))
}

/// One backup.
#[utoipa::path(get, path = "/volumes/{name}/backups/{id}", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path), ("id" = String, Path)),
    responses((status = 200, body = BackupView), (status = 404, body = crate::api_types::ApiError)))]
pub async fn get(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<BackupView>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    Ok(Json(view(
        backup_row(&st, &caller.user.id, &name, &id).await?,
    )))
}

/// Deletes a backup from the object store and the records.
#[utoipa::path(delete, path = "/volumes/{name}/backups/{id}", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path), ("id" = String, Path)),
    responses((status = 204), (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "still running, or backups not configured"),
        (status = 502, body = crate::api_types::ApiError, description = "the object store refused")))]
pub async fn delete(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    validate_name("name", &name)?;
    if !crate::backups::valid_id(&id) {
        return Err(ApiError::NotFound(format!(
            "no backup '{id}' of volume '{name}'"
        )));
    }
    let state = st.clone();
    st.detached(async move {
        state.backups.delete(&caller.user.id, &name, &id).await?;
        tracing::info!(volume = %name, backup = %id, "volume backup deleted");
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// Restores a backup into the volume (detached only) or, with `into`,
/// into a new volume of the backup's size (counted against the quota).
/// A failed restore changes nothing.
#[utoipa::path(post, path = "/volumes/{name}/restore", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path)),
    request_body = RestoreVolume,
    responses((status = 200, body = RestoreResult), (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "the volume is attached, `into` exists, or backups not configured"),
        (status = 429, body = crate::api_types::ApiError, description = "over the volume quota"),
        (status = 502, body = crate::api_types::ApiError, description = "the object store refused, or the data is corrupt")))]
pub async fn restore(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<RestoreVolume>,
) -> Result<Json<RestoreResult>, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    validate_name("name", &name)?;
    req.validate()?;
    if !crate::backups::valid_id(&req.backup) {
        return Err(ApiError::BadRequest(format!(
            "backup: '{}' is not a backup id",
            req.backup
        )));
    }
    let state = st.clone();
    st.detached(async move {
        let owner = caller.user.id.clone();
        match &req.into {
            None => restore_in_place(&state, &owner, &name, &req.backup).await,
            Some(into) => restore_into(&state, &owner, &name, &req.backup, into).await,
        }
        .map(Json)
    })
    .await
}

async fn restore_in_place(
    st: &AppState,
    owner: &str,
    name: &str,
    backup: &str,
) -> Result<RestoreResult, ApiError> {
    let (o, n) = (owner.to_owned(), name.to_owned());
    let (v, busy) = st
        .store
        .run(move |c| volumes::claim(c, &o, &n, Claim::Restore))
        .await?;
    let info = st.backups.restore(owner, name, backup, &v.path).await?;
    // The backup may be from before a resize: the row follows the file.
    let mb = info.raw_bytes.div_ceil(1 << 20);
    if mb != v.size_mb {
        let (o, id) = (owner.to_owned(), v.id.clone());
        st.store
            .run(move |c| volumes::set_size(c, &o, &id, mb))
            .await?;
    }
    drop(busy);
    tracing::info!(volume = %name, backup, "volume restored");
    Ok(RestoreResult {
        volume: name.to_owned(),
        backup: backup.to_owned(),
        raw_bytes: info.raw_bytes,
        sha256: info.sha256,
    })
}

async fn restore_into(
    st: &AppState,
    owner: &str,
    name: &str,
    backup: &str,
    into: &str,
) -> Result<RestoreResult, ApiError> {
    let max = st.config.volumes.max_bytes_per_user;
    // Cheap checks first (the insert checks again): name free, and the
    // backup's size (when recorded) within the quota.
    let known = {
        let (o, i) = (owner.to_owned(), backup.to_owned());
        st.store.read(move |c| rows::get(c, &o, &i)).await?
    };
    let est_mb = known
        .as_ref()
        .map(|b| b.raw_bytes.div_ceil(1 << 20))
        .unwrap_or(0);
    let (o, n) = (owner.to_owned(), into.to_owned());
    st.store
        .read(move |c| {
            if volumes::get(c, &o, &n)?.is_some() {
                return Err(StoreError::Conflict(format!("a volume named '{n}' exists")));
            }
            let used = volumes::used_mb(c, &o)?;
            if used.saturating_add(est_mb).saturating_mul(1 << 20) > max {
                return Err(StoreError::Limit(format!(
                    "volumes would take {} MiB; the limit is {} MiB per user",
                    used.saturating_add(est_mb),
                    max >> 20
                )));
            }
            Ok(())
        })
        .await?;
    let id = volumes::new_volume_id();
    let path = super::volumes::volume_path(st, owner, &id);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| ApiError::Internal(format!("creating {}: {e}", dir.display())))?;
    }
    let info = st.backups.restore(owner, name, backup, &path).await?;
    let new = NewVolume {
        id,
        owner: owner.to_owned(),
        name: into.to_owned(),
        size_mb: info.raw_bytes.div_ceil(1 << 20),
        path: path.clone(),
        ephemeral_sandbox: None,
    };
    if let Err(e) = st
        .store
        .transaction(move |tx| volumes::insert(tx, &new, max))
        .await
    {
        let _ = std::fs::remove_file(&path);
        return Err(e.into());
    }
    tracing::info!(volume = %name, backup, into, "backup restored into a new volume");
    Ok(RestoreResult {
        volume: into.to_owned(),
        backup: backup.to_owned(),
        raw_bytes: info.raw_bytes,
        sha256: info.sha256,
    })
}

/// Sets the volume's backup schedule (cron in UTC, keep the newest
/// `keep_last`).
#[utoipa::path(put, path = "/volumes/{name}/backup-schedule", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path)),
    request_body = SetBackupSchedule,
    responses((status = 200, body = BackupScheduleView), (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "backups not configured")))]
pub async fn put_schedule(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<SetBackupSchedule>,
) -> Result<Json<BackupScheduleView>, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    let v = super::volumes::get_row(&st, &caller.user.id, &name).await?;
    let row = st
        .backups
        .set_schedule(&target(&v), &req.cron, req.keep_last)
        .await?;
    Ok(Json(schedule_view(row)))
}

/// The volume's backup schedule.
#[utoipa::path(get, path = "/volumes/{name}/backup-schedule", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path)),
    responses((status = 200, body = BackupScheduleView), (status = 404, body = crate::api_types::ApiError)))]
pub async fn get_schedule(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<BackupScheduleView>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let (o, n) = (caller.user.id.clone(), name.clone());
    st.store
        .read(move |c| rows::get_schedule(c, &o, &n))
        .await?
        .map(|s| Json(schedule_view(s)))
        .ok_or_else(|| ApiError::NotFound(format!("volume '{name}' has no backup schedule")))
}

/// Removes the volume's backup schedule (its backups stay).
#[utoipa::path(delete, path = "/volumes/{name}/backup-schedule", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path)),
    responses((status = 204), (status = 404, body = crate::api_types::ApiError)))]
pub async fn delete_schedule(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    let v = super::volumes::get_row(&st, &caller.user.id, &name).await?;
    let gone = st
        .store
        .run(move |c| rows::delete_schedule(c, &v.id))
        .await?;
    if gone {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "volume '{name}' has no backup schedule"
        )))
    }
}

/// The scheduler's callback: a consistent copy, a backup, retention.
pub struct ScheduledVolumeBackup(pub Arc<AppState>);

#[async_trait::async_trait]
impl crate::backups::schedule::ScheduledBackup for ScheduledVolumeBackup {
    async fn run(&self, s: &ScheduleRow) -> Result<(), String> {
        let st = &self.0;
        let (v, source) = consistent_copy(st, &s.owner, &s.volume_name)
            .await
            .map_err(|e| e.to_string())?;
        if v.id != s.volume_id {
            // The volume was deleted and its name reused: not this schedule's.
            let _ = std::fs::remove_file(&source.path);
            return Err(format!("volume '{}' no longer exists", s.volume_name));
        }
        st.backups
            .run(target(&v), source)
            .await
            .map_err(|e| e.to_string())?;
        st.backups
            .keep_last(&s.owner, &s.volume_name, s.keep_last as usize)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}
