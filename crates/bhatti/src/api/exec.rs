//! `POST /sandboxes/{id}/exec`: buffered JSON, detached, or an NDJSON
//! stream (`Accept: application/x-ndjson`) whose lines go out as output
//! happens. Dropping the stream (a client that went away) cancels the agent
//! channel, which kills the command's process group.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bhatti_protocol::client::{ExecEvent as AgentEvent, ExecStream};
use bytes::Bytes;

use super::{ApiError, AppStateRef, Caller, JsonBody, MAX_EXEC_JSON};
use crate::api_types::{ExecDetached, ExecEvent, ExecRequest, ExecResult, Utf8Chunker};
use crate::auth::RequestClass;

pub const NDJSON: &str = "application/x-ndjson";

/// Runs a command in the sandbox (waking it first).
#[utoipa::path(post, path = "/sandboxes/{id}/exec", tag = "exec",
    params(("id" = String, Path)),
    request_body = ExecRequest,
    responses(
        (status = 200, body = ExecResult, description = "Buffered result; with `Accept: application/x-ndjson` a stream of ExecEvent lines; with `detach` an ExecDetached"),
        (status = 400, body = crate::api_types::ApiError), (status = 404, body = crate::api_types::ApiError),
        (status = 413, body = crate::api_types::ApiError), (status = 429, body = crate::api_types::ApiError),
        (status = 502, body = crate::api_types::ApiError)))]
pub async fn exec(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<ExecRequest, MAX_EXEC_JSON>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    req.validate()?;
    let row = st.sandbox(&caller, &id).await?;
    let client = st.agent(&row).await?;
    let stdin = req.stdin.map(Bytes::from);
    let preq = bhatti_protocol::ExecRequest {
        argv: req.cmd,
        env: req.env,
        cwd: req.cwd,
        stdin: stdin.is_some(),
        timeout_ms: req.timeout_sec.map(|s| s.saturating_mul(1000)),
        detach: false,
        output_file: None,
        // Neither reply shape shows the pid: skip the event.
        no_started_event: true,
    };
    if req.detach {
        if stdin.is_some() {
            return Err(ApiError::BadRequest(
                "stdin: a detached command cannot take stdin".into(),
            ));
        }
        let d = client.exec_detached(preq).await?;
        return Ok(Json(ExecDetached { pid: d.pid }).into_response());
    }
    let streaming = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with(NDJSON)));
    if !streaming {
        let out = client.exec(preq, stdin).await?;
        return Ok(Json(ExecResult {
            exit_code: out.status.exit_code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            timed_out: out.status.timed_out,
        })
        .into_response());
    }
    let stream = client.exec_stream(preq).await?;
    if let Some(input) = stdin {
        let sender = stream.sender.clone();
        tokio::spawn(async move {
            if sender.data(input).await.is_ok() {
                let _ = sender.eof();
            }
        });
    }
    let lines = Lines {
        stream,
        out: Utf8Chunker::default(),
        err: Utf8Chunker::default(),
        done: false,
    };
    let body = futures_util::stream::unfold(lines, |mut l| async move {
        let chunk = l.next().await?;
        Some((Ok::<_, Infallible>(chunk), l))
    });
    Ok((
        [
            (header::CONTENT_TYPE, NDJSON),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// The NDJSON side of a running exec. Dropped before the end (the client
/// went away): the command is cancelled.
struct Lines {
    stream: ExecStream,
    out: Utf8Chunker,
    err: Utf8Chunker,
    done: bool,
}

impl Lines {
    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        loop {
            let line = match self.stream.next().await {
                Ok(AgentEvent::Started { .. }) => continue,
                Ok(AgentEvent::Stdout(b)) => {
                    let data = self.out.push(&b);
                    if data.is_empty() {
                        continue;
                    }
                    ExecEvent::Stdout { data }.to_line()
                }
                Ok(AgentEvent::Stderr(b)) => {
                    let data = self.err.push(&b);
                    if data.is_empty() {
                        continue;
                    }
                    ExecEvent::Stderr { data }.to_line()
                }
                Ok(AgentEvent::Exit(status)) => {
                    self.done = true;
                    let mut s = String::new();
                    let rest = self.out.finish();
                    if !rest.is_empty() {
                        s.push_str(&ExecEvent::Stdout { data: rest }.to_line());
                    }
                    let rest = self.err.finish();
                    if !rest.is_empty() {
                        s.push_str(&ExecEvent::Stderr { data: rest }.to_line());
                    }
                    s.push_str(
                        &ExecEvent::Exit {
                            exit_code: status.exit_code,
                        }
                        .to_line(),
                    );
                    s
                }
                Err(e) => {
                    self.done = true;
                    tracing::warn!("exec stream: {e}");
                    ExecEvent::Error {
                        error: ApiError::from(e).to_string(),
                    }
                    .to_line()
                }
            };
            return Some(Bytes::from(line));
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if !self.done {
            tracing::info!("exec stream dropped before the end: cancelling the command");
            let _ = self.stream.cancel();
        }
    }
}
