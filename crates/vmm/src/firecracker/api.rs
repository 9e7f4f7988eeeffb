//! A small client for Firecracker's HTTP API on its unix socket.
//!
//! Built on hyper 1's connection-level HTTP/1.1 client over a tokio
//! `UnixStream` rather than hyper-util's pooled `client-legacy` plus
//! hyperlocal: each VM has exactly one API socket and Firecracker handles
//! its requests one at a time, so a pool and a `unix://` URI scheme add two
//! crates and buy nothing. We keep one keep-alive connection per VM (behind
//! a mutex, so requests are serialized like Firecracker serializes them) and
//! reconnect when it breaks. The HTTP itself is still hyper's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use crate::{Result, VmmError};

/// Ordinary API calls (configuration, pause, resume) answer in microseconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshot create and load move whole guest memories to and from disk.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub struct ApiClient {
    socket: PathBuf,
    /// The jail root the socket is in, if jailed ([`super::jail::open_socket`]).
    beneath: Option<PathBuf>,
    conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

/// What went wrong below the HTTP status line.
enum Failure {
    /// Connecting to the socket failed (nothing was sent).
    Connect(std::io::Error),
    /// The connection broke while sending or receiving.
    Transport(hyper::Error),
}

impl ApiClient {
    pub fn new(socket: &Path) -> ApiClient {
        ApiClient {
            socket: socket.to_path_buf(),
            beneath: None,
            conn: Mutex::new(None),
        }
    }

    /// For a socket inside a jail whose root is `root`.
    pub(crate) fn in_jail(socket: &Path, root: &Path) -> ApiClient {
        ApiClient {
            beneath: Some(root.to_path_buf()),
            ..ApiClient::new(socket)
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        let body = self
            .request(Method::GET, path, None, DEFAULT_TIMEOUT)
            .await?;
        serde_json::from_slice(&body).map_err(|e| VmmError::Api {
            what: format!("GET {path}"),
            message: format!(
                "unparsable answer ({e}): {}",
                String::from_utf8_lossy(&body)
            ),
        })
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<()> {
        self.request(Method::PUT, path, Some(body), DEFAULT_TIMEOUT)
            .await
            .map(|_| ())
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Result<()> {
        self.request(Method::PATCH, path, Some(body), DEFAULT_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// One request; 2xx gives the body, anything else an [`VmmError::Api`]
    /// carrying Firecracker's `fault_message`. A request that fails on a
    /// reused keep-alive connection (closed by the server meanwhile) is sent
    /// once more on a fresh one; Firecracker's calls are safe to repeat.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Bytes> {
        let what = format!("{method} {path}");
        let payload = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v).expect("JSON values serialize")),
            None => Bytes::new(),
        };
        let mut g = self.conn.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let reused = g.as_ref().is_some_and(|s| !s.is_closed());
            if !reused {
                *g = None;
            }
            let r = tokio::time::timeout(
                timeout,
                self.send(
                    &mut g,
                    method.clone(),
                    path,
                    payload.clone(),
                    body.is_some(),
                ),
            )
            .await;
            match r {
                Err(_) => {
                    *g = None;
                    return Err(VmmError::Timeout(timeout, format!("Firecracker {what}")));
                }
                Ok(Ok((status, bytes))) if status.is_success() => return Ok(bytes),
                Ok(Ok((status, bytes))) => {
                    return Err(VmmError::Api {
                        what,
                        message: fault_message(status, &bytes),
                    })
                }
                Ok(Err(Failure::Connect(e))) => {
                    *g = None;
                    return Err(VmmError::io(
                        format!(
                            "connecting to the Firecracker API at {}",
                            self.socket.display()
                        ),
                        e,
                    ));
                }
                Ok(Err(Failure::Transport(e))) => {
                    *g = None;
                    if reused && attempt < 2 {
                        tracing::debug!(%what, error = %e, "Firecracker API connection lost; retrying");
                        continue;
                    }
                    return Err(VmmError::Api {
                        what,
                        message: format!("connection failed: {e}"),
                    });
                }
            }
        }
    }

    async fn send(
        &self,
        conn: &mut Option<SendRequest<Full<Bytes>>>,
        method: Method,
        path: &str,
        payload: Bytes,
        json: bool,
    ) -> std::result::Result<(StatusCode, Bytes), Failure> {
        let sender = match conn {
            Some(s) => s,
            None => conn.insert(self.connect().await?),
        };
        sender.ready().await.map_err(Failure::Transport)?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::ACCEPT, "application/json");
        if json {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(payload))
            .expect("static request parts are valid");
        let resp = sender.send_request(req).await.map_err(Failure::Transport)?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(Failure::Transport)?
            .to_bytes();
        Ok((status, bytes))
    }

    async fn connect(&self) -> std::result::Result<SendRequest<Full<Bytes>>, Failure> {
        // Through /proc/self/fd: a jailed Firecracker's socket may be deeper
        // than sun_path allows, and must not be a symlink it planted.
        let (_fd, via) = super::jail::open_socket(&self.socket, self.beneath.as_deref())
            .map_err(Failure::Connect)?;
        let stream = UnixStream::connect(&via).await.map_err(Failure::Connect)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(Failure::Transport)?;
        // Drives the connection; ends when the sender is dropped or the
        // socket closes (the VMM exited).
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Drops the kept connection (e.g. before the VMM is killed).
    pub async fn disconnect(&self) {
        *self.conn.lock().await = None;
    }
}

/// Firecracker's error body is `{"fault_message": "..."}`.
fn fault_message(status: StatusCode, body: &[u8]) -> String {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    match parsed
        .as_ref()
        .and_then(|v| v.get("fault_message"))
        .and_then(Value::as_str)
    {
        Some(m) => m.to_owned(),
        None if body.is_empty() => format!("HTTP {status}"),
        None => format!("HTTP {status}: {}", String::from_utf8_lossy(body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A fake API server: answers each request on a connection with the
    /// next canned response, and records the request heads and bodies.
    async fn serve(
        listener: tokio::net::UnixListener,
        responses: Vec<&'static str>,
    ) -> Vec<String> {
        let mut seen = Vec::new();
        let total = responses.len();
        let mut responses = responses.into_iter();
        'outer: loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            loop {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                if n == 0 {
                    continue 'outer;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                let Some(head_end) = text.find("\r\n\r\n") else {
                    continue;
                };
                let len: usize = text[..head_end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if buf.len() < head_end + 4 + len {
                    continue;
                }
                seen.push(text[..head_end + 4 + len].to_string());
                buf.drain(..head_end + 4 + len);
                let r = responses.next().expect("a response per request");
                s.write_all(r.as_bytes()).await.unwrap();
                if seen.len() == total {
                    return seen;
                }
                if seen.len() == 2 {
                    // Close after the second request: the client must
                    // reconnect for the third.
                    continue 'outer;
                }
            }
        }
    }

    #[tokio::test]
    async fn requests_errors_and_reconnect() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(serve(
            listener,
            vec![
                "HTTP/1.1 204 No Content\r\n\r\n",
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"fault_message\":\"The VM is not paused\"}",
                "HTTP/1.1 200 OK\r\nContent-Length: 19\r\n\r\n{\"state\":\"Running\"}",
            ],
        ));
        let api = ApiClient::new(&sock);
        api.patch("/vm", &serde_json::json!({"state": "Paused"}))
            .await
            .unwrap();
        let e = api
            .put("/snapshot/create", &serde_json::json!({}))
            .await
            .unwrap_err();
        match e {
            VmmError::Api { what, message } => {
                assert_eq!(what, "PUT /snapshot/create");
                assert_eq!(message, "The VM is not paused");
            }
            other => panic!("{other:?}"),
        }
        let v = api.get("/").await.unwrap();
        assert_eq!(v["state"], "Running");
        drop(api);
        let seen = server.await.unwrap();
        assert!(seen[0].starts_with("PATCH /vm HTTP/1.1\r\n"), "{}", seen[0]);
        assert!(seen[0].ends_with("{\"state\":\"Paused\"}"), "{}", seen[0]);
        assert!(seen[2].starts_with("GET / HTTP/1.1\r\n"), "{}", seen[2]);
    }
}
