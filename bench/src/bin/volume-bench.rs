//! Issue-13 benchmark: create → first exec with one attached volume beside
//! the same create without one, through an in-process daemon on real VMs.
//! Target: with a volume ≤ 1.10 × without (p50).
//!
//! Each round creates one sandbox of each kind in a rotating order, execs
//! `/bin/true`, and deletes it (untimed). The volume (64 MiB, read-write)
//! is made once; each sandbox with it attaches it at `/data`.
//!
//! ```text
//! cargo build --release -p lohar -p bhatti-bench
//! eval "$(scripts/artifacts.sh)"
//! sudo -E target/release/volume-bench [--samples 10] [--json out.json]
//! ```

#[allow(dead_code)]
#[path = "api_bench/daemon.rs"]
mod daemon;
#[allow(dead_code)]
#[path = "api_bench/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "api_bench/vm_env.rs"]
mod vm_env;

use std::path::PathBuf;
use std::time::Instant;

use bhatti_bench::{host_description, load_average, Recorder, Stats};
use clap::Parser;
use serde::Serialize;

use crate::daemon::{create_sandbox, create_user, Daemon};
use crate::http::Conn;
use crate::vm_env::{backend_label, VmEnv};

#[derive(Parser, Debug)]
#[command(about = "Create → first exec with and without an attached volume")]
struct Args {
    /// Samples of each kind.
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// Write the JSON report here (default: stdout after the table).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    host: String,
    backend: String,
    load_before: String,
    load_after: String,
    without: Stats,
    with_volume: Stats,
    /// with / without at p50, p95, p99.
    ratio: [f64; 3],
    target: &'static str,
    met: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = bhatti::daemon::runtime(bhatti::config::Config::default().worker_threads)?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let art = match vm_env::artifacts() {
        Ok(a) => a,
        Err(why) => {
            println!("SKIP volume-bench: {why}");
            return Ok(());
        }
    };
    let load_before = load_average();
    let env = VmEnv::new("bhatti-volume-bench.", &art)?;
    let config = env.config.clone();
    let backend = bhatti::daemon::backend(&config)?;
    let key = create_user(&config, "bench")?;
    let daemon = Daemon::start(config.clone(), backend.clone()).await?;
    let result = measure(
        &mut Conn::new(&config.listen_unix, Some(&key)),
        args.samples,
    )
    .await;
    let stopped = daemon.stop().await;
    let (without, with_volume) = result?;
    stopped?;
    let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let ratio = [
        r(with_volume.p50_us, without.p50_us),
        r(with_volume.p95_us, without.p95_us),
        r(with_volume.p99_us, without.p99_us),
    ];
    let report = Report {
        benchmark: "bhatti volume-bench (create → first exec, with one attached volume vs without)",
        host: host_description(),
        backend: backend_label(&backend),
        load_before,
        load_after: load_average(),
        met: ratio[0] <= 1.10,
        without,
        with_volume,
        ratio,
        target: "with a volume ≤ 1.10 × without (p50)",
    };
    println!(
        "\n{} on {} ({})",
        report.benchmark, report.host, report.backend
    );
    println!(
        "{:<40} {:>10} {:>10} {:>10}",
        "operation (ms)", "p50", "p95", "max"
    );
    for s in [&report.without, &report.with_volume] {
        println!(
            "{:<40} {:>10.1} {:>10.1} {:>10.1}",
            s.name,
            s.p50_us / 1e3,
            s.p95_us / 1e3,
            s.max_us / 1e3
        );
    }
    println!(
        "with / without: p50 {:.3}, p95 {:.3} — target {}: {}",
        report.ratio[0],
        report.ratio[1],
        report.target,
        if report.met { "met" } else { "NOT met" }
    );
    let json = serde_json::to_string_pretty(&report)?;
    match &args.json {
        Some(p) => std::fs::write(p, json)?,
        None => println!("\n{json}"),
    }
    Ok(())
}

async fn measure(c: &mut Conn, samples: usize) -> anyhow::Result<(Stats, Stats)> {
    c.post(
        "/volumes",
        serde_json::json!({"name": "bench", "size_mb": 64}),
    )
    .await?
    .ok("create the volume", 201)?;
    let mut without = Recorder::new("create → exec, no volume");
    let mut with = Recorder::new("create → exec, one volume");
    // Round 0 warms up (page cache, the base disk import).
    for round in 0..=samples {
        for k in 0..2 {
            let volume = (round + k) % 2 == 1;
            let mut body = serde_json::json!({"name": format!("s{round}x{k}")});
            if volume {
                body["volumes"] = serde_json::json!([{"name": "bench", "mount": "/data"}]);
            }
            let t = Instant::now();
            let id = create_sandbox(c, body).await?;
            c.exec_true(&id).await?;
            let took = t.elapsed();
            if round > 0 {
                if volume { &mut with } else { &mut without }.record(took);
            }
            eprintln!(
                "[volume-bench] {round}: {} {:.3} s",
                if volume { "volume" } else { "plain" },
                took.as_secs_f64()
            );
            c.delete(&format!("/sandboxes/{id}"))
                .await?
                .ok("delete", 204)?;
        }
    }
    c.delete("/volumes/bench")
        .await?
        .ok("delete the volume", 204)?;
    Ok((without.stats(), with.stats()))
}
