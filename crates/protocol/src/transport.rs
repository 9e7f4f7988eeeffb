//! Byte streams the protocol runs over.
//!
//! Anything reliable and ordered works: a unix socket (the agent's test mode
//! on the host, a QEMU virtio-serial chardev socket), Firecracker's hybrid
//! vsock (a unix socket plus a `CONNECT <port>` line), or TCP for debugging.

use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

/// A connected byte stream of any kind.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Transport for T {}

pub type BoxedStream = Pin<Box<dyn Transport>>;

pub async fn connect_unix(path: &Path) -> std::io::Result<BoxedStream> {
    Ok(Box::pin(UnixStream::connect(path).await?))
}

pub async fn connect_tcp(addr: &str) -> std::io::Result<BoxedStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(Box::pin(s))
}

/// Firecracker's host side of a guest vsock port: connect to the VM's vsock
/// unix socket, send `CONNECT <port>\n` and expect `OK <host port>\n`.
pub async fn connect_firecracker_vsock(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> std::io::Result<BoxedStream> {
    let stream = UnixStream::connect(uds).await?;
    let handshake = async move {
        let mut stream = BufReader::new(stream);
        stream
            .get_mut()
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await?;
        let mut line = String::new();
        // The reply is one short line; BufReader holds nothing past it
        // because the guest speaks only after our Hello.
        stream.read_line(&mut line).await?;
        if !line.starts_with("OK ") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("vsock CONNECT {port} refused: {:?}", line.trim_end()),
            ));
        }
        Ok(stream.into_inner())
    };
    let stream = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "vsock CONNECT timed out")
        })??;
    Ok(Box::pin(stream))
}
