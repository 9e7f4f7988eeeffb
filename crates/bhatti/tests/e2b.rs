//! The official E2B Python SDK (`e2b` from PyPI, 2.x) against a real daemon
//! with real VMs: the pytest suite in `tests/e2b/` (`test_sdk.py`, the sync
//! client; `test_async.py`, the async client for a subset) runs with
//! nothing but the SDK's own environment variables pointing at the daemon's
//! `/e2b` routes over loopback TCP (plain HTTP/1.1), as a user would:
//! `E2B_API_KEY` (a bhatti key), `E2B_API_URL`, `E2B_SANDBOX_URL`, plus
//! `BHATTI_E2B_OTHER_KEY`, a second user's key (who must not reach the first
//! user's sandboxes).
//!
//! Needs `python3` with `e2b`, `pytest` and `pytest-asyncio`
//! (scripts/install-deps.sh installs them), else one SKIP line; with
//! `BHATTI_REQUIRE_VMS=1` (CI) their absence fails instead.
//! `BHATTI_E2B_PYTEST_ARGS` adds pytest arguments (e.g. `-k pty -x`).

mod api_support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use api_support::*;
use bhatti::store::users::UserCaps;

/// The whole suite boots about six VMs and runs ~100 requests; far more
/// than that means something hangs.
const SUITE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_python_sdk_suite_passes() {
    let test = "e2b_python_sdk_suite_passes";
    let Some(art) = artifacts(test) else {
        return;
    };
    let Some(python) = e2b_python(test, "e2b, pytest, pytest_asyncio") else {
        return;
    };
    init_tracing();
    let _serial = SERIAL.lock().await;
    let env = Env::new(art);
    let port = free_port();
    let mut config = env.config();
    config.listen_tcp = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    // The SDK polls and the suite is quick in bursts: rate limits are
    // another test's.
    config.limits.rate.read_per_second = 100_000;
    config.limits.rate.read_burst = 100_000;
    // At most three sandboxes at a time (the shared one, a test's own, and
    // one being killed).
    let caps = UserCaps {
        max_sandboxes: Some(4),
        max_cpus: Some(8),
        max_memory_mb: Some(4096),
        max_snapshots: Some(4),
    };
    let alice = env.user("alice", caps);
    let bob = env.user("bob", caps);
    let daemon = Daemon::start(&env, config).await;

    let url = format!("http://127.0.0.1:{port}/e2b");
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b");
    let extra: Vec<String> = std::env::var("BHATTI_E2B_PYTEST_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(&python);
    cmd.args(["-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"])
        .args(&extra)
        .arg(&suite)
        .env("E2B_API_KEY", &alice)
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("BHATTI_E2B_OTHER_KEY", &bob)
        // Nothing of the SDK's own configuration leaks in from the caller.
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_ACCESS_TOKEN")
        .env_remove("E2B_DEBUG")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_COLOR", "1")
        .current_dir(env.dir.path())
        .kill_on_drop(true);
    let out = tokio::time::timeout(SUITE_TIMEOUT, cmd.output())
        .await
        .expect("the pytest suite finishes within 30 min")
        .expect("run python3 -m pytest");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "---- pytest {} ({:.0} s) ----\n{text}",
        suite.display(),
        started.elapsed().as_secs_f64()
    );
    daemon.stop().await;
    assert!(
        out.status.success(),
        "the E2B SDK suite failed ({}; output above)",
        out.status
    );
}
