//! The handshake and the multiplexer against the real agent.

mod common;

use bhatti_protocol::frame::{Frame, FrameKind};
use bhatti_protocol::handshake::{client_hello, read_frame, write_frame, HandshakeError};
use bhatti_protocol::ErrorCode;
use common::*;

#[tokio::test]
async fn handshake_accepts_the_token() {
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;
    assert!(client.hello().agent.starts_with("lohar "));
    client.ping().await.expect("ping");
}

#[tokio::test]
async fn wrong_token_is_refused() {
    let agent = TestAgent::start(&[]);
    let mut s = agent.raw().await;
    match client_hello(&mut s, "wrong").await {
        Err(HandshakeError::Refused(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("expected refusal, got {other:?}"),
    }
    // A prefix of the right token is wrong too.
    let mut s = agent.raw().await;
    assert!(client_hello(&mut s, &TOKEN[..5]).await.is_err());
}

#[tokio::test]
async fn first_frame_must_be_hello() {
    let agent = TestAgent::start(&[]);
    let mut s = agent.raw().await;
    write_frame(
        &mut s,
        &Frame::new(1, FrameKind::Open, &b"{\"op\":\"ping\"}"[..]),
    )
    .await
    .unwrap();
    let reply = read_frame(&mut s, 4096).await.unwrap();
    assert_eq!(reply.kind, FrameKind::Error);
}

#[tokio::test]
async fn many_connections_and_reconnect() {
    let agent = TestAgent::start(&[]);
    let a = agent.client().await;
    let b = agent.client().await;
    a.ping().await.unwrap();
    b.ping().await.unwrap();
    a.close();
    drop(a);
    b.ping().await.unwrap();
    // A fresh connection after the old one vanished (as after a restore).
    let c = agent.client().await;
    c.ping().await.unwrap();
}
