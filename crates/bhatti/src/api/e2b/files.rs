//! envd's plain HTTP routes: `GET /files` (download), `POST /files`
//! (upload: `application/octet-stream`, optionally `Content-Encoding:
//! gzip`, or `multipart/form-data` with one or more `file` parts) and
//! `GET /health`. Errors are `{"code": <status>, "message"}`. Bytes stream
//! both ways through the agent's file operations (`api/files.rs`); memory
//! per request stays bounded whatever the size.

use std::io::Write as _;

use axum::body::Body;
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bhatti_protocol::{ReadFileRequest, WriteFileRequest};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::auth::EnvdCaller;
use super::error::{Code, ConnectError, E2bError};
use super::filesystem::resolve;
use crate::api::{AppStateRef, MAX_UPLOAD};
use crate::auth::RequestClass;

pub(super) fn routes() -> Router<AppStateRef> {
    Router::new()
        .route("/files", get(download).post(upload))
        .route("/health", get(health))
}

/// An envd `/files` request's sandbox, with `/files` errors.
struct FilesCaller(EnvdCaller);

impl FromRequestParts<AppStateRef> for FilesCaller {
    type Rejection = E2bError;
    async fn from_request_parts(parts: &mut Parts, st: &AppStateRef) -> Result<Self, E2bError> {
        EnvdCaller::from_request_parts(parts, st)
            .await
            .map(FilesCaller)
            .map_err(|e| match e.code {
                // What E2B's proxy answers for a sandbox that is gone.
                Code::NotFound | Code::Unavailable => {
                    E2bError::new(StatusCode::BAD_GATEWAY, e.message)
                }
                _ => e.into(),
            })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
}

fn bad_path(e: ConnectError) -> E2bError {
    E2bError::bad_request(e.message)
}

fn path_error(path: &str, e: crate::api::ApiError) -> E2bError {
    // A guest out of space (ENOSPC, EDQUOT) is envd's 507.
    let e = match e {
        crate::api::ApiError::BadGateway(m)
            if m.contains("os error 28") || m.contains("os error 122") =>
        {
            crate::api::ApiError::InsufficientStorage(format!(
                "not enough space in the sandbox to write {path}: {m}"
            ))
        }
        // envd answers a path of the wrong kind, or one it may not touch,
        // 400 (the native API: 409 and 403).
        crate::api::ApiError::Conflict(m) | crate::api::ApiError::Forbidden(m) => {
            crate::api::ApiError::BadRequest(m)
        }
        e => e,
    };
    let mut e = E2bError::from(e);
    if e.status == StatusCode::NOT_FOUND {
        e.message = format!("path {path:?} not found: {}", e.message);
    }
    e
}

async fn agent(
    st: &AppStateRef,
    env: &EnvdCaller,
    class: RequestClass,
) -> Result<bhatti_protocol::AgentClient, E2bError> {
    env.caller.rate(st, class)?;
    Ok(st.agent(&env.sandbox).await?)
}

/// `GET /files?path=&username=`: the file's bytes, streamed; gzipped as
/// they stream when the client accepts gzip.
async fn download(
    State(st): State<AppStateRef>,
    FilesCaller(env): FilesCaller,
    Query(q): Query<FilesQuery>,
    headers: HeaderMap,
) -> Result<Response, E2bError> {
    let path = q
        .path
        .as_deref()
        .ok_or_else(|| E2bError::bad_request("the path query parameter is required"))?;
    let path = resolve(path, q.username.as_deref()).map_err(bad_path)?;
    let client = agent(&st, &env, RequestClass::Read).await?;
    let req = ReadFileRequest {
        path: path.clone(),
        ..Default::default()
    };
    let mut resp = crate::api::files::read(&client, req, false)
        .await
        .map_err(|e| path_error(&path, e))?;
    // The native API's extra headers are not envd's.
    for h in ["x-file-size", "x-truncated"] {
        resp.headers_mut().remove(h);
    }
    let name = path.rsplit('/').next().unwrap_or("file").replace('"', "");
    if let Ok(v) = format!("inline; filename=\"{name}\"").parse() {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    if accepts_gzip(&headers) {
        let (mut parts, body) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.insert(
            header::CONTENT_ENCODING,
            header::HeaderValue::from_static("gzip"),
        );
        return Ok(Response::from_parts(parts, gzip_body(body)));
    }
    Ok(resp)
}

fn accepts_gzip(h: &HeaderMap) -> bool {
    h.get_all(header::ACCEPT_ENCODING).iter().any(|v| {
        v.to_str().unwrap_or("").split(',').any(|c| {
            let mut it = c.split(';');
            let name = it.next().unwrap_or("").trim();
            let refused = it.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            name.eq_ignore_ascii_case("gzip") && !refused
        })
    })
}

/// A body gzipped as it streams (each input chunk compressed and flushed
/// on its own: memory stays at a chunk).
fn gzip_body(body: Body) -> Body {
    type Enc = flate2::write::GzEncoder<Vec<u8>>;
    let enc = Some(Enc::new(Vec::new(), flate2::Compression::fast()));
    let s = futures_util::stream::unfold(
        (body.into_data_stream(), enc),
        |(mut body, mut enc)| async move {
            loop {
                let e = enc.as_mut()?;
                match body.next().await {
                    Some(Ok(b)) => {
                        if let Err(err) = e.write_all(&b) {
                            return Some((Err(err), (body, None)));
                        }
                        let out = std::mem::take(e.get_mut());
                        if !out.is_empty() {
                            return Some((Ok(Bytes::from(out)), (body, enc)));
                        }
                    }
                    Some(Err(err)) => {
                        return Some((Err(std::io::Error::other(err.to_string())), (body, None)))
                    }
                    None => {
                        let e = enc.take()?;
                        return Some((e.finish().map(Bytes::from), (body, None)));
                    }
                }
            }
        },
    );
    Body::from_stream(s)
}

/// `envd`'s `EntryInfo` of an upload.
#[derive(Debug, Serialize)]
struct WriteInfo {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
}

fn write_info(path: &str) -> WriteInfo {
    WriteInfo {
        name: path.rsplit('/').next().unwrap_or("").to_owned(),
        kind: "file",
        path: path.to_owned(),
    }
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// `POST /files?path=&username=`: writes one file from an octet-stream
/// body, or each `file` part of a multipart body (at `path` when there is
/// one part and a path, else at the part's file name); parents are made.
async fn upload(
    State(st): State<AppStateRef>,
    FilesCaller(env): FilesCaller,
    Query(q): Query<FilesQuery>,
    req: Request,
) -> Result<Json<Vec<WriteInfo>>, E2bError> {
    let headers = req.headers().clone();
    let ct = header_str(&headers, header::CONTENT_TYPE);
    let encoding = header_str(&headers, header::CONTENT_ENCODING).to_ascii_lowercase();
    let user = q.username.as_deref();
    let query_path = match q.path.as_deref() {
        Some(p) if !p.is_empty() => Some(resolve(p, user).map_err(bad_path)?),
        _ => None,
    };
    let gzip = match encoding.as_str() {
        "" | "identity" => false,
        "gzip" | "x-gzip" => true,
        other => {
            return Err(E2bError::bad_request(format!(
                "Content-Encoding {other:?} is not supported (gzip is)"
            )))
        }
    };
    let length = (!gzip)
        .then(|| {
            header_str(&headers, header::CONTENT_LENGTH)
                .parse::<u64>()
                .ok()
        })
        .flatten();
    let body = if gzip {
        gunzip(req.into_body())
    } else {
        req.into_body()
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime == "multipart/form-data" {
        let boundary = multer::parse_boundary(&ct).map_err(|e| {
            E2bError::bad_request(format!(
                "multipart/form-data without a usable boundary: {e}"
            ))
        })?;
        let client = agent(&st, &env, RequestClass::Exec).await?;
        let mut parts = multer::Multipart::new(body.into_data_stream(), boundary);
        let bad = |e: multer::Error| E2bError::bad_request(format!("the multipart body: {e}"));
        let mut written = Vec::new();
        while let Some(mut part) = parts.next_field().await.map_err(bad)? {
            // Other fields are read past (dropping one skips its bytes).
            if part.name() != Some("file") {
                continue;
            }
            // The query's path names the file of a one-file upload (the
            // SDK sends it only then); otherwise the part's file name does.
            let path = match (&query_path, written.is_empty(), part.file_name()) {
                (Some(p), true, _) => p.clone(),
                (_, _, Some(f)) if !f.is_empty() => resolve(f, user).map_err(bad_path)?,
                _ => {
                    return Err(E2bError::bad_request(
                        "a file part has no file name and the query no path",
                    ))
                }
            };
            let mut w = client
                .write_file_stream(WriteFileRequest {
                    path: path.clone(),
                    ..Default::default()
                })
                .map_err(|e| E2bError::from(crate::api::ApiError::from(e)))?;
            let mut total = 0u64;
            while let Some(chunk) = part.chunk().await.map_err(bad)? {
                total += chunk.len() as u64;
                if total > MAX_UPLOAD {
                    // Dropping the writer cancels: the guest keeps nothing.
                    return Err(too_large());
                }
                w.write(chunk)
                    .await
                    .map_err(|e| path_error(&path, e.into()))?;
            }
            w.finish().await.map_err(|e| path_error(&path, e.into()))?;
            written.push(write_info(&path));
        }
        if written.is_empty() {
            return Err(E2bError::bad_request("the multipart body has no file part"));
        }
        return Ok(Json(written));
    }
    // Anything else is the file's bytes (the SDK says application/octet-stream).
    let path =
        query_path.ok_or_else(|| E2bError::bad_request("the path query parameter is required"))?;
    let client = agent(&st, &env, RequestClass::Exec).await?;
    let req = WriteFileRequest {
        path: path.clone(),
        ..Default::default()
    };
    crate::api::files::write(&client, req, length, body)
        .await
        .map_err(|e| path_error(&path, e))?;
    Ok(Json(vec![write_info(&path)]))
}

fn too_large() -> E2bError {
    E2bError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("uploads are limited to {MAX_UPLOAD} bytes"),
    )
}

/// Compressed bytes fed to the decoder at a time: what one step can
/// inflate to stays around a thousand times this.
const GUNZIP_STEP: usize = 1024;

/// A gzip request body, inflated as it streams.
fn gunzip(body: Body) -> Body {
    struct St {
        body: axum::body::BodyDataStream,
        dec: flate2::write::GzDecoder<Vec<u8>>,
        pending: Bytes,
        done: bool,
    }
    let st = St {
        body: body.into_data_stream(),
        dec: flate2::write::GzDecoder::new(Vec::new()),
        pending: Bytes::new(),
        done: false,
    };
    let bad = |e: std::io::Error| std::io::Error::other(format!("inflating the gzip body: {e}"));
    let s = futures_util::stream::unfold(st, move |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            if !s.pending.is_empty() {
                let n = s.pending.len().min(GUNZIP_STEP);
                let input = s.pending.split_to(n);
                if let Err(e) = s.dec.write_all(&input) {
                    s.done = true;
                    return Some((Err(bad(e)), s));
                }
            } else {
                match s.body.next().await {
                    Some(Ok(b)) => {
                        s.pending = b;
                        continue;
                    }
                    Some(Err(e)) => {
                        s.done = true;
                        return Some((Err(std::io::Error::other(e.to_string())), s));
                    }
                    None => {
                        s.done = true;
                        if let Err(e) = s.dec.try_finish() {
                            return Some((Err(bad(e)), s));
                        }
                    }
                }
            }
            let out = std::mem::take(s.dec.get_mut());
            if !out.is_empty() {
                return Some((Ok(Bytes::from(out)), s));
            }
        }
    });
    Body::from_stream(s)
}

/// `GET /health`: 204. With an `E2b-Sandbox-Id` of a sandbox that is gone,
/// 502 "… was not found", as E2B's proxy answers (the SDKs' probe reads it).
async fn health(State(st): State<AppStateRef>, headers: HeaderMap) -> Response {
    let id = headers
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    if let Some(id) = id {
        let sid = id.clone();
        let found = st
            .store
            .read(move |c| {
                Ok(crate::store::e2b::get(c, &sid)?.is_some()
                    && crate::store::sandboxes::get_by_id(c, &sid)?.is_some())
            })
            .await;
        match found {
            Ok(true) => {}
            Ok(false) => {
                return E2bError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("The sandbox {id} was not found"),
                )
                .into_response()
            }
            Err(e) => return E2bError::from(e).into_response(),
        }
    }
    StatusCode::NO_CONTENT.into_response()
}
