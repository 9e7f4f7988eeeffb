//! Issue-12 benchmark: images and instant create, p50/p95/p99 beside raw
//! floors measured in the same run.
//!
//! 1. `create-exec` (real VMs, an in-process daemon): create → first exec
//!    through the API by the boot path (`POST /sandboxes {}`) and by the
//!    instant path (`POST /sandboxes {"template"}`, restored from the
//!    template's pre-booted snapshot; a checkpoint fork on a daemon without
//!    templates), beside the raw floor: QEMU restore of the same snapshot +
//!    agent handshake + exec. Target: instant ≤ 1.25 × floor. Needs root
//!    and BHATTI_KERNEL / BHATTI_ROOTFS, else one SKIP line.
//! 2. `pull-convert`: a ~100 MB, three-layer image on a local
//!    `docker-registry`, pulled and made into an ext4 root disk by bhatti's
//!    image library, beside `skopeo copy` + `umoci raw unpack` +
//!    `mkfs.ext4 -d` of the same content (and `POST /images/pull` through
//!    the daemon where one can run). Target: ≤ 1.3 × floor. Needs
//!    `docker-registry umoci skopeo` and a static lohar (BHATTI_LOHAR).
//!
//! ```text
//! cargo build --release -p lohar -p bhatti-bench
//! eval "$(scripts/artifacts.sh)"
//! sudo -E target/release/image-bench [--part create-exec|pull-convert] [--samples 15] [--pull-samples 5] [--markdown] [--json out.json]
//! ```

#[allow(dead_code)]
#[path = "image_bench/create_exec.rs"]
mod create_exec;
#[allow(dead_code)]
#[path = "api_bench/daemon.rs"]
mod daemon;
#[allow(dead_code)]
#[path = "api_bench/http.rs"]
mod http;
#[path = "image_bench/pull_convert.rs"]
mod pull_convert;
#[allow(dead_code)]
#[path = "api_bench/vm_env.rs"]
mod vm_env;

use std::path::PathBuf;

use bhatti_bench::{host_description, human, load_average, Stats};
use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    CreateExec,
    PullConvert,
}

#[derive(Parser, Debug)]
#[command(about = "Benchmark image pulls and instant create beside their raw floors")]
struct Args {
    /// Run only this part (default: both).
    #[arg(long, value_enum)]
    part: Option<Part>,
    /// Samples of each create-exec path (boot, instant, floor).
    #[arg(long, default_value_t = 15)]
    samples: usize,
    /// Samples of pull + convert (bhatti and the floor each).
    #[arg(long, default_value_t = 5)]
    pull_samples: usize,
    /// The static lohar put into converted images (default: BHATTI_LOHAR,
    /// else `lohar` next to this program).
    #[arg(long)]
    lohar: Option<PathBuf>,
    /// Also print Markdown tables (for the README).
    #[arg(long)]
    markdown: bool,
    /// Write the JSON report here (default: stdout after the tables).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    host: String,
    load_before: String,
    load_after: String,
    create_exec: Option<create_exec::CreateExec>,
    pull_convert: Option<pull_convert::PullConvert>,
    skipped: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The in-process daemon's logs, when asked for (e.g. its phase times:
    // RUST_LOG=bhatti::timing=debug).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    // The daemon runs in this process: give it the scheduler `bhatti serve`
    // builds from the default config.
    let rt = bhatti::daemon::runtime(bhatti::config::Config::default().worker_threads)?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut report = Report {
        benchmark: "bhatti image-bench (create → first exec: boot vs instant vs raw restore; image pull + convert vs skopeo + umoci + mkfs)",
        host: host_description(),
        load_before: load_average(),
        load_after: String::new(),
        create_exec: None,
        pull_convert: None,
        skipped: Vec::new(),
    };
    let wants = |p: Part| args.part.is_none_or(|q| q == p);
    if wants(Part::CreateExec) {
        match vm_env::artifacts() {
            Err(why) => {
                println!("SKIP create-exec: {why}");
                report.skipped.push(format!("create-exec: {why}"));
            }
            Ok(art) => {
                eprintln!("[image-bench] part 1: create → first exec");
                report.create_exec = Some(create_exec::run(args.samples.max(1), &art).await?);
            }
        }
    }
    if wants(Part::PullConvert) {
        match (pull_convert::missing_tool(), lohar_path(args.lohar.clone())) {
            (Some(t), _) => {
                println!("SKIP pull-convert: {t} is not installed");
                report
                    .skipped
                    .push(format!("pull-convert: {t} is not installed"));
            }
            (None, Err(why)) => {
                println!("SKIP pull-convert: {why}");
                report.skipped.push(format!("pull-convert: {why}"));
            }
            (None, Ok(lohar)) => {
                eprintln!("[image-bench] part 2: pull + convert");
                // Through the API too where a daemon can run here.
                let art = vm_env::artifacts().ok();
                report.pull_convert =
                    Some(pull_convert::run(args.pull_samples.max(1), &lohar, art.as_ref()).await?);
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

/// `--lohar`, else BHATTI_LOHAR, else `lohar` beside this program.
fn lohar_path(arg: Option<PathBuf>) -> Result<PathBuf, String> {
    let p = arg
        .or_else(|| {
            std::env::var_os("BHATTI_LOHAR")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("lohar")))
        })
        .ok_or("no lohar (--lohar or BHATTI_LOHAR)")?;
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "no lohar at {} (--lohar or BHATTI_LOHAR)",
            p.display()
        ))
    }
}

fn ms(us: f64) -> f64 {
    us / 1000.0
}

fn line(s: &Stats) -> String {
    format!(
        "{:<58} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
        s.name,
        ms(s.p50_us),
        ms(s.p95_us),
        ms(s.p99_us),
        ms(s.max_us)
    )
}

fn print_tables(r: &Report) {
    println!("\n{} on {}", r.benchmark, r.host);
    println!(
        "load average before {}, after {}",
        r.load_before, r.load_after
    );
    let head = format!(
        "{:<58} {:>10} {:>10} {:>10} {:>10}",
        "operation (ms)", "p50", "p95", "p99", "max"
    );
    if let Some(c) = &r.create_exec {
        println!(
            "\ncreate → first exec, {} ({} samples each)",
            c.backend, c.samples
        );
        println!("{head}");
        for s in [
            &c.boot,
            &c.instant,
            &c.floor,
            &c.raw_fork,
            &c.floor_disk_clone,
        ] {
            println!("{}", line(s));
        }
        let [a, b, d] = c.instant_over_floor;
        println!("instant / floor: p50 {a:.2}, p95 {b:.2}, p99 {d:.2}");
        let [a, b, d] = c.instant_over_raw_fork;
        println!("instant / raw fork: p50 {a:.2}, p95 {b:.2}, p99 {d:.2}");
        let [a, b, d] = c.boot_over_instant;
        println!("boot / instant:  p50 {a:.2}, p95 {b:.2}, p99 {d:.2}");
        println!(
            "target {}: {}",
            c.target,
            if c.met { "met" } else { "NOT met" }
        );
        for n in &c.notes {
            println!("note: {n}");
        }
    }
    if let Some(p) = &r.pull_convert {
        println!("\npull + convert ({} samples each)", p.samples);
        println!("{head}");
        for s in [&p.bhatti, &p.floor] {
            println!("{}", line(s));
        }
        if let Some(a) = &p.api {
            println!("{}", line(&a.stats));
        }
        for s in p.bhatti_phases.iter().chain(&p.floor_phases) {
            println!("{}", line(s));
        }
        let [a, b, d] = p.ratio;
        println!("bhatti / floor: p50 {a:.2}, p95 {b:.2}, p99 {d:.2}");
        if let Some(api) = &p.api {
            let [a, b, d] = api.ratio;
            println!("API / floor:    p50 {a:.2}, p95 {b:.2}, p99 {d:.2}");
        }
        println!(
            "target {}: {}",
            p.target,
            if p.met { "met" } else { "NOT met" }
        );
        for n in &p.notes {
            println!("note: {n}");
        }
    }
    for s in &r.skipped {
        println!("skipped: {s}");
    }
}

fn print_markdown(r: &Report) {
    println!("\n| operation | p50 | p95 | p99 | ratio p50 (p99) | target |");
    println!("|---|---:|---:|---:|---|---|");
    let ok = |m: bool| if m { "✓" } else { "✗" };
    let row = |name: &str, s: &Stats, ratio: &str, target: &str| {
        println!(
            "| {name} | {} | {} | {} | {ratio} | {target} |",
            human(s.p50_us),
            human(s.p95_us),
            human(s.p99_us)
        );
    };
    let x = |r: [f64; 3]| format!("×{:.2} (×{:.2})", r[0], r[2]);
    if let Some(c) = &r.create_exec {
        let via = match c.instant_via {
            create_exec::InstantVia::Template => "template",
            create_exec::InstantVia::CheckpointFork => "checkpoint fork",
        };
        row(
            &format!("create → first exec, boot path ({})", c.backend),
            &c.boot,
            &format!("boot / instant {}", x(c.boot_over_instant)),
            "",
        );
        row(
            &format!("create → first exec, instant path ({via})"),
            &c.instant,
            &format!("instant / floor {}", x(c.instant_over_floor)),
            &format!("≤ ×1.25 {}", ok(c.met)),
        );
        row(
            "floor, same run: QEMU restore of the same snapshot → handshake → exec",
            &c.floor,
            "",
            "",
        );
        row(
            "raw fork, same run: floor + reidentify + handshake with the new token",
            &c.raw_fork,
            &format!("instant / raw fork {}", x(c.instant_over_raw_fork)),
            "",
        );
    }
    if let Some(p) = &r.pull_convert {
        row(
            &format!(
                "pull + convert, {:.0} MiB image ({:.0} MiB compressed, {} layers, {} inodes)",
                p.image.content_bytes as f64 / 1048576.0,
                p.image.layer_bytes as f64 / 1048576.0,
                p.image.layers,
                p.image.content_inodes
            ),
            &p.bhatti,
            &format!("bhatti / floor {}", x(p.ratio)),
            &format!("≤ ×1.3 {}", ok(p.met)),
        );
        if let Some(a) = &p.api {
            row(
                "`POST /images/pull` → task succeeded (same image, through the daemon)",
                &a.stats,
                &format!("API / floor {}", x(a.ratio)),
                "",
            );
        }
        row(
            "floor, same run: `skopeo copy` + `umoci raw unpack` + `mkfs.ext4 -d`",
            &p.floor,
            "",
            "",
        );
    }
}
