//! E2B compatibility: the official E2B SDKs (`pip install e2b`,
//! `npm install e2b`) drive bhatti sandboxes unchanged, configured only by
//! `E2B_API_URL` and `E2B_SANDBOX_URL` (docs/e2b.md). Served under `/e2b`
//! on the API's listeners.
//!
//! - [`control`]: the control plane (`/v2/sandboxes`, `/sandboxes/{id}/…`)
//!   mapped onto bhatti's sandboxes and thermal states;
//! - [`process`], [`filesystem`]: envd's Connect RPC services mapped onto
//!   exec, sessions, PTYs and the agent's file operations; [`files`]:
//!   envd's plain HTTP routes (`/files`, `/health`);
//! - [`connect`]: the Connect protocol; [`auth`]: API keys and envd
//!   access tokens; [`error`]: the error shapes the SDKs read.

mod auth;
mod connect;
mod control;
mod error;
mod files;
mod filesystem;
mod process;

use axum::Router;

use super::AppStateRef;

pub use control::spawn_reaper;

/// The envd version the control plane reports: the SDK turns features on
/// by it (octet-stream uploads, file metadata, watch entry info).
pub const ENVD_VERSION: &str = "0.6.4";

/// Where the E2B routes live on the API's listeners.
pub const PREFIX: &str = "/e2b";

/// Every E2B route (control plane and envd: their paths do not overlap).
pub fn router() -> Router<AppStateRef> {
    Router::new()
        .merge(control::routes())
        .merge(process::routes())
        .merge(filesystem::routes())
        .merge(files::routes())
        .route_layer(axum::middleware::from_fn(super::metrics::mark_route))
        .fallback(not_found)
}

/// The separate listener of `[e2b] listen`: the same routes at `/`.
pub fn listener_router(state: AppStateRef) -> Router {
    router()
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            super::panic_response,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::request_span,
        ))
        .with_state(state)
}

async fn not_found(req: axum::extract::Request) -> error::E2bError {
    error::E2bError::not_found(format!(
        "no such E2B route: {} {}",
        req.method(),
        req.uri().path()
    ))
}
