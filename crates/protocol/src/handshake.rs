//! The `Hello` exchange that opens every connection, before the mux starts.
//!
//! Frames here are read one at a time with exact reads so that no byte meant
//! for the multiplexer is buffered and lost.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{encode_into, Frame, FrameKind, HEADER_LEN};
use crate::message::{ErrorBody, ErrorCode, Hello, HelloOk, PROTOCOL_VERSION};

/// Largest `Hello`/`HelloOk`/`Error` payload accepted during the handshake.
pub const MAX_HANDSHAKE_PAYLOAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the agent refused the connection: {0}")]
    Refused(ErrorBody),
    #[error("handshake failed: {0}")]
    Protocol(String),
    #[error("handshake I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads exactly one frame, refusing payloads over `max`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Frame, HandshakeError> {
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let channel = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let kind = FrameKind::from_u8(header[8]);
    if len > max {
        return Err(HandshakeError::Protocol(format!(
            "{kind:?} frame of {len} bytes during the handshake (limit {max})"
        )));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Frame::new(channel, kind, payload))
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    encode_into(frame, &mut buf, MAX_HANDSHAKE_PAYLOAD)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    w.write_all(&buf).await?;
    w.flush().await
}

/// Client side: sends `Hello`, returns the agent's `HelloOk`.
pub async fn client_hello<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    token: &str,
) -> Result<HelloOk, HandshakeError> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        token: token.to_owned(),
    };
    let body = serde_json::to_vec(&hello).map_err(|e| HandshakeError::Protocol(e.to_string()))?;
    write_frame(s, &Frame::new(0, FrameKind::Hello, body)).await?;
    let reply = read_frame(s, MAX_HANDSHAKE_PAYLOAD).await?;
    match reply.kind {
        FrameKind::HelloOk => serde_json::from_slice(&reply.payload)
            .map_err(|e| HandshakeError::Protocol(format!("bad HelloOk: {e}"))),
        FrameKind::Error => {
            let body = serde_json::from_slice(&reply.payload).unwrap_or_else(|_| {
                ErrorBody::new(ErrorCode::Unknown, String::from_utf8_lossy(&reply.payload))
            });
            Err(HandshakeError::Refused(body))
        }
        other => Err(HandshakeError::Protocol(format!(
            "expected HelloOk, got {other:?}"
        ))),
    }
}

/// Server side: parses a `Hello` frame's payload and checks its version.
/// The token is returned for the caller to compare in constant time.
pub fn parse_hello(frame_kind: FrameKind, payload: &Bytes) -> Result<Hello, ErrorBody> {
    if frame_kind != FrameKind::Hello {
        return Err(ErrorBody::new(
            ErrorCode::Protocol,
            format!("the first frame must be Hello, not {frame_kind:?}"),
        ));
    }
    let hello: Hello = serde_json::from_slice(payload)
        .map_err(|e| ErrorBody::new(ErrorCode::BadRequest, format!("malformed Hello: {e}")))?;
    if hello.version != PROTOCOL_VERSION {
        return Err(ErrorBody::new(
            ErrorCode::Unsupported,
            format!(
                "protocol version {} is not supported (agent speaks {PROTOCOL_VERSION})",
                hello.version
            ),
        ));
    }
    Ok(hello)
}

/// Server side: answers a handshake.
pub async fn server_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    result: Result<&HelloOk, &ErrorBody>,
) -> std::io::Result<()> {
    let frame = match result {
        Ok(ok) => Frame::new(
            0,
            FrameKind::HelloOk,
            serde_json::to_vec(ok).unwrap_or_default(),
        ),
        Err(e) => Frame::new(
            0,
            FrameKind::Error,
            serde_json::to_vec(e).unwrap_or_default(),
        ),
    };
    write_frame(w, &frame).await
}
