//! Ports of a guest: listing, the authenticated proxy, publishing.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;

use super::{created, ApiError, AppState, AppStateRef, Caller, JsonBody};
use crate::api_types::{PortList, PortView, PublishRequest, PublishedList, PublishedPort};
use crate::auth::RequestClass;
use crate::proxy::{alias, Forwarded};
use crate::store::published::{self, Published};
use crate::store::sandboxes::SandboxRow;

fn view(st: &AppState, p: &Published) -> PublishedPort {
    PublishedPort {
        id: p.id.clone(),
        sandbox_id: p.sandbox_id.clone(),
        port: p.port,
        alias: p.alias.clone(),
        url: st.proxy.url_of(&p.alias),
        created_at: p.created_at,
    }
}

/// The guest's listening TCP ports (wakes it), with their aliases.
#[utoipa::path(get, path = "/sandboxes/{id}/ports", tag = "ports",
    params(("id" = String, Path)),
    responses((status = 200, body = PortList), (status = 404, body = crate::api_types::ApiError),
        (status = 502, body = crate::api_types::ApiError)))]
pub async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PortList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let row = st.sandbox(&caller, &id).await?;
    let agent = st.agent(&row).await?;
    let listening = agent.ports().await?;
    let (owner, sid) = (row.owner.clone(), row.id.clone());
    let published = st
        .store
        .read(move |c| published::list_for_sandbox(c, &owner, &sid))
        .await?;
    let mut ports: Vec<PortView> = Vec::new();
    for l in listening.ports {
        match ports.last_mut() {
            Some(p) if p.port == l.port => p.addresses.push(l.address),
            _ => ports.push(PortView {
                port: l.port,
                addresses: vec![l.address],
                published: None,
            }),
        }
    }
    for p in &mut ports {
        p.published = published
            .iter()
            .find(|x| x.port == p.port)
            .map(|x| x.alias.clone());
    }
    Ok(Json(PortList { ports }))
}

/// The caller's published ports, across sandboxes (wakes nothing).
#[utoipa::path(get, path = "/ports", tag = "ports",
    responses((status = 200, body = PublishedList)))]
pub async fn published_all(
    State(st): State<AppStateRef>,
    caller: Caller,
) -> Result<Json<PublishedList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let owner = caller.user.id.clone();
    let rows = st
        .store
        .read(move |c| published::list_for_owner(c, &owner))
        .await?;
    Ok(Json(PublishedList {
        published: rows.iter().map(|p| view(&st, p)).collect(),
    }))
}

/// Publishes a port under a public alias (the sandbox need not listen yet).
#[utoipa::path(post, path = "/sandboxes/{id}/publish", tag = "ports",
    params(("id" = String, Path)),
    request_body = PublishRequest,
    responses((status = 201, body = PublishedPort), (status = 400, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError), (status = 409, body = crate::api_types::ApiError),
        (status = 429, body = crate::api_types::ApiError)))]
pub async fn publish(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<PublishRequest>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    if req.port == 0 {
        return Err(ApiError::BadRequest("port: must be 1 to 65535".into()));
    }
    if let Some(a) = &req.alias {
        // A well-formed name that is taken: like one in use, a conflict.
        if alias::is_reserved(a) {
            return Err(ApiError::Conflict(format!("alias: '{a}' is reserved")));
        }
        alias::validate(a)?;
    }
    let row = st.sandbox(&caller, &id).await?;
    let explicit = req.alias.is_some();
    let alias = req
        .alias
        .unwrap_or_else(|| alias::derived(&row.name, req.port));
    let max = st.config.proxy.max_published_per_user;
    let (owner, sid, port) = (row.owner.clone(), row.id.clone(), req.port);
    let mut r = {
        let (owner, sid, alias) = (owner.clone(), sid.clone(), alias.clone());
        st.store
            .run(move |c| published::insert(c, &owner, &sid, port, &alias, max))
            .await
    };
    // A derived alias someone else holds: add a random suffix once.
    if !explicit && matches!(&r, Err(crate::store::StoreError::Conflict(m)) if m.contains("taken"))
    {
        let mut b = [0u8; 3];
        rand::fill(&mut b);
        let base = alias::derived(&row.name, port);
        let keep = base.len().min(alias::MAX_ALIAS - 7);
        let retry = format!("{}-{}", base[..keep].trim_end_matches('-'), hex::encode(b));
        r = st
            .store
            .run(move |c| published::insert(c, &owner, &sid, port, &retry, max))
            .await;
    }
    let p = r?;
    tracing::info!(sandbox = %row.id, port, alias = %p.alias, "port published");
    Ok(created(view(&st, &p)))
}

/// A sandbox's published ports.
#[utoipa::path(get, path = "/sandboxes/{id}/publish", tag = "ports",
    params(("id" = String, Path)),
    responses((status = 200, body = PublishedList), (status = 404, body = crate::api_types::ApiError)))]
pub async fn published(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<PublishedList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let row = st.sandbox(&caller, &id).await?;
    let rows = st
        .store
        .read(move |c| published::list_for_sandbox(c, &row.owner, &row.id))
        .await?;
    Ok(Json(PublishedList {
        published: rows.iter().map(|p| view(&st, p)).collect(),
    }))
}

/// Unpublishes a port.
#[utoipa::path(delete, path = "/sandboxes/{id}/publish/{port}", tag = "ports",
    params(("id" = String, Path), ("port" = u16, Path, minimum = 1, maximum = 65535)),
    responses((status = 204), (status = 404, body = crate::api_types::ApiError)))]
pub async fn unpublish(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path((id, port)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    let port = parse_port(&port)?;
    let row = st.sandbox(&caller, &id).await?;
    let p = st
        .store
        .run(move |c| published::delete(c, &row.owner, &row.id, port))
        .await?;
    tracing::info!(sandbox = %p.sandbox_id, port, alias = %p.alias, "port unpublished");
    Ok(StatusCode::NO_CONTENT)
}

fn parse_port(s: &str) -> Result<u16, ApiError> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::BadRequest(format!("port: '{s}' is not a port (1 to 65535)")))
}

/// Any request to a guest port, authenticated as the sandbox's owner
/// (wakes it). The path after the port is the guest's; the bearer key is
/// not passed on. Upgrades (WebSocket) are relayed.
#[utoipa::path(method(get, post, put, patch, delete, head, options),
    path = "/sandboxes/{id}/proxy/{port}/{path}", tag = "ports",
    params(("id" = String, Path), ("port" = u16, Path, minimum = 1, maximum = 65535), ("path" = String, Path, description = "The guest's path")),
    responses((status = 200, description = "The guest's response, as it sent it"),
        (status = 404, body = crate::api_types::ApiError),
        (status = 413, body = crate::api_types::ApiError),
        (status = 502, body = crate::api_types::ApiError),
        (status = 504, body = crate::api_types::ApiError)))]
#[allow(dead_code)]
pub(super) fn proxy_doc() {}

pub async fn proxy_with_path(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path((id, port, _path)): Path<(String, String, String)>,
    req: Request,
) -> Result<Response<Body>, ApiError> {
    proxy(st, caller, id, port, req).await
}

pub async fn proxy_root(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path((id, port)): Path<(String, String)>,
    req: Request,
) -> Result<Response<Body>, ApiError> {
    proxy(st, caller, id, port, req).await
}

async fn proxy(
    st: AppStateRef,
    caller: Caller,
    id: String,
    port: String,
    req: Request,
) -> Result<Response<Body>, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    let port = parse_port(&port)?;
    let row = st.sandbox(&caller, &id).await?;
    st.agent(&row).await?;
    // The guest's path: what follows `/sandboxes/{id}/proxy/{port}`, as
    // the client sent it (still percent-encoded).
    let path = req.uri().path();
    let cut = path
        .match_indices('/')
        .nth(4)
        .map_or(path.len(), |(i, _)| i);
    let (prefix, tail) = path.split_at(cut);
    let prefix = prefix.to_owned();
    let tail = if tail.is_empty() { "/" } else { tail };
    let guest = match req.uri().query() {
        Some(q) => format!("{tail}?{q}"),
        None => tail.to_owned(),
    };
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let fwd = Forwarded {
        client: None,
        proto: "http",
        host,
        prefix: Some(prefix),
    };
    st.proxy.relay(&row.id, port, &guest, req, fwd).await
}

/// Aliases derived from a sandbox's old name follow its new one.
pub(super) async fn follow_rename(st: &AppState, row: &SandboxRow, old_name: &str) {
    let (owner, id, old, new) = (
        row.owner.clone(),
        row.id.clone(),
        old_name.to_owned(),
        row.name.clone(),
    );
    let r = st
        .store
        .run(move |c| {
            published::follow_rename(c, &owner, &id, |port| {
                (alias::derived(&old, port), alias::derived(&new, port))
            })
        })
        .await;
    match r {
        Ok(changed) => {
            for p in changed {
                tracing::info!(sandbox = %p.sandbox_id, port = p.port, alias = %p.alias, "alias follows the rename");
            }
        }
        Err(e) => tracing::warn!(id = %row.id, "renaming published aliases: {e}"),
    }
}
