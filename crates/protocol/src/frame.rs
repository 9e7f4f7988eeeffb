//! Frame layout and the codec that reads and writes it.
//!
//! ```text
//! +----------------+----------------+--------+-----------------+
//! | length: u32 BE | channel: u32 BE| kind u8| payload (length)|
//! +----------------+----------------+--------+-----------------+
//! ```
//!
//! `length` counts only the payload. A payload larger than
//! [`MAX_PAYLOAD`] is never buffered: the decoder reports it as
//! [`Decoded::Oversized`] and discards its bytes as they arrive, so one bad
//! frame costs its channel an error and the connection keeps working.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 9;
/// Largest payload a peer may send in one frame.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Largest data chunk senders put in one `Data`/`Stderr` frame.
pub const MAX_CHUNK: usize = 64 * 1024;

/// What a frame carries. Unknown values are kept as [`FrameKind::Unknown`]
/// so the receiver can answer them with an error instead of failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Channel 0, client → agent: `Hello` JSON (version, token).
    Hello,
    /// Channel 0, agent → client: `HelloOk` JSON.
    HelloOk,
    /// Client → agent: open a channel; JSON `Request`.
    Open,
    /// Raw bytes: stdin, stdout, file contents, forwarded stream.
    Data,
    /// Raw bytes, agent → client: stderr of a piped exec.
    Stderr,
    /// The sender will send no more `Data` on this channel (half-close).
    Eof,
    /// Flow-control credit: u32 BE count of further bytes the peer may send.
    Window,
    /// Client → agent: JSON `Control` on an open channel (resize, signal).
    Control,
    /// Agent → client: JSON `Event` on an open channel (started, attached…).
    Event,
    /// Ends a channel. Agent → client: JSON `Outcome`, final. Client → agent:
    /// cancel (the agent then answers with its own `Close`).
    Close,
    /// Channel 0 keepalive; the peer answers `Pong` with the same payload.
    Ping,
    /// Answer to `Ping`.
    Pong,
    /// Channel 0: JSON `ErrorBody` about the connection itself.
    Error,
    /// A kind this build does not know.
    Unknown(u8),
}

impl FrameKind {
    pub fn to_u8(self) -> u8 {
        match self {
            FrameKind::Hello => 1,
            FrameKind::HelloOk => 2,
            FrameKind::Open => 3,
            FrameKind::Data => 4,
            FrameKind::Stderr => 5,
            FrameKind::Eof => 6,
            FrameKind::Window => 7,
            FrameKind::Control => 8,
            FrameKind::Event => 9,
            FrameKind::Close => 10,
            FrameKind::Ping => 11,
            FrameKind::Pong => 12,
            FrameKind::Error => 13,
            FrameKind::Unknown(v) => v,
        }
    }

    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => FrameKind::Hello,
            2 => FrameKind::HelloOk,
            3 => FrameKind::Open,
            4 => FrameKind::Data,
            5 => FrameKind::Stderr,
            6 => FrameKind::Eof,
            7 => FrameKind::Window,
            8 => FrameKind::Control,
            9 => FrameKind::Event,
            10 => FrameKind::Close,
            11 => FrameKind::Ping,
            12 => FrameKind::Pong,
            13 => FrameKind::Error,
            other => FrameKind::Unknown(other),
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub channel: u32,
    pub kind: FrameKind,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(channel: u32, kind: FrameKind, payload: impl Into<Bytes>) -> Self {
        Frame {
            channel,
            kind,
            payload: payload.into(),
        }
    }

    pub fn empty(channel: u32, kind: FrameKind) -> Self {
        Frame::new(channel, kind, Bytes::new())
    }
}

/// What the decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Frame(Frame),
    /// A frame whose payload exceeded the limit; its bytes are skipped.
    Oversized {
        channel: u32,
        kind: FrameKind,
        len: u32,
    },
}

/// Errors of the codec itself (I/O only: every byte sequence decodes).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Length-prefixed codec for [`Frame`]s with skip-on-oversize.
#[derive(Debug)]
pub struct FrameCodec {
    max_payload: usize,
    /// Payload bytes of an oversized frame still to discard.
    skipping: u64,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(MAX_PAYLOAD)
    }
}

impl FrameCodec {
    pub fn new(max_payload: usize) -> Self {
        FrameCodec {
            max_payload,
            skipping: 0,
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Decoded;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, CodecError> {
        if self.skipping > 0 {
            let n = (self.skipping as usize).min(src.len());
            src.advance(n);
            self.skipping -= n as u64;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        if src.len() < HEADER_LEN {
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        let channel = u32::from_be_bytes([src[4], src[5], src[6], src[7]]);
        let kind = FrameKind::from_u8(src[8]);
        if len as usize > self.max_payload {
            src.advance(HEADER_LEN);
            let n = (len as usize).min(src.len());
            src.advance(n);
            self.skipping = len as u64 - n as u64;
            return Ok(Some(Decoded::Oversized { channel, kind, len }));
        }
        let total = HEADER_LEN + len as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(len as usize).freeze();
        Ok(Some(Decoded::Frame(Frame {
            channel,
            kind,
            payload,
        })))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_into(&frame, dst, self.max_payload)
    }
}

/// Appends one encoded frame to `dst`.
pub fn encode_into(
    frame: &Frame,
    dst: &mut BytesMut,
    max_payload: usize,
) -> Result<(), CodecError> {
    let len = frame.payload.len();
    if len > max_payload {
        return Err(CodecError::TooLarge(len));
    }
    dst.reserve(HEADER_LEN + len);
    dst.put_u32(len as u32);
    dst.put_u32(frame.channel);
    dst.put_u8(frame.kind.to_u8());
    dst.put_slice(&frame.payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_into(frame, &mut buf, MAX_PAYLOAD).expect("encode");
        buf
    }

    #[test]
    fn round_trip() {
        let f = Frame::new(7, FrameKind::Data, &b"hello"[..]);
        let mut buf = encode(&f);
        let mut codec = FrameCodec::default();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(Decoded::Frame(f)));
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_header_and_payload_wait_for_more() {
        let f = Frame::new(1, FrameKind::Open, &b"{}"[..]);
        let full = encode(&f);
        let mut codec = FrameCodec::default();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(codec.decode(&mut part).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn oversized_frame_is_reported_and_skipped() {
        let mut codec = FrameCodec::new(16);
        let mut buf = BytesMut::new();
        buf.put_u32(40);
        buf.put_u32(3);
        buf.put_u8(4);
        buf.put_slice(&[0u8; 10]); // only part of the oversized payload so far
        assert_eq!(
            codec.decode(&mut buf).unwrap(),
            Some(Decoded::Oversized {
                channel: 3,
                kind: FrameKind::Data,
                len: 40
            })
        );
        let mut rest = BytesMut::from(&[0u8; 30][..]);
        let next = Frame::new(5, FrameKind::Eof, Bytes::new());
        encode_into(&next, &mut rest, 16).unwrap();
        assert_eq!(codec.decode(&mut rest).unwrap(), Some(Decoded::Frame(next)));
    }

    #[test]
    fn unknown_kind_is_preserved() {
        let f = Frame::new(2, FrameKind::Unknown(200), &b"x"[..]);
        let mut buf = encode(&f);
        let got = FrameCodec::default().decode(&mut buf).unwrap();
        assert_eq!(got, Some(Decoded::Frame(f)));
    }

    proptest! {
        // Any byte soup, fed in any split, decodes without panicking and
        // never yields a payload above the limit.
        #[test]
        fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096), split in 0usize..4096) {
            let mut codec = FrameCodec::new(512);
            let split = split.min(data.len());
            let mut buf = BytesMut::from(&data[..split]);
            let mut frames = 0;
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(Decoded::Frame(f))) => { prop_assert!(f.payload.len() <= 512); frames += 1; }
                    Ok(Some(Decoded::Oversized { len, .. })) => { prop_assert!(len as usize > 512); }
                    Ok(None) => break,
                    Err(e) => prop_assert!(false, "decode error {e}"),
                }
                prop_assume!(frames < 10_000);
            }
            buf.extend_from_slice(&data[split..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }

        #[test]
        fn encode_decode_identity(channel in any::<u32>(), kind in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let f = Frame::new(channel, FrameKind::from_u8(kind), payload);
            let mut buf = encode(&f);
            prop_assert_eq!(FrameCodec::default().decode(&mut buf).unwrap(), Some(Decoded::Frame(f)));
        }
    }
}
