//! Checkpoints: `POST /sandboxes/{id}/checkpoint`, `GET /snapshots`,
//! `POST /snapshots/{name}/resume`, `DELETE /snapshots/{name}`.

use std::path::PathBuf;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;

use super::{created, ApiError, AppState, AppStateRef, Caller, JsonBody};
use crate::api_types::{
    rfc3339_ms, validate_name, Checkpoint, CheckpointList, CheckpointRequest, ResumeRequest,
};
use crate::auth::RequestClass;
use crate::engine::CheckpointMeta;
use crate::store::snapshots::{self, NewSnapshot, SnapshotRow};

fn checkpoint_view(row: &SnapshotRow) -> Checkpoint {
    Checkpoint {
        name: row.name.clone(),
        sandbox_id: row.sandbox_id.clone(),
        size_bytes: row.size_bytes,
        created_at: rfc3339_ms(row.created_at),
    }
}

/// The checkpoint's directory, which must be under the daemon's
/// checkpoints dir.
pub(super) fn checkpoint_dir(st: &AppState, row: &SnapshotRow) -> Result<PathBuf, ApiError> {
    let dir = row
        .files
        .get("dir")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
        .filter(|d| d.starts_with(&st.checkpoints_dir))
        .ok_or_else(|| ApiError::Internal(format!("checkpoint '{}' has no directory", row.name)))?;
    Ok(dir)
}

/// Takes a named checkpoint of a running sandbox; it keeps running.
#[utoipa::path(post, path = "/sandboxes/{id}/checkpoint", tag = "snapshots",
    params(("id" = String, Path)),
    request_body = CheckpointRequest,
    responses((status = 201, body = Checkpoint), (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError), (status = 409, body = crate::api_types::ApiError),
        (status = 429, body = crate::api_types::ApiError)))]
pub async fn checkpoint(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CheckpointRequest>,
) -> Result<Response, ApiError> {
    let state = st.clone();
    st.detached(checkpoint_to_end(state, caller, id, req)).await
}

/// [`checkpoint`]'s work, run to its end even when the client goes away.
async fn checkpoint_to_end(
    st: AppStateRef,
    caller: Caller,
    id: String,
    req: CheckpointRequest,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    req.validate()?;
    let row = st.sandbox(&caller, &id).await?;
    std::fs::create_dir_all(&st.checkpoints_dir)
        .map_err(|e| ApiError::Internal(format!("creating the checkpoints dir: {e}")))?;
    let dir = st.checkpoints_dir.join(crate::store::new_id("cp_"));
    // The row is reserved before the work, in one transaction with the
    // count check: concurrent checkpoints cannot overshoot the cap.
    // Its size is not known before it is taken: the VM's memory plus its
    // disk (apparent sizes) is the most it can be.
    let estimate = st
        .engine
        .get(&row.id)
        .map(|sb| {
            let disk = std::fs::metadata(&sb.paths.root_disk)
                .map(|m| m.len())
                .unwrap_or(0);
            (u64::from(sb.memory_mb) << 20) + disk
        })
        .unwrap_or(0);
    let reserve = NewSnapshot {
        owner: caller.user.id.clone(),
        name: req.name.clone(),
        sandbox_id: row.id.clone(),
        files: serde_json::json!({ "dir": dir }),
        spec: serde_json::json!({ "source_name": row.name }),
        size_bytes: estimate,
    };
    let caps = caller.caps;
    let max_bytes = st.config.limits.max_snapshot_bytes;
    let reserved = st
        .store
        .transaction(move |tx| {
            let n = snapshots::count(tx, &reserve.owner)?;
            if let Err(e) = caps.check_snapshot_count(n) {
                return Ok(Err(ApiError::from(e)));
            }
            let used = snapshots::total_bytes(tx, &reserve.owner)?;
            if used.saturating_add(estimate) > max_bytes {
                return Ok(Err(ApiError::TooMany {
                    message: format!(
                        "checkpoint storage limit: {used} of {max_bytes} bytes in use, and this one may take up to {estimate}"
                    ),
                    retry_after: None,
                }));
            }
            Ok(Ok(snapshots::insert(tx, &reserve)?))
        })
        .await?;
    reserved?;
    let unreserve = |st: &AppStateRef| {
        let (owner, name) = (caller.user.id.clone(), req.name.clone());
        let st = st.clone();
        async move {
            if let Err(e) = st
                .store
                .run(move |c| snapshots::delete(c, &owner, &name).map(|_| ()))
                .await
            {
                tracing::warn!("releasing a checkpoint reservation: {e}");
            }
        }
    };
    let started = std::time::Instant::now();
    let meta = match st.engine.checkpoint(&row.id, &dir).await {
        Ok(m) => {
            st.metrics
                .snapshot("checkpoint", started.elapsed(), Some(m.size_bytes));
            m
        }
        Err(e) => {
            unreserve(&st).await;
            return Err(e.into());
        }
    };
    if row.status != "running" {
        st.set_status(&row.owner, &row.id, "running").await;
    }
    let spec = serde_json::json!({
        "source_name": row.name,
        "cpus": meta.vcpus,
        "memory_mb": meta.memory_mib,
    });
    let (owner, name, size) = (caller.user.id.clone(), req.name.clone(), meta.size_bytes);
    match st
        .store
        .run(move |c| snapshots::finish_reserved(c, &owner, &name, &spec, size))
        .await
    {
        Ok(r) => Ok(created(checkpoint_view(&r))),
        Err(e) => {
            if let Err(re) = CheckpointMeta::remove(&dir) {
                tracing::warn!("removing an unrecorded checkpoint: {re}");
            }
            Err(e.into())
        }
    }
}

/// The caller's checkpoints.
#[utoipa::path(get, path = "/snapshots", tag = "snapshots",
    responses((status = 200, body = CheckpointList)))]
pub async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
) -> Result<Json<CheckpointList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let owner = caller.user.id.clone();
    let rows = st.store.run(move |c| snapshots::list(c, &owner)).await?;
    Ok(Json(CheckpointList {
        snapshots: rows.iter().map(checkpoint_view).collect(),
    }))
}

/// A new sandbox from a checkpoint (fresh id, token, MAC, IP, hostname),
/// running beside the original.
#[utoipa::path(post, path = "/snapshots/{name}/resume", tag = "snapshots",
    params(("name" = crate::api_types::schema::Name, Path, description = "Checkpoint name")),
    request_body = ResumeRequest,
    responses((status = 201, body = crate::api_types::SandboxView), (status = 200, body = crate::api_types::SandboxView),
        (status = 400, body = crate::api_types::ApiError), (status = 404, body = crate::api_types::ApiError),
        (status = 429, body = crate::api_types::ApiError), (status = 502, body = crate::api_types::ApiError)))]
pub async fn resume(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<ResumeRequest>,
) -> Result<Response, ApiError> {
    let state = st.clone();
    st.detached(resume_to_end(state, caller, name, req)).await
}

/// [`resume`]'s work, run to its end even when the client goes away.
async fn resume_to_end(
    st: AppStateRef,
    caller: Caller,
    name: String,
    req: ResumeRequest,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    validate_name("name", &name)?;
    req.validate()?;
    super::sandboxes::fork(
        &st,
        &caller,
        &name,
        req.name,
        req.keep_hot.unwrap_or(false),
        req.labels.unwrap_or_default(),
    )
    .await
}

/// Deletes a checkpoint (sandboxes made from it are not affected).
#[utoipa::path(delete, path = "/snapshots/{name}", tag = "snapshots",
    params(("name" = crate::api_types::schema::Name, Path)),
    responses((status = 204), (status = 404, body = crate::api_types::ApiError)))]
pub async fn delete(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let state = st.clone();
    st.detached(delete_to_end(state, caller, name)).await
}

/// [`delete`]'s work, run to its end even when the client goes away.
async fn delete_to_end(
    st: AppStateRef,
    caller: Caller,
    name: String,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    let owner = caller.user.id.clone();
    let row = st
        .store
        .run(move |c| snapshots::delete(c, &owner, &name))
        .await?;
    let dir = checkpoint_dir(&st, &row)?;
    if let Err(e) = CheckpointMeta::remove(&dir) {
        tracing::warn!("removing checkpoint files: {e}");
    }
    Ok(StatusCode::NO_CONTENT)
}
