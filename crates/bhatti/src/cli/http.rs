//! A small HTTP/1.1 client for the daemon's API over a unix socket or TCP
//! (hyper's connection API, one connection per request: the CLI makes a
//! handful of requests per run), and the WebSocket connect for `shell`.

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::{CliError, Result};

/// The daemon's default socket.
pub const DEFAULT_SOCKET: &str = "/run/bhatti/bhatti.sock";

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl Endpoint {
    /// `unix:///path`, `/path`, `http://host[:port]` (port 80 by default).
    pub fn parse(url: &str) -> Result<Endpoint> {
        let url = url.trim();
        let bad = |why: &str| CliError::usage(format!("invalid daemon URL {url:?}: {why}"));
        if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad("a unix socket URL is unix:///absolute/path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if url.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(url)));
        }
        if url.starts_with("https://") {
            return Err(bad(
                "https is not supported by the CLI; use the unix socket or http:// behind a TLS-terminating proxy on the client side",
            ));
        }
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("expected unix:///path or http://host:port"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(bad("expected http://host:port with no path"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            // [::1]:8080
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => 80,
                None => return Err(bad("bad port")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
                None => (authority.to_string(), 80),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Endpoint::Tcp { host, port })
    }

    /// The `Host` header value.
    fn authority(&self) -> String {
        match self {
            Endpoint::Unix(_) => "localhost".into(),
            Endpoint::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
        }
    }

    /// Connects one stream.
    pub async fn connect(&self) -> Result<Stream> {
        match self {
            Endpoint::Unix(p) => UnixStream::connect(p).await.map(Stream::Unix),
            Endpoint::Tcp { host, port } => TcpStream::connect((host.as_str(), *port))
                .await
                .map(Stream::Tcp),
        }
        .map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    " (is `bhatti serve` running? set BHATTI_URL or run `bhatti setup`)"
                }
                std::io::ErrorKind::PermissionDenied => {
                    " (no permission on the socket; use http://127.0.0.1:8080 or ask the host's admin)"
                }
                _ => "",
            };
            CliError::new(format!("cannot reach the bhatti daemon at {self}: {e}{hint}"))
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp { .. } => write!(f, "http://{}", self.authority()),
        }
    }
}

/// A unix or TCP stream.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Percent-encodes one path segment or query value: everything but letters,
/// digits, `-`, `_` and `~` (dots too, so `..` cannot become a path step).
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `?k=v&…` from pairs (values encoded), or "" when empty.
pub fn query(pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
    format!("?{}", parts.join("&"))
}

/// An API client: endpoint and key.
#[derive(Debug, Clone)]
pub struct Client {
    pub endpoint: Endpoint,
    pub token: Option<String>,
}

/// A body to send.
pub enum Body {
    Empty,
    Json(Value),
    Raw(Bytes),
}

impl Client {
    fn builder(&self, method: Method, path: &str) -> Result<hyper::http::request::Builder> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.endpoint.authority())
            .header(
                USER_AGENT,
                concat!("bhatti-cli/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = &self.token {
            let v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                CliError::usage("the API key contains characters not allowed in a header")
            })?;
            b = b.header(AUTHORIZATION, v);
        }
        Ok(b)
    }

    /// Sends one request; the response's body is left to the caller.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Body,
        accept: Option<&str>,
    ) -> Result<Response<Incoming>> {
        let mut b = self.builder(method, path)?;
        if let Some(a) = accept {
            b = b.header(ACCEPT, a);
        }
        let body = match body {
            Body::Empty => Bytes::new(),
            Body::Json(v) => {
                b = b.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&v).map_err(|e| CliError::new(e.to_string()))?)
            }
            Body::Raw(bytes) => {
                b = b.header(CONTENT_TYPE, "application/octet-stream");
                bytes
            }
        };
        let req = b
            .body(Full::new(body))
            .map_err(|e| CliError::new(format!("cannot build the request: {e}")))?;
        let stream = self.endpoint.connect().await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| {
                    CliError::new(format!("HTTP handshake with {} failed: {e}", self.endpoint))
                })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender.send_request(req).await.map_err(|e| {
            CliError::new(format!(
                "the daemon at {} did not answer: {e}",
                self.endpoint
            ))
        })
    }

    /// Sends a request and fails on a non-2xx status with the API's error.
    pub async fn ok(
        &self,
        method: Method,
        path: &str,
        body: Body,
        accept: Option<&str>,
    ) -> Result<Response<Incoming>> {
        let resp = self.send(method, path, body, accept).await?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(error_from(resp).await)
        }
    }

    /// A JSON request and its JSON answer (`null` for an empty body).
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value)> {
        let body = body.map(Body::Json).unwrap_or(Body::Empty);
        let resp = self
            .ok(method, path, body, Some("application/json"))
            .await?;
        let status = resp.status();
        let bytes = read_body(resp.into_body()).await?;
        if bytes.is_empty() {
            return Ok((status, Value::Null));
        }
        let v = serde_json::from_slice(&bytes).map_err(|e| {
            CliError::new(format!(
                "the daemon sent invalid JSON ({e}); is {} a bhatti daemon?",
                self.endpoint
            ))
        })?;
        Ok((status, v))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(self.json(Method::GET, path, None).await?.1)
    }
}

/// The whole body.
pub async fn read_body(body: Incoming) -> Result<Bytes> {
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| CliError::new(format!("reading the daemon's answer failed: {e}")))
}

/// The one-line error for a failed response: the API's `{"error"}` text,
/// with a hint where one helps.
pub async fn error_from(resp: Response<Incoming>) -> CliError {
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = read_body(resp.into_body()).await.unwrap_or_default();
    error_message(status, &body, retry.as_deref())
}

/// See [`error_from`].
pub fn error_message(status: StatusCode, body: &[u8], retry_after: Option<&str>) -> CliError {
    let api = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string));
    let mut msg = match api {
        Some(m) if !m.is_empty() => m,
        _ => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() || text.len() > 200 {
                format!("the daemon answered {status}")
            } else {
                format!("the daemon answered {status}: {text}")
            }
        }
    };
    match status {
        StatusCode::UNAUTHORIZED => {
            msg.push_str(" (check the API key: --token, BHATTI_TOKEN or `bhatti setup`)")
        }
        StatusCode::TOO_MANY_REQUESTS => {
            if let Some(r) = retry_after {
                msg.push_str(&format!(" (retry in {r} s)"));
            }
        }
        s if s.is_server_error() => msg.push_str(&format!(" (HTTP {})", s.as_u16())),
        _ => {}
    }
    CliError::new(super::one_line(&msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("unix:///run/bhatti/bhatti.sock").unwrap(),
            Endpoint::Unix("/run/bhatti/bhatti.sock".into())
        );
        assert_eq!(
            Endpoint::parse("/tmp/x.sock").unwrap(),
            Endpoint::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:8080/").unwrap(),
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 8080
            }
        );
        assert_eq!(
            Endpoint::parse("http://example.com").unwrap(),
            Endpoint::Tcp {
                host: "example.com".into(),
                port: 80
            }
        );
        let v6 = Endpoint::parse("http://[::1]:9").unwrap();
        assert_eq!(v6.to_string(), "http://[::1]:9");
        for bad in [
            "unix://rel",
            "https://x",
            "ftp://x",
            "http://",
            "http://h:x",
            "http://h:1/api",
            "localhost:8080",
        ] {
            let e = Endpoint::parse(bad).unwrap_err();
            assert_eq!(e.status, super::super::ExitStatus::Usage, "{bad}");
        }
        assert_eq!(
            Endpoint::Unix("/a.sock".into()).to_string(),
            "unix:///a.sock"
        );
    }

    #[test]
    fn encoding() {
        assert_eq!(enc("dev-1"), "dev-1");
        assert_eq!(enc("a/b c"), "a%2Fb%20c");
        assert_eq!(enc("é"), "%C3%A9");
        assert_eq!(query(&[]), "");
        assert_eq!(
            query(&[("path", "/a b".into()), ("ls", "true".into())]),
            "?path=%2Fa%20b&ls=true"
        );
    }

    #[test]
    fn errors_are_one_line() {
        let e = error_message(
            StatusCode::NOT_FOUND,
            br#"{"error":"no sandbox named 'x'"}"#,
            None,
        );
        assert_eq!(e.message, "no sandbox named 'x'");
        let e = error_message(StatusCode::UNAUTHORIZED, br#"{"error":"bad key"}"#, None);
        assert!(e.message.starts_with("bad key (check the API key"));
        let e = error_message(
            StatusCode::TOO_MANY_REQUESTS,
            br#"{"error":"slow down"}"#,
            Some("3"),
        );
        assert_eq!(e.message, "slow down (retry in 3 s)");
        let e = error_message(StatusCode::BAD_GATEWAY, b"line1\nline2", None);
        assert_eq!(
            e.message,
            "the daemon answered 502 Bad Gateway: line1; line2 (HTTP 502)"
        );
        let e = error_message(StatusCode::INTERNAL_SERVER_ERROR, b"", None);
        assert!(!e.message.contains('\n'));
    }
}
