//! What the VM benchmarks (vmm-bench, thermal-bench) share: the guest
//! artifacts, the scratch dir + network namespace [`Guard`] that removes
//! everything on drop, the engine's network settings, and raw QEMU helpers
//! (spawn with the backend's command line, lohar over the chardev socket,
//! migrate to / from a file through an fd).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use bhatti::engine::EngineConfig;
use bhatti::net::NetSettings;
use bhatti_protocol::{AgentClient, ExecRequest};
use bhatti_testkit::{clean_data_dir, env_path, kill_vmm_of, netns_name, newest, CACHE};
use bhatti_vmm::process::VmmProcess;
use bhatti_vmm::qemu::{qemu_args, Accel, Qmp};
use bhatti_vmm::VmConfig;
use serde_json::{json, Value};

pub use bhatti_testkit::Artifacts;

/// Boot or restore budget under TCG on a loaded 2-core host.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The kernel and rootfs as the engine tests find them (`BHATTI_KERNEL`,
/// `BHATTI_ROOTFS`, else the newest in the cache), if they are files.
pub fn artifact_paths() -> (Option<PathBuf>, Option<PathBuf>) {
    let cache = Path::new(CACHE);
    let kernel = env_path("BHATTI_KERNEL").or_else(|| newest(&cache.join("kernel"), "vmlinux"));
    let rootfs =
        env_path("BHATTI_ROOTFS").or_else(|| newest(&cache.join("rootfs"), "rootfs+lohar.ext4"));
    (
        kernel.filter(|p| p.is_file()),
        rootfs.filter(|p| p.is_file()),
    )
}

/// The engine's settings both benches use: a bridge in the bench's
/// namespace, TCG-sized timeouts, a 16 GiB XFS loop.
pub fn bench_engine_config(cfg: &mut EngineConfig, subnet: &str, netns: &str) {
    cfg.net = Some(NetSettings {
        bridge: "bhatti0".into(),
        subnet: subnet.to_owned(),
        netns: Some(netns.to_owned()),
    });
    cfg.boot_timeout = BOOT_TIMEOUT;
    cfg.agent_timeout = Duration::from_secs(60);
    cfg.xfs_loop_size_mb = 16 << 10;
}

/// A bench's network namespace and scratch dir; dropping it removes every
/// VMM process started under the dir's `run_dirs`, the engine's (`engine/`)
/// XFS loop mount, the namespace (with its bridge and TAPs) and the dir.
pub struct Guard {
    pub ns: String,
    pub dir: tempfile::TempDir,
    label: &'static str,
    run_dirs: &'static [&'static str],
}

impl Guard {
    /// `label` prefixes messages; `run_dirs` (under the scratch dir) hold
    /// one run dir per VM besides the engine's.
    pub fn new(
        label: &'static str,
        ns_prefix: &str,
        run_dirs: &'static [&'static str],
    ) -> anyhow::Result<Guard> {
        Ok(Guard {
            ns: netns_name(ns_prefix),
            dir: tempfile::Builder::new()
                .prefix(&format!("bhatti-{label}."))
                .tempdir()?,
            label,
            run_dirs,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let root = self.dir.path();
        for d in self.run_dirs {
            for e in std::fs::read_dir(root.join(d))
                .into_iter()
                .flatten()
                .flatten()
            {
                kill_vmm_of(&e.path());
            }
        }
        clean_engine_dir(&root.join("engine"), Some(self.label));
        if Path::new("/run/netns").join(&self.ns).exists() {
            let ok = Command::new("ip")
                .args(["netns", "del", &self.ns])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("[{}] could not delete netns {}", self.label, self.ns);
            }
        }
        eprintln!(
            "[{}] cleaned up (VMs, mount, netns {}, scratch dir)",
            self.label, self.ns
        );
    }
}

/// Kills an engine data dir's VMMs and unmounts its XFS loop (retried: a
/// killed VMM's threads may hold its disk a moment longer), lazily if it
/// is still mounted then (saying so when `label` is given).
pub fn clean_engine_dir(dir: &Path, label: Option<&str>) {
    clean_data_dir(dir);
    let mnt = dir.join("reflink");
    if bhatti::storage::is_mountpoint(&mnt) {
        if let Some(label) = label {
            eprintln!("[{label}] {} still mounted; lazy unmount", mnt.display());
        }
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    }
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`.
pub fn drop_caches() -> anyhow::Result<()> {
    use anyhow::Context;
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

pub async fn exec_true(c: &AgentClient) -> anyhow::Result<()> {
    let out = c
        .exec(
            ExecRequest {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            },
            None,
        )
        .await?;
    ensure!(out.status.exit_code == 0, "true exited {:?}", out.status);
    Ok(())
}

// ─────────────────────────────── raw QEMU ───────────────────────────────

/// Spawns QEMU with the backend's own command line for `cfg` (stale
/// sockets removed first), `-incoming defer` if `incoming`.
pub fn spawn_qemu(
    binary: &Path,
    accel: Accel,
    cfg: &VmConfig,
    incoming: bool,
) -> anyhow::Result<VmmProcess> {
    for s in [bhatti_vmm::qemu::QMP_SOCKET, bhatti_vmm::qemu::AGENT_SOCKET] {
        let _ = std::fs::remove_file(cfg.run_dir.join(s));
    }
    let args = qemu_args(cfg, accel, &[], incoming);
    Ok(VmmProcess::spawn(
        binary,
        &args,
        &cfg.run_dir,
        &cfg.run_dir.join(bhatti_vmm::qemu::CONSOLE_LOG),
        cfg.netns.as_deref(),
    )?)
}

/// Waits for the QMP socket of `cfg`'s QEMU and connects.
pub async fn connect_qmp(cfg: &VmConfig, process: &VmmProcess) -> anyhow::Result<Qmp> {
    let sock = cfg.run_dir.join(bhatti_vmm::qemu::QMP_SOCKET);
    bhatti_vmm::process::wait_for_path(&sock, Duration::from_secs(20), process).await?;
    Ok(Qmp::connect(&sock, Duration::from_secs(20)).await?)
}

/// Lifts QEMU's default migration cap (128 MiB/s would throttle a paused
/// VM's stream).
pub async fn uncap_migration(q: &mut Qmp) -> anyhow::Result<()> {
    q.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 64u64 << 30 })),
    )
    .await?;
    Ok(())
}

/// `migrate-incoming` from `file` through an fd, then `cont` once loaded;
/// polls every 1 ms until running (or `BOOT_TIMEOUT` after `t0`).
pub async fn migrate_incoming(
    q: &mut Qmp,
    file: &std::fs::File,
    t0: Instant,
) -> anyhow::Result<()> {
    q.send_fd("snap", file.as_fd()).await?;
    q.execute("migrate-incoming", Some(json!({ "uri": "fd:snap" })))
        .await?;
    loop {
        let st = q.execute("query-status", None).await?;
        match st.get("status").and_then(Value::as_str).unwrap_or("") {
            "running" => return Ok(()),
            "paused" | "postmigrate" => {
                q.execute("cont", None).await?;
                return Ok(());
            }
            "inmigrate" | "prelaunch" | "restore-vm" => {}
            other => bail!("raw restore: QEMU is {other}"),
        }
        ensure!(t0.elapsed() < BOOT_TIMEOUT, "raw restore timed out");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// stop, migrate into `path` through an fd, wait for completion, fsync.
pub async fn migrate_to_file(q: &mut Qmp, path: &Path) -> anyhow::Result<()> {
    q.execute("stop", None).await?;
    let file = std::fs::File::create(path)?;
    q.send_fd("snap", file.as_fd()).await?;
    q.execute("migrate", Some(json!({ "uri": "fd:snap" })))
        .await?;
    loop {
        let info = q.execute("query-migrate", None).await?;
        match info.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => bail!("raw migrate failed: {info}"),
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    file.sync_all()?;
    Ok(())
}

/// Connects to lohar through QEMU's chardev socket until the handshake and
/// a ping answer (what the engine's `wait_for_agent` does), polling 1 ms;
/// one attempt waits at most 30 s.
pub async fn raw_agent(
    sock: &Path,
    token: &str,
    process: &VmmProcess,
    timeout: Duration,
) -> anyhow::Result<AgentClient> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    loop {
        ensure!(process.is_alive(), "QEMU exited ({last})");
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "no agent within {timeout:?} ({last})");
        if let Ok(stream) = tokio::net::UnixStream::connect(sock).await {
            let attempt = async {
                let c = AgentClient::connect(stream, token).await?;
                c.ping().await?;
                Ok::<_, bhatti_protocol::ClientError>(c)
            };
            tokio::select! {
                r = tokio::time::timeout(left.min(Duration::from_secs(30)), attempt) => match r {
                    Ok(Ok(c)) => return Ok(c),
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = "handshake timed out".into(),
                },
                _ = dead(process) => bail!("QEMU exited during the handshake"),
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn dead(p: &VmmProcess) {
    while p.is_alive() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
