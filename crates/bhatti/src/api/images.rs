//! `/images`: the caller's image catalogue (plus the shared images):
//! pull (a task), import a tarball, save a sandbox's disk, list, get,
//! delete. The work is [`crate::images::Images`]'s; this maps it to HTTP.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use super::{created, ApiError, AppState, AppStateRef, Caller, JsonBody, Q};
use crate::api_types::{
    validate_image_name, ImageList, ImageView, PullImage, RegistryAuth, SaveImage, TaskAccepted,
};
use crate::auth::RequestClass;
use crate::image::{ImageConfig, ImageError, PullAuth};
use crate::images::tasks::Task;
use crate::images::{names, view, ImagesError};
use crate::store::images::ImageRow;

/// Pulls a caller may have running at once.
pub const MAX_RUNNING_PULLS: usize = 4;

impl From<ImagesError> for ApiError {
    fn from(e: ImagesError) -> Self {
        match e {
            ImagesError::Image(e) => match e {
                ImageError::BadReference { .. } => ApiError::BadRequest(e.to_string()),
                ImageError::Unauthorized { .. } => ApiError::RegistryUnauthorized(e.to_string()),
                ImageError::NotFound { .. } => ApiError::NotFound(e.to_string()),
                ImageError::Registry(_) => ApiError::BadGateway(e.to_string()),
                ImageError::Layer(_) | ImageError::Config(_) => {
                    ApiError::BadRequest(format!("the image cannot be used: {e}"))
                }
                ImageError::Cancelled => ApiError::Conflict("the pull was cancelled".into()),
                ImageError::Io { .. } | ImageError::Cmd(_) => ApiError::Internal(e.to_string()),
            },
            ImagesError::Store(e) => e.into(),
            ImagesError::Archive(m) => ApiError::BadRequest(m),
            ImagesError::Forbidden(m) => ApiError::Forbidden(m),
            ImagesError::Engine(e) => e.into(),
            ImagesError::Internal(m) => ApiError::Internal(m),
        }
    }
}

/// A task's failure: the status it would have had and a message for the
/// caller (internal details stay in the log).
fn task_error(e: ImagesError) -> (u16, String) {
    let a = ApiError::from(e);
    let status = a.status().as_u16();
    match a {
        ApiError::Internal(m) => {
            tracing::error!("image task failed: {m}");
            (
                status,
                "internal error; the daemon's log has the details".into(),
            )
        }
        other => (status, other.to_string()),
    }
}

fn pull_auth(auth: Option<RegistryAuth>) -> PullAuth {
    match auth {
        None => PullAuth::Anonymous,
        Some(RegistryAuth::Basic { username, password }) => PullAuth::Basic { username, password },
        Some(RegistryAuth::Token { token }) => PullAuth::Bearer(token),
    }
}

/// Starts a pull as a task of the caller's: it runs to its end (or its
/// cancel) whatever happens to the request that started it.
pub(super) fn spawn_pull(
    st: &AppState,
    owner: &str,
    reference: &str,
    name: Option<String>,
    auth: PullAuth,
) -> Result<Arc<Task>, ApiError> {
    let owner = owner.to_owned();
    if st.images.tasks.running(&owner) >= MAX_RUNNING_PULLS {
        return Err(ApiError::TooMany {
            message: format!(
                "at most {MAX_RUNNING_PULLS} pulls may run at once; wait for one (GET /tasks)"
            ),
            retry_after: None,
        });
    }
    let name = name.unwrap_or_else(|| names::default_name(reference));
    let task = st
        .images
        .tasks
        .start(&owner, "pull", Some(reference.to_owned()));
    let (images, t, reference) = (st.images.clone(), task.clone(), reference.to_owned());
    let span = tracing::info_span!("pull", task = %task.id, reference = %reference);
    st.tasks.spawn(
        async move {
            let report = |phase, done, total| {
                t.phase(phase);
                t.progress(done, total);
            };
            let r = images
                .pull(&owner, &reference, &name, &auth, &report, &t.cancel)
                .await;
            match &r {
                Ok(row) => tracing::info!(image = %row.name, "pull done"),
                Err(e) => tracing::info!("pull failed: {e}"),
            }
            t.finish(r.map(|row| view(&row)).map_err(task_error));
        }
        .instrument(span),
    );
    Ok(task)
}

/// Pulls an OCI image into the caller's catalogue, as a task.
#[utoipa::path(post, path = "/images/pull", tag = "images",
    request_body = PullImage,
    responses(
        (status = 202, body = TaskAccepted, description = "The pull runs; follow it with GET /tasks/{id}"),
        (status = 400, body = crate::api_types::ApiError),
        (status = 403, body = crate::api_types::ApiError, description = "Pulling is off (`[images] allow_pull`)"),
        (status = 429, body = crate::api_types::ApiError)))]
pub async fn pull(
    State(st): State<AppStateRef>,
    caller: Caller,
    JsonBody(req): JsonBody<PullImage>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    req.validate()?;
    if !st.config.images.allow_pull {
        return Err(ApiError::Forbidden(
            "this daemon does not pull from registries ([images] allow_pull = false)".into(),
        ));
    }
    let task = spawn_pull(
        &st,
        &caller.user.id,
        &req.reference,
        req.name,
        pull_auth(req.auth),
    )?;
    Ok((
        StatusCode::ACCEPTED,
        Json(TaskAccepted { task: task.view() }),
    )
        .into_response())
}

/// Query of an import.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    name: String,
}

/// Imports an image tarball (docker-archive or OCI layout, as
/// `skopeo copy … docker-archive:x.tar` / `oci-archive:x.tar` write).
#[utoipa::path(post, path = "/images/import", tag = "images",
    params(("name" = String, Query, description = "The catalogue name")),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses((status = 201, body = ImageView), (status = 400, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError), (status = 413, body = crate::api_types::ApiError),
        (status = 429, body = crate::api_types::ApiError)))]
pub async fn import(
    State(st): State<AppStateRef>,
    caller: Caller,
    Q(q): Q<ImportQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    validate_image_name("name", &q.name)?;
    let max = st.config.images.max_import_bytes;
    let too_large = || ApiError::TooLarge(format!("image uploads are limited to {max} bytes"));
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    // The upload goes to a work dir that is removed however this ends
    // (a client gone half way drops the guard with this future).
    let (dir, guard) = st.images.upload_dir()?;
    let path = dir.join("upload.tar");
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("creating {}: {e}", path.display())))?;
    let mut body = req.into_body().into_data_stream();
    let mut total: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the upload: {e}")))?;
        total += chunk.len() as u64;
        if total > max {
            return Err(too_large());
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::Internal(format!("writing {}: {e}", path.display())))?;
    }
    file.flush()
        .await
        .map_err(|e| ApiError::Internal(format!("writing {}: {e}", path.display())))?;
    drop(file);
    let state = st.clone();
    st.detached(async move {
        let _guard = guard;
        let row = state.images.import(&caller.user.id, &q.name, &path).await?;
        Ok(created(view(&row)))
    })
    .await
}

/// Saves a sandbox's root disk as an image of the caller's (the sandbox
/// keeps running; its disk is synced and copied at one instant).
#[utoipa::path(post, path = "/sandboxes/{id}/save-image", tag = "images",
    params(("id" = String, Path)),
    request_body = SaveImage,
    responses((status = 201, body = ImageView), (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError), (status = 409, body = crate::api_types::ApiError),
        (status = 429, body = crate::api_types::ApiError)))]
pub async fn save(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<SaveImage>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    validate_image_name("name", &req.name)?;
    let row = st.sandbox(&caller, &id).await?;
    if row.status == "creating" {
        return Err(ApiError::Conflict(
            "the sandbox is still being created".into(),
        ));
    }
    // The defaults of the image the sandbox came from, its user made
    // explicit (an OCI image without one runs as root).
    let config = sandbox_image_config(&row.spec).unwrap_or_default();
    let state = st.clone();
    st.detached(async move {
        let image = state
            .images
            .save(&state.engine, &caller.user.id, &req.name, &row.id, config)
            .await?;
        tracing::info!(sandbox = %row.id, image = %image.name, "sandbox saved as an image");
        Ok(created(view(&image)))
    })
    .await
}

/// The key of a sandbox row's spec holding its image's defaults.
pub(super) const SPEC_IMAGE_CONFIG: &str = "image_config";

/// The image defaults recorded in a sandbox row's spec at create.
pub(super) fn sandbox_image_config(spec: &serde_json::Value) -> Option<ImageConfig> {
    serde_json::from_value(spec.get(SPEC_IMAGE_CONFIG)?.clone()).ok()
}

/// The caller's images and the shared ones.
#[utoipa::path(get, path = "/images", tag = "images",
    responses((status = 200, body = ImageList)))]
pub async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
) -> Result<Json<ImageList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let rows = st.images.list(&caller.user.id).await?;
    Ok(Json(ImageList {
        images: rows.iter().map(view).collect(),
    }))
}

async fn named(st: &AppState, owner: &str, name: &str) -> Result<ImageRow, ApiError> {
    st.images
        .resolve(owner, name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no image '{name}'")))
}

/// One image, by name (the caller's, else a shared one).
#[utoipa::path(get, path = "/images/{name}", tag = "images",
    params(("name" = crate::api_types::schema::ImageName, Path)),
    responses((status = 200, body = ImageView), (status = 404, body = crate::api_types::ApiError)))]
pub async fn get(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ImageView>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    Ok(Json(view(&named(&st, &caller.user.id, &name).await?)))
}

/// Deletes one of the caller's images and its disk (sandboxes made from
/// it keep their own disks).
#[utoipa::path(delete, path = "/images/{name}", tag = "images",
    params(("name" = crate::api_types::schema::ImageName, Path)),
    responses((status = 204), (status = 403, body = crate::api_types::ApiError, description = "A shared image"),
        (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "A template uses it")))]
pub async fn delete(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    let state = st.clone();
    st.detached(async move {
        state.images.delete(&caller.user.id, &name).await?;
        state.images_changed().await;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// What `create {image}` boots from.
pub(super) struct ForCreate {
    pub row: ImageRow,
    /// The user commands run as (`None`: lohar's default).
    pub user: Option<String>,
}

/// Resolves `image` for a create: a catalogue name of the caller's, a
/// shared one, a reference already pulled, else a pull now (waited for;
/// its failure is the create's, as a 4xx with the registry's words).
pub(super) async fn for_create(
    st: &AppState,
    owner: &str,
    image: &str,
    pull: bool,
) -> Result<ForCreate, ApiError> {
    let row = match st.images.resolve(owner, image).await? {
        Some(row) => row,
        None if !pull => return Err(ApiError::NotFound(format!("no image '{image}'"))),
        None if !st.config.images.allow_pull => {
            return Err(ApiError::NotFound(format!(
                "no image '{image}' (this daemon does not pull from registries)"
            )))
        }
        None => {
            let task = spawn_pull(st, owner, image, None, PullAuth::Anonymous)?;
            let v = task.wait().await;
            if let Some(err) = v.error {
                let status = v.error_status.unwrap_or(502);
                let msg = format!("pulling {image}: {err}");
                return Err(match status {
                    400 => ApiError::BadRequest(msg),
                    401 => ApiError::RegistryUnauthorized(msg),
                    404 => ApiError::NotFound(msg),
                    429 => ApiError::TooMany {
                        message: msg,
                        retry_after: None,
                    },
                    500 => ApiError::Internal(msg),
                    _ => ApiError::BadGateway(msg),
                });
            }
            let name = v
                .image
                .map(|i| i.name)
                .ok_or_else(|| ApiError::Internal("the pull ended without an image".into()))?;
            named(st, owner, &name).await?
        }
    };
    if !std::path::Path::new(&row.path).is_file() {
        return Err(ApiError::Conflict(format!(
            "the image '{}' has no disk on this host",
            row.name
        )));
    }
    let user = crate::images::run_user(&row);
    Ok(ForCreate { row, user })
}
