//! The in-process daemon of the benchmarks (`serve_with_backend` on this
//! process's runtime), its config, its users and sandboxes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bhatti::config::Config;
use bhatti_vmm::VmmBackend;

use crate::http::Conn;

pub struct Daemon {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), bhatti::daemon::DaemonError>>>,
}

impl Daemon {
    pub async fn start(config: Config, backend: Arc<dyn VmmBackend>) -> anyhow::Result<Daemon> {
        let sock = config.listen_unix.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(bhatti::daemon::serve_with_backend(
            config,
            backend,
            async move {
                let _ = rx.await;
            },
        ));
        let mut d = Daemon {
            stop: Some(tx),
            task: Some(task),
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let mut c = Conn::new(&sock, None);
            if let Ok(r) = c.get("/health").await {
                if r.status.is_success() {
                    return Ok(d);
                }
            }
            if d.task.as_ref().is_some_and(|t| t.is_finished()) {
                let r = d.task.take().expect("task").await;
                anyhow::bail!("the daemon ended during start: {r:?}");
            }
            anyhow::ensure!(Instant::now() < deadline, "the daemon did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .context("the daemon did not stop within 30 s")???;
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A config for a benchmark daemon on `dir`: no TCP, no rate limits,
/// thermal manager off, quiet logs.
pub fn bench_config(dir: &Path, kernel: &Path, rootfs: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.join("data"),
        listen_unix: dir.join("bhatti.sock"),
        listen_tcp: None,
        ..Config::default()
    };
    c.log.level = std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into());
    c.vm.kernel = kernel.to_owned();
    c.vm.rootfs = rootfs.to_owned();
    c.thermal.warm_after_secs = 0;
    c.thermal.cold_after_secs = 0;
    let r = &mut c.limits.rate;
    r.create_per_minute = 0;
    r.exec_per_second = 0;
    r.read_per_second = 0;
    c
}

/// Creates user `name` in the daemon's store; returns its API key.
pub fn create_user(config: &Config, name: &str) -> anyhow::Result<String> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = bhatti::store::Store::open(config.db_path())?;
    let key = store.with(|c| {
        Ok(
            bhatti::auth::create_user(c, name, bhatti::store::users::UserCaps::default())
                .map_err(|e| anyhow::anyhow!("{e}"))
                .map(|k| k.api_key),
        )
    })??;
    Ok(key)
}

/// POST /sandboxes; returns the id.
pub async fn create_sandbox(c: &mut Conn, body: serde_json::Value) -> anyhow::Result<String> {
    let r = c.post("/sandboxes", body).await?;
    anyhow::ensure!(
        r.status.is_success(),
        "create: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json()?;
    v["id"]
        .as_str()
        .map(str::to_owned)
        .context("create: no id in the response")
}
