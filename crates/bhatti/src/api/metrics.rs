//! `GET /metrics`: the daemon's metrics in the Prometheus (OpenMetrics)
//! text format. On the API's listeners it needs `[metrics] token` as a
//! bearer token (404 while none is configured); `[metrics] listen` serves
//! it alone without auth ([`listener_router`]).

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppStateRef};

/// The route template a request matched, put in its response's
/// extensions for the request metrics (the outer middleware runs before
/// routing and cannot see [`MatchedPath`]).
#[derive(Debug, Clone)]
pub struct Route(pub String);

pub async fn mark_route(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| Route(m.as_str().to_owned()));
    let mut resp = next.run(req).await;
    if let Some(r) = route {
        resp.extensions_mut().insert(r);
    }
    resp
}

/// The daemon's metrics (Prometheus/OpenMetrics text). Authenticated with
/// the `[metrics] token` secret, not a user's key; 404 without one
/// configured.
#[utoipa::path(get, path = "/metrics", tag = "meta", security(()),
    responses(
        (status = 200, description = "Metrics in the OpenMetrics text format", content_type = "application/openmetrics-text"),
        (status = 401, description = "Missing or wrong metrics token"),
        (status = 404, description = "No [metrics] token is configured"),
    ))]
pub async fn metrics(
    State(st): State<AppStateRef>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let want = &st.config.metrics.token;
    if want.is_empty() {
        return Err(ApiError::NotFound(
            "metrics are not served here: set [metrics] token or listen".into(),
        ));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_token)
        .unwrap_or_default();
    // Digests compare in constant time whatever the lengths.
    let ok: bool = Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(want.as_bytes()))
        .into();
    if !ok {
        return Err(ApiError::Unauthorized);
    }
    Ok(render(&st))
}

fn render(st: &AppStateRef) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        st.metrics.render(&st.engine),
    )
        .into_response()
}

/// The `[metrics] listen` listener's service: `GET /metrics` only, open.
pub fn listener_router(state: AppStateRef) -> axum::Router {
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|State(st): State<AppStateRef>| async move { render(&st) }),
        )
        .fallback(|| async { ApiError::NotFound("only GET /metrics is served here".into()) })
        .with_state(state)
}
