//! Hostile and broken frames against the real agent: each gets an error on
//! its channel (or on channel 0), and the agent keeps serving everything else.

mod common;

use std::time::Duration;

use bhatti_protocol::frame::{encode_into, Decoded, Frame, FrameCodec, FrameKind, MAX_PAYLOAD};
use bhatti_protocol::handshake::client_hello;
use bhatti_protocol::{ErrorBody, ErrorCode, Outcome};
use bytes::{BufMut, BytesMut};
use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UnixStream;
use tokio_util::codec::FramedRead;

/// A client that speaks raw frames after a normal handshake.
struct Raw {
    frames: FramedRead<ReadHalf<UnixStream>, FrameCodec>,
    w: WriteHalf<UnixStream>,
}

impl Raw {
    async fn connect(agent: &TestAgent) -> Raw {
        let mut s = agent.raw().await;
        client_hello(&mut s, TOKEN).await.expect("handshake");
        let (r, w) = tokio::io::split(s);
        Raw {
            frames: FramedRead::new(r, FrameCodec::default()),
            w,
        }
    }

    async fn send(&mut self, f: Frame) {
        let mut buf = BytesMut::new();
        encode_into(&f, &mut buf, usize::MAX).unwrap();
        self.w.write_all(&buf).await.unwrap();
    }

    async fn send_bytes(&mut self, b: &[u8]) {
        self.w.write_all(b).await.unwrap();
    }

    /// The next frame of `kind` on `channel`, skipping others.
    async fn expect(&mut self, channel: u32, kind: FrameKind) -> Frame {
        let fut = async {
            loop {
                match self
                    .frames
                    .next()
                    .await
                    .expect("stream open")
                    .expect("decode")
                {
                    Decoded::Frame(f) if f.channel == channel && f.kind == kind => return f,
                    _ => continue,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .unwrap_or_else(|_| panic!("no {kind:?} on channel {channel}"))
    }

    async fn expect_close_error(&mut self, channel: u32) -> ErrorBody {
        let f = self.expect(channel, FrameKind::Close).await;
        match serde_json::from_slice::<Outcome>(&f.payload).expect("outcome json") {
            Outcome::Error(e) => e,
            Outcome::Ok(v) => panic!("expected an error on channel {channel}, got ok {v}"),
        }
    }

    /// A ping on `channel` must still be answered.
    async fn ping_ok(&mut self, channel: u32) {
        self.send(Frame::new(
            channel,
            FrameKind::Open,
            &br#"{"op":"ping"}"#[..],
        ))
        .await;
        let f = self.expect(channel, FrameKind::Close).await;
        assert_eq!(&f.payload[..], br#"{"ok":{}}"#);
    }
}

#[tokio::test]
async fn malformed_requests_get_bad_request() {
    let mut agent = TestAgent::start(&[]);
    let mut raw = Raw::connect(&agent).await;
    let cases: [&[u8]; 6] = [
        b"not json",
        br#"{"op":"no_such_op"}"#,
        br#"{"op":"exec"}"#,
        br#"{"op":"exec","argv":["true"],"surprise":1}"#,
        br#"{"op":"stat","path":42}"#,
        b"",
    ];
    for (i, body) in cases.iter().enumerate() {
        let ch = 10 + i as u32;
        raw.send(Frame::new(ch, FrameKind::Open, body.to_vec()))
            .await;
        let e = raw.expect_close_error(ch).await;
        assert_eq!(e.code, ErrorCode::BadRequest, "case {i}: {e}");
    }
    raw.ping_ok(99).await;
    assert!(agent.alive());
}

#[tokio::test]
async fn oversized_frames_fail_their_channel_only() {
    let mut agent = TestAgent::start(&[]);
    let mut raw = Raw::connect(&agent).await;
    let big = vec![b'x'; MAX_PAYLOAD + 1];
    raw.send(Frame::new(3, FrameKind::Open, big.clone())).await;
    assert_eq!(raw.expect_close_error(3).await.code, ErrorCode::TooLarge);
    // On channel 0 the error is a connection-level notice.
    raw.send(Frame::new(0, FrameKind::Ping, big)).await;
    let f = raw.expect(0, FrameKind::Error).await;
    let e: ErrorBody = serde_json::from_slice(&f.payload).unwrap();
    assert_eq!(e.code, ErrorCode::TooLarge);
    // A header announcing 4 GiB: the agent skips what arrives and goes on
    // serving other channels in the meantime is impossible (the stream is
    // one byte sequence), but it must not allocate or crash.
    let mut hdr = BytesMut::new();
    hdr.put_u32(u32::MAX);
    hdr.put_u32(4);
    hdr.put_u8(4);
    raw.send_bytes(&hdr).await;
    assert_eq!(raw.expect_close_error(4).await.code, ErrorCode::TooLarge);
    assert!(agent.alive());
    // A fresh connection works while the old one is still skipping.
    agent.client().await.ping().await.unwrap();
}

#[tokio::test]
async fn unknown_kinds_and_wrong_directions() {
    let mut agent = TestAgent::start(&[]);
    let mut raw = Raw::connect(&agent).await;
    // Unknown kind on an unopened channel and on channel 0.
    raw.send(Frame::new(7, FrameKind::Unknown(99), &b"?"[..]))
        .await;
    let f = raw.expect(7, FrameKind::Error).await;
    let e: ErrorBody = serde_json::from_slice(&f.payload).unwrap();
    assert_eq!(e.code, ErrorCode::BadRequest);
    raw.send(Frame::new(0, FrameKind::Unknown(200), &b""[..]))
        .await;
    raw.expect(0, FrameKind::Error).await;
    // Stderr and Event are agent → client only: the channel fails.
    raw.send(Frame::new(
        8,
        FrameKind::Open,
        &br#"{"op":"exec","argv":["sleep","30"]}"#[..],
    ))
    .await;
    raw.send(Frame::new(8, FrameKind::Stderr, &b"nope"[..]))
        .await;
    assert_eq!(raw.expect_close_error(8).await.code, ErrorCode::Protocol);
    // A malformed Window frame.
    raw.send(Frame::new(
        9,
        FrameKind::Open,
        &br#"{"op":"exec","argv":["sleep","30"]}"#[..],
    ))
    .await;
    raw.send(Frame::new(9, FrameKind::Window, &b"12345"[..]))
        .await;
    assert_eq!(raw.expect_close_error(9).await.code, ErrorCode::Protocol);
    // Reusing an open channel id is reported on channel 0.
    raw.send(Frame::new(
        11,
        FrameKind::Open,
        &br#"{"op":"exec","argv":["sleep","30"]}"#[..],
    ))
    .await;
    raw.send(Frame::new(11, FrameKind::Open, &br#"{"op":"ping"}"#[..]))
        .await;
    raw.expect(0, FrameKind::Error).await;
    raw.ping_ok(12).await;
    assert!(agent.alive());
}

#[tokio::test]
async fn garbage_after_handshake_does_not_hurt_the_agent() {
    let mut agent = TestAgent::start(&[]);
    let mut raw = Raw::connect(&agent).await;
    // Deterministic pseudo-random bytes (xorshift).
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let junk: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    raw.send_bytes(&junk).await;
    drop(raw);
    assert!(agent.alive());
    let c = agent.client().await;
    c.ping().await.unwrap();
    assert!(agent.alive());
}

#[tokio::test]
async fn channel_limit_is_enforced() {
    let mut agent = TestAgent::start(&[]);
    let c = agent.client().await;
    // 1024 long-running channels fill the connection; the next is refused.
    let mut held = Vec::new();
    for _ in 0..1024 {
        held.push(
            c.open(&bhatti_protocol::Request::Exec(
                bhatti_protocol::ExecRequest {
                    argv: vec!["sleep".into(), "30".into()],
                    stdin: true,
                    ..Default::default()
                },
            ))
            .unwrap(),
        );
    }
    let err = c.ping().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LimitReached), "{err}");
    drop(held);
    // Cancelled channels free their slots.
    eventually("channels to be freed", Duration::from_secs(30), || async {
        c.ping().await.ok()
    })
    .await;
    assert!(agent.alive());
}
