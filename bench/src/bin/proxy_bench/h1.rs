//! The two ends of "the guest's HTTP server" as the benchmark drives it:
//! [`GuestServer`], a tiny HTTP/1.1 server on the host (`GET /kib` → 1 KiB,
//! kept alive) that host-mode lohar's forwards reach, on a thread of its
//! own as a guest's server would be on a CPU of its own; and [`Getter`],
//! one kept-alive HTTP/1.1 connection over any byte stream (an agent
//! forward, the daemon's unix socket, TCP) sending the same GET again and
//! again.

use std::convert::Infallible;
use std::future::Future;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// The body of `GET /kib`.
pub const KIB: usize = 1024;

/// See the module docs.
pub struct GuestServer {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

async fn kib(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    static BODY: [u8; KIB] = [b'x'; KIB];
    let mut r = Response::new(Full::new(Bytes::from_static(&BODY)));
    if req.uri().path() != "/kib" {
        *r.status_mut() = StatusCode::NOT_FOUND;
    }
    Ok(r)
}

impl GuestServer {
    /// Listens on 127.0.0.1 (a port of the system's choosing) at once and
    /// serves from a thread of its own until dropped.
    pub fn start() -> anyhow::Result<GuestServer> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("guest-server".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::pin!(rx);
                    loop {
                        let tcp = tokio::select! {
                            _ = &mut rx => break,
                            r = listener.accept() => match r {
                                Ok((tcp, _)) => tcp,
                                Err(_) => continue,
                            },
                        };
                        let _ = tcp.set_nodelay(true);
                        tokio::spawn(async move {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(
                                    TokioIo::new(tcp),
                                    hyper::service::service_fn(kib),
                                )
                                .await;
                        });
                    }
                })
            })?;
        Ok(GuestServer {
            port,
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for GuestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// See the module docs.
pub struct Getter {
    sender: SendRequest<Empty<Bytes>>,
    host: String,
    path: String,
    bearer: Option<String>,
    status: StatusCode,
    len: Option<usize>,
}

impl Getter {
    /// `GET path` with `Host: host` (and the API key as a bearer token)
    /// over `io`, expecting 200 and [`KIB`] bytes.
    pub async fn over<T>(io: T, host: &str, path: &str, key: Option<&str>) -> anyhow::Result<Getter>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .context("HTTP/1.1 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Getter {
            sender,
            host: host.to_owned(),
            path: path.to_owned(),
            bearer: key.map(|k| format!("Bearer {k}")),
            status: StatusCode::OK,
            len: Some(KIB),
        })
    }

    /// Expects `status` and a body of any length instead.
    pub fn expect(mut self, status: u16) -> anyhow::Result<Getter> {
        self.status = StatusCode::from_u16(status)?;
        self.len = None;
        Ok(self)
    }

    /// One request; the whole body is read and checked.
    pub async fn get(&mut self) -> anyhow::Result<()> {
        self.sender
            .ready()
            .await
            .with_context(|| format!("GET {}: the connection closed", self.path))?;
        let mut req = Request::get(self.path.as_str()).header(HOST, self.host.as_str());
        if let Some(b) = &self.bearer {
            req = req.header(AUTHORIZATION, b.as_str());
        }
        let resp = self
            .sender
            .send_request(req.body(Empty::new())?)
            .await
            .with_context(|| format!("GET {}", self.path))?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(
            status == self.status && self.len.is_none_or(|n| n == body.len()),
            "GET {}: {status}, {} bytes: {}",
            self.path,
            body.len(),
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
        Ok(())
    }
}

/// Runs `f` on a current-thread runtime of its own, on a thread of its
/// own (a client process, as far as the daemon's one thread can tell), and
/// awaits its result without blocking this runtime.
pub async fn on_thread<F, Fut, R>(name: &str, f: F) -> anyhow::Result<R>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<R>>,
    R: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = tx.send(rt.block_on(f()));
        })?;
    let r = rx.await.context("the client thread died");
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    r?
}
