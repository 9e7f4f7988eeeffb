//! Port forwards against the real agent in host test mode, to TCP servers
//! the test runs on 127.0.0.1.

mod common;

use std::time::Duration;

use bhatti_protocol::client::ForwardStream;
use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Echoes every connection until the peer half-closes, then closes.
async fn echo_server() -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (port, task)
}

/// Reads until the guest side's EOF.
async fn read_to_end(f: &mut ForwardStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(b) = tokio::time::timeout(Duration::from_secs(30), f.read())
        .await
        .expect("forward read timed out")
        .unwrap()
    {
        out.extend_from_slice(&b);
    }
    out
}

#[tokio::test]
async fn round_trip_and_activity_count() {
    let (port, server) = echo_server().await;
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;

    let mut f = client.forward(port).await.unwrap();
    assert_eq!(client.activity().await.unwrap().open_forwards, 1);
    f.write(Bytes::from_static(b"hello")).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        got.extend_from_slice(&f.read().await.unwrap().expect("data before EOF"));
    }
    assert_eq!(got, b"hello");
    f.shutdown_write().unwrap();
    assert!(read_to_end(&mut f).await.is_empty());
    drop(f);
    eventually("the forward to end", Duration::from_secs(10), || {
        let c = client.clone();
        async move {
            let a = c.activity().await.ok()?;
            (a.open_forwards == 0).then_some(())
        }
    })
    .await;
    server.abort();
}

#[tokio::test]
async fn half_close_reaches_the_server_which_still_replies() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Reads to EOF first, then answers: only works if the half-close arrives.
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        s.write_all(format!("got {} bytes", buf.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        buf
    });
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;
    let mut f = client.forward(port).await.unwrap();
    let payload = vec![b'x'; 3 << 20];
    f.write(Bytes::from(payload.clone())).await.unwrap();
    f.shutdown_write().unwrap();
    let reply = read_to_end(&mut f).await;
    assert_eq!(reply, format!("got {} bytes", payload.len()).as_bytes());
    assert_eq!(server.await.unwrap(), payload);
}

#[tokio::test]
async fn refused_port_is_an_error() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;
    let err = client.forward(port).await.unwrap_err();
    assert!(err.code().is_some(), "expected an agent error, got {err}");
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(client.activity().await.unwrap().open_forwards, 0);
    client.ping().await.unwrap();
}

#[tokio::test]
async fn two_forwards_at_once() {
    let (port, server) = echo_server().await;
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;
    let run = |seed: u8| {
        let client = client.clone();
        async move {
            let mut f = client.forward(port).await.unwrap();
            let data: Vec<u8> = (0..2 << 20).map(|i: u32| (i as u8) ^ seed).collect();
            // Write concurrently with reading: more than a window each way.
            let sender = f.sender.clone();
            let payload = Bytes::from(data.clone());
            let writer = tokio::spawn(async move {
                sender.data(payload).await.unwrap();
                sender.eof().unwrap();
            });
            let got = read_to_end(&mut f).await;
            writer.await.unwrap();
            assert!(got == data, "echo {seed} differs ({} bytes)", got.len());
        }
    };
    tokio::join!(run(1), run(2));
    server.abort();
}
