//! Issue-13 benchmark: volume backup throughput beside its floors, all
//! measured in the same run against the same S3 server (moto on 127.0.0.1,
//! bhatti_testkit::s3).
//!
//! - `bhatti backup`: read + sha256 + zstd -3 + multipart upload of a
//!   volume file of mixed data (random, zeros, text), as
//!   `BackupStore::backup` does it.
//! - floor `zstd -3`: the zstd CLI compressing the same file to /dev/null.
//! - floor `upload`: the same object_store client uploading the file
//!   compressed beforehand (same part size and parts in flight).
//! - `zstd + upload`: the two floors one after the other; a backup streams
//!   both at once, so it can beat their sum but not the slower of the two.
//! - `bhatti restore` (download + zstd -d + sha256 + rename), for reference.
//!
//! ```text
//! cargo build --release -p bhatti-bench --bin backup-bench
//! target/release/backup-bench [--size-mb 1024] [--samples 5] [--markdown] [--json out.json]
//! ```
//! Needs `python3` with `moto[server]` and the `zstd` CLI, else one SKIP line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use bhatti::backups::{new_id, BackupStore, Target, PARTS_IN_FLIGHT};
use bhatti::config::BackupsConfig;
use bhatti_bench::{host_description, load_average, Recorder, Stats};
use bhatti_testkit::s3::S3Server;
use clap::Parser;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

const MIB: usize = 1 << 20;
const PART_MB: u64 = 8;

#[derive(Parser, Debug)]
#[command(about = "Benchmark volume backups beside zstd -3 and a plain upload")]
struct Args {
    /// Size of the volume file in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mb: usize,
    /// Samples of each operation.
    #[arg(long, default_value_t = 5)]
    samples: usize,
    /// Directory for the volume file and the pre-compressed copy.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also print a Markdown table (for the README).
    #[arg(long)]
    markdown: bool,
    /// Write the JSON report here (default: stdout after the table).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Line {
    stats: Stats,
    /// MiB of the volume per second at p50.
    mib_per_s_p50: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    host: String,
    load_before: String,
    load_after: String,
    volume_mib: usize,
    stored_mib: f64,
    part_size_mib: u64,
    parts_in_flight: usize,
    lines: Vec<Line>,
    /// bhatti backup / (zstd + upload) at p50, p95, p99.
    ratio_to_serial_floor: [f64; 3],
    /// bhatti backup / max(zstd, upload) at p50.
    ratio_to_slower_floor_p50: f64,
    /// This process's peak resident memory (VmHWM) after backing up and
    /// restoring the volume file: bounded by the parts in flight, not by
    /// the volume's size.
    peak_rss_mib: f64,
}

/// VmHWM of this process in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// A volume-like file: per 4 MiB, 1 MiB random, 1 MiB zeros, 1 MiB of log
/// text, 1 MiB of a repeated 4 KiB block. zstd -3 makes it about 30 %.
fn make_volume(path: &Path, size_mb: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rnd = vec![0u8; MIB];
    let mut text = Vec::with_capacity(MIB);
    let mut i = 0u64;
    while text.len() < MIB {
        text.extend_from_slice(
            format!("2026-12-05T08:00:{i:02} info request {i} served in 3 ms\n").as_bytes(),
        );
        i += 1;
    }
    text.truncate(MIB);
    let mut block = vec![0u8; 4096];
    rand::fill(&mut block[..]);
    let repeated: Vec<u8> = block.iter().copied().cycle().take(MIB).collect();
    for m in 0..size_mb {
        match m % 4 {
            0 => {
                rand::fill(&mut rnd[..]);
                f.write_all(&rnd)?
            }
            1 => f.write_all(&vec![0u8; MIB])?,
            2 => f.write_all(&text)?,
            _ => f.write_all(&repeated)?,
        }
    }
    f.flush()?;
    f.get_ref().sync_all()?;
    Ok(())
}

fn zstd3(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let st = Command::new("zstd")
        .args(["-3", "-q", "-f", "-c"])
        .arg(src)
        .stdout(std::fs::File::create(dst)?)
        .stderr(Stdio::inherit())
        .status()?;
    anyhow::ensure!(st.success(), "zstd failed: {st}");
    Ok(())
}

/// The S3 client alone: a multipart upload of `path` as bhatti does it.
async fn upload(store: &dyn ObjectStore, key: &ObjPath, path: &Path) -> anyhow::Result<()> {
    let up = store.put_multipart(key).await?;
    let mut w = WriteMultipart::new_with_chunk_size(up, PART_MB as usize * MIB);
    let mut f = tokio::fs::File::open(path).await?;
    loop {
        let mut buf = vec![0u8; MIB];
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        w.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        w.put(buf.into());
    }
    w.finish().await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(why) = bhatti_testkit::s3::missing() {
        println!("SKIP backup-bench: no {why}");
        return Ok(());
    }
    if Command::new("zstd").arg("--version").output().is_err() {
        println!("SKIP backup-bench: no zstd CLI");
        return Ok(());
    }
    let load_before = load_average();
    let tmp = match &args.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir_in("/var/tmp")?,
    };
    let vol = tmp.path().join("volume.ext4");
    eprintln!("[backup-bench] writing a {} MiB volume file", args.size_mb);
    make_volume(&vol, args.size_mb)?;
    let zst = tmp.path().join("volume.ext4.zst");
    zstd3(&vol, &zst)?;
    let stored = std::fs::metadata(&zst)?.len() as f64 / MIB as f64;
    let restored = tmp.path().join("restored.ext4");

    let s3 = S3Server::start("bench");
    let cfg = BackupsConfig {
        endpoint: s3.endpoint.clone(),
        bucket: s3.bucket.clone(),
        access_key_id: s3.access_key_id.clone(),
        secret_access_key: s3.secret_access_key.clone(),
        part_size_mb: PART_MB,
        ..Default::default()
    };
    let backups = BackupStore::from_config(&cfg)?.context("backups configured")?;
    let plain = AmazonS3Builder::new()
        .with_endpoint(&s3.endpoint)
        .with_bucket_name(&s3.bucket)
        .with_region("us-east-1")
        .with_access_key_id(&s3.access_key_id)
        .with_secret_access_key(&s3.secret_access_key)
        .with_virtual_hosted_style_request(false)
        .with_allow_http(true)
        .build()?;
    let target = Target {
        owner: "bench".into(),
        volume_name: "vol".into(),
        volume_id: "vol-bench".into(),
    };
    let names = [
        "bhatti backup (sha256 + zstd -3 + upload)",
        "floor: zstd -3 of the file",
        "floor: upload of the .zst by the S3 client",
        "floor: zstd -3, then upload (sum)",
        "bhatti restore (download + unzstd + sha256)",
    ];
    let mut recs: Vec<Recorder> = names.iter().map(|n| Recorder::new(*n)).collect();
    let raw_key = ObjPath::from("plain/volume.ext4.zst");
    for i in 0..args.samples.max(1) {
        eprintln!("[backup-bench] sample {}/{}", i + 1, args.samples.max(1));
        // Alternate the order so drift touches both alike.
        for first in [i % 2 == 0, i % 2 != 0] {
            if first {
                let id = new_id();
                let t = Instant::now();
                let info = backups
                    .backup(&target, &id, &vol, &CancellationToken::new())
                    .await?;
                recs[0].record(t.elapsed());
                let t = Instant::now();
                backups.restore(&info, &restored).await?;
                recs[4].record(t.elapsed());
                backups.delete("bench", "vol", &id).await?;
            } else {
                let dst = tmp.path().join("floor.zst");
                let t = Instant::now();
                zstd3(&vol, &dst)?;
                let z = t.elapsed();
                recs[1].record(z);
                let t = Instant::now();
                upload(&plain, &raw_key, &zst).await?;
                let u = t.elapsed();
                recs[2].record(u);
                recs[3].record(z + u);
                plain.delete(&raw_key).await?;
                std::fs::remove_file(&dst)?;
            }
        }
    }
    let stats: Vec<Stats> = recs.iter().map(Recorder::stats).collect();
    let rate = |s: &Stats| args.size_mb as f64 / (s.p50_us / 1e6);
    let r = |a: f64, b: f64| a / b;
    let report = Report {
        benchmark: "bhatti backup-bench (volume backup vs zstd -3 and a plain S3 upload)",
        host: host_description(),
        load_before,
        load_after: load_average(),
        volume_mib: args.size_mb,
        stored_mib: stored,
        part_size_mib: PART_MB,
        parts_in_flight: PARTS_IN_FLIGHT,
        ratio_to_serial_floor: [
            r(stats[0].p50_us, stats[3].p50_us),
            r(stats[0].p95_us, stats[3].p95_us),
            r(stats[0].p99_us, stats[3].p99_us),
        ],
        ratio_to_slower_floor_p50: r(stats[0].p50_us, stats[1].p50_us.max(stats[2].p50_us)),
        peak_rss_mib: peak_rss_mib(),
        lines: stats
            .iter()
            .map(|s| Line {
                stats: s.clone(),
                mib_per_s_p50: rate(s),
            })
            .collect(),
    };
    print_table(&report);
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

fn s(us: f64) -> f64 {
    us / 1e6
}

fn print_table(r: &Report) {
    println!("\n{} on {}", r.benchmark, r.host);
    println!(
        "volume {} MiB, {:.0} MiB after zstd -3; parts of {} MiB, {} in flight; load before {}, after {}",
        r.volume_mib, r.stored_mib, r.part_size_mib, r.parts_in_flight, r.load_before, r.load_after
    );
    println!(
        "{:<46} {:>8} {:>8} {:>8} {:>10}",
        "operation (s)", "p50", "p95", "p99", "MiB/s p50"
    );
    for l in &r.lines {
        println!(
            "{:<46} {:>8.2} {:>8.2} {:>8.2} {:>10.0}",
            l.stats.name,
            s(l.stats.p50_us),
            s(l.stats.p95_us),
            s(l.stats.p99_us),
            l.mib_per_s_p50
        );
    }
    let [a, b, c] = r.ratio_to_serial_floor;
    println!(
        "backup / (zstd + upload): p50 {a:.2}, p95 {b:.2}, p99 {c:.2}; backup / slower floor p50 {:.2}",
        r.ratio_to_slower_floor_p50
    );
    println!(
        "peak RSS of this process: {:.0} MiB (volume {} MiB)",
        r.peak_rss_mib, r.volume_mib
    );
}

fn print_markdown(r: &Report) {
    println!(
        "\n| operation ({} MiB volume, {} samples) | p50 | p95 | p99 | MiB/s (p50) |",
        r.volume_mib,
        r.lines.first().map(|l| l.stats.samples).unwrap_or(0)
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for l in &r.lines {
        println!(
            "| {} | {:.2} s | {:.2} s | {:.2} s | {:.0} |",
            l.stats.name,
            s(l.stats.p50_us),
            s(l.stats.p95_us),
            s(l.stats.p99_us),
            l.mib_per_s_p50
        );
    }
}
