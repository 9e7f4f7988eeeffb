//! `GET /health` and `GET /openapi.json`: open, no auth.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use super::AppStateRef;
use crate::api_types::Health;

/// Liveness: answers without touching any sandbox.
#[utoipa::path(get, path = "/health", tag = "meta", security(()),
    responses((status = 200, body = Health)))]
pub async fn health(State(st): State<AppStateRef>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        backend: st.backend.to_string(),
    })
}

/// This API's OpenAPI 3 document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub async fn openapi_json(State(st): State<AppStateRef>) -> impl IntoResponse {
    let body = st.openapi.get().cloned().unwrap_or_else(|| "{}".into());
    ([(header::CONTENT_TYPE, "application/json")], body)
}
