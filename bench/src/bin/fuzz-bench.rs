//! Issue-14 fuzzing, long form: generated inputs through the frame decoder
//! (`frames`), the guest's config parsing (`guest-config`) and the agent's
//! request handling (`requests`), 10 M per target by default. Each input
//! runs under `catch_unwind`; a panic or an allocation over the target's
//! bound is a crash, printed with the input's hex as a reproducer (replay
//! it with `BHATTI_FUZZ_REPRO=<hex>` and the target's test:
//! `crates/protocol/tests/fuzz_frames.rs`, `crates/lohar/tests/fuzz_requests.rs`).
//!
//! ```text
//! cargo build --release -p bhatti-bench --bin fuzz-bench
//! target/release/fuzz-bench [--inputs 10000000] [--seed N] [--targets frames,requests] [--markdown] [--json out.json]
//! ```

use std::path::PathBuf;

use bhatti_bench::{host_description, load_average};
use bhatti_protocol::fuzz::{self, alloc::Tracker, Target};
use clap::Parser;
use serde::Serialize;

#[global_allocator]
static ALLOC: Tracker = Tracker;

#[derive(Parser, Debug)]
#[command(about = "Fuzz the protocol decoders and the agent's request handling")]
struct Args {
    /// Inputs per target.
    #[arg(long, default_value_t = 10_000_000)]
    inputs: u64,
    /// Seed of the input generator (input i uses a seed derived from it).
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Targets to run, comma-separated: frames, guest-config, requests.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "frames,guest-config,requests"
    )]
    targets: Vec<String>,
    /// Also print a Markdown table (for the README).
    #[arg(long)]
    markdown: bool,
    /// Write the JSON report here (default: stdout after the table).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Crash {
    index: u64,
    message: String,
    input_hex: String,
}

#[derive(Serialize)]
struct Row {
    target: String,
    inputs: u64,
    crashes: u64,
    seconds: f64,
    inputs_per_sec: f64,
    largest_alloc_bytes: usize,
    examples: Vec<Crash>,
}

#[derive(Serialize)]
struct Report {
    host: String,
    load_before: String,
    seed: u64,
    rows: Vec<Row>,
}

fn target(name: &str) -> anyhow::Result<Box<dyn Target>> {
    Ok(match name {
        "frames" => Box::new(fuzz::frames::Frames::default()),
        "guest-config" => Box::new(fuzz::guest_config::GuestConfigs),
        "requests" => Box::new(lohar::fuzz::Requests::new()?),
        other => anyhow::bail!("unknown target {other:?}"),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut report = Report {
        host: host_description(),
        load_before: load_average(),
        seed: args.seed,
        rows: Vec::new(),
    };
    for name in &args.targets {
        let mut t = target(name)?;
        eprintln!("{name}: {} inputs …", args.inputs);
        let r = fuzz::run(t.as_mut(), args.inputs, args.seed);
        report.rows.push(Row {
            target: name.clone(),
            inputs: r.inputs,
            crashes: r.crashes,
            seconds: r.elapsed.as_secs_f64(),
            inputs_per_sec: r.per_sec(),
            largest_alloc_bytes: r.max_alloc,
            examples: r
                .examples
                .iter()
                .map(|c| Crash {
                    index: c.index,
                    message: c.message.clone(),
                    input_hex: c.input_hex.clone(),
                })
                .collect(),
        });
    }

    println!(
        "host: {}  (load before: {})",
        report.host, report.load_before
    );
    println!(
        "{:<14} {:>12} {:>8} {:>10} {:>12} {:>14}",
        "target", "inputs", "crashes", "seconds", "inputs/s", "largest alloc"
    );
    for r in &report.rows {
        println!(
            "{:<14} {:>12} {:>8} {:>10.1} {:>12.0} {:>12} B",
            r.target, r.inputs, r.crashes, r.seconds, r.inputs_per_sec, r.largest_alloc_bytes
        );
        for c in &r.examples {
            println!(
                "  crash at input {}: {}\n    hex {}",
                c.index, c.message, c.input_hex
            );
        }
    }
    if args.markdown {
        println!("\n| target | inputs | crashes | inputs/s | largest allocation |");
        println!("|---|---:|---:|---:|---:|");
        for r in &report.rows {
            println!(
                "| `{}` | {} | {} | {:.0} | {} KiB |",
                r.target,
                r.inputs,
                r.crashes,
                r.inputs_per_sec,
                r.largest_alloc_bytes / 1024
            );
        }
    }
    let json = serde_json::to_string_pretty(&report)?;
    match &args.json {
        Some(p) => std::fs::write(p, json)?,
        None => println!("{json}"),
    }
    if report.rows.iter().any(|r| r.crashes > 0) {
        anyhow::bail!("crashes found");
    }
    Ok(())
}
