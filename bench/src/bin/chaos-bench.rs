//! Chaos benchmark: a daemon (this program re-executed as `--serve`, the
//! daemon's own library in a child process, as `bhatti serve` runs it)
//! with N busy sandboxes, SIGKILLed K times at random (seeded) moments and
//! restarted. Each sandbox writes files in an exec loop; every write the
//! daemon acknowledged is checked after each restart (sha256 in the guest).
//! Reports the recovery time — from the restart to every sandbox answering
//! an exec — p50/p95/max, plus the acknowledged writes checked and lost.
//!
//! ```text
//! eval "$(scripts/artifacts.sh)"          # BHATTI_KERNEL, BHATTI_ROOTFS (cached)
//! cargo build --release -p bhatti-bench --bin chaos-bench
//! sudo -E target/release/chaos-bench [--sandboxes 10] [--kills 5] [--seed N] [--json out.json]
//! ```
//!
//! The correctness checks of the same scenario (streams, shells, thermal
//! cycles, orphans) are `crates/bhatti/tests/chaos.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bhatti::config::{Backend, Config};
use bhatti_bench::vm::{artifact_paths, Guard, BOOT_TIMEOUT};
use bhatti_bench::{host_description, load_average, Recorder};
use clap::Parser;
use serde::Serialize;
use serde_json::json;

#[path = "api_bench/http.rs"]
#[allow(dead_code)]
mod http;
use http::Conn;

#[derive(Parser, Debug, Clone, Serialize)]
#[command(about = "SIGKILL the daemon under load; measure recovery")]
struct Args {
    /// Busy sandboxes.
    #[arg(long, default_value_t = 10)]
    sandboxes: usize,
    /// Daemon SIGKILLs.
    #[arg(long, default_value_t = 5)]
    kills: u32,
    /// Seed of the kill moments (random when absent; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Write the JSON report here (else stdout).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run the daemon with this config file.
    #[arg(long, hide = true)]
    serve: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    host: String,
    load: String,
    args: Args,
    seed: u64,
    recovery: bhatti_bench::Stats,
    recoveries_ms: Vec<u128>,
    acked_writes_checked: usize,
    acked_writes_lost: usize,
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn sha_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// The daemon as a child process: this program with `--serve`.
struct DaemonProc {
    child: Child,
}

impl DaemonProc {
    fn spawn(cfg: &Path, log: &Path) -> anyhow::Result<DaemonProc> {
        let log = std::fs::File::create(log)?;
        let child = Command::new(std::env::current_exe()?)
            .arg("--serve")
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning the daemon")?;
        Ok(DaemonProc { child })
    }

    fn sigkill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn ready(sock: &Path, d: &mut DaemonProc) -> anyhow::Result<()> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if let Ok(r) = Conn::new(sock, None).get("/health").await {
            if r.status.is_success() {
                return Ok(());
            }
        }
        if let Some(s) = d.child.try_wait()? {
            bail!("the daemon exited ({s}) during start");
        }
        ensure!(Instant::now() < deadline, "the daemon did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Acked = Arc<Mutex<BTreeMap<(String, String), String>>>;

/// Writes checksummed files by exec until aborted; records acknowledged ones.
async fn write_loop(sock: PathBuf, key: String, sb: String, round: u32, acked: Acked) {
    let mut c = Conn::new(&sock, Some(&key));
    for k in 1u32.. {
        let path = format!("/home/lohar/chaos/r{round}-{k}");
        let content = format!("{sb} {round} {k}\n");
        let script = format!("mkdir -p /home/lohar/chaos && printf '%s' '{content}' > {path}");
        let ok = match c
            .post(
                &format!("/sandboxes/{sb}/exec"),
                json!({"cmd": ["sh", "-c", script]}),
            )
            .await
        {
            Ok(r) => r.status == 200 && r.json().is_ok_and(|v| v["exit_code"].as_i64() == Some(0)),
            Err(_) => false,
        };
        if ok {
            acked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert((sb.clone(), path), sha_hex(content.as_bytes()));
        } else {
            c = Conn::new(&sock, Some(&key));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// From `since` until every sandbox answered an exec (asked in turn: the
/// last answer is when all are back).
async fn all_answer(
    sock: &Path,
    key: &str,
    sbs: &[String],
    since: Instant,
) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    for sb in sbs {
        let mut c = Conn::new(sock, Some(key));
        while let Err(e) = c.exec_true(sb).await {
            c = Conn::new(sock, Some(key));
            ensure!(
                Instant::now() < deadline,
                "{sb} did not answer after a restart: {e:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(since.elapsed())
}

/// (checked, lost) acknowledged writes.
async fn check_writes(
    c: &mut Conn,
    sbs: &[String],
    acked: &Acked,
) -> anyhow::Result<(usize, usize)> {
    let want = acked
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut lost = 0;
    for sb in sbs {
        let r = c
            .post(
                &format!("/sandboxes/{sb}/exec"),
                json!({"cmd": ["sh", "-c", "cd /home/lohar/chaos 2>/dev/null && sha256sum * || true"]}),
            )
            .await?
            .ok("sha256sum", 200)?;
        let v = r.json()?;
        let out = v["stdout"].as_str().unwrap_or_default();
        let have: BTreeMap<String, String> = out
            .lines()
            .filter_map(|l| l.split_once("  "))
            .map(|(h, f)| (format!("/home/lohar/chaos/{f}"), h.to_owned()))
            .collect();
        for ((s, p), sum) in want.iter().filter(|((s, _), _)| s == sb) {
            if have.get(p) != Some(sum) {
                eprintln!("[chaos-bench] {s}: acknowledged write {p} lost or corrupt");
                lost += 1;
            }
        }
    }
    Ok((want.len(), lost))
}

fn serve(cfg: &Path) -> anyhow::Result<()> {
    let config = Config::load(Some(cfg)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bhatti::daemon::serve(config, std::future::pending()))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(cfg) = &args.serve {
        return serve(cfg);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "chaos-bench needs root");
    let (Some(kernel), Some(rootfs)) = artifact_paths() else {
        bail!("no kernel/rootfs: run scripts/artifacts.sh first");
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut rng = seed;
    eprintln!(
        "[chaos-bench] seed {seed}: {} sandboxes, {} kills",
        args.sandboxes, args.kills
    );
    let guard = Guard::new("chaos-bench", "bhatti-cb", &[])?;
    let dir = guard.dir.path();
    let mut config = Config {
        data_dir: dir.join("engine"),
        listen_unix: dir.join("bhatti.sock"),
        listen_tcp: None,
        ..Config::default()
    };
    config.log.level = "warn".into();
    config.vm.backend = Backend::Qemu;
    config.vm.kernel = kernel;
    config.vm.rootfs = rootfs;
    config.vm.boot_timeout_secs = BOOT_TIMEOUT.as_secs();
    config.vm.agent_timeout_secs = 60;
    config.vm.xfs_loop_size_mb = 16 << 10;
    config.network.netns = Some(guard.ns.clone());
    config.network.dns_upstreams = vec![];
    config.thermal.warm_after_secs = 0;
    config.thermal.cold_after_secs = 0;
    let r = &mut config.limits.rate;
    r.create_per_minute = 0;
    r.exec_per_second = 0;
    r.read_per_second = 0;
    let cfg_path = dir.join("bhatti.toml");
    std::fs::write(&cfg_path, toml::to_string(&config)?)?;
    std::fs::create_dir_all(&config.data_dir)?;
    let store = bhatti::store::Store::open(config.db_path())?;
    let key = store.with(|c| {
        Ok(
            bhatti::auth::create_user(c, "bench", bhatti::store::users::UserCaps::default())
                .map_err(|e| anyhow::anyhow!("{e}"))
                .map(|k| k.api_key),
        )
    })??;
    drop(store);
    let sock = config.listen_unix.clone();

    let mut n = 0;
    let log = |n: u32| dir.join(format!("daemon-{n}.log"));
    let mut daemon = DaemonProc::spawn(&cfg_path, &log(n))?;
    ready(&sock, &mut daemon).await?;
    let mut c = Conn::new(&sock, Some(&key));
    let sbs: Vec<String> = (0..args.sandboxes).map(|i| format!("c{i}")).collect();
    for sb in &sbs {
        c.post("/sandboxes", json!({"name": sb, "memory_mb": 256}))
            .await?
            .ok("create", 201)?;
    }
    eprintln!("[chaos-bench] {} sandboxes running", sbs.len());

    let acked: Acked = Arc::default();
    let mut rec = Recorder::new("recovery: restart → every sandbox answers an exec");
    let mut recoveries = Vec::new();
    let (mut checked, mut lost) = (0, 0);
    for round in 1..=args.kills {
        let writers: Vec<_> = sbs
            .iter()
            .map(|sb| {
                tokio::spawn(write_loop(
                    sock.clone(),
                    key.clone(),
                    sb.clone(),
                    round,
                    acked.clone(),
                ))
            })
            .collect();
        let wait = Duration::from_millis(2_000 + splitmix(&mut rng) % 8_000);
        tokio::time::sleep(wait).await;
        daemon.sigkill()?;
        for w in writers {
            w.abort();
        }
        n += 1;
        let t0 = Instant::now();
        daemon = DaemonProc::spawn(&cfg_path, &log(n))?;
        ready(&sock, &mut daemon).await?;
        let took = match all_answer(&sock, &key, &sbs, t0).await {
            Ok(t) => t,
            Err(e) => {
                // The scratch dir goes with the cleanup: say what the
                // daemon logged first.
                let text = std::fs::read_to_string(log(n)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                for l in tail.into_iter().rev() {
                    eprintln!("[daemon] {l}");
                }
                return Err(e);
            }
        };
        rec.record(took);
        recoveries.push(took.as_millis());
        let mut c = Conn::new(&sock, Some(&key));
        let (ch, l) = check_writes(&mut c, &sbs, &acked).await?;
        (checked, lost) = (ch, lost + l);
        eprintln!(
            "[chaos-bench] kill {round} after {wait:?}: all {} answered in {took:?}; {ch} acknowledged writes, {l} lost",
            sbs.len()
        );
    }
    let mut c = Conn::new(&sock, Some(&key));
    for sb in &sbs {
        let _ = c.delete(&format!("/sandboxes/{sb}")).await;
    }
    drop(daemon);

    let report = Report {
        benchmark: "chaos-bench",
        host: host_description(),
        load: load_average(),
        args: args.clone(),
        seed,
        recovery: rec.stats(),
        recoveries_ms: recoveries,
        acked_writes_checked: checked,
        acked_writes_lost: lost,
    };
    let s = &report.recovery;
    println!(
        "\nchaos-bench on {} (load {})\n{:<52} {:>9} {:>9} {:>9} {:>8}",
        report.host, report.load, "operation (ms)", "p50", "p95", "max", "samples"
    );
    println!(
        "{:<52} {:>9.0} {:>9.0} {:>9.0} {:>8}",
        s.name,
        s.p50_us / 1000.0,
        s.p95_us / 1000.0,
        s.max_us / 1000.0,
        s.samples
    );
    println!("acknowledged writes checked: {checked}, lost: {lost} (seed {seed})");
    let json = serde_json::to_string_pretty(&report)?;
    match &args.json {
        Some(p) => std::fs::write(p, json)?,
        None => println!("{json}"),
    }
    drop(guard);
    ensure!(lost == 0, "{lost} acknowledged writes were lost");
    Ok(())
}
