//! `/tasks`: the caller's long operations (image pulls): follow, list,
//! cancel. Tasks live in memory; finished ones are kept for an hour.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::Json;

use super::{ApiError, AppStateRef, Caller};
use crate::api_types::{TaskList, TaskView};
use crate::auth::RequestClass;

/// How long `DELETE /tasks/{id}` waits for the cancelled work to clean up.
const CANCEL_WAIT: Duration = Duration::from_secs(60);

fn no_task(id: &str) -> ApiError {
    ApiError::NotFound(format!("no task '{id}'"))
}

/// One of the caller's tasks.
#[utoipa::path(get, path = "/tasks/{id}", tag = "tasks",
    params(("id" = String, Path)),
    responses((status = 200, body = TaskView), (status = 404, body = crate::api_types::ApiError)))]
pub async fn get(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let t = st
        .images
        .tasks
        .get(&caller.user.id, &id)
        .ok_or_else(|| no_task(&id))?;
    Ok(Json(t.view()))
}

/// The caller's tasks, oldest first.
#[utoipa::path(get, path = "/tasks", tag = "tasks",
    responses((status = 200, body = TaskList)))]
pub async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
) -> Result<Json<TaskList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    Ok(Json(TaskList {
        tasks: st.images.tasks.list(&caller.user.id),
    }))
}

/// Cancels a running task and answers once it has stopped and removed
/// what it had made; a finished task is left as it is.
#[utoipa::path(delete, path = "/tasks/{id}", tag = "tasks",
    params(("id" = String, Path)),
    responses((status = 200, body = TaskView, description = "The task as it ended"),
        (status = 404, body = crate::api_types::ApiError)))]
pub async fn cancel(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    caller.rate(&st, RequestClass::Create)?;
    let t = st
        .images
        .tasks
        .get(&caller.user.id, &id)
        .ok_or_else(|| no_task(&id))?;
    t.cancel.cancel();
    match tokio::time::timeout(CANCEL_WAIT, t.wait()).await {
        Ok(v) => Ok(Json(v)),
        Err(_) => Ok(Json(t.view())),
    }
}
