//! `POST /sandboxes/{id}/exec`: buffered JSON (each stream capped at
//! `[limits] exec_output_max_bytes`), detached, or an NDJSON stream
//! (`Accept: application/x-ndjson`) whose lines go out as output happens,
//! as fast as the client reads them: the agent channel's flow control
//! holds the command back meanwhile. Dropping the stream (a client that
//! went away) cancels the agent channel, which kills the command's
//! process group.

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
        (status = 200, body = ExecResult, description = "Buffered result (each stream cut at the daemon's `[limits] exec_output_max_bytes`, then `stdout_truncated`/`stderr_truncated`); with `Accept: application/x-ndjson` a stream of ExecEvent lines; with `detach` an ExecDetached"),
        (status = 400, body = crate::api_types::ApiError), (status = 404, body = crate::api_types::ApiError),
        (status = 409, body = crate::api_types::ApiError, description = "`cwd` is not a directory, or the sandbox is not running (or stopped meanwhile)"),
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
    let mut req = req;
    let row = st.sandbox(&caller, &id).await?;
    if req.cmd.is_empty() {
        // A sandbox from an image runs the image's entrypoint + cmd.
        if let Some(c) = super::images::sandbox_image_config(&row.spec) {
            req.cmd = c.command();
        }
    }
    req.validate()?;
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
    let mut stream = client.exec_stream(preq).await?;
    if let Some(input) = stdin {
        let sender = stream.sender.clone();
        // Fed concurrently: a command that writes before it reads cannot
        // deadlock against us.
        tokio::spawn(async move {
            if sender.data(input).await.is_ok() {
                let _ = sender.eof();
            }
        });
    }
    if !streaming {
        let cap = usize::try_from(st.config.limits.exec_output_max_bytes).unwrap_or(usize::MAX);
        let (mut out, mut err) = (Capped::new(cap), Capped::new(cap));
        let status = loop {
            match stream.next().await? {
                AgentEvent::Started { .. } => {}
                AgentEvent::Stdout(b) => out.push(&b),
                AgentEvent::Stderr(b) => err.push(&b),
                AgentEvent::Exit(status) => break status,
            }
        };
        let small = out.buf.len() + err.buf.len() <= JSON_PIECE;
        let pieces = result_json(&status, out, err);
        let body = if small {
            // The usual answer: one buffer, sent with a Content-Length.
            Body::from(pieces.fold(Vec::new(), |mut v, p| {
                v.extend_from_slice(&p);
                v
            }))
        } else {
            Body::from_stream(futures_util::stream::iter(pieces.map(Ok::<_, Infallible>)))
        };
        return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
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

/// One stream of a buffered exec: its first `cap` bytes. Past them the
/// output is still read, so the command never blocks on a full pipe and
/// runs to its end, but it is dropped: the daemon holds at most `cap`
/// bytes per stream whatever the command prints.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capped {
    fn new(cap: usize) -> Capped {
        Capped {
            buf: Vec::new(),
            cap,
            truncated: false,
        }
    }

    fn push(&mut self, b: &[u8]) {
        let room = self.cap - self.buf.len();
        if b.len() > room {
            self.truncated = true;
        }
        self.buf.extend_from_slice(&b[..b.len().min(room)]);
    }

    /// The bytes kept, without a character the cap cut in two.
    fn finish(mut self) -> (Vec<u8>, bool) {
        if self.truncated {
            let cut = cut_char(&self.buf);
            self.buf.truncate(self.buf.len() - cut);
        }
        (self.buf, self.truncated)
    }
}

/// How many bytes at the end of `b` are an incomplete UTF-8 sequence.
fn cut_char(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let c = b[b.len() - back];
        if c & 0xc0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let need = match c {
            0xf0.. => 4,
            0xe0.. => 3,
            0xc0.. => 2,
            _ => 1,
        };
        return if need > back { back } else { 0 };
    }
    0
}

/// Output escaped per piece of this many bytes.
const JSON_PIECE: usize = 64 * 1024;

/// The buffered answer (an [`ExecResult`], same bytes as serde makes) as
/// pieces escaped while the body is sent: the output is held once, as
/// raw bytes, never also as a whole JSON copy (escaping can make binary
/// output six times larger).
fn result_json(
    status: &bhatti_protocol::ExitStatus,
    out: Capped,
    err: Capped,
) -> impl Iterator<Item = Bytes> + Send + 'static {
    let (stdout, stdout_truncated) = out.finish();
    let (stderr, stderr_truncated) = err.finish();
    let head = format!(r#"{{"exit_code":{},"stdout":""#, status.exit_code);
    let mut tail = String::from("\"");
    for (key, on) in [
        ("timed_out", status.timed_out),
        ("stdout_truncated", stdout_truncated),
        ("stderr_truncated", stderr_truncated),
    ] {
        if on {
            tail.push_str(&format!(r#","{key}":true"#));
        }
    }
    tail.push('}');
    std::iter::once(Bytes::from(head))
        .chain(json_text(stdout))
        .chain(std::iter::once(Bytes::from_static(br#"","stderr":""#)))
        .chain(json_text(stderr))
        .chain(std::iter::once(Bytes::from(tail)))
}

/// `raw` as the inside of a JSON string (invalid UTF-8 replaced), a piece
/// at a time.
fn json_text(raw: Vec<u8>) -> impl Iterator<Item = Bytes> + Send {
    let mut text = Utf8Chunker::default();
    let mut pos = 0;
    let mut finished = false;
    std::iter::from_fn(move || loop {
        let s = if pos < raw.len() {
            let end = (pos + JSON_PIECE).min(raw.len());
            let s = text.push(&raw[pos..end]);
            pos = end;
            s
        } else if !finished {
            finished = true;
            text.finish()
        } else {
            return None;
        };
        if s.is_empty() {
            continue;
        }
        // serde_json quotes and escapes it; keep what is between the quotes.
        let quoted = Bytes::from(serde_json::to_vec(&s).unwrap_or_default());
        if quoted.len() >= 2 {
            return Some(quoted.slice(1..quoted.len() - 1));
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn json(exit_code: i32, timed_out: bool, out: Capped, err: Capped) -> String {
        let status = bhatti_protocol::ExitStatus {
            exit_code,
            signal: None,
            timed_out,
            pid: None,
        };
        let bytes: Vec<u8> = result_json(&status, out, err).flatten().collect();
        String::from_utf8(bytes).expect("UTF-8")
    }

    fn capped(cap: usize, chunks: &[&[u8]]) -> Capped {
        let mut c = Capped::new(cap);
        for b in chunks {
            c.push(b);
        }
        c
    }

    #[test]
    fn streamed_answer_is_the_serialized_result() {
        // Escapes, invalid bytes and a character across a piece boundary.
        let mut long = vec![b'a'; JSON_PIECE - 1];
        long.extend_from_slice("é\0\"\\\n".as_bytes());
        long.extend_from_slice(&[0xff, 0xe2, 0x82]);
        for (stdout, stderr, timed_out) in [
            (&b""[..], &b""[..], false),
            (&b"hi\n"[..], &b"\x01\t"[..], true),
            (&long[..], &b"\xf0\x9f"[..], false),
        ] {
            let want = serde_json::to_string(&ExecResult {
                exit_code: -3,
                stdout: String::from_utf8_lossy(stdout).into_owned(),
                stderr: String::from_utf8_lossy(stderr).into_owned(),
                timed_out,
                ..Default::default()
            })
            .unwrap();
            let got = json(
                -3,
                timed_out,
                capped(1 << 20, &[stdout]),
                capped(1 << 20, &[stderr]),
            );
            assert_eq!(got, want);
        }
    }

    #[test]
    fn output_past_the_cap_is_dropped_and_flagged() {
        let got = json(
            0,
            false,
            capped(5, &[b"abc", b"defgh", b"ij"]),
            capped(5, &[b"x"]),
        );
        let v: ExecResult = serde_json::from_str(&got).unwrap();
        assert_eq!((v.stdout.as_str(), v.stdout_truncated), ("abcde", true));
        assert_eq!((v.stderr.as_str(), v.stderr_truncated), ("x", false));
        assert!(got.ends_with(r#""stdout_truncated":true}"#), "{got}");
        // A character cut by the cap is left out, not replaced.
        let v: ExecResult = serde_json::from_str(&json(
            0,
            false,
            capped(4, &["aé€".as_bytes()]),
            capped(1, &[]),
        ))
        .unwrap();
        assert_eq!(v.stdout, "aé");
        for (b, cut) in [
            (&b""[..], 0),
            (b"a", 0),
            ("é".as_bytes(), 0),
            (&"€".as_bytes()[..2], 2),
            (&"🎉".as_bytes()[..3], 3),
            (&"🎉".as_bytes()[..1], 1),
            ("a🎉".as_bytes(), 0),
        ] {
            assert_eq!(cut_char(b), cut, "{b:?}");
        }
    }
}
