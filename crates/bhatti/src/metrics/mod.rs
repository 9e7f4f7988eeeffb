//! The daemon's metrics (`GET /metrics`, docs/api.md § Metrics).
//!
//! One [`Metrics`] per daemon, held by its [`AppState`](crate::api::AppState):
//! a `prometheus-client` registry rather than the process-wide recorder of
//! the `metrics` facade, so daemons sharing a process (in-process tests)
//! keep their own numbers. The engine needs no metrics code: thermal
//! transitions reach us through the thermal manager's
//! [`Records`](crate::thermal::Records) sink ([`records`]).
//!
//! - Events (requests, wakes, snapshots, exec and file operations,
//!   rate-limit rejections) are counters and histograms updated as they
//!   happen.
//! - States (sandboxes by state, VMM processes, the process' RSS, fds,
//!   threads and tokio tasks) are gauges set at scrape time ([`Metrics::render`]).

pub mod process;
pub mod records;

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::auth::RequestClass;
use crate::engine::{Engine, SandboxState};
use crate::thermal::{thermal_of, ThermalState};

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Hist<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// The matched route template (`/sandboxes/{id}/exec`), never the raw
    /// path: bounded cardinality. `unmatched` for the fallback.
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FromLabel {
    from: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

fn request_buckets() -> Histogram {
    // 0.5 ms … ~33 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

fn slow_buckets() -> Histogram {
    // 5 ms … ~80 s: wakes and snapshots under TCG take seconds.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Every metric of one daemon.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Hist<RequestLabels>,
    wakes: Hist<FromLabel>,
    wakes_failed: Family<FromLabel, Counter>,
    snapshots: Hist<KindLabel>,
    snapshot_bytes: Family<KindLabel, Counter>,
    cool_failed: Counter,
    execs: Family<OpLabels, Counter>,
    files: Family<OpLabels, Counter>,
    rate_limited: Family<ClassLabel, Counter>,
    sandboxes: Family<StateLabel, Gauge>,
    thermal: Family<StateLabel, Gauge>,
    vmms: Gauge,
    rss: Gauge,
    fds: Gauge,
    threads: Gauge,
    tasks: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("bhatti");
        let m = Metrics {
            requests: Hist::new_with_constructor(request_buckets),
            wakes: Hist::new_with_constructor(slow_buckets),
            wakes_failed: Family::default(),
            snapshots: Hist::new_with_constructor(slow_buckets),
            snapshot_bytes: Family::default(),
            cool_failed: Counter::default(),
            execs: Family::default(),
            files: Family::default(),
            rate_limited: Family::default(),
            sandboxes: Family::default(),
            thermal: Family::default(),
            vmms: Gauge::default(),
            rss: Gauge::default(),
            fds: Gauge::default(),
            threads: Gauge::default(),
            tasks: Gauge::default(),
            registry: Registry::default(),
        };
        r.register_with_unit(
            "http_request_duration",
            "API requests by method, matched route and status",
            Unit::Seconds,
            m.requests.clone(),
        );
        r.register_with_unit(
            "wake_duration",
            "Wakes of warm (paused) and cold (snapshotted) sandboxes",
            Unit::Seconds,
            m.wakes.clone(),
        );
        r.register(
            "wake_failures",
            "Wakes that failed, by the state woken from",
            m.wakes_failed.clone(),
        );
        r.register_with_unit(
            "snapshot_duration",
            "Pauses (warm), cold snapshots and checkpoints",
            Unit::Seconds,
            m.snapshots.clone(),
        );
        r.register_with_unit(
            "snapshot",
            "Bytes written by cold snapshots and checkpoints",
            Unit::Bytes,
            m.snapshot_bytes.clone(),
        );
        r.register(
            "cool_failures",
            "Pauses and cold snapshots of the thermal manager that failed",
            m.cool_failed.clone(),
        );
        r.register(
            "execs",
            "Exec requests (exec, exec_ws, shell, webshell) by result",
            m.execs.clone(),
        );
        r.register(
            "file_operations",
            "File reads, writes and stats by result",
            m.files.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused by a user's rate limit, by class",
            m.rate_limited.clone(),
        );
        r.register("sandboxes", "Sandboxes by state", m.sandboxes.clone());
        r.register(
            "sandboxes_thermal",
            "Sandboxes by thermal state",
            m.thermal.clone(),
        );
        r.register("vmm_processes", "Running VMM processes", m.vmms.clone());
        r.register_with_unit(
            "process_resident_memory",
            "The daemon's resident set size",
            Unit::Bytes,
            m.rss.clone(),
        );
        r.register(
            "process_open_fds",
            "The daemon's open file descriptors",
            m.fds.clone(),
        );
        r.register("process_threads", "The daemon's threads", m.threads.clone());
        r.register(
            "tokio_alive_tasks",
            "Tasks alive on the daemon's tokio runtime",
            m.tasks.clone(),
        );
        // Every series but the requests' exists from the start, at zero:
        // families are listed, and rates work from the first scrape.
        for from in ["warm", "cold"] {
            drop(m.wakes.get_or_create(&FromLabel { from }));
            drop(m.wakes_failed.get_or_create(&FromLabel { from }));
        }
        for kind in ["warm", "cold", "checkpoint"] {
            drop(m.snapshots.get_or_create(&KindLabel { kind }));
        }
        for kind in ["cold", "checkpoint"] {
            drop(m.snapshot_bytes.get_or_create(&KindLabel { kind }));
        }
        for result in ["ok", "error"] {
            for op in ["exec", "exec_ws", "shell", "webshell"] {
                drop(m.execs.get_or_create(&OpLabels { op, result }));
            }
            for op in ["read", "write", "stat"] {
                drop(m.files.get_or_create(&OpLabels { op, result }));
            }
        }
        for class in ["create", "exec", "read"] {
            drop(m.rate_limited.get_or_create(&ClassLabel { class }));
        }
        Metrics { registry: r, ..m }
    }

    /// One API request, when its response is ready.
    pub fn request(&self, method: &str, route: Option<&str>, status: u16, took: Duration) {
        let route = route.unwrap_or("unmatched");
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .observe(took.as_secs_f64());
        let result = if status < 400 { "ok" } else { "error" };
        let count = |f: &Family<OpLabels, Counter>, op| {
            f.get_or_create(&OpLabels { op, result }).inc();
        };
        match (method, route) {
            ("POST", "/sandboxes/{id}/exec") => count(&self.execs, "exec"),
            ("GET", "/sandboxes/{id}/exec/ws") => count(&self.execs, "exec_ws"),
            ("GET", "/sandboxes/{id}/ws") => count(&self.execs, "shell"),
            ("GET", "/_shell/{id}/ws") => count(&self.execs, "webshell"),
            ("GET", "/sandboxes/{id}/files") => count(&self.files, "read"),
            ("PUT", "/sandboxes/{id}/files") => count(&self.files, "write"),
            ("HEAD", "/sandboxes/{id}/files") => count(&self.files, "stat"),
            _ => {}
        }
    }

    /// A request refused by a rate limit.
    pub fn rate_limited(&self, class: RequestClass) {
        let class = match class {
            RequestClass::Create => "create",
            RequestClass::Exec => "exec",
            RequestClass::Read => "read",
        };
        self.rate_limited.get_or_create(&ClassLabel { class }).inc();
    }

    /// A wake from `from` (warm or cold); `ok` false: it failed.
    pub fn wake(&self, from: ThermalState, took: Duration, ok: bool) {
        let from = FromLabel {
            from: thermal_name(from),
        };
        if ok {
            self.wakes.get_or_create(&from).observe(took.as_secs_f64());
        } else {
            self.wakes_failed.get_or_create(&from).inc();
        }
    }

    /// A pause (`warm`), cold snapshot (`cold`) or checkpoint
    /// (`checkpoint`) done; `bytes` written, when known.
    pub fn snapshot(&self, kind: &'static str, took: Duration, bytes: Option<u64>) {
        let kind = KindLabel { kind };
        self.snapshots
            .get_or_create(&kind)
            .observe(took.as_secs_f64());
        if let Some(b) = bytes {
            self.snapshot_bytes.get_or_create(&kind).inc_by(b);
        }
    }

    /// A pause or cold snapshot of the thermal manager failed.
    pub fn cool_failed(&self) {
        self.cool_failed.inc();
    }

    /// The text of a scrape: gauges are set from `engine` and the process
    /// first.
    pub fn render(&self, engine: &Engine) -> String {
        self.sandboxes.clear();
        self.thermal.clear();
        let mut vmms = 0;
        // Every state appears, 0 included: a dashboard sees the series.
        for s in [
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Paused,
            SandboxState::Stopped,
            SandboxState::Failed,
        ] {
            drop(self.sandboxes.get_or_create(&StateLabel {
                state: state_name(s),
            }));
        }
        for t in [ThermalState::Hot, ThermalState::Warm, ThermalState::Cold] {
            drop(self.thermal.get_or_create(&StateLabel {
                state: thermal_name(t),
            }));
        }
        for sb in engine.list() {
            self.sandboxes
                .get_or_create(&StateLabel {
                    state: state_name(sb.state),
                })
                .inc();
            self.thermal
                .get_or_create(&StateLabel {
                    state: thermal_name(thermal_of(sb.state)),
                })
                .inc();
            if sb.pid.is_some() {
                vmms += 1;
            }
        }
        self.vmms.set(vmms);
        let p = process::Stats::read();
        self.rss.set(p.rss_bytes as i64);
        self.fds.set(p.open_fds as i64);
        self.threads.set(p.threads as i64);
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            self.tasks.set(h.metrics().num_alive_tasks() as i64);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}

fn state_name(s: SandboxState) -> &'static str {
    match s {
        SandboxState::Creating => "creating",
        SandboxState::Running => "running",
        SandboxState::Paused => "paused",
        SandboxState::Stopped => "stopped",
        SandboxState::Failed => "failed",
    }
}

fn thermal_name(t: ThermalState) -> &'static str {
    match t {
        ThermalState::Hot => "hot",
        ThermalState::Warm => "warm",
        ThermalState::Cold => "cold",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_show_in_the_text() {
        let m = Metrics::new();
        m.request(
            "POST",
            Some("/sandboxes/{id}/exec"),
            200,
            Duration::from_millis(3),
        );
        m.request("GET", None, 404, Duration::from_millis(1));
        m.rate_limited(RequestClass::Exec);
        m.wake(ThermalState::Cold, Duration::from_secs(2), true);
        m.wake(ThermalState::Warm, Duration::from_secs(1), false);
        m.snapshot("checkpoint", Duration::from_secs(1), Some(4096));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).expect("encode");
        for line in [
            r#"bhatti_http_request_duration_seconds_count{method="POST",route="/sandboxes/{id}/exec",status="200"} 1"#,
            r#"bhatti_http_request_duration_seconds_count{method="GET",route="unmatched",status="404"} 1"#,
            r#"bhatti_execs_total{op="exec",result="ok"} 1"#,
            r#"bhatti_rate_limited_total{class="exec"} 1"#,
            r#"bhatti_wake_duration_seconds_count{from="cold"} 1"#,
            r#"bhatti_wake_failures_total{from="warm"} 1"#,
            r#"bhatti_snapshot_bytes_total{kind="checkpoint"} 4096"#,
        ] {
            assert!(out.lines().any(|l| l == line), "{line} not in\n{out}");
        }
        assert!(out.ends_with("# EOF\n"), "{out}");
    }

    #[test]
    fn two_instances_count_apart() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.rate_limited(RequestClass::Read);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &b.registry).expect("encode");
        assert!(
            out.contains("bhatti_rate_limited_total{class=\"read\"} 0\n"),
            "{out}"
        );
    }
}
