//! Firecracker backend, driven over its HTTP API on a unix socket.
//!
//! One Firecracker process per VM, started through [`VmmProcess`] (own
//! process group, optional network namespace, pid file). Per-VM files in the
//! run dir:
//!
//! | file | what |
//! |---|---|
//! | `fc.sock` | Firecracker's API socket |
//! | `vsock.sock` | host side of the guest's vsock (`CONNECT <port>` handshake) |
//! | `console.log` | guest serial console, plus Firecracker's own log lines |
//! | `vmm.pid` | Firecracker's pid ([`crate::process::PID_FILE`]) |
//! | `firecracker.json` | how this Firecracker was started ([`LaunchRecord`]) |
//!
//! Jailed, the two sockets are at the same paths inside the VM's chroot
//! (see [`jail`]); the others stay in the run dir.
//!
//! Boot configures the VM over the API (machine, kernel, drives, network,
//! vsock, entropy) and issues `InstanceStart`. Dirty-page tracking is always
//! on, so any snapshot may be a Diff.
//!
//! Snapshots (`PUT /snapshot/create`) need a paused VM and leave it paused.
//! - **Full** writes all of guest memory and resets dirty tracking.
//! - **Diff** writes only the pages dirtied since the previous snapshot of
//!   this process (or since it was restored), at their offsets in a
//!   full-size file. If `files.memory` does not exist it becomes a sparse
//!   file holding just those pages (fold it into the base with
//!   [`merge_diff_snapshot`]); if it exists with the right size, Firecracker
//!   writes the pages into it in place, so a copy of the base memory file
//!   becomes the merged image directly. Either way the Diff's state file
//!   goes with the merged memory.
//!
//! Restore starts a new Firecracker and loads the state file with the
//! memory file as a `File` backend (mapped privately: the memory file must
//! stay in place, unmodified, for as long as the restored VM runs).
//! Dirty tracking is not part of a snapshot, so it is requested again on
//! load. The vsock socket is moved to this run dir (`vsock_override`) and
//! the network device to `cfg.net`'s TAP (`network_overrides`). Block
//! devices are reopened at the paths recorded in the snapshot: the root and
//! config disks must be at the same paths as when the VM was booted.
//!
//! With [`FirecrackerConfig::jailer`] set, Firecracker runs under its jailer:
//! its own chroot, uid/gid and cgroup per VM ([`jail`]). The disks are then
//! recorded at fixed paths inside the chroot, so a restore (or a fork of
//! another VM's snapshot) opens the disks of the VM being started. Without
//! it (the default) Firecracker runs as the daemon's user with host paths.

mod api;
pub mod jail;
mod merge;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bhatti_protocol::transport::BoxedStream;
use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::limits::ResourceLimits;
use crate::process::{find_binary, wait_for_path, VmmProcess};
use crate::{
    console_tail, BackendKind, Result, SnapshotFiles, SnapshotKind, Vm, VmConfig, VmmBackend,
    VmmError, AGENT_VSOCK_PORT,
};

pub use api::ApiClient;
pub use jail::{find_jailer, JailerConfig};
use jail::{Access, Jail, Jailer};
pub use merge::merge_diff_snapshot;

pub const API_SOCKET: &str = "fc.sock";
pub const VSOCK_SOCKET: &str = "vsock.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const LAUNCH_RECORD: &str = "firecracker.json";
/// The binary looked up on PATH.
pub const FIRECRACKER_BINARY: &str = "firecracker";
/// The guest's vsock context id (any value ≥ 3; each VM has its own device).
pub const GUEST_CID: u32 = 3;
/// Device ids used in the API (and recorded in snapshots).
pub const ROOT_DRIVE_ID: &str = "root";
pub const CONFIG_DRIVE_ID: &str = "config";
pub const NET_IFACE_ID: &str = "eth0";

/// How long Firecracker may take to answer on its API socket.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an adopted Firecracker may take to answer.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a vsock `CONNECT` handshake may take.
const VSOCK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Kernel arguments the backend always passes, before `VmConfig::kernel_args`.
///
/// Firecracker appends the `virtio_mmio.device=` arguments of its devices
/// itself. `reboot=k` plus `bhatti.halt=reboot` makes lohar's shutdown a
/// keyboard-controller reset, which ends the Firecracker process; `panic=1`
/// does the same a second after a guest panic.
pub fn base_kernel_args() -> String {
    format!(
        "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw init=/usr/local/bin/lohar \
         bhatti.agent=vsock:{AGENT_VSOCK_PORT} bhatti.halt=reboot"
    )
}

fn kernel_args(cfg: &VmConfig) -> String {
    if cfg.kernel_args.trim().is_empty() {
        base_kernel_args()
    } else {
        format!("{} {}", base_kernel_args(), cfg.kernel_args.trim())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct FirecrackerConfig {
    /// `None`: `BHATTI_FIRECRACKER`, else `firecracker` on PATH.
    pub binary: Option<PathBuf>,
    /// Run with Firecracker's seccomp filters (its default). `false` adds
    /// `--no-seccomp`: only for builds whose filters do not match the host's
    /// libc (a missed syscall kills or hangs the VMM silently).
    pub seccomp: bool,
    /// Firecracker's `--level` (Error, Warning, Info, Debug, Trace, Off);
    /// its log goes to the console log.
    pub log_level: Option<String>,
    /// Run each Firecracker under the jailer (chroot, uid/gid, cgroup
    /// limits of [`ResourceLimits::for_vm`]); see [`JailerConfig`] for
    /// each field. `None`: unjailed, as the daemon's user, with host paths.
    pub jailer: Option<JailerConfig>,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        FirecrackerConfig {
            binary: None,
            seccomp: true,
            log_level: Some("Warning".into()),
            jailer: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FirecrackerBackend {
    binary: PathBuf,
    seccomp: bool,
    log_level: Option<String>,
    jailer: Option<Jailer>,
}

/// Written to `<run_dir>/firecracker.json` at every start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchRecord {
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub api_socket: PathBuf,
    pub vsock_socket: PathBuf,
    /// The snapshot a restore loaded, if any.
    pub restored_from: Option<SnapshotFiles>,
    /// The jail, if jailed (`binary`/`args` are then the jailer's).
    #[serde(default)]
    pub jail: Option<Jail>,
}

/// Finds the Firecracker binary: explicit path, else `BHATTI_FIRECRACKER`,
/// else PATH.
pub fn find_firecracker(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return find_binary(Some(p), FIRECRACKER_BINARY);
    }
    match std::env::var_os(crate::probe::FIRECRACKER_ENV) {
        Some(p) if !p.is_empty() => find_binary(Some(Path::new(&p)), FIRECRACKER_BINARY),
        _ => find_binary(None, FIRECRACKER_BINARY),
    }
}

/// Firecracker accepts ids of 1–64 ASCII letters, digits and hyphens.
pub(crate) fn instance_id(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() {
        "bhatti".into()
    } else {
        s
    }
}

impl FirecrackerBackend {
    pub fn new(cfg: FirecrackerConfig) -> Result<FirecrackerBackend> {
        let binary = find_firecracker(cfg.binary.as_deref()).ok_or_else(|| {
            VmmError::BinaryNotFound(match &cfg.binary {
                Some(p) => p.display().to_string(),
                None => format!(
                    "{FIRECRACKER_BINARY} (set {} or put it on PATH)",
                    crate::probe::FIRECRACKER_ENV
                ),
            })
        })?;
        let jailer = match &cfg.jailer {
            Some(j) => Some(Jailer::new(j, &binary)?),
            None => None,
        };
        Ok(FirecrackerBackend {
            binary,
            seccomp: cfg.seccomp,
            log_level: cfg.log_level,
            jailer,
        })
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The resolved jailer, if Firecracker runs jailed.
    pub fn jailer(&self) -> Option<&Jailer> {
        self.jailer.as_ref()
    }

    /// The Firecracker command line (without the binary) for `cfg`,
    /// unjailed.
    pub fn args(&self, cfg: &VmConfig) -> Vec<String> {
        self.firecracker_args(cfg, false)
    }

    /// Under the jailer, which passes `--id` itself.
    fn firecracker_args(&self, cfg: &VmConfig, jailed: bool) -> Vec<String> {
        let paths = Paths::new(&cfg.run_dir, None);
        let mut a = vec![
            "--api-sock".to_string(),
            paths.fc_api.to_string_lossy().into_owned(),
        ];
        if !jailed {
            a.extend(["--id".to_string(), instance_id(&cfg.id)]);
        }
        if let Some(level) = &self.log_level {
            a.extend(["--level".to_string(), level.clone()]);
        }
        if !self.seccomp {
            a.push("--no-seccomp".to_string());
        }
        a
    }

    /// Starts a Firecracker process for `cfg` (in a new jail, if jailed,
    /// holding what `what` needs) and waits for its API.
    async fn start(&self, cfg: &VmConfig, what: Start<'_>) -> Result<FirecrackerVm> {
        std::fs::create_dir_all(&cfg.run_dir)
            .map_err(|e| VmmError::io(format!("creating {}", cfg.run_dir.display()), e))?;
        let jail = match &self.jailer {
            Some(j) => Some(j.jail_for(&cfg.id)?),
            None => None,
        };
        let paths = Paths::new(&cfg.run_dir, jail.as_ref());
        // What Firecracker binds: the same strings jailed or not (we reach
        // jailed sockets through /proc/self/fd, whatever their host path).
        for p in [&paths.fc_api, &paths.fc_vsock] {
            // sun_path holds 108 bytes including the terminating NUL.
            if p.as_os_str().len() >= 108 {
                return Err(VmmError::Spawn(format!(
                    "{} is too long for a unix socket path; use a shorter run dir",
                    p.display()
                )));
            }
        }
        // Firecracker binds both sockets itself and fails on leftovers
        // (a jail is made afresh instead, without following anything a
        // previous jailed process left in it).
        if jail.is_none() {
            paths.remove_sockets()?;
        }
        if let Some(j) = &jail {
            j.prepare(&cfg.run_dir).await?;
            if let Err(e) = populate(j, cfg, what) {
                let _ = j.cleanup().await;
                return Err(e);
            }
        }
        let (binary, args) = match (&self.jailer, &jail) {
            (Some(jailer), Some(j)) => (
                jailer.binary.clone(),
                jailer.args(
                    j,
                    &ResourceLimits::for_vm(cfg),
                    &self.firecracker_args(cfg, true),
                ),
            ),
            _ => (self.binary.clone(), self.firecracker_args(cfg, false)),
        };
        let record = LaunchRecord {
            binary: binary.clone(),
            args: args.clone(),
            api_socket: paths.api.clone(),
            vsock_socket: paths.vsock.clone(),
            restored_from: match what {
                Start::Boot => None,
                Start::Restore(s) => Some(s.clone()),
            },
            jail: jail.clone(),
        };
        let spawned = crate::process::write_record(&cfg.run_dir, LAUNCH_RECORD, &record)
            .and_then(|()| {
                tracing::debug!(id = %cfg.id, binary = %binary.display(), ?args, "starting Firecracker");
                VmmProcess::spawn(
                    &binary,
                    &args,
                    &cfg.run_dir,
                    &paths.console,
                    cfg.netns.as_deref(),
                )
            });
        let process = match spawned {
            Ok(p) => p,
            Err(e) => {
                if let Some(j) = &jail {
                    let _ = j.cleanup().await;
                }
                return Err(e);
            }
        };
        let vm = FirecrackerVm {
            id: cfg.id.clone(),
            process,
            api: api_client(&paths.api, jail.as_ref()),
            paths,
            paused: AtomicBool::new(false),
            snapshots: AtomicU64::new(0),
            jail,
        };
        if let Err(e) = vm.wait_api(STARTUP_TIMEOUT).await {
            let e = vm.with_console(e);
            let _ = vm.kill_and_clean().await;
            return Err(e);
        }
        Ok(vm)
    }

    /// The pre-boot API calls for `cfg`, in order: `(path, body)`.
    pub fn boot_requests(cfg: &VmConfig) -> Vec<(String, Value)> {
        let paths = Paths::new(&cfg.run_dir, None);
        let mut r = vec![
            (
                "/machine-config".to_string(),
                json!({
                    "vcpu_count": cfg.vcpus.max(1),
                    "mem_size_mib": cfg.memory_mib,
                    "track_dirty_pages": true,
                }),
            ),
            (
                "/boot-source".to_string(),
                json!({
                    "kernel_image_path": cfg.kernel,
                    "boot_args": kernel_args(cfg),
                }),
            ),
            // The root disk is the first block device, so /dev/vda; the
            // kernel arguments name it (is_root_device would add a second
            // `root=`).
            (
                format!("/drives/{ROOT_DRIVE_ID}"),
                json!({
                    "drive_id": ROOT_DRIVE_ID,
                    "path_on_host": cfg.root_disk,
                    "is_root_device": false,
                    "is_read_only": false,
                }),
            ),
        ];
        if let Some(c) = &cfg.config_disk {
            r.push((
                format!("/drives/{CONFIG_DRIVE_ID}"),
                json!({
                    "drive_id": CONFIG_DRIVE_ID,
                    "path_on_host": c,
                    "is_root_device": false,
                    "is_read_only": true,
                }),
            ));
        }
        // Data disks: the drive id is what the guest reads as the serial.
        for d in &cfg.data_disks {
            r.push((
                format!("/drives/{}", d.serial),
                json!({
                    "drive_id": d.serial,
                    "path_on_host": d.path,
                    "is_root_device": false,
                    "is_read_only": d.read_only,
                }),
            ));
        }
        if let Some(n) = &cfg.net {
            r.push((
                format!("/network-interfaces/{NET_IFACE_ID}"),
                json!({
                    "iface_id": NET_IFACE_ID,
                    "host_dev_name": n.tap,
                    "guest_mac": n.mac,
                }),
            ));
        }
        r.push((
            "/vsock".to_string(),
            json!({ "guest_cid": GUEST_CID, "uds_path": paths.fc_vsock }),
        ));
        r.push(("/entropy".to_string(), json!({})));
        r
    }

    /// The `PUT /snapshot/load` body restoring `snapshot` into `cfg`.
    pub fn load_request(cfg: &VmConfig, snapshot: &SnapshotFiles) -> Result<Value> {
        let memory = snapshot.memory.as_ref().ok_or(VmmError::Unsupported(
            "a Firecracker snapshot without a memory file",
        ))?;
        let paths = Paths::new(&cfg.run_dir, None);
        let mut body = json!({
            "snapshot_path": snapshot.state,
            "mem_backend": { "backend_type": "File", "backend_path": memory },
            "track_dirty_pages": true,
            "resume_vm": true,
            "vsock_override": { "uds_path": paths.fc_vsock },
        });
        if let Some(n) = &cfg.net {
            body["network_overrides"] =
                json!([{ "iface_id": NET_IFACE_ID, "host_dev_name": n.tap }]);
        }
        Ok(body)
    }
}

#[async_trait]
impl VmmBackend for FirecrackerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    fn supports_diff_snapshots(&self) -> bool {
        true
    }

    async fn boot(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>> {
        let vm = self.start(cfg, Start::Boot).await?;
        let seen = jailed_view(cfg, vm.jail.is_some());
        let configure = async {
            for (path, body) in FirecrackerBackend::boot_requests(&seen) {
                vm.api.put(&path, &body).await?;
            }
            vm.api
                .put("/actions", &json!({ "action_type": "InstanceStart" }))
                .await
        };
        if let Err(e) = configure.await {
            let e = vm.with_console(e);
            let _ = vm.kill_and_clean().await;
            return Err(e);
        }
        Ok(Box::new(vm))
    }

    async fn restore(&self, cfg: &VmConfig, snapshot: &SnapshotFiles) -> Result<Box<dyn Vm>> {
        let body = match &self.jailer {
            None => FirecrackerBackend::load_request(cfg, snapshot)?,
            Some(_) => {
                let in_jail = SnapshotFiles {
                    state: jail::JAIL_RESTORE_STATE.into(),
                    memory: snapshot
                        .memory
                        .as_ref()
                        .map(|_| jail::JAIL_RESTORE_MEMORY.into()),
                };
                FirecrackerBackend::load_request(cfg, &in_jail)?
            }
        };
        for p in std::iter::once(&snapshot.state).chain(snapshot.memory.as_ref()) {
            if !p.is_file() {
                return Err(VmmError::io(
                    format!("snapshot file {}", p.display()),
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                ));
            }
        }
        let vm = self.start(cfg, Start::Restore(snapshot)).await?;
        let loaded = vm
            .api
            .request(
                Method::PUT,
                "/snapshot/load",
                Some(&body),
                api::SNAPSHOT_TIMEOUT,
            )
            .await;
        if let Err(e) = loaded {
            let e = vm.with_console(e);
            let _ = vm.kill_and_clean().await;
            return Err(e);
        }
        Ok(Box::new(vm))
    }

    async fn adopt(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>> {
        // The record says how it was started (jailed or not), whatever the
        // configuration says now.
        let jail = std::fs::read(cfg.run_dir.join(LAUNCH_RECORD))
            .ok()
            .and_then(|b| serde_json::from_slice::<LaunchRecord>(&b).ok())
            .and_then(|r| r.jail);
        let process = match VmmProcess::adopt(&cfg.run_dir) {
            Ok(p) => p,
            Err(e) => {
                // Its Firecracker is gone (nothing left in its cgroups): the
                // jail is of no use to anyone.
                if let Some(j) = jail.as_ref().filter(|j| !j.occupied()) {
                    if let Err(c) = j.cleanup().await {
                        tracing::warn!(id = %cfg.id, error = %c, "removing a dead VMM's jail");
                    }
                }
                return Err(e);
            }
        };
        if let Some(j) = &jail {
            // A pid in our jail's chroot is our Firecracker, not a recycled pid.
            let same = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
            let root = same(Path::new(&format!("/proc/{}/root", process.pid())));
            if root.is_none() || root != same(&j.root) {
                return Err(VmmError::Exited(format!(
                    "process {} is not chrooted in {}",
                    process.pid(),
                    j.root.display()
                )));
            }
        }
        let paths = Paths::new(&cfg.run_dir, jail.as_ref());
        let vm = FirecrackerVm {
            id: cfg.id.clone(),
            process,
            api: api_client(&paths.api, jail.as_ref()),
            paths,
            paused: AtomicBool::new(false),
            snapshots: AtomicU64::new(0),
            jail,
        };
        // A live VMM has long been listening: a short wait is plenty.
        vm.wait_api(ADOPT_TIMEOUT).await?;
        Ok(Box::new(vm))
    }
}

fn api_client(socket: &Path, jail: Option<&Jail>) -> ApiClient {
    match jail {
        Some(j) => ApiClient::in_jail(socket, &j.root),
        None => ApiClient::new(socket),
    }
}

/// What a start puts in the jail.
#[derive(Debug, Clone, Copy)]
enum Start<'a> {
    Boot,
    Restore(&'a SnapshotFiles),
}

/// Puts the files of `what` into the (prepared, not yet started) jail.
fn populate(j: &Jail, cfg: &VmConfig, what: Start<'_>) -> Result<()> {
    if let Start::Boot = what {
        j.place(&cfg.kernel, jail::JAIL_KERNEL, Access::ReadOnly)?;
    }
    j.place(&cfg.root_disk, jail::JAIL_ROOT_DISK, Access::ReadWrite)?;
    if let Some(c) = &cfg.config_disk {
        j.place(c, jail::JAIL_CONFIG_DISK, Access::ReadOnly)?;
    }
    for (i, d) in cfg.data_disks.iter().enumerate() {
        let access = if d.read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        j.place(&d.path, &jail::data_disk(i), access)?;
    }
    if let Start::Restore(s) = what {
        j.place(&s.state, jail::JAIL_RESTORE_STATE, Access::ReadOnly)?;
        if let Some(m) = &s.memory {
            j.place(m, jail::JAIL_RESTORE_MEMORY, Access::ReadOnly)?;
        }
    }
    Ok(())
}

/// `cfg` with the file paths Firecracker sees (in the chroot, if jailed).
/// The run dir keeps its path: the jail has it too.
fn jailed_view(cfg: &VmConfig, jailed: bool) -> VmConfig {
    let mut c = cfg.clone();
    if jailed {
        c.kernel = jail::JAIL_KERNEL.into();
        c.root_disk = jail::JAIL_ROOT_DISK.into();
        c.config_disk = cfg
            .config_disk
            .as_ref()
            .map(|_| jail::JAIL_CONFIG_DISK.into());
        for (i, d) in c.data_disks.iter_mut().enumerate() {
            d.path = jail::data_disk(i).into();
        }
    }
    c
}

#[derive(Debug, Clone)]
struct Paths {
    /// Where we reach the sockets (inside the chroot, if jailed).
    api: PathBuf,
    vsock: PathBuf,
    /// The same sockets as Firecracker names them.
    fc_api: PathBuf,
    fc_vsock: PathBuf,
    console: PathBuf,
}

impl Paths {
    fn new(run_dir: &Path, jail: Option<&Jail>) -> Paths {
        let fc_api = run_dir.join(API_SOCKET);
        let fc_vsock = run_dir.join(VSOCK_SOCKET);
        let host = |p: &PathBuf| jail.map_or_else(|| p.clone(), |j| j.host_path(p));
        Paths {
            api: host(&fc_api),
            vsock: host(&fc_vsock),
            fc_api,
            fc_vsock,
            console: run_dir.join(CONSOLE_LOG),
        }
    }

    fn remove_sockets(&self) -> Result<()> {
        for p in [&self.api, &self.vsock] {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VmmError::io(format!("removing {}", p.display()), e)),
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct FirecrackerVm {
    id: String,
    process: VmmProcess,
    paths: Paths,
    api: ApiClient,
    /// What we last told (or learnt from) Firecracker; saves a `GET /`
    /// before each snapshot.
    paused: AtomicBool,
    /// Snapshots requested through this handle (see [`Vm::snapshots_taken`]).
    snapshots: AtomicU64,
    /// Its jail, if jailed.
    jail: Option<Jail>,
}

impl FirecrackerVm {
    /// The VM's API client (for raw calls, e.g. benchmarks).
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// Adds the console tail to errors of a VMM that died.
    fn with_console(&self, e: VmmError) -> VmmError {
        if self.process.is_alive() && !matches!(e, VmmError::Exited(_)) {
            return e;
        }
        let tail = console_tail(&self.paths.console, 2048);
        match e {
            VmmError::Exited(m) => VmmError::Exited(format!("{m}; console:\n{tail}")),
            other => VmmError::Exited(format!("{other}; console:\n{tail}")),
        }
    }

    /// Waits for the API socket and a `GET /` answer; learns the VM state.
    async fn wait_api(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        wait_for_path(&self.paths.api, timeout, &self.process).await?;
        // bind() to listen() takes microseconds: retry at once at first
        // rather than on tokio's millisecond timer.
        let eager_until = Instant::now() + Duration::from_millis(5);
        loop {
            // The socket file exists from bind(); connections are refused
            // until listen().
            match self.api.get("/").await {
                Ok(info) => {
                    let state = info.get("state").and_then(Value::as_str).unwrap_or("");
                    self.paused.store(state == "Paused", Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    if !self.process.is_alive() {
                        return Err(VmmError::Exited(format!(
                            "Firecracker {} of {} exited before its API answered",
                            self.process.pid(),
                            self.id
                        )));
                    }
                    if Instant::now() > deadline {
                        return Err(VmmError::Timeout(
                            timeout,
                            format!("the Firecracker API at {} ({e})", self.paths.api.display()),
                        ));
                    }
                }
            }
            if Instant::now() < eager_until {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    async fn set_state(&self, state: &str) -> Result<()> {
        if !self.process.is_alive() {
            return Err(VmmError::Exited(format!(
                "Firecracker {} of {} is gone",
                self.process.pid(),
                self.id
            )));
        }
        self.api
            .patch("/vm", &json!({ "state": state }))
            .await
            .map_err(|e| self.with_console(e))?;
        self.paused.store(state == "Paused", Ordering::Relaxed);
        Ok(())
    }

    async fn kill_and_clean(&self) -> Result<()> {
        self.api.disconnect().await;
        let killed = self.process.kill().await;
        match &self.jail {
            None => {
                self.paths.remove_sockets()?;
                killed
            }
            // Only once Firecracker is gone: it uses the chroot and cgroups.
            // The sockets go with the chroot.
            Some(j) => {
                killed?;
                j.cleanup().await
            }
        }
    }

    /// Its jail, if jailed.
    pub fn jail(&self) -> Option<&Jail> {
        self.jail.as_ref()
    }
}

#[async_trait]
impl Vm for FirecrackerVm {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    async fn connect_agent(&self) -> Result<BoxedStream> {
        let connected = async {
            // `_fd` keeps the path `via` names valid until connected.
            let beneath = self.jail.as_ref().map(|j| j.root.as_path());
            let (_fd, via) = jail::open_socket(&self.paths.vsock, beneath)?;
            bhatti_protocol::transport::connect_firecracker_vsock(
                &via,
                AGENT_VSOCK_PORT,
                VSOCK_CONNECT_TIMEOUT,
            )
            .await
        };
        connected.await.map_err(|e| {
            VmmError::io(
                format!("connecting to the agent via {}", self.paths.vsock.display()),
                e,
            )
        })
    }

    async fn pause(&self) -> Result<()> {
        self.set_state("Paused").await
    }

    async fn resume(&self) -> Result<()> {
        self.set_state("Resumed").await
    }

    async fn is_paused(&self) -> Result<bool> {
        let info = self.api.get("/").await.map_err(|e| self.with_console(e))?;
        let paused = info.get("state").and_then(Value::as_str) == Some("Paused");
        self.paused.store(paused, Ordering::Relaxed);
        Ok(paused)
    }

    async fn snapshot(&self, kind: SnapshotKind, files: &SnapshotFiles) -> Result<()> {
        let memory = files.memory.as_ref().ok_or(VmmError::Unsupported(
            "a Firecracker snapshot without a memory file",
        ))?;
        // Firecracker refuses to snapshot a running VM.
        if !self.paused.load(Ordering::Relaxed) {
            self.set_state("Paused").await?;
        }
        // Counted before the call: even a failed snapshot may have reset
        // dirty tracking.
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        let staged = match &self.jail {
            Some(j) => Some(j.stage_snapshot(files)?),
            None => None,
        };
        let (state, memory) = match staged {
            Some(_) => (
                Path::new(jail::JAIL_SNAPSHOT_STATE),
                Path::new(jail::JAIL_SNAPSHOT_MEMORY),
            ),
            None => (files.state.as_path(), memory.as_path()),
        };
        let body = json!({
            "snapshot_type": match kind {
                SnapshotKind::Full => "Full",
                SnapshotKind::Diff => "Diff",
            },
            "snapshot_path": state,
            "mem_file_path": memory,
        });
        let r = self
            .api
            .request(
                Method::PUT,
                "/snapshot/create",
                Some(&body),
                api::SNAPSHOT_TIMEOUT,
            )
            .await
            .map(|_| ())
            .map_err(|e| self.with_console(e));
        match (&self.jail, staged) {
            (Some(j), Some(staged)) => {
                // Moved out of the jail (or undone) whether it worked or not.
                let finished = j.finish_snapshot(staged, r.is_ok(), kind);
                r.and(finished)
            }
            _ => r,
        }
    }

    fn snapshots_taken(&self) -> u64 {
        self.snapshots.load(Ordering::Relaxed)
    }

    async fn kill(&self) -> Result<()> {
        self.kill_and_clean().await
    }

    fn is_alive(&self) -> bool {
        self.process.is_alive()
    }

    fn console_log(&self) -> PathBuf {
        self.paths.console.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        crate::test_vm_config("sb_1")
    }

    fn backend(seccomp: bool) -> FirecrackerBackend {
        FirecrackerBackend {
            binary: "/usr/bin/firecracker".into(),
            seccomp,
            log_level: Some("Warning".into()),
            jailer: None,
        }
    }

    #[test]
    fn command_line() {
        let a = backend(true).args(&cfg()).join(" ");
        assert_eq!(
            a,
            "--api-sock /run/bhatti/sb1/fc.sock --id sb-1 --level Warning"
        );
        let a = backend(false).args(&cfg()).join(" ");
        assert!(a.ends_with(" --no-seccomp"), "{a}");
        assert_eq!(instance_id(&"x".repeat(80)).len(), 64);
        assert_eq!(instance_id(""), "bhatti");
    }

    #[test]
    fn boot_requests() {
        let r = FirecrackerBackend::boot_requests(&cfg());
        let paths: Vec<&str> = r.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/machine-config",
                "/boot-source",
                "/drives/root",
                "/drives/config",
                "/drives/vol0",
                "/drives/vol1",
                "/network-interfaces/eth0",
                "/vsock",
                "/entropy"
            ]
        );
        assert_eq!(r[0].1["track_dirty_pages"], true);
        assert_eq!(r[0].1["vcpu_count"], 2);
        let args = r[1].1["boot_args"].as_str().unwrap();
        assert!(args.starts_with("console=ttyS0 "), "{args}");
        assert!(args.contains(" bhatti.agent=vsock:1024 "), "{args}");
        assert!(args.ends_with("bhatti.halt=reboot quiet"), "{args}");
        assert_eq!(r[2].1["path_on_host"], "/d/root.ext4");
        assert_eq!(r[2].1["is_read_only"], false);
        assert_eq!(r[3].1["is_read_only"], true);
        assert_eq!(r[4].1["drive_id"], "vol0");
        assert_eq!(r[4].1["path_on_host"], "/v/a.ext4");
        assert_eq!(r[4].1["is_read_only"], false);
        assert_eq!(r[5].1["is_read_only"], true);
        assert_eq!(r[6].1["host_dev_name"], "tap0");
        assert_eq!(r[6].1["guest_mac"], "02:00:00:00:00:01");
        assert_eq!(r[7].1["uds_path"], "/run/bhatti/sb1/vsock.sock");
        assert_eq!(r[7].1["guest_cid"], 3);

        let mut bare = cfg();
        bare.config_disk = None;
        bare.net = None;
        bare.kernel_args = String::new();
        bare.data_disks.clear();
        let r = FirecrackerBackend::boot_requests(&bare);
        assert_eq!(r.len(), 5);
        assert_eq!(r[1].1["boot_args"], base_kernel_args());
    }

    #[test]
    fn jailed_requests_name_chroot_paths() {
        let r = FirecrackerBackend::boot_requests(&jailed_view(&cfg(), true));
        assert_eq!(r[1].1["kernel_image_path"], "/vmlinux");
        assert_eq!(r[2].1["path_on_host"], "/rootfs.ext4");
        assert_eq!(r[3].1["path_on_host"], "/config.ext4");
        assert_eq!(r[4].1["path_on_host"], "/vol0.ext4");
        assert_eq!(r[5].1["path_on_host"], "/vol1.ext4");
        // The run dir has the same path inside the chroot.
        assert_eq!(r[7].1["uds_path"], "/run/bhatti/sb1/vsock.sock");
        let mut bare = cfg();
        bare.config_disk = None;
        assert_eq!(jailed_view(&bare, true).config_disk, None);
        assert_eq!(jailed_view(&cfg(), false).root_disk, cfg().root_disk);
        let a = backend(false).firecracker_args(&cfg(), true).join(" ");
        assert_eq!(
            a, "--api-sock /run/bhatti/sb1/fc.sock --level Warning --no-seccomp",
            "the jailer passes --id itself"
        );
    }

    #[test]
    fn load_request() {
        let files = SnapshotFiles {
            state: "/s/vm.state".into(),
            memory: Some("/s/vm.mem".into()),
        };
        let b = FirecrackerBackend::load_request(&cfg(), &files).unwrap();
        assert_eq!(b["snapshot_path"], "/s/vm.state");
        assert_eq!(b["mem_backend"]["backend_type"], "File");
        assert_eq!(b["mem_backend"]["backend_path"], "/s/vm.mem");
        assert_eq!(b["track_dirty_pages"], true);
        assert_eq!(b["resume_vm"], true);
        assert_eq!(
            b["vsock_override"]["uds_path"],
            "/run/bhatti/sb1/vsock.sock"
        );
        assert_eq!(b["network_overrides"][0]["iface_id"], "eth0");
        assert_eq!(b["network_overrides"][0]["host_dev_name"], "tap0");
        let mut bare = cfg();
        bare.net = None;
        let b = FirecrackerBackend::load_request(&bare, &files).unwrap();
        assert!(b.get("network_overrides").is_none());
        let no_mem = SnapshotFiles {
            state: "/s/vm.state".into(),
            memory: None,
        };
        assert!(FirecrackerBackend::load_request(&cfg(), &no_mem).is_err());
    }
}
