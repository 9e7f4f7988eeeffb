//! Files and init at create (real VMs): files placed with their modes and
//! owners at the first boot (and after an instant restore), bad file specs
//! refused with nothing made, `init` as the kept session `init` whose
//! output reads like any session's, `wait_init`, and neither files nor
//! init applied again after a stop/start or a fresh boot.

mod api_support;

use std::time::{Duration, Instant};

use api_support::*;
use bhatti::api_types::{CreateFile, MAX_FILES_BYTES};
use bhatti::store::users::UserCaps;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const RUN_SH: &[u8] = b"#!/bin/sh\necho run\n";

fn file(path: &str, content: &[u8], mode: Option<u32>) -> Value {
    serde_json::to_value(CreateFile::new(path.into(), content, mode)).expect("file JSON")
}

/// The sandbox's session `init`, if listed.
async fn init_session(c: &Client, sb: &str) -> Option<Value> {
    let v = c
        .get(&format!("/sandboxes/{sb}/sessions"))
        .await
        .expect(200);
    v["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .find(|s| s["id"] == "init")
        .cloned()
}

/// All output of the session `init` (replayed from its start) and its exit
/// code, read over the shell WebSocket as any session's output is.
async fn init_output(c: &Client, sb: &str) -> (String, i64) {
    let mut ws = c
        .ws(&format!("/sandboxes/{sb}/ws?session=init&offset=0"))
        .await
        .expect("attach to init");
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a frame within 60 s")
            .expect("socket open")
            .expect("frame");
        match msg {
            Message::Binary(b) => out.extend_from_slice(&b),
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("JSON text frame");
                match v["type"].as_str() {
                    Some("session") => assert_eq!(v["id"], "init", "{v}"),
                    Some("exit") => {
                        return (
                            String::from_utf8_lossy(&out).into_owned(),
                            v["exit_code"].as_i64().expect("exit_code"),
                        )
                    }
                    _ => panic!("unexpected frame {v}"),
                }
            }
            Message::Close(_) => panic!("closed before init's exit"),
            _ => {}
        }
    }
}

async fn stop(c: &Client, sb: &str) {
    let v = c
        .post(&format!("/sandboxes/{sb}/stop"), json!({}))
        .await
        .expect(200);
    assert_eq!(v["status"], "stopped", "{v}");
}

async fn start(c: &Client, sb: &str, fresh: bool) {
    let v = c
        .post(&format!("/sandboxes/{sb}/start"), json!({"fresh": fresh}))
        .await
        .expect(200);
    assert_eq!(v["status"], "running", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_and_init_at_create() {
    let Some(art) = artifacts("files_and_init_at_create") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    let key = env.user("alice", UserCaps::default());
    let daemon = Daemon::start(&env, env.config()).await;
    let a = env.client(Some(&key));

    // Bad file specs: 400 naming the field, and nothing is created.
    let ok = file("/etc/ok", b"x", None);
    let bad: Vec<(Value, &str)> = vec![
        (json!([file("relative", b"x", None)]), "files[0].path"),
        (
            json!([ok, file("/a/../etc/passwd", b"x", None)]),
            "files[1].path",
        ),
        (json!([file("/a//b", b"x", None)]), "files[0].path"),
        (json!([file("/proc/sys/x", b"x", None)]), "files[0].path"),
        (json!([file("/dev/x", b"x", None)]), "files[0].path"),
        (json!([file("/", b"x", None)]), "files[0].path"),
        (
            json!([{"path": "/etc/x", "content": "not base64!"}]),
            "files[0].content",
        ),
        (
            json!([file("/etc/x", b"x", Some(0o10000))]),
            "files[0].mode",
        ),
        (
            json!([file("/etc/x", b"x", None), file("/etc/x", b"y", None)]),
            "twice",
        ),
        (
            json!([file("/big", &vec![7u8; MAX_FILES_BYTES + 1], None)]),
            "files",
        ),
        (json!([{"path": "/etc/x"}]), "content"),
        (
            json!([{"path": "/etc/x", "content": "", "owner": 0}]),
            "owner",
        ),
    ];
    for (files, field) in bad {
        let e = a
            .post("/sandboxes", json!({"name": "bad", "files": files}))
            .await
            .expect_err(400);
        assert!(e.contains(field), "{field}: {e}");
    }
    let e = a
        .post(
            "/sandboxes",
            json!({"name": "bad", "from_snapshot": "cp", "wait_init": true}),
        )
        .await
        .expect_err(400);
    assert!(e.contains("wait_init"), "{e}");
    assert_eq!(
        a.get("/sandboxes").await.expect(200)["sandboxes"],
        json!([])
    );

    // Files up to the whole budget, their modes and owners; init sees them,
    // runs as the user, and a failing init fails no create.
    let key_bytes: Vec<u8> = (0..=255u8).collect();
    let big: Vec<u8> = (0..MAX_FILES_BYTES - 1024)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let init = "echo out-$(cat /etc/bhatti-test.conf); echo err-line >&2; id -u; \
                stat -c %a ~/.ssh/id; echo ran >> ~/init-count; sleep 2; exit 3";
    let t0 = Instant::now();
    let v = a
        .post(
            "/sandboxes",
            json!({
                "name": "a",
                "init": init,
                "wait_init": true,
                "files": [
                    file("/home/lohar/.ssh/id", &key_bytes, Some(0o600)),
                    file("/etc/bhatti-test.conf", b"conf-1", None),
                    file("/workspace/app/run.sh", RUN_SH, Some(0o755)),
                    file("/opt/data/big.bin", &big, Some(0o640)),
                ],
            }),
        )
        .await
        .expect(201);
    tracing::info!(ms = t0.elapsed().as_millis() as u64, "create a");
    assert_eq!(
        v["init"],
        json!({"state": "failed", "exit_code": 3}),
        "init failed, the create did not: {v}"
    );
    assert_eq!(v["status"], "running", "{v}");
    let got = a.get("/sandboxes/a").await.expect(200);
    assert_eq!(got["init"], v["init"], "the view keeps it");
    // wait_init answered after init ended: the session says so already.
    let s = init_session(&a, "a").await.expect("an init session");
    assert_eq!(s["exit"]["exit_code"], 3, "{s}");
    assert_eq!(s["argv"][0], "/bin/sh", "{s}");
    assert_eq!(s["piped"], true, "{s}");
    let (out, code) = init_output(&a, "a").await;
    assert_eq!(code, 3);
    for want in ["out-conf-1\n", "err-line\n", "1000\n", "600\n"] {
        assert!(out.contains(want), "{want:?} in init's output {out:?}");
    }
    let (code, out, err) = a
        .sh(
            "a",
            "cd / && stat -c '%n %a %U %G %s' /home/lohar/.ssh/id /etc/bhatti-test.conf \
             /workspace/app/run.sh /opt/data/big.bin /workspace/app /opt/data; \
             /workspace/app/run.sh",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "/home/lohar/.ssh/id 600 lohar lohar 256\n\
             /etc/bhatti-test.conf 644 root root 6\n\
             /workspace/app/run.sh 755 lohar lohar {}\n\
             /opt/data/big.bin 640 root root {}\n\
             /workspace/app 755 lohar lohar {}\n\
             /opt/data 755 root root {}\n\
             run\n",
            RUN_SH.len(),
            big.len(),
            dir_size(&out, "/workspace/app "),
            dir_size(&out, "/opt/data "),
        )
    );
    let r = a.get("/sandboxes/a/files?path=/opt/data/big.bin").await;
    assert_eq!(r.status, 200);
    assert!(r.body[..] == big[..], "big.bin's bytes");
    let r = a.get("/sandboxes/a/files?path=/home/lohar/.ssh/id").await;
    assert_eq!(&r.body[..], &key_bytes[..]);

    // A stop (memory snapshot) and start: the same guest, init kept, not
    // rerun. A fresh boot: neither files placed again nor init rerun.
    let (code, _, err) = a
        .sh("a", "echo changed > /workspace/app/run.sh && rm ~/.ssh/id")
        .await;
    assert_eq!(code, 0, "{err}");
    stop(&a, "a").await;
    start(&a, "a", false).await;
    let s = init_session(&a, "a").await.expect("init after a restore");
    assert_eq!(s["exit"]["exit_code"], 3, "{s}");
    stop(&a, "a").await;
    start(&a, "a", true).await;
    let (code, out, err) = a
        .sh(
            "a",
            "cat /workspace/app/run.sh; wc -l < ~/init-count; test -e ~/.ssh/id || echo gone",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "changed\n1\ngone\n", "files and init once only");
    assert!(
        init_session(&a, "a").await.is_none(),
        "a fresh boot runs no init"
    );

    // Without wait_init the create answers as soon as the agent does; the
    // session shows init running, then ended.
    let v = a
        .post(
            "/sandboxes",
            json!({"name": "b", "init": "sleep 3; echo done-b"}),
        )
        .await
        .expect(201);
    assert!(
        ["running", "succeeded"].contains(&v["init"]["state"].as_str().unwrap_or("")),
        "{v}"
    );
    let s = eventually("b's init to end", Duration::from_secs(120), || async {
        init_session(&a, "b").await.filter(|s| !s["exit"].is_null())
    })
    .await;
    assert_eq!(s["exit"]["exit_code"], 0, "{s}");
    assert_eq!(init_output(&a, "b").await, ("done-b\n".to_string(), 0));

    // A fork of a checkpoint takes files too (placed after its restore);
    // its init is its source's, already ended.
    a.post("/sandboxes/b/checkpoint", json!({"name": "cp-b"}))
        .await
        .expect(201);
    let v = a
        .post(
            "/sandboxes",
            json!({"name": "d", "from_snapshot": "cp-b",
                   "files": [file("/workspace/d.txt", b"dee", Some(0o640))]}),
        )
        .await
        .expect(201);
    assert_eq!(v["origin"], "fork", "{v}");
    assert!(v.get("init").is_none(), "{v}");
    let (code, out, err) = a
        .sh(
            "d",
            "cat /workspace/d.txt; stat -c ' %a %U' /workspace/d.txt",
        )
        .await;
    assert_eq!((code, out.as_str()), (0, "dee 640 lohar\n"), "{err}");
    let s = init_session(&a, "d")
        .await
        .expect("the source's init session");
    assert_eq!(s["exit"]["exit_code"], 0, "{s}");
    a.delete("/sandboxes/d").await.expect(204);
    a.delete("/snapshots/cp-b").await.expect(204);
    // No init: no session, no `init` in the view.
    a.delete("/sandboxes/a").await.expect(204);

    // Instant creates: the template's init ran in its builder (its session
    // comes with the snapshot); the files are placed after the restore,
    // with the same owners and modes.
    a.post(
        "/templates",
        json!({"name": "tpl", "init": "echo tpl-init; id -un > ~/who"}),
    )
    .await
    .expect(201);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let t = a.get("/templates/tpl").await.expect(200);
        match t["prebooted"]["state"].as_str() {
            Some("ready") => {
                assert_eq!(t["prebooted"]["init_output"], "tpl-init\n", "{t}");
                break;
            }
            Some("failed") => panic!("the template's snapshot failed: {t}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "not ready in time: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = a
        .post(
            "/sandboxes",
            json!({
                "name": "c",
                "template": "tpl",
                "wait_init": true,
                "files": [
                    file("/home/lohar/notes/n.txt", b"note", Some(0o604)),
                    file("/etc/c.conf", b"c", None),
                ],
            }),
        )
        .await
        .expect(201);
    assert_eq!(v["origin"], "instant", "{v}");
    assert_eq!(
        v["init"],
        json!({"state": "succeeded", "exit_code": 0}),
        "{v}"
    );
    assert_eq!(init_output(&a, "c").await, ("tpl-init\n".to_string(), 0));
    let (code, out, err) = a
        .sh(
            "c",
            "cat ~/who ~/notes/n.txt; echo; \
             stat -c '%n %a %U' /home/lohar/notes/n.txt /home/lohar/notes /etc/c.conf",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "lohar\nnote\n/home/lohar/notes/n.txt 604 lohar\n/home/lohar/notes 755 lohar\n\
         /etc/c.conf 644 root\n"
    );
    // A fresh boot of an instant create runs no init either.
    stop(&a, "c").await;
    start(&a, "c", true).await;
    assert!(init_session(&a, "c").await.is_none());
    let (_, out, _) = a.sh("c", "cat /etc/c.conf").await;
    assert_eq!(out, "c");

    for sb in ["b", "c"] {
        a.delete(&format!("/sandboxes/{sb}")).await.expect(204);
    }
    a.delete("/templates/tpl").await.expect(204);
    daemon.stop().await;
}

/// The size `stat` printed for the directory line starting with `prefix`
/// (directory sizes depend on the filesystem).
fn dir_size(out: &str, prefix: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("?")
        .to_owned()
}
