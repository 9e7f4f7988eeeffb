//! The HTTP + WebSocket API (`docs/api.md` is the contract).
//!
//! - [`router`] builds the axum router from `utoipa_axum` route lists, so
//!   the OpenAPI document (`GET /openapi.json`) is generated from the same
//!   list the router serves; a test also compares them.
//! - Middleware: a request id (`X-Request-Id`, taken from the client or
//!   made here) and a `request` span around every request; bearer auth on
//!   every route but `/health`, `/openapi.json` and the web shell's
//!   `/_shell/…`, which checks its own link tokens ([`Caller`]).
//! - Errors: [`ApiError`] is the one mapping to statuses and
//!   `{"error": "…"}` bodies; extractor rejections go through it too.
//! - Handlers are thin: parse → validate → engine/store → view.
//! - Bodies: JSON up to [`MAX_JSON`] (exec: [`MAX_EXEC_JSON`], its stdin
//!   can be 16 MiB); file uploads stream up to [`MAX_UPLOAD`].

mod backups;
mod base_image;
pub mod e2b;
mod error;
mod events;
mod exec;
mod exec_ws;
mod files;
mod images;
mod meta;
mod metrics;
mod ports;
mod sandboxes;
mod secrets;
mod shell;
mod snapshots;
mod tasks;
mod templates;
mod volumes;
pub use backups::ScheduledVolumeBackup;
mod webshell;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bhatti_protocol::AgentClient;
use bhatti_vmm::BackendKind;
use serde::de::DeserializeOwned;
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::{scrub_host_paths, ApiError};
pub use metrics::listener_router as metrics_router;
pub use templates::ensure_prebooted;

use crate::auth::{EffectiveCaps, RateLimits, RequestClass};
use crate::config::Config;
use crate::engine::Engine;
use crate::secrets::SecretBox;
use crate::store::sandboxes::SandboxRow;
use crate::store::users::User;
use crate::store::Store;

/// Largest JSON body of most requests.
pub const MAX_JSON: usize = 1 << 20;
/// Largest JSON body of an exec (inline stdin up to 16 MiB, JSON-escaped).
pub const MAX_EXEC_JSON: usize = 40 << 20;
/// Largest file upload.
pub const MAX_UPLOAD: u64 = 1 << 30;

/// Everything handlers share.
#[derive(Debug)]
pub struct AppState {
    pub engine: Engine,
    pub store: Store,
    pub secrets: SecretBox,
    pub config: Config,
    pub rate: RateLimits,
    pub backend: BackendKind,
    /// Idle tracking: every request that touches a guest goes through it.
    pub thermal: crate::thermal::ThermalHandle,
    /// `<data_dir>/checkpoints`
    pub checkpoints_dir: PathBuf,
    /// The proxy to guests' ports (authenticated route and public listener).
    pub proxy: crate::proxy::Proxy,
    /// Per-user networks; `None` when guests have no network.
    pub tenants: Option<Arc<crate::net::tenants::Tenants>>,
    /// Users' subnet indexes and isolation switches, by id (for views of
    /// rows; refreshed when a user changes).
    user_nets:
        std::sync::RwLock<std::collections::HashMap<String, crate::net::tenants::TenantUser>>,
    /// Pre-booted snapshots for instant creates; `None`: every create boots.
    pub prebooted: Option<crate::prebooted::Prebooted>,
    /// Serializes the sandbox-count check with the insert it guards.
    create_lock: tokio::sync::Mutex<()>,
    /// Mutations in flight (see [`AppState::detached`]); shutdown waits.
    pub tasks: tokio_util::task::TaskTracker,
    /// The image catalogue and its pull tasks.
    pub images: Arc<crate::images::Images>,
    /// Volume backups (not configured until the daemon sets its client).
    pub backups: crate::backups::Backups,
    /// The event log (`GET /events`).
    pub events: Arc<crate::events::EventLog>,
    openapi: OnceLock<String>,
    next_request: AtomicU64,
    /// This daemon's metrics (`GET /metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl AppState {
    /// After images were deleted or replaced: pre-booted snapshots and
    /// imported base copies of disks that are gone go too.
    pub async fn images_changed(&self) {
        let paths = match self.store.run(|c| crate::store::images::all(c)).await {
            Ok(rows) => rows
                .into_iter()
                .map(|r| PathBuf::from(r.path))
                .collect::<Vec<_>>(),
            Err(e) => return tracing::warn!("listing images: {e}"),
        };
        if let Some(p) = &self.prebooted {
            p.collect_stale();
        }
        self.engine.sweep_bases(&paths).await;
    }

    pub fn new(
        engine: Engine,
        store: Store,
        secrets: SecretBox,
        config: Config,
        backend: BackendKind,
        thermal: crate::thermal::ThermalHandle,
        tenants: Option<Arc<crate::net::tenants::Tenants>>,
    ) -> AppState {
        AppState {
            proxy: crate::proxy::Proxy::new(thermal.clone(), &config.proxy),
            thermal,
            tenants,
            user_nets: Default::default(),
            rate: RateLimits::new(&config.limits.rate),
            images: Arc::new(crate::images::Images::new(&config, store.clone())),
            backups: crate::backups::Backups::new(store.clone(), None),
            events: crate::events::EventLog::new(store.clone(), config.events.clone()),
            checkpoints_dir: config.data_dir.join("checkpoints"),
            engine,
            store,
            secrets,
            config,
            backend,
            prebooted: None,
            create_lock: tokio::sync::Mutex::new(()),
            tasks: tokio_util::task::TaskTracker::new(),
            openapi: OnceLock::new(),
            next_request: AtomicU64::new(1),
            metrics: Default::default(),
        }
    }

    /// The agent of a sandbox, woken first; a sandbox the user had stopped
    /// is running again afterwards.
    pub(crate) async fn agent(&self, row: &SandboxRow) -> Result<AgentClient, ApiError> {
        // Through the thermal manager: it counts the request as activity,
        // wakes the sandbox once however many requests wait, and records
        // the wake.
        let client = self.thermal.agent(&row.id).await?;
        if row.status != "running" {
            self.set_status(&row.owner, &row.id, "running").await;
        }
        Ok(client)
    }

    async fn set_status(&self, owner: &str, id: &str, status: &'static str) {
        let (o, i) = (owner.to_owned(), id.to_owned());
        if let Err(e) = self
            .store
            .run(move |c| crate::store::sandboxes::set_status(c, &o, &i, status))
            .await
        {
            tracing::warn!(id, "recording status {status}: {e}");
        }
    }

    /// Runs a mutation (store rows, network, engine) as a tracked task of
    /// its own and waits for its answer: a client that disconnects half way
    /// cannot leave a row `creating` beside a running VM, or a VM without
    /// its network; the daemon's shutdown waits for these tasks.
    pub(crate) async fn detached<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
    ) -> Result<T, ApiError> {
        match self.tasks.spawn(fut.in_current_span()).await {
            Ok(r) => r,
            Err(e) => Err(ApiError::Internal(format!(
                "the operation ended without an answer: {e}"
            ))),
        }
    }

    /// A user's network identity (subnet index), cached from the store.
    fn user_net(&self, user_id: &str) -> Option<crate::net::tenants::TenantUser> {
        if let Some(u) = self
            .user_nets
            .read()
            .ok()
            .and_then(|m| m.get(user_id).cloned())
        {
            return Some(u);
        }
        let u = self
            .store
            .with(|c| crate::store::users::get(c, user_id))
            .ok()
            .flatten()?;
        let tu = sandboxes::tenant_user(&u);
        if let Ok(mut m) = self.user_nets.write() {
            m.insert(user_id.to_owned(), tu.clone());
        }
        Some(tu)
    }

    /// The caller's sandbox by id or name; another user's is 404.
    async fn sandbox(&self, caller: &Caller, id: &str) -> Result<SandboxRow, ApiError> {
        let (owner, id) = (caller.user.id.clone(), id.to_owned());
        Ok(self
            .store
            .read(move |c| crate::store::sandboxes::require(c, &owner, &id))
            .await?)
    }
}

pub type AppStateRef = Arc<AppState>;

/// The authenticated user of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
    pub caps: EffectiveCaps,
}

impl Caller {
    /// Takes one token of the user's `class` bucket, or 429.
    fn rate(&self, st: &AppState, class: RequestClass) -> Result<(), ApiError> {
        st.rate.check(&self.user.id, class).map_err(|wait| {
            st.metrics.rate_limited(class);
            ApiError::TooMany {
                message: format!("rate limit exceeded; retry in {} ms", wait.as_millis()),
                retry_after: Some(wait),
            }
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or(ApiError::Unauthorized)
    }
}

/// A JSON body of at most `LIMIT` bytes; rejections are [`ApiError`]s.
#[derive(Debug)]
pub struct JsonBody<T, const LIMIT: usize = MAX_JSON>(pub T);

impl<S: Send + Sync, T: DeserializeOwned, const LIMIT: usize> FromRequest<S>
    for JsonBody<T, LIMIT>
{
    type Rejection = ApiError;
    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = read_body(req, LIMIT).await?;
        let bad = |e: serde_json::Error| ApiError::BadRequest(format!("invalid JSON body: {e}"));
        // No body, or `null`: the defaults, as `{}`.
        let body = match bytes.trim_ascii() {
            b"" | b"null" => b"{}".as_slice(),
            b => b,
        };
        // serde would read a struct from an array of its fields in order.
        if body.first() != Some(&b'{') {
            return Err(ApiError::BadRequest(
                "invalid JSON body: expected an object".into(),
            ));
        }
        match serde_json::from_slice(body) {
            Ok(t) => Ok(JsonBody(t)),
            // A second pass only when a whole number written as a float
            // may be what was refused.
            Err(first) => {
                let mut v: serde_json::Value = serde_json::from_slice(body).map_err(bad)?;
                if !whole_numbers_as_integers(&mut v) {
                    return Err(bad(first));
                }
                serde_json::from_value(v).map(JsonBody).map_err(bad)
            }
        }
    }
}

/// `3.0` is the integer 3 (JSON has one number type; JSON Schema counts
/// whole numbers as integers), so integer fields take it; floats larger
/// than 2^53 stay floats (not every integer there is a float). Whether it
/// changed any.
fn whole_numbers_as_integers(v: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match v {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            match n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() <= EXACT) {
                Some(f) => {
                    *v = Value::from(f as i64);
                    true
                }
                None => false,
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |any, i| whole_numbers_as_integers(i) | any),
        Value::Object(fields) => fields
            .values_mut()
            .fold(false, |any, f| whole_numbers_as_integers(f) | any),
        _ => false,
    }
}

async fn read_body(req: Request, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let too_large = || ApiError::TooLarge(format!("the body is larger than {limit} bytes"));
    if let Some(len) = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = src {
                if s.is::<http_body_util::LengthLimitError>() {
                    return too_large();
                }
                src = s.source();
            }
            ApiError::BadRequest(format!("reading the body: {e}"))
        })
}

/// Query parameters; rejections are [`ApiError`]s (400).
#[derive(Debug)]
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, s: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, s)
            .await
            .map(|q| Q(q.0))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// The OpenAPI document's frame; paths come from the route lists.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "bhatti",
        description = "Sandboxes as microVMs: the daemon's HTTP API (see docs/api.md)."
    ),
    paths(ports::proxy_doc),
    // The WebSocket messages, which no HTTP body carries, and the string
    // forms parameters refer to.
    components(schemas(
        crate::api_types::ExecWsStart,
        crate::api_types::ExecWsClientMessage,
        crate::api_types::schema::Name,
        crate::api_types::schema::Alias,
        crate::api_types::schema::GuestPath,
        crate::api_types::schema::EventTypes,
        crate::api_types::schema::SecretName,
        crate::api_types::schema::ImageName,
        crate::api_types::schema::ImageRef
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("bht_…")
                    .build(),
            ),
        );
    }
}

/// Every route, with its OpenAPI description.
pub fn api_router() -> OpenApiRouter<AppStateRef> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(meta::health))
        .routes(routes!(meta::openapi_json))
        .routes(routes!(metrics::metrics))
        .routes(routes!(sandboxes::create, sandboxes::list))
        .routes(routes!(sandboxes::get, sandboxes::patch, sandboxes::delete))
        .routes(routes!(sandboxes::stop))
        .routes(routes!(sandboxes::start))
        .routes(routes!(exec::exec))
        .routes(routes!(shell::ws))
        .routes(routes!(shell::sessions))
        .routes(routes!(webshell::create_token, webshell::revoke))
        .routes(routes!(webshell::page))
        .routes(routes!(webshell::asset))
        .routes(routes!(webshell::check))
        .routes(routes!(webshell::ws))
        .routes(routes!(exec_ws::exec_ws))
        .routes(routes!(exec_ws::kill_session))
        .routes(routes!(files::get, files::put, files::head))
        .routes(routes!(snapshots::checkpoint))
        .routes(routes!(snapshots::list))
        .routes(routes!(snapshots::resume))
        .routes(routes!(snapshots::delete))
        .routes(routes!(templates::create, templates::list))
        .routes(routes!(templates::get, templates::delete))
        .routes(routes!(secrets::list))
        .routes(routes!(secrets::put, secrets::delete))
        .routes(routes!(events::list))
        .routes(routes!(ports::list))
        .routes(routes!(ports::published_all))
        .routes(routes!(ports::publish, ports::published))
        .routes(routes!(ports::unpublish))
        .routes(routes!(images::list))
        .routes(routes!(images::pull))
        .routes(routes!(images::import))
        .routes(routes!(images::get, images::delete))
        .routes(routes!(images::save))
        .routes(routes!(tasks::list))
        .routes(routes!(tasks::get, tasks::cancel))
        .routes(routes!(volumes::create, volumes::list))
        .routes(routes!(volumes::get, volumes::delete))
        .routes(routes!(volumes::resize))
        .routes(routes!(volumes::clone))
        .routes(routes!(backups::create, backups::list))
        .routes(routes!(backups::get, backups::delete))
        .routes(routes!(backups::restore))
        .routes(routes!(
            backups::put_schedule,
            backups::get_schedule,
            backups::delete_schedule
        ))
        .route(
            "/sandboxes/{id}/proxy/{port}",
            axum::routing::any(ports::proxy_root),
        )
        .route(
            "/sandboxes/{id}/proxy/{port}/",
            axum::routing::any(ports::proxy_root),
        )
        .route(
            "/sandboxes/{id}/proxy/{port}/{*path}",
            axum::routing::any(ports::proxy_with_path),
        )
}

/// The OpenAPI document as served at `/openapi.json` with the default
/// config's sizes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api_router().into_openapi();
    finish_doc(&mut doc, &crate::config::Config::default());
    doc
}

fn finish_doc(doc: &mut utoipa::openapi::OpenApi, config: &crate::config::Config) {
    utoipa::Modify::modify(&CommonErrors, doc);
    size_bounds(doc, &config.vm.size_bounds());
    cross_field_rules(doc);
}

/// Rules across fields that derived schemas cannot carry, joined to them
/// with `allOf`.
fn cross_field_rules(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::schema::AllOfBuilder;
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    if let Some(exec) = components.schemas.remove("ExecRequest") {
        let joined = AllOfBuilder::new()
            .item(exec)
            .item(crate::api_types::schema::detached_takes_no_stdin())
            .build();
        components.schemas.insert(
            "ExecRequest".to_string(),
            utoipa::openapi::schema::Schema::AllOf(joined).into(),
        );
    }
}

/// Writes this daemon's size limits (`[vm] max_*`) into the document's
/// `cpus`, `memory_mb` and `disk_mb`, so it says what a create may ask.
fn size_bounds(doc: &mut utoipa::openapi::OpenApi, b: &crate::api_types::SizeBounds) {
    use crate::api_types::{cpus_range, disk_mb_range, memory_mb_range};
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::RefOr;
    let wide = |(lo, hi): (u32, u32)| (u64::from(lo), u64::from(hi));
    let bounds = [
        ("cpus", wide(cpus_range(b.max_cpus))),
        ("memory_mb", wide(memory_mb_range(b.max_memory_mb))),
        ("disk_mb", disk_mb_range(b.max_disk_mb)),
    ];
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    for name in ["CreateSandbox", "CreateTemplate"] {
        let Some(RefOr::T(Schema::Object(o))) = components.schemas.get_mut(name) else {
            continue;
        };
        for (field, (min, max)) in bounds {
            if let Some(RefOr::T(Schema::Object(p))) = o.properties.get_mut(field) {
                p.minimum = Some((min as usize).into());
                p.maximum = Some((max as usize).into());
            }
        }
    }
}

/// Errors any operation can answer, documented on each one that does not
/// say otherwise: 400 (a malformed path, query or body: the extractors'
/// rejections), and on authenticated operations 401 (no or a bad key) and
/// 429 (rate limits); 426 on the WebSocket routes; 409 on a sandbox's
/// routes. Found missing by schemathesis (tests/api_fuzz.rs).
struct CommonErrors;

impl utoipa::Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |what: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ApiError")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            // Whatever reaches a sandbox's guest meets its state: failed,
            // or stopped, restarted or deleted while the request ran.
            let in_sandbox = path.starts_with("/sandboxes/{id}/");
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
            ]
            .into_iter()
            .flatten()
            {
                // `security(())` marks the public operations.
                let public = op
                    .security
                    .as_ref()
                    .is_some_and(|s| s.iter().all(|r| r == &Default::default()));
                let mut add = vec![("400", "Malformed path, query or body")];
                if !public {
                    add.push(("401", "Missing or invalid API key"));
                    add.push(("429", "A cap or a rate limit; see Retry-After"));
                }
                if in_sandbox {
                    add.push(("409", "The sandbox's state does not allow it"));
                }
                // A WebSocket route asked as plain HTTP.
                if op.responses.responses.contains_key("101") {
                    add.push(("426", "Not a WebSocket handshake (Upgrade: websocket)"));
                }
                for (code, what) in add {
                    op.responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(|| error(what).into());
                }
            }
        }
    }
}

/// A WebSocket upgrade. A plain request (no `Connection: upgrade`,
/// `Upgrade: websocket`) gets a JSON 426 naming the protocol; a broken
/// handshake a JSON 400.
#[derive(Debug)]
pub struct Ws(pub axum::extract::ws::WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for Ws {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, s: &S) -> Result<Self, ApiError> {
        use axum::extract::ws::rejection::WebSocketUpgradeRejection as R;
        axum::extract::ws::WebSocketUpgrade::from_request_parts(parts, s)
            .await
            .map(Ws)
            .map_err(|e| match e {
                R::InvalidConnectionHeader(_) | R::InvalidUpgradeHeader(_) => {
                    ApiError::UpgradeRequired(format!(
                        "this route is a WebSocket: {}",
                        e.body_text()
                    ))
                }
                other => ApiError::BadRequest(other.body_text()),
            })
    }
}

/// The whole service: routes, auth, request ids, fallbacks.
pub fn router(state: AppStateRef) -> Router {
    let (routes, mut api) = api_router().split_for_parts();
    finish_doc(&mut api, &state.config);
    let json = serde_json::to_string_pretty(&api).unwrap_or_else(|_| "{}".into());
    let _ = state.openapi.set(json);
    let routes = routes
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .route_layer(axum::middleware::from_fn(metrics::mark_route));
    // E2B's SDKs: their own auth (API key header, envd access tokens)
    // and error shapes; `[e2b] enabled = false`: 404 like any unknown path.
    let routes = if state.config.e2b.enabled {
        routes.nest(e2b::PREFIX, e2b::router())
    } else {
        routes
    };
    routes
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_span,
        ))
        .with_state(state)
}

/// A handler that panicked: logged with the request's id (the span), and
/// answered like any internal error.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic");
    tracing::error!("handler panicked: {what}");
    ApiError::Internal(format!("handler panicked: {what}")).into_response()
}

async fn fallback(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no such route: {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "method {} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}

/// Bearer key → [`Caller`] in the request's extensions; open routes pass.
async fn auth(State(st): State<AppStateRef>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // `/metrics` checks its own token.
    if path == "/health"
        || path == "/openapi.json"
        || path == "/metrics"
        || path.starts_with("/_shell/")
    {
        return next.run(req).await;
    }
    let key = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_token)
        .map(str::to_owned);
    let Some(key) = key else {
        return ApiError::Unauthorized.into_response();
    };
    let user = match st
        .store
        .read(move |c| crate::auth::authenticate(c, &key))
        .await
    {
        Ok(Some(u)) => u,
        Ok(None) => return ApiError::Unauthorized.into_response(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let caps = EffectiveCaps::resolve(&user.caps, &st.config.limits, &st.config.vm);
    tracing::Span::current().record("user", user.name.as_str());
    let user_id = user.id.clone();
    req.extensions_mut().insert(Caller { user, caps });
    let resp = next.run(req).await;
    if let Some(r) = resp.extensions().get::<crate::events::Rejection>() {
        st.events.rejected(&user_id, r);
    }
    resp
}

/// A request id and a span per request; the status and time are logged.
async fn request_span(State(st): State<AppStateRef>, req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("r{}", st.next_request.fetch_add(1, Ordering::Relaxed)));
    let span = tracing::info_span!(
        "request",
        id = %id,
        method = %req.method(),
        path = %req.uri().path(),
        user = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    let took = started.elapsed();
    st.metrics.request(
        method.as_str(),
        resp.extensions()
            .get::<metrics::Route>()
            .map(|r| r.0.as_str()),
        status.as_u16(),
        took,
    );
    span.in_scope(|| {
        let ms = took.as_secs_f64() * 1e3;
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), ms, "request failed");
        } else if status.is_client_error() {
            tracing::info!(status = status.as_u16(), ms, "request refused");
        } else {
            tracing::debug!(status = status.as_u16(), ms, "request");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// `201 Created` with a JSON body.
fn created<T: serde::Serialize>(v: T) -> Response {
    (StatusCode::CREATED, axum::Json(v)).into_response()
}

#[cfg(test)]
mod panic_tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_answers_500_json_without_detail() {
        let resp = panic_response(Box::new("index out of bounds at /src/x.rs"));
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        let msg = v["error"].as_str().expect("error field");
        assert!(msg.starts_with("internal error"), "{msg}");
        assert!(!msg.contains("/src/x.rs"), "{msg}");
    }
}

#[cfg(test)]
mod json_body_tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Sizes {
        #[serde(default)]
        cpus: Option<u32>,
        #[serde(default)]
        ratio: Option<f64>,
    }

    async fn parse(body: &'static str) -> Result<Sizes, ApiError> {
        let req = Request::builder()
            .body(axum::body::Body::from(body))
            .expect("request");
        JsonBody::<Sizes>::from_request(req, &()).await.map(|b| b.0)
    }

    #[tokio::test]
    async fn whole_floats_are_integers_and_null_or_nothing_the_defaults() {
        let none = Sizes {
            cpus: None,
            ratio: None,
        };
        assert_eq!(parse("").await.expect("empty"), none);
        assert_eq!(parse(" null ").await.expect("null"), none);
        let s = parse(r#"{"cpus": 2.0, "ratio": 3}"#).await.expect("whole");
        assert_eq!((s.cpus, s.ratio), (Some(2), Some(3.0)));
        for bad in [
            r#"{"cpus": 2.5}"#,
            r#"{"cpus": -1.0}"#,
            r#"{"cpus": 1e300}"#,
            "[1",
            "3",
        ] {
            let e = parse(bad).await.expect_err(bad);
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
