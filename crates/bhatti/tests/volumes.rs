//! Volumes on real VMs: data written by one sandbox survives its deletion
//! and is there (same checksum) in the next; read-only by many or
//! read-write by one (also when creates race); stop/start, fresh boots and
//! cold cycles keep the data; resize shows in the guest's filesystem; a
//! clone is independent of its source; ephemeral volumes go with their
//! sandbox; forks of read-write volumes are refused, forks of read-only
//! ones share them.

mod api_support;

use api_support::*;
use bhatti::store::users::UserCaps;
use serde_json::{json, Value};

/// `sha256sum` of a file in the guest (run as the sandbox user).
async fn checksum(c: &Client, sandbox: &str, path: &str) -> String {
    let (code, out, err) = c.sh(sandbox, &format!("sha256sum {path}")).await;
    assert_eq!(code, 0, "sha256sum {path} in {sandbox}: {err}");
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// Size of the filesystem mounted at `path`, MiB.
async fn fs_mb(c: &Client, sandbox: &str, path: &str) -> u64 {
    let (code, out, err) = c.sh(sandbox, &format!("stat -f -c '%b %S' {path}")).await;
    assert_eq!(code, 0, "{err}");
    let n: Vec<u64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(n.len(), 2, "stat -f: {out}");
    (n[0] * n[1]) >> 20
}

fn create_with(name: &str, volumes: Value) -> Value {
    json!({"name": name, "memory_mb": 256, "volumes": volumes})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_outlive_sandboxes() {
    let Some(art) = artifacts("volumes_outlive_sandboxes") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    let key = env.user("alice", UserCaps::default());
    let mut config = env.config();
    config.volumes.max_bytes_per_user = 512 << 20;
    let daemon = Daemon::start(&env, config).await;
    let a = env.client(Some(&key));

    // Bad input changes nothing.
    a.post("/volumes", json!({"name": "Bad", "size_mb": 64}))
        .await
        .expect(400);
    a.post("/volumes", json!({"name": "x", "size_mb": 1}))
        .await
        .expect(400);
    a.post("/volumes", json!({"name": "x", "size_mb": 64, "bogus": 1}))
        .await
        .expect(400);
    a.post("/volumes", json!({"name": "huge", "size_mb": 1024}))
        .await
        .expect(429);
    for bad in ["/etc", "/", "rel", "/proc/x", "/data/../etc", "/lib64"] {
        a.post(
            "/sandboxes",
            create_with("bad", json!([{"name": "data", "mount": bad}])),
        )
        .await
        .expect(400);
    }
    a.post(
        "/sandboxes",
        create_with(
            "bad",
            json!([{"name": "data", "mount": "/d"}, {"name": "other", "mount": "/d"}]),
        ),
    )
    .await
    .expect(400);
    // A volume that does not exist.
    a.post(
        "/sandboxes",
        create_with("bad", json!([{"name": "nope", "mount": "/d"}])),
    )
    .await
    .expect(404);
    assert_eq!(a.get("/volumes").await.expect(200)["volumes"], json!([]));
    assert_eq!(
        a.get("/sandboxes").await.expect(200)["sandboxes"],
        json!([])
    );

    let v = a
        .post("/volumes", json!({"name": "data", "size_mb": 64}))
        .await
        .expect(201);
    assert_eq!(v["size_mb"], 64);
    a.post("/volumes", json!({"name": "data", "size_mb": 64}))
        .await
        .expect(409);

    // 1. Written in one sandbox (owned by the sandbox user), the sandbox
    //    goes through stop/start, a cold cycle and a fresh boot.
    let v = a
        .post(
            "/sandboxes",
            create_with("one", json!([{"name": "data", "mount": "/data"}])),
        )
        .await
        .expect(201);
    let want = json!([{"name": "data", "mount": "/data", "read_only": false}]);
    assert_eq!(v["volumes"], want, "{v}");
    assert_eq!(a.get("/sandboxes/one").await.expect(200)["volumes"], want);
    let (code, out, err) = a
        .sh(
            "one",
            "dd if=/dev/urandom of=/data/blob bs=1M count=4 2>/dev/null && sync && stat -c %u /data",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert_ne!(out.trim(), "0", "the fresh volume belongs to the user");
    let sum = checksum(&a, "one", "/data/blob").await;
    assert_eq!(sum.len(), 64);

    // Attached: no delete, no resize, no second read-write or read-only
    // attachment.
    let e = a.delete("/volumes/data").await.expect_err(409);
    assert!(e.contains("attached"), "{e}");
    a.post("/volumes/data/resize", json!({"size_mb": 128}))
        .await
        .expect(409);
    a.post(
        "/sandboxes",
        create_with("two", json!([{"name": "data", "mount": "/data"}])),
    )
    .await
    .expect(409);
    a.post(
        "/sandboxes",
        create_with(
            "two",
            json!([{"name": "data", "mount": "/data", "read_only": true}]),
        ),
    )
    .await
    .expect(409);
    a.get("/sandboxes/two").await.expect(404);
    let v = a.get("/volumes/data").await.expect(200);
    assert_eq!(v["attachments"][0]["sandbox_name"], "one");
    assert_eq!(v["attachments"][0]["read_only"], false);

    // Fork: refused while the volume is read-write.
    a.post("/sandboxes/one/checkpoint", json!({"name": "cp"}))
        .await
        .expect(201);
    let e = a
        .post("/snapshots/cp/resume", json!({"name": "forked"}))
        .await
        .expect_err(409);
    assert!(e.contains("read-write volume"), "{e}");
    a.delete("/snapshots/cp").await.expect(204);

    // Stop (memory snapshot to disk) and start; then cold (stop) and woken
    // by an exec; then a fresh boot from the disk.
    a.post("/sandboxes/one/stop", json!({})).await.expect(200);
    a.post("/sandboxes/one/start", json!({})).await.expect(200);
    assert_eq!(checksum(&a, "one", "/data/blob").await, sum);
    a.post("/sandboxes/one/stop", json!({})).await.expect(200);
    assert_eq!(
        checksum(&a, "one", "/data/blob").await,
        sum,
        "after a cold cycle"
    );
    a.post("/sandboxes/one/stop", json!({})).await.expect(200);
    // Stopped (cold): still attached.
    a.delete("/volumes/data").await.expect(409);
    a.post("/sandboxes/one/start", json!({"fresh": true}))
        .await
        .expect(200);
    assert_eq!(
        checksum(&a, "one", "/data/blob").await,
        sum,
        "after a fresh boot"
    );

    // 2. The sandbox goes; the volume stays, detached, and grows.
    a.delete("/sandboxes/one").await.expect(204);
    assert_eq!(
        a.get("/volumes/data").await.expect(200)["attachments"],
        json!([])
    );
    // Not larger than now: a conflict with its state; not a size at all: 400.
    a.post("/volumes/data/resize", json!({"size_mb": 32}))
        .await
        .expect(409);
    a.post("/volumes/data/resize", json!({"size_mb": 31}))
        .await
        .expect(400);
    a.post("/volumes/data/resize", json!({"size_mb": 1024}))
        .await
        .expect(429);
    let v = a
        .post("/volumes/data/resize", json!({"size_mb": 128}))
        .await
        .expect(200);
    assert_eq!(v["size_mb"], 128);

    // 3. Read-only by two sandboxes at once; the data intact; the new size
    //    seen; no writes.
    let ro = json!([{"name": "data", "mount": "/mnt/data", "read_only": true}]);
    a.post("/sandboxes", create_with("r1", ro.clone()))
        .await
        .expect(201);
    let v = a
        .post("/sandboxes", create_with("r2", ro.clone()))
        .await
        .expect(201);
    assert_eq!(
        v["volumes"],
        json!([{"name": "data", "mount": "/mnt/data", "read_only": true}])
    );
    for sb in ["r1", "r2"] {
        assert_eq!(checksum(&a, sb, "/mnt/data/blob").await, sum);
        let mb = fs_mb(&a, sb, "/mnt/data").await;
        assert!((100..=128).contains(&mb), "{sb}: {mb} MiB after the resize");
        let (code, _, _) = a.sh(sb, "touch /mnt/data/x").await;
        assert_ne!(code, 0, "a read-only volume took a write");
    }
    // A fork of a sandbox with a read-only volume shares it.
    a.post("/sandboxes/r1/checkpoint", json!({"name": "ro-cp"}))
        .await
        .expect(201);
    a.post("/snapshots/ro-cp/resume", json!({"name": "r3"}))
        .await
        .expect(201);
    assert_eq!(checksum(&a, "r3", "/mnt/data/blob").await, sum);
    assert_eq!(
        a.get("/volumes/data").await.expect(200)["attachments"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    a.delete("/sandboxes/r3").await.expect(204);
    a.delete("/snapshots/ro-cp").await.expect(204);
    // Read-only holders: no read-write attachment now.
    a.post(
        "/sandboxes",
        create_with("w", json!([{"name": "data", "mount": "/d"}])),
    )
    .await
    .expect(409);
    assert_eq!(
        a.get("/volumes/data").await.expect(200)["attachments"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // 4. A clone (allowed while attached read-only) is independent.
    a.post("/volumes/data/clone", json!({"name": "data"}))
        .await
        .expect(409);
    let v = a
        .post("/volumes/data/clone", json!({"name": "copy"}))
        .await
        .expect(201);
    assert_eq!(v["size_mb"], 128);
    a.delete("/sandboxes/r2").await.expect(204);
    a.post(
        "/sandboxes",
        create_with("c", json!([{"name": "copy", "mount": "/copy"}])),
    )
    .await
    .expect(201);
    assert_eq!(checksum(&a, "c", "/copy/blob").await, sum);
    let (code, _, err) = a
        .sh(
            "c",
            "echo changed > /copy/blob && echo new > /copy/new && sync",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    // The source (still mounted read-only in r1) is unchanged.
    assert_eq!(checksum(&a, "r1", "/mnt/data/blob").await, sum);
    let (code, _, _) = a.sh("r1", "test -e /mnt/data/new").await;
    assert_ne!(code, 0, "the clone's write reached its source");
    a.delete("/sandboxes/c").await.expect(204);
    a.delete("/sandboxes/r1").await.expect(204);

    // 5. Ephemeral volumes go with their sandbox; auto_create makes one.
    let v = a
        .post(
            "/sandboxes",
            json!({"name": "eph", "memory_mb": 256,
                "volumes": [{"name": "cache", "mount": "/cache", "auto_create": true, "size_mb": 64}],
                "new_volumes": [{"mount": "/scratch", "size_mb": 64}]}),
        )
        .await
        .expect(201);
    let id = v["id"].as_str().unwrap().to_owned();
    let (code, _, err) = a
        .sh("eph", "echo s > /scratch/s && echo c > /cache/c && mountpoint -q /scratch || grep -q ' /scratch ' /proc/mounts")
        .await;
    assert_eq!(code, 0, "{err}");
    let list = a.get("/volumes").await.expect(200);
    let names: Vec<&str> = list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(names.contains(&"cache"), "{list}");
    let eph = list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["ephemeral_for"] == json!(id))
        .cloned()
        .unwrap_or_else(|| panic!("no ephemeral volume: {list}"));
    let vol_files = |dir: &std::path::Path| -> usize {
        walk(dir)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "ext4"))
            .count()
    };
    let before = vol_files(&env.data_dir().join("volumes"));
    a.delete("/sandboxes/eph").await.expect(204);
    let after = a.get("/volumes").await.expect(200);
    assert!(
        !after.to_string().contains(eph["id"].as_str().unwrap()),
        "{after}"
    );
    assert_eq!(vol_files(&env.data_dir().join("volumes")), before - 1);
    // The auto-created one stays.
    a.get("/volumes/cache").await.expect(200);

    // 6. Detached volumes delete; their files go.
    for name in ["data", "copy", "cache"] {
        a.delete(&format!("/volumes/{name}")).await.expect(204);
    }
    a.delete("/volumes/data").await.expect(404);
    assert_eq!(vol_files(&env.data_dir().join("volumes")), 0);
    assert_eq!(a.get("/volumes").await.expect(200)["volumes"], json!([]));
    daemon.stop().await;
}

/// Concurrent creates racing for one read-write volume: exactly one wins,
/// the others are refused with 409 and leave nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creates_get_a_read_write_volume_once() {
    let Some(art) = artifacts("racing_creates_get_a_read_write_volume_once") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    let key = env.user("bob", UserCaps::default());
    let daemon = Daemon::start(&env, env.config()).await;
    let a = env.client(Some(&key));
    a.post("/volumes", json!({"name": "db", "size_mb": 64}))
        .await
        .expect(201);
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move {
                a.post(
                    "/sandboxes",
                    create_with(
                        &format!("racer-{i}"),
                        json!([{"name": "db", "mount": "/db"}]),
                    ),
                )
                .await
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.expect("task").status.as_u16());
    }
    codes.sort_unstable();
    assert_eq!(codes, [201, 409, 409, 409], "{codes:?}");
    let sbs = a.get("/sandboxes").await.expect(200);
    assert_eq!(sbs["sandboxes"].as_array().map(Vec::len), Some(1), "{sbs}");
    let v = a.get("/volumes/db").await.expect(200);
    assert_eq!(v["attachments"].as_array().map(Vec::len), Some(1), "{v}");
    let winner = sbs["sandboxes"][0]["name"].as_str().unwrap().to_owned();
    let (code, _, err) = a.sh(&winner, "echo ok > /db/ok && sync").await;
    assert_eq!(code, 0, "{err}");
    a.delete(&format!("/sandboxes/{winner}")).await.expect(204);
    a.delete("/volumes/db").await.expect(204);
    daemon.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
