//! The web shell: a link that opens one sandbox's terminal in a browser.
//!
//! - `POST /sandboxes/{id}/shell-token` makes a token (`bhs_` + 64 hex
//!   characters; only its SHA-256 is stored, it expires after `[shell]
//!   token_ttl_secs`, a sandbox has at most five live ones) and the link
//!   `/_shell/{id}#token=…`. `DELETE` revokes all of the sandbox's tokens.
//! - `/_shell/…` is open (no API key): the page and its assets (xterm.js
//!   from the npm registry, brought in by build.rs, and our small
//!   `web/shell.js`). The token stays in the URL fragment, which browsers
//!   never send; the page sends it in an `Authorization` header to
//!   `GET /_shell/{id}/token` (is it live?) and, since a browser cannot set
//!   headers on a WebSocket, as a `Sec-WebSocket-Protocol` value to
//!   `GET /_shell/{id}/ws`. A token grants that one sandbox's login shell
//!   and nothing else; an open socket closes (code 4001) once its token is
//!   revoked or expires.

use std::time::Duration;

use axum::extract::ws::CloseFrame;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::shell::{self, WsQuery};
use super::{created, ApiError, AppStateRef, Caller, Q};
use crate::api_types::{rfc3339_ms, ShellTokenCheck, ShellTokenView};
use crate::auth::{EffectiveCaps, RequestClass};
use crate::store::shell_tokens::{self, ShellGrant};

/// Every token starts with this.
pub const TOKEN_PREFIX: &str = "bhs_";
/// The WebSocket subprotocol the page asks for (beside the token).
pub const PROTOCOL: &str = "bhatti-shell";
/// Close code of a socket whose link was revoked or expired.
pub const CLOSE_REVOKED: u16 = 4001;
/// How often an open socket checks that its token is still live.
const RECHECK: Duration = Duration::from_secs(1);

/// A fresh token: `bhs_` + 32 random bytes in hex.
fn generate() -> String {
    let mut b = [0u8; 32];
    rand::fill(&mut b);
    format!("{TOKEN_PREFIX}{}", hex::encode(b))
}

fn well_formed(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

/// A link to the sandbox's terminal; the token is shown this once.
#[utoipa::path(post, path = "/sandboxes/{id}/shell-token", tag = "shell",
    params(("id" = String, Path)),
    responses((status = 201, body = ShellTokenView),
        (status = 404, body = crate::api_types::ApiError),
        (status = 409, description = "The sandbox already has five live links", body = crate::api_types::ApiError)))]
pub async fn create_token(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    let row = st.sandbox(&caller, &id).await?;
    let token = generate();
    let hash = crate::auth::hash_key(&token);
    let ttl_ms =
        i64::try_from(st.config.shell.token_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let expires_at = crate::store::now_ms().saturating_add(ttl_ms);
    let (owner, sid) = (row.owner.clone(), row.id.clone());
    st.store
        .run(move |c| shell_tokens::insert(c, &hash, &owner, &sid, expires_at))
        .await?;
    tracing::info!(sandbox = %row.id, "shell link made");
    let base = st.config.shell.public_url.trim_end_matches('/');
    Ok(created(ShellTokenView {
        url: format!("{base}/_shell/{}#token={token}", row.id),
        token,
        expires_at: rfc3339_ms(expires_at),
    }))
}

/// Revokes every link to the sandbox's terminal; open ones close.
#[utoipa::path(delete, path = "/sandboxes/{id}/shell-token", tag = "shell",
    params(("id" = String, Path)),
    responses((status = 204, description = "Revoked (also when there were none)"),
        (status = 404, body = crate::api_types::ApiError)))]
pub async fn revoke(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    let row = st.sandbox(&caller, &id).await?;
    let (owner, sid) = (row.owner.clone(), row.id.clone());
    let n = st
        .store
        .run(move |c| shell_tokens::delete_for_sandbox(c, &owner, &sid))
        .await?;
    tracing::info!(sandbox = %row.id, revoked = n, "shell links revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// The grant of a live, well-formed token for sandbox `id`, else
/// [`ApiError::LinkRefused`].
async fn grant(st: &AppStateRef, id: &str, token: Option<&str>) -> Result<ShellGrant, ApiError> {
    let token = token
        .filter(|t| well_formed(t))
        .ok_or(ApiError::LinkRefused)?;
    let hash = crate::auth::hash_key(token);
    let found = st
        .store
        .read(move |c| shell_tokens::lookup(c, &hash))
        .await?;
    match found {
        // The lookup was by hash (an index); the path's id must be the
        // token's sandbox exactly.
        Some(g) if g.sandbox_id == id => Ok(g),
        _ => Err(ApiError::LinkRefused),
    }
}

/// The token of an `Authorization: Bearer bhs_…` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_token)
}

/// The token among the `Sec-WebSocket-Protocol` values (`bhatti-shell,
/// bhs_…`).
fn protocol_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| p.starts_with(TOKEN_PREFIX))
}

/// Whether a shell link's token is live (the page asks before it connects,
/// so it can say why it cannot).
#[utoipa::path(get, path = "/_shell/{id}/token", tag = "shell", security(()),
    params(("id" = String, Path)),
    responses((status = 200, body = ShellTokenCheck),
        (status = 401, description = "Send Authorization: Bearer bhs_…; refused when invalid, expired or revoked", body = crate::api_types::ApiError)))]
pub async fn check(
    State(st): State<AppStateRef>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ShellTokenCheck>, ApiError> {
    let g = grant(&st, &id, bearer(&headers)).await?;
    Ok(Json(ShellTokenCheck {
        sandbox_id: g.sandbox_id,
        expires_at: rfc3339_ms(g.expires_at),
    }))
}

/// The sandbox's login shell over WebSocket for a shell link: as
/// `GET /sandboxes/{id}/ws` (attach with `session` and `offset`, resize
/// messages), authorized by the token sent as a subprotocol.
#[utoipa::path(get, path = "/_shell/{id}/ws", tag = "shell", security(()),
    params(("id" = String, Path),
        ("session" = Option<String>, Query, description = "Attach to this session; omit to start one"),
        ("offset" = Option<u64>, Query, description = "Replay from this output offset"),
        ("rows" = Option<u16>, Query, maximum = 65535), ("cols" = Option<u16>, Query, maximum = 65535)),
    responses((status = 101, description = "WebSocket (subprotocols `bhatti-shell` and the token): see docs/api.md"),
        (status = 400, body = crate::api_types::ApiError),
        (status = 401, description = "The link is invalid, expired or revoked", body = crate::api_types::ApiError)))]
pub async fn ws(
    State(st): State<AppStateRef>,
    Path(id): Path<String>,
    Q(q): Q<WsQuery>,
    headers: HeaderMap,
    super::Ws(upgrade): super::Ws,
) -> Result<Response, ApiError> {
    let g = grant(&st, &id, protocol_token(&headers)).await?;
    if q.cmd.is_some() {
        return Err(ApiError::BadRequest(
            "cmd: a shell link opens the login shell only".into(),
        ));
    }
    let owner = g.owner.clone();
    let user = st
        .store
        .read(move |c| crate::store::users::get(c, &owner))
        .await?
        .ok_or(ApiError::LinkRefused)?;
    let caps = EffectiveCaps::resolve(&user.caps, &st.config.limits, &st.config.vm);
    tracing::Span::current().record("user", user.name.as_str());
    let caller = Caller { user, caps };
    let stop = watch(
        st.clone(),
        protocol_token(&headers).unwrap_or_default().to_owned(),
    );
    shell::open(
        st,
        caller,
        g.sandbox_id,
        q,
        upgrade.protocols([PROTOCOL]),
        Some(Box::pin(stop)),
    )
    .await
}

/// Resolves once the token is no longer live (revoked or expired).
async fn watch(st: AppStateRef, token: String) -> CloseFrame {
    let hash = crate::auth::hash_key(&token);
    loop {
        tokio::time::sleep(RECHECK).await;
        let h = hash.clone();
        match st.store.read(move |c| shell_tokens::lookup(c, &h)).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return CloseFrame {
                    code: CLOSE_REVOKED,
                    reason: "the shell link was revoked or expired".into(),
                }
            }
            Err(e) => tracing::warn!("checking a shell link: {e}"),
        }
    }
}

/// The page: a terminal that connects with the token in its URL fragment.
#[utoipa::path(get, path = "/_shell/{id}", tag = "shell", security(()),
    params(("id" = String, Path)),
    responses((status = 200, description = "The web shell page", content_type = "text/html")))]
pub async fn page(Path(_id): Path<String>) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response();
    let h = resp.headers_mut();
    for (k, v) in [
        ("cache-control", "no-store"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        (
            // xterm.js sets element styles from script.
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; font-src 'self' data:; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    resp
}

/// The page's scripts and styles.
#[utoipa::path(get, path = "/_shell/assets/{file}", tag = "shell", security(()),
    params(("file" = String, Path, description = "xterm.js, xterm.css, addon-fit.js, shell.js or shell.css")),
    responses((status = 200, description = "The file"), (status = 404, body = crate::api_types::ApiError)))]
pub async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (body, kind): (&'static [u8], &'static str) = match file.as_str() {
        "xterm.js" => (XTERM_JS, "text/javascript; charset=utf-8"),
        "addon-fit.js" => (FIT_JS, "text/javascript; charset=utf-8"),
        "xterm.css" => (XTERM_CSS, "text/css; charset=utf-8"),
        "shell.js" => (SHELL_JS.as_bytes(), "text/javascript; charset=utf-8"),
        "shell.css" => (SHELL_CSS.as_bytes(), "text/css; charset=utf-8"),
        _ => return Err(ApiError::NotFound(format!("no such asset: {file}"))),
    };
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response())
}

const PAGE: &str = include_str!("../../web/shell.html");
const SHELL_JS: &str = include_str!("../../web/shell.js");
const SHELL_CSS: &str = include_str!("../../web/shell.css");
// From the npm registry via build.rs (pinned in web/package-lock.json).
const XTERM_JS: &[u8] = include_bytes!(concat!(
    env!("OUT_DIR"),
    "/web/node_modules/@xterm/xterm/lib/xterm.js"
));
const XTERM_CSS: &[u8] = include_bytes!(concat!(
    env!("OUT_DIR"),
    "/web/node_modules/@xterm/xterm/css/xterm.css"
));
const FIT_JS: &[u8] = include_bytes!(concat!(
    env!("OUT_DIR"),
    "/web/node_modules/@xterm/addon-fit/lib/addon-fit.js"
));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_where_they_are_read() {
        let t = generate();
        assert!(well_formed(&t), "{t}");
        assert_ne!(t, generate());
        assert!(!well_formed("bhs_short"));
        assert!(!well_formed(&t.replace("bhs_", "bht_")));
        assert!(!well_formed(&t.to_uppercase()));
        assert!(!well_formed(&crate::auth::generate_key()));

        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(&format!("{PROTOCOL}, {t}")).unwrap(),
        );
        assert_eq!(protocol_token(&h), Some(t.as_str()));
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        assert_eq!(bearer(&h), Some(t.as_str()));
        assert_eq!(protocol_token(&HeaderMap::new()), None);
    }

    #[test]
    fn the_page_and_assets_are_embedded() {
        assert!(PAGE.contains("assets/xterm.js"));
        assert!(PAGE.contains("assets/shell.js"));
        assert!(XTERM_JS.len() > 10_000);
        assert!(!XTERM_CSS.is_empty() && !FIT_JS.is_empty());
    }
}
