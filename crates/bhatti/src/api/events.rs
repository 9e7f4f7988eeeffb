//! `GET /events`: thermal transitions (warm, cold, wake with its latency,
//! failures) of the caller's sandboxes.

use axum::extract::{Query, State};
use axum::Json;

use super::{ApiError, AppStateRef, Caller};
use crate::api_types::{EventList, EventsQuery};
use crate::auth::RequestClass;
use crate::store::sandboxes;
use crate::thermal::EventQuery;

/// The caller's sandboxes' recent transitions, oldest first.
#[utoipa::path(get, path = "/events", tag = "events",
    params(EventsQuery),
    responses((status = 200, body = EventList), (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError)))]
pub async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
    Query(q): Query<EventsQuery>,
) -> Result<Json<EventList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let ids = match &q.sandbox {
        Some(id) => vec![st.sandbox(&caller, id).await?.id],
        None => {
            let owner = caller.user.id.clone();
            st.store
                .run(move |c| sandboxes::list(c, &owner))
                .await?
                .into_iter()
                .map(|r| r.id)
                .collect()
        }
    };
    let events = st.thermal.events(&EventQuery {
        sandbox_ids: Some(ids),
        after_seq: q.after,
        limit: Some(q.limit.unwrap_or(100).min(1000)),
        ..Default::default()
    });
    Ok(Json(EventList { events }))
}
