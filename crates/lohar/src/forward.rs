//! Port forward: a byte stream to 127.0.0.1:<port> in the guest.
//!
//! The two directions run concurrently and independently: a host that only
//! writes must not stall behind a guest→host send waiting for window credit
//! (and the reverse), so each direction owns its socket half. Each side's
//! EOF is passed on as a half-close; the channel ends when both directions
//! are done, or at once when the client cancels or disconnects.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use bhatti_protocol::mux::{Channel, Inbound};
use bhatti_protocol::{ErrorBody, ErrorCode, Event};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::handlers::{io_error, Reply};
use crate::server::Agent;

const READ_BUF: usize = 64 * 1024;

pub async fn run(agent: &Agent, channel: Channel, port: u16) -> Reply {
    if port == 0 {
        return Err(ErrorBody::new(ErrorCode::BadRequest, "port 0"));
    }
    let _count = agent.activity.forward_guard();
    // Literal addresses: the static agent cannot resolve names (no NSS).
    // IPv4 loopback first; a server bound to `::1` only is reached too.
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            TcpStream::connect(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
                .await
                .map_err(|_| io_error(&format!("connect {addr}"), &e))?
        }
        Err(e) => return Err(io_error(&format!("connect {addr}"), &e)),
    };
    let _ = stream.set_nodelay(true);
    let Channel {
        sender,
        mut receiver,
    } = channel;
    let connected = serde_json::to_vec(&Event::Connected { port }).unwrap_or_default();
    if sender.event(Bytes::from(connected)).is_err() {
        return Err(ErrorBody::new(ErrorCode::Cancelled, "the channel closed"));
    }

    let (mut rd, mut wr) = stream.into_split();
    // Fired when the client cancels or the forward fails; stops both sides.
    let stop = CancellationToken::new();
    // Fired when the guest→host direction has finished.
    let up_done = CancellationToken::new();

    let up = async {
        let _done = up_done.clone().drop_guard();
        let mut buf = BytesMut::with_capacity(READ_BUF);
        loop {
            buf.reserve(READ_BUF);
            let n = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = rd.read_buf(&mut buf) => r,
            };
            match n {
                Ok(0) => {
                    let _ = sender.eof();
                    return Ok(());
                }
                Ok(_) => {
                    agent.activity.touch();
                    let chunk = buf.split().freeze();
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        r = sender.data(chunk) => if r.is_err() {
                            stop.cancel();
                            return Ok(());
                        },
                    }
                }
                Err(e) => {
                    stop.cancel();
                    return Err(io_error(&format!("read from port {port}"), &e));
                }
            }
        }
    };

    let down = async {
        let mut host_eof = false;
        loop {
            let frame = tokio::select! {
                // Both directions done: the forward is complete.
                _ = up_done.cancelled(), if host_eof => return Ok(false),
                _ = stop.cancelled() => return Ok(false),
                f = receiver.recv() => f,
            };
            match frame {
                Some(Inbound::Data(b)) if !host_eof => {
                    agent.activity.touch();
                    let r = tokio::select! {
                        _ = stop.cancelled() => return Ok(false),
                        r = wr.write_all(&b) => r,
                    };
                    if let Err(e) = r {
                        stop.cancel();
                        return Err(io_error(&format!("write to port {port}"), &e));
                    }
                }
                Some(Inbound::Eof) if !host_eof => {
                    host_eof = true;
                    let _ = wr.shutdown().await;
                }
                Some(Inbound::Close(_)) | None => {
                    stop.cancel();
                    return Ok(true);
                }
                // Data after Eof and frames that mean nothing here.
                Some(_) => {}
            }
        }
    };

    let (up, down) = tokio::join!(up, down);
    match (up, down) {
        (Err(e), _) | (_, Err(e)) => Err(e),
        (Ok(()), Ok(true)) => Err(ErrorBody::new(
            ErrorCode::Cancelled,
            "cancelled by the client",
        )),
        (Ok(()), Ok(false)) => Ok(serde_json::json!({})),
    }
}
