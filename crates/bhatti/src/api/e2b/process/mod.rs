//! envd's `process.Process` service (Connect RPC, JSON codec):
//! `POST /process.Process/<Method>`.
//!
//! A process is a guest agent session ([`table`]): `Start` starts one
//! (piped, or on a PTY when `pty` is set) and streams its start, output
//! and end; the process outlives the stream (a background command), and
//! `Connect` streams its output from then on. `List`, `SendInput`,
//! `StreamInput`, `CloseStdin`, `SendSignal` and `Update` (a PTY resize)
//! name it by guest pid or tag. Commands run as bhatti's exec user with
//! the sandbox's environment (the `user` of envd's Basic authorization
//! header is not honoured); `Connect-Timeout-Ms` on `Start` bounds the
//! process's life as envd does (the SDK's command `timeout`).

mod table;
mod wire;

use std::collections::HashSet;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bhatti_protocol::{Control, PtyRequest};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use self::table::{Ev, NewProc, Subscription};
use self::wire::*;
use super::auth::EnvdCaller;
use super::connect::{
    self, error_stream, server_stream, unary, EnvelopeDecoder, StreamRequest, Unary, END_STREAM,
};
use super::error::{Code, ConnectError};
use crate::api::{ApiError, AppStateRef};
use crate::auth::RequestClass;

pub(super) fn routes() -> Router<AppStateRef> {
    Router::new()
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect_process))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/StreamInput", post(stream_input))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/Update", post(update))
}

type Caller = Result<EnvdCaller, ConnectError>;

/// The caller, within its rate limit; the sandbox awake (a request to the
/// guest counts as activity).
async fn admit(
    st: &AppStateRef,
    caller: Caller,
) -> Result<(EnvdCaller, bhatti_protocol::client::AgentClient), ConnectError> {
    let c = caller?;
    c.caller.rate(st, RequestClass::Exec)?;
    let client = st.agent(&c.sandbox).await?;
    Ok((c, client))
}

fn agent_error(e: bhatti_protocol::client::ClientError) -> ConnectError {
    ConnectError::from(ApiError::from(e))
}

async fn start(
    State(st): State<AppStateRef>,
    caller: Caller,
    headers: HeaderMap,
    req: Result<StreamRequest<StartRequest>, Response>,
) -> Response {
    let req = match req {
        Ok(StreamRequest(r)) => r,
        Err(resp) => return resp,
    };
    match start_process(&st, caller, req, connect::timeout(&headers)).await {
        Ok((pid, rx, listener)) => server_stream(events(
            start_event(pid),
            ReceiverStream::Primary {
                rx,
                _listener: listener,
            },
            connect::keepalive_interval(&headers),
        )),
        Err(e) => error_stream(e),
    }
}

async fn start_process(
    st: &AppStateRef,
    caller: Caller,
    req: StartRequest,
    timeout: Option<Duration>,
) -> Result<(u32, mpsc::Receiver<Ev>, table::Listener), ConnectError> {
    let config = req
        .process
        .ok_or_else(|| ConnectError::invalid("process: required"))?;
    let mut argv = Vec::with_capacity(1 + config.args.len());
    argv.push(config.cmd.clone());
    argv.extend(config.args.iter().cloned());
    crate::api_types::validate_cmd(&argv).map_err(|e| ConnectError::invalid(e.to_string()))?;
    crate::api_types::validate_env("process.envs", &config.envs)
        .map_err(|e| ConnectError::invalid(e.to_string()))?;
    if let Some(cwd) = &config.cwd {
        if cwd.contains('\0') {
            return Err(ConnectError::invalid("process.cwd: contains NUL"));
        }
    }
    let size = req.pty.as_ref().map(Pty::rows_cols).transpose()?;
    let (c, client) = admit(st, caller).await?;
    table::sweep(st).await;
    if table::check_room(&table::scope(st, &c.sandbox.id)).is_err() {
        // Entries whose end went unseen make room first.
        let sessions = client.sessions().await.map_err(agent_error)?;
        table::prune(&table::scope(st, &c.sandbox.id), &sessions);
        table::check_room(&table::scope(st, &c.sandbox.id))?;
    }
    let (rows, cols) = size.unwrap_or((24, 80));
    let req_pty = PtyRequest {
        argv: Some(argv),
        env: config.envs.clone(),
        cwd: config.cwd.clone().filter(|c| !c.is_empty()),
        rows,
        cols,
        piped: size.is_none(),
        // A command's own stream loses none of its output.
        hold: size.is_none(),
    };
    let stream = match client.pty(req_pty.clone()).await {
        // An agent older than `hold` refuses it: run without.
        Err(e)
            if req_pty.hold
                && e.code() == Some(bhatti_protocol::ErrorCode::BadRequest)
                && e.to_string().contains("hold") =>
        {
            client
                .pty(PtyRequest {
                    hold: false,
                    ..req_pty
                })
                .await
        }
        r => r,
    }
    .map_err(agent_error)?;
    // envd gives a command without `stdin` no input: end it at once.
    if size.is_none() && req.stdin == Some(false) {
        let _ = stream.sender.eof();
    }
    let session = stream.session.clone();
    tracing::info!(sandbox = %c.sandbox.id, %session, pid = stream.pid, "e2b process started");
    let new = NewProc {
        sandbox: table::scope(st, &c.sandbox.id),
        tag: req.tag,
        config,
        pty: size.is_some(),
    };
    let (p, rx, listener) = table::register(st, &c.sandbox, new, stream);
    if let Some(t) = timeout {
        // envd ends a process at its start call's deadline.
        let (st, row, p) = (st.clone(), c.sandbox.clone(), p.clone());
        tokio::spawn(async move {
            let Some(mut sub) = p.watch() else { return };
            let ended = async {
                loop {
                    match sub.recv().await {
                        Ok(Ev::End(_) | Ev::Lost(_)) | Err(broadcast::error::RecvError::Closed) => {
                            return
                        }
                        _ => {}
                    }
                }
            };
            tokio::select! {
                _ = ended => {}
                _ = tokio::time::sleep(t) => {
                    tracing::info!(session = %p.session, "e2b process reached its timeout: killing it");
                    if let Ok(client) = st.agent(&row).await {
                        let _ = client.kill_session(&p.session, Some(9)).await;
                    }
                }
            }
        });
    }
    Ok((p.pid, rx, listener))
}

async fn connect_process(
    State(st): State<AppStateRef>,
    caller: Caller,
    headers: HeaderMap,
    req: Result<StreamRequest<ProcessRequest>, Response>,
) -> Response {
    let req = match req {
        Ok(StreamRequest(r)) => r,
        Err(resp) => return resp,
    };
    let r = async {
        let (c, _) = admit(&st, caller).await?;
        let p = table::find(&table::scope(&st, &c.sandbox.id), req.process.as_ref())?;
        Ok::<_, ConnectError>((p.pid, p.listen(&st, &c.sandbox).await?))
    }
    .await;
    match r {
        Ok((pid, sub)) => {
            let rx = match sub {
                Subscription::Live(rx, l) => ReceiverStream::Connect { rx, _listener: l },
                Subscription::Ended(status) => ReceiverStream::Done(Some(Ev::End(status))),
            };
            server_stream(events(
                start_event(pid),
                rx,
                connect::keepalive_interval(&headers),
            ))
        }
        Err(e) => error_stream(e),
    }
}

/// Where a stream's events come from.
/// A listener keeps the process's pump attached until the stream drops.
enum ReceiverStream {
    Primary {
        rx: mpsc::Receiver<Ev>,
        _listener: table::Listener,
    },
    Connect {
        rx: broadcast::Receiver<Ev>,
        _listener: table::Listener,
    },
    Done(Option<Ev>),
}

impl ReceiverStream {
    async fn recv(&mut self) -> Option<Ev> {
        match self {
            ReceiverStream::Primary { rx, .. } => rx.recv().await,
            ReceiverStream::Connect { rx, .. } => loop {
                match rx.recv().await {
                    Ok(ev) => return Some(ev),
                    // Fell behind: the oldest output is lost to this stream.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            },
            ReceiverStream::Done(ev) => ev.take(),
        }
    }
}

/// `start`, then the process's events (and keepalives) until its end.
fn events(
    first: Value,
    rx: ReceiverStream,
    keepalive: Option<Duration>,
) -> impl Stream<Item = Result<Value, ConnectError>> + Send + 'static {
    struct S {
        first: Option<Value>,
        rx: ReceiverStream,
        tick: Option<tokio::time::Interval>,
        done: bool,
    }
    let tick = keepalive.map(|d| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let s = S {
        first: Some(first),
        rx,
        tick,
        done: false,
    };
    futures_util::stream::unfold(s, |mut s| async move {
        if let Some(f) = s.first.take() {
            return Some((Ok(f), s));
        }
        if s.done {
            return None;
        }
        let ev = match &mut s.tick {
            Some(tick) => tokio::select! {
                ev = s.rx.recv() => ev,
                _ = tick.tick() => return Some((Ok(keepalive_event()), s)),
            },
            None => s.rx.recv().await,
        };
        let msg = match ev {
            Some(Ev::Data(stream, b)) => data_event(stream, &b),
            Some(Ev::End(status)) => {
                s.done = true;
                end_event(&status)
            }
            Some(Ev::Lost(why)) => {
                s.done = true;
                lost_event(&why)
            }
            None => {
                s.done = true;
                return Some((
                    Err(ConnectError::new(
                        Code::Unavailable,
                        "the process's output stream ended without its end",
                    )),
                    s,
                ));
            }
        };
        Some((Ok(msg), s))
    })
}

async fn list(
    State(st): State<AppStateRef>,
    caller: Caller,
    _: Unary<serde_json::Map<String, Value>>,
) -> Response {
    unary(
        async {
            let (c, client) = admit(&st, caller).await?;
            let sessions = client.sessions().await.map_err(agent_error)?;
            let running: HashSet<&str> = sessions
                .iter()
                .filter(|s| s.exit.is_none())
                .map(|s| s.id.as_str())
                .collect();
            // Ended ones whose end went unseen leave the table.
            table::prune(&table::scope(&st, &c.sandbox.id), &sessions);
            let mut processes = Vec::new();
            for p in table::all(&table::scope(&st, &c.sandbox.id)) {
                if running.contains(p.session.as_str()) {
                    processes.push(ProcessInfo {
                        config: p.config.clone(),
                        pid: p.pid,
                        tag: p.tag.clone(),
                    });
                }
            }
            Ok(ListResponse { processes })
        }
        .await,
    )
}

async fn send_input(
    State(st): State<AppStateRef>,
    caller: Caller,
    req: Result<Unary<SendInputRequest>, ConnectError>,
) -> Response {
    unary(
        async {
            let Unary(req) = req?;
            let data = req.input.unwrap_or_default().bytes()?;
            let (c, _) = admit(&st, caller).await?;
            let p = table::find(&table::scope(&st, &c.sandbox.id), req.process.as_ref())?;
            write_input(&st, &c, &p, data).await?;
            Ok(json!({}))
        }
        .await,
    )
}

async fn write_input(
    st: &AppStateRef,
    c: &EnvdCaller,
    p: &std::sync::Arc<table::Proc>,
    data: Vec<u8>,
) -> Result<(), ConnectError> {
    if data.is_empty() {
        return Ok(());
    }
    let chan = p.channel(st, &c.sandbox).await?;
    let r = chan.sender().data(Bytes::from(data)).await.map_err(|e| {
        ConnectError::new(
            Code::Unavailable,
            format!("writing to process {}: {e}", p.pid),
        )
    });
    chan.done(p).await;
    r
}

async fn close_stdin(
    State(st): State<AppStateRef>,
    caller: Caller,
    req: Result<Unary<ProcessRequest>, ConnectError>,
) -> Response {
    unary(
        async {
            let Unary(req) = req?;
            let (c, _) = admit(&st, caller).await?;
            let p = table::find(&table::scope(&st, &c.sandbox.id), req.process.as_ref())?;
            if p.pty {
                return Err(ConnectError::new(
                    Code::FailedPrecondition,
                    "a PTY process has no stdin to close (send ^D as input)",
                ));
            }
            let chan = p.channel(&st, &c.sandbox).await?;
            let r = chan.sender().eof().map_err(|e| {
                ConnectError::new(
                    Code::Unavailable,
                    format!("closing process {}'s stdin: {e}", p.pid),
                )
            });
            chan.done(&p).await;
            r.map(|()| json!({}))
        }
        .await,
    )
}

async fn send_signal(
    State(st): State<AppStateRef>,
    caller: Caller,
    req: Result<Unary<SendSignalRequest>, ConnectError>,
) -> Response {
    unary(
        async {
            let Unary(req) = req?;
            let signal = req.signal()?;
            let (c, client) = admit(&st, caller).await?;
            let p = table::find(&table::scope(&st, &c.sandbox.id), req.process.as_ref())?;
            match client.kill_session(&p.session, Some(signal)).await {
                Ok(()) => Ok(json!({})),
                Err(e) if e.code() == Some(bhatti_protocol::ErrorCode::NotFound) => {
                    table::remove(&p);
                    Err(p.gone())
                }
                Err(e) => Err(agent_error(e)),
            }
        }
        .await,
    )
}

async fn update(
    State(st): State<AppStateRef>,
    caller: Caller,
    req: Result<Unary<UpdateRequest>, ConnectError>,
) -> Response {
    unary(
        async {
            let Unary(req) = req?;
            let (rows, cols) = req
                .pty
                .as_ref()
                .filter(|p| p.size.is_some())
                .ok_or_else(|| ConnectError::invalid("pty.size: required"))?
                .rows_cols()?;
            let (c, _) = admit(&st, caller).await?;
            let p = table::find(&table::scope(&st, &c.sandbox.id), req.process.as_ref())?;
            if !p.pty {
                return Err(ConnectError::new(
                    Code::FailedPrecondition,
                    format!("process {} has no PTY to resize", p.pid),
                ));
            }
            let control = serde_json::to_vec(&Control::Resize { rows, cols })
                .map_err(|e| ConnectError::internal(format!("encoding: {e}")))?;
            let chan = p.channel(&st, &c.sandbox).await?;
            let r = chan.sender().control(Bytes::from(control)).map_err(|e| {
                ConnectError::new(
                    Code::Unavailable,
                    format!("resizing process {}: {e}", p.pid),
                )
            });
            chan.done(&p).await;
            r.map(|()| json!({}))
        }
        .await,
    )
}

/// A client stream: `start{process}`, then `data{input}` envelopes (and
/// keepalives), answered with one empty message when the client ends it.
async fn stream_input(
    State(st): State<AppStateRef>,
    caller: Caller,
    req: axum::extract::Request,
) -> Response {
    match stream_input_inner(&st, caller, req.into_body()).await {
        Ok(()) => server_stream(futures_util::stream::once(async {
            Ok::<_, ConnectError>(json!({}))
        })),
        Err(e) => error_stream(e),
    }
}

async fn stream_input_inner(
    st: &AppStateRef,
    caller: Caller,
    body: Body,
) -> Result<(), ConnectError> {
    let (c, _) = admit(st, caller).await?;
    let mut body = body.into_data_stream();
    let mut d = EnvelopeDecoder::default();
    // The process, and one channel to it for the whole stream.
    let mut target: Option<(std::sync::Arc<table::Proc>, Option<table::Chan>)> = None;
    let r = async {
        loop {
            while let Some((flags, msg)) = d.next()? {
                if flags & END_STREAM != 0 {
                    return Ok(());
                }
                let m: StreamInputRequest = connect::decode(&msg)?;
                if let Some(start) = m.start {
                    if let Some((p, Some(chan))) = target.take() {
                        chan.done(&p).await;
                    }
                    target = Some((
                        table::find(&table::scope(st, &c.sandbox.id), start.process.as_ref())?,
                        None,
                    ));
                } else if let Some(data) = m.data {
                    let (p, chan) = target.as_mut().ok_or_else(|| {
                        ConnectError::invalid("the first message must be start{process}")
                    })?;
                    let bytes = Bytes::from(data.input.unwrap_or_default().bytes()?);
                    if bytes.is_empty() {
                        continue;
                    }
                    // A channel of the pump closes when the pump detaches:
                    // then take another, once.
                    let mut tries = 0;
                    loop {
                        if chan.is_none() {
                            *chan = Some(p.channel(st, &c.sandbox).await?);
                        }
                        let Some(ch) = chan.as_ref() else { continue };
                        match ch.sender().data(bytes.clone()).await {
                            Ok(()) => break,
                            Err(e) if tries > 0 => {
                                return Err(ConnectError::new(
                                    Code::Unavailable,
                                    format!("writing to process {}: {e}", p.pid),
                                ))
                            }
                            Err(_) => {
                                tries += 1;
                                if let Some(ch) = chan.take() {
                                    ch.done(p).await;
                                }
                            }
                        }
                    }
                }
            }
            match body.next().await {
                Some(Ok(chunk)) => d.push(&chunk),
                Some(Err(e)) => {
                    return Err(ConnectError::invalid(format!("reading the request: {e}")));
                }
                None if d.pending() == 0 => return Ok(()),
                None => return Err(ConnectError::invalid("the request ends inside a message")),
            }
        }
    }
    .await;
    if let Some((p, Some(chan))) = target {
        chan.done(&p).await;
    }
    r
}
