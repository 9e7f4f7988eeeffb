//! Issue-15 benchmark: the E2B-compatible API's overhead. Against one real
//! daemon (in-process, loopback TCP listener) and one VM,
//! `sandbox.commands.run("true")` through the official E2B Python SDK
//! beside bhatti's own `POST /sandboxes/{id}/exec` running the same guest
//! command, measured in the same run, from the same Python process, over
//! the same HTTP/1.1 keep-alive stack (the SDK's pooled transport under
//! an `httpx.Client`), alternating per iteration. The driver is
//! `bench/e2b/driver.py`.
//!
//! | ours | floor (same run) |
//! |---|---|
//! | SDK `commands.run("true")` (envd `process.Process/Start`, a Connect server stream; the SDK runs `/bin/bash -l -c true`) | `POST /exec {"cmd":["/bin/bash","-l","-c","true"]}` |
//! | the same | `POST /exec {"cmd":["true"]}` (no login shell; shows its cost) |
//!
//! Target: p50 ratio ≤ 1.2 against the same guest command.
//!
//! ```text
//! cargo build --release -p lohar -p bhatti-bench
//! eval "$(scripts/artifacts.sh)"
//! sudo -E target/release/e2b-bench [--samples 200] [--warmup 20] [--json out.json]
//! ```
//!
//! Needs root, BHATTI_KERNEL / BHATTI_ROOTFS, and `python3` with `e2b`
//! (scripts/install-deps.sh), else one SKIP line.

#[allow(dead_code)]
#[path = "api_bench/daemon.rs"]
mod daemon;
#[allow(dead_code)]
#[path = "api_bench/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "api_bench/vm_env.rs"]
mod vm_env;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bhatti_bench::{Recorder, Row, Section, Stats};
use clap::Parser;
use serde::Deserialize;

use daemon::{create_user, Daemon};
use vm_env::{artifacts, backend_label, VmEnv};

#[derive(Parser, Debug)]
#[command(about = "Benchmark the E2B SDK's commands.run against bhatti's own exec")]
struct Args {
    /// Samples per operation.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Unrecorded rounds first.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// The p50 ratio SDK / own exec (same guest command) that passes.
    #[arg(long, default_value_t = 1.2)]
    max_ratio: f64,
    /// Write the JSON report here (else stdout after the table).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Deserialize)]
struct DriverSamples {
    sdk: Vec<u64>,
    exec_bash: Vec<u64>,
    exec_true: Vec<u64>,
}

#[derive(Deserialize)]
struct DriverOut {
    create_ns: u64,
    transport: String,
    samples: DriverSamples,
}

fn stats(name: &str, ns: &[u64]) -> Stats {
    let mut r = Recorder::new(name);
    for &n in ns {
        r.record(Duration::from_nanos(n));
    }
    r.stats()
}

fn have_e2b() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import e2b, httpx"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let art = match artifacts() {
        Ok(a) => a,
        Err(why) => {
            println!("SKIP e2b-bench: {why}");
            return Ok(());
        }
    };
    if !have_e2b() {
        println!("SKIP e2b-bench: python3 without e2b (scripts/install-deps.sh)");
        return Ok(());
    }
    let env = VmEnv::new("bhatti-e2b-bench.", &art)?;
    let mut config = env.config.clone();
    // Nothing cools the sandbox while it is measured.
    config.thermal.warm_after_secs = 0;
    config.thermal.cold_after_secs = 0;
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    config.listen_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    let backend = bhatti::daemon::backend(&config)?;
    let label = backend_label(&backend);
    let key = create_user(&config, "bench")?;
    let daemon = Daemon::start(config.clone(), backend).await?;
    let out = drive(&args, port, &key).await;
    let stopped = daemon.stop().await;
    let out = out?;
    stopped?;

    let s = &out.samples;
    let sdk = stats("SDK commands.run(\"true\")", &s.sdk);
    let bash = stats("POST /exec bash -l -c true", &s.exec_bash);
    let plain = stats("POST /exec [\"true\"]", &s.exec_true);
    let met = sdk.p50_us <= args.max_ratio * bash.p50_us;
    let rows = vec![
        Row {
            op: sdk.clone(),
            floor: Some(bash),
            target: format!("p50 ≤ {:.1}× floor", args.max_ratio),
            met: Some(met),
        },
        Row {
            op: sdk,
            floor: Some(plain),
            target: "- (login shell's share)".into(),
            met: None,
        },
    ];
    let notes = vec![
        format!(
            "one {label} VM; SDK create took {:.2} s; {} samples after {} warm-up rounds, the three operations rotated per iteration",
            out.create_ns as f64 / 1e9,
            args.samples,
            args.warmup
        ),
        format!(
            "all three from one python3 process over loopback TCP, HTTP/1.1 kept alive; REST calls through {}",
            out.transport
        ),
    ];
    let section = Section::new("e2b-bench", label, rows, vec![], notes);
    section.print();
    let json = serde_json::to_string_pretty(&section)?;
    match &args.json {
        Some(p) => std::fs::write(p, json)?,
        None => println!("{json}"),
    }
    anyhow::ensure!(
        met,
        "SDK commands.run p50 is more than {}× bhatti's own exec of the same command",
        args.max_ratio
    );
    Ok(())
}

/// Runs the Python driver against the daemon on `port`.
async fn drive(args: &Args, port: u16, key: &str) -> anyhow::Result<DriverOut> {
    let driver = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("e2b/driver.py");
    let root = format!("http://127.0.0.1:{port}");
    let e2b = format!("{root}/e2b");
    let out = tokio::process::Command::new("python3")
        .arg(&driver)
        .env("E2B_API_KEY", key)
        .env("E2B_API_URL", &e2b)
        .env("E2B_SANDBOX_URL", &e2b)
        .env("BHATTI_URL", &root)
        .env("BHATTI_KEY", key)
        .env("BENCH_SAMPLES", args.samples.to_string())
        .env("BENCH_WARMUP", args.warmup.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .context("run python3 bench/e2b/driver.py")?;
    anyhow::ensure!(out.status.success(), "the driver failed: {}", out.status);
    let parsed: DriverOut =
        serde_json::from_slice(&out.stdout).context("the driver's JSON output")?;
    anyhow::ensure!(
        parsed.samples.sdk.len() == args.samples,
        "the driver returned {} samples, not {}",
        parsed.samples.sdk.len(),
        args.samples
    );
    Ok(parsed)
}
