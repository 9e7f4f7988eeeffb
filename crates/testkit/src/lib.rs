//! Support shared by the test suites that boot real VMs: finding the guest
//! artifacts (or printing one SKIP line; failing under `BHATTI_REQUIRE_VMS`), the backends that boot Linux on
//! this host, and removing what an engine under test leaves behind — VMM
//! processes, the XFS loop mount, the network namespace — even when a test
//! fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bhatti_vmm::VmmBackend;

pub mod registry;
pub mod s3;
#[cfg(feature = "soak")]
pub mod soak;

/// Where `scripts/artifacts.sh` caches kernels and rootfs images.
pub const CACHE: &str = "/var/cache/bhatti-ci";

/// Set (to anything but "" or "0") in CI: a VM test that cannot run fails
/// instead of skipping, so a missing artifact or tool cannot pass silently.
pub const REQUIRE_VMS: &str = "BHATTI_REQUIRE_VMS";

/// True when [`REQUIRE_VMS`] is set.
pub fn vms_required() -> bool {
    std::env::var(REQUIRE_VMS).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A test that cannot run here: one `SKIP` line, or a panic under
/// [`REQUIRE_VMS`].
pub fn skip(test: &str, why: &str) {
    assert!(
        !vms_required(),
        "{test} cannot run: {why} ({REQUIRE_VMS} is set, so this fails instead of skipping)"
    );
    eprintln!("SKIP {test}: {why}");
}

/// A non-empty path from the environment.
pub fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The most recently modified `<dir>/*/<file>`, skipping temp entries.
pub fn newest(dir: &Path, file: &str) -> Option<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with(['.', '_']))
        .map(|e| e.path().join(file))
        .filter(|p| p.is_file())
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// What a Linux guest boots from.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub kernel: PathBuf,
    /// A rootfs with lohar installed.
    pub rootfs: PathBuf,
}

/// The static lohar binary (`BHATTI_LOHAR`, as `scripts/artifacts.sh`
/// exports it, else the newest in the cache), for images made from OCI
/// images; `None` when there is none.
pub fn lohar() -> Option<PathBuf> {
    env_path("BHATTI_LOHAR")
        .or_else(|| newest(&Path::new(CACHE).join("lohar"), "lohar"))
        .filter(|p| p.is_file())
}

/// The guest kernel and rootfs (`BHATTI_KERNEL`, `BHATTI_ROOTFS`, else the
/// newest in the cache), or `None` after one SKIP line naming what is
/// missing (root included: VM tests make TAPs, namespaces and mounts).
pub fn artifacts(test: &str) -> Option<Artifacts> {
    let cache = Path::new(CACHE);
    let kernel = env_path("BHATTI_KERNEL").or_else(|| newest(&cache.join("kernel"), "vmlinux"));
    let rootfs =
        env_path("BHATTI_ROOTFS").or_else(|| newest(&cache.join("rootfs"), "rootfs+lohar.ext4"));
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root");
    }
    let kernel = kernel.filter(|p| p.is_file());
    if kernel.is_none() {
        missing.push("kernel (BHATTI_KERNEL)");
    }
    let rootfs = rootfs.filter(|p| p.is_file());
    if rootfs.is_none() {
        missing.push("rootfs with lohar (BHATTI_ROOTFS)");
    }
    match (kernel, rootfs) {
        (Some(kernel), Some(rootfs)) if missing.is_empty() => Some(Artifacts { kernel, rootfs }),
        _ => {
            skip(test, &format!("missing {}", missing.join(", ")));
            None
        }
    }
}

/// Every backend that boots Linux here, labelled: QEMU (KVM or TCG), and
/// Firecracker where the host has hardware KVM.
pub fn linux_backends() -> Vec<(String, Arc<dyn VmmBackend>)> {
    let host = bhatti_vmm::probe::probe();
    let mut v: Vec<(String, Arc<dyn VmmBackend>)> = Vec::new();
    if host.hardware_kvm && host.firecracker.is_some() {
        let cfg = bhatti_vmm::firecracker::FirecrackerConfig {
            binary: host.firecracker.clone(),
            ..Default::default()
        };
        match bhatti_vmm::firecracker::FirecrackerBackend::new(cfg) {
            Ok(b) => v.push(("firecracker".into(), Arc::new(b))),
            Err(e) => eprintln!("firecracker backend unavailable: {e}"),
        }
    } else if host.firecracker.is_some() {
        eprintln!(
            "SKIP firecracker for Linux guests: no hardware KVM here (its lifecycle is tested with the tiny guest)"
        );
    }
    if host.qemu.is_some() {
        match bhatti_vmm::qemu::QemuBackend::new(bhatti_vmm::qemu::QemuConfig::default()) {
            Ok(b) => {
                let label = format!("qemu/{:?}", b.accel()).to_lowercase();
                v.push((label, Arc::new(b)));
            }
            Err(e) => eprintln!("qemu backend unavailable: {e}"),
        }
    }
    if v.is_empty() {
        eprintln!("no VMM backend can boot Linux on this host");
    }
    v
}

/// Kills the VMM of a run dir by its pid file — only if that process names
/// the run dir, so a recycled pid is never hit — and waits until it is gone
/// (it holds its disk open).
pub fn kill_vmm_of(run_dir: &Path) {
    let Ok(pid) = std::fs::read_to_string(run_dir.join("vmm.pid")) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(&*run_dir.to_string_lossy()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while bhatti_vmm::process::pid_alive(pid as u32) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// True if `path` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m == want)
}

/// Removes what an engine with data dir `dir` left: its VMM processes and
/// its XFS loop mount (retried: a killed VMM may hold its disk a moment
/// longer than its pid shows).
pub fn clean_data_dir(dir: &Path) {
    for run in std::fs::read_dir(dir.join("run"))
        .into_iter()
        .flatten()
        .flatten()
    {
        kill_vmm_of(&run.path());
    }
    remove_vm_cgroups(dir);
    let mnt = dir.join("reflink");
    let deadline = Instant::now() + Duration::from_secs(15);
    while is_mountpoint(&mnt) && Instant::now() < deadline {
        let _ = std::process::Command::new("umount")
            .arg("-d")
            .arg(&mnt)
            .stderr(std::process::Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes the (now empty) cgroups of the data dir's VMs: the daemon's
/// `[vm] cgroup_root` ("bhatti") holds one per sandbox id; a VMM killed here
/// rather than by its backend leaves its cgroup behind.
fn remove_vm_cgroups(dir: &Path) {
    let Ok(hierarchy) = bhatti_vmm::cgroup::Hierarchy::detect() else {
        return;
    };
    let ids: Vec<String> = ["run", "sandboxes"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(dir.join(d))
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for m in hierarchy.mounts() {
        let root = m.point.join("bhatti");
        for id in &ids {
            let _ = std::fs::remove_dir(root.join(id));
        }
        // A VM the daemon rolled back after a crash (its dirs already gone)
        // can leave an empty cgroup too. VM tests run one at a time, so an
        // empty sandbox cgroup here is nobody's.
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let empty = std::fs::read_to_string(e.path().join("cgroup.procs"))
                .is_ok_and(|p| p.trim().is_empty());
            if name.starts_with("sb-") && empty {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// Deletes a network namespace (and with it its bridge and TAPs).
pub fn delete_netns(name: &str) {
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", name])
        .stderr(std::process::Stdio::null())
        .status();
}

/// A fresh namespace name for one test (`<prefix>-<8 hex>`).
pub fn netns_name(prefix: &str) -> String {
    let mut b = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    format!("{prefix}-{:08x}", u32::from_le_bytes(b))
}
