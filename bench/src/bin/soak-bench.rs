//! Issue-14 benchmark: the soak, long form (the short form is
//! `crates/bhatti/tests/soak.rs`; both run `bhatti_testkit::soak`).
//!
//! `bhatti serve` as a child process, 5 sandboxes going hot → warm → cold
//! → woken on short thermal timers (each rests in turn), 20 concurrent
//! clients doing exec, file write + read-back and WebSocket exec for N
//! minutes. Reports requests/s, p50/p95/p99 by operation, every failure,
//! and the daemon's RSS, open fds, threads and tokio tasks sampled every
//! 10 s with their least-squares slopes per minute (goal: flat).
//!
//! ```text
//! cargo build --release -p bhatti --bin bhatti -p bhatti-bench --bin soak-bench
//! target/release/soak-bench [--minutes 60] [--bhatti target/release/bhatti] [--json out.json]
//! ```
//! Needs root, QEMU and the VM artifacts (`BHATTI_KERNEL` / `BHATTI_ROOTFS`,
//! else the newest in /var/cache/bhatti-ci), else one SKIP line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bhatti::config::{Backend, Config, DiskStrategy};
use bhatti::store::users::UserCaps;
use bhatti_bench::{host_description, load_average};
use bhatti_testkit::soak;
use clap::Parser;
use serde::Serialize;

const TOKEN: &str = "soak-bench-metrics-token-0123";

#[derive(Parser, Debug)]
#[command(about = "Soak the daemon: 20 clients, 5 sandboxes through thermal cycles, N minutes")]
struct Args {
    /// How long the clients run.
    #[arg(long, default_value_t = 60.0)]
    minutes: f64,
    #[arg(long, default_value_t = 5)]
    sandboxes: usize,
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// The `bhatti` binary (default: beside this one).
    #[arg(long)]
    bhatti: Option<PathBuf>,
    /// Write the JSON report here (default: stdout after the table).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    host: String,
    load_before: String,
    load_after: String,
    soak: soak::Report,
}

/// The scratch dir and network namespace; removed on drop with every VMM
/// and mount under them.
struct Scratch {
    dir: tempfile::TempDir,
    ns: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        bhatti_testkit::clean_data_dir(&self.dir.path().join("data"));
        bhatti_testkit::delete_netns(&self.ns);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if bhatti_vmm::probe::probe().qemu.is_none() {
        bhatti_testkit::skip("soak-bench", "missing qemu");
        return Ok(());
    }
    let Some(art) = bhatti_testkit::artifacts("soak-bench") else {
        return Ok(());
    };
    let bin = match args.bhatti.clone() {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("this binary's directory")?
            .join("bhatti"),
    };
    anyhow::ensure!(
        bin.is_file(),
        "{} is missing: build it (cargo build --release -p bhatti --bin bhatti) or pass --bhatti",
        bin.display()
    );
    let scratch = Scratch {
        dir: tempfile::Builder::new().prefix("bhatti-soak.").tempdir()?,
        ns: format!("bhatti-s-{}", bhatti::engine::random_hex(4)),
    };
    let root = scratch.dir.path();
    let mut c = Config {
        data_dir: root.join("data"),
        listen_unix: root.join("bhatti.sock"),
        listen_tcp: None,
        ..Config::default()
    };
    c.vm.backend = Backend::Qemu;
    c.vm.kernel = art.kernel.clone();
    c.vm.rootfs = art.rootfs.clone();
    c.vm.boot_timeout_secs = 180;
    c.vm.agent_timeout_secs = 60;
    c.vm.disk_strategy = DiskStrategy::Auto;
    c.vm.xfs_loop_size_mb = 16 << 10;
    c.network.enabled = false;
    c.network.netns = Some(scratch.ns.clone());
    c.metrics.token = TOKEN.into();
    c.limits.rate.exec_per_second = 0;
    c.limits.rate.read_per_second = 0;
    c.limits.rate.create_per_minute = 0;
    c.thermal.warm_after_secs = 2;
    c.thermal.cold_after_secs = 5;
    c.thermal.sweep_interval_ms = 500;
    let config = root.join("bhatti.toml");
    std::fs::write(&config, toml::to_string(&c)?)?;
    std::fs::create_dir_all(&c.data_dir)?;
    let store = bhatti::store::Store::open(c.db_path())?;
    let key = store
        .with(|conn| {
            Ok(bhatti::auth::create_user(conn, "soak", UserCaps::default())
                .expect("create user")
                .api_key)
        })
        .map_err(|e| anyhow::anyhow!("creating the user: {e}"))?;
    drop(store);

    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    let spec = soak::Spec {
        bin,
        config,
        sock: c.listen_unix.clone(),
        log: root.join("daemon.log"),
        key,
        metrics_token: TOKEN.into(),
        sandboxes: args.sandboxes,
        clients: args.clients,
        duration,
        sample_every: Duration::from_secs(10),
        warmup: (duration / 6).clamp(Duration::from_secs(10), Duration::from_secs(120)),
        rest: Duration::from_secs(15),
    };
    let load_before = load_average();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let soak = match rt.block_on(soak::run(&spec)) {
        Ok(r) => r,
        Err(e) => {
            let log = std::fs::read_to_string(&spec.log).unwrap_or_default();
            anyhow::bail!("the soak could not run: {e}\n{log}");
        }
    };
    soak.print();
    let report = Report {
        benchmark: "soak",
        host: host_description(),
        load_before,
        load_after: load_average(),
        soak,
    };
    let json = serde_json::to_string_pretty(&report)?;
    match &args.json {
        Some(p) => std::fs::write(p, json)?,
        None => println!("{json}"),
    }
    drop(scratch);
    Ok(())
}
