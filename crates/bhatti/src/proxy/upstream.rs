//! The HTTP client side of the proxy: hyper's pooled client, whose
//! connections are port forwards through the guest agent instead of TCP.
//!
//! A request's URI names its target as `http://<sandbox-id>:<port>/…`; the
//! connector asks the thermal manager for the sandbox's agent (waking it,
//! counting the activity) and opens a forward to that port. Connections
//! are kept alive for a short while, so a burst of requests (a page and
//! its assets) pays for one forward; an idle pooled connection is an open
//! forward, which keeps its sandbox hot, so the pool lets go of it soon.
//! Every connection closes after `idle_timeout` without a byte either way.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bhatti_protocol::forward_io::ForwardIo;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::thermal::ThermalHandle;

/// How long an unused keep-alive forward stays in the pool.
pub const POOL_IDLE: Duration = Duration::from_secs(2);

/// The pooled client over agent forwards.
pub type UpstreamClient = hyper_util::client::legacy::Client<ForwardConnector, axum::body::Body>;

pub fn client(thermal: ThermalHandle, idle_timeout: Duration) -> UpstreamClient {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        // Every concurrent client may leave a forward to reuse: a smaller
        // cap closes forwards a busy burst is about to need again.
        .pool_max_idle_per_host(256)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(ForwardConnector {
            thermal,
            idle_timeout,
        })
}

/// The URI that reaches `port` of sandbox `id` through [`client`].
pub fn target(id: &str, port: u16, path_and_query: &str) -> Result<Uri, hyper::http::Error> {
    Uri::builder()
        .scheme("http")
        .authority(format!("{id}:{port}"))
        .path_and_query(path_and_query)
        .build()
}

/// Why a forward could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Engine(#[from] crate::engine::EngineError),
    /// The agent could not connect to the port (nothing listens, say).
    #[error("cannot reach port {port} in the sandbox: {message}")]
    Port { port: u16, message: String },
    #[error("bad upstream address {0}")]
    Address(String),
}

#[derive(Clone)]
pub struct ForwardConnector {
    thermal: ThermalHandle,
    idle_timeout: Duration,
}

impl tower::Service<Uri> for ForwardConnector {
    type Response = Upstream;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Upstream, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let thermal = self.thermal.clone();
        let idle = self.idle_timeout;
        Box::pin(async move {
            let (Some(id), Some(port)) = (uri.host(), uri.port_u16()) else {
                return Err(ConnectError::Address(uri.to_string()));
            };
            let agent = thermal.agent(id).await?;
            let stream = agent.forward(port).await.map_err(|e| ConnectError::Port {
                port,
                message: e.to_string(),
            })?;
            Ok(Upstream::new(ForwardIo::from(stream), idle))
        })
    }
}

/// One forward as a connection: closes itself after `idle` without bytes.
pub struct Upstream {
    io: TokioIo<Idle<ForwardIo>>,
}

impl Upstream {
    fn new(io: ForwardIo, idle: Duration) -> Self {
        Upstream {
            io: TokioIo::new(Idle::new(io, idle)),
        }
    }
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Upstream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Upstream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A stream that fails with `TimedOut` once it has moved no byte either way
/// for `timeout` while someone waits on it.
pub struct Idle<T> {
    inner: T,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<T> Idle<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        Idle {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    fn active(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.timeout);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no data for {:?}", self.timeout),
        ))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Idle<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.active();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.expired(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Idle<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                self.active();
                Poll::Ready(r)
            }
            Poll::Pending => self.expired(cx).map(Err),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_streams_time_out_and_active_ones_do_not() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut idle = Idle::new(a, Duration::from_secs(10));
        let mut buf = [0u8; 8];
        // Bytes every 6 s keep it open past 10 s.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(6)).await;
            b.write_all(b"x").await.unwrap();
            assert_eq!(idle.read(&mut buf).await.unwrap(), 1);
        }
        // Then silence: the read fails after the timeout.
        let err = idle.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
