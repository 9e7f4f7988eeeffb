//! `/templates`: named recipes for sandboxes (image, sizes, env, secrets,
//! init, keep_hot), each kept pre-booted for instant creates
//! (`crate::prebooted`).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;

use super::base_image::{base_image, BaseImage};
use super::{created, ApiError, AppState, AppStateRef, Caller, JsonBody};
use crate::api_types::{rfc3339_ms, CreateTemplate, PrebootedView, TemplateList, TemplateView};
use crate::auth::RequestClass;
use crate::prebooted::Shape;
use crate::store::templates::{self, TemplateRow};

/// Sizes a create ends up with: the request's, else the template's, else
/// the daemon's defaults.
pub(super) struct Sizes {
    pub cpus: u32,
    pub memory_mb: u32,
    pub disk_mb: Option<u64>,
}

pub(super) fn sizes(
    st: &AppState,
    cpus: Option<u32>,
    memory_mb: Option<u32>,
    disk_mb: Option<u64>,
) -> Sizes {
    let vm = &st.config.vm;
    Sizes {
        cpus: cpus.unwrap_or(vm.default_cpus),
        memory_mb: memory_mb.unwrap_or(vm.default_memory_mb),
        disk_mb: disk_mb.or((vm.default_disk_mb > 0).then_some(vm.default_disk_mb)),
    }
}

/// What a guest booted for these settings looks like, for the
/// pre-booted snapshot lookup. `boot_env` is what the guest boots with
/// (image env under the template's); a create's own env comes later.
pub(super) fn shape(
    owner: &str,
    base: Option<&BaseImage>,
    sizes: &Sizes,
    boot_env: BTreeMap<String, String>,
    init: Option<String>,
) -> Shape {
    let mut env = base.map(|b| b.env.clone()).unwrap_or_default();
    env.extend(boot_env);
    Shape {
        owner: owner.to_owned(),
        base: base.map(|b| b.path.clone()),
        cpus: u8::try_from(sizes.cpus).unwrap_or(u8::MAX),
        memory_mb: sizes.memory_mb,
        disk_mb: sizes.disk_mb,
        env,
        init: init.filter(|s| !s.trim().is_empty()),
        user: base.and_then(|b| b.user.clone()),
        workdir: base.and_then(|b| b.workdir.clone()),
    }
}

/// A template's shape (its image resolved now).
pub(super) async fn template_shape(
    st: &AppState,
    owner: &str,
    t: &CreateTemplate,
) -> Result<Shape, ApiError> {
    let base = base_image(st, owner, t.image.as_deref()).await?;
    Ok(shape(
        owner,
        base.as_ref(),
        &sizes(st, t.cpus, t.memory_mb, t.disk_mb),
        t.env.clone(),
        t.init.clone(),
    ))
}

async fn view(st: &AppState, row: &TemplateRow) -> TemplateView {
    let prebooted = match (
        &st.prebooted,
        template_shape(st, &row.owner, &row.spec).await,
    ) {
        (Some(p), Ok(shape)) => p.view(&shape),
        (None, _) => PrebootedView {
            state: "none".into(),
            error: Some("pre-booted snapshots are off".into()),
            ..Default::default()
        },
        (_, Err(e)) => PrebootedView {
            state: "failed".into(),
            error: Some(e.to_string()),
            ..Default::default()
        },
    };
    TemplateView {
        spec: row.spec.clone(),
        created_at: rfc3339_ms(row.created_at),
        prebooted,
    }
}

/// Starts building a template's snapshot (in the background).
pub async fn ensure_prebooted(st: &AppState, owner: &str, t: &CreateTemplate) {
    let Some(p) = &st.prebooted else { return };
    match template_shape(st, owner, t).await {
        Ok(shape) => p.ensure(shape),
        Err(e) => tracing::warn!(template = %t.name, "no pre-booted snapshot: {e}"),
    }
}

/// Creates a template; its pre-booted snapshot is built in the background
/// (`prebooted.state` says when it is ready).
#[utoipa::path(post, path = "/templates", tag = "templates",
    request_body = CreateTemplate,
    responses((status = 201, body = TemplateView), (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError, description = "the image is unknown"),
        (status = 409, body = crate::api_types::ApiError), (status = 429, body = crate::api_types::ApiError)))]
pub async fn create(
    State(st): State<AppStateRef>,
    caller: Caller,
    JsonBody(t): JsonBody<CreateTemplate>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    t.validate(&st.config.vm.size_bounds())?;
    let s = sizes(&st, t.cpus, t.memory_mb, t.disk_mb);
    caller.caps.check_sandbox_size(s.cpus, s.memory_mb)?;
    // The image must exist now (a ref is not pulled for a template).
    base_image(&st, &caller.user.id, t.image.as_deref()).await?;
    let (owner, spec) = (caller.user.id.clone(), t.clone());
    let row = st
        .store
        .run(move |c| templates::insert(c, &owner, &spec))
        .await?;
    ensure_prebooted(&st, &row.owner, &row.spec).await;
    Ok(created(view(&st, &row).await))
}

/// The caller's templates.
#[utoipa::path(get, path = "/templates", tag = "templates",
    responses((status = 200, body = TemplateList), (status = 401, body = crate::api_types::ApiError)))]
pub async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
) -> Result<Json<TemplateList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let owner = caller.user.id.clone();
    let rows = st
        .store
        .run(move |c| templates::list(c, Some(&owner)))
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(view(&st, r).await);
    }
    Ok(Json(TemplateList { templates: out }))
}

/// One template, with the state of its pre-booted snapshot.
#[utoipa::path(get, path = "/templates/{name}", tag = "templates",
    params(("name" = crate::api_types::schema::Name, Path)),
    responses((status = 200, body = TemplateView), (status = 404, body = crate::api_types::ApiError)))]
pub async fn get(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<TemplateView>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let row = load(&st, &caller.user.id, &name).await?;
    Ok(Json(view(&st, &row).await))
}

/// Deletes a template and its pre-booted snapshot; sandboxes made from it
/// stay.
#[utoipa::path(delete, path = "/templates/{name}", tag = "templates",
    params(("name" = crate::api_types::schema::Name, Path)),
    responses((status = 204), (status = 404, body = crate::api_types::ApiError)))]
pub async fn delete(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    let row = load(&st, &caller.user.id, &name).await?;
    let (owner, n) = (caller.user.id.clone(), name.clone());
    st.store
        .run(move |c| templates::delete(c, &owner, &n))
        .await?;
    if let (Some(p), Ok(shape)) = (
        &st.prebooted,
        template_shape(&st, &row.owner, &row.spec).await,
    ) {
        p.remove(&shape);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's template `name`, or 404.
pub(super) async fn load(st: &AppState, owner: &str, name: &str) -> Result<TemplateRow, ApiError> {
    crate::api_types::validate_name("name", name)?;
    let (o, n) = (owner.to_owned(), name.to_owned());
    st.store
        .run(move |c| templates::get(c, &o, &n))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no template '{name}'")))
}
