//! Guests' ports over HTTP on real VMs: a Python server (HTTP, a POST,
//! server-sent events, a WebSocket echo) in a sandbox, reached through the
//! authenticated proxy (`/sandboxes/{id}/proxy/8000/…`) and through the
//! public listener by host (`<alias>.<zone>`) and by path (`/<alias>/…`);
//! another user gets 404; the guest never sees the API key. Then the
//! sandbox goes cold by itself, and 20 concurrent public requests wake it
//! once and are all answered; a client over its token bucket gets 429.

mod api_support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use api_support::*;
use bhatti::store::users::UserCaps;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const GUEST_SERVER: &str = include_str!("proxy_support/guest_server.py");
const ZONE: &str = "sb.test";

/// One HTTP/1.1 request to the public listener from source address `from`.
async fn public(
    listen: SocketAddr,
    from: IpAddr,
    method: Method,
    host: &str,
    path: &str,
    body: Bytes,
) -> Response<Incoming> {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::new(from, 0)).expect("bind source");
    let stream = sock.connect(listen).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(body))
        .expect("request");
    sender.send_request(req).await.expect("response")
}

/// A GET to the public listener from 127.0.0.1: status and body.
async fn get(listen: SocketAddr, host: &str, path: &str) -> (StatusCode, String) {
    let lo: IpAddr = [127, 0, 0, 1].into();
    text(public(listen, lo, Method::GET, host, path, Bytes::new()).await).await
}

async fn text(resp: Response<Incoming>) -> (StatusCode, String) {
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Reads a streamed body until it contains `needle`; false when it ended
/// first. The body is left open.
async fn read_until(body: &mut Incoming, seen: &mut String, needle: &str) -> bool {
    while !seen.contains(needle) {
        match tokio::time::timeout(Duration::from_secs(60), body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    seen.push_str(&String::from_utf8_lossy(d));
                }
            }
            Ok(_) => return seen.contains(needle),
            Err(_) => panic!("no data for 60 s; so far: {seen:?}"),
        }
    }
    true
}

async fn thermal(c: &Client, sb: &str) -> String {
    c.get(&format!("/sandboxes/{sb}")).await.expect(200)["thermal"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_publish_wake_and_limits() {
    let Some(art) = artifacts("proxy_publish_wake_and_limits") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cfg = env.config();
    cfg.network.enabled = false;
    cfg.proxy.listen = Some(listen);
    cfg.proxy.zone = ZONE.into();
    cfg.proxy.per_ip_per_second = 10;
    cfg.proxy.per_ip_burst = 25;
    cfg.proxy.max_body_bytes = 4 << 20;
    cfg.thermal.warm_after_secs = 3;
    cfg.thermal.cold_after_secs = 6;
    cfg.thermal.sweep_interval_ms = 200;
    let daemon = Daemon::start(&env, cfg).await;
    let alice = env.client(Some(&env.user("alice", UserCaps::default())));
    let bob = env.client(Some(&env.user("bob", UserCaps::default())));

    let sb = alice
        .post("/sandboxes", json!({"name": "web"}))
        .await
        .expect(201);
    let id = sb["id"].as_str().expect("id").to_owned();
    alice
        .put("/sandboxes/web/files?path=/home/lohar/srv.py", GUEST_SERVER)
        .await
        .expect(200);
    alice
        .post(
            "/sandboxes/web/exec",
            json!({"cmd": ["python3", "/home/lohar/srv.py"], "detach": true}),
        )
        .await
        .expect(200);

    // 1. Ports: the server's 8000 shows up (polled: it takes a moment).
    let ports = eventually("port 8000 listening", Duration::from_secs(120), || {
        let alice = &alice;
        async move {
            let v = alice.get("/sandboxes/web/ports").await.expect(200);
            v["ports"]
                .as_array()
                .is_some_and(|p| p.iter().any(|x| x["port"] == 8000))
                .then_some(v)
        }
    })
    .await;
    let p8000 = ports["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|x| x["port"] == 8000))
        .expect("8000");
    assert!(
        p8000["addresses"].to_string().contains("0.0.0.0"),
        "{ports}"
    );

    // 2. The authenticated proxy: path and query pass, the key does not.
    let r = alice.get("/sandboxes/web/proxy/8000/a/b?x=1").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert!(body.contains("path=/a/b?x=1"), "{body}");
    assert!(body.contains("auth=None"), "the guest saw the key: {body}");
    assert!(body.contains("prefix=/sandboxes/web/proxy/8000"), "{body}");
    let r = alice.get(&format!("/sandboxes/{id}/proxy/8000")).await;
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert!(body.contains("path=/ "), "{body}");
    // A body streams up and is answered.
    let big = Bytes::from(vec![7u8; 3 << 20]);
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&big));
    let r = alice
        .send(Method::POST, "/sandboxes/web/proxy/8000/up", &[], big)
        .await;
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(body, format!("got {} sha256={digest}", 3 << 20));
    // Past the body cap: 413 as soon as the headers say so (a raw request
    // that announces 5 MiB and sends none: the answer cannot race the upload).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::UnixStream::connect(&alice.sock)
            .await
            .expect("connect");
        let key = alice.key.clone().unwrap_or_default();
        raw.write_all(
            format!(
                "POST /sandboxes/web/proxy/8000/up HTTP/1.1\r\nHost: localhost\r\n\
                 Authorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n",
                5 << 20
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        let mut head = vec![0u8; 64];
        let n = raw.read(&mut head).await.expect("read");
        let head = String::from_utf8_lossy(&head[..n]).into_owned();
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    }
    // Nothing on the port: 502 with a reason; a bad port: 400.
    let e = alice
        .get("/sandboxes/web/proxy/8001/")
        .await
        .expect_err(502);
    assert!(e.contains("8001"), "{e}");
    alice.get("/sandboxes/web/proxy/0/").await.expect_err(400);
    alice
        .get("/sandboxes/web/proxy/70000/")
        .await
        .expect_err(400);
    // Another user's sandbox does not exist for them.
    bob.get(&format!("/sandboxes/{id}/proxy/8000/"))
        .await
        .expect_err(404);
    // No key: 401.
    env.client(None)
        .get(&format!("/sandboxes/{id}/proxy/8000/"))
        .await
        .expect_err(401);

    // 3. SSE: the first event arrives while the stream is still open.
    let resp = alice
        .open(
            Method::GET,
            "/sandboxes/web/proxy/8000/sse",
            &[],
            Bytes::new(),
        )
        .await
        .expect("sse");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut seen = String::new();
    assert!(read_until(&mut body, &mut seen, "data: one").await);
    assert!(!body.is_end_stream(), "the stream ended before event two");
    // An open proxied connection is activity: past the warm timer (3 s),
    // the sandbox is still hot.
    let open_since = std::time::Instant::now();
    while open_since.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            thermal(&alice, "web").await,
            "hot",
            "cooled with a stream open"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    alice.sh("web", "touch /tmp/sse-go").await;
    assert!(
        read_until(&mut body, &mut seen, "data: two").await,
        "{seen}"
    );

    // 4. WebSocket through the authenticated proxy.
    let mut ws = alice
        .ws("/sandboxes/web/proxy/8000/ws")
        .await
        .expect("ws upgrade through the proxy");
    ws.send(Message::text("ping-1")).await.expect("send");
    let m = ws.next().await.expect("a reply").expect("frame");
    assert_eq!(m.into_text().expect("text").as_str(), "echo:ping-1");
    let _ = ws.close(None).await;
    drop(ws);

    // 5. Publishing: bad aliases refused, the default alias, conflicts.
    for bad in ["Bad", "-x", "a_b"] {
        alice
            .post(
                "/sandboxes/web/publish",
                json!({"port": 8000, "alias": bad}),
            )
            .await
            .expect_err(400);
    }
    // Well formed, but the daemon's own: taken.
    alice
        .post(
            "/sandboxes/web/publish",
            json!({"port": 8000, "alias": "api"}),
        )
        .await
        .expect_err(409);
    alice
        .post("/sandboxes/web/publish", json!({"port": 0}))
        .await
        .expect_err(400);
    let p = alice
        .post("/sandboxes/web/publish", json!({"port": 8000}))
        .await
        .expect(201);
    assert_eq!(p["alias"], "web-8000");
    assert_eq!(
        p["url"],
        format!("http://web-8000.{ZONE}:{}/", listen.port()),
        "{p}"
    );
    alice
        .post("/sandboxes/web/publish", json!({"port": 8000}))
        .await
        .expect_err(409);
    let list = alice.get("/ports").await.expect(200);
    assert_eq!(
        list["published"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    let listed = alice.get("/sandboxes/web/ports").await.expect(200);
    assert!(
        listed.to_string().contains("\"published\":\"web-8000\""),
        "{listed}"
    );
    assert_eq!(bob.get("/ports").await.expect(200)["published"], json!([]));
    // Bob cannot publish or unpublish Alice's sandbox.
    bob.post(&format!("/sandboxes/{id}/publish"), json!({"port": 8000}))
        .await
        .expect_err(404);
    bob.delete(&format!("/sandboxes/{id}/publish/8000"))
        .await
        .expect_err(404);

    // 6. The public listener, by host and by path, no auth.
    let lo: IpAddr = [127, 0, 0, 1].into();
    let host = format!("web-8000.{ZONE}:{}", listen.port());
    let (st, body) = get(listen, &host, "/by/host?q=2").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains("path=/by/host?q=2"), "{body}");
    assert!(body.contains("prefix=None"), "{body}");
    let (st, body) = get(listen, "127.0.0.1", "/web-8000/by/path").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains("path=/by/path"), "{body}");
    assert!(body.contains("prefix=/web-8000"), "{body}");
    let r = public(
        listen,
        lo,
        Method::GET,
        "127.0.0.1",
        "/web-8000",
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers()["location"], "/web-8000/");
    for path in ["/nope-1/", "/api/", "/"] {
        let (st, body) = get(listen, "127.0.0.1", path).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    let (st, _) = get(listen, &format!("nope.{ZONE}"), "/").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // WebSocket and SSE through the public listener.
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let stream = tokio::net::TcpStream::connect(listen)
            .await
            .expect("connect");
        let req = format!("ws://web-8000.{ZONE}/ws")
            .into_client_request()
            .expect("request");
        let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
            .await
            .expect("public ws upgrade");
        ws.send(Message::text("ping-2")).await.expect("send");
        let m = ws.next().await.expect("a reply").expect("frame");
        assert_eq!(m.into_text().expect("text").as_str(), "echo:ping-2");
        let _ = ws.close(None).await;
    }
    alice.sh("web", "rm -f /tmp/sse-go").await;
    let resp = public(
        listen,
        lo,
        Method::GET,
        "127.0.0.1",
        "/web-8000/sse",
        Bytes::new(),
    )
    .await;
    let mut body = resp.into_body();
    let mut seen = String::new();
    assert!(read_until(&mut body, &mut seen, "data: one").await);
    assert!(!body.is_end_stream());
    alice.sh("web", "touch /tmp/sse-go").await;
    assert!(
        read_until(&mut body, &mut seen, "data: two").await,
        "{seen}"
    );
    drop(body);

    // 7. Idle: the sandbox goes cold by itself; 20 concurrent public
    // requests wake it once and are all answered.
    eventually("the sandbox to go cold", Duration::from_secs(180), || {
        let alice = &alice;
        async move { (thermal(alice, "web").await == "cold").then_some(()) }
    })
    .await;
    let before = alice
        .get(&format!("/events?sandbox={id}&limit=1000"))
        .await
        .expect(200);
    let wakes_before = count_wakes(&before);
    let mut tasks = Vec::new();
    for i in 0..20 {
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            get(listen, &host, &format!("/cold/{i}")).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (st, body) = t.await.expect("task");
        assert_eq!(st, StatusCode::OK, "request {i}: {body}");
        assert!(body.contains(&format!("path=/cold/{i}")), "{body}");
    }
    let after = alice
        .get(&format!("/events?sandbox={id}&limit=1000"))
        .await
        .expect(200);
    assert_eq!(count_wakes(&after), wakes_before + 1, "{after}");

    // 8. Rate limit per client address: past the burst, 429 + Retry-After.
    let other: IpAddr = [127, 0, 0, 2].into();
    let mut ok = 0;
    let mut limited = None;
    for _ in 0..80 {
        let r = public(listen, other, Method::GET, &host, "/kib", Bytes::new()).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(r.headers().get("retry-after").cloned());
            break;
        }
        assert_eq!(r.status(), StatusCode::OK);
        ok += 1;
    }
    let retry = limited.expect("no 429 after 80 requests");
    assert!(retry.is_some(), "429 without Retry-After");
    assert!(ok >= 20, "limited after only {ok} requests");
    // Another client is not affected.
    let (st, _) = get(listen, &host, "/kib").await;
    assert_eq!(st, StatusCode::OK);

    // 9. A rename: the derived alias follows; unpublish: 404 at once.
    alice
        .patch("/sandboxes/web", json!({"name": "site"}))
        .await
        .expect(200);
    let (st, _) = get(listen, "127.0.0.1", "/site-8000/").await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = get(listen, "127.0.0.1", "/web-8000/").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    alice
        .delete("/sandboxes/site/publish/8000")
        .await
        .expect(204);
    alice
        .delete("/sandboxes/site/publish/8000")
        .await
        .expect_err(404);
    let (st, _) = get(listen, "127.0.0.1", "/site-8000/").await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    alice.delete("/sandboxes/site").await.expect(204);
    daemon.stop().await;
}

fn count_wakes(v: &Value) -> usize {
    v["events"]
        .as_array()
        .map(|e| e.iter().filter(|x| x["type"] == "wake").count())
        .unwrap_or(0)
}
