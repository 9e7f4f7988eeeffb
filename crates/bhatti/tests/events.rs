//! The event log end to end, on a real daemon (`bhatti serve` as a child
//! process, JSON logs) with one real VM: create, stop, start, a thermal
//! cycle (warm, cold, wake) and destroy produce events with latencies; a
//! quota and a rate limit produce rejections of the right user; `since`
//! pages without gaps or duplicates; another user sees none of it (and 404
//! on the sandbox); the log survives a SIGKILL and the cursor continues;
//! `bhatti events --follow` prints a new event; `bhatti admin events`
//! shows both users; request ids reach the daemon's JSON log. A second
//! test prunes with a tiny retention (no VM).

mod api_support;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use api_support::*;
use bhatti::config::LogFormat;
use bhatti::store::users::UserCaps;
use hyper::Method;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_bhatti");

fn events(v: &Value) -> Vec<Value> {
    v["events"].as_array().cloned().unwrap_or_default()
}

fn ids(v: &[Value]) -> Vec<i64> {
    v.iter().map(|e| e["id"].as_i64().expect("id")).collect()
}

fn of_type<'a>(v: &'a [Value], t: &str) -> Vec<&'a Value> {
    v.iter().filter(|e| e["type"] == t).collect()
}

/// All of a user's events, paged with `since` by `page` at a time.
async fn all_events(c: &Client, query: &str, page: u32) -> Vec<Value> {
    let mut out = Vec::new();
    let mut since = 0;
    loop {
        let v = c
            .get(&format!("/events?since={since}&limit={page}{query}"))
            .await
            .expect(200);
        let list = events(&v);
        let next = v["next"].as_i64().expect("next");
        if list.is_empty() {
            assert_eq!(next, since, "an empty page keeps the cursor");
            return out;
        }
        assert!(list.len() <= page as usize);
        assert_eq!(next, *ids(&list).last().expect("last"));
        since = next;
        out.extend(list);
    }
}

/// The JSON lines of a daemon's log.
fn log_lines(dir: &Path, n: u32) -> Vec<Value> {
    std::fs::read_to_string(dir.join(format!("daemon-{n}.log")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A log line of the request `id` with `status`.
fn logged(dir: &Path, n: u32, id: &str, status: u16, level: &str) -> bool {
    log_lines(dir, n)
        .iter()
        .any(|l| l["span"]["id"] == id && l["fields"]["status"] == status && l["level"] == level)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_log_end_to_end() {
    let Some(art) = artifacts("event_log_end_to_end") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let env = Env::new(art);
    let alice_key = env.user(
        "alice",
        UserCaps {
            max_sandboxes: Some(1),
            ..Default::default()
        },
    );
    let bob_key = env.user("bob", UserCaps::default());
    let mut cfg = env.config();
    cfg.thermal.warm_after_secs = 1;
    cfg.thermal.cold_after_secs = 3;
    cfg.thermal.sweep_interval_ms = 200;
    cfg.log.format = LogFormat::Json;
    cfg.log.level = "debug".into();
    cfg.limits.rate.exec_per_second = 1;
    cfg.limits.rate.exec_burst = 3;
    env.write_config(&cfg);
    let log_env = [("RUST_LOG", "bhatti=debug,info")];
    let mut p = Proc::spawn_with(&env, 1, &log_env);
    ready(&env, &mut p, 1).await;
    let a = env.client(Some(&alice_key));
    let b = env.client(Some(&bob_key));

    // Request ids: the client's is kept, else one is made; both are in the
    // JSON log with the status (a 404 at info).
    let r = a
        .send(
            Method::GET,
            "/sandboxes/nope",
            &[("x-request-id", "evt-404-check")],
            bytes::Bytes::new(),
        )
        .await;
    r.expect_err(404);
    assert_eq!(r.header("x-request-id").as_deref(), Some("evt-404-check"));
    let r = a.get("/sandboxes").await;
    r.expect(200);
    let made = r.header("x-request-id").expect("a request id");
    assert!(!made.is_empty());
    eventually(
        "request ids in the JSON log",
        Duration::from_secs(10),
        || {
            let dir = env.dir.path().to_path_buf();
            let made = made.clone();
            async move {
                (logged(&dir, 1, "evt-404-check", 404, "INFO")
                    && logged(&dir, 1, &made, 200, "DEBUG"))
                .then_some(())
            }
        },
    )
    .await;

    // Create, a quota rejection, stop, start.
    let sb = a
        .post("/sandboxes", json!({"name": "a1"}))
        .await
        .expect(201);
    let id = sb["id"].as_str().expect("id").to_owned();
    a.post("/sandboxes", json!({"name": "a2"}))
        .await
        .expect_err(429);
    a.post("/sandboxes/a1/stop", json!({})).await.expect(200);
    a.post("/sandboxes/a1/start", json!({})).await.expect(200);

    // Bob hits the exec rate limit (burst 3, 1/s) on a sandbox he lacks.
    let mut limited = 0;
    for _ in 0..8 {
        let r = b
            .post("/sandboxes/nope/exec", json!({"cmd": ["true"]}))
            .await;
        match r.status.as_u16() {
            429 => limited += 1,
            404 => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert!(limited >= 4, "{limited} rate-limited");
    // Bob never sees Alice's sandbox or events.
    b.get("/events?sandbox=a1").await.expect_err(404);
    b.get(&format!("/events?sandbox={id}"))
        .await
        .expect_err(404);

    // A thermal cycle: idle → warm → cold, then a request wakes it.
    eventually("warm and cold events", Duration::from_secs(180), || async {
        let v = a.get("/events?type=warm,cold&limit=1000").await.expect(200);
        let l = events(&v);
        (!of_type(&l, "warm").is_empty() && !of_type(&l, "cold").is_empty()).then_some(())
    })
    .await;
    let (code, _, _) = a.sh("a1", "true").await;
    assert_eq!(code, 0);

    let all = all_events(&a, "", 1000).await;
    let lat = |t: &str| -> f64 {
        let e = of_type(&all, t);
        let e = e.first().unwrap_or_else(|| panic!("no {t} event: {all:?}"));
        assert_eq!(e["sandbox_id"], id.as_str(), "{e}");
        e["latency_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("{t} without latency: {e}"))
    };
    for t in ["create", "stop", "start", "wake"] {
        assert!(lat(t) > 0.0, "{t}");
    }
    eprintln!(
        "== event latencies (ms): create {:.0}, stop {:.0}, start {:.0}, warm {:.1}, cold {:.0}, wake {:.0}",
        lat("create"),
        lat("stop"),
        lat("start"),
        lat("warm"),
        lat("cold"),
        lat("wake")
    );
    assert!(lat("warm") >= 0.0 && lat("cold") >= 0.0);
    let quota = of_type(&all, "quota_rejected");
    assert_eq!(quota.len(), 1, "{all:?}");
    assert!(quota[0].get("sandbox_id").is_none());
    assert!(
        of_type(&all, "rate_limited").is_empty(),
        "bob's, not alice's"
    );
    let mut sorted = ids(&all);
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, ids(&all), "ascending, no duplicates");
    // Small pages give the same events, no gaps, no duplicates.
    assert_eq!(ids(&all_events(&a, "", 2).await), ids(&all));
    // Filters: by sandbox (a name works), by type.
    let by_sb = all_events(&a, "&sandbox=a1", 3).await;
    assert_eq!(by_sb.len(), all.len() - 1, "all but the quota rejection");
    let starts = all_events(&a, "&type=start,stop", 1).await;
    assert_eq!(starts.len(), 2);

    // Bob's: the coalesced rate limits, nothing of alice's.
    let bobs = eventually(
        "bob's rate_limited events",
        Duration::from_secs(10),
        || async {
            let l = events(&b.get("/events?limit=1000").await.expect(200));
            let n: u64 = of_type(&l, "rate_limited")
                .iter()
                .map(|e| {
                    let d = e["detail"].as_str().expect("detail");
                    d.split(' ')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .expect("count")
                })
                .sum();
            (n == limited).then_some(l)
        },
    )
    .await;
    assert!(bobs.iter().all(|e| e["type"] == "rate_limited"), "{bobs:?}");
    assert!(
        of_type(&bobs, "rate_limited").len() <= 2,
        "coalesced: {bobs:?}"
    );

    // Bad queries: 400 with a reason.
    for q in [
        "type=nope",
        "type=wake,bogus",
        "since=-1",
        "since=abc",
        "limit=0",
        "limit=-5",
        "limit=x",
        "limit=1001",
        "type=wake,",
        "type=wake,%20cold",
        "colour=red",
    ] {
        let e = a.get(&format!("/events?{q}")).await.expect_err(400);
        assert!(!e.is_empty(), "{q}");
    }
    // The largest page, and an empty `type` (all kinds).
    a.get("/events?limit=1000&type=").await.expect(200);

    // SIGKILL and a restart: the log is still there, the cursor continues.
    p.signal(nix::sys::signal::Signal::SIGKILL);
    p.wait_exit(Duration::from_secs(10)).await;
    let mut p = Proc::spawn_with(&env, 2, &log_env);
    ready(&env, &mut p, 2).await;
    let after = all_events(&a, "", 1000).await;
    assert_eq!(
        ids(&after[..all.len()]),
        ids(&all),
        "kept across the restart"
    );
    let recovered = eventually("the recovered event", Duration::from_secs(10), || async {
        let l = all_events(&a, "&type=recovered", 100).await;
        l.into_iter().next()
    })
    .await;
    assert_eq!(recovered["sandbox_id"], id.as_str());
    assert!(recovered["id"].as_i64() > ids(&all).last().copied());

    // `bhatti events --follow --json` prints the destroy as it happens.
    let home = tempfile::tempdir().expect("home");
    let since = all_events(&a, "", 1000)
        .await
        .last()
        .and_then(|e| e["id"].as_i64())
        .unwrap_or(0);
    let url = format!("unix://{}", env.sock().display());
    let mut follow = Command::new(BIN)
        .args([
            "events",
            "--follow",
            "--json",
            "--since",
            &since.to_string(),
        ])
        .env_remove("BHATTI_CONFIG")
        .env("HOME", home.path())
        .env("BHATTI_URL", &url)
        .env("BHATTI_TOKEN", &alice_key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn bhatti events --follow");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = follow.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    a.delete("/sandboxes/a1").await.expect(204);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let destroy = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("bhatti events --follow printed the destroy within 60 s");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["id"].as_i64() > Some(since), "only new events: {v}");
        if v["type"] == "destroy" {
            break v;
        }
    };
    assert_eq!(destroy["sandbox_id"], id.as_str());
    assert!(destroy["latency_ms"].as_f64().is_some());
    let _ = follow.kill();
    let _ = follow.wait();

    // `bhatti admin events` on the host: both users, with their names.
    let cfg_path = env.dir.path().join("bhatti.toml");
    let admin = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["admin", "events", "--config"])
            .arg(&cfg_path)
            .args(args)
            .env("HOME", home.path())
            .output()
            .expect("bhatti admin events");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let v: Value = serde_json::from_str(&admin(&["--json", "--limit", "1000"])).expect("JSON");
    let list = events(&v);
    let users: std::collections::BTreeSet<&str> =
        list.iter().filter_map(|e| e["user"].as_str()).collect();
    assert_eq!(users, ["alice", "bob"].into_iter().collect(), "{v}");
    assert_eq!(of_type(&list, "daemon_start").len(), 2, "{v}");
    let only_bob: Value = serde_json::from_str(&admin(&["--json", "--user", "bob"])).expect("JSON");
    assert!(events(&only_bob).iter().all(|e| e["user"] == "bob"));
    let text = admin(&["--type", "create,destroy"]);
    assert!(text.contains("alice") && text.contains("destroy"), "{text}");

    p.signal(nix::sys::signal::Signal::SIGTERM);
    p.wait_exit(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_pruned_to_the_retention() {
    let Some(art) = artifacts("events_are_pruned_to_the_retention") else {
        return;
    };
    let env = Env::new(art);
    let key = env.user(
        "carol",
        UserCaps {
            max_sandboxes: Some(0),
            ..Default::default()
        },
    );
    let mut cfg = env.config();
    cfg.events.max_count = 3;
    cfg.events.prune_interval_secs = 1;
    let d = Daemon::start(&env, cfg).await;
    let c = env.client(Some(&key));
    // Each refused create is a quota_rejected event (no VM boots).
    for _ in 0..6 {
        c.post("/sandboxes", json!({})).await.expect_err(429);
    }
    let newest = |l: &[Value]| ids(l).last().copied();
    let first = eventually("pruned to 3", Duration::from_secs(15), || async {
        let l = events(&c.get("/events?limit=1000").await.expect(200));
        (l.len() == 3).then_some(l)
    })
    .await;
    c.post("/sandboxes", json!({})).await.expect_err(429);
    eventually(
        "the oldest pruned again",
        Duration::from_secs(15),
        || async {
            let l = events(&c.get("/events?limit=1000").await.expect(200));
            (l.len() == 3 && newest(&l) > newest(&first) && l[0]["id"] != first[0]["id"])
                .then_some(())
        },
    )
    .await;
    // The table itself holds no more (the daemon's own events went too).
    let store = bhatti::store::Store::open(env.data_dir().join("bhatti.db")).expect("store");
    let total = store
        .with(|c| bhatti::store::events::count(c, &Default::default()))
        .expect("count");
    assert_eq!(total, 3);
    d.stop().await;
}
