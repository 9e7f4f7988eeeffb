//! A minimal HTTP/1.1 client over the daemon's unix socket: one kept-alive
//! connection per [`Conn`], as a real client (the CLI, an SDK) would hold.

use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

pub struct Conn {
    sock: PathBuf,
    key: Option<String>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

pub struct Resp {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "{} is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Fails unless the status is `want`; returns the body.
    pub fn ok(self, what: &str, want: u16) -> anyhow::Result<Resp> {
        anyhow::ensure!(
            self.status.as_u16() == want,
            "{what}: {} {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        Ok(self)
    }
}

impl Conn {
    pub fn new(sock: &Path, key: Option<&str>) -> Conn {
        Conn {
            sock: sock.to_owned(),
            key: key.map(str::to_owned),
            sender: None,
        }
    }

    async fn sender(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        let fresh = match &self.sender {
            Some(s) => s.is_closed(),
            None => true,
        };
        if fresh {
            let stream = tokio::net::UnixStream::connect(&self.sock)
                .await
                .with_context(|| format!("connecting to {}", self.sock.display()))?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let s = self.sender.as_mut().expect("sender");
        s.ready().await?;
        Ok(s)
    }

    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        json: bool,
        body: Bytes,
    ) -> anyhow::Result<Resp> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://localhost{path}"))
            .header("host", "localhost");
        if let Some(k) = &self.key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        if json {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(body))?;
        let resp = self.sender().await?.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Resp {
            status: parts.status,
            body,
        })
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<Resp> {
        self.send(Method::GET, path, false, Bytes::new()).await
    }

    pub async fn post(&mut self, path: &str, v: serde_json::Value) -> anyhow::Result<Resp> {
        self.send(Method::POST, path, true, Bytes::from(v.to_string()))
            .await
    }

    pub async fn put(&mut self, path: &str, body: Bytes) -> anyhow::Result<Resp> {
        self.send(Method::PUT, path, false, body).await
    }

    pub async fn delete(&mut self, path: &str) -> anyhow::Result<Resp> {
        self.send(Method::DELETE, path, false, Bytes::new()).await
    }

    /// `POST /sandboxes/{id}/exec {"cmd":["/bin/true"]}`, checked.
    pub async fn exec_true(&mut self, id: &str) -> anyhow::Result<()> {
        let r = self
            .post(
                &format!("/sandboxes/{id}/exec"),
                serde_json::json!({"cmd": ["/bin/true"]}),
            )
            .await?
            .ok("exec", 200)?;
        let v = r.json()?;
        anyhow::ensure!(v["exit_code"] == 0, "exec /bin/true: {v}");
        Ok(())
    }
}

/// Percent-encodes a query value (paths: letters, digits, `/._-` kept).
pub fn q(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/._-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
