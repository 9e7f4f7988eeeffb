//! envd's `process.Process` service under `/e2b` against a real daemon and
//! one real VM, over HTTP with the Connect protocol's JSON codec, as the
//! E2B SDKs speak it: a command's start, output and exit code; a non-zero
//! exit; the sandbox's env and the request's; a background command that
//! outlives its stream, listed, re-attached with `Connect`, fed with
//! `SendInput`, ended with `CloseStdin`; `SendSignal` and `not_found`
//! afterwards; a PTY with input and a resize; errors.
//!
//! Needs the VM artifacts (as the `api_*` tests); skips without them.

mod api_support;

use std::time::Duration;

use api_support::*;
use bhatti::store::users::UserCaps;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Method;
use serde_json::{json, Value};
use sha2::Digest;

const WAIT: Duration = Duration::from_secs(60);

struct Envd {
    client: Client,
    sandbox: String,
    token: String,
}

/// A server stream being read.
struct Events {
    body: Incoming,
    buf: BytesMut,
}

impl Events {
    /// The next envelope `(flags, message)`; `None` when the body ended.
    async fn next(&mut self) -> Option<(u8, Value)> {
        let fut = async {
            loop {
                if self.buf.len() >= 5 {
                    let len =
                        u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                            as usize;
                    if self.buf.len() >= 5 + len {
                        let flags = self.buf[0];
                        self.buf.advance(5);
                        let msg = self.buf.split_to(len);
                        let v = serde_json::from_slice(&msg).expect("a JSON message");
                        return Some((flags, v));
                    }
                }
                match self.body.frame().await {
                    Some(Ok(f)) => {
                        if let Ok(d) = f.into_data() {
                            self.buf.extend_from_slice(&d);
                        }
                    }
                    Some(Err(e)) => panic!("reading the stream: {e}"),
                    None => return None,
                }
            }
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .expect("an event in time")
    }

    /// The next event (skipping keepalives); panics at the stream's end.
    async fn event(&mut self) -> Value {
        loop {
            let (flags, v) = self.next().await.expect("an event");
            assert_eq!(flags & 2, 0, "the stream ended: {v}");
            if v["event"].get("keepalive").is_none() {
                return v["event"].clone();
            }
        }
    }

    /// Output (stdout, stderr, pty) until the end event, and the end.
    async fn until_end(&mut self) -> (String, String, String, Value) {
        let (mut out, mut err, mut pty) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let e = self.event().await;
            if let Some(end) = e.get("end") {
                let (flags, tail) = self.next().await.expect("the end of the stream");
                assert_eq!((flags, tail), (2, json!({})));
                let s = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
                return (s(out), s(err), s(pty), end.clone());
            }
            let d = &e["data"];
            for (k, v) in [
                ("stdout", &mut out),
                ("stderr", &mut err),
                ("pty", &mut pty),
            ] {
                if let Some(b) = d.get(k) {
                    v.extend(unb64(b.as_str().expect("base64")));
                }
            }
        }
    }

    /// Output until it contains `want`.
    async fn until_output(&mut self, want: &str) -> String {
        let mut all = Vec::new();
        loop {
            let e = self.event().await;
            assert!(e.get("end").is_none(), "ended before {want:?}: {e}");
            for k in ["stdout", "stderr", "pty"] {
                if let Some(b) = e["data"].get(k) {
                    all.extend(unb64(b.as_str().expect("base64")));
                }
            }
            let s = String::from_utf8_lossy(&all).into_owned();
            if s.contains(want) {
                return s;
            }
        }
    }
}

impl Envd {
    fn headers(&self) -> Vec<(&str, &str)> {
        vec![
            ("e2b-sandbox-id", self.sandbox.as_str()),
            ("x-access-token", self.token.as_str()),
        ]
    }

    async fn unary(&self, method: &str, body: Value) -> Resp {
        let mut h = self.headers();
        h.push(("content-type", "application/json"));
        self.client
            .send(
                Method::POST,
                &format!("/e2b/process.Process/{method}"),
                &h,
                Bytes::from(body.to_string()),
            )
            .await
    }

    async fn stream(&self, method: &str, body: Value) -> Events {
        self.stream_with(method, body, &[]).await
    }

    async fn stream_with(&self, method: &str, body: Value, extra: &[(&str, &str)]) -> Events {
        let mut h = self.headers();
        h.extend_from_slice(extra);
        h.push(("content-type", "application/connect+json"));
        h.push(("keepalive-ping-interval", "1"));
        let msg = body.to_string();
        let mut env = vec![0u8];
        env.extend((msg.len() as u32).to_be_bytes());
        env.extend(msg.as_bytes());
        let resp = self
            .client
            .open(
                Method::POST,
                &format!("/e2b/process.Process/{method}"),
                &h,
                Bytes::from(env),
            )
            .await
            .expect("stream request");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().ok(),
            Some("application/connect+json")
        );
        Events {
            body: resp.into_body(),
            buf: BytesMut::new(),
        }
    }

    async fn start(&self, body: Value) -> (u32, Events) {
        let mut ev = self.stream("Start", body).await;
        let start = ev.event().await;
        let pid = start["start"]["pid"].as_u64().expect("a pid") as u32;
        assert!(pid > 1, "{start}");
        (pid, ev)
    }

    async fn list(&self) -> Vec<Value> {
        let r = self.unary("List", json!({})).await.expect(200);
        r["processes"].as_array().cloned().unwrap_or_default()
    }
}

fn b64(s: &str) -> String {
    bhatti::api_types::base64(s.as_bytes())
}

fn unb64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    } as u32;
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    for c in s.chunks(4) {
        let mut n = 0;
        for (i, b) in c.iter().enumerate() {
            n |= val(*b) << (18 - 6 * i);
        }
        out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8][..c.len() - 1]);
    }
    out
}

fn bash(cmd: &str) -> Value {
    json!({"cmd": "/bin/bash", "args": ["-l", "-c", cmd]})
}

/// A daemon (on loopback TCP `port` too, if given), a sandbox with
/// `FOO=bar`, and its e2b row with an envd token (the control plane's part).
async fn setup(art: Artifacts, port: Option<u16>) -> (Env, Daemon, Client, Envd) {
    let env = Env::new(art);
    let mut config = env.config();
    config.listen_tcp = port.map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)));
    let daemon = Daemon::start(&env, config).await;
    let key = env.user("alice", UserCaps::default());
    let a = env.client(Some(&key));
    let sb = a
        .post("/sandboxes", json!({"name": "e2b", "env": {"FOO": "bar"}}))
        .await
        .expect(201);
    let id = sb["id"].as_str().expect("id").to_owned();
    let token = "e2bt_test_token".to_owned();
    let store = bhatti::store::Store::open(env.data_dir().join("bhatti.db")).expect("store");
    let (sid, tok) = (id.clone(), token.clone());
    store
        .with(move |c| {
            let row = bhatti::store::sandboxes::get_by_id(c, &sid)?.expect("the sandbox row");
            bhatti::store::e2b::upsert(
                c,
                &bhatti::store::e2b::E2bRow {
                    sandbox_id: sid.clone(),
                    owner: row.owner,
                    template_id: "base".into(),
                    token_sha256: hex::encode(sha2::Sha256::digest(tok.as_bytes())),
                    token_enc: vec![],
                    metadata: Default::default(),
                    started_at: 0,
                    end_at: None,
                    auto_pause: false,
                },
            )
        })
        .expect("e2b row");
    let envd = Envd {
        client: env.client(None),
        sandbox: id,
        token,
    };
    (env, daemon, a, envd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_process_service_on_a_real_vm() {
    init_tracing();
    let Some(art) = artifacts("e2b_process_service_on_a_real_vm") else {
        return;
    };
    let (env, daemon, a, envd) = setup(art, None).await;
    let id = envd.sandbox.clone();

    // --- a command: start, stdout and stderr, end
    let (_, mut ev) = envd
        .start(json!({"process": bash("echo hi; echo oops >&2"), "stdin": false}))
        .await;
    let (out, err, _, end) = ev.until_end().await;
    assert_eq!((out.as_str(), err.as_str()), ("hi\n", "oops\n"));
    assert_eq!(
        end,
        json!({"exitCode": 0, "exited": true, "status": "exit status 0"})
    );

    // --- much output, faster than it is read: none of it lost
    let (_, mut ev) = envd
        .start(json!({"process": bash("seq 1 300000; echo done >&2"), "stdin": false}))
        .await;
    let (out, err, _, end) = ev.until_end().await;
    let want: String = (1..=300000).map(|i| format!("{i}\n")).collect();
    assert!(out == want, "{} bytes of {}", out.len(), want.len());
    assert_eq!((err.as_str(), &end["exitCode"]), ("done\n", &json!(0)));

    // --- a non-zero exit; the sandbox's env and the request's; cwd
    let (_, mut ev) = envd
        .start(json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo $FOO $A; pwd; exit 3"],
                       "envs": {"A": "1"}, "cwd": "/tmp"}, "stdin": false}))
        .await;
    let (out, _, _, end) = ev.until_end().await;
    assert_eq!(out, "bar 1\n/tmp\n");
    assert_eq!(end["exitCode"], 3);
    assert_eq!(end["status"], "exit status 3");

    // --- stdin false: the command sees end of input at once
    let (_, mut ev) = envd
        .start(json!({"process": bash("cat; echo done"), "stdin": false}))
        .await;
    assert_eq!(ev.until_end().await.0, "done\n");

    // --- a background command outlives its stream
    let (pid, ev) = envd
        .start(json!({"process": bash("cat"), "stdin": true, "tag": "bg"}))
        .await;
    drop(ev);
    let listed = envd.list().await;
    let me = listed
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("pid {pid} in {listed:?}"));
    assert_eq!(me["tag"], "bg");
    assert_eq!(me["config"]["cmd"], "/bin/bash");
    assert_eq!(me["config"]["args"], json!(["-l", "-c", "cat"]));
    // Nobody listens: the session is detached (the sandbox may cool).
    let detached = |want: u64| {
        let a = &a;
        let id = &id;
        async move {
            let s = a
                .get(&format!("/sandboxes/{id}/sessions"))
                .await
                .expect(200);
            s["sessions"]
                .as_array()
                .is_some_and(|v| {
                    v.iter()
                        .any(|s| s["pid"] == pid && s["attached"].as_u64() == Some(want))
                })
                .then_some(())
        }
    };
    eventually("the background command's session detached", WAIT, || {
        detached(0)
    })
    .await;
    let mut attached = envd
        .stream("Connect", json!({"process": {"pid": pid}}))
        .await;
    assert_eq!(attached.event().await["start"]["pid"], pid);
    envd.unary(
        "SendInput",
        json!({"process": {"pid": pid}, "input": {"stdin": b64("hello\n")}}),
    )
    .await
    .expect(200);
    attached.until_output("hello\n").await;
    // By tag too.
    envd.unary(
        "SendInput",
        json!({"process": {"tag": "bg"}, "input": {"stdin": b64("again\n")}}),
    )
    .await
    .expect(200);
    attached.until_output("again\n").await;
    envd.unary("CloseStdin", json!({"process": {"pid": pid}}))
        .await
        .expect(200);
    let (_, _, _, end) = attached.until_end().await;
    assert_eq!(end["exitCode"], 0);
    eventually("the ended process leaves the list", WAIT, || async {
        (!envd.list().await.iter().any(|p| p["pid"] == pid)).then_some(())
    })
    .await;
    let e = envd
        .unary(
            "SendSignal",
            json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
        )
        .await
        .expect(404);
    assert_eq!(e["code"], "not_found", "{e}");

    // --- a signal
    let (pid, mut ev) = envd
        .start(json!({"process": bash("sleep 1000"), "stdin": false}))
        .await;
    envd.unary(
        "SendSignal",
        json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
    )
    .await
    .expect(200);
    let (_, _, _, end) = ev.until_end().await;
    assert_eq!(
        end,
        json!({"exitCode": -1, "exited": false, "status": "signal: killed"})
    );

    // --- the start call's deadline ends the process, as envd does
    let mut ev = envd
        .stream_with(
            "Start",
            json!({"process": bash("sleep 1000"), "stdin": false}),
            &[("connect-timeout-ms", "1500")],
        )
        .await;
    assert!(ev.event().await["start"]["pid"].as_u64().is_some());
    let (_, _, _, end) = ev.until_end().await;
    assert_eq!(end["status"], "signal: killed");

    // --- a PTY: input, resize
    let (pid, mut pty) = envd
        .start(json!({"process": {"cmd": "/bin/bash", "args": ["-i", "-l"],
                       "envs": {"TERM": "xterm-256color"}},
                      "pty": {"size": {"cols": 80, "rows": 24}}}))
        .await;
    let send = |data: &str| {
        envd.unary(
            "SendInput",
            json!({"process": {"pid": pid}, "input": {"pty": b64(data)}}),
        )
    };
    send("stty size\n").await.expect(200);
    pty.until_output("24 80").await;
    envd.unary(
        "Update",
        json!({"process": {"pid": pid}, "pty": {"size": {"cols": 100, "rows": 30}}}),
    )
    .await
    .expect(200);
    send("stty size\n").await.expect(200);
    pty.until_output("30 100").await;
    send("exit 5\n").await.expect(200);
    let (_, _, _, end) = pty.until_end().await;
    assert_eq!(end["exitCode"], 5);

    // --- errors
    let e = envd
        .unary(
            "SendInput",
            json!({"process": {"pid": 999999}, "input": {"stdin": b64("x")}}),
        )
        .await
        .expect(404);
    assert_eq!(e["code"], "not_found", "{e}");
    let e = envd
        .unary(
            "SendSignal",
            json!({"process": {"pid": 1}, "signal": "SIGNAL_UNSPECIFIED"}),
        )
        .await
        .expect(400);
    assert_eq!(e["code"], "invalid_argument", "{e}");
    let e = envd.unary("List", json!([1])).await.expect(400);
    assert_eq!(e["code"], "invalid_argument", "{e}");
    let mut bad = Envd {
        client: env.client(None),
        sandbox: id.clone(),
        token: "wrong".into(),
    };
    let e = bad.unary("List", json!({})).await.expect(401);
    assert_eq!(e["code"], "unauthenticated", "{e}");
    bad.token = envd.token.clone();
    let mut ev = bad
        .stream("Start", json!({"process": {"cmd": "", "args": []}}))
        .await;
    let (flags, v) = ev.next().await.expect("an end");
    assert_eq!(flags, 2);
    assert_eq!(v["error"]["code"], "invalid_argument", "{v}");

    a.delete(&format!("/sandboxes/{id}")).await;
    daemon.stop().await;
}

/// The official Python SDK (see [`e2b_python`])
/// runs tests/e2b/process_sdk.py against the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_process_python_sdk() {
    let test = "e2b_process_python_sdk";
    let Some(art) = artifacts(test) else {
        return;
    };
    let Some(python) = e2b_python(test, "e2b") else {
        return;
    };
    init_tracing();
    let port = free_port();
    let (env, daemon, a, envd) = setup(art, Some(port)).await;
    let url = format!("http://127.0.0.1:{port}/e2b");
    let key = a.key.clone().unwrap_or_default();
    let args = [envd.sandbox.clone(), envd.token.clone()];
    let (ok, text) = run_e2b_script(&python, "process_sdk.py", &args, &key, &url).await;
    assert!(ok && text.contains("SDK OK"), "{text}");
    a.delete(&format!("/sandboxes/{}", envd.sandbox)).await;
    daemon.stop().await;
    drop(env);
}
