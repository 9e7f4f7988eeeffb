//! Tenant networks benchmark: what bhatti's per-user networks cost, each
//! figure beside a floor measured in the same run.
//!
//! 1. `latency`: TCP between two guests of one user on their bridge
//!    (`bhatti-u0`, QEMU VMs booted by the [`bhatti::Engine`]), with
//!    bhatti's full ruleset applied ("rules on") versus the same two guests
//!    on the same bridge with no bhatti table in the namespace ("rules off",
//!    the floor). In-guest python3: 1-byte ping-pong round trips and bulk
//!    transfers, timed with `time.perf_counter` in the client guest. On and
//!    off alternate sample by sample (the order flipping every pair), so
//!    drift in the machine's load touches both alike.
//! 2. `control`: `Tenants::add_sandbox` / `remove_sandbox` of a new user's
//!    first sandbox (bridge + elements + DNS server) and of an existing
//!    user's second sandbox (elements only), with 1 and with 1000 users
//!    already up (two namespaces, samples alternating between them), beside
//!    the raw `ip` / `nft -f` commands the operation consists of, issued in
//!    the same namespace; plus `Tenants::start` of 1 and of 1000 users
//!    beside `ip -batch` + one `nft -f` of the same ruleset.
//!
//! ```text
//! eval "$(scripts/artifacts.sh)"          # BHATTI_KERNEL, BHATTI_ROOTFS (latency part)
//! cargo build --release -p bhatti-bench --bin net-bench
//! sudo -E target/release/net-bench [--quick] [--only latency|control] [--markdown] [--json out.json]
//! ```
//!
//! Everything happens inside network namespaces the program creates
//! (`bhatti-nb-<random>`) and deletes at the end, on errors and Ctrl-C too
//! (guards); no traffic leaves them, and neither the host's interfaces nor
//! its nftables ruleset are touched.

#[path = "net_bench/common.rs"]
mod common;
#[path = "net_bench/control.rs"]
mod control;
#[path = "net_bench/latency.rs"]
mod latency;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Context};
use bhatti_bench::vm::Guard;
use bhatti_bench::{host_description, load_average};
use clap::Parser;
use serde::Serialize;

#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    about = "Benchmark bhatti's tenant networks: firewall cost on guest traffic, \
                   control-plane cost with 1 and 1000 users"
)]
pub struct Args {
    /// Few samples (development): 4 pairs, 20 control samples, 100 users.
    #[arg(long)]
    quick: bool,
    /// Run one part only.
    #[arg(long, value_parser = ["latency", "control"])]
    only: Option<String>,
    /// Latency part: measured rules-on/rules-off pairs (after the warm-up).
    #[arg(long, default_value_t = 40)]
    pairs: usize,
    /// Latency part: unrecorded pairs first.
    #[arg(long, default_value_t = 1)]
    warmup_pairs: usize,
    /// Latency part: recorded 1-byte round trips per sample.
    #[arg(long, default_value_t = 500)]
    rtts: usize,
    /// Latency part: bulk transfers per sample.
    #[arg(long, default_value_t = 3)]
    transfers: usize,
    /// Latency part: bytes per bulk transfer (MiB).
    #[arg(long, default_value_t = 32)]
    transfer_mib: usize,
    /// Control part: measured samples per operation and scale.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Control part: unrecorded samples first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Control part: users (one sandbox each) already up in the big case.
    #[arg(long, default_value_t = 1000)]
    users: u32,
    /// The engine's own default-bridge subnet (unused by the tenant VMs).
    #[arg(long, default_value = "10.81.0.1/24")]
    subnet: String,
    /// Also print Markdown table rows (for the README).
    #[arg(long)]
    markdown: bool,
    /// Write the JSON report here (default: stdout after the tables).
    #[arg(long)]
    json: Option<PathBuf>,
}

impl Args {
    /// `--quick` shrinks every count that was left at its default.
    fn effective(mut self) -> Args {
        if self.quick {
            self.pairs = self.pairs.min(4);
            self.rtts = self.rtts.min(100);
            self.transfers = self.transfers.min(1);
            self.transfer_mib = self.transfer_mib.min(8);
            self.samples = self.samples.min(20);
            self.warmup = self.warmup.min(2);
            self.users = self.users.min(100);
        }
        self
    }
    fn wants(&self, part: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == part)
    }
}

#[derive(Debug, Serialize)]
struct Output {
    benchmark: String,
    host: String,
    load_average_start: String,
    load_average_end: String,
    wall_seconds: f64,
    network: String,
    args: Args,
    latency: Option<latency::LatencyReport>,
    latency_skipped: Option<String>,
    control: Option<control::ControlReport>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse().effective();
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP net-bench: needs root (network namespaces, bridges, nftables, TAPs)");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The latency part's namespace + scratch dir (engine data, VMs); the
    // control part makes its own namespaces (common::NsGuard).
    let guard = Guard::new("net-bench", "bhatti-nb", &[])?;
    let load_start = load_average();
    let t0 = Instant::now();
    eprintln!(
        "[net-bench] load average {load_start}; scratch {}",
        guard.dir.path().display()
    );
    let result = rt.block_on(async {
        tokio::select! {
            r = run(&args, &guard) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    // Tasks (DNS servers) go with the runtime, then VMs, mounts and the
    // namespace with the guard; all before the report or the error.
    drop(rt);
    drop(guard);
    let (latency, latency_skipped, control) = result?;
    let out = Output {
        benchmark: "net-bench".into(),
        host: host_description(),
        load_average_start: load_start,
        load_average_end: load_average(),
        wall_seconds: t0.elapsed().as_secs_f64(),
        network: "every bridge, TAP, rule and DNS server in network namespaces the bench \
                  creates and deletes (bhatti-nb-*); no traffic leaves them"
            .into(),
        args,
        latency,
        latency_skipped,
        control,
    };
    if let Some(l) = &out.latency {
        l.print();
    }
    if let Some(why) = &out.latency_skipped {
        println!("\nSKIP latency part: {why}");
    }
    if let Some(c) = &out.control {
        c.print();
    }
    println!(
        "\nload average (1/5/15 min): {} at start, {} at end; whole run {:.0} s",
        out.load_average_start, out.load_average_end, out.wall_seconds
    );
    if out.args.markdown {
        println!("\n<!-- net-bench --markdown; host: {} -->", out.host);
        if let Some(l) = &out.latency {
            l.print_markdown();
        }
        if let Some(c) = &out.control {
            c.print_markdown();
        }
    }
    let json = serde_json::to_string_pretty(&out)?;
    match &out.args.json {
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

type Parts = (
    Option<latency::LatencyReport>,
    Option<String>,
    Option<control::ControlReport>,
);

async fn run(args: &Args, guard: &Guard) -> anyhow::Result<Parts> {
    let (mut lat, mut skipped, mut ctl) = (None, None, None);
    if args.wants("control") {
        eprintln!(
            "[net-bench] control part: add/remove with 1 and {} users",
            args.users
        );
        ctl = Some(control::bench(args).await?);
    }
    if args.wants("latency") {
        match latency::artifacts() {
            Err(why) => skipped = Some(why),
            Ok(art) => {
                eprintln!("[net-bench] latency part: two guests, rules on/off");
                lat = Some(latency::bench(args, &art, guard).await?);
            }
        }
    }
    Ok((lat, skipped, ctl))
}
