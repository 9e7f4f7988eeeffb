//! Issue-14 benchmark: the event log's cost on a real SQLite store holding
//! a full log (`[events] max_count`, 100 000 events by default), each
//! beside a floor measured in the same run on the same database.
//!
//! ```text
//! cargo build --release -p bhatti-bench --bin events-bench
//! target/release/events-bench [--events 100000] [--samples 2000] [--json out.json]
//! ```
//!
//! | ours | floor (same run) |
//! |---|---|
//! | `EventLog::record`: one event through the blocking pool (4 indexes) | `Store::run` of nothing (the blocking-pool hop) |
//! | `GET /events`' query: a user's next 100 after a random cursor | the same page by primary key alone (no owner filter) |
//! | the same with `type=wake` | the same page by primary key alone |
//! | prune of 1000 events over `max_count` | deleting 1000 events by id range |
//!
//! No VM, no root: only a temp dir.

use std::sync::Arc;
use std::time::Instant;

use bhatti::config::EventsConfig;
use bhatti::events::EventLog;
use bhatti::store::events::{self, EventFilter, NewEvent};
use bhatti::store::Store;
use bhatti_bench::{host_description, Recorder, Report, Row, Stats};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Benchmark the event log's record, query and prune on a full log")]
struct Args {
    /// Events in the log while measuring.
    #[arg(long, default_value_t = 100_000)]
    events: u32,
    /// Samples per operation.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Prune rounds (each deletes 1000 events).
    #[arg(long, default_value_t = 20)]
    prunes: usize,
    /// Write the JSON report here (else stdout after the table).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const KINDS: [&str; 6] = ["create", "warm", "cold", "wake", "stop", "start"];
const USERS: u32 = 20;

fn fill(store: &Store, n: u32) -> anyhow::Result<()> {
    store.with(|c| {
        let tx = c.transaction()?;
        for i in 0..n {
            let e = NewEvent::new(&format!("sb{}", i % 200), KINDS[(i % 6) as usize])
                .owner(&format!("u{}", i % USERS))
                .latency_ms(f64::from(i % 97));
            events::record(&tx, &e)?;
        }
        tx.commit()?;
        Ok(())
    })?;
    Ok(())
}

fn max_id(store: &Store) -> anyhow::Result<i64> {
    Ok(store.with(|c| Ok(c.query_row("SELECT MAX(id) FROM events", [], |r| r.get(0))?))?)
}

fn row(op: Stats, floor: Stats) -> Row {
    Row {
        op,
        floor: Some(floor),
        target: "-".into(),
        met: None,
    }
}

/// A cheap deterministic sequence of cursors over the table.
fn cursors(max: i64, n: usize) -> Vec<i64> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (max.max(1) as u64)) as i64
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("bhatti.db"))?;
    let t = Instant::now();
    fill(&store, args.events)?;
    eprintln!("filled {} events in {:.1?}", args.events, t.elapsed());
    let cfg = EventsConfig {
        max_count: args.events,
        ..EventsConfig::default()
    };
    let log: Arc<EventLog> = EventLog::new(store.clone(), cfg);
    let mut rows = Vec::new();

    // record vs the blocking-pool hop, interleaved.
    let (mut rec, mut hop) = (
        Recorder::new("record (store.run + insert)"),
        Recorder::new("store.run of nothing"),
    );
    rt.block_on(async {
        for i in 0..args.samples {
            let t = Instant::now();
            log.record(
                NewEvent::new("sb-bench", "wake")
                    .owner("u0")
                    .latency_ms(1.0),
            )
            .await;
            if i >= 10 {
                rec.record(t.elapsed());
            }
            let t = Instant::now();
            store.run(|_| Ok(())).await?;
            if i >= 10 {
                hop.record(t.elapsed());
            }
        }
        anyhow::Ok(())
    })?;
    rows.push(row(rec.stats(), hop.stats()));

    // A user's page after a cursor vs the same page by primary key alone.
    let max = max_id(&store)?;
    for kinds in [vec![], vec!["wake".to_string()]] {
        let name = if kinds.is_empty() {
            "query: owner, 100 after cursor".to_string()
        } else {
            "query: owner+type, 100 after cursor".to_string()
        };
        let (mut ours, mut floor) = (Recorder::new(name), Recorder::new("page by id only"));
        for since in cursors(max, args.samples) {
            let f = EventFilter {
                since: Some(since),
                kinds: kinds.clone(),
                sandbox_id: None,
                owner: Some(format!("u{}", since % i64::from(USERS))),
                limit: 100,
            };
            let t = Instant::now();
            let got = store.with(|c| events::query(c, &f))?;
            ours.record(t.elapsed());
            anyhow::ensure!(got.iter().all(|e| e.id > since));
            let f = EventFilter {
                since: Some(since),
                limit: 100,
                ..Default::default()
            };
            let t = Instant::now();
            store.with(|c| events::query(c, &f))?;
            floor.record(t.elapsed());
        }
        rows.push(row(ours.stats(), floor.stats()));
    }

    // Pruning 1000 over max_count vs deleting 1000 by id range.
    let (mut prune, mut range) = (
        Recorder::new("prune 1000 over max_count"),
        Recorder::new("DELETE 1000 by id range"),
    );
    for _ in 0..args.prunes {
        fill(&store, 1000)?;
        let t = Instant::now();
        let n = rt.block_on(log.prune());
        prune.record(t.elapsed());
        anyhow::ensure!(n >= 1000, "pruned {n}");
        fill(&store, 1000)?;
        let lo: i64 =
            store.with(|c| Ok(c.query_row("SELECT MIN(id) FROM events", [], |r| r.get(0))?))?;
        let t = Instant::now();
        store.with(|c| Ok(c.execute("DELETE FROM events WHERE id < ?1", [lo + 1000])?))?;
        range.record(t.elapsed());
    }
    rows.push(row(prune.stats(), range.stats()));

    let report = Report {
        benchmark: format!("events-bench ({} events in the log)", args.events),
        host: host_description(),
        rows,
    };
    report.print_table();
    report.write_json(args.json.as_deref())?;
    Ok(())
}
