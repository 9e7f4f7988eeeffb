//! `GET /sandboxes/{id}/ws`: a PTY session over WebSocket, and
//! `GET /sandboxes/{id}/sessions`.
//!
//! The session is started or attached before the upgrade, so errors are
//! plain HTTP statuses. Then two tasks bridge the socket and the agent's
//! PTY channel: guest → client (binary output, gap/exit/detached text
//! frames) and client → guest (binary input, resize, detach); the first to
//! end stops the other. A closed socket detaches: the session runs on and
//! can be reattached from the last offset the client saw. [`open`] is
//! shared with the web shell (`webshell.rs`), whose bridge also ends when
//! its link is revoked.

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use bhatti_protocol::client::{PtyEvent, PtyStream};
use bhatti_protocol::{AttachRequest, Control, PtyEnd, PtyRequest};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;

use super::{ApiError, AppStateRef, Caller, Q};
use crate::api_types::{
    validate_cmd, SessionList, SessionView, ShellClientMessage, ShellGap, ShellServerMessage,
};
use crate::auth::RequestClass;

/// Largest WebSocket message (and frame) a client may send. Terminal input
/// and control messages are small; a larger one closes the socket (code
/// 1009) instead of being buffered whole.
const MAX_WS_MESSAGE: usize = 1 << 20;

/// How long the guest side may take to acknowledge a detach.
const DETACH_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Query of the WebSocket route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WsQuery {
    pub(super) session: Option<String>,
    pub(super) offset: Option<u64>,
    /// JSON array; default the login shell.
    pub(super) cmd: Option<String>,
    pub(super) rows: Option<u16>,
    pub(super) cols: Option<u16>,
}

/// Ends a bridge from outside (a revoked shell link) with this close frame.
pub(super) type Stop = std::pin::Pin<Box<dyn std::future::Future<Output = CloseFrame> + Send>>;

/// A TTY over WebSocket: attach to `session` (replaying from `offset`) or
/// start a new one.
#[utoipa::path(get, path = "/sandboxes/{id}/ws", tag = "shell",
    params(("id" = String, Path),
        ("session" = Option<String>, Query, description = "Attach to this session; omit to start one"),
        ("offset" = Option<u64>, Query, description = "Replay from this output offset"),
        ("cmd" = Option<String>, Query, description = "JSON array; default the login shell"),
        ("rows" = Option<u16>, Query, maximum = 65535), ("cols" = Option<u16>, Query, maximum = 65535)),
    responses((status = 101, description = "WebSocket: see docs/api.md", body = ShellServerMessage),
        (status = 400, body = crate::api_types::ApiError), (status = 404, body = crate::api_types::ApiError)))]
pub async fn ws(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
    Q(q): Q<WsQuery>,
    super::Ws(upgrade): super::Ws,
) -> Result<Response, ApiError> {
    open(st, caller, id, q, upgrade, None).await
}

/// Starts or attaches the session for `caller`, then upgrades; `stop`
/// may end the bridge early.
pub(super) async fn open(
    st: AppStateRef,
    caller: Caller,
    id: String,
    q: WsQuery,
    upgrade: WebSocketUpgrade,
    stop: Option<Stop>,
) -> Result<Response, ApiError> {
    caller.rate(&st, RequestClass::Exec)?;
    let argv = match &q.cmd {
        None => None,
        Some(c) => {
            let v: Vec<String> = serde_json::from_str(c).map_err(|e| {
                ApiError::BadRequest(format!("cmd: must be a JSON array of strings: {e}"))
            })?;
            validate_cmd(&v)?;
            Some(v)
        }
    };
    for (name, v) in [("rows", q.rows), ("cols", q.cols)] {
        if v == Some(0) {
            return Err(ApiError::BadRequest(format!("{name}: must be at least 1")));
        }
    }
    let row = st.sandbox(&caller, &id).await?;
    let client = st.agent(&row).await?;
    let pty = match q.session {
        Some(session) => {
            let pty = client
                .attach(AttachRequest {
                    session,
                    offset: q.offset,
                })
                .await?;
            if let (Some(r), Some(c)) = (q.rows, q.cols) {
                let _ = pty.resize(r, c);
            }
            pty
        }
        None => {
            client
                .pty(PtyRequest {
                    argv,
                    rows: q.rows.unwrap_or(24),
                    cols: q.cols.unwrap_or(80),
                    ..Default::default()
                })
                .await?
        }
    };
    tracing::info!(session = %pty.session, offset = pty.start_offset, "shell attached");
    Ok(upgrade
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| bridge(socket, pty, stop)))
}

fn text(m: &ShellServerMessage) -> Message {
    Message::Text(serde_json::to_string(m).unwrap_or_default().into())
}

async fn bridge(socket: WebSocket, mut pty: PtyStream, stop: Option<Stop>) {
    let (mut tx, mut rx) = socket.split();
    let first = ShellServerMessage::Session {
        id: pty.session.clone(),
        offset: pty.start_offset,
        gap: pty.gap.map(|g| ShellGap {
            from: g.from,
            to: g.to,
        }),
    };
    if tx.send(text(&first)).await.is_err() {
        return;
    }
    let sender = pty.sender.clone();
    // Why the client side ended, when the client broke a rule: the
    // guest → client side says it in its close frame.
    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<CloseFrame>();
    let mut close_rx = close_rx.fuse();
    // Guest → client.
    let mut out = tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                biased;
                Ok(frame) = &mut close_rx => {
                    let _ = tx.send(Message::Close(Some(frame))).await;
                    return;
                }
                e = pty.next() => e,
            };
            let msg = match event {
                Ok(PtyEvent::Output(b) | PtyEvent::Stderr(b)) => Message::Binary(b),
                Ok(PtyEvent::Gap(g)) => text(&ShellServerMessage::Gap {
                    from: g.from,
                    to: g.to,
                }),
                Ok(PtyEvent::End(PtyEnd::Exited { status, offset })) => {
                    let _ = tx
                        .send(text(&ShellServerMessage::Exit {
                            exit_code: status.exit_code,
                            offset,
                        }))
                        .await;
                    break;
                }
                Ok(PtyEvent::End(PtyEnd::Detached { offset })) => {
                    let _ = tx
                        .send(text(&ShellServerMessage::Detached { offset }))
                        .await;
                    break;
                }
                Err(e) => {
                    let _ = tx
                        .send(text(&ShellServerMessage::Error {
                            error: ApiError::from(e).to_string(),
                        }))
                        .await;
                    break;
                }
            };
            if tx.send(msg).await.is_err() {
                // The client is gone; the input side detaches.
                break;
            }
        }
        let _ = tx.send(Message::Close(None)).await;
    });
    // Client → guest.
    let input_sender = sender.clone();
    let mut input = tokio::spawn(async move {
        while let Some(msg) = rx.next().await {
            match msg {
                Ok(Message::Binary(b)) => {
                    if input_sender.data(b).await.is_err() {
                        break;
                    }
                }
                Ok(Message::Text(t)) => match serde_json::from_str::<ShellClientMessage>(&t) {
                    Ok(ShellClientMessage::Resize { rows, cols }) if rows > 0 && cols > 0 => {
                        let c =
                            serde_json::to_vec(&Control::Resize { rows, cols }).unwrap_or_default();
                        let _ = input_sender.control(Bytes::from(c));
                    }
                    Ok(ShellClientMessage::Resize { .. }) => {}
                    Ok(ShellClientMessage::Detach) => {
                        let _ = input_sender.cancel();
                    }
                    Err(e) => tracing::debug!("ignoring a client text frame: {e}"),
                },
                Ok(Message::Close(_)) => break,
                Err(e) => return refusal(e),
                Ok(_) => {}
            }
        }
        None
    });
    let stop = async move {
        match stop {
            Some(s) => s.await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    tokio::select! {
        _ = &mut out => input.abort(),
        frame = &mut stop => {
            tracing::info!("closing a shell socket: {}", frame.reason);
            input.abort();
            let _ = close_tx.send(frame);
            // Detach: the session runs on for its owner.
            let _ = sender.cancel();
            if tokio::time::timeout(DETACH_GRACE, &mut out).await.is_err() {
                out.abort();
            }
        }
        why = &mut input => {
            if let Ok(Some(frame)) = why {
                tracing::info!("closing a shell socket: {}", frame.reason);
                let _ = close_tx.send(frame);
            }
            // The socket closed: detach, and let the guest side finish.
            let _ = sender.cancel();
            if tokio::time::timeout(DETACH_GRACE, &mut out).await.is_err() {
                out.abort();
            }
        }
    }
    tracing::debug!("shell bridge ended");
}

/// The close frame for a client whose message broke a limit or the
/// protocol; `None` when the connection just ended.
pub(super) fn refusal(e: axum::Error) -> Option<CloseFrame> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
    let e = e.into_inner();
    let (code, reason) = match e.downcast_ref::<WsError>()? {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => (
            close_code::SIZE,
            format!("a message of {size} bytes is over the limit of {max_size}"),
        ),
        WsError::Capacity(c) => (close_code::SIZE, c.to_string()),
        WsError::Protocol(p) => (close_code::PROTOCOL, p.to_string()),
        _ => return None,
    };
    // A close reason is at most 123 bytes.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Some(CloseFrame {
        code,
        reason: reason[..end].into(),
    })
}

/// The sandbox's PTY sessions (wakes it).
#[utoipa::path(get, path = "/sandboxes/{id}/sessions", tag = "shell",
    params(("id" = String, Path)),
    responses((status = 200, body = SessionList), (status = 404, body = crate::api_types::ApiError)))]
pub async fn sessions(
    State(st): State<AppStateRef>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SessionList>, ApiError> {
    caller.rate(&st, RequestClass::Read)?;
    let row = st.sandbox(&caller, &id).await?;
    let client = st.agent(&row).await?;
    let list = client.sessions().await?;
    Ok(Json(SessionList {
        sessions: list.iter().map(SessionView::from).collect(),
    }))
}
