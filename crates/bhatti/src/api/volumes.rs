//! `/volumes`: a user's ext4 volumes (create, list, get, delete, grow,
//! clone), and what a sandbox create does with its `volumes` and
//! `new_volumes` ([`VolumePlan`]). See `docs/volumes.md`.

use std::path::PathBuf;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;

use super::{created, ApiError, AppState, AppStateRef, Caller, JsonBody};
use crate::api_types::{
    rfc3339_ms, validate_name, validate_volume_mb, CloneVolume, CreateSandbox, CreateVolume,
    ResizeVolume, VolumeAttachmentView, VolumeList, VolumeView, DEFAULT_VOLUME_MB,
};
use crate::auth::RequestClass;
use crate::engine::VolumeMount;
use crate::store::volumes::{self, Claim, NewVolume, VolumeRow};
use crate::store::StoreError;

/// `<data_dir>/volumes/<owner>/<id>.ext4`.
pub(super) fn volume_path(st: &AppState, owner: &str, id: &str) -> PathBuf {
    st.config
        .data_dir
        .join("volumes")
        .join(owner)
        .join(format!("{id}.ext4"))
}

fn max_bytes(st: &AppState) -> u64 {
    st.config.volumes.max_bytes_per_user
}

fn storage_err(e: crate::storage::StorageError) -> ApiError {
    ApiError::Internal(format!("volume storage: {e}"))
}

/// Removes a volume's file (missing is fine; other failures are logged:
/// the row is gone already).
fn remove_file(path: &std::path::Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!(path = %path.display(), "removing a volume file: {e}"),
    }
}

async fn view(st: &AppState, v: VolumeRow) -> Result<VolumeView, ApiError> {
    let id = v.id.clone();
    let atts = st.store.read(move |c| volumes::attachments(c, &id)).await?;
    Ok(VolumeView {
        id: v.id,
        name: v.name,
        size_mb: v.size_mb,
        ephemeral_for: v.ephemeral_sandbox,
        attachments: atts
            .into_iter()
            .map(|a| VolumeAttachmentView {
                sandbox: a.sandbox_id,
                sandbox_name: a.sandbox_name,
                mount: a.mount,
                read_only: a.read_only,
            })
            .collect(),
        created_at: rfc3339_ms(v.created_at),
    })
}

/// Makes the file and records the volume (quota and name checked again
/// in the insert's transaction); nothing is left on failure.
async fn make_volume(
    st: &AppState,
    owner: &str,
    name: &str,
    size_mb: u64,
) -> Result<VolumeRow, ApiError> {
    // Cheap checks first, so a refused create costs no mkfs.
    let (o, n, max) = (owner.to_owned(), name.to_owned(), max_bytes(st));
    st.store
        .read(move |c| {
            if volumes::get(c, &o, &n)?.is_some() {
                return Err(StoreError::Conflict(format!("a volume named '{n}' exists")));
            }
            let used = volumes::used_mb(c, &o)?;
            if used.saturating_add(size_mb).saturating_mul(1 << 20) > max {
                return Err(StoreError::Limit(format!(
                    "volumes would take {} MiB; the limit is {} MiB per user",
                    used.saturating_add(size_mb),
                    max >> 20
                )));
            }
            Ok(())
        })
        .await?;
    let id = volumes::new_volume_id();
    let path = volume_path(st, owner, &id);
    crate::storage::create_volume(&path, size_mb)
        .await
        .map_err(storage_err)?;
    let new = NewVolume {
        id,
        owner: owner.to_owned(),
        name: name.to_owned(),
        size_mb,
        path: path.clone(),
        ephemeral_sandbox: None,
    };
    let max = max_bytes(st);
    match st
        .store
        .transaction(move |tx| volumes::insert(tx, &new, max))
        .await
    {
        Ok(row) => Ok(row),
        Err(e) => {
            remove_file(&path);
            Err(e.into())
        }
    }
}

/// Creates an empty ext4 volume.
#[utoipa::path(post, path = "/volumes", tag = "volumes",
    request_body = CreateVolume,
    responses((status = 201, body = VolumeView), (status = 400, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "the name is taken"),
        (status = 429, body = crate::api_types::ApiError, description = "over the volume quota")))]
pub async fn create(
    State(st): State<AppStateRef>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateVolume>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    req.validate()?;
    let state = st.clone();
    st.detached(async move {
        let row = make_volume(&state, &caller.user.id, &req.name, req.size_mb).await?;
        tracing::info!(volume = %row.name, id = %row.id, size_mb = row.size_mb, "volume created");
        Ok(created(view(&state, row).await?))
    })
    .await
}

/// The caller's volumes, oldest first.
#[utoipa::path(get, path = "/volumes", tag = "volumes",
    responses((status = 200, body = VolumeList), (status = 401, body = crate::api_types::ApiError)))]
pub async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
) -> Result<Json<VolumeList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let owner = caller.user.id.clone();
    let rows = st.store.read(move |c| volumes::list(c, &owner)).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(view(&st, r).await?);
    }
    Ok(Json(VolumeList { volumes: out }))
}

/// The caller's volume `name` (404 when there is none).
pub(super) async fn get_row(st: &AppState, owner: &str, name: &str) -> Result<VolumeRow, ApiError> {
    let (o, n) = (owner.to_owned(), name.to_owned());
    st.store
        .read(move |c| volumes::get(c, &o, &n))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no volume '{name}'")))
}

/// One volume, with the sandboxes that have it.
#[utoipa::path(get, path = "/volumes/{name}", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path)),
    responses((status = 200, body = VolumeView), (status = 404, body = crate::api_types::ApiError)))]
pub async fn get(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<VolumeView>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let row = get_row(&st, &caller.user.id, &name).await?;
    Ok(Json(view(&st, row).await?))
}

/// Deletes a volume and its data. 409 while any sandbox (running, stopped
/// or cold) has it attached.
#[utoipa::path(delete, path = "/volumes/{name}", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path)),
    responses((status = 204), (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "attached to a sandbox")))]
pub async fn delete(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    let state = st.clone();
    st.detached(async move {
        let (o, n) = (caller.user.id.clone(), name.clone());
        let row = state.store.run(move |c| volumes::delete(c, &o, &n)).await?;
        remove_file(&row.path);
        // Its backups stay (restorable `into` a new volume); its schedule goes.
        let id = row.id.clone();
        if let Err(e) = state
            .store
            .run(move |c| crate::store::backups::delete_schedule(c, &id))
            .await
        {
            tracing::warn!(volume = %row.name, "removing its backup schedule: {e}");
        }
        tracing::info!(volume = %row.name, id = %row.id, "volume deleted");
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// Grows a volume (file and filesystem) while no sandbox has it.
#[utoipa::path(post, path = "/volumes/{name}/resize", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path)),
    request_body = ResizeVolume,
    responses((status = 200, body = VolumeView), (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "attached, busy, or not larger than now"),
        (status = 429, body = crate::api_types::ApiError, description = "over the volume quota")))]
pub async fn resize(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<ResizeVolume>,
) -> Result<Json<VolumeView>, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    validate_volume_mb("size_mb", req.size_mb)?;
    let current = get_row(&st, &caller.user.id, &name).await?;
    if req.size_mb <= current.size_mb {
        return Err(ApiError::Conflict(format!(
            "size_mb: volumes only grow; '{name}' has {} MiB",
            current.size_mb
        )));
    }
    let state = st.clone();
    st.detached(async move {
        let owner = caller.user.id.clone();
        let what = Claim::Resize {
            size_mb: req.size_mb,
            max_bytes: max_bytes(&state),
        };
        let (o, n) = (owner.clone(), name.clone());
        let (row, busy) = state
            .store
            .run(move |c| volumes::claim(c, &o, &n, what))
            .await?;
        crate::storage::grow_volume(&row.path, req.size_mb)
            .await
            .map_err(storage_err)?;
        let (o, id, mb) = (owner.clone(), row.id.clone(), req.size_mb);
        state
            .store
            .run(move |c| volumes::set_size(c, &o, &id, mb))
            .await?;
        drop(busy);
        tracing::info!(volume = %row.name, from = row.size_mb, to = req.size_mb, "volume grown");
        let row = get_row(&state, &owner, &name).await?;
        Ok(Json(view(&state, row).await?))
    })
    .await
}

/// Copies a volume into a new one (copy-on-write where the data dir's
/// filesystem has reflinks). The source may be attached read-only, not
/// read-write.
#[utoipa::path(post, path = "/volumes/{name}/clone", tag = "volumes",
    params(("name" = crate::api_types::schema::Name, Path, description = "The source volume")),
    request_body = CloneVolume,
    responses((status = 201, body = VolumeView), (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "the name is taken, or the source is attached read-write"),
        (status = 429, body = crate::api_types::ApiError, description = "over the volume quota")))]
pub async fn clone(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<CloneVolume>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    validate_name("name", &req.name)?;
    let state = st.clone();
    st.detached(async move {
        let owner = caller.user.id.clone();
        let (o, n) = (owner.clone(), name.clone());
        let (src, busy) = state
            .store
            .run(move |c| volumes::claim(c, &o, &n, Claim::CloneSource))
            .await?;
        let id = volumes::new_volume_id();
        let path = volume_path(&state, &owner, &id);
        let method = crate::storage::clone_volume(&src.path, &path)
            .await
            .map_err(storage_err)?;
        drop(busy);
        let new = NewVolume {
            id,
            owner: owner.clone(),
            name: req.name.clone(),
            size_mb: src.size_mb,
            path: path.clone(),
            ephemeral_sandbox: None,
        };
        let max = max_bytes(&state);
        let row = match state
            .store
            .transaction(move |tx| volumes::insert(tx, &new, max))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                remove_file(&path);
                return Err(e.into());
            }
        };
        tracing::info!(from = %src.name, to = %row.name, ?method, "volume cloned");
        Ok(created(view(&state, row).await?))
    })
    .await
}

// ------------------------------------------------------------- creates

/// What a sandbox create does with volumes: auto-created volumes exist
/// and ephemeral files are made before the sandbox row is inserted;
/// [`VolumePlan::record`] then attaches everything inside that insert's
/// transaction.
#[derive(Debug, Clone, Default)]
pub(super) struct VolumePlan {
    /// `(name, mount, read_only)` of existing volumes.
    attach: Vec<(String, String, bool)>,
    /// Volumes a fork shares with its checkpoint, by file (read-only).
    shared: Vec<VolumeMount>,
    /// Ephemeral volumes (files made) and their mounts.
    new: Vec<(NewVolume, String)>,
}

impl VolumePlan {
    /// Auto-creates missing `volumes` and makes the `new_volumes` files of
    /// sandbox `sandbox_id`.
    pub async fn prepare(
        st: &AppState,
        owner: &str,
        sandbox_id: &str,
        req: &CreateSandbox,
    ) -> Result<VolumePlan, ApiError> {
        let mut plan = VolumePlan::default();
        for v in &req.volumes {
            if v.auto_create {
                let size = v.size_mb.unwrap_or(DEFAULT_VOLUME_MB);
                match make_volume(st, owner, &v.name, size).await {
                    Ok(row) => {
                        tracing::info!(volume = %row.name, size_mb = size, "volume auto-created")
                    }
                    // Exists (maybe made by a racing create): attach it.
                    Err(ApiError::Conflict(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            plan.attach
                .push((v.name.clone(), v.mount.clone(), v.read_only));
        }
        for (i, v) in req.new_volumes.iter().enumerate() {
            let id = volumes::new_volume_id();
            let path = volume_path(st, owner, &id);
            if let Err(e) = crate::storage::create_volume(&path, v.size_mb).await {
                plan.discard();
                return Err(storage_err(e));
            }
            plan.new.push((
                NewVolume {
                    id,
                    owner: owner.to_owned(),
                    // '.' is never in a user's volume name: no clash.
                    name: format!("{sandbox_id}.{i}"),
                    size_mb: v.size_mb,
                    path,
                    ephemeral_sandbox: Some(sandbox_id.to_owned()),
                },
                v.mount.clone(),
            ));
        }
        Ok(plan)
    }

    /// A fork of a checkpoint: its read-only volumes are shared; a
    /// read-write one is refused (409), since two guests would write it.
    pub fn for_fork(volumes: &[VolumeMount]) -> Result<VolumePlan, ApiError> {
        if let Some(v) = volumes.iter().find(|v| !v.read_only) {
            return Err(ApiError::Conflict(format!(
                "the checkpoint's sandbox has a read-write volume at {}; sandboxes with read-write volumes cannot be forked (clone the volume and create a new sandbox instead)",
                v.mount
            )));
        }
        Ok(VolumePlan {
            shared: volumes.to_vec(),
            ..Default::default()
        })
    }

    /// Records the ephemeral volumes and every attachment of the new
    /// sandbox; runs in the transaction that inserted its row.
    pub fn record(
        &self,
        tx: &rusqlite::Connection,
        owner: &str,
        sandbox_id: &str,
        max_bytes: u64,
    ) -> crate::store::Result<()> {
        for (name, mount, ro) in &self.attach {
            volumes::attach(tx, owner, sandbox_id, name, mount, *ro)?;
        }
        for v in &self.shared {
            let row = volumes::find_by_path(tx, owner, &v.path)?.ok_or_else(|| {
                StoreError::Conflict(format!(
                    "the checkpoint's volume at {} no longer exists",
                    v.mount
                ))
            })?;
            volumes::attach(tx, owner, sandbox_id, &row.name, &v.mount, true)?;
        }
        for (new, mount) in &self.new {
            volumes::insert(tx, new, max_bytes)?;
            volumes::attach(tx, owner, sandbox_id, &new.name, mount, false)?;
        }
        Ok(())
    }

    /// Removes the ephemeral files (the create did not happen).
    pub fn discard(&self) {
        for (v, _) in &self.new {
            remove_file(&v.path);
        }
    }
}

/// The engine's view of a sandbox's volumes, in attachment order.
pub(super) async fn mounts_of(
    st: &AppState,
    sandbox_id: &str,
) -> Result<Vec<VolumeMount>, ApiError> {
    let id = sandbox_id.to_owned();
    let atts = st.store.read(move |c| volumes::of_sandbox(c, &id)).await?;
    Ok(atts
        .into_iter()
        .map(|a| VolumeMount {
            path: a.path,
            mount: a.mount,
            read_only: a.read_only,
        })
        .collect())
}

/// Deletes the volumes that went with a sandbox (after its row is gone).
pub(super) async fn drop_ephemeral(st: &AppState, owner: &str, sandbox_id: &str) {
    let (o, id) = (owner.to_owned(), sandbox_id.to_owned());
    match st
        .store
        .run(move |c| volumes::delete_ephemeral(c, &o, &id))
        .await
    {
        Ok(rows) => {
            for r in rows {
                remove_file(&r.path);
            }
        }
        Err(e) => tracing::error!(sandbox = sandbox_id, "removing ephemeral volumes: {e}"),
    }
}
