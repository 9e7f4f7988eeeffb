//! `GET /metrics` on a real daemon with one real VM: closed without a
//! token (404), refused with a wrong one (401), and with the right one a
//! parseable OpenMetrics text whose counters follow what happened (an
//! exec, a warm sandbox woken); the separate `[metrics] listen` listener
//! serves the same without auth.

mod api_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use api_support::*;
use bhatti::store::users::UserCaps;
use serde_json::json;

const TOKEN: &str = "metrics-secret-0123456789";

/// One sample: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A small OpenMetrics/Prometheus text parser: `# TYPE` lines give the
/// families; sample lines are `name{k="v",…} value`. Panics on anything
/// else (the test's point is that the text parses).
fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE line");
            types.insert(name.to_owned(), ty.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("{line}: {e}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                // Values here never contain `",` (route templates, states).
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label k=\"v\"");
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
        };
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad metric name in {line}"
        );
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    assert!(text.ends_with("# EOF\n"), "no # EOF: {text}");
    (types, samples)
}

/// The value of the sample `name` whose labels include `labels`
/// (summed over the others); 0 when absent.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn scrape(c: &Client) -> Vec<Sample> {
    let r = c
        .send(
            hyper::Method::GET,
            "/metrics",
            &[("authorization", &format!("Bearer {TOKEN}"))],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    parse(std::str::from_utf8(&r.body).expect("UTF-8")).1
}

/// A plain HTTP/1.0 GET over TCP: (status line, body).
async fn tcp_get(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("head");
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_requests_and_wakes() {
    let Some(art) = artifacts("metrics_follow_requests_and_wakes") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();

    // A daemon without [metrics]: /metrics is not there, with a JSON error.
    let plain_env = Env::new(art.clone());
    let plain = Daemon::start(&plain_env, plain_env.config()).await;
    let r = plain_env
        .client(Some(TOKEN))
        .get("/metrics")
        .await
        .expect_err(404);
    assert!(r.contains("[metrics]"), "{r}");

    let env = Env::new(art);
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut cfg = env.config();
    cfg.network.enabled = false;
    cfg.metrics.token = TOKEN.into();
    cfg.metrics.listen = Some(listen);
    cfg.thermal.warm_after_secs = 2;
    cfg.thermal.cold_after_secs = 0;
    cfg.thermal.sweep_interval_ms = 200;
    let daemon = Daemon::start(&env, cfg).await;
    let key = env.user("alice", UserCaps::default());
    let alice = env.client(Some(&key));
    let anon = env.client(None);

    // Refused: no token, a user's key, a wrong token.
    anon.get("/metrics").await.expect_err(401);
    alice.get("/metrics").await.expect_err(401);
    env.client(Some("metrics-secret-wrong-0000"))
        .get("/metrics")
        .await
        .expect_err(401);

    // The right token: every family is there.
    let metrics_client = env.client(Some(TOKEN));
    let r = metrics_client.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        r.headers
    );
    let (types, _) = parse(std::str::from_utf8(&r.body).expect("UTF-8"));
    for (family, ty) in [
        ("bhatti_http_request_duration_seconds", "histogram"),
        ("bhatti_wake_duration_seconds", "histogram"),
        ("bhatti_wake_failures", "counter"),
        ("bhatti_snapshot_duration_seconds", "histogram"),
        ("bhatti_snapshot_bytes", "counter"),
        ("bhatti_execs", "counter"),
        ("bhatti_file_operations", "counter"),
        ("bhatti_rate_limited", "counter"),
        ("bhatti_sandboxes", "gauge"),
        ("bhatti_sandboxes_thermal", "gauge"),
        ("bhatti_vmm_processes", "gauge"),
        ("bhatti_process_resident_memory_bytes", "gauge"),
        ("bhatti_process_open_fds", "gauge"),
        ("bhatti_process_threads", "gauge"),
        ("bhatti_tokio_alive_tasks", "gauge"),
    ] {
        assert_eq!(types.get(family).map(String::as_str), Some(ty), "{family}");
    }

    // A sandbox and an exec: the counters and the route's histogram move.
    alice
        .post("/sandboxes", json!({"name": "m"}))
        .await
        .expect(201);
    let before = scrape(&metrics_client).await;
    let exec_route = [
        ("method", "POST"),
        ("route", "/sandboxes/{id}/exec"),
        ("status", "200"),
    ];
    let (code, out, _) = alice.sh("m", "echo hi").await;
    assert_eq!((code, out.trim()), (0, "hi"));
    alice
        .put("/sandboxes/m/files?path=/tmp/x", "data")
        .await
        .expect(200);
    let after = scrape(&metrics_client).await;
    let execs = |s: &[Sample]| value(s, "bhatti_execs_total", &[("op", "exec"), ("result", "ok")]);
    assert_eq!(execs(&after), execs(&before) + 1.0);
    let route_count =
        |s: &[Sample]| value(s, "bhatti_http_request_duration_seconds_count", &exec_route);
    assert_eq!(route_count(&after), route_count(&before) + 1.0);
    assert_eq!(
        value(
            &after,
            "bhatti_file_operations_total",
            &[("op", "write"), ("result", "ok")]
        ),
        1.0
    );
    // Routes are templates: the sandbox's name never appears.
    assert!(
        !after
            .iter()
            .any(|s| s.labels.values().any(|v| v.contains("/sandboxes/m"))),
        "a raw path became a label"
    );
    assert_eq!(value(&after, "bhatti_vmm_processes", &[]), 1.0);
    assert_eq!(
        value(&after, "bhatti_sandboxes", &[("state", "running")]),
        1.0
    );
    for g in [
        "bhatti_process_resident_memory_bytes",
        "bhatti_process_open_fds",
        "bhatti_process_threads",
        "bhatti_tokio_alive_tasks",
    ] {
        assert!(value(&after, g, &[]) > 0.0, "{g} is 0");
    }

    // Idle: it goes warm (scrapes do not count as activity); an exec
    // wakes it and the wake is measured.
    eventually("the sandbox goes warm", Duration::from_secs(120), || {
        let c = &metrics_client;
        async move {
            let s = scrape(c).await;
            (value(&s, "bhatti_sandboxes_thermal", &[("state", "warm")]) == 1.0).then_some(())
        }
    })
    .await;
    let s = scrape(&metrics_client).await;
    assert_eq!(
        value(
            &s,
            "bhatti_snapshot_duration_seconds_count",
            &[("kind", "warm")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "bhatti_wake_duration_seconds_count",
            &[("from", "warm")]
        ),
        0.0
    );
    let (code, _, _) = alice.sh("m", "true").await;
    assert_eq!(code, 0);
    let s = scrape(&metrics_client).await;
    assert_eq!(
        value(
            &s,
            "bhatti_wake_duration_seconds_count",
            &[("from", "warm")]
        ),
        1.0
    );
    assert!(value(&s, "bhatti_wake_duration_seconds_sum", &[("from", "warm")]) > 0.0);

    // The separate listener: the same text, no auth; nothing else there.
    let (status, body) = tcp_get(listen, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    let (_, open) = parse(&body);
    assert_eq!(
        value(
            &open,
            "bhatti_wake_duration_seconds_count",
            &[("from", "warm")]
        ),
        1.0
    );
    let (status, _) = tcp_get(listen, "/sandboxes").await;
    assert!(status.contains(" 404 "), "{status}");

    alice.delete("/sandboxes/m").await.expect(204);
    daemon.stop().await;
    plain.stop().await;
}
