//! Issue-11 benchmark: HTTP through the proxy, beside the same request sent
//! straight through the agent's forward channel in the same run.
//!
//! 1. Latency, no VM: the daemon runs in-process over the bench's host
//!    backend (`lohar serve --unix` on the host, whose forwards reach the
//!    host's 127.0.0.1), and the "guest's server" is a tiny HTTP/1.1 server
//!    in this process (`GET /kib` → 1 KiB, kept alive, a thread of its own).
//!    Floor: an agent client of our own on the same lohar, one forward to
//!    that port, HTTP/1.1 kept alive over it. Ours: the authenticated proxy
//!    (`/sandboxes/{id}/proxy/{port}/kib` over the daemon's unix socket,
//!    bearer key) and the public listener (`/<alias>/kib` over TCP), each
//!    one kept-alive connection. All are sampled round-robin in rotating
//!    order, with a few diagnostic requests (the daemon's HTTP servers
//!    without the relay) so the overhead can be attributed.
//! 2. Throughput, no VM: `--clients` kept-alive clients for `--duration`
//!    seconds against the public listener and against the floor (as many
//!    forwards straight through the agent), from a thread of their own,
//!    alternating in `--rounds` rounds.
//! 3. Real VMs: time to first byte of a published URL whose sandbox is
//!    cold, beside a cold exec ([`cold`]). Needs root and BHATTI_KERNEL /
//!    BHATTI_ROOTFS, else one SKIP line.
//!
//! ```text
//! cargo build --release -p lohar -p bhatti-bench
//! eval "$(scripts/artifacts.sh)"
//! sudo -E target/release/proxy-bench [--samples 2000] [--clients 50] [--duration 5] \
//!     [--cold-samples 5] [--markdown] [--json out.json]
//! ```

#[allow(dead_code)]
#[path = "proxy_bench/cold.rs"]
mod cold;
#[path = "proxy_bench/cpu.rs"]
mod cpu;
#[allow(dead_code)]
#[path = "api_bench/daemon.rs"]
mod daemon;
#[path = "proxy_bench/h1.rs"]
mod h1;
#[allow(dead_code)]
#[path = "api_bench/host_backend.rs"]
mod host_backend;
#[allow(dead_code)]
#[path = "api_bench/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "api_bench/vm_env.rs"]
mod vm_env;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bhatti::config::Config;
use bhatti_bench::{host_description, human, load_average, Recorder, Stats};
use bhatti_protocol::forward_io::ForwardIo;
use clap::Parser;
use serde::Serialize;

use daemon::{create_sandbox, create_user, Daemon};
use h1::{on_thread, Getter, GuestServer};
use host_backend::HostProcessBackend;
use http::Conn;

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark the proxy and published URLs against the agent's forward channel")]
pub struct Args {
    /// Samples of each request in the latency part.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Unrecorded rounds before them.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Concurrent kept-alive clients of the throughput part.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Seconds of load on each side (split over `--rounds`).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Alternations floor/public of the throughput part.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Cold samples of each kind (real VMs).
    #[arg(long, default_value_t = 5)]
    cold_samples: usize,
    /// Guest memory of the cold part's sandbox.
    #[arg(long, default_value_t = 512)]
    memory_mb: u32,
    /// Path to the lohar binary (default: next to this program).
    #[arg(long)]
    lohar: Option<PathBuf>,
    /// Skip the real-VM part.
    #[arg(long)]
    no_vm: bool,
    /// Run only the real-VM part.
    #[arg(long, conflicts_with = "no_vm")]
    vm_only: bool,
    /// Also print a compact Markdown table (for the README).
    #[arg(long)]
    markdown: bool,
    /// Write the JSON report here (default: stdout after the tables).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// p50 overhead allowed over the floor, µs.
const TARGET_US: f64 = 300.0;
/// The alias of the no-VM part.
const ALIAS: &str = "bench-kib";

/// A request through the proxy beside the floor.
#[derive(Debug, Serialize)]
struct Latency {
    op: Stats,
    floor: Stats,
    /// p50 of ours − p50 of the floor (µs).
    overhead_p50_us: f64,
    overhead_p99_us: f64,
    target: String,
    met: bool,
}

#[derive(Debug, Serialize)]
struct Throughput {
    name: String,
    clients: usize,
    seconds: f64,
    requests: u64,
    per_second: f64,
    /// Shares of one CPU during the counted windows (the last round's).
    cpu: Vec<cpu::Share>,
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    host: String,
    load_before: String,
    load_after: String,
    samples: usize,
    latency: Vec<Latency>,
    /// The daemon's servers without the relay, same rounds (µs).
    diagnostics: Vec<Stats>,
    throughput: Vec<Throughput>,
    /// Public proxy req/s ÷ floor req/s.
    throughput_ratio: Option<f64>,
    vm_backend: Option<String>,
    vm_skipped: Option<String>,
    cold_ttfb: Option<Stats>,
    cold_exec: Option<Stats>,
    notes: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The daemon runs in this process: give it the scheduler `bhatti serve`
    // builds from the default config.
    let rt = bhatti::daemon::runtime(Config::default().worker_threads)?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut report = Report {
        benchmark:
            "bhatti proxy-bench (1 KiB GET through the proxy vs the agent's forward channel)",
        host: host_description(),
        load_before: load_average(),
        load_after: String::new(),
        samples: args.samples,
        latency: Vec::new(),
        diagnostics: Vec::new(),
        throughput: Vec::new(),
        throughput_ratio: None,
        vm_backend: None,
        vm_skipped: None,
        cold_ttfb: None,
        cold_exec: None,
        notes: Vec::new(),
    };
    if !args.vm_only {
        let lohar = host_backend::lohar_path(args.lohar.as_deref())?;
        eprintln!("[proxy-bench] parts 1-2: no VM (lohar on the host)");
        host_part(&args, &lohar, &mut report).await?;
    }
    if !args.no_vm {
        match vm_env::artifacts() {
            Err(why) => {
                println!("SKIP cold published-URL part (real VMs): {why}");
                report.vm_skipped = Some(why);
            }
            Ok(art) => {
                eprintln!("[proxy-bench] part 3: cold published URL (real VMs)");
                let c = cold::run(&args, &art).await?;
                report.vm_backend = Some(c.backend);
                report.cold_ttfb = Some(c.ttfb);
                report.cold_exec = Some(c.exec);
                report.notes.extend(c.notes);
            }
        }
    }
    report.load_after = load_average();
    print_tables(&report);
    if args.markdown {
        print_markdown(&report);
    }
    let json = serde_json::to_string_pretty(&report)?;
    match &args.json {
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?,
        None => println!("\n{json}"),
    }
    Ok(())
}

/// Turns on the public listener on a free loopback port, without rate
/// limits; returns its address.
pub fn with_public_listener(config: &mut Config) -> anyhow::Result<SocketAddr> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free port")?
        .local_addr()?;
    let p = &mut config.proxy;
    p.listen = Some(addr);
    p.per_ip_per_second = 0;
    p.per_ip_burst = 0;
    p.per_alias_per_second = 0;
    p.per_alias_burst = 0;
    Ok(addr)
}

// ---------------------------------------------------------------------------
// Parts 1-2: no VM.

async fn host_part(args: &Args, lohar: &Path, report: &mut Report) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("bhatti-proxy-bench.")
        .tempdir()?;
    let backend = HostProcessBackend::new(lohar.to_owned());
    let guest = GuestServer::start()?;
    let r = async {
        let mut config = host_backend::host_config(dir.path())?;
        let public = with_public_listener(&mut config)?;
        let key = create_user(&config, "bench")?;
        let daemon = Daemon::start(config.clone(), Arc::new(backend.clone())).await?;
        let measured = host_measure(
            args,
            &config,
            &key,
            public,
            guest.port,
            &backend.pids,
            report,
        )
        .await;
        let stopped = daemon.stop().await;
        measured?;
        stopped
    }
    .await;
    backend.kill_all();
    r
}

async fn host_measure(
    args: &Args,
    config: &Config,
    key: &str,
    public: SocketAddr,
    port: u16,
    lohar_pids: &std::sync::Mutex<Vec<u32>>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let sock = config.listen_unix.clone();
    let mut api = Conn::new(&sock, Some(key));
    let id = create_sandbox(&mut api, serde_json::json!({"name": "bench"})).await?;
    api.post(
        &format!("/sandboxes/{id}/publish"),
        serde_json::json!({"port": port, "alias": ALIAS}),
    )
    .await?
    .ok("publish", 201)?;
    let agent = host_backend::raw_agent(&config.data_dir, &id).await?;
    let r = async {
        latency(args, &agent, &sock, key, &id, public, port, report).await?;
        let pids = lohar_pids.lock().map(|p| p.clone()).unwrap_or_default();
        throughput(args, &pids, config, &id, public, port, report).await
    }
    .await;
    agent.close();
    api.delete(&format!("/sandboxes/{id}"))
        .await?
        .ok("delete", 204)?;
    r
}

async fn unix(sock: &Path) -> anyhow::Result<tokio::net::UnixStream> {
    tokio::net::UnixStream::connect(sock)
        .await
        .with_context(|| format!("connecting to {}", sock.display()))
}

async fn tcp(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One kept-alive `GET /kib` straight through a forward of `agent`.
async fn floor_getter(agent: &bhatti_protocol::AgentClient, port: u16) -> anyhow::Result<Getter> {
    let fwd = agent
        .forward(port)
        .await
        .with_context(|| format!("agent forward to port {port}"))?;
    Getter::over(ForwardIo::from(fwd), "127.0.0.1", "/kib", None).await
}

/// One kept-alive `GET /<alias>/kib` on the public listener.
async fn public_getter(public: SocketAddr) -> anyhow::Result<Getter> {
    Getter::over(
        tcp(public).await?,
        &public.to_string(),
        &format!("/{ALIAS}/kib"),
        None,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn latency(
    args: &Args,
    agent: &bhatti_protocol::AgentClient,
    sock: &Path,
    key: &str,
    id: &str,
    public: SocketAddr,
    port: u16,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut ops: Vec<(&str, Getter)> = vec![
        (
            "agent forward, 1 KiB GET (floor)",
            floor_getter(agent, port).await?,
        ),
        (
            "authenticated proxy, 1 KiB GET",
            Getter::over(
                unix(sock).await?,
                "localhost",
                &format!("/sandboxes/{id}/proxy/{port}/kib"),
                Some(key),
            )
            .await?,
        ),
        ("public proxy, 1 KiB GET", public_getter(public).await?),
        // Diagnostics: the daemon's servers without the relay.
        (
            "diag: GET /health (unix socket)",
            Getter::over(unix(sock).await?, "localhost", "/health", None)
                .await?
                .expect(200)?,
        ),
        (
            "diag: GET /sandboxes/{id} (auth+lookup)",
            Getter::over(
                unix(sock).await?,
                "localhost",
                &format!("/sandboxes/{id}"),
                Some(key),
            )
            .await?
            .expect(200)?,
        ),
        (
            "diag: public GET / (404, no lookup)",
            Getter::over(tcp(public).await?, &public.to_string(), "/", None)
                .await?
                .expect(404)?,
        ),
    ];
    let mut recs: Vec<Recorder> = ops.iter().map(|(n, _)| Recorder::new(*n)).collect();
    let k = ops.len();
    // Rounds of one of each, the order rotating, so drift in the machine's
    // state touches all alike.
    for i in 0..args.warmup + args.samples.max(1) {
        for j in 0..k {
            let o = (i + j) % k;
            let t = Instant::now();
            ops[o].1.get().await?;
            if i >= args.warmup {
                recs[o].record(t.elapsed());
            }
        }
    }
    let stats: Vec<Stats> = recs.iter().map(Recorder::stats).collect();
    let floor = &stats[0];
    for s in &stats[1..3] {
        let over = s.p50_us - floor.p50_us;
        report.latency.push(Latency {
            op: s.clone(),
            floor: floor.clone(),
            overhead_p50_us: over,
            overhead_p99_us: s.p99_us - floor.p99_us,
            target: format!("p50 ≤ floor + {:.1} ms", TARGET_US / 1000.0),
            met: over <= TARGET_US,
        });
    }
    report.diagnostics = stats[3..].to_vec();
    report.notes.push(format!(
        "latency part: {} rounds (+{} unrecorded) of one request each, order rotating; every client is one \
         kept-alive HTTP/1.1 connection from the daemon's thread; the guest's server is a hyper server on a \
         thread of its own; lohar runs on the host (no VM)",
        args.samples, args.warmup
    ));
    Ok(())
}

/// `clients` loops of `get` until `stop`; every completed request counts.
async fn load(
    getters: Vec<Getter>,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut set = tokio::task::JoinSet::new();
    for mut g in getters {
        let (count, stop) = (count.clone(), stop.clone());
        set.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                g.get().await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// Requests completed in `secs` after a 0.3 s ramp, by `clients` getters
/// made by `make` on a thread of their own.
async fn timed_load<M, Fut>(
    clients: usize,
    secs: f64,
    lohar: &[u32],
    make: M,
) -> anyhow::Result<(u64, Vec<cpu::Share>)>
where
    M: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Vec<Getter>>>,
{
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (c, s) = (count.clone(), stop.clone());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(on_thread("load", move || async move {
        let getters = make().await?;
        anyhow::ensure!(getters.len() == clients, "made {} clients", getters.len());
        let _ = ready_tx.send(());
        load(getters, c, s).await
    }));
    let ready = ready_rx.await;
    let counted = async {
        ready.context("the load thread failed before it started")?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (before, cpu0) = (count.load(Ordering::Relaxed), cpu::Cpu::now(lohar));
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let shares = cpu::Cpu::now(lohar).since(&cpu0);
        anyhow::Ok((count.load(Ordering::Relaxed) - before, shares))
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let ended = task.await.context("the load task")?;
    match (counted, ended) {
        (Ok(r), Ok(())) => Ok(r),
        (_, Err(e)) | (Err(e), _) => Err(e),
    }
}

async fn throughput(
    args: &Args,
    lohar: &[u32],
    config: &Config,
    id: &str,
    public: SocketAddr,
    port: u16,
    report: &mut Report,
) -> anyhow::Result<()> {
    let n = args.clients.max(1);
    let rounds = args.rounds.max(1);
    let secs = (args.duration / rounds as f64).max(0.2);
    let (mut floor, mut ours) = (0u64, 0u64);
    let (mut floor_cpu, mut ours_cpu) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for public_side in [r % 2 == 1, r % 2 == 0] {
            let (got, shares) = if public_side {
                timed_load(n, secs, lohar, move || async move {
                    let mut v = Vec::new();
                    for _ in 0..n {
                        v.push(public_getter(public).await?);
                    }
                    Ok(v)
                })
                .await?
            } else {
                let (data, id) = (config.data_dir.clone(), id.to_owned());
                timed_load(n, secs, lohar, move || {
                    let (data, id) = (data.clone(), id.clone());
                    async move {
                        // An agent connection of the load thread's own.
                        let agent = host_backend::raw_agent(&data, &id).await?;
                        let mut v = Vec::new();
                        for _ in 0..n {
                            v.push(floor_getter(&agent, port).await?);
                        }
                        Ok(v)
                    }
                })
                .await?
            };
            eprintln!(
                "[proxy-bench] round {r}: {} {:.0} req/s",
                if public_side { "public" } else { "floor" },
                got as f64 / secs
            );
            if public_side {
                ours += got;
                ours_cpu = shares;
            } else {
                floor += got;
                floor_cpu = shares;
            }
        }
    }
    let total = secs * rounds as f64;
    let row = |name: String, requests: u64, cpu| Throughput {
        name,
        clients: n,
        seconds: total,
        requests,
        per_second: requests as f64 / total,
        cpu,
    };
    let f = row(
        format!("agent forwards (floor), {n} clients"),
        floor,
        floor_cpu,
    );
    let o = row(format!("public proxy, {n} clients"), ours, ours_cpu);
    report.throughput_ratio = (f.per_second > 0.0).then(|| o.per_second / f.per_second);
    report.throughput = vec![f, o];
    report.notes.push(format!(
        "throughput part: {n} kept-alive clients on a thread of their own (a current-thread runtime) for \
         {rounds} × {secs:.1} s per side, floor and public alternating; the floor's clients are {n} forwards on \
         one agent connection of their own, as the daemon's are on its one"
    ));
    Ok(())
}

// ---------------------------------------------------------------------------
// Output.

fn print_tables(r: &Report) {
    println!("\n{}", r.benchmark);
    println!(
        "host: {}; load before {} / after {}",
        r.host, r.load_before, r.load_after
    );
    if !r.latency.is_empty() {
        println!(
            "\n1. Latency, no VM (lohar on the host), µs, n={}",
            r.samples
        );
        println!(
            "{:<42} {:>8} {:>8} {:>8} {:>8} | {:>10} {:>10} | {:<22} met",
            "request", "p50", "p95", "p99", "max", "−floor p50", "−floor p99", "target"
        );
        let line = |s: &Stats, o50: String, o99: String, t: &str, m: &str| {
            println!(
                "{:<42} {:>8.1} {:>8.1} {:>8.1} {:>8.1} | {:>10} {:>10} | {:<22} {}",
                s.name, s.p50_us, s.p95_us, s.p99_us, s.max_us, o50, o99, t, m
            )
        };
        line(&r.latency[0].floor, "-".into(), "-".into(), "(floor)", "");
        for l in &r.latency {
            line(
                &l.op,
                format!("{:+.1}", l.overhead_p50_us),
                format!("{:+.1}", l.overhead_p99_us),
                &l.target,
                if l.met { "yes" } else { "NO" },
            );
        }
        for d in &r.diagnostics {
            line(d, "-".into(), "-".into(), "", "");
        }
    }
    if !r.throughput.is_empty() {
        println!("\n2. Throughput, no VM");
        for t in &r.throughput {
            let cpu: Vec<String> = t
                .cpu
                .iter()
                .map(|s| format!("{} {:.0}%", s.who, s.cpu * 100.0))
                .collect();
            println!(
                "{:<42} {:>10.0} req/s ({} requests in {:.1} s); CPU: {}",
                t.name,
                t.per_second,
                t.requests,
                t.seconds,
                cpu.join(", ")
            );
        }
        if let Some(x) = r.throughput_ratio {
            println!("{:<42} {:>10.2}", "public ÷ floor", x);
        }
    }
    if let Some(why) = &r.vm_skipped {
        println!("\n3. Cold published URL: SKIPPED ({why})");
    }
    if let (Some(t), Some(e)) = (&r.cold_ttfb, &r.cold_exec) {
        println!(
            "\n3. Cold sandbox ({}), ms",
            r.vm_backend.as_deref().unwrap_or("?")
        );
        for s in [t, e] {
            println!(
                "{:<42} n={:<3} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                s.name,
                s.samples,
                s.p50_us / 1e3,
                s.p95_us / 1e3,
                s.p99_us / 1e3,
                s.max_us / 1e3
            );
        }
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}

fn print_markdown(r: &Report) {
    println!("\n<!-- proxy-bench --markdown; host: {} -->", r.host);
    if let Some(first) = r.latency.first() {
        println!(
            "| 1 KiB GET, kept alive (no VM, n={}) | p50 | p95 | p99 | Ours − floor (p50 / p99) | Target |",
            r.samples
        );
        println!("|---|---:|---:|---:|---:|---|");
        let f = &first.floor;
        println!(
            "| {} | {} | {} | {} | — | floor, same run |",
            f.name,
            human(f.p50_us),
            human(f.p95_us),
            human(f.p99_us)
        );
        for l in &r.latency {
            println!(
                "| {} | {} | {} | {} | {:+.0} µs / {:+.0} µs | {} {} |",
                l.op.name,
                human(l.op.p50_us),
                human(l.op.p95_us),
                human(l.op.p99_us),
                l.overhead_p50_us,
                l.overhead_p99_us,
                l.target,
                if l.met { "✓" } else { "✗" }
            );
        }
    }
    if let [f, o] = r.throughput.as_slice() {
        println!();
        println!(
            "| Throughput ({} kept-alive clients, {:.0} s a side) | requests/s | vs floor |",
            o.clients, o.seconds
        );
        println!("|---|---:|---:|");
        println!("| {} | {:.0} | — |", f.name, f.per_second);
        println!(
            "| {} | {:.0} | ×{:.2} |",
            o.name,
            o.per_second,
            r.throughput_ratio.unwrap_or(f64::NAN)
        );
    }
    if let (Some(t), Some(e)) = (&r.cold_ttfb, &r.cold_exec) {
        println!();
        println!(
            "| Cold sandbox ({}) | n | p50 | p95 | p99 |",
            r.vm_backend.as_deref().unwrap_or("VM")
        );
        println!("|---|---:|---:|---:|---:|");
        for s in [t, e] {
            println!(
                "| {} | {} | {} | {} | {} |",
                s.name,
                s.samples,
                human(s.p50_us),
                human(s.p95_us),
                human(s.p99_us)
            );
        }
    }
    if let Some(why) = &r.vm_skipped {
        println!("\n(cold rows skipped: {why})");
    }
}
