//! Volume backups through the API, on real VMs and a real S3 server (moto
//! on 127.0.0.1, checking SigV4): a file written in a sandbox is backed
//! up, overwritten, restored into the volume and into a new volume (same
//! sha256 in the guest); a schedule keeps the newest N; wrong credentials
//! give clear errors and change neither the volume nor its backups; bad
//! input is refused; without `[backups]` the routes say so.

mod api_support;

use std::time::Duration;

use api_support::*;
use bhatti::config::BackupsConfig;
use bhatti::store::users::UserCaps;
use bhatti_testkit::s3::S3Server;
use serde_json::{json, Value};

async fn checksum(c: &Client, sandbox: &str, path: &str) -> String {
    let (code, out, err) = c.sh(sandbox, &format!("sha256sum {path}")).await;
    assert_eq!(code, 0, "sha256sum {path} in {sandbox}: {err}");
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

fn create_with(name: &str, volume: &str) -> Value {
    json!({"name": name, "memory_mb": 256, "volumes": [{"name": volume, "mount": "/data"}]})
}

fn backups_config(s: &S3Server, secret: &str) -> BackupsConfig {
    BackupsConfig {
        endpoint: s.endpoint.clone(),
        bucket: s.bucket.clone(),
        access_key_id: s.access_key_id.clone(),
        secret_access_key: secret.to_owned(),
        prefix: "vb".into(),
        part_size_mb: 5,
        ..Default::default()
    }
}

/// Polls a backup until it is no longer running; returns it.
async fn finished(c: &Client, volume: &str, id: &str) -> Value {
    let path = format!("/volumes/{volume}/backups/{id}");
    eventually("the backup to end", Duration::from_secs(120), || async {
        let b = c.get(&path).await.expect(200);
        (b["state"] != "running").then_some(b)
    })
    .await
}

/// Starts a backup and waits for it; returns it `done`.
async fn backup(c: &Client, volume: &str) -> Value {
    let b = c
        .post(&format!("/volumes/{volume}/backups"), json!({}))
        .await
        .expect(202);
    assert_eq!(b["state"], "running");
    let id = b["id"].as_str().expect("id").to_owned();
    let b = finished(c, volume, &id).await;
    assert_eq!(b["state"], "done", "{b}");
    b
}

/// `bhatti ARGS` against the daemon as `key`: (exit code, stdout, stderr).
async fn cli(env: &Env, key: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_bhatti"))
        .args(args)
        .env("BHATTI_URL", format!("unix://{}", env.sock().display()))
        .env("BHATTI_TOKEN", key)
        .env_remove("BHATTI_CONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run bhatti");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ids(list: &Value) -> Vec<String> {
    list["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .filter(|b| b["state"] == "done")
        .map(|b| b["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_backups_round_trip() {
    let Some(art) = artifacts("volume_backups_round_trip") else {
        return;
    };
    if let Some(why) = bhatti_testkit::s3::missing() {
        bhatti_testkit::skip("volume_backups_round_trip", &format!("no {why}"));
        return;
    }
    let _serial = SERIAL.lock().await;
    init_tracing();
    let s3 = S3Server::start("volume-backups");
    let env = Env::new(art);
    let key = env.user("alice", UserCaps::default());
    let bob = env.user("bob", UserCaps::default());
    let a = env.client(Some(&key));
    let b = env.client(Some(&bob));

    // Without [backups]: a clear 409, nothing recorded.
    let daemon = Daemon::start(&env, env.config()).await;
    a.post("/volumes", json!({"name": "data", "size_mb": 64}))
        .await
        .expect(201);
    let e = a
        .post("/volumes/data/backups", json!({}))
        .await
        .expect_err(409);
    assert!(e.contains("not configured"), "{e}");
    assert_eq!(
        a.get("/volumes/data/backups").await.expect(200)["backups"],
        json!([])
    );
    daemon.stop().await;

    let mut config = env.config();
    config.backups = backups_config(&s3, &s3.secret_access_key);
    let daemon = Daemon::start(&env, config.clone()).await;

    // 1. Written in a sandbox (not synced: the backup's copy flushes the
    // guest) and backed up while the sandbox runs with it read-write.
    a.post("/sandboxes", create_with("one", "data"))
        .await
        .expect(201);
    let (code, _, err) = a
        .sh(
            "one",
            "dd if=/dev/urandom of=/data/blob bs=1M count=4 2>/dev/null",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let sum = checksum(&a, "one", "/data/blob").await;

    // 2. Backed up; another user sees none of it.
    let first = backup(&a, "data").await;
    let (code, out, _) = a.sh("one", "echo still-here").await;
    assert_eq!((code, out.trim()), (0, "still-here"), "the sandbox goes on");
    a.delete("/sandboxes/one").await.expect(204);
    let id = first["id"].as_str().expect("id").to_owned();
    assert_eq!(first["raw_bytes"], 64u64 << 20);
    assert!(first["stored_bytes"].as_u64().unwrap_or(0) > 4 << 20);
    assert_eq!(
        ids(&a.get("/volumes/data/backups").await.expect(200)),
        std::slice::from_ref(&id)
    );
    b.get(&format!("/volumes/data/backups/{id}"))
        .await
        .expect(404);
    assert_eq!(
        b.get("/volumes/data/backups").await.expect(200)["backups"],
        json!([])
    );
    b.post("/volumes/data/restore", json!({"backup": id}))
        .await
        .expect(404);

    // 3. Overwritten in a new sandbox; restore refused while attached.
    a.post("/sandboxes", create_with("two", "data"))
        .await
        .expect(201);
    let (code, _, err) = a
        .sh(
            "two",
            "dd if=/dev/urandom of=/data/blob bs=1M count=4 2>/dev/null && sync",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert_ne!(checksum(&a, "two", "/data/blob").await, sum);
    let e = a
        .post("/volumes/data/restore", json!({"backup": id}))
        .await
        .expect_err(409);
    assert!(e.contains("attached"), "{e}");
    a.delete("/sandboxes/two").await.expect(204);

    // Bad input changes nothing.
    a.post("/volumes/data/restore", json!({"backup": "../x"}))
        .await
        .expect(400);
    a.post("/volumes/data/restore", json!({"backup": id, "bogus": 1}))
        .await
        .expect(400);
    a.post(
        "/volumes/data/restore",
        json!({"backup": id, "into": "Bad"}),
    )
    .await
    .expect(400);
    a.post(
        "/volumes/data/restore",
        json!({"backup": "20260101T000000000Z-00000000"}),
    )
    .await
    .expect(404);
    a.post(
        "/volumes/data/restore",
        json!({"backup": id, "into": "data"}),
    )
    .await
    .expect(409);

    // 4. Restored into the volume and into a new one: same sha256.
    let r = a
        .post("/volumes/data/restore", json!({"backup": id}))
        .await
        .expect(200);
    assert_eq!(r["sha256"], first["sha256"]);
    let r = a
        .post(
            "/volumes/data/restore",
            json!({"backup": id, "into": "copy"}),
        )
        .await
        .expect(200);
    assert_eq!(r["volume"], "copy");
    assert_eq!(a.get("/volumes/copy").await.expect(200)["size_mb"], 64);
    a.post("/sandboxes", create_with("three", "data"))
        .await
        .expect(201);
    assert_eq!(
        checksum(&a, "three", "/data/blob").await,
        sum,
        "restored in place"
    );
    a.post("/sandboxes", create_with("four", "copy"))
        .await
        .expect(201);
    assert_eq!(
        checksum(&a, "four", "/data/blob").await,
        sum,
        "restored into a new volume"
    );
    a.delete("/sandboxes/three").await.expect(204);
    a.delete("/sandboxes/four").await.expect(204);

    // The CLI: back up and wait, list, restore into a new volume; errors
    // exit 1 with the daemon's words.
    let (code, out, err) = cli(
        &env,
        &key,
        &["volume", "backup", "data", "--wait", "--json"],
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    let made: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(made["state"], "done");
    let made_id = made["id"].as_str().expect("id").to_owned();
    let (code, out, err) = cli(&env, &key, &["volume", "backups", "data"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&made_id) && out.contains(&id), "{out}");
    let (code, out, err) = cli(
        &env,
        &key,
        &["volume", "restore", "data", &made_id, "--into", "cli-copy"],
    )
    .await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(a.get("/volumes/cli-copy").await.expect(200)["size_mb"], 64);
    a.delete("/volumes/cli-copy").await.expect(204);
    let (code, _, err) = cli(&env, &key, &["volume", "restore", "data", "../x"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a backup id"), "{err}");
    let (code, _, err) = cli(&env, &key, &["volume", "schedule", "data"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no backup schedule"), "{err}");

    // 5. Retention: two more manual backups (4 in all), then a schedule
    //    keeping 2 runs (within a minute) and leaves the newest 2.
    a.put(
        "/volumes/data/backup-schedule",
        serde_json::to_vec(&json!({"cron": "not cron", "keep_last": 2})).expect("json"),
    )
    .await
    .expect(400);
    a.put(
        "/volumes/data/backup-schedule",
        serde_json::to_vec(&json!({"cron": "* * * * *", "keep_last": 0})).expect("json"),
    )
    .await
    .expect(400);
    a.get("/volumes/data/backup-schedule").await.expect(404);
    backup(&a, "data").await;
    let third = backup(&a, "data").await;
    assert_eq!(
        ids(&a.get("/volumes/data/backups").await.expect(200)).len(),
        4
    );
    let s = a
        .put(
            "/volumes/data/backup-schedule",
            serde_json::to_vec(&json!({"cron": "* * * * *", "keep_last": 2})).expect("json"),
        )
        .await
        .expect(200);
    assert_eq!(s["keep_last"], 2);
    assert!(s["next_at"].is_string(), "{s}");
    let s = eventually("the scheduled backup", Duration::from_secs(150), || async {
        let s = a.get("/volumes/data/backup-schedule").await.expect(200);
        s.get("last_at").and_then(Value::as_str).map(|_| s.clone())
    })
    .await;
    assert!(s.get("last_error").is_none(), "{s}");
    let kept = ids(&a.get("/volumes/data/backups").await.expect(200));
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(!kept.contains(&id), "the oldest went");
    assert!(kept.contains(&third["id"].as_str().unwrap_or_default().to_owned()));
    a.delete("/volumes/data/backup-schedule").await.expect(204);
    a.get("/volumes/data/backup-schedule").await.expect(404);
    daemon.stop().await;

    // 6. Wrong credentials: clear errors; the volume and the backups stay.
    let mut wrong = config.clone();
    wrong.backups = backups_config(&s3, "not-the-secret");
    let daemon = Daemon::start(&env, wrong).await;
    let started = a.post("/volumes/data/backups", json!({})).await.expect(202);
    let failed = finished(&a, "data", started["id"].as_str().expect("id")).await;
    assert_eq!(failed["state"], "failed");
    let why = failed["error"].as_str().unwrap_or_default();
    assert!(why.contains("refused the credentials"), "{failed}");
    let e = a
        .post("/volumes/data/restore", json!({"backup": kept[0]}))
        .await
        .expect_err(502);
    assert!(e.contains("refused the credentials"), "{e}");
    let e = a
        .delete(&format!("/volumes/data/backups/{}", kept[0]))
        .await
        .expect_err(502);
    assert!(e.contains("refused the credentials"), "{e}");
    a.post(
        "/volumes/data/restore",
        json!({"backup": kept[0], "into": "other"}),
    )
    .await
    .expect(502);
    a.get("/volumes/other").await.expect(404);
    daemon.stop().await;

    // With the right key again: both backups are there and restore.
    let daemon = Daemon::start(&env, config).await;
    let now = ids(&a.get("/volumes/data/backups").await.expect(200));
    assert_eq!(now, kept);
    a.delete(&format!("/volumes/data/backups/{}", kept[1]))
        .await
        .expect(204);
    a.post("/sandboxes", create_with("five", "data"))
        .await
        .expect(201);
    assert_eq!(checksum(&a, "five", "/data/blob").await, sum, "unchanged");
    a.delete("/sandboxes/five").await.expect(204);
    daemon.stop().await;
}
