//! A client that goes away in the middle of a state change: create, stop,
//! start, checkpoint, fork and a wake are each cut off while they run (the
//! HTTP connection dropped). Each change still completes, the sandbox works
//! afterwards, and nothing is left behind: one VMM per running sandbox, one
//! TAP per sandbox, no run dir without a sandbox, no checkpoint temp dir.

mod api_support;

use std::time::Duration;

use api_support::*;
use bhatti::store::users::UserCaps;
use bytes::Bytes;
use hyper::Method;
use serde_json::{json, Value};

/// Sends the request and drops the connection after `after`.
async fn cut_off(c: &Client, method: Method, path: &str, body: Value, after: Duration) {
    let c = c.clone();
    let path = path.to_owned();
    let req = tokio::spawn(async move {
        let _ = c
            .open(
                method,
                &path,
                &[("content-type", "application/json")],
                Bytes::from(body.to_string()),
            )
            .await;
    });
    tokio::time::sleep(after).await;
    // The connection goes with the task.
    req.abort();
    let _ = req.await;
}

/// The sandbox's view once it satisfies `pred`.
async fn settles(c: &Client, sb: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    eventually(what, Duration::from_secs(180), || async {
        let r = c.get(&format!("/sandboxes/{sb}")).await;
        (r.status == 200).then(|| r.json()).filter(|v| pred(v))
    })
    .await
}

async fn works(c: &Client, sb: &str) {
    let (code, out, _) = c.sh(sb, "echo alive").await;
    assert_eq!((code, out.trim()), (0, "alive"), "{sb} answers");
}

fn taps(env: &Env) -> usize {
    let out = std::process::Command::new("ip")
        .args(["-n", &env.ns, "-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split(": ").nth(1).is_some_and(|n| n.starts_with("bt")))
        .count()
}

fn dir_entries(p: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Nothing leaked: VMMs, TAPs and run dirs match the sandboxes.
async fn no_leaks(env: &Env, c: &Client) {
    let list = c.get("/sandboxes").await.expect(200);
    let sbs = list["sandboxes"].as_array().expect("sandboxes").clone();
    let hot = sbs.iter().filter(|s| s["thermal"] != "cold").count();
    eventually(
        "one VMM per running sandbox",
        Duration::from_secs(30),
        || async { (env.vmm_pids().len() == hot).then_some(()) },
    )
    .await;
    assert_eq!(taps(env), sbs.len(), "one TAP per sandbox");
    let ids: Vec<String> = sbs
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    for d in dir_entries(&env.data_dir().join("run")) {
        assert!(ids.contains(&d), "run dir {d} belongs to no sandbox");
    }
    for d in dir_entries(&env.data_dir().join("sandboxes")) {
        assert!(ids.contains(&d), "sandbox dir {d} belongs to no sandbox");
    }
    for d in dir_entries(&env.data_dir().join("checkpoints")) {
        assert!(!d.ends_with(".tmp"), "checkpoint temp dir {d} left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_requests_still_complete_and_leak_nothing() {
    let Some(art) = artifacts("cut_off_requests_still_complete_and_leak_nothing") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    let key = env.user(
        "alice",
        UserCaps {
            max_snapshots: Some(2),
            ..Default::default()
        },
    );
    let daemon = Daemon::start(&env, env.config()).await;
    let a = env.client(Some(&key));

    // Create, cut off while the VM boots.
    cut_off(
        &a,
        Method::POST,
        "/sandboxes",
        json!({"name": "one"}),
        Duration::from_millis(800),
    )
    .await;
    settles(&a, "one", "the create to finish", |v| {
        v["status"] == "running"
    })
    .await;
    works(&a, "one").await;
    a.put("/sandboxes/one/files?path=/home/lohar/mark", "kept\n")
        .await
        .expect(200);
    no_leaks(&env, &a).await;

    // Stop, cut off while the snapshot is written.
    cut_off(
        &a,
        Method::POST,
        "/sandboxes/one/stop",
        json!({}),
        Duration::from_millis(150),
    )
    .await;
    settles(&a, "one", "the stop to finish", |v| {
        v["status"] == "stopped" && v["thermal"] == "cold"
    })
    .await;
    no_leaks(&env, &a).await;

    // Start, cut off while it restores.
    cut_off(
        &a,
        Method::POST,
        "/sandboxes/one/start",
        json!({}),
        Duration::from_millis(150),
    )
    .await;
    settles(&a, "one", "the start to finish", |v| {
        v["status"] == "running" && v["thermal"] == "hot"
    })
    .await;
    works(&a, "one").await;
    let (_, out, _) = a.sh("one", "cat /home/lohar/mark").await;
    assert_eq!(out, "kept\n");

    // Checkpoint, cut off while it is taken.
    cut_off(
        &a,
        Method::POST,
        "/sandboxes/one/checkpoint",
        json!({"name": "cp"}),
        Duration::from_millis(150),
    )
    .await;
    eventually(
        "the checkpoint to exist",
        Duration::from_secs(120),
        || async {
            let v = a.get("/snapshots").await.expect(200);
            v["snapshots"]
                .as_array()
                .is_some_and(|s| s.iter().any(|c| c["name"] == "cp"))
                .then_some(())
        },
    )
    .await;
    works(&a, "one").await;
    no_leaks(&env, &a).await;

    // Fork, cut off while the copy restores.
    cut_off(
        &a,
        Method::POST,
        "/snapshots/cp/resume",
        json!({"name": "two"}),
        Duration::from_millis(300),
    )
    .await;
    settles(&a, "two", "the fork to finish", |v| {
        v["status"] == "running"
    })
    .await;
    works(&a, "two").await;
    let (_, out, _) = a.sh("two", "cat /home/lohar/mark; hostname").await;
    assert_eq!(out, "kept\ntwo\n");
    no_leaks(&env, &a).await;

    // A wake (a request to a cold sandbox), cut off while it restores.
    a.post("/sandboxes/two/stop", json!({})).await.expect(200);
    cut_off(
        &a,
        Method::POST,
        "/sandboxes/two/exec",
        json!({"cmd": ["true"]}),
        Duration::from_millis(100),
    )
    .await;
    settles(&a, "two", "the wake to finish", |v| v["thermal"] == "hot").await;
    works(&a, "two").await;
    no_leaks(&env, &a).await;

    // A stop while an exec runs: the stop wins, the exec answers 409 (not
    // a 502, as if the guest had failed).
    let running = {
        let a = a.clone();
        tokio::spawn(async move {
            a.post(
                "/sandboxes/two/exec",
                json!({"cmd": ["sh", "-c", "touch /tmp/started; sleep 60"]}),
            )
            .await
        })
    };
    eventually("the exec to start", Duration::from_secs(60), || async {
        let r = a.get("/sandboxes/two/files?path=/tmp/started").await;
        (r.status == 200).then_some(())
    })
    .await;
    a.post("/sandboxes/two/stop", json!({})).await.expect(200);
    let cut = running.await.expect("the exec's task");
    assert_eq!(cut.status, 409, "{:?}", cut.body);
    assert!(
        cut.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("stopped")),
        "{:?}",
        cut.body
    );
    works(&a, "two").await;
    no_leaks(&env, &a).await;

    // Concurrent checkpoints reserve their place before the work: with one
    // of two allowed taken, exactly one of three more gets through.
    let (r1, r2, r3) = tokio::join!(
        a.post("/sandboxes/one/checkpoint", json!({"name": "c1"})),
        a.post("/sandboxes/one/checkpoint", json!({"name": "c2"})),
        a.post("/sandboxes/two/checkpoint", json!({"name": "c3"})),
    );
    let mut codes: Vec<u16> = [r1, r2, r3].iter().map(|r| r.status.as_u16()).collect();
    codes.sort_unstable();
    assert_eq!(codes, [201, 429, 429]);
    let v = a.get("/snapshots").await.expect(200);
    assert_eq!(v["snapshots"].as_array().map(Vec::len), Some(2), "{v}");
    no_leaks(&env, &a).await;

    // Destroy both; nothing remains.
    for sb in ["one", "two"] {
        a.delete(&format!("/sandboxes/{sb}")).await.expect(204);
    }
    no_leaks(&env, &a).await;
    daemon.stop().await;
}
