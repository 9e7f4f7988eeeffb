//! The soak, short form: `bhatti serve` as a child process, 5 sandboxes
//! cycling hot → warm → cold → woken on short thermal timers (each rests
//! in turn), 20 concurrent clients doing exec, file write + read-back and
//! WebSocket exec for 3 minutes (`BHATTI_SOAK_SECS` to change it). Every
//! request must succeed, every operation must have run, the thermal cycle
//! must have happened, and the daemon's RSS, fds, threads and tokio tasks
//! must not grow (generous bounds: this is not a benchmark; the long form
//! is `soak-bench`). The driver is `bhatti_testkit::soak`.

mod api_support;

use std::time::Duration;

use api_support::*;
use bhatti::store::users::UserCaps;
use bhatti_testkit::soak;

const TOKEN: &str = "soak-metrics-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_20_clients_through_thermal_cycles() {
    let Some(art) = artifacts("soak_20_clients_through_thermal_cycles") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let secs: u64 = std::env::var("BHATTI_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(180);
    let env = Env::new(art);
    let mut cfg = env.config();
    cfg.network.enabled = false;
    cfg.metrics.token = TOKEN.into();
    // The clients are the load; rate limits would only refuse them.
    cfg.limits.rate.exec_per_second = 0;
    cfg.limits.rate.read_per_second = 0;
    cfg.limits.rate.create_per_minute = 0;
    cfg.thermal.warm_after_secs = 2;
    cfg.thermal.cold_after_secs = 5;
    cfg.thermal.sweep_interval_ms = 500;
    env.write_config(&cfg);
    let key = env.user("soak", UserCaps::default());
    let warmup = Duration::from_secs((secs / 6).clamp(10, 60));
    let spec = soak::Spec {
        bin: env!("CARGO_BIN_EXE_bhatti").into(),
        config: env.dir.path().join("bhatti.toml"),
        sock: env.sock(),
        log: env.dir.path().join("daemon-soak.log"),
        key,
        metrics_token: TOKEN.into(),
        sandboxes: 5,
        clients: 20,
        duration: Duration::from_secs(secs),
        sample_every: Duration::from_secs(10),
        warmup,
        rest: Duration::from_secs(15),
    };
    let report = match soak::run(&spec).await {
        Ok(r) => r,
        Err(e) => {
            let log = std::fs::read_to_string(&spec.log).unwrap_or_default();
            panic!("the soak could not run: {e}\n{log}");
        }
    };
    report.print();

    assert_eq!(
        report.requests_failed, 0,
        "failed requests: {:#?}",
        report.failures
    );
    for op in ["exec", "file_put", "file_get", "ws_exec"] {
        assert!(
            report.ops.get(op).is_some_and(|o| o.ok > 0),
            "{op} never ran: {:?}",
            report.ops
        );
    }
    // The sandboxes went through the thermal cycle (when the run is long
    // enough for one sandbox to rest).
    if secs >= 30 {
        let t = &report.thermal;
        assert!(t["cold_snapshots"] >= 1.0, "no cold snapshot: {t:?}");
        assert!(
            t["wakes_from_cold"] + t["wakes_from_warm"] >= 1.0,
            "no wake: {t:?}"
        );
        assert_eq!(
            t["wake_failures_warm"] + t["wake_failures_cold"],
            0.0,
            "{t:?}"
        );
    }
    // Flat resources: RSS from the first sample after the warm-up to the
    // last under load; fds, threads and tasks once the clients stopped
    // against that first sample (connections of the load are gone).
    let steady = report.steady(warmup);
    let (first, last, after) = (steady[0], steady[steady.len() - 1], report.after);
    assert!(
        (last.rss_bytes as i64) - (first.rss_bytes as i64) < 20 << 20,
        "RSS grew from {} to {} bytes: {:#?}",
        first.rss_bytes,
        last.rss_bytes,
        report.samples
    );
    assert!(
        after.open_fds <= first.open_fds + 10,
        "open fds {} → {}: {:#?}",
        first.open_fds,
        after.open_fds,
        report.samples
    );
    assert!(
        after.threads <= first.threads + 16,
        "threads {} → {}: {:#?}",
        first.threads,
        after.threads,
        report.samples
    );
    assert!(
        after.tokio_tasks <= first.tokio_tasks + 20,
        "tokio tasks {} → {}: {:#?}",
        first.tokio_tasks,
        after.tokio_tasks,
        report.samples
    );
}
