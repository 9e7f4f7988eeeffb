//! E2B compatibility, envd's file surface against a real daemon and VM:
//! `/files` uploads (octet-stream, gzip, multipart) and downloads,
//! `/health`, and the `filesystem.Filesystem` Connect service (Stat,
//! ListDir, MakeDir, Move, Remove, WatchDir, polling watchers), over HTTP
//! as the SDKs speak it.

mod api_support;

use std::io::Write as _;
use std::time::Duration;

use api_support::*;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

struct Envd {
    c: Client,
    id: String,
    token: String,
}

impl Envd {
    fn headers<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut h = vec![
            ("e2b-sandbox-id", self.id.as_str()),
            ("x-access-token", self.token.as_str()),
        ];
        h.extend_from_slice(extra);
        h
    }

    async fn rpc(&self, method: &str, body: Value) -> Resp {
        self.c
            .send(
                Method::POST,
                &format!("/e2b/filesystem.Filesystem/{method}"),
                &self.headers(&[("content-type", "application/json")]),
                Bytes::from(body.to_string()),
            )
            .await
    }

    async fn upload(&self, query: &str, extra: &[(&str, &str)], body: impl Into<Bytes>) -> Resp {
        self.c
            .send(
                Method::POST,
                &format!("/e2b/files?{query}"),
                &self.headers(extra),
                body.into(),
            )
            .await
    }

    async fn download(&self, path: &str) -> Resp {
        self.c
            .send(
                Method::GET,
                &format!("/e2b/files?path={path}"),
                &self.headers(&[]),
                Bytes::new(),
            )
            .await
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// Connect envelopes read off a streaming response.
struct Envelopes {
    body: hyper::body::Incoming,
    buf: BytesMut,
}

impl Envelopes {
    async fn next(&mut self) -> (u8, Value) {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    self.buf.advance(5);
                    let msg = self.buf.split_to(len);
                    return (flags, serde_json::from_slice(&msg).expect("JSON message"));
                }
            }
            let frame = tokio::time::timeout(Duration::from_secs(30), self.body.frame())
                .await
                .expect("a message within 30 s")
                .expect("the stream goes on")
                .expect("a frame");
            if let Ok(d) = frame.into_data() {
                self.buf.extend_from_slice(&d);
            }
        }
    }
}

/// A daemon (on TCP too when `tcp`), a user, one sandbox with its E2B
/// row, and an envd client for it.
async fn setup(art: Artifacts, tcp: Option<u16>) -> (Env, Daemon, Client, Envd) {
    let env = Env::new(art);
    let mut config = env.config();
    config.listen_tcp = tcp.map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)));
    let store = bhatti::store::Store::open(env.data_dir().join("bhatti.db")).expect("store");
    let issued = store
        .with(|c| Ok(bhatti::auth::create_user(c, "ana", Default::default()).expect("create user")))
        .expect("user");
    let daemon = Daemon::start(&env, config).await;
    let native = env.client(Some(&issued.api_key));
    let sb = native
        .post("/sandboxes", json!({"name": "fs"}))
        .await
        .expect(201);
    let id = sb["id"].as_str().expect("id").to_owned();
    let token = format!("e2bt_test_{}", bhatti::engine::random_hex(8));
    store
        .with(|c| {
            bhatti::store::e2b::upsert(
                c,
                &bhatti::store::e2b::E2bRow {
                    sandbox_id: id.clone(),
                    owner: issued.user.id.clone(),
                    template_id: "base".into(),
                    token_sha256: hex::encode(Sha256::digest(token.as_bytes())),
                    token_enc: Vec::new(),
                    metadata: Default::default(),
                    started_at: 0,
                    end_at: None,
                    auto_pause: false,
                },
            )
        })
        .expect("e2b row");
    let e = Envd {
        c: env.client(None),
        id,
        token,
    };
    (env, daemon, native, e)
}

#[tokio::test(flavor = "multi_thread")]
async fn e2b_files_and_filesystem() {
    let Some(art) = artifacts("e2b_files_and_filesystem") else {
        return;
    };
    init_tracing();
    let (env, daemon, native, e) = setup(art, None).await;
    let id = e.id.clone();

    // /health: no token needed; a gone sandbox is 502 "… was not found".
    let h = e.c.get("/e2b/health").await;
    assert_eq!(h.status.as_u16(), 204);
    let gone =
        e.c.send(
            Method::GET,
            "/e2b/health",
            &[("e2b-sandbox-id", "nope")],
            Bytes::new(),
        )
        .await
        .expect(502);
    assert!(gone["message"]
        .as_str()
        .unwrap_or("")
        .contains("was not found"));

    // Octet-stream upload, download.
    let w = e
        .upload(
            "path=/tmp/e2b/a.txt",
            &[("content-type", "application/octet-stream")],
            "hello",
        )
        .await
        .expect(200);
    assert_eq!(
        w,
        json!([{"name": "a.txt", "type": "file", "path": "/tmp/e2b/a.txt"}])
    );
    let r = e.download("/tmp/e2b/a.txt").await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(&r.body[..], b"hello");

    // Gzip body; a relative path is under the user's home.
    let w = e
        .upload(
            "path=rel/g.txt",
            &[
                ("content-type", "application/octet-stream"),
                ("content-encoding", "gzip"),
            ],
            gzip(&b"zipped ".repeat(1000)),
        )
        .await
        .expect(200);
    assert_eq!(w[0]["path"], "/home/lohar/rel/g.txt");
    assert_eq!(
        &e.download("/home/lohar/rel/g.txt").await.body[..],
        &b"zipped ".repeat(1000)[..]
    );
    let bad = e
        .upload(
            "path=/tmp/e2b/bad",
            &[
                ("content-type", "application/octet-stream"),
                ("content-encoding", "gzip"),
            ],
            "not gzip",
        )
        .await;
    assert_eq!(bad.status.as_u16(), 400, "{:?}", bad.body);

    // A download asked gzipped comes gzipped.
    let gz =
        e.c.send(
            Method::GET,
            "/e2b/files?path=/home/lohar/rel/g.txt",
            &e.headers(&[("accept-encoding", "gzip, deflate")]),
            Bytes::new(),
        )
        .await;
    assert_eq!(gz.header("content-encoding").as_deref(), Some("gzip"));
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz.body[..]), &mut plain)
        .expect("gunzip");
    assert_eq!(plain, b"zipped ".repeat(1000));
    // A path with a NUL byte is 400.
    e.download("/tmp/a%00b").await.expect(400);

    // A streamed (large) upload.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    e.upload(
        "path=/tmp/e2b/big.bin",
        &[("content-type", "application/octet-stream")],
        big.clone(),
    )
    .await
    .expect(200);
    let r = e.download("/tmp/e2b/big.bin").await;
    assert_eq!(r.body.len(), big.len());
    assert!(r.body[..] == big[..]);

    // Multipart: two files named by their file names.
    let mp = "--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/e2b/m1\"\r\n\
              Content-Type: application/octet-stream\r\n\r\none\r\n\
              --b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/e2b/sub/m2\"\r\n\r\n\
              two\r\n--b0undary--\r\n";
    let w = e
        .upload(
            "",
            &[("content-type", "multipart/form-data; boundary=b0undary")],
            mp,
        )
        .await
        .expect(200);
    assert_eq!(w.as_array().map(Vec::len), Some(2), "{w}");
    assert_eq!(&e.download("/tmp/e2b/m1").await.body[..], b"one");
    assert_eq!(&e.download("/tmp/e2b/sub/m2").await.body[..], b"two");

    // Errors: missing file 404, bad token 401, no path 400.
    let m = e.download("/tmp/e2b/missing").await.expect(404);
    assert_eq!(m["code"], 404);
    let bad =
        e.c.send(
            Method::GET,
            "/e2b/files?path=/tmp/e2b/a.txt",
            &[("e2b-sandbox-id", id.as_str()), ("x-access-token", "wrong")],
            Bytes::new(),
        )
        .await
        .expect(401);
    assert_eq!(bad["code"], 401);
    e.upload("", &[("content-type", "application/octet-stream")], "x")
        .await
        .expect(400);

    // A full filesystem is 507 (a 64 KiB tmpfs in the guest).
    let (code, _, err) = native
        .sh(
            &id,
            "sudo mkdir -p /mnt/small && sudo mount -t tmpfs -o size=64k tmpfs /mnt/small \
             && sudo chmod 777 /mnt/small",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let full = e
        .upload(
            "path=/mnt/small/f",
            &[("content-type", "application/octet-stream")],
            vec![7u8; 256 << 10],
        )
        .await
        .expect(507);
    assert_eq!(full["code"], 507);

    // Stat.
    let s = e
        .rpc("Stat", json!({"path": "/tmp/e2b/a.txt"}))
        .await
        .expect(200);
    let en = &s["entry"];
    assert_eq!(en["name"], "a.txt");
    assert_eq!(en["type"], "FILE_TYPE_FILE");
    assert_eq!(en["path"], "/tmp/e2b/a.txt");
    assert_eq!(en["size"], "5");
    assert_eq!(en["permissions"], "-rw-r--r--");
    assert!(
        en["modifiedTime"].as_str().unwrap_or("").ends_with('Z'),
        "{en}"
    );
    let nf = e
        .rpc("Stat", json!({"path": "/tmp/e2b/nope"}))
        .await
        .expect(404);
    assert_eq!(nf["code"], "not_found");

    // MakeDir, again: already_exists.
    let d = e
        .rpc("MakeDir", json!({"path": "/tmp/e2b/d/e"}))
        .await
        .expect(200);
    assert_eq!(d["entry"]["type"], "FILE_TYPE_DIRECTORY");
    let again = e
        .rpc("MakeDir", json!({"path": "/tmp/e2b/d/e"}))
        .await
        .expect(409);
    assert_eq!(again["code"], "already_exists");

    // ListDir, one level and two.
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["path"].as_str().unwrap_or("").to_owned())
            .collect();
        n.sort();
        n
    };
    let l = e
        .rpc("ListDir", json!({"path": "/tmp/e2b", "depth": 1}))
        .await
        .expect(200);
    assert_eq!(
        names(&l),
        [
            "/tmp/e2b/a.txt",
            "/tmp/e2b/big.bin",
            "/tmp/e2b/d",
            "/tmp/e2b/m1",
            "/tmp/e2b/sub"
        ]
    );
    let l = e
        .rpc("ListDir", json!({"path": "/tmp/e2b", "depth": 2}))
        .await
        .expect(200);
    assert!(names(&l).contains(&"/tmp/e2b/d/e".to_string()), "{l}");
    assert!(names(&l).contains(&"/tmp/e2b/sub/m2".to_string()), "{l}");
    e.rpc("ListDir", json!({"path": "/tmp/e2b/nope"}))
        .await
        .expect(404);

    // Move (into a new directory), then the source is gone.
    let mv = e
        .rpc(
            "Move",
            json!({"source": "/tmp/e2b/a.txt", "destination": "/tmp/e2b/new/b.txt"}),
        )
        .await
        .expect(200);
    assert_eq!(mv["entry"]["path"], "/tmp/e2b/new/b.txt");
    e.rpc("Stat", json!({"path": "/tmp/e2b/a.txt"}))
        .await
        .expect(404);
    assert_eq!(&e.download("/tmp/e2b/new/b.txt").await.body[..], b"hello");
    e.rpc(
        "Move",
        json!({"source": "/tmp/e2b/nope", "destination": "/tmp/e2b/x"}),
    )
    .await
    .expect(404);

    let denied = e
        .rpc(
            "Move",
            json!({"source": "/tmp/e2b/new/b.txt", "destination": "/root/b.txt"}),
        )
        .await
        .expect(403);
    assert_eq!(denied["code"], "permission_denied");
    assert!(
        denied["message"]
            .as_str()
            .unwrap_or("")
            .contains("/root/b.txt"),
        "{denied}"
    );

    // Remove (recursive; a missing path is fine).
    e.rpc("Remove", json!({"path": "/tmp/e2b/d"}))
        .await
        .expect(200);
    e.rpc("Stat", json!({"path": "/tmp/e2b/d/e"}))
        .await
        .expect(404);
    e.rpc("Remove", json!({"path": "/tmp/e2b/d"}))
        .await
        .expect(200);

    // Bad token on the Connect service.
    let bad =
        e.c.send(
            Method::POST,
            "/e2b/filesystem.Filesystem/Stat",
            &[
                ("e2b-sandbox-id", id.as_str()),
                ("x-access-token", "wrong"),
                ("content-type", "application/json"),
            ],
            Bytes::from(json!({"path": "/tmp"}).to_string()),
        )
        .await
        .expect(401);
    assert_eq!(bad["code"], "unauthenticated");

    // WatchDir sees a file created.
    let mut req_body = vec![0u8];
    let msg = json!({"path": "/tmp/e2b", "includeEntry": true}).to_string();
    req_body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    req_body.extend_from_slice(msg.as_bytes());
    let resp =
        e.c.open(
            Method::POST,
            "/e2b/filesystem.Filesystem/WatchDir",
            &e.headers(&[("content-type", "application/connect+json")]),
            Bytes::from(req_body),
        )
        .await
        .expect("WatchDir");
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = Envelopes {
        body: resp.into_body(),
        buf: BytesMut::new(),
    };
    let (flags, first) = stream.next().await;
    assert_eq!((flags, first), (0, json!({"start": {}})));
    e.upload(
        "path=/tmp/e2b/w.txt",
        &[("content-type", "application/octet-stream")],
        "w",
    )
    .await
    .expect(200);
    let ev = loop {
        let (flags, m) = stream.next().await;
        assert_eq!(flags, 0, "the stream ended: {m}");
        if m["filesystem"]["name"] == "w.txt" {
            break m["filesystem"].clone();
        }
    };
    assert_eq!(ev["type"], "EVENT_TYPE_CREATE");
    assert_eq!(ev["entry"]["path"], "/tmp/e2b/w.txt");
    drop(stream);

    // The polling watcher: create, events, remove.
    let w = e
        .rpc("CreateWatcher", json!({"path": "/tmp/e2b"}))
        .await
        .expect(200);
    let wid = w["watcherId"].as_str().expect("watcherId").to_owned();
    e.rpc("Remove", json!({"path": "/tmp/e2b/w.txt"}))
        .await
        .expect(200);
    let got = eventually(
        "the watcher's remove event",
        Duration::from_secs(30),
        || {
            let (e, wid) = (&e, wid.clone());
            async move {
                let r = e
                    .rpc("GetWatcherEvents", json!({"watcherId": wid}))
                    .await
                    .expect(200);
                let evs = r["events"].as_array().cloned().unwrap_or_default();
                evs.into_iter()
                    .find(|v| v["name"] == "w.txt" && v["type"] == "EVENT_TYPE_REMOVE")
            }
        },
    )
    .await;
    assert!(got.get("entry").is_none());
    e.rpc("RemoveWatcher", json!({"watcherId": wid}))
        .await
        .expect(200);
    e.rpc("GetWatcherEvents", json!({"watcherId": wid}))
        .await
        .expect(404);
    e.rpc("CreateWatcher", json!({"path": "/tmp/e2b/nope"}))
        .await
        .expect(404);

    let del = native.delete(&format!("/sandboxes/{id}")).await;
    assert!(del.status.is_success(), "{del:?}");
    daemon.stop().await;
    drop(env);
}

/// The official Python SDK (see [`e2b_python`])
/// runs tests/e2b/files_sdk.py against the daemon.
#[tokio::test(flavor = "multi_thread")]
async fn e2b_files_python_sdk() {
    let test = "e2b_files_python_sdk";
    let Some(art) = artifacts(test) else {
        return;
    };
    let Some(python) = e2b_python(test, "e2b") else {
        return;
    };
    init_tracing();
    let port = free_port();
    let (env, daemon, native, e) = setup(art, Some(port)).await;
    let key = native.key.clone().unwrap_or_default();
    let url = format!("http://127.0.0.1:{port}/e2b");
    for (args, want) in [
        (vec![e.id.clone(), e.token.clone()], "SDK DONE"),
        // A sandbox of the SDK's own, through the control plane.
        (vec!["create".to_string()], "SDK KILLED"),
    ] {
        let (ok, text) = run_e2b_script(&python, "files_sdk.py", &args, &key, &url).await;
        assert!(
            ok && text.contains("SDK OK") && text.contains(want),
            "{text}"
        );
    }
    let del = native.delete(&format!("/sandboxes/{}", e.id)).await;
    assert!(del.status.is_success(), "{del:?}");
    daemon.stop().await;
    drop(env);
}
