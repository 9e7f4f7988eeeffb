//! The soak driver shared by `crates/bhatti/tests/soak.rs` (3 minutes in
//! CI) and `bench/src/bin/soak-bench.rs` (an hour): `bhatti serve` as a
//! child process (so `/proc/<pid>` is the daemon's alone), N sandboxes,
//! and M concurrent clients doing exec, file write + read-back and
//! WebSocket exec work until the time is up. One sandbox at a time rests
//! (no client touches it for [`Spec::rest`]), so with short thermal
//! timers each goes warm and cold and is woken again during the run.
//!
//! Every request is accounted for (ok or failed, by operation, each
//! failure with its error); the daemon's RSS, open fds, threads and tokio
//! tasks are sampled every [`Spec::sample_every`], and [`Report`] gives
//! their least-squares slopes and the latency percentiles by operation.
//!
//! The caller prepares the daemon: config file (with `[metrics] token`
//! and rate limits off), data dir, network namespace, one user's key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Longest any one operation may take before it counts as failed.
const OP_TIMEOUT: Duration = Duration::from_secs(180);
/// Failures kept with their text (the rest are only counted).
const MAX_FAILURE_TEXTS: usize = 50;
/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The `bhatti` binary.
    pub bin: PathBuf,
    /// `bhatti serve --config <config>`.
    pub config: PathBuf,
    /// The daemon's unix socket (from the config).
    pub sock: PathBuf,
    /// The daemon's stdout and stderr.
    pub log: PathBuf,
    /// A user's API key.
    pub key: String,
    /// `[metrics] token` of the config.
    pub metrics_token: String,
    pub sandboxes: usize,
    pub clients: usize,
    pub duration: Duration,
    pub sample_every: Duration,
    /// Samples before this are left out of the slopes (start-up: caches,
    /// pools and buffers filling).
    pub warmup: Duration,
    /// How long each sandbox rests in turn (longer than the thermal
    /// timers' warm + cold windows, so it goes cold); zero: none rests.
    pub rest: Duration,
}

/// One operation's counts and latencies.
#[derive(Debug, Clone, Serialize)]
pub struct OpStats {
    pub ok: u64,
    pub failed: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One reading of the daemon process.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ResourceSample {
    pub t_secs: f64,
    pub rss_bytes: u64,
    pub open_fds: u64,
    pub threads: u64,
    /// `bhatti_tokio_alive_tasks` from `/metrics`.
    pub tokio_tasks: u64,
}

/// Least-squares slopes per minute over the samples after the warm-up.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Slopes {
    pub rss_bytes_per_min: f64,
    pub open_fds_per_min: f64,
    pub threads_per_min: f64,
    pub tokio_tasks_per_min: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub duration_secs: f64,
    pub sandboxes: usize,
    pub clients: usize,
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub requests_per_sec: f64,
    pub ops: BTreeMap<String, OpStats>,
    /// Readings under load, every `sample_every`.
    pub samples: Vec<ResourceSample>,
    /// The reading once the clients had stopped (nothing in flight).
    pub after: ResourceSample,
    /// Over `samples` after the warm-up.
    pub slopes: Slopes,
    /// Thermal work seen in `/metrics` at the end: wakes by state woken
    /// from, pauses and cold snapshots.
    pub thermal: BTreeMap<String, f64>,
    /// The first failures, with their errors.
    pub failures: Vec<String>,
}

impl Report {
    /// Samples after the warm-up (all when there are too few).
    pub fn steady(&self, warmup: Duration) -> Vec<ResourceSample> {
        let s: Vec<_> = self
            .samples
            .iter()
            .copied()
            .filter(|s| s.t_secs >= warmup.as_secs_f64())
            .collect();
        if s.len() >= 2 {
            s
        } else {
            self.samples.clone()
        }
    }

    /// A readable table.
    pub fn print(&self) {
        println!(
            "soak: {:.0} s, {} sandboxes, {} clients: {} ok, {} failed, {:.1} requests/s",
            self.duration_secs,
            self.sandboxes,
            self.clients,
            self.requests_ok,
            self.requests_failed,
            self.requests_per_sec
        );
        println!(
            "{:<10} {:>8} {:>7} {:>10} {:>10} {:>10} {:>10}",
            "op", "ok", "failed", "p50 ms", "p95 ms", "p99 ms", "max ms"
        );
        for (op, s) in &self.ops {
            println!(
                "{:<10} {:>8} {:>7} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                op, s.ok, s.failed, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms
            );
        }
        let (first, last) = (self.samples.first(), self.samples.last());
        if let (Some(a), Some(b)) = (first, last) {
            println!(
                "daemon under load (slope after warm-up): RSS {:.1} → {:.1} MiB ({:+.3} MiB/min), fds {} → {} ({:+.2}/min), threads {} → {} ({:+.2}/min), tokio tasks {} → {} ({:+.2}/min)",
                a.rss_bytes as f64 / 1048576.0,
                b.rss_bytes as f64 / 1048576.0,
                self.slopes.rss_bytes_per_min / 1048576.0,
                a.open_fds,
                b.open_fds,
                self.slopes.open_fds_per_min,
                a.threads,
                b.threads,
                self.slopes.threads_per_min,
                a.tokio_tasks,
                b.tokio_tasks,
                self.slopes.tokio_tasks_per_min
            );
        }
        let z = &self.after;
        println!(
            "daemon after the clients stopped: RSS {:.1} MiB, fds {}, threads {}, tokio tasks {}",
            z.rss_bytes as f64 / 1048576.0,
            z.open_fds,
            z.threads,
            z.tokio_tasks
        );
        println!("thermal: {:?}", self.thermal);
        for f in &self.failures {
            println!("FAILED {f}");
        }
    }
}

/// The daemon child; killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the soak; `Err` only when it could not start (daemon, sandboxes).
pub async fn run(spec: &Spec) -> Result<Report, String> {
    let log = std::fs::File::create(&spec.log).map_err(|e| format!("log: {e}"))?;
    let child = Command::new(&spec.bin)
        .args(["serve", "--config"])
        .arg(&spec.config)
        .env("RUST_LOG", "bhatti=info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", spec.bin.display()))?;
    let mut daemon = Daemon(child);
    let pid = daemon.0.id();
    let http = Http {
        sock: spec.sock.clone(),
        key: spec.key.clone(),
    };
    wait_ready(&http, &mut daemon).await?;

    let names: Vec<String> = (0..spec.sandboxes).map(|i| format!("soak-{i}")).collect();
    let mut conn = Conn::default();
    for n in &names {
        let (st, body) = conn
            .send(
                &http,
                Method::POST,
                "/sandboxes",
                json!({ "name": n }).to_string().into(),
            )
            .await?;
        if st != StatusCode::CREATED {
            return Err(format!(
                "creating {n}: {st} {}",
                String::from_utf8_lossy(&body)
            ));
        }
    }

    let started = Instant::now();
    let deadline = started + spec.duration;
    let sampler = {
        let (http, every, token) = (http.clone(), spec.sample_every, spec.metrics_token.clone());
        tokio::spawn(async move {
            let mut out = Vec::new();
            let mut conn = Conn::default();
            loop {
                out.push(sample(&http, &mut conn, &token, pid, started).await);
                // Under load only: the reading after the clients stop is
                // `Report::after`.
                if Instant::now() + every > deadline {
                    break;
                }
                tokio::time::sleep(every).await;
            }
            out
        })
    };
    let mut clients = Vec::new();
    for c in 0..spec.clients {
        let (http, names, rest) = (http.clone(), names.clone(), spec.rest);
        clients.push(tokio::spawn(async move {
            client(c, http, names, started, deadline, rest).await
        }));
    }
    let mut tally = Tally::default();
    for c in clients {
        match c.await {
            Ok(t) => tally.merge(t),
            Err(e) => tally.failures.push(format!("a client task ended: {e}")),
        }
    }
    let elapsed = started.elapsed();
    let samples = sampler.await.map_err(|e| format!("sampler: {e}"))?;
    let after = sample(&http, &mut conn, &spec.metrics_token, pid, started).await;
    let thermal = thermal_counts(&http, &mut conn, &spec.metrics_token).await;
    for n in &names {
        let _ = conn
            .send(
                &http,
                Method::DELETE,
                &format!("/sandboxes/{n}"),
                Bytes::new(),
            )
            .await;
    }
    // A graceful stop (VMMs were destroyed above).
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let stop_by = Instant::now() + Duration::from_secs(60);
    while daemon.0.try_wait().ok().flatten().is_none() && Instant::now() < stop_by {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut report = Report {
        duration_secs: elapsed.as_secs_f64(),
        sandboxes: spec.sandboxes,
        clients: spec.clients,
        requests_ok: tally.ops.values().map(|o| o.ok).sum(),
        requests_failed: tally.ops.values().map(|o| o.failed).sum(),
        requests_per_sec: 0.0,
        ops: tally
            .ops
            .iter()
            .map(|(k, o)| (k.to_string(), o.stats()))
            .collect(),
        samples,
        after,
        slopes: Slopes {
            rss_bytes_per_min: 0.0,
            open_fds_per_min: 0.0,
            threads_per_min: 0.0,
            tokio_tasks_per_min: 0.0,
        },
        thermal,
        failures: tally.failures,
    };
    report.requests_per_sec =
        (report.requests_ok + report.requests_failed) as f64 / elapsed.as_secs_f64().max(1e-9);
    let steady = report.steady(spec.warmup);
    let slope = |f: fn(&ResourceSample) -> f64| {
        slope_per_min(&steady.iter().map(|s| (s.t_secs, f(s))).collect::<Vec<_>>())
    };
    report.slopes = Slopes {
        rss_bytes_per_min: slope(|s| s.rss_bytes as f64),
        open_fds_per_min: slope(|s| s.open_fds as f64),
        threads_per_min: slope(|s| s.threads as f64),
        tokio_tasks_per_min: slope(|s| s.tokio_tasks as f64),
    };
    Ok(report)
}

/// Least-squares slope of `(seconds, value)` points, per minute.
pub fn slope_per_min(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx * 60.0
    }
}

async fn wait_ready(http: &Http, daemon: &mut Daemon) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut c = Conn::default();
        if let Ok((StatusCode::OK, _)) = c.send(http, Method::GET, "/health", Bytes::new()).await {
            return Ok(());
        }
        if let Ok(Some(s)) = daemon.0.try_wait() {
            return Err(format!("the daemon exited ({s}) during start"));
        }
        if Instant::now() > deadline {
            return Err("the daemon did not become ready in 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Counts and latencies of one operation.
#[derive(Debug)]
struct Op {
    ok: u64,
    failed: u64,
    hist: hdrhistogram::Histogram<u64>,
}

impl Default for Op {
    fn default() -> Self {
        Op {
            ok: 0,
            failed: 0,
            // 1 µs … 1 h, 3 significant digits.
            hist: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("histogram bounds"),
        }
    }
}

impl Op {
    fn stats(&self) -> OpStats {
        let ms = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        OpStats {
            ok: self.ok,
            failed: self.failed,
            p50_ms: ms(0.50),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            max_ms: self.hist.max() as f64 / 1000.0,
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    ops: BTreeMap<&'static str, Op>,
    failures: Vec<String>,
}

impl Tally {
    fn record(&mut self, op: &'static str, took: Duration, r: Result<(), String>) {
        let o = self.ops.entry(op).or_default();
        let _ = o.hist.record((took.as_micros() as u64).max(1));
        match r {
            Ok(()) => o.ok += 1,
            Err(e) => {
                o.failed += 1;
                if self.failures.len() < MAX_FAILURE_TEXTS {
                    self.failures.push(format!("{op}: {e}"));
                }
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        for (k, o) in other.ops {
            let m = self.ops.entry(k).or_default();
            m.ok += o.ok;
            m.failed += o.failed;
            let _ = m.hist.add(&o.hist);
        }
        for f in other.failures {
            if self.failures.len() < MAX_FAILURE_TEXTS {
                self.failures.push(f);
            }
        }
    }
}

/// One client: exec, file write + read-back, WebSocket exec in turn,
/// each on the next sandbox that is not resting, until the deadline.
async fn client(
    c: usize,
    http: Http,
    names: Vec<String>,
    started: Instant,
    deadline: Instant,
    rest: Duration,
) -> Tally {
    let mut t = Tally::default();
    let mut conn = Conn::default();
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
    let mut i = 0usize;
    while Instant::now() < deadline {
        let resting = (!rest.is_zero() && names.len() > 1)
            .then(|| (started.elapsed().as_secs_f64() / rest.as_secs_f64()) as usize % names.len());
        let targets: Vec<&String> = names
            .iter()
            .enumerate()
            .filter(|(k, _)| Some(*k) != resting)
            .map(|(_, n)| n)
            .collect();
        let sb = targets[(c + i) % targets.len()].as_str();
        match i % 3 {
            0 => {
                let n = rng.next() % 1_000_000;
                let t0 = Instant::now();
                let r = timed(exec(&http, &mut conn, sb, n)).await;
                t.record("exec", t0.elapsed(), r);
            }
            1 => {
                let len = 1024 + (rng.next() % (60 * 1024)) as usize;
                let data = rng.bytes(len);
                let path = format!("/tmp/soak-{c}-{}", i % 4);
                let t0 = Instant::now();
                let r = timed(put(&http, &mut conn, sb, &path, data.clone())).await;
                let wrote = r.is_ok();
                t.record("file_put", t0.elapsed(), r);
                if wrote {
                    let t0 = Instant::now();
                    let r = timed(get(&http, &mut conn, sb, &path, &data)).await;
                    t.record("file_get", t0.elapsed(), r);
                }
            }
            _ => {
                let data = hex(&rng.bytes(512));
                let t0 = Instant::now();
                let r = timed(ws_exec(&http, sb, &data)).await;
                t.record("ws_exec", t0.elapsed(), r);
            }
        }
        i += 1;
    }
    t
}

async fn timed(f: impl std::future::Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(OP_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {OP_TIMEOUT:?}")))
}

async fn exec(http: &Http, conn: &mut Conn, sb: &str, n: u64) -> Result<(), String> {
    let body = json!({"cmd": ["sh", "-c", format!("echo $(({n} * 2))")]}).to_string();
    let (st, body) = conn
        .send(
            http,
            Method::POST,
            &format!("/sandboxes/{sb}/exec"),
            body.into(),
        )
        .await?;
    let text = String::from_utf8_lossy(&body);
    if st != StatusCode::OK {
        return Err(format!("{sb}: {st} {text}"));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| format!("{sb}: {e}: {text}"))?;
    let want = (n * 2).to_string();
    if v["exit_code"] != 0 || v["stdout"].as_str().map(str::trim) != Some(&want) {
        return Err(format!("{sb}: expected {want}, got {text}"));
    }
    Ok(())
}

async fn put(
    http: &Http,
    conn: &mut Conn,
    sb: &str,
    path: &str,
    data: Bytes,
) -> Result<(), String> {
    let len = data.len();
    let (st, body) = conn
        .send(
            http,
            Method::PUT,
            &format!("/sandboxes/{sb}/files?path={path}"),
            data,
        )
        .await?;
    let text = String::from_utf8_lossy(&body);
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if st != StatusCode::OK || v["bytes"] != len {
        return Err(format!("{sb} {path}: {st} {text}"));
    }
    Ok(())
}

async fn get(
    http: &Http,
    conn: &mut Conn,
    sb: &str,
    path: &str,
    want: &[u8],
) -> Result<(), String> {
    let (st, body) = conn
        .send(
            http,
            Method::GET,
            &format!("/sandboxes/{sb}/files?path={path}"),
            Bytes::new(),
        )
        .await?;
    if st != StatusCode::OK {
        return Err(format!(
            "{sb} {path}: {st} {}",
            String::from_utf8_lossy(&body)
        ));
    }
    if body.as_ref() != want {
        return Err(format!(
            "{sb} {path}: read {} bytes that differ from the {} written",
            body.len(),
            want.len()
        ));
    }
    Ok(())
}

/// `cat` over `/sandboxes/{id}/exec/ws`: stdin in, the same on stdout,
/// exit 0.
async fn ws_exec(http: &Http, sb: &str, data: &str) -> Result<(), String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let err = |e: &dyn std::fmt::Display| format!("{sb}: {e}");
    let stream = tokio::net::UnixStream::connect(&http.sock)
        .await
        .map_err(|e| err(&e))?;
    let mut req = format!("ws://localhost/sandboxes/{sb}/exec/ws")
        .into_client_request()
        .map_err(|e| err(&e))?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", http.key)
            .parse()
            .map_err(|e| err(&e))?,
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| err(&e))?;
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(json!({"cmd": ["cat"]})))
        .await
        .map_err(|e| err(&e))?;
    ws.send(send(json!({"type": "stdin", "data": data})))
        .await
        .map_err(|e| err(&e))?;
    ws.send(send(json!({"type": "eof"})))
        .await
        .map_err(|e| err(&e))?;
    let mut out = String::new();
    while let Some(m) = ws.next().await {
        let m = m.map_err(|e| err(&e))?;
        let Message::Text(t) = m else { continue };
        let v: Value = serde_json::from_str(&t).map_err(|e| err(&e))?;
        match v["type"].as_str() {
            Some("started") => {}
            Some("stdout") => out.push_str(v["data"].as_str().unwrap_or_default()),
            Some("exit") => {
                if v["exit_code"] != 0 || out != data {
                    return Err(format!(
                        "{sb}: exit {} with {} of {} bytes echoed",
                        v["exit_code"],
                        out.len(),
                        data.len()
                    ));
                }
                let _ = ws.close(None).await;
                return Ok(());
            }
            _ => return Err(format!("{sb}: unexpected {t}")),
        }
    }
    Err(format!("{sb}: the socket closed before the exit"))
}

async fn sample(
    http: &Http,
    conn: &mut Conn,
    token: &str,
    pid: u32,
    started: Instant,
) -> ResourceSample {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(base.join("status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let tokio_tasks = metrics(http, conn, token)
        .await
        .get("bhatti_tokio_alive_tasks")
        .copied()
        .unwrap_or(0.0) as u64;
    ResourceSample {
        t_secs: started.elapsed().as_secs_f64(),
        rss_bytes: field("VmRSS:") * 1024,
        threads: field("Threads:"),
        open_fds: std::fs::read_dir(base.join("fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0),
        tokio_tasks,
    }
}

/// `/metrics` as `series → value` (series with labels as printed).
async fn metrics(http: &Http, conn: &mut Conn, token: &str) -> BTreeMap<String, f64> {
    let auth = Http {
        sock: http.sock.clone(),
        key: token.to_owned(),
    };
    let Ok((StatusCode::OK, body)) = conn
        .send(&auth, Method::GET, "/metrics", Bytes::new())
        .await
    else {
        return BTreeMap::new();
    };
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

async fn thermal_counts(http: &Http, conn: &mut Conn, token: &str) -> BTreeMap<String, f64> {
    let m = metrics(http, conn, token).await;
    [
        (
            "wakes_from_warm",
            "bhatti_wake_duration_seconds_count{from=\"warm\"}",
        ),
        (
            "wakes_from_cold",
            "bhatti_wake_duration_seconds_count{from=\"cold\"}",
        ),
        (
            "wake_failures_warm",
            "bhatti_wake_failures_total{from=\"warm\"}",
        ),
        (
            "wake_failures_cold",
            "bhatti_wake_failures_total{from=\"cold\"}",
        ),
        (
            "pauses",
            "bhatti_snapshot_duration_seconds_count{kind=\"warm\"}",
        ),
        (
            "cold_snapshots",
            "bhatti_snapshot_duration_seconds_count{kind=\"cold\"}",
        ),
        ("cool_failures", "bhatti_cool_failures_total"),
    ]
    .into_iter()
    .map(|(k, series)| (k.to_owned(), m.get(series).copied().unwrap_or(0.0)))
    .collect()
}

/// Where and as whom.
#[derive(Debug, Clone)]
struct Http {
    sock: PathBuf,
    key: String,
}

/// A kept-alive HTTP/1.1 connection over the unix socket, opened again
/// after an error.
#[derive(Default)]
struct Conn {
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    async fn send(
        &mut self,
        http: &Http,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), String> {
        let r = self.try_send(http, method.clone(), path, body).await;
        if r.is_err() {
            self.sender = None;
        }
        r.map_err(|e| format!("{method} {path}: {e}"))
    }

    async fn try_send(
        &mut self,
        http: &Http,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::UnixStream::connect(&http.sock)
                .await
                .map_err(|e| e.to_string())?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().ok_or("no connection")?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {}", http.key))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
}

/// Test data, cheap and reproducible.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn bytes(&mut self, n: usize) -> Bytes {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        Bytes::from(v)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 * 10.0, 5.0 + i as f64)).collect();
        assert!((slope_per_min(&line) - 6.0).abs() < 1e-9);
        let flat = [
            (0.0, 3.0),
            (10.0, 5.0),
            (20.0, 3.0),
            (30.0, 5.0),
            (40.0, 4.0),
        ];
        assert!(slope_per_min(&flat).abs() < 3.0);
        assert_eq!(slope_per_min(&[(1.0, 1.0)]), 0.0);
    }
}
