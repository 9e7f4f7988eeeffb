//! QEMU `microvm` backend, driven over QMP.
//!
//! One QEMU process per VM, started through [`VmmProcess`] (own process
//! group, optional network namespace, pid file). Per-VM files in the run dir:
//!
//! | file | what |
//! |---|---|
//! | `qmp.sock` | QMP server (one client at a time; we keep one connection) |
//! | `agent.sock` | chardev of the `bhatti.agent` virtio-serial port |
//! | `console.log` | guest serial console, plus QEMU's own stderr; capped ([`crate::console`]) |
//! | `vmm.pid` | QEMU's pid ([`crate::process::PID_FILE`]) |
//! | `qemu.json` | how this QEMU was started ([`LaunchRecord`]) |
//!
//! All of them are created by the daemon or by QEMU while it is still root,
//! and stay root's: a QEMU confined to an unprivileged user
//! ([`Confinement`], module [`confine`]) only uses descriptors it opened
//! before switching, plus those handed to it over QMP.
//!
//! Snapshots are migrations into a file: the VM is paused, we (root) open
//! the target file ourselves, hand QEMU the descriptor (`getfd`, over
//! SCM_RIGHTS) and run `migrate fd:<name>`; QEMU never opens a path or
//! spawns a helper (no `exec:` URIs, which seccomp's `spawn=deny`
//! forbids). Restore starts a QEMU with the same device layout
//! and `-incoming defer`, hands it the snapshot file the same way
//! (`migrate-incoming fd:<name>`), waits until the stream is loaded and
//! issues `cont`. The root disk is not in the stream: stopping the VM
//! drains and flushes every in-flight request into the disk file, so the
//! file at snapshot time is exactly the disk that goes with the memory
//! image; the caller must keep (a copy of) that disk state for restore.
//!
//! The device layout of a restore must match the snapshot's: same vCPUs,
//! memory, and the same presence of config disk and network device (the
//! config disk's contents do not matter after boot).

pub mod confine;
mod qmp;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bhatti_protocol::transport::BoxedStream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::cgroup::{Cgroups, VmCgroup};
use crate::console::ConsoleCap;
use crate::limits::ResourceLimits;
use crate::process::{find_binary, wait_for_path, SpawnOptions, VmmProcess};
use crate::{
    console_tail, BackendKind, Result, SnapshotFiles, SnapshotKind, Vm, VmConfig, VmmBackend,
    VmmError, AGENT_SERIAL_NAME,
};

pub use confine::{Confinement, VMM_USER};
pub use qmp::Qmp;

pub const QMP_SOCKET: &str = "qmp.sock";
pub const AGENT_SOCKET: &str = "agent.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const LAUNCH_RECORD: &str = "qemu.json";

/// Kernel arguments the backend always passes, before `VmConfig::kernel_args`.
///
/// `microvm` with `acpi=off` has no way to power off, so lohar ends the
/// machine with a reboot (`bhatti.halt=reboot`), which `-no-reboot` turns
/// into QEMU exiting.
pub fn base_kernel_args() -> String {
    format!(
        "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw init=/usr/local/bin/lohar \
         bhatti.agent=serial:{AGENT_SERIAL_NAME} bhatti.halt=reboot"
    )
}

/// How long QEMU may take to create its QMP socket.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long loading or writing a migration stream may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    Kvm,
    Tcg,
    /// KVM when the host has hardware KVM ([`crate::probe`]), else TCG.
    #[default]
    Auto,
}

/// The QEMU backend's settings. Confinement (user, seccomp, cgroups) is set
/// with [`QemuBackend::with_confinement`], the console cap with
/// [`QemuBackend::with_console_limit`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QemuConfig {
    /// `None`: `BHATTI_QEMU`, else `qemu-system-x86_64` on PATH.
    pub binary: Option<PathBuf>,
    pub accel: Accel,
    /// Appended to every QEMU command line (boot and restore alike).
    pub extra_args: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct QemuBackend {
    binary: PathBuf,
    /// Kvm or Tcg, never Auto.
    accel: Accel,
    extra_args: Vec<String>,
    confinement: Confinement,
    /// How this binary switches users (set when `confinement.run_as` is).
    user_switch: Option<confine::UserSwitch>,
    /// Detected once (set when `confinement.cgroups` is).
    cgroups: Option<Cgroups>,
    console_max_bytes: u64,
}

/// Written to `<run_dir>/qemu.json` at every start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchRecord {
    pub binary: PathBuf,
    pub accel: Accel,
    pub args: Vec<String>,
    /// The snapshot a restore loaded, if any.
    pub restored_from: Option<PathBuf>,
    /// The cgroup QEMU runs in, for an adopting daemon to remove when it
    /// ends.
    #[serde(default)]
    pub cgroup: Option<VmCgroup>,
}

impl QemuBackend {
    pub fn new(cfg: QemuConfig) -> Result<QemuBackend> {
        let binary = match &cfg.binary {
            Some(p) => find_binary(Some(p), crate::probe::QEMU_BINARY)
                .ok_or_else(|| VmmError::BinaryNotFound(p.display().to_string()))?,
            None => crate::probe::probe()
                .qemu
                .ok_or_else(|| VmmError::BinaryNotFound(crate::probe::QEMU_BINARY.into()))?,
        };
        let accel = match cfg.accel {
            Accel::Auto => {
                let host = crate::probe::probe();
                if host.hardware_kvm {
                    Accel::Kvm
                } else {
                    tracing::warn!(
                        pvm = host.pvm,
                        "no hardware KVM on this host: QEMU runs guests under TCG \
                         (software emulation); expect boots of seconds and slow guests"
                    );
                    Accel::Tcg
                }
            }
            a => a,
        };
        Ok(QemuBackend {
            binary,
            accel,
            extra_args: cfg.extra_args,
            confinement: Confinement::default(),
            user_switch: None,
            cgroups: None,
            console_max_bytes: crate::console::DEFAULT_MAX_BYTES,
        })
    }

    /// Confines every QEMU started from now on as `c` says. Checks what it
    /// can up front: the user exists, this QEMU can switch users and has
    /// seccomp, the host has a usable cgroup hierarchy.
    pub fn with_confinement(mut self, c: Confinement) -> Result<QemuBackend> {
        let needs_help = c.run_as.is_some() || c.sandbox;
        let features = if needs_help {
            confine::features(&self.binary)?
        } else {
            confine::Features::default()
        };
        self.user_switch = match &c.run_as {
            Some(user) => {
                confine::check_user(user)?;
                Some(features.user_switch.ok_or_else(|| {
                    VmmError::Spawn(format!(
                        "{} supports neither -run-with user= nor -runas",
                        self.binary.display()
                    ))
                })?)
            }
            None => None,
        };
        if c.sandbox && !features.sandbox {
            return Err(VmmError::Spawn(format!(
                "{} has no -sandbox (built without seccomp)",
                self.binary.display()
            )));
        }
        self.cgroups = c.cgroups.as_ref().map(Cgroups::new).transpose()?;
        self.confinement = c;
        Ok(self)
    }

    /// Caps each VM's `console.log` at about `max_bytes` (default
    /// [`crate::console::DEFAULT_MAX_BYTES`]).
    pub fn with_console_limit(mut self, max_bytes: u64) -> QemuBackend {
        self.console_max_bytes = max_bytes.max(4096);
        self
    }

    pub fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The full QEMU command line for `cfg` (without the binary):
    /// [`qemu_args`] with the confinement options before the extra ones.
    pub fn args(&self, cfg: &VmConfig, incoming: bool) -> Vec<String> {
        let mut extra = confine::args(&self.confinement, self.user_switch);
        extra.extend(self.extra_args.iter().cloned());
        qemu_args(cfg, self.accel, &extra, incoming)
    }

    async fn start(&self, cfg: &VmConfig, incoming: Option<&Path>) -> Result<QemuVm> {
        std::fs::create_dir_all(&cfg.run_dir)
            .map_err(|e| VmmError::io(format!("creating {}", cfg.run_dir.display()), e))?;
        let paths = Paths::new(&cfg.run_dir);
        for stale in [&paths.qmp, &paths.agent] {
            match std::fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VmmError::io(format!("removing {}", stale.display()), e)),
            }
        }
        let args = self.args(cfg, incoming.is_some());
        let cgroup = match &self.cgroups {
            Some(c) => Some(c.create(&cfg.id, &limits_for(cfg, self.accel)).await?),
            None => None,
        };
        let record = LaunchRecord {
            binary: self.binary.clone(),
            accel: self.accel,
            args: args.clone(),
            restored_from: incoming.map(Path::to_path_buf),
            cgroup: cgroup.clone(),
        };
        if let Err(e) = crate::process::write_record(&cfg.run_dir, LAUNCH_RECORD, &record) {
            if let Some(cg) = &cgroup {
                let _ = cg.remove_now();
            }
            return Err(e);
        }
        tracing::debug!(id = %cfg.id, binary = %self.binary.display(), ?args, "starting QEMU");
        let process = VmmProcess::spawn_with(
            &self.binary,
            &args,
            &cfg.run_dir,
            &paths.console,
            SpawnOptions {
                netns: cfg.netns.clone(),
                cgroup,
            },
        )?;
        let vm = QemuVm {
            id: cfg.id.clone(),
            process,
            _console_cap: ConsoleCap::spawn(paths.console.clone(), self.console_max_bytes),
            paths,
            qmp: Mutex::new(None),
        };
        if let Err(e) = vm.wait_qmp().await {
            let _ = vm.process.kill().await;
            return Err(vm.with_console(e));
        }
        Ok(vm)
    }
}

/// Escapes a value for QEMU's `key=value,…` option syntax.
fn opt(value: &Path) -> String {
    value.to_string_lossy().replace(',', ",,")
}

/// The cgroup limits of a QEMU VM: TCG needs room for its translation
/// cache.
pub fn limits_for(cfg: &VmConfig, accel: Accel) -> ResourceLimits {
    if accel == Accel::Kvm {
        ResourceLimits::for_vm(cfg)
    } else {
        ResourceLimits::for_emulated_vm(cfg)
    }
}

/// The QEMU command line (without the binary) for `cfg`.
pub fn qemu_args(cfg: &VmConfig, accel: Accel, extra: &[String], incoming: bool) -> Vec<String> {
    let paths = Paths::new(&cfg.run_dir);
    let kvm = accel == Accel::Kvm;
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let machine = "microvm,acpi=off,x-option-roms=off,isa-serial=on,rtc=on";
    let name = format!("bhatti-{}", cfg.id.replace(',', "_"));
    push(&["-name", &name, "-M", machine]);
    // TCG's translation cache is bounded, so the VMM's memory is (cgroups).
    let accel_opt = if kvm {
        "kvm".to_string()
    } else {
        format!("tcg,tb-size={}", crate::limits::TCG_TB_MIB)
    };
    push(&["-accel", &accel_opt]);
    push(&["-cpu", if kvm { "host" } else { "max" }]);
    push(&["-smp", &cfg.vcpus.max(1).to_string()]);
    push(&["-m", &format!("{}M", cfg.memory_mib)]);
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    let kernel = cfg.kernel.to_string_lossy();
    let append = if cfg.kernel_args.trim().is_empty() {
        base_kernel_args()
    } else {
        format!("{} {}", base_kernel_args(), cfg.kernel_args.trim())
    };
    push(&["-kernel", &kernel, "-append", &append]);
    // Console: appended to the log QEMU's stderr also goes to.
    push(&[
        "-chardev",
        &format!("file,id=console,path={},append=on", opt(&paths.console)),
        "-serial",
        "chardev:console",
    ]);
    // Root disk (/dev/vda): the first virtio-mmio device on the command line.
    // `auto-read-only=off`: otherwise QEMU reopens the file by path,
    // read-only, when a migration deactivates the disk (and read-write when
    // it is activated again), which a QEMU that has dropped root can't.
    push(&[
        "-drive",
        &format!(
            "id=root,file={},format=raw,if=none,auto-read-only=off,cache=writeback,aio=threads,discard=unmap,detect-zeroes=unmap",
            opt(&cfg.root_disk)
        ),
        "-device",
        "virtio-blk-device,drive=root",
    ]);
    if let Some(c) = &cfg.config_disk {
        push(&[
            "-drive",
            &format!(
                "id=config,file={},format=raw,if=none,readonly=on,cache=writeback",
                opt(c)
            ),
            "-device",
            "virtio-blk-device,drive=config",
        ]);
    }
    // Data disks after root and config; the guest finds them by serial.
    for (i, d) in cfg.data_disks.iter().enumerate() {
        push(&[
            "-drive",
            &format!(
                "id=data{i},file={},format=raw,if=none,auto-read-only=off,readonly={},cache=writeback,aio=threads,discard=unmap",
                opt(&d.path),
                if d.read_only { "on" } else { "off" }
            ),
            "-device",
            &format!(
                "virtio-blk-device,drive=data{i},serial={}",
                d.serial.replace(',', "_")
            ),
        ]);
    }
    if let Some(n) = &cfg.net {
        let vhost = kvm && Path::new("/dev/vhost-net").exists();
        push(&[
            "-netdev",
            &format!(
                "tap,id=n0,ifname={},script=no,downscript=no,vhost={}",
                n.tap.replace(',', ",,"),
                if vhost { "on" } else { "off" }
            ),
            "-device",
            &format!("virtio-net-device,netdev=n0,mac={}", n.mac),
        ]);
    }
    push(&[
        "-device",
        "virtio-serial-device,max_ports=2",
        "-chardev",
        &format!(
            "socket,id=agent,path={},server=on,wait=off",
            opt(&paths.agent)
        ),
        "-device",
        &format!("virtserialport,chardev=agent,name={AGENT_SERIAL_NAME}"),
    ]);
    push(&[
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-device,rng=rng0",
    ]);
    push(&[
        "-chardev",
        &format!("socket,id=qmp,path={},server=on,wait=off", opt(&paths.qmp)),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    a.extend(extra.iter().cloned());
    if incoming {
        a.extend(["-incoming".to_string(), "defer".to_string()]);
    }
    a
}

#[async_trait]
impl VmmBackend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    async fn boot(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>> {
        let vm = self.start(cfg, None).await?;
        Ok(Box::new(vm))
    }

    async fn restore(&self, cfg: &VmConfig, snapshot: &SnapshotFiles) -> Result<Box<dyn Vm>> {
        let file = std::fs::File::open(&snapshot.state).map_err(|e| {
            VmmError::io(format!("opening snapshot {}", snapshot.state.display()), e)
        })?;
        let vm = self.start(cfg, Some(&snapshot.state)).await?;
        if let Err(e) = vm.load_and_run(&file).await {
            let e = vm.with_console(e);
            let _ = vm.process.kill().await;
            return Err(e);
        }
        Ok(Box::new(vm))
    }

    async fn adopt(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>> {
        // The cgroup it was started in (if any) is only recorded, to be
        // removed when it ends: nothing is created or moved.
        let record: Option<LaunchRecord> = std::fs::read(cfg.run_dir.join(LAUNCH_RECORD))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let process = VmmProcess::adopt(&cfg.run_dir)?.with_cgroup(record.and_then(|r| r.cgroup));
        let paths = Paths::new(&cfg.run_dir);
        let vm = QemuVm {
            id: cfg.id.clone(),
            process,
            _console_cap: ConsoleCap::spawn(paths.console.clone(), self.console_max_bytes),
            paths,
            qmp: Mutex::new(None),
        };
        vm.wait_qmp().await?;
        Ok(Box::new(vm))
    }
}

#[derive(Debug, Clone)]
struct Paths {
    qmp: PathBuf,
    agent: PathBuf,
    console: PathBuf,
}

impl Paths {
    fn new(run_dir: &Path) -> Paths {
        Paths {
            qmp: run_dir.join(QMP_SOCKET),
            agent: run_dir.join(AGENT_SOCKET),
            console: run_dir.join(CONSOLE_LOG),
        }
    }
}

#[derive(Debug)]
pub struct QemuVm {
    id: String,
    process: VmmProcess,
    /// Keeps `console.log` bounded while this handle lives.
    _console_cap: ConsoleCap,
    paths: Paths,
    /// The one QMP connection (QEMU serves one client at a time).
    qmp: Mutex<Option<Qmp>>,
}

/// Commands that may be re-sent on a new connection if the old one broke.
fn idempotent(cmd: &str) -> bool {
    matches!(cmd, "stop" | "cont" | "qmp_capabilities") || cmd.starts_with("query-")
}

impl QemuVm {
    /// Adds the console tail to startup and migration errors.
    fn with_console(&self, e: VmmError) -> VmmError {
        let tail = console_tail(&self.paths.console, 2048);
        match e {
            VmmError::Exited(m) => VmmError::Exited(format!("{m}; console:\n{tail}")),
            VmmError::Api { what, message } if !self.process.is_alive() => {
                VmmError::Exited(format!("during {what} ({message}); console:\n{tail}"))
            }
            other if !self.process.is_alive() => {
                VmmError::Exited(format!("{other}; console:\n{tail}"))
            }
            other => other,
        }
    }

    async fn wait_qmp(&self) -> Result<()> {
        wait_for_path(&self.paths.qmp, STARTUP_TIMEOUT, &self.process).await?;
        let mut g = self.qmp.lock().await;
        *g = Some(Qmp::connect(&self.paths.qmp, STARTUP_TIMEOUT).await?);
        Ok(())
    }

    /// Runs one QMP command on the VM's connection, reconnecting once.
    pub async fn qmp(&self, cmd: &str, args: Option<Value>) -> Result<Value> {
        let mut g = self.qmp.lock().await;
        self.qmp_locked(&mut g, cmd, args).await
    }

    async fn qmp_locked(
        &self,
        g: &mut Option<Qmp>,
        cmd: &str,
        args: Option<Value>,
    ) -> Result<Value> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            if !self.process.is_alive() {
                return Err(VmmError::Exited(format!(
                    "QEMU {} of {} is gone",
                    self.process.pid(),
                    self.id
                )));
            }
            let q = match g {
                Some(q) => q,
                None => g.insert(Qmp::connect(&self.paths.qmp, Duration::from_secs(5)).await?),
            };
            match tokio::time::timeout(qmp::COMMAND_TIMEOUT, q.execute(cmd, args.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e @ VmmError::Api { .. })) => return Err(e),
                Ok(Err(e)) => {
                    *g = None;
                    if attempt >= 2 || !idempotent(cmd) || !self.process.is_alive() {
                        return Err(e);
                    }
                    tracing::debug!(id = %self.id, error = %e, "QMP connection lost; reconnecting");
                }
                Err(_) => {
                    *g = None;
                    return Err(VmmError::Timeout(
                        qmp::COMMAND_TIMEOUT,
                        format!("QMP {cmd}"),
                    ));
                }
            }
        }
    }

    async fn status(&self) -> Result<String> {
        let v = self.qmp("query-status", None).await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }

    /// Hands `file` to QEMU under `name` for an `fd:` migration URI.
    async fn send_fd(&self, name: &str, file: &std::fs::File) -> Result<()> {
        let mut g = self.qmp.lock().await;
        if g.is_none() {
            *g = Some(Qmp::connect(&self.paths.qmp, Duration::from_secs(5)).await?);
        }
        let q = g.as_mut().expect("connected");
        let r = tokio::time::timeout(qmp::COMMAND_TIMEOUT, q.send_fd(name, file.as_fd())).await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                if !matches!(e, VmmError::Api { .. }) {
                    *g = None;
                }
                Err(e)
            }
            Err(_) => {
                *g = None;
                Err(VmmError::Timeout(qmp::COMMAND_TIMEOUT, "QMP getfd".into()))
            }
        }
    }

    /// Restore side: load the migration stream from `file`, then run.
    async fn load_and_run(&self, file: &std::fs::File) -> Result<()> {
        self.send_fd("snapshot", file).await?;
        self.qmp("migrate-incoming", Some(json!({ "uri": "fd:snapshot" })))
            .await?;
        let start = Instant::now();
        loop {
            let status = self.status().await?;
            match status.as_str() {
                "inmigrate" | "prelaunch" | "restore-vm" => {}
                "running" => break,
                "paused" | "postmigrate" => {
                    self.qmp("cont", None).await?;
                    break;
                }
                other => {
                    let info = self.qmp("query-migrate", None).await.unwrap_or_default();
                    return Err(VmmError::Api {
                        what: "migrate-incoming".into(),
                        message: format!("QEMU is {other} after loading the snapshot: {info}"),
                    });
                }
            }
            if start.elapsed() > MIGRATION_TIMEOUT {
                return Err(VmmError::Timeout(
                    MIGRATION_TIMEOUT,
                    "loading the snapshot".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Source side: stream the paused VM into `path`.
    async fn migrate_to(&self, path: &Path) -> Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| VmmError::io(format!("creating {}", path.display()), e))?;
        // The default bandwidth cap (128 MiB/s) would make a 1 GiB guest
        // take 8 s; the VM is paused, so there is no reason to throttle.
        self.qmp(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 64u64 << 30 })),
        )
        .await?;
        self.send_fd("snapshot", &file).await?;
        self.qmp("migrate", Some(json!({ "uri": "fd:snapshot" })))
            .await?;
        // QEMU holds its own copy of the descriptor until the stream ends.
        let start = Instant::now();
        let mut delay = Duration::from_millis(1);
        loop {
            let info = self.qmp("query-migrate", None).await?;
            match info.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(VmmError::Api {
                        what: "migrate".into(),
                        message: info
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("migration failed")
                            .to_owned(),
                    })
                }
                _ => {}
            }
            if start.elapsed() > MIGRATION_TIMEOUT {
                let _ = self.qmp("migrate_cancel", None).await;
                return Err(VmmError::Timeout(
                    MIGRATION_TIMEOUT,
                    "writing the snapshot".into(),
                ));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(20));
        }
        // A GiB of memory image: the fsync runs on the blocking pool, not on
        // the scheduler thread that answers every other request
        // (api-bench --stall-only measured a 180 ms stall here).
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(|e| VmmError::io("syncing the snapshot", std::io::Error::other(e)))?
            .map_err(|e| VmmError::io(format!("syncing {}", path.display()), e))?;
        Ok(())
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    async fn connect_agent(&self) -> Result<BoxedStream> {
        // QEMU's chardev server serves one client; a second connection waits
        // in the listen backlog until the first one closes.
        bhatti_protocol::transport::connect_unix(&self.paths.agent)
            .await
            .map_err(|e| {
                VmmError::io(
                    format!("connecting to the agent at {}", self.paths.agent.display()),
                    e,
                )
            })
    }

    async fn pause(&self) -> Result<()> {
        self.qmp("stop", None).await.map(|_| ())
    }

    async fn resume(&self) -> Result<()> {
        self.qmp("cont", None).await.map(|_| ())
    }

    async fn is_paused(&self) -> Result<bool> {
        let st = self.qmp("query-status", None).await?;
        Ok(!st.get("running").and_then(Value::as_bool).unwrap_or(false))
    }

    async fn snapshot(&self, kind: SnapshotKind, files: &SnapshotFiles) -> Result<()> {
        if kind == SnapshotKind::Diff {
            return Err(VmmError::Unsupported("diff snapshots"));
        }
        // Normally already paused by the caller; make sure of it, since a
        // running VM would keep writing to its disk after the memory image.
        match self.status().await?.as_str() {
            "running" => {
                self.qmp("stop", None).await?;
            }
            // Paused by an earlier snapshot: QEMU refuses to migrate again
            // from this state, and only `cont` leaves it. The guest runs
            // for the instant between the two commands; this snapshot then
            // captures that (consistent) state. Nothing runs the guest
            // after a snapshot, so a disk copy taken after `snapshot`
            // returns matches the memory image.
            "postmigrate" => {
                self.qmp("cont", None).await?;
                self.qmp("stop", None).await?;
            }
            _ => {}
        }
        self.migrate_to(&files.state)
            .await
            .map_err(|e| self.with_console(e))
    }

    async fn kill(&self) -> Result<()> {
        *self.qmp.lock().await = None;
        self.process.kill().await
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
        // A comma in a path must survive QEMU's option syntax.
        VmConfig {
            root_disk: "/d/root,1.ext4".into(),
            ..crate::test_vm_config("sb1")
        }
    }

    #[test]
    fn command_line() {
        let a = qemu_args(&cfg(), Accel::Tcg, &["-s".into()], false);
        let s = a.join(" ");
        assert!(s.contains("-M microvm,acpi=off"), "{s}");
        assert!(s.contains("-accel tcg,tb-size=256"), "{s}");
        assert!(s.contains("-cpu max"), "{s}");
        assert!(s.contains("file=/d/root,,1.ext4,"), "{s}");
        assert!(s.contains(",auto-read-only=off,"), "{s}");
        // Unconfined unless asked: no seccomp, no user switch.
        assert!(!s.contains("-sandbox") && !s.contains("-runas"), "{s}");
        let append = &a[a.iter().position(|x| x == "-append").unwrap() + 1];
        assert!(append.starts_with("console=ttyS0 "), "{append}");
        assert!(append.ends_with("bhatti.halt=reboot quiet"), "{append}");
        // root before config: /dev/vda is the root disk.
        assert!(s.find("drive=root").unwrap() < s.find("drive=config").unwrap());
        assert!(
            s.contains("ifname=tap0,script=no,downscript=no,vhost=off"),
            "{s}"
        );
        assert!(
            s.contains("path=/run/bhatti/sb1/agent.sock,server=on,wait=off"),
            "{s}"
        );
        assert!(s.contains("name=bhatti.agent"), "{s}");
        assert!(s.ends_with(" -s"), "{s}");
        // Data disks after the config disk, each with its serial.
        assert!(s.find("drive=config").unwrap() < s.find("drive=data0").unwrap());
        assert!(s.contains("id=data0,file=/v/a.ext4,"), "{s}");
        assert!(s.contains("drive=data0,serial=vol0"), "{s}");
        assert!(
            s.contains("file=/v/b.ext4,format=raw,if=none,auto-read-only=off,readonly=on"),
            "{s}"
        );
        assert!(s.contains("drive=data1,serial=vol1"), "{s}");
        let r = qemu_args(&cfg(), Accel::Kvm, &[], true);
        assert!(r.join(" ").contains("-accel kvm"));
        assert!(r.join(" ").contains("-cpu host"));
        assert_eq!(&r[r.len() - 2..], ["-incoming", "defer"]);
    }
}
