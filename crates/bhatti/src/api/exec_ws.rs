//! `GET /sandboxes/{id}/exec/ws`: a piped command as a session over
//! WebSocket, and `DELETE /sandboxes/{id}/sessions/{sid}`.
//!
//! The protocol (JSON text messages; see docs/api.md):
//! - client first: `{"cmd": [...], "env": {}, "cwd": "/"}` starts a
//!   command, `{"attach": "<session>", "offset": N}` reattaches;
//! - server: `started` (the session and the offset output resumes at),
//!   then `stdout`/`stderr` with `offset` and `end` (bytes `[offset, end)`
//!   of the output, stdout and stderr counted together), `gap` if this
//!   client fell behind the scrollback, and finally `exit`, `detached` or
//!   `error`;
//! - client after the first: `stdin` (or binary messages), `eof`,
//!   `signal`, `detach`. Closing the socket detaches: the command runs on
//!   and can be reattached from the last `end` the client saw, so nothing
//!   is lost or repeated.
//!
//! Memory per connection is bounded: one chunk (at most 64 KiB) is in
//! flight to the client at a time; the guest agent keeps the output in the
//! session's scrollback whether or not anyone reads it.

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use bhatti_protocol::client::{PtyEvent, PtyStream};
use bhatti_protocol::{AttachRequest, Control, PtyEnd, PtyRequest};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;

use super::{ApiError, AppStateRef, Caller, Q};
use crate::api_types::{base64, ExecWsClientMessage, ExecWsServerMessage, ExecWsStart, ShellGap};
use crate::auth::RequestClass;
use crate::store::sandboxes::SandboxRow;

/// Largest WebSocket message a client may send (stdin chunks, controls).
const MAX_WS_MESSAGE: usize = 1 << 20;
/// How long the server waits for the first message.
const FIRST_MESSAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long the guest side may take to acknowledge a detach.
const DETACH_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

type Tx = SplitSink<WebSocket, Message>;
type Rx = SplitStream<WebSocket>;

/// A piped command over WebSocket: start one, or reattach to one from an
/// output offset. The first client message says which (see docs/api.md).
#[utoipa::path(get, path = "/sandboxes/{id}/exec/ws", tag = "exec",
    params(("id" = String, Path)),
    responses((status = 101, description = "WebSocket; the first client message is an ExecWsStart: see docs/api.md", body = ExecWsServerMessage),
        (status = 404, body = crate::api_types::ApiError)))]
pub async fn exec_ws(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
    super::Ws(upgrade): super::Ws,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    let row = st.sandbox(&caller, &id).await?;
    Ok(upgrade
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| run(st, row, socket)))
}

fn text(m: &ExecWsServerMessage) -> Message {
    Message::Text(serde_json::to_string(m).unwrap_or_default().into())
}

/// Says why, and closes.
async fn fail(tx: &mut Tx, code: u16, error: String) {
    let _ = tx.send(text(&ExecWsServerMessage::Error { error })).await;
    let _ = tx
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: "".into(),
        })))
        .await;
}

async fn run(st: AppStateRef, row: SandboxRow, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let first = match tokio::time::timeout(FIRST_MESSAGE_WAIT, rx.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) => return,
        Ok(Some(Ok(_))) => {
            let e = "the first message must be a JSON text message: {\"cmd\": [...]} or {\"attach\": \"<session>\"}";
            return fail(&mut tx, close_code::POLICY, e.into()).await;
        }
        Err(_) => {
            let e = format!("no first message within {FIRST_MESSAGE_WAIT:?}");
            return fail(&mut tx, close_code::POLICY, e).await;
        }
    };
    let start = match serde_json::from_str::<ExecWsStart>(&first)
        .map_err(|e| format!("bad first message: {e}"))
        .and_then(|s| s.validate().map(|()| s).map_err(|e| e.message))
    {
        Ok(s) => s,
        Err(e) => return fail(&mut tx, close_code::POLICY, e).await,
    };
    let stream = match open(&st, &row, start).await {
        Ok(s) => s,
        Err(e) => {
            let code = if e.status() == StatusCode::BAD_GATEWAY || e.status().is_server_error() {
                close_code::ERROR
            } else {
                close_code::POLICY
            };
            return fail(&mut tx, code, e.to_string()).await;
        }
    };
    tracing::info!(session = %stream.session, offset = stream.start_offset, "exec session attached");
    bridge(tx, rx, stream).await
}

async fn open(
    st: &AppStateRef,
    row: &SandboxRow,
    start: ExecWsStart,
) -> Result<PtyStream, ApiError> {
    let client = st.agent(row).await?;
    let stream = match (start.cmd, start.attach) {
        (_, Some(session)) => {
            client
                .attach(AttachRequest {
                    session,
                    offset: start.offset,
                })
                .await?
        }
        (cmd, None) => {
            client
                .pty(PtyRequest {
                    argv: cmd,
                    env: start.env,
                    cwd: start.cwd,
                    piped: true,
                    ..Default::default()
                })
                .await?
        }
    };
    Ok(stream)
}

fn output(stderr: bool, offset: u64, b: &[u8]) -> ExecWsServerMessage {
    let end = offset + b.len() as u64;
    let (data, data_b64) = match std::str::from_utf8(b) {
        Ok(s) => (Some(s.to_owned()), None),
        Err(_) => (None, Some(base64(b))),
    };
    if stderr {
        ExecWsServerMessage::Stderr {
            offset,
            end,
            data,
            data_b64,
        }
    } else {
        ExecWsServerMessage::Stdout {
            offset,
            end,
            data,
            data_b64,
        }
    }
}

async fn bridge(mut tx: Tx, mut rx: Rx, mut stream: PtyStream) {
    let first = ExecWsServerMessage::Started {
        session: stream.session.clone(),
        pid: stream.pid,
        offset: stream.start_offset,
        gap: stream.gap.map(|g| ShellGap {
            from: g.from,
            to: g.to,
        }),
    };
    if tx.send(text(&first)).await.is_err() {
        let _ = stream.sender.cancel();
        return;
    }
    let sender = stream.sender.clone();
    let (close_tx, mut close_rx) = tokio::sync::oneshot::channel::<CloseFrame>();
    // Guest → client: one message in flight at a time.
    let mut out = tokio::spawn(async move {
        loop {
            let at = stream.offset;
            let event = tokio::select! {
                biased;
                Ok(frame) = &mut close_rx => {
                    let _ = tx.send(Message::Close(Some(frame))).await;
                    return;
                }
                e = stream.next() => e,
            };
            let (msg, last) = match event {
                Ok(PtyEvent::Output(b)) => (output(false, at, &b), false),
                Ok(PtyEvent::Stderr(b)) => (output(true, at, &b), false),
                Ok(PtyEvent::Gap(g)) => (
                    ExecWsServerMessage::Gap {
                        from: g.from,
                        to: g.to,
                    },
                    false,
                ),
                Ok(PtyEvent::End(PtyEnd::Exited { status, offset })) => (
                    ExecWsServerMessage::Exit {
                        exit_code: status.exit_code,
                        signal: status.signal,
                        offset,
                    },
                    true,
                ),
                Ok(PtyEvent::End(PtyEnd::Detached { offset })) => {
                    (ExecWsServerMessage::Detached { offset }, true)
                }
                Err(e) => (
                    ExecWsServerMessage::Error {
                        error: ApiError::from(e).to_string(),
                    },
                    true,
                ),
            };
            if tx.send(text(&msg)).await.is_err() || last {
                break;
            }
        }
        let _ = tx.send(Message::Close(None)).await;
    });
    // Client → guest.
    let input_sender = sender.clone();
    let mut input = tokio::spawn(async move {
        while let Some(msg) = rx.next().await {
            let stdin = match msg {
                Ok(Message::Binary(b)) => b,
                Ok(Message::Text(t)) => match serde_json::from_str::<ExecWsClientMessage>(&t) {
                    Ok(ExecWsClientMessage::Stdin { data }) => Bytes::from(data),
                    Ok(ExecWsClientMessage::Eof) => {
                        let _ = input_sender.eof();
                        continue;
                    }
                    Ok(ExecWsClientMessage::Signal { signal }) => {
                        let c = serde_json::to_vec(&Control::Signal { signal }).unwrap_or_default();
                        let _ = input_sender.control(Bytes::from(c));
                        continue;
                    }
                    Ok(ExecWsClientMessage::Detach) => {
                        let _ = input_sender.cancel();
                        continue;
                    }
                    Err(e) => {
                        return Some(CloseFrame {
                            code: close_code::POLICY,
                            reason: truncate(format!("bad message: {e}")).into(),
                        })
                    }
                },
                Ok(Message::Close(_)) => break,
                Err(e) => return super::shell::refusal(e),
                Ok(_) => continue,
            };
            if !stdin.is_empty() && input_sender.data(stdin).await.is_err() {
                break;
            }
        }
        None
    });
    tokio::select! {
        _ = &mut out => input.abort(),
        why = &mut input => {
            if let Ok(Some(frame)) = why {
                tracing::info!("closing an exec socket: {}", frame.reason);
                let _ = close_tx.send(frame);
            }
            // The socket closed: detach, and let the guest side finish.
            let _ = sender.cancel();
            if tokio::time::timeout(DETACH_GRACE, &mut out).await.is_err() {
                out.abort();
            }
        }
    }
    tracing::debug!("exec bridge ended");
}

/// A close reason is at most 123 bytes.
fn truncate(mut s: String) -> String {
    let mut end = s.len().min(123);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

/// Query of `DELETE /sandboxes/{id}/sessions/{sid}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillQuery {
    /// Signal number; default SIGKILL.
    signal: Option<i32>,
}

/// Kills a session (a shell or a piped command): signals its process
/// group, SIGKILL unless `signal` says otherwise. Its attached clients then
/// get its exit. Killing a session that already ended is a no-op.
#[utoipa::path(delete, path = "/sandboxes/{id}/sessions/{sid}", tag = "shell",
    params(("id" = String, Path), ("sid" = String, Path),
        ("signal" = Option<i32>, Query, description = "Signal number (default 9, SIGKILL)")),
    responses((status = 204, description = "Signalled"),
        (status = 400, body = crate::api_types::ApiError), (status = 404, body = crate::api_types::ApiError)))]
pub async fn kill_session(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path((id, sid)): Path<(String, String)>,
    Q(q): Q<KillQuery>,
) -> Result<StatusCode, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    if let Some(s) = q.signal {
        if !(1..=64).contains(&s) {
            return Err(ApiError::BadRequest(format!(
                "signal: {s} is not a signal number (1-64)"
            )));
        }
    }
    let row = st.sandbox(&caller, &id).await?;
    let client = st.agent(&row).await?;
    client.kill_session(&sid, q.signal).await?;
    Ok(StatusCode::NO_CONTENT)
}
