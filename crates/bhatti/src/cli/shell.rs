//! `bhatti shell` (a terminal over the API's WebSocket) and `bhatti ps`.
//!
//! The terminal goes raw (crossterm) while attached; window-size changes
//! (SIGWINCH) become resize messages; Ctrl+\ detaches. Every output byte
//! advances the session's offset, and the last offset seen is saved in the
//! CLI's config dir when the shell ends, so `--session ID` resumes exactly
//! after it: nothing lost, nothing shown twice.

use std::io::{IsTerminal, Read};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use super::args::ShellArgs;
use super::http::{enc, error_message, query, Client, Endpoint};
use super::output::{self, s, short_time, Printer};
use super::sandbox::sandbox_path;
use super::settings::{require_token, SessionOffsets};
use super::{CliError, ExitStatus, Result};

/// Ctrl+\ (FS): the detach key.
const DETACH_KEY: u8 = 0x1c;
/// How long to wait for the daemon to confirm a detach before closing.
const DETACH_GRACE: Duration = Duration::from_secs(5);

/// Restores the terminal when dropped.
struct RawMode;

impl RawMode {
    fn enable() -> Result<RawMode> {
        crossterm::terminal::enable_raw_mode()
            .map_err(|e| CliError::new(format!("cannot put the terminal in raw mode: {e}")))?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// How the attachment ended.
enum End {
    Exit(i64),
    Detached,
    Lost(String),
}

/// Reads stdin on a plain thread (a blocking read cannot be cancelled; the
/// process exits without waiting for it).
fn stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 8192];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

async fn next_winch(sig: &mut Option<tokio::signal::unix::Signal>) {
    match sig {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

fn ws_url(endpoint: &Endpoint, path: &str) -> String {
    match endpoint {
        Endpoint::Unix(_) => format!("ws://localhost{path}"),
        Endpoint::Tcp { .. } => format!(
            "ws{}{path}",
            endpoint.to_string().trim_start_matches("http")
        ),
    }
}

pub async fn shell(c: &Client, a: ShellArgs, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    // The id, not the name, keys the saved offset (a recreated sandbox with
    // the same name is another sandbox).
    let sb = c.get(&sandbox_path(&a.sandbox, "")).await?;
    let sandbox_id = s(&sb, "id");
    let interactive = std::io::stdin().is_terminal();
    let (cols, rows) = if interactive {
        crossterm::terminal::size().unwrap_or((80, 24))
    } else {
        (80, 24)
    };
    let mut q = vec![("rows", rows.to_string()), ("cols", cols.to_string())];
    let mut session = a.session.clone();
    if session.is_none() && a.cmd.is_empty() && !a.new {
        // Reattach the newest detached terminal session, if there is one.
        let list = c
            .get(&format!("/sandboxes/{}/sessions", enc(&sandbox_id)))
            .await?;
        let newest = list
            .get("sessions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|x| {
                x.get("exit").is_none_or(Value::is_null)
                    && x.get("attached").and_then(Value::as_u64) == Some(0)
                    && x.get("piped").and_then(Value::as_bool) != Some(true)
            })
            .max_by_key(|x| {
                x.get("started_unix_ms")
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
            });
        if let Some(x) = newest {
            let id = s(x, "id");
            out.note(&format!(
                "reattaching detached session {id} (--new starts another)"
            ));
            session = Some(id);
        }
    }
    if let Some(id) = &session {
        q.push(("session", id.clone()));
        let key = SessionOffsets::key(&c.endpoint, &sandbox_id, id);
        if let Some(o) = a.offset.or_else(|| SessionOffsets::load().get(&key)) {
            q.push(("offset", o.to_string()));
        }
    }
    if !a.cmd.is_empty() {
        q.push((
            "cmd",
            serde_json::to_string(&a.cmd).map_err(|e| CliError::new(e.to_string()))?,
        ));
    }
    let path = format!("/sandboxes/{}/ws{}", enc(&sandbox_id), query(&q));
    let mut req = ws_url(&c.endpoint, &path)
        .into_client_request()
        .map_err(|e| CliError::new(format!("cannot build the WebSocket request: {e}")))?;
    if let Some(t) = &c.token {
        let v = format!("Bearer {t}").parse().map_err(|_| {
            CliError::usage("the API key contains characters not allowed in a header")
        })?;
        req.headers_mut().insert(hyper::header::AUTHORIZATION, v);
    }
    let stream = c.endpoint.connect().await?;
    // The daemon sends messages of at most 64 KiB and takes at most 1 MiB:
    // refuse larger ones rather than buffer them.
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .map_err(|e| match e {
            tungstenite::Error::Http(resp) => {
                let status = hyper::StatusCode::from_u16(resp.status().as_u16())
                    .unwrap_or(hyper::StatusCode::BAD_GATEWAY);
                error_message(status, resp.body().as_deref().unwrap_or_default(), None)
            }
            other => CliError::new(format!("the shell connection failed: {other}")),
        })?;
    let (mut sink, mut stream) = ws.split();

    // First frame: which session, and the offset the replay starts at.
    let (session, mut offset) = loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str())
                    .map_err(|e| CliError::new(format!("invalid message from the daemon: {e}")))?;
                match v.get("type").and_then(Value::as_str) {
                    Some("session") => {
                        if let Some(gap) = v.get("gap").filter(|g| !g.is_null()) {
                            out.note(&format!(
                                "bhatti: output from offset {} to {} is no longer held and cannot be replayed",
                                s(gap, "from"),
                                s(gap, "to")
                            ));
                        }
                        break (
                            s(&v, "id"),
                            v.get("offset").and_then(Value::as_u64).unwrap_or(0),
                        );
                    }
                    Some("error") => return Err(CliError::new(s(&v, "error"))),
                    _ => continue,
                }
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(CliError::new(
                    "the daemon closed the shell before it started",
                ))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(CliError::new(format!("the shell connection failed: {e}"))),
        }
    };
    let key = SessionOffsets::key(&c.endpoint, &sandbox_id, &session);
    let reattach = format!("bhatti shell {} --session {session}", a.sandbox);

    let raw = if interactive {
        Some(RawMode::enable()?)
    } else {
        None
    };
    let mut input = stdin_reader();
    let mut input_open = true;
    let mut winch = if interactive {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok()
    } else {
        None
    };
    let mut detach_deadline: Option<tokio::time::Instant> = None;

    let end = loop {
        let deadline = async {
            match detach_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    offset += b.len() as u64;
                    if let Err(e) = output::write_stdout(&b) {
                        if e.message.is_empty() {
                            break End::Lost("stdout closed".into());
                        }
                        break End::Lost(e.message);
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else { continue };
                    match v.get("type").and_then(Value::as_str) {
                        Some("exit") => {
                            if let Some(o) = v.get("offset").and_then(Value::as_u64) {
                                offset = o;
                            }
                            break End::Exit(v.get("exit_code").and_then(Value::as_i64).unwrap_or(255));
                        }
                        Some("detached") => {
                            if let Some(o) = v.get("offset").and_then(Value::as_u64) {
                                offset = o;
                            }
                            break End::Detached;
                        }
                        Some("error") => break End::Lost(s(&v, "error")),
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    if detach_deadline.is_some() {
                        break End::Detached;
                    }
                    break End::Lost("the daemon closed the connection".into());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break End::Lost(e.to_string()),
            },
            data = input.recv(), if input_open && detach_deadline.is_none() => match data {
                None => input_open = false,
                Some(mut bytes) => {
                    let detach_at = if interactive {
                        bytes.iter().position(|&b| b == DETACH_KEY)
                    } else {
                        None
                    };
                    if let Some(i) = detach_at {
                        bytes.truncate(i);
                    }
                    if !bytes.is_empty() && sink.send(Message::binary(bytes)).await.is_err() {
                        break End::Lost("the connection broke while sending input".into());
                    }
                    if detach_at.is_some() {
                        if sink.send(Message::text(json!({"type": "detach"}).to_string())).await.is_err() {
                            break End::Detached;
                        }
                        detach_deadline = Some(tokio::time::Instant::now() + DETACH_GRACE);
                    }
                }
            },
            _ = next_winch(&mut winch) => {
                if let Ok((cols, rows)) = crossterm::terminal::size() {
                    let msg = json!({"type": "resize", "rows": rows, "cols": cols}).to_string();
                    let _ = sink.send(Message::text(msg)).await;
                }
            }
            _ = deadline => {
                // No confirmation: closing the socket detaches too.
                let _ = sink.close().await;
                break End::Detached;
            }
        }
    };
    drop(raw);

    let summary = |exit: Option<i64>, detached: bool| {
        json!({
            "sandbox": sandbox_id,
            "session": session,
            "offset": offset,
            "exit_code": exit,
            "detached": detached,
        })
    };
    match end {
        End::Exit(code) => {
            let _ = SessionOffsets::update(&key, None);
            if out.json {
                out.json_value(&summary(Some(code), false))?;
            }
            Ok(ExitStatus::remote(code))
        }
        End::Detached => {
            SessionOffsets::update(&key, Some(offset))?;
            if out.json {
                out.json_value(&summary(None, true))?;
            } else {
                output::write_stderr(
                    format!("\r\nbhatti: detached from session {session}; reattach with: {reattach}\r\n")
                        .as_bytes(),
                );
            }
            Ok(ExitStatus::Success)
        }
        End::Lost(why) => {
            let _ = SessionOffsets::update(&key, Some(offset));
            Err(CliError::new(format!(
                "lost the shell ({why}); the session keeps running; reattach with: {reattach}"
            )))
        }
    }
}

pub async fn ps(c: &Client, sandbox: &str, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let v = c.get(&sandbox_path(sandbox, "/sessions")).await?;
    if out.json {
        out.json_value(&v)?;
        return Ok(ExitStatus::Success);
    }
    let empty = Vec::new();
    let list = v
        .get("sessions")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    if list.is_empty() {
        out.note(&format!(
            "no sessions; start one with `bhatti shell {sandbox}`"
        ));
        return Ok(ExitStatus::Success);
    }
    let rows = list
        .iter()
        .map(|x| {
            let argv = x
                .get("argv")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|p| p.as_str().unwrap_or("?"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_else(|| "-".into());
            let state = match x.get("exit").filter(|e| !e.is_null()) {
                Some(e) => format!(
                    "exited {}",
                    e.as_i64().map_or(e.to_string(), |c| c.to_string())
                ),
                None if x.get("attached").and_then(Value::as_bool) == Some(true) => {
                    "attached".into()
                }
                None => "detached".into(),
            };
            let started = x
                .get("started_unix_ms")
                .and_then(Value::as_i64)
                .map_or("-".into(), |ms| {
                    short_time(&bhatti::api_types::rfc3339_ms(ms))
                });
            vec![
                s(x, "id"),
                s(x, "pid"),
                state,
                format!("{}x{}", s(x, "cols"), s(x, "rows")),
                s(x, "end_offset"),
                started,
                argv,
            ]
        })
        .collect();
    out.table(
        &[
            "SESSION", "PID", "STATE", "SIZE", "OUTPUT", "STARTED", "COMMAND",
        ],
        rows,
    )?;
    Ok(ExitStatus::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_urls() {
        assert_eq!(
            ws_url(&Endpoint::Unix("/x.sock".into()), "/sandboxes/a/ws"),
            "ws://localhost/sandboxes/a/ws"
        );
        assert_eq!(
            ws_url(
                &Endpoint::Tcp {
                    host: "127.0.0.1".into(),
                    port: 8080
                },
                "/sandboxes/a/ws?rows=1"
            ),
            "ws://127.0.0.1:8080/sandboxes/a/ws?rows=1"
        );
    }
}
