//! A port forward as an ordinary byte stream ([`AsyncRead`] +
//! [`AsyncWrite`]), so HTTP clients and copy loops can run over it.
//!
//! Reads take `Data` frames as they come (an `Eof` or the final `Close` is
//! end of stream). A write copies the bytes and starts sending them at
//! once, returning before the channel's credit allows all of them out; the
//! next write, flush or shutdown waits for that send first, so at most one
//! write's bytes are ever held here.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::client::ForwardStream;
use crate::mux::{ChannelReceiver, ChannelSender, Inbound, MuxError};

type Send = Pin<Box<dyn Future<Output = Result<(), MuxError>> + std::marker::Send>>;

/// See the module docs.
pub struct ForwardIo {
    sender: ChannelSender,
    receiver: ChannelReceiver,
    /// Bytes of the last `Data` frame not yet read.
    pending: Bytes,
    read_done: bool,
    sending: Option<Send>,
    shut: bool,
}

impl std::fmt::Debug for ForwardIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardIo")
            .field("channel", &self.sender.id())
            .finish()
    }
}

impl From<ForwardStream> for ForwardIo {
    fn from(s: ForwardStream) -> Self {
        ForwardIo {
            sender: s.sender,
            receiver: s.receiver,
            pending: Bytes::new(),
            read_done: false,
            sending: None,
            shut: false,
        }
    }
}

fn io_err(e: MuxError) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, e)
}

impl ForwardIo {
    /// Finishes the send in flight, if any.
    fn poll_sent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(f) = self.sending.as_mut() {
            let r = ready!(f.as_mut().poll(cx));
            self.sending = None;
            r.map_err(io_err)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ForwardIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.receiver.poll_recv(cx)) {
                Some(Inbound::Data(b)) => this.pending = b,
                Some(Inbound::Eof) | Some(Inbound::Close(_)) => this.read_done = true,
                Some(_) => {}
                None => {
                    this.read_done = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the agent connection closed",
                    )));
                }
            }
        }
    }
}

impl AsyncWrite for ForwardIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_sent(cx))?;
        if this.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(crate::frame::MAX_PAYLOAD);
        let data = Bytes::copy_from_slice(&buf[..n]);
        let sender = this.sender.clone();
        let mut send: Send = Box::pin(async move { sender.data(data).await });
        // Most sends have credit and finish at once.
        match send.as_mut().poll(cx) {
            Poll::Ready(r) => r.map_err(io_err)?,
            Poll::Pending => this.sending = Some(send),
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_sent(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_sent(cx))?;
        if !self.shut {
            self.shut = true;
            self.sender.eof().map_err(io_err)?;
        }
        Poll::Ready(Ok(()))
    }
}
