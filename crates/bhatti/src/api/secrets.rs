//! `/secrets`: age-encrypted at rest, values never returned.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiError, AppStateRef, Caller, JsonBody};
use crate::api_types::{rfc3339_ms, SecretList, SecretView, SetSecret};
use crate::auth::RequestClass;

/// The caller's secrets (names and times only).
#[utoipa::path(get, path = "/secrets", tag = "secrets",
    responses((status = 200, body = SecretList), (status = 401, body = crate::api_types::ApiError)))]
pub async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
) -> Result<Json<SecretList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let owner = caller.user.id.clone();
    let rows = st
        .store
        .run(move |c| crate::store::secrets::list(c, &owner))
        .await?;
    Ok(Json(SecretList {
        secrets: rows
            .into_iter()
            .map(|m| SecretView {
                name: m.name,
                created_at: rfc3339_ms(m.created_at),
                updated_at: rfc3339_ms(m.updated_at),
            })
            .collect(),
    }))
}

/// Sets (creates or replaces) a secret.
#[utoipa::path(put, path = "/secrets/{name}", tag = "secrets",
    params(("name" = crate::api_types::schema::SecretName, Path)),
    request_body = SetSecret,
    responses((status = 204), (status = 400, body = crate::api_types::ApiError)))]
pub async fn put(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<SetSecret>,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    if body.name.as_deref().is_some_and(|n| n != name) {
        return Err(ApiError::BadRequest(
            "name: the body's name differs from the path's".into(),
        ));
    }
    let owner = caller.user.id.clone();
    let st2 = st.clone();
    tokio::task::spawn_blocking(move || {
        st2.store
            .with(|c| Ok(st2.secrets.set(c, &owner, &name, &body.value)))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??
    .map_err(ApiError::from)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes a secret.
#[utoipa::path(delete, path = "/secrets/{name}", tag = "secrets",
    params(("name" = crate::api_types::schema::SecretName, Path)),
    responses((status = 204), (status = 404, body = crate::api_types::ApiError)))]
pub async fn delete(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    let owner = caller.user.id.clone();
    st.store
        .run(move |c| crate::store::secrets::delete(c, &owner, &name))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
