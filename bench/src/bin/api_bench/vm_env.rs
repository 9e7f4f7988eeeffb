//! The real-VM environment the benchmarks share: the artifacts, a daemon
//! config over the backend `[vm]` picks, and the cleanup of what VMs leave
//! on the host (VMMs by their pid files, the XFS loop mount, the netns).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bhatti::config::{Backend, Config, DiskStrategy};
use bhatti_vmm::{BackendKind, VmmBackend};

use crate::daemon::bench_config;
use crate::http::Conn;

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

pub struct Artifacts {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

/// BHATTI_KERNEL / BHATTI_ROOTFS, root and a VMM, or why not.
pub fn artifacts() -> Result<Artifacts, String> {
    let var = |v: &str| {
        std::env::var_os(v)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_owned());
    }
    let host = bhatti_vmm::probe::probe();
    if host.qemu.is_none() && host.choose(bhatti_vmm::probe::BackendPref::Auto).is_err() {
        missing.push("a VMM (qemu or firecracker)".to_owned());
    }
    let kernel = var("BHATTI_KERNEL").filter(|p| p.is_file());
    let rootfs = var("BHATTI_ROOTFS").filter(|p| p.is_file());
    if kernel.is_none() || rootfs.is_none() {
        missing.push("BHATTI_KERNEL/BHATTI_ROOTFS (eval \"$(scripts/artifacts.sh)\")".to_owned());
    }
    if !missing.is_empty() {
        return Err(format!("missing {}", missing.join(", ")));
    }
    Ok(Artifacts {
        kernel: kernel.expect("kernel"),
        rootfs: rootfs.expect("rootfs"),
    })
}

/// A VM part's temp dir, netns name and daemon config ([`vm_config`]);
/// dropping it removes what the part left on the host ([`Cleanup`]) before
/// the temp dir goes.
pub struct VmEnv {
    pub config: Config,
    pub ns: String,
    /// Raw VMs' run dirs (created).
    pub raw: PathBuf,
    // Field order is drop order: the cleanup runs first.
    _cleanup: Cleanup,
    _dir: tempfile::TempDir,
}

impl VmEnv {
    pub fn new(prefix: &str, art: &Artifacts) -> anyhow::Result<VmEnv> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let ns = format!("bhatti-b-{}", bhatti::engine::random_hex(4));
        let config = vm_config(dir.path(), art, &ns);
        let raw = dir.path().join("raw");
        std::fs::create_dir_all(&raw)?;
        Ok(VmEnv {
            _cleanup: Cleanup {
                data: config.data_dir.clone(),
                raw: raw.clone(),
                ns: ns.clone(),
            },
            config,
            ns,
            raw,
            _dir: dir,
        })
    }
}

/// Removes what a VM part leaves on the host, whatever happened.
pub struct Cleanup {
    pub data: PathBuf,
    pub raw: PathBuf,
    pub ns: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for root in [self.data.join("run"), self.raw.clone()] {
            for run in std::fs::read_dir(root).into_iter().flatten().flatten() {
                kill_vmm_of(&run.path());
            }
        }
        let mnt = self.data.join("reflink");
        let deadline = Instant::now() + Duration::from_secs(15);
        while bhatti::storage::is_mountpoint(&mnt) && Instant::now() < deadline {
            let _ = std::process::Command::new("umount")
                .arg("-d")
                .arg(&mnt)
                .stderr(std::process::Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Kills the VMM of a run dir by its pid file, if the process is it.
pub fn kill_vmm_of(run_dir: &Path) {
    let Ok(pid) = std::fs::read_to_string(run_dir.join("vmm.pid")) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(run_dir.to_string_lossy().as_ref()) {
        let p = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The VM part's daemon config on `dir`: the backend `[vm]` picks, network
/// in netns `ns`, short thermal timers.
pub fn vm_config(dir: &Path, art: &Artifacts, ns: &str) -> Config {
    let mut config = bench_config(dir, &art.kernel, &art.rootfs);
    config.vm.backend = Backend::Auto;
    config.vm.boot_timeout_secs = BOOT_TIMEOUT.as_secs();
    config.vm.agent_timeout_secs = 60;
    config.vm.disk_strategy = DiskStrategy::Auto;
    config.vm.xfs_loop_size_mb = 16 << 10;
    config.network.netns = Some(ns.to_owned());
    config.network.dns_upstreams = vec![];
    config.thermal.warm_after_secs = 1;
    config.thermal.cold_after_secs = 0;
    config.thermal.sweep_interval_ms = 100;
    config
}

/// "QEMU (TCG)", "QEMU (KVM)", "Firecracker".
pub fn backend_label(backend: &Arc<dyn VmmBackend>) -> String {
    let label = match backend.kind() {
        BackendKind::Qemu => {
            let kvm = std::path::Path::new("/dev/kvm").exists();
            format!("QEMU ({})", if kvm { "KVM if usable" } else { "TCG" })
        }
        BackendKind::Firecracker => "Firecracker".to_owned(),
    };
    qemu_accel_label(backend).unwrap_or(label)
}

/// "QEMU (TCG)" / "QEMU (KVM)" from the backend's Debug output.
pub fn qemu_accel_label(b: &std::sync::Arc<dyn VmmBackend>) -> Option<String> {
    let d = format!("{b:?}");
    if b.kind() != BackendKind::Qemu {
        return None;
    }
    if d.contains("Tcg") {
        Some("QEMU (TCG)".into())
    } else if d.contains("Kvm") {
        Some("QEMU (KVM)".into())
    } else {
        None
    }
}

pub async fn wait_thermal(
    c: &mut Conn,
    id: &str,
    want: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let v = c
            .get(&format!("/sandboxes/{id}"))
            .await?
            .ok("get", 200)?
            .json()?;
        if v["thermal"]
            .as_str()
            .is_some_and(|t| t.eq_ignore_ascii_case(want))
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "sandbox {id} not {want} after {limit:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
