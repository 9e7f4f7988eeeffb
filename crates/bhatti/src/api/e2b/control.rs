//! E2B's control plane mapped onto bhatti's sandboxes: an E2B sandbox is a
//! bhatti sandbox of the API key's user (same id), plus an `e2b_sandboxes`
//! row with its template, envd access token, metadata and end of life.
//!
//! - create (`POST /v2/sandboxes`) is the native create (caps, quotas,
//!   rate limits), `templateID` naming a bhatti template or image (`base`:
//!   the default image) and `envVars` the sandbox's env;
//! - "paused" is bhatti's `stopped` (snapshotted to disk, memory freed);
//!   connect and resume start it again;
//! - the end of life (`timeout`) is kept in the store and enforced by
//!   [`spawn_reaper`]: the sandbox is destroyed, or with `autoPause`
//!   stopped, once it is due (also after a daemon restart);
//! - sandboxes made through the native API are listed too, and get their
//!   E2B row (and token) on first connect; they have no end of life unless
//!   one is set (`POST /sandboxes/{id}/timeout`).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::{new_token, token_hash, ApiKeyCaller};
use super::error::E2bError;
use super::ENVD_VERSION;
use crate::api::{sandboxes, ApiError, AppState, AppStateRef, Caller};
use crate::api_types::{rfc3339_ms, CreateSandbox, NetworkPolicy};
use crate::auth::RequestClass;
use crate::store::e2b::{self as store_e2b, E2bRow};
use crate::store::sandboxes::SandboxRow;

/// What the control plane answers as `clientID` (E2B's cluster node).
const CLIENT_ID: &str = "bhatti";
/// The template of a sandbox made from the default image.
const BASE_TEMPLATE: &str = "base";
/// A timeout when a request has none: the SDKs' documented default (the
/// SDKs leave it out of a create that names none).
const DEFAULT_TIMEOUT_SECS: i64 = 300;
/// The longest end of life one request may set.
const MAX_TIMEOUT_SECS: i64 = 30 * 24 * 3600;
/// `endAt` of a sandbox without an end of life.
const NO_END: &str = "9999-12-31T23:59:59.000Z";
/// Metadata bounds: keys, and bytes of a key or value.
const MAX_METADATA: usize = 64;
const MAX_METADATA_BYTES: usize = 1024;
/// Sandboxes per page of `GET /v2/sandboxes`.
const MAX_LIMIT: usize = 1000;
/// How often the end-of-life task looks for due sandboxes.
const REAP_EVERY: Duration = Duration::from_secs(1);
/// A due sandbox whose end failed is tried again this much later.
const REAP_RETRY_MS: i64 = 30_000;

pub(super) fn routes() -> Router<AppStateRef> {
    Router::new()
        .route("/v2/sandboxes", get(list_v2).post(create))
        .route("/sandboxes", get(list_v1).post(create))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/metrics", get(metrics))
}

// ---------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------

/// `NewSandbox` / `NewSandboxV2` (fields bhatti has no use for are
/// accepted and ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<i64>,
    #[serde(rename = "autoPause")]
    auto_pause: Option<bool>,
    metadata: Option<BTreeMap<String, String>>,
    #[serde(rename = "envVars")]
    env_vars: Option<BTreeMap<String, String>>,
    allow_internet_access: Option<bool>,
}

/// `ConnectSandbox`, `ResumedSandbox`, `SandboxTimeoutRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TimeoutBody {
    timeout: Option<i64>,
    #[serde(rename = "autoPause")]
    auto_pause: Option<bool>,
}

/// `SandboxRefreshRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RefreshBody {
    duration: Option<i64>,
}

/// A JSON body; an empty one is `T::default()`; anything malformed is 400.
fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, E2bError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| E2bError::bad_request(format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(E2bError::bad_request("the body must be a JSON object"));
    }
    serde_json::from_value(v).map_err(|e| E2bError::bad_request(format!("invalid body: {e}")))
}

/// Milliseconds from seconds, bounded.
fn timeout_ms(what: &str, secs: Option<i64>) -> Result<i64, E2bError> {
    let secs = secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
    if !(0..=MAX_TIMEOUT_SECS).contains(&secs) {
        return Err(E2bError::bad_request(format!(
            "{what}: expected 0 to {MAX_TIMEOUT_SECS} seconds, got {secs}"
        )));
    }
    Ok(secs * 1000)
}

fn check_metadata(m: &BTreeMap<String, String>) -> Result<(), E2bError> {
    if m.len() > MAX_METADATA {
        return Err(E2bError::bad_request(format!(
            "metadata: at most {MAX_METADATA} keys"
        )));
    }
    if let Some((k, _)) = m
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() > MAX_METADATA_BYTES || v.len() > MAX_METADATA_BYTES)
    {
        return Err(E2bError::bad_request(format!(
            "metadata: keys must be 1 to {MAX_METADATA_BYTES} bytes and values at most {MAX_METADATA_BYTES} (key {k:?})"
        )));
    }
    Ok(())
}

/// Runs `f` as a tracked task (see [`AppState::detached`]): a client
/// that goes away does not cut a create or a stop in half.
async fn detached<T, F>(st: &AppStateRef, f: F) -> Result<T, E2bError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, E2bError>> + Send + 'static,
{
    st.detached(async move { Ok(f.await) }).await?
}

// ---------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------

/// A sandbox as the control plane shows it.
struct Info {
    row: SandboxRow,
    e2b: Option<E2bRow>,
}

impl Info {
    fn paused(&self) -> bool {
        self.row.status == "stopped"
    }

    fn state(&self) -> &'static str {
        if self.paused() {
            "paused"
        } else {
            "running"
        }
    }

    fn template_id(&self) -> String {
        match &self.e2b {
            Some(e) => e.template_id.clone(),
            None => native_template(&self.row),
        }
    }

    fn started_at(&self) -> String {
        rfc3339_ms(
            self.e2b
                .as_ref()
                .map(|e| e.started_at)
                .unwrap_or(self.row.created_at),
        )
    }

    fn end_at(&self) -> String {
        match self.e2b.as_ref().and_then(|e| e.end_at) {
            Some(ms) => rfc3339_ms(ms),
            None => NO_END.into(),
        }
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        self.e2b
            .as_ref()
            .map(|e| e.metadata.clone())
            .unwrap_or_default()
    }

    /// cpus, memory MiB, disk MiB (from the engine, else the row's spec).
    fn sizes(&self, st: &AppState) -> (u64, u64, u64) {
        let sb = st.engine.get(&self.row.id).ok();
        let spec = |k: &str| self.row.spec.get(k).and_then(Value::as_u64);
        let cpus = sb
            .as_ref()
            .map(|s| u64::from(s.cpus))
            .or_else(|| spec("cpus"))
            .unwrap_or(0);
        let mem = sb
            .as_ref()
            .map(|s| u64::from(s.memory_mb))
            .or_else(|| spec("memory_mb"))
            .unwrap_or(0);
        let disk = sb
            .as_ref()
            .and_then(|s| s.disk_mb)
            .or_else(|| spec("disk_mb"))
            .or_else(|| {
                let p = &sb.as_ref()?.paths.root_disk;
                Some(std::fs::metadata(p).ok()?.len() >> 20)
            })
            .unwrap_or(0);
        (cpus, mem, disk)
    }

    /// `ListedSandbox`.
    fn listed(&self, st: &AppState) -> Value {
        let (cpus, mem, disk) = self.sizes(st);
        let template = self.template_id();
        json!({
            "templateID": template,
            "alias": template,
            "sandboxID": self.row.id,
            "clientID": CLIENT_ID,
            "startedAt": self.started_at(),
            "endAt": self.end_at(),
            "cpuCount": cpus,
            "memoryMB": mem,
            "diskSizeMB": disk,
            "metadata": self.metadata(),
            "state": self.state(),
            "envdVersion": ENVD_VERSION,
        })
    }
}

/// The template a native sandbox shows: its template, image, or `base`.
fn native_template(row: &SandboxRow) -> String {
    ["template", "image"]
        .iter()
        .find_map(|k| row.spec.get(*k).and_then(Value::as_str))
        .unwrap_or(BASE_TEMPLATE)
        .to_owned()
}

/// `Sandbox` (create, connect, resume).
fn sandbox_json(e: &E2bRow, token: &str) -> Value {
    json!({
        "templateID": e.template_id,
        "alias": e.template_id,
        "sandboxID": e.sandbox_id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": token,
        "trafficAccessToken": null,
        "domain": null,
    })
}

fn decrypt_token(st: &AppState, e: &E2bRow) -> Result<String, E2bError> {
    let plain = st
        .secrets
        .decrypt(&e.token_enc)
        .map_err(|err| ApiError::Internal(format!("decrypting an envd access token: {err}")))?;
    String::from_utf8(plain)
        .map_err(|_| ApiError::Internal("an envd access token is not UTF-8".into()).into())
}

/// The caller's sandbox (404 for anyone else's) and its E2B row, if any.
async fn info(st: &AppState, caller: &Caller, id: &str) -> Result<Info, E2bError> {
    let row = st.sandbox(caller, id).await?;
    let sid = row.id.clone();
    let e2b = st.store.read(move |c| store_e2b::get(c, &sid)).await?;
    Ok(Info { row, e2b })
}

/// One sandbox's lifecycle changes (connect, pause, timeouts, the
/// end-of-life task) one at a time: an end of life moved by a connect is
/// seen by the task before it acts.
fn lock_of(id: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock, Weak};
    type Locks = Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>;
    static LOCKS: OnceLock<Locks> = OnceLock::new();
    let mut m = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(l) = m.get(id).and_then(Weak::upgrade) {
        return l;
    }
    // Locks nobody holds go (bounded by the sandboxes in flight).
    m.retain(|_, w| w.strong_count() > 0);
    let l = Arc::new(tokio::sync::Mutex::new(()));
    m.insert(id.to_owned(), Arc::downgrade(&l));
    l
}

/// [`info`] read under the sandbox's lifecycle lock (held by the guard).
async fn locked_info(
    st: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<(tokio::sync::OwnedMutexGuard<()>, Info), E2bError> {
    let first = info(st, caller, id).await?;
    let guard = lock_of(&first.row.id).lock_owned().await;
    let info = info(st, caller, &first.row.id).await?;
    Ok((guard, info))
}

/// The E2B row of the caller's sandbox, made (with a new token and no end
/// of life) when it has none: a sandbox made through the native API.
/// Answers the row, its token, and whether it was made now.
async fn ensure_row(st: &AppState, info: &Info) -> Result<(E2bRow, String, bool), E2bError> {
    if let Some(e) = &info.e2b {
        let token = decrypt_token(st, e)?;
        return Ok((e.clone(), token, false));
    }
    let token = new_token();
    let enc = st
        .secrets
        .encrypt(token.as_bytes())
        .map_err(|e| ApiError::Internal(format!("encrypting an envd access token: {e}")))?;
    let new = E2bRow {
        sandbox_id: info.row.id.clone(),
        owner: info.row.owner.clone(),
        template_id: native_template(&info.row),
        token_sha256: token_hash(&token),
        token_enc: enc,
        metadata: BTreeMap::new(),
        started_at: info.row.created_at,
        end_at: None,
        auto_pause: false,
    };
    let stored = st
        .store
        .run(move |c| store_e2b::insert_if_absent(c, &new))
        .await?;
    if stored.token_sha256 == token_hash(&token) {
        Ok((stored, token, true))
    } else {
        // Another request made it first.
        let token = decrypt_token(st, &stored)?;
        Ok((stored, token, false))
    }
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

/// `POST /v2/sandboxes` (and v1 `POST /sandboxes`): 201 `Sandbox`.
async fn create(
    State(st): State<AppStateRef>,
    ApiKeyCaller(caller): ApiKeyCaller,
    body: Bytes,
) -> Result<Response, E2bError> {
    let req: NewSandbox = parse(&body)?;
    let end_ms = timeout_ms("timeout", req.timeout)?;
    let metadata = req.metadata.unwrap_or_default();
    check_metadata(&metadata)?;
    let template = req
        .template_id
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| BASE_TEMPLATE.into());
    let mut native = CreateSandbox {
        env: req.env_vars.unwrap_or_default(),
        ..Default::default()
    };
    if req.allow_internet_access == Some(false) {
        native.network = Some(NetworkPolicy {
            egress: Some("deny".into()),
            ..Default::default()
        });
    }
    if template != BASE_TEMPLATE {
        let (owner, t) = (caller.user.id.clone(), template.clone());
        let found = st
            .store
            .read(move |c| {
                if crate::store::templates::get(c, &owner, &t)?.is_some() {
                    return Ok(Some(true));
                }
                Ok(crate::store::images::resolve(c, &owner, &t)?.map(|_| false))
            })
            .await?;
        match found {
            Some(true) => native.template = Some(template.clone()),
            Some(false) => native.image = Some(template.clone()),
            None => {
                return Err(E2bError::not_found(format!(
                    "template '{template}' not found (no bhatti template or image of that name)"
                )))
            }
        }
    }
    let auto_pause = req.auto_pause.unwrap_or(false);
    let st2 = st.clone();
    detached(&st, async move {
        create_to_end(st2, caller, native, template, metadata, end_ms, auto_pause).await
    })
    .await
}

async fn create_to_end(
    st: AppStateRef,
    caller: Caller,
    native: CreateSandbox,
    template: String,
    metadata: BTreeMap<String, String>,
    end_ms: i64,
    auto_pause: bool,
) -> Result<Response, E2bError> {
    let resp = sandboxes::create_to_end(st.clone(), caller.clone(), native).await?;
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .map_err(|e| ApiError::Internal(format!("reading the create's answer: {e}")))?;
    let id = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
        .ok_or_else(|| ApiError::Internal(format!("a create answered {status} without an id")))?;
    let token = new_token();
    let now = crate::store::now_ms();
    let stored = async {
        let enc = st
            .secrets
            .encrypt(token.as_bytes())
            .map_err(|e| ApiError::Internal(format!("encrypting an envd access token: {e}")))?;
        let e = E2bRow {
            sandbox_id: id.clone(),
            owner: caller.user.id.clone(),
            template_id: template,
            token_sha256: token_hash(&token),
            token_enc: enc,
            metadata,
            started_at: now,
            end_at: Some(now.saturating_add(end_ms)),
            auto_pause,
        };
        let e2 = e.clone();
        st.store.run(move |c| store_e2b::upsert(c, &e2)).await?;
        Ok::<_, ApiError>(e)
    }
    .await;
    match stored {
        Ok(e) => Ok((StatusCode::CREATED, Json(sandbox_json(&e, &token))).into_response()),
        Err(err) => {
            // No sandbox without its row: it would have no token and no end.
            let rid = id.clone();
            if let Ok(Some(row)) = st
                .store
                .read(move |c| crate::store::sandboxes::get_by_id(c, &rid))
                .await
            {
                if let Err(de) = sandboxes::destroy_row(&st, &caller.user, &row).await {
                    tracing::error!(id, "removing a sandbox whose E2B row failed: {de}");
                }
            }
            Err(err.into())
        }
    }
}

/// `GET /sandboxes/{id}`: `SandboxDetail`.
async fn detail(
    State(st): State<AppStateRef>,
    ApiKeyCaller(caller): ApiKeyCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, E2bError> {
    caller.rate(&st, RequestClass::Read)?;
    let info = info(&st, &caller, &id).await?;
    let mut v = info.listed(&st);
    let token = match &info.e2b {
        Some(e) => Some(decrypt_token(&st, e)?),
        None => None,
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("envdAccessToken".into(), json!(token));
        o.insert("domain".into(), Value::Null);
    }
    Ok(Json(v))
}

/// What `GET /v2/sandboxes` and `GET /sandboxes` filter by.
#[derive(Debug, Default)]
struct ListQuery {
    metadata: Vec<(String, String)>,
    running: bool,
    paused: bool,
    limit: usize,
    next: Option<(i64, String)>,
}

impl ListQuery {
    fn parse(raw: Option<&str>, v2: bool) -> Result<ListQuery, E2bError> {
        let mut q = ListQuery {
            limit: MAX_LIMIT,
            ..Default::default()
        };
        let mut states = false;
        for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            match &*k {
                "metadata" => {
                    for (mk, mv) in url::form_urlencoded::parse(v.as_bytes()) {
                        // The SDKs quote keys and values before encoding
                        // the pairs.
                        q.metadata.push((percent_decode(&mk), percent_decode(&mv)));
                    }
                }
                "state" if v2 => {
                    for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        match s {
                            "running" => q.running = true,
                            "paused" => q.paused = true,
                            other => {
                                return Err(E2bError::bad_request(format!(
                                    "state: expected running or paused, got {other:?}"
                                )))
                            }
                        }
                        states = true;
                    }
                }
                "limit" if v2 => {
                    q.limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            E2bError::bad_request(format!(
                                "limit: expected 1 to {MAX_LIMIT}, got {v:?}"
                            ))
                        })?;
                }
                "nextToken" if v2 && !v.is_empty() => {
                    let bad = || E2bError::bad_request("nextToken: not a token this API gave");
                    let (ms, id) = v.split_once(':').ok_or_else(bad)?;
                    q.next = Some((ms.parse().map_err(|_| bad())?, id.to_owned()));
                }
                _ => {}
            }
        }
        if !states {
            // v2 lists both by default; v1 running ones only.
            q.running = true;
            q.paused = v2;
        }
        Ok(q)
    }
}

/// `%XX` sequences decoded (invalid ones kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The caller's sandboxes that `q` selects, oldest first, and the token of
/// the next page if there is one.
async fn list_of(
    st: &AppState,
    caller: &Caller,
    q: &ListQuery,
) -> Result<(Vec<Value>, Option<String>), E2bError> {
    caller.rate(st, RequestClass::Read)?;
    let owner = caller.user.id.clone();
    let (rows, e2b) = st
        .store
        .read(move |c| {
            Ok((
                crate::store::sandboxes::list(c, &owner)?,
                store_e2b::list(c, &owner)?,
            ))
        })
        .await?;
    let mut e2b: BTreeMap<String, E2bRow> =
        e2b.into_iter().map(|e| (e.sandbox_id.clone(), e)).collect();
    let mut infos: Vec<Info> = rows
        .into_iter()
        .filter(|r| r.status != "creating")
        .map(|row| Info {
            e2b: e2b.remove(&row.id),
            row,
        })
        .filter(|i| if i.paused() { q.paused } else { q.running })
        .filter(|i| {
            let m = i.metadata();
            q.metadata
                .iter()
                .all(|(k, v)| m.get(k).is_some_and(|have| have == v))
        })
        .collect();
    infos.sort_by(|a, b| (a.row.created_at, &a.row.id).cmp(&(b.row.created_at, &b.row.id)));
    if let Some((ms, id)) = &q.next {
        infos.retain(|i| (i.row.created_at, &i.row.id) > (*ms, id));
    }
    let more = infos.len() > q.limit;
    infos.truncate(q.limit);
    let next = more
        .then(|| {
            infos
                .last()
                .map(|i| format!("{}:{}", i.row.created_at, i.row.id))
        })
        .flatten();
    Ok((infos.iter().map(|i| i.listed(st)).collect(), next))
}

/// `GET /v2/sandboxes`: `ListedSandbox[]`, paged (`x-next-token`).
async fn list_v2(
    State(st): State<AppStateRef>,
    ApiKeyCaller(caller): ApiKeyCaller,
    RawQuery(raw): RawQuery,
) -> Result<Response, E2bError> {
    let q = ListQuery::parse(raw.as_deref(), true)?;
    let (list, next) = list_of(&st, &caller, &q).await?;
    let mut resp = Json(list).into_response();
    if let Some(v) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

/// `GET /sandboxes` (v1): the running ones.
async fn list_v1(
    State(st): State<AppStateRef>,
    ApiKeyCaller(caller): ApiKeyCaller,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<Value>>, E2bError> {
    let q = ListQuery::parse(raw.as_deref(), false)?;
    Ok(Json(list_of(&st, &caller, &q).await?.0))
}

/// `DELETE /sandboxes/{id}`: 204.
async fn kill(
    State(st): State<AppStateRef>,
    ApiKeyCaller(caller): ApiKeyCaller,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    caller.rate(&st, RequestClass::Create)?;
    let row = st.sandbox(&caller, &id).await?;
    let st2 = st.clone();
    detached(&st, async move {
        Ok(sandboxes::destroy_row(&st2, &caller.user, &row).await?)
    })
    .await
}

/// `POST /sandboxes/{id}/timeout` `{timeout}`: the end of life is now +
/// timeout (shorter or longer than before). 204.
async fn set_timeout(
    State(st): State<AppStateRef>,
    ApiKeyCaller(caller): ApiKeyCaller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, E2bError> {
    let req: TimeoutBody = parse(&body)?;
    if req.timeout.is_none() {
        return Err(E2bError::bad_request("timeout is required"));
    }
    let ms = timeout_ms("timeout", req.timeout)?;
    caller.rate(&st, RequestClass::Exec)?;
    let (_guard, info) = locked_info(&st, &caller, &id).await?;
    let (e, _, _) = ensure_row(&st, &info).await?;
    let end = crate::store::now_ms().saturating_add(ms);
    let sid = e.sandbox_id.clone();
    st.store
        .run(move |c| store_e2b::set_end_at(c, &sid, Some(end)))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/refreshes` `{duration}`: the end of life is at
/// least now + duration. 204.
async fn refresh(
    State(st): State<AppStateRef>,
    ApiKeyCaller(caller): ApiKeyCaller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, E2bError> {
    let req: RefreshBody = parse(&body)?;
    let ms = timeout_ms("duration", req.duration)?;
    caller.rate(&st, RequestClass::Exec)?;
    let (_guard, info) = locked_info(&st, &caller, &id).await?;
    if let Some(e) = &info.e2b {
        extend(&st, e, ms).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Moves a set end of life to at least now + `ms` (none stays none).
async fn extend(st: &AppState, e: &E2bRow, ms: i64) -> Result<Option<i64>, E2bError> {
    let Some(end) = e.end_at else {
        return Ok(None);
    };
    let want = crate::store::now_ms().saturating_add(ms).max(end);
    if want != end {
        let sid = e.sandbox_id.clone();
        st.store
            .run(move |c| store_e2b::set_end_at(c, &sid, Some(want)))
            .await?;
    }
    Ok(Some(want))
}

/// `POST /sandboxes/{id}/pause`: stopped (snapshot on disk, memory freed);
/// its end of life is cleared. 204; 409 when paused already.
async fn pause(
    State(st): State<AppStateRef>,
    ApiKeyCaller(caller): ApiKeyCaller,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    caller.rate(&st, RequestClass::Create)?;
    let (guard, info) = locked_info(&st, &caller, &id).await?;
    if info.paused() {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {} is already paused", info.row.id),
        ));
    }
    let st2 = st.clone();
    detached(&st, async move {
        let _guard = guard;
        let mut row = info.row;
        sandboxes::stop_row(&st2, &mut row).await?;
        if info.e2b.is_some() {
            let sid = row.id.clone();
            st2.store
                .run(move |c| store_e2b::set_end_at(c, &sid, None))
                .await?;
        }
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// `POST /v2/sandboxes/{id}/connect` (and v1) `{timeout}`: a paused
/// sandbox is started (201), a running one is not touched (200); the end of
/// life is at least now + timeout. Answers `Sandbox` with its token.
async fn connect(
    State(st): State<AppStateRef>,
    ApiKeyCaller(caller): ApiKeyCaller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, E2bError> {
    let req: TimeoutBody = parse(&body)?;
    wake(st, caller, id, req, false).await
}

/// `POST /sandboxes/{id}/resume` `{timeout, autoPause}` (older SDKs): 201;
/// 409 when it is not paused.
async fn resume(
    State(st): State<AppStateRef>,
    ApiKeyCaller(caller): ApiKeyCaller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, E2bError> {
    let req: TimeoutBody = parse(&body)?;
    wake(st, caller, id, req, true).await
}

async fn wake(
    st: AppStateRef,
    caller: Caller,
    id: String,
    req: TimeoutBody,
    only_paused: bool,
) -> Result<Response, E2bError> {
    let ms = timeout_ms("timeout", req.timeout)?;
    caller.rate(&st, RequestClass::Create)?;
    let (guard, info) = locked_info(&st, &caller, &id).await?;
    if only_paused && !info.paused() {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {} is not paused", info.row.id),
        ));
    }
    let st2 = st.clone();
    detached(&st, async move {
        let _guard = guard;
        let (mut e, token, made) = ensure_row(&st2, &info).await?;
        let paused = info.paused();
        if paused {
            let mut row = info.row;
            sandboxes::start_row(&st2, &mut row, false).await?;
        }
        if let Some(ap) = req.auto_pause {
            e.auto_pause = ap;
        }
        // A sandbox the E2B API made gets a new end of life when it comes
        // back from a pause; one without (made natively) keeps none.
        e.end_at = match (e.end_at, paused && !made) {
            (_, true) => Some(crate::store::now_ms().saturating_add(ms)),
            (Some(end), false) => Some(crate::store::now_ms().saturating_add(ms).max(end)),
            (None, false) => None,
        };
        let (sid, end, ap) = (e.sandbox_id.clone(), e.end_at, e.auto_pause);
        st2.store
            .run(move |c| store_e2b::set_end(c, &sid, end, ap))
            .await?;
        let status = if paused {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok((status, Json(sandbox_json(&e, &token))).into_response())
    })
    .await
}

/// `GET /sandboxes/{id}/metrics`: one `SandboxMetric`, now. bhatti
/// measures the VMM's resident memory and the root disk's allocated
/// bytes; CPU use and page cache are reported as 0.
async fn metrics(
    State(st): State<AppStateRef>,
    ApiKeyCaller(caller): ApiKeyCaller,
    Path(id): Path<String>,
) -> Result<Json<Vec<Value>>, E2bError> {
    caller.rate(&st, RequestClass::Read)?;
    let info = info(&st, &caller, &id).await?;
    let (cpus, mem_mb, disk_mb) = info.sizes(&st);
    let sb = st.engine.get(&info.row.id).ok();
    let (rss, disk_used) = match sb {
        Some(sb) => tokio::task::spawn_blocking(move || {
            (
                sb.pid.and_then(vmm_rss).unwrap_or(0),
                allocated(&sb.paths.root_disk),
            )
        })
        .await
        .unwrap_or((0, 0)),
        None => (0, 0),
    };
    let now = crate::store::now_ms();
    Ok(Json(vec![json!({
        "timestamp": rfc3339_ms(now),
        "timestampUnix": now / 1000,
        "cpuCount": cpus,
        "cpuUsedPct": 0.0,
        "memUsed": rss,
        "memTotal": mem_mb << 20,
        "memCache": 0,
        "diskUsed": disk_used,
        "diskTotal": disk_mb << 20,
    })]))
}

/// Resident bytes of a process (`VmRSS`).
fn vmm_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb << 10)
}

/// Bytes a (sparse) file has allocated.
fn allocated(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// End of life
// ---------------------------------------------------------------------------

/// The task that ends due sandboxes (every second): destroyed, or with
/// `autoPause` stopped (its end of life cleared). The due times are in the
/// store, so a restarted daemon catches up.
pub fn spawn_reaper(st: AppStateRef) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            reap(&st).await;
        }
    })
}

async fn reap(st: &AppStateRef) {
    let now = crate::store::now_ms();
    let due = match st.store.read(move |c| store_e2b::due(c, now)).await {
        Ok(d) => d,
        Err(e) => return tracing::warn!("e2b: listing due sandboxes: {e}"),
    };
    for e in due {
        let st2 = st.clone();
        // Tracked: the daemon's shutdown waits for an end under way.
        let r = st
            .detached(async move {
                end_of_life(&st2, &e.sandbox_id).await;
                Ok(())
            })
            .await;
        if let Err(err) = r {
            tracing::warn!("e2b: the end-of-life task: {err}");
        }
    }
}

/// Ends one sandbox if it is (still) due; one whose end fails is tried
/// again [`REAP_RETRY_MS`] later.
async fn end_of_life(st: &AppState, id: &str) {
    let _guard = lock_of(id).lock_owned().await;
    if let Err(err) = end_now(st, id).await {
        tracing::warn!(id, "e2b: ending a due sandbox: {err}; trying again later");
        let sid = id.to_owned();
        let retry = crate::store::now_ms() + REAP_RETRY_MS;
        if let Err(e) = st
            .store
            .run(move |c| store_e2b::set_end_at(c, &sid, Some(retry)))
            .await
        {
            tracing::warn!(id, "e2b: recording the retry: {e}");
        }
    }
}

/// [`end_of_life`]'s work, under the sandbox's lifecycle lock.
async fn end_now(st: &AppState, id: &str) -> Result<(), ApiError> {
    let sid = id.to_owned();
    let now = crate::store::now_ms();
    let found = st
        .store
        .read(move |c| {
            // Read again: a connect or a timeout may have moved it.
            let Some(e) = store_e2b::get(c, &sid)?.filter(|e| e.end_at.is_some_and(|t| t <= now))
            else {
                return Ok(None);
            };
            let Some(row) = crate::store::sandboxes::get_by_id(c, &sid)? else {
                return Ok(None);
            };
            let Some(user) = crate::store::users::get(c, &row.owner)? else {
                return Ok(None);
            };
            Ok(Some((e, row, user)))
        })
        .await?;
    let Some((e, mut row, user)) = found else {
        return Ok(());
    };
    if e.auto_pause {
        if row.status != "stopped" {
            sandboxes::stop_row(st, &mut row).await?;
            tracing::info!(id, "e2b: timeout reached; sandbox paused");
        }
        let sid = id.to_owned();
        st.store
            .run(move |c| store_e2b::set_end_at(c, &sid, None))
            .await?;
    } else {
        sandboxes::destroy_row(st, &user, &row).await?;
        tracing::info!(id, "e2b: timeout reached; sandbox destroyed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_parse_or_are_400() {
        let b: NewSandbox = parse(br#"{"templateID":"base","timeout":5,"x":{"y":1}}"#).unwrap();
        assert_eq!(b.template_id.as_deref(), Some("base"));
        assert_eq!(b.timeout, Some(5));
        let b: TimeoutBody = parse(b"").unwrap();
        assert_eq!(b.timeout, None);
        for bad in [&b"{"[..], b"[]", b"{\"timeout\":\"x\"}", b"\"s\""] {
            let e = parse::<TimeoutBody>(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
        assert!(timeout_ms("t", Some(-1)).is_err());
        assert!(timeout_ms("t", Some(MAX_TIMEOUT_SECS + 1)).is_err());
        assert_eq!(timeout_ms("t", None).unwrap(), DEFAULT_TIMEOUT_SECS * 1000);
    }

    #[test]
    fn list_queries() {
        // What the Python SDK sends for metadata {"a b": "c&d", "k": "v"}.
        let raw = "metadata=a%252520b%3Dc%252526d%26k%3Dv&state=running,paused&limit=2";
        let q = ListQuery::parse(Some(raw), true).unwrap();
        assert_eq!(
            q.metadata,
            vec![("a b".into(), "c&d".into()), ("k".into(), "v".into())]
        );
        assert!(q.running && q.paused);
        assert_eq!(q.limit, 2);
        let q = ListQuery::parse(Some("state=paused"), true).unwrap();
        assert!(!q.running && q.paused);
        let q = ListQuery::parse(None, false).unwrap();
        assert!(q.running && !q.paused);
        assert!(ListQuery::parse(Some("state=gone"), true).is_err());
        assert!(ListQuery::parse(Some("limit=0"), true).is_err());
        assert!(ListQuery::parse(Some("nextToken=zz"), true).is_err());
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%41%"), "A%");
    }
}
