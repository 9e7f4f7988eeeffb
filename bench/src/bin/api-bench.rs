//! Issue-4 benchmark: bhatti end to end through its HTTP API (over the
//! daemon's unix socket, kept-alive HTTP/1.1 connections), p50/p95/p99
//! beside floors measured in the same run and the seed's figures
//! (DESIGN §9).
//!
//! 1. Orchestrator overhead, no VM: the daemon runs in-process over a
//!    bench-only backend whose "VM" is `lohar serve --unix` on the host
//!    ([`api_bench::host_backend`]). Floors: posix_spawn+wait, write+fsync+
//!    rename, and the same agent calls made directly to the same lohar, so
//!    API overhead = ours − raw agent.
//! 2. With real VMs (the backend the host has; QEMU/TCG without KVM): create
//!    → first exec, exec, a request on a paused (warm) sandbox, a request on
//!    a stopped (cold) one, each beside the raw VMM doing the same thing
//!    (QemuBackend boot + agent handshake + exec; QMP cont + exec; restore +
//!    handshake + exec) and the ratio. Needs root and BHATTI_KERNEL /
//!    BHATTI_ROOTFS, else it prints one SKIP line.
//! 3. Snapshot stall (real VMs, its own daemon): GET /health every 2 ms
//!    from a thread of its own while `POST /stop` writes a sandbox's
//!    ≥ 1 GiB memory snapshot, beside the same client on the idle sandbox;
//!    the daemon's one scheduler thread must keep answering (p99 < 5 ms).
//!    `--no-stall` skips it, `--stall-only` runs it alone.
//!
//! ```text
//! cargo build --release -p lohar -p bhatti-bench
//! eval "$(scripts/artifacts.sh)"
//! sudo -E target/release/api-bench [--samples 1000] [--vm-boots 3] [--markdown] [--json out.json]
//! sudo -E target/release/api-bench --stall-only --markdown
//! ```

#[path = "api_bench/daemon.rs"]
mod daemon;
#[path = "api_bench/host_backend.rs"]
mod host_backend;
#[path = "api_bench/http.rs"]
mod http;
#[path = "api_bench/vm_env.rs"]
mod vm_env;
#[path = "api_bench/vms.rs"]
mod vms;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use bhatti::config::Config;
use bhatti_bench::{host_description, human, load_average, Stats};
use bhatti_protocol::{AgentClient, ExecRequest, ReadFileRequest, WriteFileRequest};
use bytes::Bytes;
use clap::Parser;
use serde::Serialize;

use daemon::{create_sandbox, create_user, Daemon};
use host_backend::HostProcessBackend;
use http::{q, Conn};

#[derive(Parser, Debug, Clone)]
#[command(about = "Benchmark bhatti through its HTTP API")]
pub struct Args {
    /// Samples per no-VM operation (exec-like ones take at most 1000).
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Path to the lohar binary (default: next to this program).
    #[arg(long)]
    lohar: Option<PathBuf>,
    /// Skip the real-VM part.
    #[arg(long)]
    no_vm: bool,
    /// Skip the no-VM part.
    #[arg(long)]
    vm_only: bool,
    /// Measured creates (engine) and raw boots (floor).
    #[arg(long, default_value_t = 5)]
    vm_boots: usize,
    /// Execs on a running VM (each side).
    #[arg(long, default_value_t = 100)]
    vm_samples: usize,
    /// Requests on a paused sandbox / raw cont+exec (each ~1 s of idling).
    #[arg(long, default_value_t = 8)]
    vm_paused: usize,
    /// Requests on a stopped sandbox / raw restores.
    #[arg(long, default_value_t = 4)]
    vm_stopped: usize,
    /// Guest memory of the VMs (both sides).
    #[arg(long, default_value_t = 512)]
    memory_mb: u32,
    /// Skip the snapshot-stall part (GET /health while a ≥ 1 GiB memory
    /// snapshot is written).
    #[arg(long)]
    no_stall: bool,
    /// Run only the snapshot-stall part.
    #[arg(long, conflicts_with_all = ["no_stall", "no_vm"])]
    stall_only: bool,
    /// Guest memory of the snapshot-stall sandbox.
    #[arg(long, default_value_t = 1400)]
    stall_memory_mb: u32,
    /// Guest RAM the stall sandbox fills before its snapshot (MiB).
    #[arg(long, default_value_t = 1024)]
    stall_fill_mb: u64,
    /// Seconds of GET /health on the idle sandbox (the floor).
    #[arg(long, default_value_t = 3.0)]
    stall_idle_secs: f64,
    /// Milliseconds between two GET /health of the stall part.
    #[arg(long, default_value_t = 2)]
    stall_interval_ms: u64,
    /// Also print a compact Markdown table (for the README).
    #[arg(long)]
    markdown: bool,
    /// Write the JSON report here (default: stdout after the tables).
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One measured operation with its floors.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub section: &'static str,
    pub op: Stats,
    /// The raw cost of the same work on this host in this run.
    pub floor: Option<Stats>,
    /// No-VM part: the same agent call made directly to the same lohar.
    pub raw_agent: Option<Stats>,
    /// p50 of ours − p50 of the raw agent call (µs).
    pub api_overhead_p50_us: Option<f64>,
    /// ours / floor at p50 and p99 (VM part).
    pub ratio_p50: Option<f64>,
    pub ratio_p99: Option<f64>,
    /// The seed's p50 (DESIGN §9), µs.
    pub seed_p50_us: Option<f64>,
    pub target: String,
    pub met: Option<bool>,
}

impl Line {
    fn new(section: &'static str, op: Stats) -> Line {
        Line {
            section,
            op,
            floor: None,
            raw_agent: None,
            api_overhead_p50_us: None,
            ratio_p50: None,
            ratio_p99: None,
            seed_p50_us: None,
            target: "-".into(),
            met: None,
        }
    }
    fn floor(mut self, f: Stats) -> Line {
        let r = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        self.ratio_p50 = r(self.op.p50_us, f.p50_us);
        self.ratio_p99 = r(self.op.p99_us, f.p99_us);
        self.floor = Some(f);
        self
    }
    fn raw(mut self, a: Stats) -> Line {
        self.api_overhead_p50_us = Some(self.op.p50_us - a.p50_us);
        self.raw_agent = Some(a);
        self
    }
    fn seed(mut self, us: f64) -> Line {
        self.seed_p50_us = Some(us);
        self
    }
    fn target(mut self, t: &str, met: bool) -> Line {
        self.target = t.into();
        self.met = Some(met);
        self
    }
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    host: String,
    load_before: String,
    load_after: String,
    vm_backend: Option<String>,
    vm_skipped: Option<String>,
    notes: Vec<String>,
    lines: Vec<Line>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The daemon runs in this process: give it the scheduler `bhatti serve`
    // builds from the default config.
    let rt = bhatti::daemon::runtime(bhatti::config::Config::default().worker_threads)?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut report = Report {
        benchmark: "bhatti api-bench (HTTP API over the unix socket, kept-alive connections)",
        host: host_description(),
        load_before: load_average(),
        load_after: String::new(),
        vm_backend: None,
        vm_skipped: None,
        notes: Vec::new(),
        lines: Vec::new(),
    };
    if !args.vm_only && !args.stall_only {
        // Only part 1 runs lohar on the host; the VMs have theirs in the rootfs.
        let lohar = host_backend::lohar_path(args.lohar.as_deref())?;
        eprintln!("[api-bench] part 1: orchestrator overhead, no VM");
        report.lines.extend(no_vm(&args, &lohar).await?);
    }
    if !args.no_vm {
        match vm_env::artifacts() {
            Err(why) => {
                println!("SKIP real-VM part: {why}");
                report.vm_skipped = Some(why);
            }
            Ok(art) => {
                if !args.stall_only {
                    eprintln!("[api-bench] part 2: real VMs");
                    let (backend, lines, notes) = vms::run(&args, &art).await?;
                    report.vm_backend = Some(backend);
                    report.lines.extend(lines);
                    report.notes.extend(notes);
                }
                if !args.no_stall {
                    eprintln!("[api-bench] part 3: GET /health during a memory snapshot");
                    let (backend, lines, notes) = vms::stall(&args, &art).await?;
                    report.vm_backend.get_or_insert(backend);
                    report.lines.extend(lines);
                    report.notes.extend(notes);
                }
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
        Some(p) => std::fs::write(p, json)?,
        None => println!("\n{json}"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Part 1: no VM.

async fn no_vm(args: &Args, lohar: &Path) -> anyhow::Result<Vec<Line>> {
    let dir = tempfile::Builder::new()
        .prefix("bhatti-api-bench.")
        .tempdir()?;
    let backend = HostProcessBackend::new(lohar.to_owned());
    let result = no_vm_inner(args, dir.path(), &backend).await;
    backend.kill_all();
    result
}

fn exec_true_req() -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/true".into()],
        ..Default::default()
    }
}

async fn agent_exec(c: &AgentClient) -> anyhow::Result<()> {
    let out = c.exec(exec_true_req(), None).await?;
    anyhow::ensure!(out.status.exit_code == 0, "exec /bin/true failed");
    Ok(())
}

async fn no_vm_inner(
    args: &Args,
    dir: &Path,
    backend: &HostProcessBackend,
) -> anyhow::Result<Vec<Line>> {
    let config = host_backend::host_config(dir)?;
    let key = create_user(&config, "bench")?;
    let sock = config.listen_unix.clone();
    let daemon = Daemon::start(config.clone(), Arc::new(backend.clone())).await?;
    let result = no_vm_measure(args, dir, &sock, &key, &config).await;
    // The sandbox (its lohar) goes with the daemon's data; kill_all after.
    let stopped = daemon.stop().await;
    let lines = result?;
    stopped?;
    Ok(lines)
}

async fn no_vm_measure(
    args: &Args,
    dir: &Path,
    sock: &Path,
    key: &str,
    config: &Config,
) -> anyhow::Result<Vec<Line>> {
    let mut api = Conn::new(sock, Some(key));
    let id = create_sandbox(&mut api, serde_json::json!({"name": "bench"})).await?;
    // The raw agent: a second connection to the very lohar the engine uses.
    let agent = Arc::new(host_backend::raw_agent(&config.data_dir, &id).await?);

    let n = args.samples.max(10);
    let exec_n = n.min(1000);
    let conc_n = (exec_n / 5).max(10);

    // Every operation is measured in rounds that run the floor, the raw
    // agent call and the API call back to back, so all three see the same
    // machine (a loaded 2-core host drifts over seconds).
    let floor_dir = dir.join("floor");
    std::fs::create_dir_all(&floor_dir)?;
    let files = dir.join("files");
    std::fs::create_dir_all(&files)?;
    let target = files.join("f.txt").to_string_lossy().into_owned();
    std::fs::write(&target, vec![b'x'; 1024])?;
    std::fs::write(floor_dir.join("f"), vec![b'x'; 1024])?;
    let path_q = format!("/sandboxes/{id}/files?path={}", q(&target));
    let mut c = Conn::new(sock, Some(key));
    // Ten clients, each with its own kept-alive connection.
    let mut pool: Vec<Conn> = (0..10).map(|_| Conn::new(sock, Some(key))).collect();

    macro_rules! timed {
        ($rec:expr, $on:expr, $body:expr) => {{
            let t = Instant::now();
            $body;
            if $on {
                $rec.record(t.elapsed());
            }
        }};
    }
    let rec = bhatti_bench::Recorder::new;
    const WARMUP: usize = 30;

    // exec true
    let (mut f, mut r, mut o) = (
        rec("posix_spawn+wait /bin/true"),
        rec("raw agent: exec true"),
        rec("POST /exec true"),
    );
    for i in 0..WARMUP + exec_n {
        let on = i >= WARMUP;
        timed!(f, on, {
            anyhow::ensure!(Command::new("/bin/true").status()?.success());
        });
        timed!(r, on, agent_exec(&agent).await?);
        timed!(o, on, c.exec_true(&id).await?);
    }
    let (spawn_floor, raw_exec, api_exec) = (f.stats(), r.stats(), o.stats());

    // read 1 KiB
    let (mut f, mut r, mut o) = (
        rec("open+read 1 KiB"),
        rec("raw agent: read 1 KiB"),
        rec("GET /files 1 KiB"),
    );
    for i in 0..WARMUP + n {
        let on = i >= WARMUP;
        timed!(f, on, {
            anyhow::ensure!(std::fs::read(floor_dir.join("f"))?.len() == 1024);
        });
        timed!(r, on, {
            let (b, _) = agent
                .read_file_all(ReadFileRequest {
                    path: target.clone(),
                    ..Default::default()
                })
                .await?;
            anyhow::ensure!(b.len() == 1024);
        });
        timed!(o, on, {
            let resp = c.get(&path_q).await?.ok("GET /files", 200)?;
            anyhow::ensure!(resp.body.len() == 1024, "read {} bytes", resp.body.len());
        });
    }
    let (read_floor, raw_read, api_read) = (f.stats(), r.stats(), o.stats());

    // write 1 KiB (atomic: temp file, fsync, rename)
    let (mut f, mut r, mut o) = (
        rec("write+fsync+rename 1 KiB"),
        rec("raw agent: write 1 KiB"),
        rec("PUT /files 1 KiB"),
    );
    let kib = vec![b'a'; 1024];
    for i in 0..WARMUP + n {
        let on = i >= WARMUP;
        timed!(f, on, {
            use std::io::Write;
            let tmp = floor_dir.join(".tmp");
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&kib)?;
            file.sync_all()?;
            std::fs::rename(&tmp, floor_dir.join("f"))?;
        });
        timed!(r, on, {
            agent
                .write_file(
                    WriteFileRequest {
                        path: target.clone(),
                        mode: None,
                        place: false,
                    },
                    Bytes::from(vec![b'b'; 1024]),
                )
                .await?;
        });
        timed!(o, on, {
            c.put(&path_q, Bytes::from(vec![b'c'; 1024]))
                .await?
                .ok("PUT /files", 200)?;
        });
    }
    anyhow::ensure!(
        std::fs::read(&target)? == vec![b'c'; 1024],
        "PUT did not land"
    );
    let (fsync_floor, raw_write, api_write) = (f.stats(), r.stats(), o.stats());

    // 10 concurrent exec true
    let (mut f, mut r, mut o) = (
        rec("10× spawn /bin/true, then wait"),
        rec("raw agent: 10 concurrent exec"),
        rec("10 concurrent POST /exec"),
    );
    for i in 0..10 + conc_n {
        let on = i >= 10;
        timed!(f, on, {
            let kids = (0..10)
                .map(|_| Command::new("/bin/true").spawn())
                .collect::<Result<Vec<_>, _>>()?;
            for mut k in kids {
                anyhow::ensure!(k.wait()?.success());
            }
        });
        timed!(r, on, {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..10 {
                let a = agent.clone();
                set.spawn(async move { agent_exec(&a).await });
            }
            while let Some(res) = set.join_next().await {
                res??;
            }
        });
        timed!(o, on, {
            let mut set = tokio::task::JoinSet::new();
            for mut conn in std::mem::take(&mut pool) {
                let id = id.clone();
                set.spawn(async move {
                    let res = conn.exec_true(&id).await;
                    (conn, res)
                });
            }
            while let Some(j) = set.join_next().await {
                let (conn, res) = j?;
                res?;
                pool.push(conn);
            }
        });
    }
    let (conc_floor, raw_conc, api_conc) = (f.stats(), r.stats(), o.stats());
    let health = {
        let mut c = Conn::new(sock, None);
        sample_mut("GET /health", 100, n, &mut c, |c| {
            Box::pin(async move {
                c.get("/health").await?.ok("health", 200)?;
                Ok(())
            })
        })
        .await?
    };

    api.delete(&format!("/sandboxes/{id}"))
        .await?
        .ok("delete", 204)?;
    agent.close();

    let s = "no VM (lohar on the host)";
    let exec_met = api_exec.p50_us <= spawn_floor.p50_us + 200.0;
    let read_met = api_read.p50_us <= 200.0;
    let write_met = api_write.p50_us <= fsync_floor.p50_us + 200.0;
    let conc_met = api_conc.p50_us <= 3000.0;
    let health_met = health.p50_us <= 100.0;
    Ok(vec![
        Line::new(s, api_exec)
            .floor(spawn_floor)
            .raw(raw_exec)
            .seed(1220.0)
            .target("≤ spawn floor + 0.2 ms", exec_met),
        Line::new(s, api_read)
            .floor(read_floor)
            .raw(raw_read)
            .seed(583.0)
            .target("≤ 0.2 ms", read_met),
        Line::new(s, api_write)
            .floor(fsync_floor)
            .raw(raw_write)
            .seed(1060.0)
            .target("≤ fsync floor + 0.2 ms", write_met),
        Line::new(s, api_conc)
            .floor(conc_floor)
            .raw(raw_conc)
            .seed(11400.0)
            .target("≤ 3 ms", conc_met),
        Line::new(s, health).target("≤ 0.1 ms", health_met),
    ])
}

type BoxFut<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// [`sample`] over a `&mut` client (one kept-alive connection).
pub async fn sample_mut<C>(
    name: &str,
    warmup: usize,
    n: usize,
    c: &mut C,
    mut f: impl for<'a> FnMut(&'a mut C) -> BoxFut<'a>,
) -> anyhow::Result<Stats> {
    for _ in 0..warmup {
        f(c).await?;
    }
    let mut rec = bhatti_bench::Recorder::new(name);
    for _ in 0..n {
        let t = Instant::now();
        f(c).await?;
        rec.record(t.elapsed());
    }
    Ok(rec.stats())
}

// ---------------------------------------------------------------------------
// Output.

fn met_str(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

fn print_tables(r: &Report) {
    println!("\n{}", r.benchmark);
    println!(
        "host: {}; load before {} / after {}",
        r.host, r.load_before, r.load_after
    );
    let no_vm: Vec<&Line> = r
        .lines
        .iter()
        .filter(|l| l.section.starts_with("no VM"))
        .collect();
    if !no_vm.is_empty() {
        println!("\n1. Orchestrator overhead, no VM (lohar on the host), µs");
        println!(
            "{:<26} {:>8} {:>8} {:>8} | {:<32} {:>8} {:>8} | {:>8} {:>8} | {:>8} | {:>7} | {:<22} met",
            "operation", "p50", "p95", "p99", "floor (same run)", "p50", "p99", "agent50", "agent99",
            "API−agt", "seed50", "target"
        );
        for l in no_vm {
            let (fname, f50, f99) = match &l.floor {
                Some(f) => (
                    f.name.as_str(),
                    format!("{:.1}", f.p50_us),
                    format!("{:.1}", f.p99_us),
                ),
                None => ("-", "-".into(), "-".into()),
            };
            let (a50, a99) = match &l.raw_agent {
                Some(a) => (format!("{:.1}", a.p50_us), format!("{:.1}", a.p99_us)),
                None => ("-".into(), "-".into()),
            };
            println!(
                "{:<26} {:>8.1} {:>8.1} {:>8.1} | {:<32} {:>8} {:>8} | {:>8} {:>8} | {:>8} | {:>7} | {:<22} {}",
                l.op.name,
                l.op.p50_us,
                l.op.p95_us,
                l.op.p99_us,
                fname,
                f50,
                f99,
                a50,
                a99,
                l.api_overhead_p50_us.map(|v| format!("{v:.1}")).unwrap_or("-".into()),
                l.seed_p50_us.map(|v| format!("{v:.0}")).unwrap_or("-".into()),
                l.target,
                met_str(l.met)
            );
        }
    }
    let vm: Vec<&Line> = r
        .lines
        .iter()
        .filter(|l| l.section.starts_with("VM"))
        .collect();
    if let Some(why) = &r.vm_skipped {
        println!("\n2. With real VMs: SKIPPED ({why})");
    } else if !vm.is_empty() {
        println!(
            "\n2. With real VMs ({}), ms",
            r.vm_backend.as_deref().unwrap_or("?")
        );
        println!(
            "{:<34} {:>3} {:>9} {:>9} {:>9} | {:<44} {:>9} {:>9} {:>9} | {:>11} | {:>7}",
            "operation",
            "n",
            "p50",
            "p95",
            "p99",
            "raw VMM floor (same run)",
            "p50",
            "p95",
            "p99",
            "ratio50/99",
            "seed50"
        );
        for l in vm {
            let f = l.floor.as_ref();
            let ms = |v: Option<f64>| {
                v.map(|v| format!("{:.2}", v / 1000.0))
                    .unwrap_or("-".into())
            };
            println!(
                "{:<34} {:>3} {:>9.2} {:>9.2} {:>9.2} | {:<44} {:>9} {:>9} {:>9} | {:>11} | {:>7}",
                l.op.name,
                l.op.samples,
                l.op.p50_us / 1000.0,
                l.op.p95_us / 1000.0,
                l.op.p99_us / 1000.0,
                f.map(|f| f.name.as_str()).unwrap_or("-"),
                ms(f.map(|f| f.p50_us)),
                ms(f.map(|f| f.p95_us)),
                ms(f.map(|f| f.p99_us)),
                match (l.ratio_p50, l.ratio_p99) {
                    (Some(a), Some(b)) => format!("{a:.2}/{b:.2}"),
                    _ => "-".into(),
                },
                ms(l.seed_p50_us),
            );
        }
    }
    let stall: Vec<&Line> = r
        .lines
        .iter()
        .filter(|l| l.section == vms::STALL_SECTION)
        .collect();
    if !stall.is_empty() {
        println!(
            "\n3. GET /health while a memory snapshot is written ({}), ms",
            r.vm_backend.as_deref().unwrap_or("?")
        );
        println!(
            "{:<52} {:>5} {:>7} {:>7} {:>7} {:>8} | {:<32} {:>5} {:>7} {:>7} {:>7} {:>8} | {:<12} met",
            "operation", "n", "p50", "p95", "p99", "max", "floor (same run)", "n", "p50", "p95",
            "p99", "max", "target"
        );
        for l in stall {
            let ms = |v: f64| format!("{:.2}", v / 1000.0);
            let f = l.floor.as_ref();
            let fv = |g: fn(&Stats) -> f64| f.map(|f| ms(g(f))).unwrap_or("-".into());
            println!(
                "{:<52} {:>5} {:>7} {:>7} {:>7} {:>8} | {:<32} {:>5} {:>7} {:>7} {:>7} {:>8} | {:<12} {}",
                l.op.name,
                l.op.samples,
                ms(l.op.p50_us),
                ms(l.op.p95_us),
                ms(l.op.p99_us),
                ms(l.op.max_us),
                f.map(|f| f.name.as_str()).unwrap_or("-"),
                f.map(|f| f.samples.to_string()).unwrap_or("-".into()),
                fv(|s| s.p50_us),
                fv(|s| s.p95_us),
                fv(|s| s.p99_us),
                fv(|s| s.max_us),
                l.target,
                met_str(l.met)
            );
        }
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}

fn print_markdown(r: &Report) {
    println!("\n<!-- api-bench --markdown; host: {} -->", r.host);
    let main: Vec<&Line> = r
        .lines
        .iter()
        .filter(|l| l.section != vms::STALL_SECTION)
        .collect();
    if !main.is_empty() {
        println!("| Operation (through the API) | p50 | p95 | p99 | Floor, same run (p50) | Ours − floor / ratio | Seed p50 | Target |");
        println!("|---|---:|---:|---:|---|---:|---:|---|");
    }
    for l in main {
        let vm = l.section.starts_with("VM");
        let label = if vm {
            format!(
                "{} ({})",
                l.op.name,
                r.vm_backend.as_deref().unwrap_or("VM")
            )
        } else {
            format!("{} (no VM)", l.op.name)
        };
        let floor = match (&l.floor, &l.raw_agent) {
            (Some(f), Some(a)) => {
                format!("{} {}; agent {}", f.name, human(f.p50_us), human(a.p50_us))
            }
            (Some(f), None) => format!("{} {}", f.name, human(f.p50_us)),
            _ => "-".into(),
        };
        let delta = if vm {
            l.ratio_p50
                .map(|r| format!("×{r:.2}"))
                .unwrap_or("-".into())
        } else {
            l.api_overhead_p50_us
                .map(|d| format!("+{} vs agent", human(d.max(0.0))))
                .unwrap_or("-".into())
        };
        let target = match l.met {
            Some(m) => format!("{} {}", l.target, if m { "✓" } else { "✗" }),
            None => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            label,
            human(l.op.p50_us),
            human(l.op.p95_us),
            human(l.op.p99_us),
            floor,
            delta,
            l.seed_p50_us.map(human).unwrap_or("-".into()),
            target
        );
    }
    let stall: Vec<&Line> = r
        .lines
        .iter()
        .filter(|l| l.section == vms::STALL_SECTION)
        .collect();
    if !stall.is_empty() {
        println!();
        println!(
            "| {} | p50 | p95 | p99 | max | Target |",
            r.vm_backend.as_deref().unwrap_or("VM")
        );
        println!("|---|---:|---:|---:|---:|---|");
        for l in stall {
            for (s, target) in [(l.floor.as_ref(), None), (Some(&l.op), Some(l))] {
                let Some(s) = s else { continue };
                let target = match target.and_then(|l| l.met.map(|m| (l, m))) {
                    Some((l, m)) => format!("{} {}", l.target, if m { "✓" } else { "✗" }),
                    None => "floor (same run)".into(),
                };
                println!(
                    "| {} (n={}) | {} | {} | {} | {} | {} |",
                    s.name,
                    s.samples,
                    human(s.p50_us),
                    human(s.p95_us),
                    human(s.p99_us),
                    human(s.max_us),
                    target
                );
            }
        }
    }
    if let Some(why) = &r.vm_skipped {
        println!("\n(real-VM rows skipped: {why})");
    }
}
