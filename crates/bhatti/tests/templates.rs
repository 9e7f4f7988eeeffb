//! Templates and instant creates (real VMs): a template's pre-booted
//! snapshot is built once (init included); creates from it restore that
//! snapshot with a fresh identity each; a changed kernel or lohar rebuilds
//! it.

mod api_support;

use std::time::{Duration, Instant};

use api_support::*;
use bhatti::store::users::UserCaps;
use serde_json::{json, Value};

/// Polls the template until its snapshot is ready (fails on `failed`).
async fn wait_ready(c: &Client, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let v = c.get(&format!("/templates/{name}")).await.expect(200);
        match v["prebooted"]["state"].as_str() {
            Some("ready") => return v,
            Some("failed") => panic!("the template's snapshot failed: {v}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "not ready in time: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What identifies a guest, read from inside it.
async fn identity(c: &Client, sandbox: &str) -> Vec<String> {
    let (code, out, err) = c
        .sh(
            sandbox,
            "cat ~/init.txt; cat /etc/machine-id; hostname; \
             cat /sys/class/net/eth0/address; \
             head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; echo \"x=$X t=$T\"",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    out.lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instant_creates_from_a_template_get_fresh_identities() {
    let Some(art) = artifacts("instant_creates_from_a_template_get_fresh_identities") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    let key = env.user("alice", UserCaps::default());
    let daemon = Daemon::start(&env, env.config()).await;
    let a = env.client(Some(&key));

    // Bad input changes nothing.
    a.post("/templates", json!({"name": "Bad Name"}))
        .await
        .expect(400);
    a.post("/templates", json!({"name": "x", "bogus": 1}))
        .await
        .expect(400);
    a.post("/templates", json!({"name": "x", "image": "no-such-image"}))
        .await
        .expect(404);
    a.post("/sandboxes", json!({"template": "nope"}))
        .await
        .expect(404);
    assert_eq!(
        a.get("/templates").await.expect(200)["templates"],
        json!([])
    );

    let init = "echo built-$(cat /proc/sys/kernel/random/uuid) > ~/init.txt";
    let t = a
        .post(
            "/templates",
            json!({"name": "web", "init": init, "env": {"T": "tpl"}, "memory_mb": 384}),
        )
        .await
        .expect(201);
    assert_eq!(t["name"], "web");
    a.post("/templates", json!({"name": "web"}))
        .await
        .expect(409);
    let ready = wait_ready(&a, "web").await;
    assert!(ready["prebooted"]["built_at"].is_string(), "{ready}");

    let one = a
        .post("/sandboxes", json!({"name": "one", "template": "web"}))
        .await
        .expect(201);
    let two = a
        .post(
            "/sandboxes",
            json!({"name": "two", "template": "web", "env": {"X": "2"}}),
        )
        .await
        .expect(201);
    for v in [&one, &two] {
        assert_eq!(v["origin"], "instant", "{v}");
        assert_eq!(v["template"], "web", "{v}");
        assert_eq!(v["memory_mb"], 384, "{v}");
    }
    assert_eq!(
        a.get("/sandboxes/one").await.expect(200)["origin"],
        "instant"
    );
    assert_ne!(one["ip"], two["ip"], "IPs");

    let i1 = identity(&a, "one").await;
    let i2 = identity(&a, "two").await;
    assert_eq!(i1.len(), 6, "{i1:?}");
    assert_eq!(i2.len(), 6, "{i2:?}");
    // init ran once, before the snapshot: both see its (one) result.
    assert!(i1[0].starts_with("built-"), "{i1:?}");
    assert_eq!(i1[0], i2[0], "the same init result");
    assert_ne!(i1[1], i2[1], "machine-id");
    assert_eq!(
        (i1[2].as_str(), i2[2].as_str()),
        ("one", "two"),
        "hostnames"
    );
    assert_ne!(i1[3], i2[3], "MAC");
    assert_ne!(i1[4], i2[4], "RNG output");
    assert_eq!(i1[5], "x= t=tpl", "env of one");
    assert_eq!(i2[5], "x=2 t=tpl", "env of two");
    // Each answers on its own address: the guest took the new IP.
    let (code, out, _) = a
        .sh(
            "one",
            &format!(
                "ping -c1 -W5 {} >/dev/null && echo ok",
                two["ip"].as_str().unwrap_or("")
            ),
        )
        .await;
    assert_eq!((code, out.trim()), (0, "ok"), "one reaches two");

    // A template's secrets reach each sandbox at create, not the snapshot.
    a.send(
        hyper::Method::PUT,
        "/secrets/TOKEN",
        &[],
        bytes::Bytes::from(json!({"value": "s3cr3t-v"}).to_string()),
    )
    .await
    .expect(204);
    a.post("/templates", json!({"name": "sec", "secrets": ["TOKEN"]}))
        .await
        .expect(201);
    wait_ready(&a, "sec").await;
    let v = a
        .post("/sandboxes", json!({"name": "three", "template": "sec"}))
        .await
        .expect(201);
    assert_eq!(v["origin"], "instant", "{v}");
    let (_, out, _) = a.sh("three", "echo $TOKEN").await;
    assert_eq!(out.trim(), "s3cr3t-v");

    // A plain create still boots.
    let plain = a
        .post("/sandboxes", json!({"name": "plain"}))
        .await
        .expect(201);
    assert_eq!(plain["origin"], "boot", "{plain}");

    // A deleted template's snapshot goes with it; its sandboxes stay.
    a.delete("/templates/web").await.expect(204);
    a.delete("/templates/sec").await.expect(204);
    a.get("/templates/web").await.expect(404);
    let left: Vec<_> = std::fs::read_dir(env.data_dir().join("checkpoints"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !left.iter().any(|n| n.to_string_lossy().starts_with("pb_")),
        "{left:?}"
    );
    let (code, _, _) = a.sh("one", "true").await;
    assert_eq!(code, 0);

    // The owner's network stays up while they have a pre-booted snapshot
    // (an instant create restores into it) and goes with the last one.
    a.post("/templates", json!({"name": "keep"}))
        .await
        .expect(201);
    wait_ready(&a, "keep").await;
    for name in ["one", "two", "three", "plain"] {
        a.delete(&format!("/sandboxes/{name}")).await.expect(204);
    }
    let bridge = {
        let u = bhatti::store::Store::open(env.data_dir().join("bhatti.db"))
            .expect("store")
            .with(|c| bhatti::store::users::get_by_name(c, "alice"))
            .expect("user")
            .expect("user exists");
        format!("bhatti-u{}", u.net_index)
    };
    let has_bridge = || {
        let links = std::process::Command::new("ip")
            .args(["-n", &env.ns, "-o", "link", "show"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&links.stdout).contains(&format!(" {bridge}:"))
    };
    assert!(has_bridge(), "no sandbox, a snapshot: the bridge stays");
    a.delete("/templates/keep").await.expect(204);
    eventually(
        "the bridge goes with the last snapshot",
        Duration::from_secs(30),
        || async { (!has_bridge()).then_some(()) },
    )
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_or_lohar_change_rebuilds_the_snapshot() {
    let Some(art) = artifacts("a_kernel_or_lohar_change_rebuilds_the_snapshot") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    let key = env.user("bob", UserCaps::default());
    // A lohar of our own, so the test can change it.
    let lohar = env.dir.path().join("lohar");
    std::fs::copy(
        bhatti_testkit::lohar().expect("lohar (BHATTI_LOHAR)"),
        &lohar,
    )
    .expect("copy lohar");
    let mut config = env.config();
    config.images.lohar = lohar.clone();
    let daemon = Daemon::start(&env, config.clone()).await;
    let b = env.client(Some(&key));
    b.post("/templates", json!({"name": "t"})).await.expect(201);
    let first = wait_ready(&b, "t").await["prebooted"]["built_at"].clone();
    daemon.stop().await;

    // A new lohar: the snapshot is rebuilt.
    let mut bytes = std::fs::read(&lohar).expect("lohar");
    bytes.push(0);
    std::fs::write(&lohar, bytes).expect("write lohar");
    let daemon = Daemon::start(&env, config.clone()).await;
    let after_lohar = wait_ready(&b, "t").await["prebooted"]["built_at"].clone();
    assert_ne!(first, after_lohar, "rebuilt for the new lohar");
    let first = after_lohar;
    daemon.stop().await;

    // The same kernel with a byte more: a different file, the same guest.
    let kernel = env.dir.path().join("vmlinux-changed");
    let mut bytes = std::fs::read(&env.art.kernel).expect("kernel");
    bytes.push(0);
    std::fs::write(&kernel, bytes).expect("write kernel");
    config.vm.kernel = kernel;
    let daemon = Daemon::start(&env, config).await;
    let second = wait_ready(&b, "t").await["prebooted"]["built_at"].clone();
    assert_ne!(first, second, "the snapshot was rebuilt for the new kernel");
    let pb: Vec<_> = std::fs::read_dir(env.data_dir().join("checkpoints"))
        .expect("checkpoints dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pb_"))
        .collect();
    assert_eq!(pb.len(), 1, "the stale snapshot was removed");
    let v = b
        .post("/sandboxes", json!({"name": "s", "template": "t"}))
        .await
        .expect(201);
    assert_eq!(v["origin"], "instant", "{v}");
    daemon.stop().await;
}
