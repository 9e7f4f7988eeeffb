//! `GET|PUT|HEAD /sandboxes/{id}/files?path=…`: raw bytes in and out,
//! `ls=true` for a JSON listing. Every read streams, whatever its window:
//! the agent selects the lines and announces the length and `X-Truncated`
//! before the first byte, and the channel's flow control paces it to the
//! client. Uploads stream into the guest's atomic write; only small ones
//! are collected first.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bhatti_protocol::{AgentClient, ReadFileRequest, WriteFileDone, WriteFileRequest};
use futures_util::StreamExt;
use serde::Deserialize;

use super::{ApiError, AppStateRef, Caller, MAX_UPLOAD, Q};
use crate::api_types::{validate_guest_path, FileEntry, FileList, FileQuery, WriteResult};
use crate::auth::RequestClass;

const X_FILE_SIZE: HeaderName = HeaderName::from_static("x-file-size");
const X_TRUNCATED: HeaderName = HeaderName::from_static("x-truncated");
const X_FILE_KIND: HeaderName = HeaderName::from_static("x-file-kind");
const X_FILE_MODE: HeaderName = HeaderName::from_static("x-file-mode");

/// Most bytes of a bounded read buffered for an agent that does not
/// announce a read's length.
const OLD_AGENT_READ_MAX: usize = 16 << 20;

fn num(v: u64) -> HeaderValue {
    HeaderValue::from(v)
}

/// Reads a file (raw bytes), or lists a directory with `ls=true`.
#[utoipa::path(get, path = "/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path),
        ("path" = crate::api_types::schema::GuestPath, Query, description = "Absolute guest path"),
        ("offset" = Option<u64>, Query, description = "First line (0-based)"),
        ("limit" = Option<u64>, Query, description = "Most lines"),
        ("max_bytes" = Option<u64>, Query, description = "Most bytes"),
        ("ls" = Option<bool>, Query, description = "List a directory as JSON")),
    responses(
        (status = 200, description = "The bytes, streamed (headers Content-Length, X-File-Size, X-Truncated), or a FileList with ls=true",
            content(("application/octet-stream"), (FileList = "application/json"))),
        (status = 400, body = crate::api_types::ApiError), (status = 403, body = crate::api_types::ApiError),
        (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "A directory read as a file, or a file listed")))]
pub async fn get(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
    Q(q): Q<FileQuery>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    q.validate()?;
    let row = st.sandbox(&caller, &id).await?;
    let client = st.agent(&row).await?;
    if q.ls {
        let listing = client.list(&q.path, None).await?;
        return Ok(Json(FileList {
            path: q.path,
            entries: listing.entries.iter().map(FileEntry::from).collect(),
            truncated: listing.truncated,
        })
        .into_response());
    }
    let bounded = q.offset.is_some() || q.limit.is_some() || q.max_bytes.is_some();
    let req = ReadFileRequest {
        path: q.path,
        offset: q.offset,
        limit: q.limit,
        max_bytes: q.max_bytes,
    };
    read(&client, req, bounded).await
}

/// A read's answer: its bytes streamed from the agent, with the headers of
/// `GET /sandboxes/{id}/files`.
pub(crate) async fn read(
    client: &AgentClient,
    req: ReadFileRequest,
    bounded: bool,
) -> Result<Response, ApiError> {
    let octet = (
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let mut reader = client.read_file(req).await?;
    let size = reader.size;
    let (length, truncated) = match reader.extent {
        Some(extent) => extent,
        None if !bounded => (size, false),
        None => {
            // An agent from before announced extents (a guest resumed from
            // an old checkpoint): buffer, but only so much.
            let mut buf = bytes::BytesMut::new();
            while let Some(chunk) = reader.chunk().await? {
                if buf.len() + chunk.len() > OLD_AGENT_READ_MAX {
                    return Err(ApiError::BadGateway(format!(
                        "this sandbox's agent is too old to stream a read by lines or bytes \
                         over {OLD_AGENT_READ_MAX} bytes: ask for fewer lines or set max_bytes"
                    )));
                }
                buf.extend_from_slice(&chunk);
            }
            let truncated = reader.result().is_some_and(|d| d.truncated);
            return Ok((
                [
                    octet,
                    (X_FILE_SIZE, num(size)),
                    (X_TRUNCATED, flag(truncated)),
                ],
                buf.freeze(),
            )
                .into_response());
        }
    };
    let body = futures_util::stream::unfold(Some(reader), |r| async move {
        let mut r = r?;
        match r.chunk().await {
            Ok(Some(b)) => Some((Ok::<_, std::io::Error>(b), Some(r))),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
        }
    });
    Ok((
        [
            octet,
            (header::CONTENT_LENGTH, num(length)),
            (X_FILE_SIZE, num(size)),
            (X_TRUNCATED, flag(truncated)),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

fn flag(v: bool) -> HeaderValue {
    HeaderValue::from_static(if v { "true" } else { "false" })
}

/// A file's size, kind and mode as headers; 404 if absent.
#[utoipa::path(head, path = "/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path), ("path" = crate::api_types::schema::GuestPath, Query)),
    responses((status = 200, description = "Headers X-File-Size, X-File-Kind, X-File-Mode"),
        (status = 403, description = "Not allowed"), (status = 404, description = "No such file")))]
pub async fn head(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
    Q(q): Q<FileQuery>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    q.validate()?;
    let row = st.sandbox(&caller, &id).await?;
    let client = st.agent(&row).await?;
    let stat = client.stat(&q.path).await?;
    let e = FileEntry::from(&stat);
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert(X_FILE_SIZE, num(e.size));
    if let Ok(v) = HeaderValue::from_str(&kind) {
        h.insert(X_FILE_KIND, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{:04o}", e.mode)) {
        h.insert(X_FILE_MODE, v);
    }
    Ok(resp)
}

/// Query of a PUT.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutQuery {
    path: String,
    /// Octal permission bits, e.g. `0644`.
    #[serde(default)]
    mode: Option<String>,
}

/// Writes a file atomically from the raw body (parents are created; owned
/// by the sandbox user).
/// Uploads up to this size (with a Content-Length) are read whole first.
const SMALL_UPLOAD: u64 = 1 << 20;

#[utoipa::path(put, path = "/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path), ("path" = crate::api_types::schema::GuestPath, Query),
        ("mode" = Option<String>, Query, pattern = "^[0-7]{1,4}$", description = "Octal permission bits, e.g. 0644")),
    request_body(content = Option<Vec<u8>>, content_type = "application/octet-stream",
        description = "The file's bytes (none: an empty file)"),
    responses((status = 200, body = WriteResult), (status = 400, body = crate::api_types::ApiError),
        (status = 403, body = crate::api_types::ApiError), (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "The path, or a parent, is of the wrong kind"),
        (status = 413, body = crate::api_types::ApiError)))]
pub async fn put(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
    Q(q): Q<PutQuery>,
    req: Request,
) -> Result<Json<WriteResult>, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    validate_guest_path("path", &q.path)?;
    let mode = match q.mode.as_deref() {
        None => None,
        Some(m) => Some(
            // 1 to 4 octal digits (from_str_radix alone would take "+7").
            Some(m)
                .filter(|m| {
                    (1..=4).contains(&m.len()) && m.bytes().all(|b| matches!(b, b'0'..=b'7'))
                })
                .and_then(|m| u32::from_str_radix(m, 8).ok())
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("mode: {m:?} is not 1 to 4 octal digits"))
                })?,
        ),
    };
    let too_large = || ApiError::TooLarge(format!("uploads are limited to {MAX_UPLOAD} bytes"));
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|n| n > MAX_UPLOAD) {
        return Err(too_large());
    }
    let row = st.sandbox(&caller, &id).await?;
    let client = st.agent(&row).await?;
    let req_w = WriteFileRequest {
        path: q.path,
        mode,
        ..Default::default()
    };
    let done = write(&client, req_w, length, req.into_body()).await?;
    Ok(Json(WriteResult { bytes: done.bytes }))
}

/// Writes `body` to a guest file atomically (parents are created): a small
/// body with a known `length` in one batch, else streamed; more than
/// [`MAX_UPLOAD`] bytes is 413 and leaves nothing behind.
pub(crate) async fn write(
    client: &AgentClient,
    req: WriteFileRequest,
    length: Option<u64>,
    body: Body,
) -> Result<WriteFileDone, ApiError> {
    let too_large = || ApiError::TooLarge(format!("uploads are limited to {MAX_UPLOAD} bytes"));
    if length.is_some_and(|n| n > MAX_UPLOAD) {
        return Err(too_large());
    }
    if length.is_some_and(|n| n <= SMALL_UPLOAD) {
        // A small body goes to the guest in one batch (open, data, end):
        // one wake-up of the agent instead of one per frame.
        let data = axum::body::to_bytes(body, SMALL_UPLOAD as usize)
            .await
            .map_err(|e| ApiError::BadRequest(format!("reading the upload: {e}")))?;
        return Ok(client.write_file(req, data).await?);
    }
    let mut writer = client.write_file_stream(req)?;
    let mut body = body.into_data_stream();
    let mut total: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the upload: {e}")))?;
        total += chunk.len() as u64;
        if total > MAX_UPLOAD {
            // Dropping the writer cancels: the guest discards its temp file.
            return Err(too_large());
        }
        writer.write(chunk).await?;
    }
    Ok(writer.finish().await?)
}
