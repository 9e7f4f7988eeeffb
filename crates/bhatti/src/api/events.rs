//! `GET /events`: the event log of the caller (their sandboxes' lifecycle
//! and thermal transitions, their rejections), oldest first, paged by the
//! `since` cursor.

use axum::extract::State;
use axum::Json;

use super::{ApiError, AppStateRef, Caller, Q};
use crate::api_types::{EventList, EventView, EventsQuery, MAX_EVENTS_PAGE};
use crate::auth::RequestClass;
use crate::store::events::{self, Event, EventFilter};

/// The page when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;

/// The caller's events after `since`, oldest first.
#[utoipa::path(get, path = "/events", tag = "events",
    params(EventsQuery),
    responses((status = 200, body = EventList), (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError)))]
pub async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
    Q(q): Q<EventsQuery>,
) -> Result<Json<EventList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let kinds = q.kinds()?;
    let limit = match q.limit {
        None => DEFAULT_LIMIT,
        Some(n @ 1..=MAX_EVENTS_PAGE) => n,
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "limit: must be 1 to {MAX_EVENTS_PAGE} (got {n})"
            )))
        }
    };
    let since = match q.since {
        None => 0,
        Some(s) => i64::try_from(s).map_err(|_| ApiError::BadRequest("since: too large".into()))?,
    };
    let sandbox_id = match &q.sandbox {
        Some(id) => Some(st.sandbox(&caller, id).await?.id),
        None => None,
    };
    let f = EventFilter {
        since: Some(since),
        kinds,
        sandbox_id,
        owner: Some(caller.user.id.clone()),
        limit,
    };
    let rows = st.store.read(move |c| events::query(c, &f)).await?;
    let next = rows.last().map_or(since, |e| e.id);
    Ok(Json(EventList {
        events: rows.into_iter().map(view).collect(),
        next,
    }))
}

/// A stored event as the API shows it (the owner is the caller).
pub fn view(e: Event) -> EventView {
    EventView {
        id: e.id,
        at_unix_ms: e.at,
        kind: e.kind,
        sandbox_id: e.sandbox_id,
        latency_ms: e.latency_ms,
        detail: e.detail,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn openapi_describes_the_query_and_the_answer() {
        let doc = serde_json::to_value(crate::api::openapi()).expect("JSON");
        let params: Vec<&str> = doc["paths"]["/events"]["get"]["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(params, ["since", "type", "sandbox", "limit"]);
        let schemas = &doc["components"]["schemas"];
        for (schema, field) in [
            ("EventList", "next"),
            ("EventList", "events"),
            ("EventView", "type"),
            ("EventView", "latency_ms"),
        ] {
            assert!(
                schemas[schema]["properties"][field].is_object(),
                "{schema}.{field}: {}",
                schemas[schema]
            );
        }
    }
}
