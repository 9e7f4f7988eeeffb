//! The HTTP + WebSocket API end to end: a real daemon (in-process
//! `daemon::serve` on a temp unix socket) with real QEMU VMs, and three
//! users. One VM (plus one fork) serves many checks in sequence, since a
//! boot under TCG takes seconds.

mod api_support;

use std::time::{Duration, Instant};

use api_support::*;
use bhatti::store::users::UserCaps;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::UnixStream>;

/// The next text frame as JSON, collecting binary frames into `out`.
async fn next_text(ws: &mut Ws, out: &mut Vec<u8>) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a frame within 60 s")
            .expect("socket open")
            .expect("frame");
        match msg {
            Message::Binary(b) => out.extend_from_slice(&b),
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON text frame"),
            Message::Close(_) => panic!("closed while waiting for a text frame"),
            _ => {}
        }
    }
}

/// Reads binary frames into `out` until `pred(out)`.
async fn read_until(ws: &mut Ws, out: &mut Vec<u8>, pred: impl Fn(&[u8]) -> bool) {
    while !pred(out) {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("output within 60 s")
            .expect("socket open")
            .expect("frame");
        match msg {
            Message::Binary(b) => out.extend_from_slice(&b),
            Message::Text(t) => panic!("unexpected text frame {t}"),
            Message::Close(_) => panic!("closed early"),
            _ => {}
        }
    }
}

fn count_lines(b: &[u8], prefix: &str) -> usize {
    String::from_utf8_lossy(b)
        .lines()
        .filter(|l| l.trim_end_matches('\r').starts_with(prefix))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_end_to_end() {
    let Some(art) = artifacts("api_end_to_end") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    let alice = env.user(
        "alice",
        UserCaps {
            max_sandboxes: Some(2),
            max_cpus: Some(2),
            max_memory_mb: Some(1024),
            ..Default::default()
        },
    );
    let bob = env.user("bob", UserCaps::default());
    let carol = env.user("carol", UserCaps::default());
    let daemon = Daemon::start(&env, env.config()).await;
    let anon = env.client(None);
    let a = env.client(Some(&alice));
    let b = env.client(Some(&bob));

    // --- open routes, auth
    let h = anon.get("/health").await.expect(200);
    assert_eq!(
        (h["status"].as_str(), h["backend"].as_str()),
        (Some("ok"), Some("qemu"))
    );
    let spec = anon.get("/openapi.json").await.expect(200);
    assert!(
        spec["paths"]["/sandboxes/{id}/exec"]["post"].is_object(),
        "{spec}"
    );
    anon.get("/sandboxes").await.expect_err(401);
    env.client(Some("bht_0000000000000000000000000000000000000000000"))
        .get("/sandboxes")
        .await
        .expect_err(401);
    env.client(Some("not-a-key"))
        .get("/snapshots")
        .await
        .expect_err(401);
    a.get("/no/such/route").await.expect_err(404);
    a.send(Method::PUT, "/sandboxes", &[], Bytes::new())
        .await
        .expect_err(405);

    // --- create: validation and caps, before any VM
    for (body, what) in [
        (json!({"name": "Bad_Name"}), "name"),
        (json!({"nmae": "x"}), "nmae"),
        (json!({"cpus": 3}), "cpus"),
        (json!({"memory_mb": 2048}), "memory_mb"),
        (json!({"secrets": ["NOPE"]}), "NOPE"),
        (json!({"env": {"1BAD": "x"}}), "env"),
    ] {
        let e = a.post("/sandboxes", body.clone()).await.expect_err(400);
        assert!(e.contains(what), "{body} → {e}");
    }
    let e = a
        .send(Method::POST, "/sandboxes", &[], Bytes::from("{not json"))
        .await
        .expect_err(400);
    assert!(e.contains("JSON"), "{e}");
    // Over the limit (a create's is 3 MiB: 1 MiB plus room for files): 413
    // from the headers alone (the body is never sent).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(env.sock())
            .await
            .expect("connect");
        let req = format!(
            "POST /sandboxes HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {alice}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            4 << 20
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await.expect("read");
        let head = String::from_utf8_lossy(&head[..n]).into_owned();
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    }
    assert!(a.get("/sandboxes").await.expect(200)["sandboxes"]
        .as_array()
        .is_some_and(|v| v.is_empty()));

    // --- secrets
    a.send(
        Method::PUT,
        "/secrets/API_TOKEN",
        &[],
        Bytes::from(json!({"value": "s3cret"}).to_string()),
    )
    .await
    .expect(204);
    a.send(
        Method::PUT,
        "/secrets/bad-name",
        &[],
        Bytes::from(json!({"value": "x"}).to_string()),
    )
    .await
    .expect_err(400);
    let s = a.get("/secrets").await.expect(200);
    assert_eq!(s["secrets"][0]["name"], "API_TOKEN");
    assert!(!s.to_string().contains("s3cret"));
    assert_eq!(b.get("/secrets").await.expect(200)["secrets"], json!([]));
    b.delete("/secrets/API_TOKEN").await.expect_err(404);

    // --- create a sandbox
    let t = Instant::now();
    let dev = a
        .post(
            "/sandboxes",
            json!({"name": "dev", "env": {"FOO": "bar"}, "secrets": ["API_TOKEN"],
                   "labels": {"team": "a"}, "memory_mb": 512}),
        )
        .await
        .expect(201);
    eprintln!("create → 201 in {:?}", t.elapsed());
    let dev_id = dev["id"].as_str().expect("id").to_owned();
    assert_eq!(
        (dev["status"].as_str(), dev["thermal"].as_str()),
        (Some("running"), Some("hot"))
    );
    assert_eq!(dev["labels"]["team"], "a");
    let dev_ip = dev["ip"].as_str().expect("ip").to_owned();
    let again = a
        .post("/sandboxes", json!({"name": "dev"}))
        .await
        .expect(200);
    assert_eq!(again["id"], dev_id.as_str());
    assert_eq!(
        a.get(&format!("/sandboxes/{dev_id}")).await.expect(200)["name"],
        "dev"
    );

    // --- another user sees nothing of it
    for path in ["/sandboxes/dev".to_string(), format!("/sandboxes/{dev_id}")] {
        b.get(&path).await.expect_err(404);
        b.post(&format!("{path}/exec"), json!({"cmd": ["true"]}))
            .await
            .expect_err(404);
        b.get(&format!("{path}/files?path=/etc/hostname"))
            .await
            .expect_err(404);
        b.post(&format!("{path}/stop"), json!({}))
            .await
            .expect_err(404);
        b.post(&format!("{path}/checkpoint"), json!({"name": "x"}))
            .await
            .expect_err(404);
        b.patch(&path, json!({"keep_hot": true}))
            .await
            .expect_err(404);
        b.delete(&path).await.expect_err(404);
        b.ws(&format!("{path}/ws"))
            .await
            .expect_err("no shell into another's sandbox");
    }
    assert_eq!(
        b.get("/sandboxes").await.expect(200)["sandboxes"],
        json!([])
    );

    // --- exec, buffered
    let v = a
        .post(
            "/sandboxes/dev/exec",
            json!({"cmd": ["sh", "-c", "echo $FOO $API_TOKEN; hostname; echo err >&2; exit 3"]}),
        )
        .await
        .expect(200);
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["stdout"], "bar s3cret\ndev\n");
    assert_eq!(v["stderr"], "err\n");
    let v = a
        .post(
            "/sandboxes/dev/exec",
            json!({"cmd": ["cat"], "stdin": "hello"}),
        )
        .await
        .expect(200);
    assert_eq!(v["stdout"], "hello");
    let v = a
        .post(
            "/sandboxes/dev/exec",
            json!({"cmd": ["pwd"], "cwd": "/tmp", "env": {"X": "1"}}),
        )
        .await
        .expect(200);
    assert_eq!(v["stdout"], "/tmp\n");
    let t = Instant::now();
    let v = a
        .post(
            "/sandboxes/dev/exec",
            json!({"cmd": ["sleep", "30"], "timeout_sec": 1}),
        )
        .await
        .expect(200);
    assert_eq!(v["timed_out"], true, "{v}");
    assert!(t.elapsed() < Duration::from_secs(20));
    let v = a
        .post(
            "/sandboxes/dev/exec",
            json!({"cmd": ["sh", "-c", "sleep 0.2; echo done > /tmp/detached"], "detach": true}),
        )
        .await
        .expect(200);
    assert!(v["pid"].as_u64().is_some_and(|p| p > 0), "{v}");
    eventually("the detached command", Duration::from_secs(30), || async {
        let (_, out, _) = a.sh("dev", "cat /tmp/detached 2>/dev/null").await;
        (out == "done\n").then_some(())
    })
    .await;
    for body in [
        json!({"cmd": []}),
        json!({"cmd": ["ls"], "cwd": "rel"}),
        json!({"cmd": "ls"}),
        json!({"cmd": ["ls"], "timeout_sec": 0}),
    ] {
        a.post("/sandboxes/dev/exec", body).await.expect_err(400);
    }

    // --- exec, NDJSON: output arrives as it happens
    let resp = a
        .open(
            Method::POST,
            "/sandboxes/dev/exec",
            &[("accept", "application/x-ndjson")],
            Bytes::from(
                json!({"cmd": ["sh", "-c", "echo a; sleep 2; echo b >&2; echo c"]}).to_string(),
            ),
        )
        .await
        .expect("ndjson");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let started = Instant::now();
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut events: Vec<(Duration, Value)> = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.expect("frame").data_ref() {
            buf.extend_from_slice(d);
        }
        while let Some(nl) = buf.iter().position(|&c| c == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            events.push((
                started.elapsed(),
                serde_json::from_slice(&line).expect("NDJSON line"),
            ));
        }
    }
    let at = |pred: &dyn Fn(&Value) -> bool| {
        events
            .iter()
            .find(|(_, v)| pred(v))
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("{events:?}"))
    };
    let t_a = at(&|v| v["type"] == "stdout" && v["data"] == "a\n");
    let t_b = at(&|v| v["type"] == "stderr" && v["data"] == "b\n");
    let t_exit = at(&|v| v["type"] == "exit" && v["exit_code"] == 0);
    assert!(
        t_exit >= t_a + Duration::from_millis(1500),
        "a at {t_a:?}, exit at {t_exit:?}"
    );
    assert!(t_b > t_a);
    assert_eq!(
        events.last().map(|e| e.1["type"].clone()),
        Some(json!("exit"))
    );

    // --- exec, NDJSON: a client that goes away kills the command
    let resp = a
        .open(
            Method::POST,
            "/sandboxes/dev/exec",
            &[("accept", "application/x-ndjson")],
            Bytes::from(
                json!({"cmd": ["sh", "-c", "echo $$ > /tmp/nd.pid; echo started; exec sleep 300"]})
                    .to_string(),
            ),
        )
        .await
        .expect("ndjson");
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("started") {
        let f = body.frame().await.expect("a frame").expect("frame");
        if let Some(d) = f.data_ref() {
            seen.extend_from_slice(d);
        }
    }
    drop(body);
    eventually(
        "the command of a dropped stream to die",
        Duration::from_secs(30),
        || async {
            let (_, out, _) = a
                .sh(
                    "dev",
                    "kill -0 $(cat /tmp/nd.pid) 2>/dev/null && echo alive || echo dead",
                )
                .await;
            (out == "dead\n").then_some(())
        },
    )
    .await;

    // --- exec, buffered: a client that goes away kills the command too
    {
        use tokio::io::AsyncWriteExt;
        let body =
            json!({"cmd": ["sh", "-c", "echo $$ > /tmp/bf.pid; exec sleep 300"]}).to_string();
        let mut raw = tokio::net::UnixStream::connect(env.sock())
            .await
            .expect("connect");
        let req = format!(
            "POST /sandboxes/dev/exec HTTP/1.1\r\nhost: bhatti\r\nauthorization: Bearer {alice}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        raw.write_all(req.as_bytes()).await.expect("request");
        eventually(
            "the buffered command to start",
            Duration::from_secs(30),
            || async {
                let (_, out, _) = a
                    .sh("dev", "test -s /tmp/bf.pid && echo yes || echo no")
                    .await;
                (out == "yes\n").then_some(())
            },
        )
        .await;
        drop(raw);
        eventually(
            "the command of a dropped buffered exec to die",
            Duration::from_secs(30),
            || async {
                let (_, out, _) = a
                    .sh(
                        "dev",
                        "kill -0 $(cat /tmp/bf.pid) 2>/dev/null && echo alive || echo dead",
                    )
                    .await;
                (out == "dead\n").then_some(())
            },
        )
        .await;
    }

    // --- files
    let r = a
        .put(
            "/sandboxes/dev/files?path=/home/lohar/dir/a.txt",
            "l1\nl2\nl3\n",
        )
        .await
        .expect(200);
    assert_eq!(r["bytes"], 9);
    let r = a
        .get("/sandboxes/dev/files?path=/home/lohar/dir/a.txt")
        .await;
    r.expect(200);
    assert_eq!(&r.body[..], b"l1\nl2\nl3\n");
    assert_eq!(
        (r.header("x-file-size"), r.header("x-truncated")),
        (Some("9".into()), Some("false".into()))
    );
    let r = a
        .get("/sandboxes/dev/files?path=/home/lohar/dir/a.txt&offset=1&limit=1")
        .await;
    r.expect(200);
    assert_eq!(&r.body[..], b"l2\n");
    assert_eq!(r.header("x-truncated").as_deref(), Some("true"));
    let r = a
        .get("/sandboxes/dev/files?path=/home/lohar/dir/a.txt&max_bytes=4")
        .await;
    r.expect(200);
    assert_eq!(&r.body[..], b"l1\nl");
    assert_eq!(
        (r.header("x-file-size"), r.header("x-truncated")),
        (Some("9".into()), Some("true".into()))
    );
    let r = a
        .send(
            Method::HEAD,
            "/sandboxes/dev/files?path=/home/lohar/dir/a.txt",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (
            r.header("x-file-size"),
            r.header("x-file-kind"),
            r.header("x-file-mode")
        ),
        (Some("9".into()), Some("file".into()), Some("0644".into()))
    );
    let r = a
        .send(
            Method::HEAD,
            "/sandboxes/dev/files?path=/nope",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 404);
    a.get("/sandboxes/dev/files?path=/nope")
        .await
        .expect_err(404);
    a.get("/sandboxes/dev/files?path=rel").await.expect_err(400);
    a.get("/sandboxes/dev/files?path=/a/../etc")
        .await
        .expect_err(400);
    a.get("/sandboxes/dev/files").await.expect_err(400);
    a.get("/sandboxes/dev/files?path=/etc&bogus=1")
        .await
        .expect_err(400);
    // A component over NAME_MAX: refused here, not by the guest (a 502).
    a.get(&format!(
        "/sandboxes/dev/files?path=/tmp/{}",
        "n".repeat(256)
    ))
    .await
    .expect_err(400);
    // Well formed, but the path's kind does not fit: 409.
    a.get("/sandboxes/dev/files?path=/etc")
        .await
        .expect_err(409);
    a.get("/sandboxes/dev/files?path=/etc/hostname&ls=true")
        .await
        .expect_err(409);
    let ls = a
        .get("/sandboxes/dev/files?path=/home/lohar/dir&ls=true")
        .await
        .expect(200);
    let e = &ls["entries"][0];
    assert_eq!(
        (e["name"].as_str(), e["kind"].as_str(), e["size"].as_u64()),
        (Some("a.txt"), Some("file"), Some(9))
    );
    assert_eq!(e["uid"], 1000);
    a.put(
        "/sandboxes/dev/files?path=/home/lohar/run.sh&mode=0755",
        "#!/bin/sh\necho ran\n",
    )
    .await
    .expect(200);
    assert_eq!(
        a.sh(
            "dev",
            "/home/lohar/run.sh; stat -c %U /home/lohar/dir/a.txt"
        )
        .await
        .1,
        "ran\nlohar\n"
    );
    for mode in ["999", "+644", "00644", ""] {
        a.put(
            &format!("/sandboxes/dev/files?path=/tmp/x&mode={mode}"),
            "x",
        )
        .await
        .expect_err(400);
    }
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    a.put("/sandboxes/dev/files?path=/tmp/big.bin", big.clone())
        .await
        .expect(200);
    let r = a.get("/sandboxes/dev/files?path=/tmp/big.bin").await;
    assert_eq!(r.status, 200);
    assert!(r.body[..] == big[..], "the 3 MiB file came back different");

    // --- shell over WebSocket: detach, abrupt close, reattach; no byte lost or repeated
    let script = "i=0; while [ $i -lt 300 ]; do echo n$i; i=$((i+1)); sleep 0.01; done; sleep 600";
    let cmd = pct(&json!(["sh", "-c", script]).to_string());
    let mut ws = a
        .ws(&format!("/sandboxes/dev/ws?cmd={cmd}"))
        .await
        .expect("ws");
    let mut all = Vec::new();
    let first = next_text(&mut ws, &mut all).await;
    assert_eq!(first["type"], "session", "{first}");
    let session = first["id"].as_str().expect("session id").to_owned();
    let start = first["offset"].as_u64().expect("offset");
    read_until(&mut ws, &mut all, |b| count_lines(b, "n") >= 20).await;
    drop(ws); // abrupt: no detach message
    let seen1 = start + all.len() as u64;
    let mut ws = a
        .ws(&format!(
            "/sandboxes/dev/ws?session={session}&offset={seen1}"
        ))
        .await
        .expect("reattach");
    let mut part = Vec::new();
    let f = next_text(&mut ws, &mut part).await;
    assert_eq!(
        (f["type"].as_str(), f["offset"].as_u64()),
        (Some("session"), Some(seen1)),
        "{f}"
    );
    assert!(f["gap"].is_null(), "{f}");
    read_until(&mut ws, &mut part, |b| count_lines(b, "n") >= 40).await;
    ws.send(Message::Text(json!({"type": "detach"}).to_string().into()))
        .await
        .expect("send");
    let end = next_text(&mut ws, &mut part).await;
    assert_eq!(end["type"], "detached", "{end}");
    let seen2 = end["offset"].as_u64().expect("offset");
    assert_eq!(
        seen2,
        seen1 + part.len() as u64,
        "bytes delivered match the offsets"
    );
    all.extend_from_slice(&part);
    let sessions = a.get("/sandboxes/dev/sessions").await.expect(200);
    assert!(
        sessions["sessions"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x["id"] == session.as_str())),
        "{sessions}"
    );
    let mut ws = a
        .ws(&format!(
            "/sandboxes/dev/ws?session={session}&offset={seen2}"
        ))
        .await
        .expect("reattach 2");
    let mut part = Vec::new();
    let f = next_text(&mut ws, &mut part).await;
    assert_eq!(f["offset"].as_u64(), Some(seen2));
    read_until(&mut ws, &mut part, |b| {
        String::from_utf8_lossy(b).contains("n299\r\n")
    })
    .await;
    all.extend_from_slice(&part);
    drop(ws);
    let text = String::from_utf8_lossy(&all).replace("\r\n", "\n");
    let expected: String = (0..300).map(|i| format!("n{i}\n")).collect();
    assert_eq!(
        text, expected,
        "the session's output, across three attachments"
    );

    // An interactive login shell: input, resize, exit.
    let mut ws = a
        .ws("/sandboxes/dev/ws?rows=30&cols=90")
        .await
        .expect("shell");
    let mut out = Vec::new();
    assert_eq!(next_text(&mut ws, &mut out).await["type"], "session");
    ws.send(Message::Binary(Bytes::from("echo hi-$((1+2))\n")))
        .await
        .expect("send");
    read_until(&mut ws, &mut out, |b| {
        String::from_utf8_lossy(b).contains("hi-3")
    })
    .await;
    ws.send(Message::Text(
        json!({"type": "resize", "rows": 40, "cols": 100})
            .to_string()
            .into(),
    ))
    .await
    .expect("resize");
    ws.send(Message::Binary(Bytes::from("stty size\n")))
        .await
        .expect("send");
    read_until(&mut ws, &mut out, |b| {
        String::from_utf8_lossy(b).contains("40 100")
    })
    .await;
    ws.send(Message::Binary(Bytes::from("exit 7\n")))
        .await
        .expect("send");
    let end = next_text(&mut ws, &mut out).await;
    assert_eq!(
        (end["type"].as_str(), end["exit_code"].as_i64()),
        (Some("exit"), Some(7)),
        "{end}"
    );
    a.ws("/sandboxes/dev/ws?session=nope")
        .await
        .expect_err("no such session");
    a.ws("/sandboxes/dev/ws?cmd=notjson")
        .await
        .expect_err("bad cmd");

    // --- stop / start, and wake on request
    a.sh(
        "dev",
        "echo persisted > /home/lohar/p.txt; sleep 1000 >/dev/null 2>&1 &",
    )
    .await;
    let v = a.post("/sandboxes/dev/stop", json!({})).await.expect(200);
    assert_eq!(
        (v["status"].as_str(), v["thermal"].as_str()),
        (Some("stopped"), Some("cold"))
    );
    for _ in 0..3 {
        let v = a.get("/sandboxes/dev").await.expect(200);
        assert_eq!(
            (v["status"].as_str(), v["thermal"].as_str()),
            (Some("stopped"), Some("cold")),
            "get never wakes"
        );
    }
    assert_eq!(
        a.get("/sandboxes").await.expect(200)["sandboxes"][0]["status"],
        "stopped"
    );
    let t = Instant::now();
    let (code, out, _) = a
        .sh(
            "dev",
            "cat /home/lohar/p.txt; pgrep -x sleep >/dev/null && echo proc",
        )
        .await;
    eprintln!("exec on a stopped sandbox (restore) in {:?}", t.elapsed());
    assert_eq!(
        (code, out.as_str()),
        (0, "persisted\nproc\n"),
        "woken with its processes"
    );
    let v = a.get("/sandboxes/dev").await.expect(200);
    assert_eq!(
        (v["status"].as_str(), v["thermal"].as_str()),
        (Some("running"), Some("hot"))
    );
    // The wake went through the thermal manager: logged with its latency,
    // and visible only to the owner.
    assert_eq!(v["thermal_info"]["state"], "hot", "{v}");
    let ev = a.get("/events?sandbox=dev").await.expect(200);
    let wakes: Vec<_> = ev["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "wake" && e["sandbox_id"] == v["id"])
        .collect();
    assert_eq!(wakes.len(), 1, "one wake logged: {ev}");
    assert!(wakes[0]["latency_ms"].as_f64().unwrap_or(-1.0) > 0.0);
    b.get("/events?sandbox=dev").await.expect_err(404);
    let theirs = b.get("/events").await.expect(200);
    assert!(
        theirs["events"]
            .as_array()
            .expect("events")
            .iter()
            .all(|e| e["sandbox_id"] != v["id"]),
        "another user's events stay hidden"
    );
    a.post("/sandboxes/dev/stop", json!({})).await.expect(200);
    let v = a.post("/sandboxes/dev/start", json!({})).await.expect(200);
    assert_eq!(v["status"], "running");
    a.post("/sandboxes/dev/start", json!({"fresh": true}))
        .await
        .expect_err(409);
    a.post("/sandboxes/dev/start", json!({"bogus": true}))
        .await
        .expect_err(400);
    a.post("/sandboxes/dev/stop", json!({})).await.expect(200);
    let v = a
        .post("/sandboxes/dev/start", json!({"fresh": true}))
        .await
        .expect(200);
    assert_eq!(v["status"], "running");
    let (_, out, _) = a
        .sh(
            "dev",
            "cat /home/lohar/p.txt; pgrep -x sleep >/dev/null && echo proc || echo noproc",
        )
        .await;
    assert_eq!(
        out, "persisted\nnoproc\n",
        "a fresh start boots from the disk"
    );

    // --- checkpoint and fork
    a.sh("dev", "echo from-dev > /home/lohar/cp.txt").await;
    let cp = a
        .post("/sandboxes/dev/checkpoint", json!({"name": "cp1"}))
        .await
        .expect(201);
    assert_eq!(
        (cp["name"].as_str(), cp["sandbox_id"].as_str()),
        (Some("cp1"), Some(dev_id.as_str()))
    );
    assert!(cp["size_bytes"].as_u64().is_some_and(|s| s > 0));
    a.post("/sandboxes/dev/checkpoint", json!({"name": "cp1"}))
        .await
        .expect_err(409);
    a.post("/sandboxes/dev/checkpoint", json!({"name": "Bad Name"}))
        .await
        .expect_err(400);
    a.post("/sandboxes/dev/checkpoint", json!({}))
        .await
        .expect_err(400);
    assert_eq!(
        a.get("/snapshots").await.expect(200)["snapshots"][0]["name"],
        "cp1"
    );
    assert_eq!(
        b.get("/snapshots").await.expect(200)["snapshots"],
        json!([])
    );
    b.post("/snapshots/cp1/resume", json!({"name": "mine"}))
        .await
        .expect_err(404);
    b.delete("/snapshots/cp1").await.expect_err(404);
    assert_eq!(
        a.sh("dev", "hostname").await.1,
        "dev\n",
        "the source keeps running"
    );
    let t = Instant::now();
    let fork = a
        .post(
            "/snapshots/cp1/resume",
            json!({"name": "fork", "labels": {"k": "v"}}),
        )
        .await
        .expect(201);
    eprintln!("resume from a checkpoint in {:?}", t.elapsed());
    let fork_id = fork["id"].as_str().expect("id").to_owned();
    assert_ne!(fork_id, dev_id);
    assert_eq!(
        (fork["status"].as_str(), fork["labels"]["k"].as_str()),
        (Some("running"), Some("v"))
    );
    let fork_ip = fork["ip"].as_str().expect("ip").to_owned();
    assert_ne!(fork_ip, dev_ip);
    let (_, out, _) = a
        .sh("fork", "cat /home/lohar/cp.txt; hostname; cat /etc/hostname; ip -4 -o addr show eth0 | awk '{print $4}'; echo \"m=$(cat /etc/machine-id)\"")
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], ["from-dev", "fork", "fork"], "{out}");
    assert!(lines[3].starts_with(&format!("{fork_ip}/")), "{out}");
    let (_, dev_out, _) = a
        .sh("dev", "hostname; ip -4 -o addr show eth0 | awk '{print $4}'; echo \"m=$(cat /etc/machine-id 2>/dev/null)\"")
        .await;
    let dev_lines: Vec<&str> = dev_out.lines().collect();
    assert_eq!(dev_lines[0], "dev");
    assert!(dev_lines[1].starts_with(&format!("{dev_ip}/")), "{dev_out}");
    assert_eq!(lines[4].len(), 34, "a fresh machine id: {out}");
    // The origin made its own at first boot (the rootfs ships none).
    assert_eq!(dev_lines[2].len(), 34, "dev has a machine id: {dev_out}");
    assert!(
        dev_lines[2][2..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{dev_out}"
    );
    assert_ne!(dev_lines[2], lines[4], "machine ids differ");
    a.sh("fork", "echo only-fork > /home/lohar/f.txt").await;
    assert_eq!(
        a.sh("dev", "cat /home/lohar/f.txt 2>/dev/null || echo absent")
            .await
            .1,
        "absent\n"
    );
    // Two sandboxes: the cap of two is reached.
    let e = a
        .post("/sandboxes", json!({"name": "third"}))
        .await
        .expect_err(429);
    assert!(e.contains("at most 2"), "{e}");
    a.post("/snapshots/cp1/resume", json!({"name": "fourth"}))
        .await
        .expect_err(429);
    a.post(
        "/sandboxes",
        json!({"name": "x", "from_snapshot": "cp1", "cpus": 1}),
    )
    .await
    .expect_err(400);
    a.delete("/sandboxes/fork").await.expect(204);
    a.get(&format!("/sandboxes/{fork_id}"))
        .await
        .expect_err(404);
    let f2 = a
        .post(
            "/sandboxes",
            json!({"name": "fork2", "from_snapshot": "cp1"}),
        )
        .await
        .expect(201);
    assert_eq!(
        a.sh("fork2", "cat /home/lohar/cp.txt; hostname").await.1,
        "from-dev\nfork2\n"
    );
    assert_ne!(f2["id"], fork_id.as_str());
    a.delete("/sandboxes/fork2").await.expect(204);
    a.post("/sandboxes", json!({"name": "y", "from_snapshot": "nope"}))
        .await
        .expect_err(404);
    a.delete("/snapshots/cp1").await.expect(204);
    a.delete("/snapshots/cp1").await.expect_err(404);
    a.post("/snapshots/cp1/resume", json!({}))
        .await
        .expect_err(404);

    // --- patch
    let v = a
        .patch(
            "/sandboxes/dev",
            json!({"keep_hot": true, "labels": {"x": "y"}}),
        )
        .await
        .expect(200);
    assert_eq!(
        (v["keep_hot"].as_bool(), v["labels"].clone()),
        (Some(true), json!({"x": "y"}))
    );
    a.patch("/sandboxes/dev", json!({"cpus": 2}))
        .await
        .expect_err(400);
    a.patch("/sandboxes/dev", json!({"labels": {"-bad": "x"}}))
        .await
        .expect_err(400);

    // --- rate limits: 429 with Retry-After, per user
    let c = env.client(Some(&carol));
    let mut limited = None;
    for _ in 0..1000 {
        let r = c.get("/sandboxes").await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        r.expect(200);
    }
    let r = limited.expect("a 429 within 1000 requests");
    assert!(r
        .header("retry-after")
        .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)));
    assert!(r.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("rate")));
    a.get("/sandboxes").await.expect(200);

    // --- delete
    a.delete("/sandboxes/dev").await.expect(204);
    a.get("/sandboxes/dev").await.expect_err(404);
    a.delete("/sandboxes/dev").await.expect_err(404);
    assert_eq!(
        a.get("/sandboxes").await.expect(200)["sandboxes"],
        json!([])
    );
    daemon.stop().await;
}
