//! Recovery from truth: the daemon (`bhatti serve`, a child process) dies
//! at each step of a stop and of a fork (an abort at a named crash point,
//! as SIGKILL or a power cut would), and the next daemon makes things
//! whole: every sandbox works, exactly one VMM runs per running sandbox, a
//! fork that never finished is rolled back, and no run dir, sandbox dir or
//! checkpoint temp dir is left without an owner.

mod api_support;

use std::time::Duration;

use api_support::*;
use bhatti::store::users::UserCaps;
use serde_json::{json, Value};

const STOP_POINTS: &[&str] = &[
    "stop:synced",
    "stop:paused",
    "stop:written",
    "stop:renamed",
    "stop:killed",
];
const FORK_POINTS: &[&str] = &[
    "fork:recorded",
    "fork:disk",
    "fork:restored",
    "fork:reidentified",
];

fn names(v: &Value) -> Vec<String> {
    v["sandboxes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Every sandbox answers; one VMM per sandbox with a live VM; nothing on
/// disk without an owner.
async fn whole(env: &Env, c: &Client, point: &str) {
    let list = c.get("/sandboxes").await.expect(200);
    for name in names(&list) {
        let (code, out, err) = c.sh(&name, "echo ok").await;
        assert_eq!(
            (code, out.trim()),
            (0, "ok"),
            "after {point}: {name}: {err}"
        );
    }
    let list = c.get("/sandboxes").await.expect(200);
    let sbs = list["sandboxes"].as_array().expect("sandboxes").clone();
    let live = sbs.iter().filter(|s| s["thermal"] != "cold").count();
    eventually(
        &format!("one VMM per sandbox after {point}"),
        Duration::from_secs(30),
        || async { (env.vmm_pids().len() == live).then_some(()) },
    )
    .await;
    let ids: Vec<String> = sbs
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    for d in dir_entries(&env.data_dir().join("run")) {
        assert!(
            ids.contains(&d),
            "after {point}: run dir {d} has no sandbox"
        );
    }
    for d in dir_entries(&env.data_dir().join("sandboxes")) {
        assert!(
            ids.contains(&d),
            "after {point}: sandbox dir {d} has no sandbox"
        );
    }
    for d in dir_entries(&env.data_dir().join("checkpoints")) {
        assert!(!d.ends_with(".tmp"), "after {point}: temp dir {d}");
    }
}

/// Runs `op` against a daemon that aborts at `point`, then starts a normal
/// daemon and returns it.
async fn crash_at(env: &Env, n: &mut u32, point: &str, op: impl AsyncFnOnce()) -> Proc {
    *n += 1;
    let mut crashing = Proc::spawn_with(env, *n, &[("BHATTI_CRASH_AT", point)]);
    ready(env, &mut crashing, *n).await;
    op().await;
    let status = crashing.wait_exit(Duration::from_secs(120)).await;
    assert!(
        !status.success(),
        "the daemon should have aborted at {point}"
    );
    *n += 1;
    let mut d = Proc::spawn(env, *n);
    ready(env, &mut d, *n).await;
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_mid_stop_and_mid_fork_recover() {
    let Some(art) = artifacts("crashes_mid_stop_and_mid_fork_recover") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let env = Env::new(art);
    env.write_config(&env.config());
    let key = env.user("alice", UserCaps::default());
    let a = env.client(Some(&key));
    let mut n = 1;
    let mut daemon = Proc::spawn(&env, n);
    ready(&env, &mut daemon, n).await;
    a.post("/sandboxes", json!({"name": "src"}))
        .await
        .expect(201);
    a.put("/sandboxes/src/files?path=/home/lohar/mark", "kept\n")
        .await
        .expect(200);
    a.post("/sandboxes/src/checkpoint", json!({"name": "cp"}))
        .await
        .expect(201);
    drop(daemon);

    for point in STOP_POINTS {
        daemon = crash_at(&env, &mut n, point, async || {
            // The answer never comes: the daemon dies on the way.
            let _ = a
                .try_send(
                    hyper::Method::POST,
                    "/sandboxes/src/stop",
                    &[("content-type", "application/json")],
                    bytes::Bytes::from("{}"),
                )
                .await;
        })
        .await;
        whole(&env, &a, point).await;
        let (_, out, _) = a.sh("src", "cat /home/lohar/mark").await;
        assert_eq!(out, "kept\n", "after {point}");
        drop(daemon);
    }

    for (i, point) in FORK_POINTS.iter().enumerate() {
        let name = format!("fork{i}");
        daemon = crash_at(&env, &mut n, point, async || {
            let _ = a
                .try_send(
                    hyper::Method::POST,
                    "/snapshots/cp/resume",
                    &[("content-type", "application/json")],
                    bytes::Bytes::from(json!({"name": name}).to_string()),
                )
                .await;
        })
        .await;
        // Never acknowledged, so rolled back: the name is free again.
        let list = a.get("/sandboxes").await.expect(200);
        assert!(!names(&list).contains(&name), "after {point}: {list}");
        whole(&env, &a, point).await;
        let v = a
            .post("/snapshots/cp/resume", json!({"name": name}))
            .await
            .expect(201);
        assert_eq!(v["status"], "running");
        let (_, out, _) = a.sh(&name, "cat /home/lohar/mark; hostname").await;
        assert_eq!(out, format!("kept\n{name}\n"), "after {point}");
        a.delete(&format!("/sandboxes/{name}")).await.expect(204);
        whole(&env, &a, point).await;
        drop(daemon);
    }
}
