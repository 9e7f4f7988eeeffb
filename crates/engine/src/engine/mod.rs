//! The sandbox engine: creates, runs, pauses, snapshots, restores and
//! destroys sandboxes, and hands out agent connections to them.
//!
//! An [`Engine`] owns a data dir:
//!
//! ```text
//! <data_dir>/
//!   sandboxes/<id>/sandbox.json   the SandboxRecord (0600: holds the token)
//!   sandboxes/<id>/config.ext4    config drive (0600)
//!   sandboxes/<id>/rootfs.ext4    root disk (reflink and copy methods)
//!   sandboxes/<id>/snapshot/      last snapshot: `state` (+ `memory`)
//!   run/<id>/                     VMM run dir: sockets, console.log, vmm.pid
//!   reflink.img, reflink/         XFS loop image and its mount (xfs-loop)
//!   reflink/bases/, reflink/disks/<id>.ext4
//! ```
//!
//! Operations on one sandbox are serialized by a per-sandbox async mutex;
//! different sandboxes proceed in parallel. Each sandbox has a `tracing`
//! span (`sandbox{id, name}`) its operations run in. Listing never waits
//! for a sandbox's operation: it reads a published copy of its state.

mod agent;
mod checkpoint;
mod error;
mod orphans;
mod save_disk;
mod snapshot_chain;
mod state;
mod wake;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bhatti_protocol::guest_config::{AgentTransport, GuestConfig, NetworkConfig};
use bhatti_protocol::AgentClient;
use bhatti_vmm::process::VmmProcess;
use bhatti_vmm::{BackendKind, SnapshotFiles, Vm, VmmBackend};
use serde::Serialize;
use tracing::Instrument;

use crate::net::{NetSettings, Network};
use crate::storage::{DiskMethod, DiskStrategy, Storage, StorageConfig};

pub use agent::{wait_for_agent, WaitError};
pub use checkpoint::{CheckpointMeta, CHECKPOINT_META};
pub use error::{EngineError, Result};
pub use orphans::{crash_point, Orphans, CRASH_AT_ENV};
pub use state::{
    transition, validate_file_path, validate_files, validate_mount_point, validate_name,
    CreateSpec, Op, SandboxRecord, SandboxState, SnapshotRecord, VolumeMount, MAX_CONFIG_JSON,
    MAX_CPUS, MAX_DISK_MB, MAX_FILES, MAX_FILES_BYTES, MAX_MEMORY_MB, MAX_VOLUMES, MIN_DISK_MB,
    MIN_MEMORY_MB, RECORD_FILE,
};
pub use wake::WakeReport;

/// The data disks of `volumes`, in order, each with its serial.
pub fn data_disks(volumes: &[VolumeMount]) -> Vec<bhatti_vmm::DataDisk> {
    volumes
        .iter()
        .enumerate()
        .map(|(i, v)| bhatti_vmm::DataDisk {
            path: v.path.clone(),
            read_only: v.read_only,
            serial: bhatti_vmm::DataDisk::serial_for(i),
        })
        .collect()
}

/// What the guest mounts: the same order and serials as [`data_disks`].
fn guest_mounts(volumes: &[VolumeMount]) -> Vec<bhatti_protocol::guest_config::GuestMount> {
    volumes
        .iter()
        .enumerate()
        .map(|(i, v)| bhatti_protocol::guest_config::GuestMount {
            serial: bhatti_vmm::DataDisk::serial_for(i),
            path: v.mount.clone(),
            read_only: v.read_only,
        })
        .collect()
}

/// Name of the VMM console log in a run dir (both backends use it).
pub const CONSOLE_LOG: &str = "console.log";
/// Bytes of console log read for error messages.
const CONSOLE_TAIL_BYTES: usize = 4096;
/// Lines of console log kept in error messages.
const CONSOLE_TAIL_LINES: usize = 40;
/// The error of a sandbox whose VMM died on its own: it waits for an
/// explicit start (see `wake`).
pub const VMM_EXITED: &str = "the VMM process exited unexpectedly";
/// How often the engine looks for VMMs that died on their own.
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// Every how many of those it also asks each running VMM whether it
/// stalled (a QMP round trip each).
const STALL_CHECK_EVERY: u64 = 3;

/// Everything the engine needs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// Base root filesystem image, lohar installed.
    pub rootfs: PathBuf,
    pub backend: Arc<dyn VmmBackend>,
    /// Guest networking; `None` gives VMs no network device.
    pub net: Option<NetSettings>,
    pub disk_strategy: DiskStrategy,
    /// Apparent (sparse) size of the XFS loop image, when that is used.
    pub xfs_loop_size_mb: u64,
    /// How long a boot or restore may take until the agent answers.
    pub boot_timeout: Duration,
    /// How long reconnecting to a running VM's agent may take.
    pub agent_timeout: Duration,
    /// Extra kernel arguments for every VM, after the engine's own.
    pub kernel_args: String,
    /// Name servers written to the guests' resolv.conf.
    pub dns: Vec<IpAddr>,
    /// Secret environment entries of a sandbox, resolved for each boot
    /// (never stored by the engine).
    pub secrets: Option<Arc<dyn SecretSource>>,
}

/// Where a boot gets a sandbox's secret environment from: decrypted when a
/// guest boots, put on its config drive only until the guest has read it
/// (the drive is then rewritten without them), and never written to
/// `sandbox.json` or checkpoint metadata. A guest woken from memory keeps
/// what it had (memory snapshots hold guest memory, secrets included).
pub trait SecretSource: Send + Sync + std::fmt::Debug {
    fn env(&self, sandbox_id: &str) -> std::result::Result<BTreeMap<String, String>, String>;
}

impl EngineConfig {
    /// A config with defaults for everything but the essentials.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
        rootfs: impl Into<PathBuf>,
        backend: Arc<dyn VmmBackend>,
    ) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.into(),
            kernel: kernel.into(),
            rootfs: rootfs.into(),
            backend,
            net: Some(NetSettings::default()),
            disk_strategy: DiskStrategy::Auto,
            xfs_loop_size_mb: 64 << 10,
            boot_timeout: Duration::from_secs(60),
            agent_timeout: Duration::from_secs(10),
            kernel_args: String::new(),
            dns: Vec::new(),
            secrets: None,
        }
    }
}

/// A sandbox as callers see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub state: SandboxState,
    pub error: Option<String>,
    pub backend: BackendKind,
    pub cpus: u8,
    pub memory_mb: u32,
    pub disk_mb: Option<u64>,
    pub disk_method: DiskMethod,
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<String>,
    pub tap: Option<String>,
    /// The VMM's pid while one exists.
    pub pid: Option<u32>,
    pub created_unix_ms: i64,
    /// A snapshot it will resume from (cold sandboxes).
    pub has_snapshot: bool,
    pub paths: SandboxPaths,
}

/// Where a sandbox's files are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxPaths {
    /// `<data_dir>/sandboxes/<id>`
    pub dir: PathBuf,
    /// `<data_dir>/run/<id>`
    pub run_dir: PathBuf,
    pub root_disk: PathBuf,
    pub config_disk: PathBuf,
    pub console_log: PathBuf,
}

impl Sandbox {
    fn from_record(rec: &SandboxRecord, dir: &Path) -> Sandbox {
        Sandbox {
            id: rec.id.clone(),
            name: rec.name.clone(),
            state: rec.state,
            error: rec.error.clone(),
            backend: rec.backend,
            cpus: rec.spec.cpus,
            memory_mb: rec.spec.memory_mb,
            disk_mb: rec.spec.disk_mb,
            disk_method: rec.disk.method,
            ip: rec.net.as_ref().map(|n| n.ip),
            mac: rec.net.as_ref().map(|n| n.mac.clone()),
            tap: rec.net.as_ref().map(|n| n.tap.clone()),
            pid: rec.pid,
            created_unix_ms: rec.created_unix_ms,
            has_snapshot: rec.usable_snapshot().is_some(),
            paths: SandboxPaths {
                dir: dir.to_path_buf(),
                run_dir: rec.vm.run_dir.clone(),
                root_disk: rec.disk.path.clone(),
                config_disk: rec.config_disk.clone(),
                console_log: rec.vm.run_dir.join(CONSOLE_LOG),
            },
        }
    }
}

/// The sandbox engine. Cheap to clone (one shared state).
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: EngineConfig,
    storage: Storage,
    net: Option<Network>,
    sandboxes_dir: PathBuf,
    run_root: PathBuf,
    slots: std::sync::Mutex<HashMap<String, Arc<Slot>>>,
    /// What each restored VMM was restored from (Diff snapshots).
    chains: snapshot_chain::Chains,
    /// Every operation runs as a task of its own, tracked here: a caller
    /// that goes away (a dropped request, a cancelled timeout) cannot stop
    /// it half way, and [`Engine::shutdown`] waits for all of them.
    tasks: tokio_util::task::TaskTracker,
}

/// One sandbox: its published view and its serialized live state.
#[derive(Debug)]
struct Slot {
    id: String,
    dir: PathBuf,
    span: tracing::Span,
    view: std::sync::Mutex<Sandbox>,
    live: tokio::sync::Mutex<Live>,
}

#[derive(Debug)]
struct Live {
    rec: SandboxRecord,
    vm: Option<Box<dyn Vm>>,
    agent: Option<AgentClient>,
    /// Destroyed: operations that waited for the lock find nothing.
    gone: bool,
}

impl Engine {
    /// Sets up the data dir, the disk method and the guest network. Does
    /// not look at existing sandboxes: call [`Engine::recover`] for that.
    pub async fn new(cfg: EngineConfig) -> Result<Engine> {
        for (what, p) in [("kernel", &cfg.kernel), ("rootfs", &cfg.rootfs)] {
            if !p.is_file() {
                return Err(EngineError::Setup(format!(
                    "the {what} {} is not a file",
                    p.display()
                )));
            }
        }
        let sandboxes_dir = cfg.data_dir.join("sandboxes");
        let run_root = cfg.data_dir.join("run");
        for d in [&cfg.data_dir, &sandboxes_dir, &run_root] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| EngineError::io(format!("creating {}", d.display()), e))?;
        }
        let storage = Storage::new(StorageConfig {
            data_dir: cfg.data_dir.clone(),
            rootfs: cfg.rootfs.clone(),
            strategy: cfg.disk_strategy,
            xfs_loop_size_mb: cfg.xfs_loop_size_mb,
        })
        .await?;
        let net = match &cfg.net {
            Some(s) => Some(Network::setup(s.clone()).await?),
            None => None,
        };
        tracing::info!(
            data_dir = %cfg.data_dir.display(),
            backend = %cfg.backend.kind(),
            disks = %storage.method(),
            "engine ready"
        );
        let inner = Arc::new(Inner {
            cfg,
            storage,
            net,
            sandboxes_dir,
            run_root,
            slots: std::sync::Mutex::new(HashMap::new()),
            chains: Default::default(),
            tasks: tokio_util::task::TaskTracker::new(),
        });
        // Watches for VMMs that die on their own; ends with the engine.
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            for tick in 1u64.. {
                tokio::time::sleep(REAP_INTERVAL).await;
                let Some(inner) = weak.upgrade() else { break };
                inner
                    .reap_dead_vmms(tick.is_multiple_of(STALL_CHECK_EVERY))
                    .await;
            }
        });
        Ok(Engine { inner })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// Drops the storage's imported copies of base images not in `keep`
    /// (see `Storage::sweep_bases`).
    pub async fn sweep_bases(&self, keep: &[PathBuf]) {
        self.inner.storage.sweep_bases(keep).await;
    }

    /// The root disk method in use.
    pub fn disk_method(&self) -> DiskMethod {
        self.inner.storage.method()
    }

    pub fn network(&self) -> Option<&Network> {
        self.inner.net.as_ref()
    }

    /// All sandboxes, oldest first. Never waits for running operations.
    pub fn list(&self) -> Vec<Sandbox> {
        let mut v: Vec<Sandbox> = self
            .inner
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|s| {
                s.view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            })
            .collect();
        v.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        v
    }

    /// A sandbox by id or name. Never waits for running operations.
    pub fn get(&self, id_or_name: &str) -> Result<Sandbox> {
        let slot = self.inner.slot(id_or_name)?;
        let view = slot
            .view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok(view)
    }

    /// Creates a sandbox and boots it; returns once its agent answers. On
    /// failure nothing of it is left behind and the error carries the
    /// guest console's tail.
    pub async fn create(&self, spec: CreateSpec) -> Result<Sandbox> {
        self.create_as(new_sandbox_id(), spec).await
    }

    /// Like [`Engine::create`] with an id chosen by the caller (the daemon
    /// records the sandbox under it before the boot starts). The id must
    /// be a valid name and unused.
    pub async fn create_as(&self, id: String, spec: CreateSpec) -> Result<Sandbox> {
        self.create_inner(id, spec, |inner, slot, live| {
            Box::pin(async move { inner.do_create(slot, live).await })
        })
        .await
    }

    /// The agent connection of a sandbox, woken first: a paused sandbox is
    /// resumed, a stopped one restored (or booted from its disk). One
    /// long-lived connection per VM is shared by all callers and reopened
    /// when it has closed.
    pub async fn agent(&self, id: &str) -> Result<AgentClient> {
        if let Some(c) = self.agent_at_hand(id) {
            return Ok(c);
        }
        self.op(id, |inner, slot, live| {
            Box::pin(async move {
                inner.wake(slot, live).await?;
                inner.connected_agent(slot, live).await
            })
        })
        .await
    }

    /// The open connection of a running sandbox whose lock is free: the
    /// common case of a request, served without a task of its own.
    pub(super) fn agent_at_hand(&self, id: &str) -> Option<AgentClient> {
        let slot = self.inner.slot(id).ok()?;
        let live = slot.live.try_lock().ok()?;
        if live.gone || live.rec.state != SandboxState::Running {
            return None;
        }
        live.agent.clone().filter(|c| !c.is_closed())
    }

    /// The current agent connection if the sandbox runs and one is open;
    /// never wakes, never connects.
    pub async fn agent_if_connected(&self, id: &str) -> Option<AgentClient> {
        let slot = self.inner.slot(id).ok()?;
        let live = slot.live.lock().await;
        live.agent.clone().filter(|c| !c.is_closed())
    }

    /// Stops the vCPUs (the VMM stays, memory stays allocated).
    pub async fn pause(&self, id: &str) -> Result<Sandbox> {
        self.op(id, |inner, slot, live| {
            Box::pin(async move { inner.do_pause(slot, live).await })
        })
        .await?;
        self.get(id)
    }

    pub async fn resume(&self, id: &str) -> Result<Sandbox> {
        self.op(id, |inner, slot, live| {
            Box::pin(async move { inner.do_resume(slot, live).await })
        })
        .await?;
        self.get(id)
    }

    /// Cold: flushes the guest's filesystems, pauses, writes a snapshot to
    /// new files renamed into `<sandbox>/snapshot/`, and ends the VMM so
    /// its memory is freed. The sandbox is then `stopped` with a snapshot.
    pub async fn snapshot_to_disk(&self, id: &str) -> Result<Sandbox> {
        self.op(id, |inner, slot, live| {
            Box::pin(async move { inner.do_snapshot(slot, live).await })
        })
        .await?;
        self.get(id)
    }

    /// Starts a new VMM from the sandbox's snapshot and reconnects to the
    /// agent. A snapshot that fails to restore is flagged and never tried
    /// again; [`Engine::start`] then boots the sandbox from its disk.
    pub async fn restore(&self, id: &str) -> Result<Sandbox> {
        self.op(id, |inner, slot, live| {
            Box::pin(async move {
                transition(live.rec.state, Op::Restore).map_err(|m| inner.state_err(slot, m))?;
                inner.do_restore(slot, live).await
            })
        })
        .await?;
        self.get(id)
    }

    /// Makes a sandbox run: resumes a paused one, restores a stopped one
    /// from its snapshot, else boots it fresh from its disk.
    pub async fn start(&self, id: &str) -> Result<Sandbox> {
        self.op(id, |inner, slot, live| {
            Box::pin(async move {
                // An explicit start is what a VMM that died waits for.
                if live.rec.state == SandboxState::Failed
                    && live.rec.error.as_deref() == Some(VMM_EXITED)
                {
                    live.rec.error = None;
                }
                inner.wake(slot, live).await
            })
        })
        .await?;
        self.get(id)
    }

    /// Boots a stopped or failed sandbox from its disk, discarding its
    /// memory snapshot (a guest that will not restore, or a clean start).
    /// A running or paused sandbox is refused: stop it first.
    pub async fn start_fresh(&self, id: &str) -> Result<Sandbox> {
        self.op(id, |inner, slot, live| {
            Box::pin(async move {
                match live.rec.state {
                    SandboxState::Stopped | SandboxState::Failed => {}
                    other => {
                        return Err(inner.state_err(
                            slot,
                            format!("a fresh start needs a stopped sandbox, and it is {other}"),
                        ))
                    }
                }
                if let Err(e) = inner.boot_fresh(slot, live, "did not boot").await {
                    inner.set_state(slot, live, SandboxState::Failed, Some(e.to_string()));
                    return Err(e);
                }
                Ok(())
            })
        })
        .await?;
        self.get(id)
    }

    /// Removes a sandbox and everything it has on the host: VMM process,
    /// sockets, disks, TAP, run dir and state dir. Idempotent: `Ok(false)`
    /// when there was no such sandbox. When a step fails the record stays,
    /// so the destroy can be retried.
    pub async fn destroy(&self, id: &str) -> Result<bool> {
        let Ok(slot) = self.inner.slot(id) else {
            return Ok(false);
        };
        let inner = self.inner.clone();
        self.inner
            .run_to_end(async move {
                let mut live = slot.live.lock().await;
                if live.gone {
                    return Ok(false);
                }
                let span = slot.span.clone();
                inner
                    .cleanup(&slot, &mut live)
                    .instrument(span.clone())
                    .await?;
                live.gone = true;
                inner
                    .slots
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&slot.id);
                span.in_scope(|| tracing::info!("sandbox destroyed"));
                Ok(true)
            })
            .await
    }

    /// Loads every `<data_dir>/sandboxes/<id>/sandbox.json` not yet known:
    /// a sandbox whose VMM still runs is adopted (running or paused as it
    /// was); one whose VMM is gone becomes `stopped` (bootable from its
    /// snapshot or disk); one caught mid-create becomes `failed`.
    pub async fn recover(&self) -> Result<Vec<Sandbox>> {
        let inner = &self.inner;
        let entries = std::fs::read_dir(&inner.sandboxes_dir).map_err(|e| {
            EngineError::io(format!("reading {}", inner.sandboxes_dir.display()), e)
        })?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            if !dir.join(RECORD_FILE).is_file() {
                continue;
            }
            let rec = match SandboxRecord::load(&dir) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "skipping an unreadable sandbox record: {e}");
                    continue;
                }
            };
            if inner
                .slots
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains_key(&rec.id)
            {
                continue;
            }
            let id = rec.id.clone();
            let slot = Arc::new(Slot {
                id: id.clone(),
                span: tracing::info_span!("sandbox", id = %id, name = %rec.name),
                view: std::sync::Mutex::new(Sandbox::from_record(&rec, &dir)),
                dir,
                live: tokio::sync::Mutex::new(Live {
                    rec,
                    vm: None,
                    agent: None,
                    gone: false,
                }),
            });
            let mut live = slot.live.lock().await;
            inner
                .recover_one(&slot, &mut live)
                .instrument(slot.span.clone())
                .await;
            inner
                .slots
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id, slot.clone());
            found.push(
                slot.view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone(),
            );
        }
        Ok(found)
    }

    /// Closes every agent connection. VMs keep running; a new engine on the
    /// same data dir adopts them with [`Engine::recover`]. The bridge and
    /// the XFS mount stay.
    pub async fn shutdown(&self) {
        // Operations in flight (a boot, a snapshot) finish first: none is
        // left half done. A boot is bounded by boot_timeout.
        self.inner.tasks.close();
        let bound = self.inner.cfg.boot_timeout + Duration::from_secs(30);
        if tokio::time::timeout(bound, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = self.inner.tasks.len(),
                "engine operations still running after {bound:?}; closing connections anyway"
            );
        }
        let slots: Vec<Arc<Slot>> = self
            .inner
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for slot in slots {
            let mut live = slot.live.lock().await;
            if let Some(c) = live.agent.take() {
                c.close();
            }
        }
    }

    /// Runs `f` on a sandbox under its lock, in its span, as a task of its
    /// own (see [`Inner::run_to_end`]).
    async fn op<T, F>(&self, id: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(
                &'a Inner,
                &'a Slot,
                &'a mut Live,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>,
            > + Send
            + 'static,
    {
        let slot = self.inner.slot(id)?;
        let inner = self.inner.clone();
        let id = id.to_owned();
        self.inner
            .run_to_end(async move {
                let mut live = slot.live.lock().await;
                if live.gone {
                    return Err(EngineError::NotFound(id));
                }
                let span = slot.span.clone();
                f(&inner, &slot, &mut live).instrument(span).await
            })
            .await
    }
}

impl Inner {
    /// Runs `fut` as a tracked task and waits for its answer. Dropping the
    /// returned future does not stop the task: a state change, once begun,
    /// completes (or fails and cleans up) whatever happens to its caller.
    async fn run_to_end<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        match self.tasks.spawn(fut.in_current_span()).await {
            Ok(r) => r,
            Err(e) => Err(EngineError::Internal(format!(
                "an engine operation ended without an answer: {e}"
            ))),
        }
    }

    fn slot(&self, id_or_name: &str) -> Result<Arc<Slot>> {
        let slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = slots.get(id_or_name) {
            return Ok(s.clone());
        }
        slots
            .values()
            .find(|s| {
                s.view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .name
                    == id_or_name
            })
            .cloned()
            .ok_or_else(|| EngineError::NotFound(id_or_name.to_owned()))
    }

    fn state_err(&self, slot: &Slot, message: String) -> EngineError {
        EngineError::State {
            id: slot.id.clone(),
            message,
        }
    }

    /// Persists the record and publishes the view.
    fn save(&self, slot: &Slot, live: &Live) -> Result<()> {
        self.save_as(slot, live, true)
    }

    fn save_as(&self, slot: &Slot, live: &Live, durable: bool) -> Result<()> {
        *slot
            .view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Sandbox::from_record(&live.rec, &slot.dir);
        let saved = if durable {
            live.rec.save(&slot.dir)
        } else {
            live.rec.save_volatile(&slot.dir)
        };
        saved.map_err(|e| {
            EngineError::io(
                format!("saving {}", slot.dir.join(RECORD_FILE).display()),
                e,
            )
        })
    }

    fn set_state(&self, slot: &Slot, live: &mut Live, state: SandboxState, error: Option<String>) {
        if live.rec.state != state {
            tracing::info!(from = %live.rec.state, to = %state, "state");
        }
        // Pausing and resuming are the hot path of the thermal manager and
        // need no fsync (see SandboxRecord::save_volatile).
        let durable = !matches!(
            (live.rec.state, state),
            (SandboxState::Running, SandboxState::Paused)
                | (SandboxState::Paused, SandboxState::Running)
        ) || live.rec.error.is_some()
            || error.is_some();
        live.rec.state = state;
        live.rec.error = error;
        if let Err(e) = self.save_as(slot, live, durable) {
            tracing::error!("{e}");
        }
    }

    /// The config drive's contents; `secrets` joins the environment. Files
    /// and init are a first boot's only (the sandbox is still `creating`):
    /// a later fresh boot (restart, failed restore) neither places the
    /// files again nor reruns init.
    fn guest_config(&self, rec: &SandboxRecord, secrets: &BTreeMap<String, String>) -> GuestConfig {
        let first_boot = rec.state == SandboxState::Creating;
        let mut env = rec.spec.env.clone();
        env.extend(secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        GuestConfig {
            sandbox_id: rec.id.clone(),
            hostname: rec
                .spec
                .hostname
                .clone()
                .unwrap_or_else(|| rec.name.clone()),
            token: rec.token.clone(),
            env,
            files: if first_boot {
                rec.spec.files.clone()
            } else {
                Vec::new()
            },
            init: rec.spec.init.clone().filter(|_| first_boot),
            dns: match rec.net.as_ref() {
                Some(n) if !n.dns.is_empty() => n.dns.clone(),
                _ => self.cfg.dns.clone(),
            },
            dns_search: rec
                .net
                .as_ref()
                .map(|n| n.dns_search.clone())
                .unwrap_or_default(),
            agent: match rec.backend {
                BackendKind::Firecracker => AgentTransport::Vsock {
                    port: bhatti_vmm::AGENT_VSOCK_PORT,
                },
                BackendKind::Qemu => AgentTransport::Serial {
                    name: bhatti_vmm::AGENT_SERIAL_NAME.to_owned(),
                },
            },
            network: rec.net.as_ref().map(|n| NetworkConfig {
                address: format!("{}/{}", n.ip, n.prefix),
                gateway: Some(n.gateway),
                interface: "eth0".into(),
            }),
            user: rec.spec.user.clone(),
            workdir: rec.spec.workdir.clone(),
            mounts: guest_mounts(&rec.spec.volumes),
        }
    }

    async fn do_create(&self, slot: &Slot, live: &mut Live) -> Result<()> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&slot.dir)
            .map_err(|e| EngineError::io(format!("creating {}", slot.dir.display()), e))?;
        self.save(slot, live)?;
        let disk = self
            .storage
            .create_root_disk(
                &slot.id,
                &slot.dir,
                live.rec.spec.base.as_deref(),
                live.rec.spec.disk_mb,
            )
            .await?;
        live.rec.disk = disk;
        self.boot_fresh(slot, live, "did not boot").await
    }

    /// The secret environment for a boot of this sandbox.
    fn secret_env(&self, id: &str) -> Result<BTreeMap<String, String>> {
        match &self.cfg.secrets {
            Some(s) => s
                .env(id)
                .map_err(|e| EngineError::Invalid(format!("the sandbox's secrets: {e}"))),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Boots a VMM from the disk and waits for the agent.
    async fn boot_fresh(&self, slot: &Slot, live: &mut Live, what: &'static str) -> Result<()> {
        // The config drive for this boot, secrets included; rewritten
        // without them as soon as the guest has read it (below).
        let secrets = self.secret_env(&slot.id)?;
        crate::storage::write_config_drive(
            &live.rec.config_disk,
            &self.guest_config(&live.rec, &secrets),
        )
        .await?;
        self.prepare_start(live).await?;
        // A snapshot no longer matches the disk once the guest runs again.
        let stale = slot.dir.join("snapshot");
        let _ = off_thread(move || {
            remove_dir_if_exists(&stale);
            Ok(())
        })
        .await;
        live.rec.snapshot = None;
        live.rec.backend = self.cfg.backend.kind();
        let vm = self
            .cfg
            .backend
            .boot(&live.rec.vm)
            .await
            .map_err(|e| self.boot_error(&live.rec, what, &e.to_string()))?;
        let client = match wait_for_agent(vm.as_ref(), &live.rec.token, self.cfg.boot_timeout).await
        {
            Ok(c) => c,
            Err(e) => {
                let err = self.boot_error(&live.rec, what, &e.to_string());
                if let Err(ke) = vm.kill().await {
                    tracing::warn!("killing the VMM: {ke}");
                }
                return Err(err);
            }
        };
        tracing::info!(pid = vm.pid(), boot_id = %client.hello().boot_id, "booted");
        if !secrets.is_empty() {
            // The agent answers after it applied and unmounted the drive.
            let clean = self.guest_config(&live.rec, &BTreeMap::new());
            if let Err(e) = crate::storage::write_config_drive(&live.rec.config_disk, &clean).await
            {
                tracing::error!("rewriting the config drive without secrets: {e}");
            }
        }
        live.rec.boot_id = Some(client.hello().boot_id.clone());
        live.rec.pid = Some(vm.pid());
        live.vm = Some(vm);
        live.agent = Some(client);
        // Placed now and never again: the record need not carry them on.
        live.rec.spec.files.clear();
        self.set_state(slot, live, SandboxState::Running, None);
        Ok(())
    }

    /// Flushes the guest's filesystems, so the disk alone is consistent
    /// (best effort: a failure is logged, `before` says before what).
    async fn sync_guest(&self, slot: &Slot, live: &mut Live, before: &str) {
        let synced = match self.connected_agent(slot, live).await {
            Ok(client) => tokio::time::timeout(self.cfg.agent_timeout, client.sync())
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string())),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = synced {
            tracing::warn!("guest sync before {before} failed: {e}");
        }
    }

    /// TAP present, run dir present and without stale sockets.
    async fn prepare_start(&self, live: &mut Live) -> Result<()> {
        if let (Some(n), Some(g)) = (&self.net, &live.rec.net) {
            n.ensure_tap(g).await?;
        }
        let run_dir = &live.rec.vm.run_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(run_dir)
            .map_err(|e| EngineError::io(format!("creating {}", run_dir.display()), e))?;
        remove_sockets(run_dir);
        Ok(())
    }

    fn boot_error(&self, rec: &SandboxRecord, what: &'static str, reason: &str) -> EngineError {
        // Backends may already append the console to their errors; we show
        // it once, below the reason.
        let reason = reason
            .split_once("; console:\n")
            .map(|(r, _)| r)
            .unwrap_or(reason)
            .to_owned();
        EngineError::Boot {
            id: rec.id.clone(),
            what,
            reason,
            console: console_tail(&rec.vm.run_dir.join(CONSOLE_LOG)),
        }
    }

    /// Running, starting or resuming it as needed.
    async fn wake(&self, slot: &Slot, live: &mut Live) -> Result<()> {
        match live.rec.state {
            SandboxState::Running => Ok(()),
            SandboxState::Paused => self.do_resume(slot, live).await,
            // Its processes and memory are gone: booting it again from its
            // disk is the user's call (`start`), not a side effect of a
            // request, as for a snapshot that would not restore.
            SandboxState::Failed if live.rec.error.as_deref() == Some(VMM_EXITED) => {
                Err(self.state_err(
                    slot,
                    format!("{VMM_EXITED} (its processes and memory are lost); start it to boot it again from its disk"),
                ))
            }
            SandboxState::Stopped | SandboxState::Failed => self.do_start(slot, live).await,
            SandboxState::Creating => Err(self.state_err(slot, "it is still being created".into())),
        }
    }

    async fn do_start(&self, slot: &Slot, live: &mut Live) -> Result<()> {
        transition(live.rec.state, Op::Start).map_err(|m| self.state_err(slot, m))?;
        // A snapshot that did not restore is not retried, and the guest's
        // memory is not silently given up: booting from the disk instead
        // takes an explicit fresh start (`start_fresh`).
        if let Some(why) = live.rec.snapshot.as_ref().and_then(|s| s.failed.as_deref()) {
            let why = why.lines().next().unwrap_or_default().to_owned();
            return Err(self.state_err(
                slot,
                format!(
                    "its memory snapshot did not restore ({why}); start it fresh to boot from its disk"
                ),
            ));
        }
        if live.rec.usable_snapshot().is_some() {
            return self.do_restore(slot, live).await;
        }
        if let Err(e) = self.boot_fresh(slot, live, "did not boot").await {
            self.set_state(slot, live, SandboxState::Failed, Some(e.to_string()));
            return Err(e);
        }
        Ok(())
    }

    /// The VM handle of a sandbox that should have a live VMM; notices a
    /// VMM that died and marks the sandbox failed ([`VMM_EXITED`]).
    fn live_vm<'a>(&self, slot: &Slot, live: &'a mut Live) -> Result<&'a dyn Vm> {
        let alive = live.vm.as_ref().is_some_and(|vm| vm.is_alive());
        if !alive {
            let console = console_tail(&live.rec.vm.run_dir.join(CONSOLE_LOG));
            let reason = VMM_EXITED.to_string();
            tracing::warn!("{reason}");
            // Its handle still cleans up what the VMM left (a jail, a
            // cgroup, sockets).
            if let Some(dead) = live.vm.take() {
                tokio::spawn(async move {
                    if let Err(e) = dead.kill().await {
                        tracing::warn!("cleaning up after the VMM: {e}");
                    }
                });
            }
            if let Some(c) = live.agent.take() {
                c.close();
            }
            live.rec.pid = None;
            self.set_state(slot, live, SandboxState::Failed, Some(reason.clone()));
            return Err(EngineError::Boot {
                id: slot.id.clone(),
                what: "stopped",
                reason,
                console,
            });
        }
        Ok(live.vm.as_deref().expect("checked"))
    }

    async fn connected_agent(&self, slot: &Slot, live: &mut Live) -> Result<AgentClient> {
        if let Some(c) = &live.agent {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let token = live.rec.token.clone();
        let timeout = self.cfg.agent_timeout;
        let vm = self.live_vm(slot, live)?;
        let client = wait_for_agent(vm, &token, timeout)
            .await
            .map_err(|e| EngineError::Boot {
                id: slot.id.clone(),
                what: "has no agent",
                reason: e.to_string(),
                console: console_tail(&live.rec.vm.run_dir.join(CONSOLE_LOG)),
            })?;
        let boot_id = client.hello().boot_id.clone();
        if live.rec.boot_id.as_deref() != Some(boot_id.as_str()) {
            tracing::warn!(boot_id = %boot_id, "the guest rebooted since the last connection");
            live.rec.boot_id = Some(boot_id);
            self.save(slot, live)?;
        }
        tracing::debug!("agent reconnected");
        live.agent = Some(client.clone());
        Ok(client)
    }

    async fn do_pause(&self, slot: &Slot, live: &mut Live) -> Result<()> {
        let Some(to) =
            transition(live.rec.state, Op::Pause).map_err(|m| self.state_err(slot, m))?
        else {
            return Ok(());
        };
        let id = slot.id.clone();
        self.live_vm(slot, live)?
            .pause()
            .await
            .map_err(|source| EngineError::Vmm {
                id,
                context: "pausing",
                source,
            })?;
        self.set_state(slot, live, to, None);
        Ok(())
    }

    async fn do_resume(&self, slot: &Slot, live: &mut Live) -> Result<()> {
        let Some(to) =
            transition(live.rec.state, Op::Resume).map_err(|m| self.state_err(slot, m))?
        else {
            return Ok(());
        };
        let id = slot.id.clone();
        self.live_vm(slot, live)?
            .resume()
            .await
            .map_err(|source| EngineError::Vmm {
                id,
                context: "resuming",
                source,
            })?;
        self.set_state(slot, live, to, None);
        Ok(())
    }

    async fn do_snapshot(&self, slot: &Slot, live: &mut Live) -> Result<()> {
        let from = live.rec.state;
        if transition(from, Op::Snapshot)
            .map_err(|m| self.state_err(slot, m))?
            .is_none()
        {
            return Ok(());
        }
        let id = slot.id.clone();
        // 1. The guest flushes its filesystems, so the disk alone is
        // consistent too (the fallback when the snapshot cannot restore).
        if from == SandboxState::Paused {
            self.live_vm(slot, live)?
                .resume()
                .await
                .map_err(|source| EngineError::Vmm {
                    id: id.clone(),
                    context: "resuming to sync",
                    source,
                })?;
        }
        self.sync_guest(slot, live, "the snapshot").await;
        crash_point("stop:synced");
        // 2. Pause and write the snapshot into new files.
        let vm = self.live_vm(slot, live)?;
        vm.pause().await.map_err(|source| EngineError::Vmm {
            id: id.clone(),
            context: "pausing",
            source,
        })?;
        crash_point("stop:paused");
        let tmp = slot.dir.join("snapshot.tmp");
        let fin = slot.dir.join("snapshot");
        let old = slot.dir.join("snapshot.old");
        remove_dir_if_exists(&tmp);
        remove_dir_if_exists(&old);
        let files = |d: &Path| SnapshotFiles {
            state: d.join("state"),
            memory: (self.cfg.backend.kind() == BackendKind::Firecracker).then(|| d.join("memory")),
        };
        let started = std::time::Instant::now();
        let written = async {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&tmp)
                .map_err(|e| EngineError::io(format!("creating {}", tmp.display()), e))?;
            // Full, or a Diff merged into a copy of the previous image.
            let kind = self
                .write_chained_snapshot(&id, vm, &files(&tmp))
                .await
                .map_err(|source| EngineError::Vmm {
                    id: id.clone(),
                    context: "writing the snapshot",
                    source,
                })?;
            let t = tmp.clone();
            off_thread(move || fsync_tree(&t))
                .await
                .map_err(|e| EngineError::io(format!("syncing {}", tmp.display()), e))?;
            Ok::<_, EngineError>(kind)
        }
        .await;
        let kind = match written {
            Ok(kind) => kind,
            Err(e) => {
                let t = tmp.clone();
                let _ = off_thread(move || {
                    remove_dir_if_exists(&t);
                    Ok(())
                })
                .await;
                if from == SandboxState::Running {
                    if let Err(re) = vm.resume().await {
                        tracing::error!("resuming after a failed snapshot: {re}");
                    }
                }
                return Err(e);
            }
        };
        crash_point("stop:written");
        // 3. Into place: the previous snapshot (which may back a restored
        // VM's memory) is moved aside, never overwritten.
        let (f, o, t, d) = (fin.clone(), old.clone(), tmp.clone(), slot.dir.clone());
        let moved = off_thread(move || {
            if f.exists() {
                std::fs::rename(&f, &o)?;
            }
            std::fs::rename(&t, &f)?;
            state::sync_dir(&d)
        })
        .await;
        if let Err(e) = moved {
            if from == SandboxState::Running {
                let _ = vm.resume().await;
            }
            return Err(EngineError::io("renaming the snapshot into place", e));
        }
        let write_ms = started.elapsed().as_millis() as u64;
        crash_point("stop:renamed");
        // 4. End the VMM: its memory is freed.
        if let Some(c) = live.agent.take() {
            c.close();
        }
        let vm = live.vm.take().expect("live vm");
        if let Err(source) = vm.kill().await {
            live.vm = Some(vm);
            return Err(EngineError::Vmm {
                id,
                context: "ending the VMM after the snapshot",
                source,
            });
        }
        crash_point("stop:killed");
        self.forget_chain(&slot.id);
        // A memory image of GiBs: unlinking it is work for the blocking pool.
        let o = old.clone();
        let _ = off_thread(move || {
            remove_dir_if_exists(&o);
            Ok(())
        })
        .await;
        remove_sockets(&live.rec.vm.run_dir);
        live.rec.pid = None;
        live.rec.snapshot = Some(SnapshotRecord {
            files: files(&fin),
            kind,
            created_unix_ms: now_ms(),
            failed: None,
        });
        tracing::info!(write_ms, ?kind, "snapshot written, VMM ended");
        self.set_state(slot, live, SandboxState::Stopped, None);
        Ok(())
    }

    async fn do_restore(&self, slot: &Slot, live: &mut Live) -> Result<()> {
        let Some(snap) = live.rec.usable_snapshot().cloned() else {
            return Err(self.state_err(slot, "it has no usable snapshot".into()));
        };
        if live.rec.backend != self.cfg.backend.kind() {
            let why = format!("the snapshot was made by {}", live.rec.backend);
            return Err(self.flag_snapshot(slot, live, why));
        }
        self.prepare_start(live).await?;
        let started = std::time::Instant::now();
        let vm = match self.cfg.backend.restore(&live.rec.vm, &snap.files).await {
            Ok(vm) => vm,
            Err(e) => {
                let err = self.boot_error(&live.rec, "did not restore", &e.to_string());
                self.flag_snapshot(slot, live, err.to_string());
                return Err(err);
            }
        };
        let client = match wait_for_agent(vm.as_ref(), &live.rec.token, self.cfg.boot_timeout).await
        {
            Ok(c) => c,
            Err(e) => {
                let err = self.boot_error(&live.rec, "did not restore", &e.to_string());
                if let Err(ke) = vm.kill().await {
                    tracing::warn!("killing the VMM: {ke}");
                }
                self.flag_snapshot(slot, live, err.to_string());
                return Err(err);
            }
        };
        let boot_id = client.hello().boot_id.clone();
        if live.rec.boot_id.as_deref() != Some(boot_id.as_str()) {
            tracing::warn!(boot_id = %boot_id, "the restored guest has a new boot id");
        }
        tracing::info!(
            pid = vm.pid(),
            ms = started.elapsed().as_millis() as u64,
            "restored"
        );
        live.rec.boot_id = Some(boot_id);
        live.rec.pid = Some(vm.pid());
        self.note_restored(&slot.id, vm.as_ref(), &snap.files);
        // The snapshot is used up: the disk moves on from here. Its files
        // stay until the next snapshot (a VMM may map its memory file).
        live.rec.snapshot = None;
        live.vm = Some(vm);
        live.agent = Some(client);
        self.set_state(slot, live, SandboxState::Running, None);
        Ok(())
    }

    /// Marks the snapshot as not restorable; the sandbox stays stopped.
    fn flag_snapshot(&self, slot: &Slot, live: &mut Live, why: String) -> EngineError {
        tracing::warn!("snapshot flagged as failed: {why}");
        if let Some(s) = live.rec.snapshot.as_mut() {
            s.failed = Some(why.clone());
        }
        live.rec.pid = None;
        self.set_state(slot, live, SandboxState::Stopped, Some(why.clone()));
        self.state_err(slot, why)
    }

    /// Removes everything of a sandbox. Every step is tried; the record is
    /// removed only when all others succeeded.
    async fn cleanup(&self, slot: &Slot, live: &mut Live) -> Result<()> {
        let mut errors: Vec<String> = Vec::new();
        if let Some(c) = live.agent.take() {
            c.close();
        }
        let run_dir = live.rec.vm.run_dir.clone();
        if let Some(vm) = live.vm.take() {
            if let Err(e) = vm.kill().await {
                errors.push(format!("ending the VMM: {e}"));
                live.vm = Some(vm);
            }
        } else {
            // A VMM no handle knows of (a crash mid-operation).
            self.end_stray(&live.rec.vm).await;
        }
        if let (Some(n), Some(g)) = (&self.net, &live.rec.net) {
            match n.remove_tap(&g.tap).await {
                Ok(()) => n.release(g),
                Err(e) => errors.push(e.to_string()),
            }
        }
        // Disks and snapshots of GiBs: removed on the blocking pool.
        let disk = live.rec.disk.path.clone();
        let dir = slot.dir.clone();
        let remove_all = |d: &Path| match std::fs::remove_dir_all(d) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("removing {}: {e}", d.display())),
        };
        let removed = off_thread(move || {
            let mut errors = Vec::new();
            if let Err(e) = std::fs::remove_file(&disk) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errors.push(format!("removing {}: {e}", disk.display()));
                }
            }
            errors.extend(remove_all(&run_dir).err());
            if errors.is_empty() {
                errors.extend(remove_all(&dir).err());
            }
            Ok(errors)
        })
        .await;
        match removed {
            Ok(e) => errors.extend(e),
            Err(e) => errors.push(e.to_string()),
        }
        if errors.is_empty() {
            return Ok(());
        }
        let message = format!("cleanup incomplete: {}", errors.join("; "));
        live.rec.error = Some(message.clone());
        let _ = self.save(slot, live);
        Err(self.state_err(slot, message))
    }

    async fn recover_one(&self, slot: &Slot, live: &mut Live) {
        if let (Some(n), Some(g)) = (&self.net, &live.rec.net) {
            if !n.reserve(g) {
                tracing::warn!(ip = %g.ip, "recovered address is outside the subnet or taken twice");
            }
            if let Err(e) = n.ensure_tap(g).await {
                tracing::warn!("recreating the TAP: {e}");
            }
        }
        match live.rec.state {
            SandboxState::Running | SandboxState::Paused => {
                let adopted = if live.rec.backend == self.cfg.backend.kind() {
                    self.cfg
                        .backend
                        .adopt(&live.rec.vm)
                        .await
                        .map_err(|e| e.to_string())
                } else {
                    Err(format!("it ran under {}", live.rec.backend))
                };
                match adopted {
                    Ok(vm) => {
                        // The record may predate a pause or resume the
                        // crash cut off: the VMM knows.
                        match vm.is_paused().await {
                            Ok(paused) => {
                                live.rec.state = if paused {
                                    SandboxState::Paused
                                } else {
                                    SandboxState::Running
                                };
                            }
                            Err(e) => tracing::warn!("asking the adopted VMM for its state: {e}"),
                        }
                        tracing::info!(pid = vm.pid(), state = %live.rec.state, "adopted the running VMM");
                        live.rec.pid = Some(vm.pid());
                        live.vm = Some(vm);
                        let _ = self.save(slot, live);
                    }
                    Err(e) => {
                        // A VMM we cannot drive must not run on beside the
                        // one the next start makes on the same disk.
                        self.end_stray(&live.rec.vm).await;
                        live.rec.pid = None;
                        self.set_state(
                            slot,
                            live,
                            SandboxState::Stopped,
                            Some(format!("its VMM could not be adopted at recovery: {e}")),
                        );
                    }
                }
            }
            SandboxState::Creating => {
                self.end_stray(&live.rec.vm).await;
                live.rec.pid = None;
                self.set_state(
                    slot,
                    live,
                    SandboxState::Failed,
                    Some("the engine stopped while creating it".into()),
                );
            }
            SandboxState::Stopped | SandboxState::Failed => {
                self.end_stray(&live.rec.vm).await;
                *slot
                    .view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Sandbox::from_record(&live.rec, &slot.dir);
            }
        }
    }
}

impl Inner {
    /// Marks failed every sandbox whose VMM died on its own (killed, OOM,
    /// crashed) since it was last used, so its state tells at once rather
    /// than at its next operation. A sandbox busy with an operation is
    /// skipped: that operation notices.
    ///
    /// With `stalls`, also continues a running guest its VMM paused by
    /// itself: QEMU stops a VM whose disk write failed with ENOSPC (the
    /// data disk is full) and retries the write on `cont`, so the guest
    /// stalls, loses nothing, and carries on once space is freed.
    async fn reap_dead_vmms(&self, stalls: bool) {
        let slots: Vec<Arc<Slot>> = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for slot in slots {
            let Ok(mut live) = slot.live.try_lock() else {
                continue;
            };
            let dead = !live.gone
                && matches!(live.rec.state, SandboxState::Running | SandboxState::Paused)
                && live.vm.as_ref().is_some_and(|vm| !vm.is_alive());
            if dead {
                let _ = slot
                    .span
                    .in_scope(|| self.live_vm(&slot, &mut live).map(|_| ()));
                continue;
            }
            if !stalls || live.rec.state != SandboxState::Running {
                continue;
            }
            let Some(vm) = live.vm.as_ref() else { continue };
            if let Ok(true) = vm.is_paused().await {
                slot.span.in_scope(|| {
                    tracing::warn!("the VMM paused the guest (a disk write failed: is the data disk full?); continuing it")
                });
                if let Err(e) = vm.resume().await {
                    slot.span
                        .in_scope(|| tracing::warn!("continuing the guest: {e}"));
                }
            }
        }
    }

    /// Ends a VMM no handle knows of: through the backend when it can take
    /// it over (so its jail and cgroup go too), else by its pid file.
    async fn end_stray(&self, vm: &bhatti_vmm::VmConfig) {
        match self.cfg.backend.adopt(vm).await {
            Ok(stray) => {
                tracing::warn!(pid = stray.pid(), "ending a stray VMM");
                if let Err(e) = stray.kill().await {
                    tracing::warn!("ending a stray VMM: {e}");
                }
            }
            Err(_) => kill_stray(&vm.run_dir).await,
        }
    }
}

async fn kill_stray(run_dir: &Path) {
    if let Ok(stray) = VmmProcess::adopt(run_dir) {
        tracing::warn!(pid = stray.pid(), "ending a stray VMM");
        let _ = stray.kill().await;
    }
}

/// The last lines of a console log.
pub fn console_tail(path: &Path) -> String {
    let tail = bhatti_vmm::console_tail(path, CONSOLE_TAIL_BYTES);
    if tail.trim().is_empty() {
        return "(the console log is empty)".into();
    }
    let lines: Vec<&str> = tail.lines().collect();
    let start = lines.len().saturating_sub(CONSOLE_TAIL_LINES);
    lines[start..].join("\n")
}

/// Runs blocking file work (fsync, rename, unlink of big files) on the
/// blocking pool: on the daemon's one scheduler thread it would stall every
/// other request for as long as a GiB takes to sync.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(format!("a blocking task failed: {e}")))?
}

fn remove_dir_if_exists(d: &Path) {
    match std::fs::remove_dir_all(d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("removing {}: {e}", d.display()),
    }
}

/// Removes unix sockets (left by a VMM that has ended) from a run dir.
fn remove_sockets(run_dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_socket()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// fsyncs every file in a directory, then the directory.
fn fsync_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    state::sync_dir(dir)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A fresh sandbox id: `sb-` and 12 random hex digits.
pub fn new_sandbox_id() -> String {
    format!("sb-{}", random_hex(6))
}

/// `n` random bytes from the kernel, hex-encoded.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    // The OS's generator (seeded once per thread); no file to fail on.
    rand::fill(buf.as_mut_slice());
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_hex_shape() {
        let t = random_hex(32);
        assert_eq!(t.len(), 64);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(t, random_hex(32));
    }

    #[test]
    fn console_tail_keeps_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        let t = console_tail(&p);
        assert!(t.ends_with("line 99"), "{t}");
        assert_eq!(t.lines().count(), CONSOLE_TAIL_LINES);
        assert!(console_tail(&dir.path().join("missing")).contains("unavailable"));
    }
}
