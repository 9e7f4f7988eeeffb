//! Named checkpoints and forks.
//!
//! A checkpoint is a directory the caller names (the daemon keeps them under
//! `<data_dir>/checkpoints/`):
//!
//! ```text
//! <dir>/meta.json     CheckpointMeta (0600: holds the source's token)
//! <dir>/snapshot/     state (+ memory): the VMM snapshot
//! <dir>/rootfs.ext4   the root disk as it was at the snapshot (reflink or
//!                     copy; on an XFS loop image it lives there instead)
//! ```
//!
//! Taking one: the guest syncs, the VM is paused, the snapshot is written
//! and the root disk cloned while the vCPUs stand still (so memory and disk
//! agree), then the VM resumes. Forking one: a new sandbox (fresh id, token,
//! MAC, IP, TAP, hostname) gets a clone of the disk and is restored from the
//! snapshot; the host connects with the checkpoint's token, sends
//! `reidentify` with the new identity, then reconnects with the new token.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bhatti_protocol::ReidentifyRequest;
use bhatti_vmm::{BackendKind, SnapshotFiles, SnapshotKind, VmConfig};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::{
    fsync_tree, now_ms, random_hex, remove_dir_if_exists, state, wait_for_agent, CreateSpec,
    Engine, EngineError, Inner, Live, Result, Sandbox, SandboxRecord, SandboxState, Slot,
};
use crate::storage::RootDisk;

/// The checkpoint's description file.
pub const CHECKPOINT_META: &str = "meta.json";
const META_VERSION: u32 = 1;

/// What a checkpoint holds, persisted as `<dir>/meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub version: u32,
    /// The sandbox it was taken from.
    pub source_id: String,
    /// The token the restored guest still expects until `reidentify`.
    pub token: String,
    pub spec: CreateSpec,
    pub backend: BackendKind,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// The source had a network device (a fork must have one too).
    pub networked: bool,
    pub snapshot: SnapshotFiles,
    pub disk: PathBuf,
    pub created_unix_ms: i64,
    /// Bytes of the snapshot files and the disk (apparent sizes).
    pub size_bytes: u64,
}

impl CheckpointMeta {
    pub fn load(dir: &Path) -> Result<CheckpointMeta> {
        let p = dir.join(CHECKPOINT_META);
        let bytes = std::fs::read(&p)
            .map_err(|e| EngineError::io(format!("reading {}", p.display()), e))?;
        let meta: CheckpointMeta = serde_json::from_slice(&bytes).map_err(|e| {
            EngineError::io(
                format!("parsing {}", p.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        if meta.version != META_VERSION {
            return Err(EngineError::Invalid(format!(
                "checkpoint format {} is not supported",
                meta.version
            )));
        }
        Ok(meta)
    }

    /// Removes a checkpoint: its directory and its disk (which may live
    /// elsewhere). Missing parts are fine.
    pub fn remove(dir: &Path) -> Result<()> {
        if let Ok(meta) = CheckpointMeta::load(dir) {
            match std::fs::remove_file(&meta.disk) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(EngineError::io(
                        format!("removing {}", meta.disk.display()),
                        e,
                    ))
                }
            }
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EngineError::io(format!("removing {}", dir.display()), e)),
        }
    }
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

impl Engine {
    /// Takes a checkpoint of a sandbox into `dir` (which must not exist).
    /// A stopped sandbox is woken first; it keeps running afterwards.
    pub async fn checkpoint(&self, id: &str, dir: &Path) -> Result<CheckpointMeta> {
        let dir = dir.to_path_buf();
        self.op(id, move |inner, slot, live| {
            Box::pin(async move { inner.do_checkpoint(slot, live, &dir).await })
        })
        .await
    }

    /// Creates sandbox `id` from the checkpoint in `dir`, with a fresh
    /// identity; `spec` supplies its name/hostname, env and files (cpus and
    /// memory come from the checkpoint). Returns once the new agent answers
    /// under its own token.
    pub async fn fork(&self, id: String, mut spec: CreateSpec, dir: &Path) -> Result<Sandbox> {
        let meta = CheckpointMeta::load(dir)?;
        if meta.backend != self.inner.cfg.backend.kind() {
            return Err(EngineError::Invalid(format!(
                "the checkpoint was made by {} and this engine runs {}",
                meta.backend,
                self.inner.cfg.backend.kind()
            )));
        }
        if meta.networked != self.inner.net.is_some() {
            return Err(EngineError::Invalid(
                "the checkpoint's network setup differs from this engine's".into(),
            ));
        }
        spec.cpus = meta.vcpus;
        spec.memory_mb = meta.memory_mib;
        spec.disk_mb = meta.spec.disk_mb;
        // The snapshot has a fixed device set: the same volumes, in order.
        // A read-write one would then be written by two guests (or hold a
        // state the snapshot's memory does not match): refused.
        if let Some(v) = meta.spec.volumes.iter().find(|v| !v.read_only) {
            return Err(EngineError::State {
                id,
                message: format!(
                    "the checkpoint's sandbox has a read-write volume at {}; it cannot be forked (only read-only volumes are shared with forks)",
                    v.mount
                ),
            });
        }
        spec.volumes = meta.spec.volumes.clone();
        self.create_inner(id, spec, move |inner, slot, live| {
            Box::pin(async move { inner.do_fork(slot, live, &meta).await })
        })
        .await
    }
}

impl Inner {
    async fn do_checkpoint(
        &self,
        slot: &Slot,
        live: &mut Live,
        dir: &Path,
    ) -> Result<CheckpointMeta> {
        if dir.exists() {
            return Err(EngineError::AlreadyExists(dir.display().to_string()));
        }
        self.wake(slot, live).await?;
        let id = slot.id.clone();
        // 1. Flush the guest's filesystems (best effort, as for snapshots).
        self.sync_guest(slot, live, "the checkpoint").await;
        let tmp = dir.with_extension("tmp");
        remove_dir_if_exists(&tmp);
        let key = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| random_hex(8));
        let disk = self.storage.checkpoint_disk_path(&key, dir);
        // A disk that lives inside the checkpoint dir is written into the
        // temp dir and arrives with its rename; others are written in place.
        let tmp_disk = match disk.strip_prefix(dir) {
            Ok(rel) => tmp.join(rel),
            Err(_) => disk.clone(),
        };
        let files = SnapshotFiles {
            state: dir.join("snapshot").join("state"),
            memory: (self.cfg.backend.kind() == BackendKind::Firecracker)
                .then(|| dir.join("snapshot").join("memory")),
        };
        let tmp_files = SnapshotFiles {
            state: tmp.join("snapshot").join("state"),
            memory: files
                .memory
                .as_ref()
                .map(|_| tmp.join("snapshot").join("memory")),
        };
        // 2. Paused: snapshot and disk clone see the same instant.
        let src_disk = live.rec.disk.path.clone();
        let vm = self.live_vm(slot, live)?;
        vm.pause().await.map_err(|source| EngineError::Vmm {
            id: id.clone(),
            context: "pausing for a checkpoint",
            source,
        })?;
        let started = std::time::Instant::now();
        let written = async {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(tmp.join("snapshot"))
                .map_err(|e| EngineError::io(format!("creating {}", tmp.display()), e))?;
            vm.snapshot(SnapshotKind::Full, &tmp_files)
                .await
                .map_err(|source| EngineError::Vmm {
                    id: id.clone(),
                    context: "writing the checkpoint",
                    source,
                })?;
            self.storage
                .clone_disk(&src_disk, &tmp_disk)
                .await
                .map_err(EngineError::from)?;
            Ok::<_, EngineError>(())
        }
        .await;
        // 3. Running again, whatever happened.
        let resumed = vm.resume().await;
        if let Err(e) = written {
            remove_dir_if_exists(&tmp);
            let _ = std::fs::remove_file(&tmp_disk);
            if let Err(re) = resumed {
                tracing::error!("resuming after a failed checkpoint: {re}");
            }
            return Err(e);
        }
        if let Err(source) = resumed {
            tracing::error!("resuming after the checkpoint: {source}");
        }
        let pause_ms = started.elapsed().as_millis() as u64;
        let size_bytes = file_size(&tmp_files.state)
            + tmp_files.memory.as_deref().map_or(0, file_size)
            + file_size(&tmp_disk);
        let meta = CheckpointMeta {
            version: META_VERSION,
            source_id: live.rec.id.clone(),
            token: live.rec.token.clone(),
            spec: live.rec.spec.clone(),
            backend: live.rec.backend,
            vcpus: live.rec.vm.vcpus,
            memory_mib: live.rec.vm.memory_mib,
            networked: live.rec.net.is_some(),
            snapshot: files,
            disk: disk.clone(),
            created_unix_ms: now_ms(),
            size_bytes,
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other);
        let (tmp2, tmp_disk2, dir2) = (tmp.clone(), tmp_disk.clone(), dir.to_path_buf());
        // fsyncs of GiBs run on the blocking pool, not the scheduler thread.
        let finished = super::off_thread(move || {
            let (tmp, tmp_disk, dir) = (&tmp2, &tmp_disk2, &dir2);
            let json = json?;
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(tmp.join(CHECKPOINT_META))?;
                f.write_all(&json)?;
            }
            fsync_tree(&tmp.join("snapshot"))?;
            fsync_tree(tmp)?;
            std::fs::File::open(tmp_disk)?.sync_all()?;
            std::fs::rename(tmp, dir)?;
            if let Some(parent) = dir.parent() {
                state::sync_dir(parent)?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = finished {
            remove_dir_if_exists(&tmp);
            let _ = std::fs::remove_file(&tmp_disk);
            return Err(EngineError::io("writing the checkpoint", e));
        }
        tracing::info!(pause_ms, size_bytes, dir = %dir.display(), "checkpoint taken");
        Ok(meta)
    }

    async fn do_fork(&self, slot: &Slot, live: &mut Live, meta: &CheckpointMeta) -> Result<()> {
        let t0 = std::time::Instant::now();
        // Phase times for profiling (`RUST_LOG=bhatti::timing=debug`).
        let ph = |phase: &str| {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            tracing::debug!(target: "bhatti::timing", op = "fork", phase, ms);
        };
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&slot.dir)
            .map_err(|e| EngineError::io(format!("creating {}", slot.dir.display()), e))?;
        // Not flushed: a crash before the fork ends leaves a dir that
        // recovery or orphan collection removes either way.
        self.save_as(slot, live, false)?;
        ph("saved");
        super::crash_point("fork:recorded");
        self.storage
            .clone_disk(&meta.disk, &live.rec.disk.path)
            .await?;
        super::crash_point("fork:disk");
        // A fork resumes from memory and never reads its drive (a fresh
        // boot later writes a real one).
        ph("disk");
        crate::storage::write_placeholder_drive(&live.rec.config_disk)?;
        ph("placeholder");
        self.prepare_start(live).await?;
        ph("prepared");
        let started = std::time::Instant::now();
        let vm = self
            .cfg
            .backend
            .restore(&live.rec.vm, &meta.snapshot)
            .await
            .map_err(|e| self.boot_error(&live.rec, "did not restore", &e.to_string()))?;
        super::crash_point("fork:restored");
        ph("restored");
        // A new sandbox env or secrets replace the snapshot's (lohar keeps
        // them in memory, never on a drive); otherwise the guest keeps what
        // it had (a checkpoint's fork keeps its source's secrets).
        let secrets = match self.secret_env(&slot.id) {
            Ok(s) => s,
            Err(e) => {
                if let Err(ke) = vm.kill().await {
                    tracing::warn!("killing the VMM: {ke}");
                }
                return Err(e);
            }
        };
        let env = (live.rec.spec.env != meta.spec.env || !secrets.is_empty()).then(|| {
            let mut env = live.rec.spec.env.clone();
            env.extend(secrets);
            env
        });
        let fail = |this: &Inner, rec: &SandboxRecord, why: String| {
            this.boot_error(rec, "did not take its new identity", &why)
        };
        let result = async {
            let old = wait_for_agent(vm.as_ref(), &meta.token, self.cfg.boot_timeout)
                .await
                .map_err(|e| fail(self, &live.rec, e.to_string()))?;
            ph("agent");
            let req = ReidentifyRequest {
                token: live.rec.token.clone(),
                hostname: live
                    .rec
                    .spec
                    .hostname
                    .clone()
                    .unwrap_or_else(|| live.rec.name.clone()),
                sandbox_id: live.rec.id.clone(),
                mac: live.rec.net.as_ref().map(|n| n.mac.clone()),
                address: live
                    .rec
                    .net
                    .as_ref()
                    .map(|n| format!("{}/{}", n.ip, n.prefix)),
                gateway: live.rec.net.as_ref().map(|n| n.gateway),
                entropy: Some(random_hex(64)),
                env,
            };
            let done = tokio::time::timeout(self.cfg.agent_timeout, old.reidentify(req))
                .await
                .map_err(|_| fail(self, &live.rec, "reidentify timed out".into()))?
                .map_err(|e| fail(self, &live.rec, e.to_string()))?;
            if !done.failed.is_empty() {
                tracing::warn!(failed = ?done.failed, "parts of the new identity failed");
            }
            super::crash_point("fork:reidentified");
            ph("reidentified");
            // The connection that asked stays authenticated (the new token
            // is for connections from now on): no second handshake.
            place_files(&old, &live.rec.spec.files, self.cfg.agent_timeout)
                .await
                .map_err(|e| fail(self, &live.rec, e))?;
            Ok::<_, EngineError>((old, done))
        }
        .await;
        let (client, done) = match result {
            Ok(c) => c,
            Err(e) => {
                if let Err(ke) = vm.kill().await {
                    tracing::warn!("killing the VMM: {ke}");
                }
                return Err(e);
            }
        };
        tracing::info!(
            pid = vm.pid(),
            ms = started.elapsed().as_millis() as u64,
            applied = ?done.applied,
            from = %meta.source_id,
            "forked from a checkpoint"
        );
        live.rec.boot_id = Some(client.hello().boot_id.clone());
        live.rec.pid = Some(vm.pid());
        live.vm = Some(vm);
        live.agent = Some(client);
        live.rec.spec.files.clear();
        self.set_state(slot, live, SandboxState::Running, None);
        Ok(())
    }
}

/// A fork's files, written through its agent as its first boot would
/// have placed them (same owners and modes); a restored guest never reads
/// a config drive.
async fn place_files(
    client: &bhatti_protocol::client::AgentClient,
    files: &[bhatti_protocol::guest_config::GuestFile],
    timeout: std::time::Duration,
) -> std::result::Result<(), String> {
    for f in files {
        let req = bhatti_protocol::WriteFileRequest {
            path: f.path.clone(),
            mode: f.mode,
            place: true,
        };
        let data = bytes::Bytes::from(f.content.clone());
        tokio::time::timeout(timeout, client.write_file(req, data))
            .await
            .map_err(|_| format!("placing {} timed out", f.path))?
            .map_err(|e| format!("placing {}: {e}", f.path))?;
    }
    Ok(())
}

impl Engine {
    /// Sets up sandbox `id` (record, network, VM config), runs `body` on it,
    /// and removes everything again when `body` fails.
    pub(super) async fn create_inner<F>(
        &self,
        id: String,
        spec: CreateSpec,
        body: F,
    ) -> Result<Sandbox>
    where
        F: for<'a> FnOnce(
                &'a Inner,
                &'a Slot,
                &'a mut Live,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>,
            > + Send
            + 'static,
    {
        spec.validate().map_err(EngineError::Invalid)?;
        super::validate_name(&id).map_err(EngineError::Invalid)?;
        let inner = self.inner.clone();
        // One task from the first step to the last (or to the cleanup of a
        // failure): a caller that goes away cannot leave half a sandbox.
        self.inner
            .run_to_end(async move { inner.create_to_end(id, spec, body).await })
            .await
    }
}

impl Inner {
    async fn create_to_end<F>(&self, id: String, spec: CreateSpec, body: F) -> Result<Sandbox>
    where
        F: for<'a> FnOnce(
                &'a Inner,
                &'a Slot,
                &'a mut Live,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>,
            > + Send
            + 'static,
    {
        let inner = self;
        if inner.slot(&id).is_ok() {
            return Err(EngineError::AlreadyExists(id));
        }
        let name = spec.name.clone().unwrap_or_else(|| id.clone());
        let dir = inner.sandboxes_dir.join(&id);
        let run_dir = inner.run_root.join(&id);
        let net = match &inner.net {
            Some(n) => Some(n.identity(&id, spec.network.as_ref())?),
            None if spec.network.is_some() => {
                return Err(EngineError::Invalid(
                    "this engine gives guests no network".into(),
                ))
            }
            None => None,
        };
        let mut kernel_args = Vec::new();
        if let Some(g) = &net {
            kernel_args.push(g.kernel_ip_arg());
        }
        if !inner.cfg.kernel_args.trim().is_empty() {
            kernel_args.push(inner.cfg.kernel_args.trim().to_owned());
        }
        let config_disk = dir.join("config.ext4");
        let vm = VmConfig {
            id: id.clone(),
            vcpus: spec.cpus,
            memory_mib: spec.memory_mb,
            kernel: inner.cfg.kernel.clone(),
            kernel_args: kernel_args.join(" "),
            root_disk: inner.storage.root_disk_path(&id, &dir),
            config_disk: Some(config_disk.clone()),
            net: net.as_ref().map(|n| bhatti_vmm::NetConfig {
                tap: n.tap.clone(),
                mac: n.mac.clone(),
            }),
            netns: inner
                .net
                .as_ref()
                .and_then(|n| n.netns().map(str::to_owned)),
            run_dir,
            data_disks: super::data_disks(&spec.volumes),
        };
        let rec = SandboxRecord {
            version: state::RECORD_VERSION,
            id: id.clone(),
            name: name.clone(),
            created_unix_ms: now_ms(),
            spec,
            token: random_hex(32),
            state: SandboxState::Creating,
            error: None,
            backend: inner.cfg.backend.kind(),
            disk: RootDisk {
                path: vm.root_disk.clone(),
                method: inner.storage.method(),
            },
            config_disk,
            net,
            vm,
            snapshot: None,
            boot_id: None,
            pid: None,
        };
        let slot = Arc::new(Slot {
            id: id.clone(),
            span: tracing::info_span!("sandbox", id = %id, name = %name),
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
        {
            let mut slots = inner
                .slots
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let taken = slots.values().any(|s| {
                s.view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .name
                    == name
            }) || slots.contains_key(&id);
            if taken {
                if let (Some(n), Some(g)) = (&inner.net, &live.rec.net) {
                    n.release(g);
                }
                return Err(EngineError::AlreadyExists(name));
            }
            slots.insert(id.clone(), slot.clone());
        }
        let span = slot.span.clone();
        let result = body(inner, &slot, &mut live).instrument(span.clone()).await;
        match result {
            Ok(()) => {
                span.in_scope(|| tracing::info!("sandbox created"));
                Ok(slot
                    .view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone())
            }
            Err(e) => {
                span.in_scope(|| tracing::warn!("create failed: {e}"));
                if let Err(ce) = inner.cleanup(&slot, &mut live).instrument(span).await {
                    tracing::error!(id = %id, "cleanup after a failed create: {ce}");
                }
                live.gone = true;
                inner
                    .slots
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
                Err(e)
            }
        }
    }
}
