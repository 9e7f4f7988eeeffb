//! (being written)

use axum::Router;

use crate::api::AppStateRef;

pub(super) fn routes() -> Router<AppStateRef> {
    Router::new()
}
