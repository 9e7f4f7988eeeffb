//! Shared pieces of the benchmark programs: sampling, percentiles, and the
//! JSON + table report. Every figure is printed beside a floor measured in
//! the same run on the same machine.

pub mod fc_tiny;
pub mod vm;

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of one measured operation, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub name: String,
    pub samples: u64,
    pub p50_us: f64,
    pub p95_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
}

/// Collects durations into a histogram (1 ns … 1000 s, 3 significant digits).
#[derive(Debug)]
pub struct Recorder {
    name: String,
    hist: Histogram<u64>,
}

impl Recorder {
    pub fn new(name: impl Into<String>) -> Self {
        Recorder {
            name: name.into(),
            hist: Histogram::new_with_bounds(1, 1_000_000_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }

    pub fn record(&mut self, d: Duration) {
        let _ = self.hist.record((d.as_nanos() as u64).max(1));
    }

    pub fn stats(&self) -> Stats {
        let us = |ns: u64| ns as f64 / 1000.0;
        Stats {
            name: self.name.clone(),
            samples: self.hist.len(),
            p50_us: us(self.hist.value_at_quantile(0.50)),
            p95_us: us(self.hist.value_at_quantile(0.95)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            mean_us: self.hist.mean() / 1000.0,
            max_us: us(self.hist.max()),
        }
    }
}

/// Runs `f` `warmup` times unrecorded, then `n` times recorded.
pub async fn sample<F, Fut>(name: &str, warmup: usize, n: usize, mut f: F) -> anyhow::Result<Stats>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..warmup {
        f().await?;
    }
    let mut rec = Recorder::new(name);
    for _ in 0..n {
        let t = Instant::now();
        f().await?;
        rec.record(t.elapsed());
    }
    Ok(rec.stats())
}

/// Like [`sample`] for an operation and its floor together: every
/// iteration runs one of each, in alternating order, so drift in the
/// machine's state (load, caches, clock) touches both alike.
pub async fn sample_pair<A, FA, B, FB>(
    (name_a, mut a): (&str, A),
    (name_b, mut b): (&str, B),
    warmup: usize,
    n: usize,
) -> anyhow::Result<(Stats, Stats)>
where
    A: FnMut() -> FA,
    FA: std::future::Future<Output = anyhow::Result<()>>,
    B: FnMut() -> FB,
    FB: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..warmup {
        a().await?;
        b().await?;
    }
    let (mut ra, mut rb) = (Recorder::new(name_a), Recorder::new(name_b));
    for i in 0..n {
        for first in [i % 2 == 0, i % 2 != 0] {
            let t = Instant::now();
            if first {
                a().await?;
                ra.record(t.elapsed());
            } else {
                b().await?;
                rb.record(t.elapsed());
            }
        }
    }
    Ok((ra.stats(), rb.stats()))
}

/// One row of a report: an operation, its floor, and a target.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub op: Stats,
    pub floor: Option<Stats>,
    /// Human statement of the target, e.g. "≤ floor + 100 µs".
    pub target: String,
    /// Whether the p50 meets the target (None when there is no target).
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub benchmark: String,
    pub host: String,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn print_table(&self) {
        println!("\n{} on {}", self.benchmark, self.host);
        println!(
            "{:<34} {:>10} {:>10} {:>10} | {:<28} {:>10} {:>10} | {:<24} met",
            "operation", "p50 µs", "p95 µs", "p99 µs", "floor", "p50 µs", "p99 µs", "target"
        );
        for r in &self.rows {
            let (fname, f50, f99) = match &r.floor {
                Some(f) => (
                    f.name.as_str(),
                    format!("{:.1}", f.p50_us),
                    format!("{:.1}", f.p99_us),
                ),
                None => ("-", "-".into(), "-".into()),
            };
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            };
            println!(
                "{:<34} {:>10.1} {:>10.1} {:>10.1} | {:<28} {:>10} {:>10} | {:<24} {}",
                r.op.name, r.op.p50_us, r.op.p95_us, r.op.p99_us, fname, f50, f99, r.target, met
            );
        }
    }

    pub fn write_json(&self, path: Option<&std::path::Path>) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        match path {
            Some(p) => std::fs::write(p, json)?,
            None => println!("{json}"),
        }
        Ok(())
    }
}

impl Row {
    /// ours / floor at p50, p95 and p99 (None without a floor).
    pub fn ratios(&self) -> Option<[f64; 3]> {
        let f = self.floor.as_ref()?;
        let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        Some([
            r(self.op.p50_us, f.p50_us),
            r(self.op.p95_us, f.p95_us),
            r(self.op.p99_us, f.p99_us),
        ])
    }
}

impl Report {
    /// The table in milliseconds with an ours/floor column (p50 and p99),
    /// for operations that take from microseconds to seconds (VMs).
    pub fn print_table_ms(&self) {
        println!("\n{} on {}", self.benchmark, self.host);
        println!(
            "{:<36} {:>9} {:>9} {:>9} | {:<44} {:>9} {:>9} {:>9} | {:>11} | {:<16} met",
            "operation (ms)",
            "p50",
            "p95",
            "p99",
            "floor (raw, same run)",
            "p50",
            "p95",
            "p99",
            "ratio50/99",
            "target"
        );
        for r in &self.rows {
            let (fname, f50, f95, f99) = match &r.floor {
                Some(f) => (
                    f.name.as_str(),
                    format!("{:.3}", f.p50_us / 1000.0),
                    format!("{:.3}", f.p95_us / 1000.0),
                    format!("{:.3}", f.p99_us / 1000.0),
                ),
                None => ("-", "-".into(), "-".into(), "-".into()),
            };
            let ratio = match r.ratios() {
                Some([a, _, c]) => format!("{a:.2}/{c:.2}"),
                None => "-".into(),
            };
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            };
            println!(
                "{:<36} {:>9.3} {:>9.3} {:>9.3} | {:<44} {:>9} {:>9} {:>9} | {:>11} | {:<16} {}",
                r.op.name,
                r.op.p50_us / 1000.0,
                r.op.p95_us / 1000.0,
                r.op.p99_us / 1000.0,
                fname,
                f50,
                f95,
                f99,
                ratio,
                r.target,
                met
            );
        }
    }
}

/// µs as a short human figure: "412 µs", "1.22 ms", "1.44 s".
pub fn human(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

/// `/proc/loadavg`'s first three fields ("1.02 0.87 0.55"), or "unknown".
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// A one-line description of the machine for reports.
pub fn host_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

/// ours / floor of one row, at p50, p95 and p99.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub op: String,
    pub floor: String,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// The ratios of the rows that have a floor.
pub fn ratios(rows: &[Row]) -> Vec<Ratio> {
    rows.iter()
        .filter_map(|r| {
            let [p50, p95, p99] = r.ratios()?;
            Some(Ratio {
                op: r.op.name.clone(),
                floor: r.floor.as_ref()?.name.clone(),
                p50,
                p95,
                p99,
            })
        })
        .collect()
}

/// One backend's part of a VM benchmark's output.
#[derive(Debug, Serialize)]
pub struct Section {
    pub backend: String,
    pub report: Report,
    /// ours / floor at p50, p95, p99, per row with a floor.
    pub ratios: Vec<Ratio>,
    pub not_applicable: Vec<(String, String)>,
    pub notes: Vec<String>,
}

impl Section {
    /// `rows` as the report `"<benchmark> <label>"` on this host (with the
    /// load average now), and their ratios.
    pub fn new(
        benchmark: &str,
        label: String,
        rows: Vec<Row>,
        not_applicable: Vec<(String, String)>,
        notes: Vec<String>,
    ) -> Section {
        Section {
            ratios: ratios(&rows),
            report: Report {
                benchmark: format!("{benchmark} {label}"),
                host: format!(
                    "{}; load average now {}",
                    host_description(),
                    load_average()
                ),
                rows,
            },
            backend: label,
            not_applicable,
            notes,
        }
    }

    /// The ms table, then the n/a rows and the notes.
    pub fn print(&self) {
        self.report.print_table_ms();
        for (what, why) in &self.not_applicable {
            println!("{what:<36} {why}");
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}
