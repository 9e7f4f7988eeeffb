//! The E2B control plane (`/e2b`) on a real daemon with two real VMs:
//! create with an API key (env vars reach commands, metadata is kept),
//! get and list (metadata and state filters, another user sees nothing),
//! the end of life (a timeout pauses an `autoPause` sandbox; connect
//! resumes it with the same token), a native sandbox connected lazily and
//! destroyed by its timeout, the error shapes, `[e2b] listen` and
//! `[e2b] enabled = false`.

mod api_support;

use std::net::SocketAddr;
use std::time::Duration;

use api_support::*;
use bhatti::store::users::UserCaps;
use bytes::Bytes;
use hyper::Method;
use serde_json::{json, Value};

/// The E2B SDK's way of calling: `X-API-KEY`, JSON bodies.
struct E2b {
    c: Client,
    key: String,
}

impl E2b {
    async fn call(&self, method: Method, path: &str, body: Option<&str>) -> Resp {
        let key = self.key.clone();
        let mut headers = vec![("x-api-key", key.as_str())];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        self.c
            .send(
                method,
                &format!("/e2b{path}"),
                &headers,
                Bytes::from(body.unwrap_or_default().to_owned()),
            )
            .await
    }
    async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, path, None).await
    }
    async fn post(&self, path: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(&body.to_string())).await
    }
    async fn delete(&self, path: &str) -> Resp {
        self.call(Method::DELETE, path, None).await
    }
}

/// An E2B error: `{"code": <status>, "message"}`.
#[track_caller]
fn e2b_err(r: &Resp, status: u16) -> String {
    let v = r.expect(status);
    assert_eq!(v["code"], json!(status), "{v}");
    v["message"].as_str().expect("message").to_owned()
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|s| s["sandboxID"].as_str().expect("sandboxID").to_owned())
        .collect()
}

/// A plain HTTP/1.0 request over TCP: (status, body).
async fn tcp(addr: SocketAddr, req: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_control_plane() {
    let Some(art) = artifacts("e2b_control_plane") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();

    // `[e2b] enabled = false`: the routes are not there.
    {
        let env = Env::new(art.clone());
        let mut cfg = env.config();
        cfg.network.enabled = false;
        cfg.e2b.enabled = false;
        let daemon = Daemon::start(&env, cfg).await;
        let key = env.user("alice", UserCaps::default());
        let alice = E2b {
            c: env.client(None),
            key,
        };
        alice.get("/v2/sandboxes").await.expect(404);
        daemon.stop().await;
    }

    let env = Env::new(art);
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cfg = env.config();
    cfg.network.enabled = false;
    cfg.e2b.listen = Some(listen);
    let daemon = Daemon::start(&env, cfg).await;
    let alice_key = env.user("alice", UserCaps::default());
    let bob_key = env.user("bob", UserCaps::default());
    let alice = E2b {
        c: env.client(None),
        key: alice_key.clone(),
    };
    let bob = E2b {
        c: env.client(None),
        key: bob_key,
    };
    let native = env.client(Some(&alice_key));

    // Refusals, in E2B's shape, before any VM.
    let nobody = E2b {
        c: env.client(None),
        key: "nope".into(),
    };
    e2b_err(&nobody.get("/v2/sandboxes").await, 401);
    for bad in ["{", "[1]", r#"{"timeout": "soon"}"#, r#"{"timeout": -1}"#] {
        let r = alice.call(Method::POST, "/v2/sandboxes", Some(bad)).await;
        e2b_err(&r, 400);
    }
    let m = e2b_err(
        &alice
            .post("/v2/sandboxes", json!({"templateID": "no-such-template"}))
            .await,
        404,
    );
    assert!(m.contains("no-such-template"), "{m}");
    e2b_err(&alice.get("/sandboxes/nosuch").await, 404);
    e2b_err(&alice.get("/v2/sandboxes?state=sleeping").await, 400);

    // Create: env vars reach commands, the token is handed out once more
    // by connect.
    let created = alice
        .post(
            "/v2/sandboxes",
            json!({
                "templateID": "base",
                "timeout": 600,
                "autoPause": true,
                "metadata": {"team": "x y", "run": "1"},
                "envVars": {"FOO": "bar"},
                "secure": true,
                "allow_internet_access": true,
                "mcp": null,
            }),
        )
        .await
        .expect(201);
    let id = created["sandboxID"].as_str().expect("sandboxID").to_owned();
    let token = created["envdAccessToken"]
        .as_str()
        .expect("token")
        .to_owned();
    assert_eq!(created["templateID"], "base");
    assert_eq!(created["envdVersion"], "0.6.4");
    assert!(created["clientID"].is_string());
    assert!(created["domain"].is_null());
    let (code, out, _) = native.sh(&id, "echo $FOO").await;
    assert_eq!((code, out.trim()), (0, "bar"));

    // Get: SandboxDetail with every required field.
    let d = alice.get(&format!("/sandboxes/{id}")).await.expect(200);
    for k in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "envdVersion",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
    ] {
        assert!(!d[k].is_null(), "{k} missing: {d}");
    }
    assert_eq!(d["state"], "running");
    assert_eq!(d["envdAccessToken"], json!(token));
    assert_eq!(d["metadata"], json!({"team": "x y", "run": "1"}));
    assert!(d["cpuCount"].as_u64().unwrap_or(0) > 0, "{d}");
    assert!(d["memoryMB"].as_u64().unwrap_or(0) > 0, "{d}");

    // Another user: 404 everywhere, and an empty list.
    e2b_err(&bob.get(&format!("/sandboxes/{id}")).await, 404);
    e2b_err(&bob.delete(&format!("/sandboxes/{id}")).await, 404);
    e2b_err(
        &bob.post(&format!("/sandboxes/{id}/timeout"), json!({"timeout": 1}))
            .await,
        404,
    );
    e2b_err(
        &bob.post(
            &format!("/v2/sandboxes/{id}/connect"),
            json!({"timeout": 1}),
        )
        .await,
        404,
    );
    assert!(ids(&bob.get("/v2/sandboxes").await.expect(200)).is_empty());

    // List: the metadata filter as the Python SDK encodes it (quoted, then
    // url-encoded, then a query parameter).
    let listed = alice
        .get("/v2/sandboxes?metadata=team%3Dx%252520y")
        .await
        .expect(200);
    assert_eq!(ids(&listed), vec![id.clone()]);
    assert_eq!(listed[0]["state"], "running");
    let none = alice
        .get("/v2/sandboxes?metadata=team%3Dz")
        .await
        .expect(200);
    assert!(ids(&none).is_empty());
    // v1 too.
    assert_eq!(
        ids(&alice.get("/sandboxes").await.expect(200)),
        vec![id.clone()]
    );

    // The separate listener serves the same API at `/`.
    let (status, body) = tcp(
        listen,
        &format!("GET /v2/sandboxes HTTP/1.0\r\nHost: x\r\nX-API-KEY: {alice_key}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&id), "{body}");
    let (status, _) = tcp(listen, "GET /v2/sandboxes HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 401);

    // Metrics: one sample.
    let m = alice
        .get(&format!("/sandboxes/{id}/metrics"))
        .await
        .expect(200);
    assert_eq!(m.as_array().map(Vec::len), Some(1), "{m}");
    assert!(m[0]["memTotal"].as_u64().unwrap_or(0) > 0, "{m}");

    // A short timeout with autoPause: paused (stopped), not destroyed.
    alice
        .post(&format!("/sandboxes/{id}/timeout"), json!({"timeout": 1}))
        .await
        .expect(204);
    eventually(
        "the timeout to pause the sandbox",
        Duration::from_secs(180),
        || async {
            let d = alice.get(&format!("/sandboxes/{id}")).await.expect(200);
            (d["state"] == "paused").then_some(())
        },
    )
    .await;
    let paused = alice.get("/v2/sandboxes?state=paused").await.expect(200);
    assert_eq!(ids(&paused), vec![id.clone()]);
    let running = alice.get("/v2/sandboxes?state=running").await.expect(200);
    assert!(ids(&running).is_empty());
    // v1 lists running ones only.
    assert!(ids(&alice.get("/sandboxes").await.expect(200)).is_empty());
    e2b_err(
        &alice
            .post(&format!("/sandboxes/{id}/pause"), json!({}))
            .await,
        409,
    );

    // Connect resumes it (201), with the same token; then 200.
    let c = alice
        .post(
            &format!("/v2/sandboxes/{id}/connect"),
            json!({"timeout": 300}),
        )
        .await
        .expect(201);
    assert_eq!(c["sandboxID"], json!(id));
    assert_eq!(c["envdAccessToken"], json!(token));
    let c = alice
        .post(&format!("/sandboxes/{id}/connect"), json!({"timeout": 10}))
        .await
        .expect(200);
    assert_eq!(c["envdAccessToken"], json!(token));
    let d = alice.get(&format!("/sandboxes/{id}")).await.expect(200);
    assert_eq!(d["state"], "running");
    let (code, out, _) = native.sh(&id, "echo $FOO").await;
    assert_eq!((code, out.trim()), (0, "bar"));
    e2b_err(
        &alice
            .post(&format!("/sandboxes/{id}/resume"), json!({"timeout": 10}))
            .await,
        409,
    );
    alice
        .post(
            &format!("/sandboxes/{id}/refreshes"),
            json!({"duration": 60}),
        )
        .await
        .expect(204);

    // A native sandbox: listed, connected lazily (a token of its own),
    // then destroyed by its timeout (also across a restart).
    let n = native
        .post("/sandboxes", json!({"name": "native"}))
        .await
        .expect(201);
    let nid = n["id"].as_str().expect("id").to_owned();
    let all = alice.get("/v2/sandboxes").await.expect(200);
    assert_eq!(ids(&all).len(), 2, "{all}");
    let c = alice
        .post(
            &format!("/v2/sandboxes/{nid}/connect"),
            json!({"timeout": 5}),
        )
        .await
        .expect(200);
    let ntoken = c["envdAccessToken"].as_str().expect("token").to_owned();
    assert_ne!(ntoken, token);
    // No end of life until one is set.
    let d = alice.get(&format!("/sandboxes/{nid}")).await.expect(200);
    assert!(
        d["endAt"].as_str().is_some_and(|e| e.starts_with("9999")),
        "{d}"
    );
    // The end of life is kept across a restart of the daemon.
    alice
        .post(&format!("/sandboxes/{nid}/timeout"), json!({"timeout": 2}))
        .await
        .expect(204);
    daemon.stop().await;
    let mut cfg = env.config();
    cfg.network.enabled = false;
    let daemon = Daemon::start(&env, cfg).await;
    eventually(
        "the timeout to destroy the sandbox",
        Duration::from_secs(120),
        || async { (alice.get(&format!("/sandboxes/{nid}")).await.status == 404).then_some(()) },
    )
    .await;
    native.get(&format!("/sandboxes/{nid}")).await.expect(404);

    // Kill.
    alice.delete(&format!("/sandboxes/{id}")).await.expect(204);
    e2b_err(&alice.get(&format!("/sandboxes/{id}")).await, 404);
    e2b_err(&alice.delete(&format!("/sandboxes/{id}")).await, 404);
    assert!(ids(&alice.get("/v2/sandboxes").await.expect(200)).is_empty());
    daemon.stop().await;
}
