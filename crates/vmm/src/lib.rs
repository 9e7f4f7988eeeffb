//! The VMM backends of bhatti behind one trait.
//!
//! A [`VmmBackend`] starts VMs (boot, restore from a snapshot, or adopt a
//! VMM process left running by a previous daemon) and returns a [`Vm`]
//! handle that pauses, resumes, snapshots and kills it and connects to its
//! guest agent. Two implementations:
//!
//! - [`firecracker`]: one Firecracker process per VM, driven over its HTTP
//!   API on a unix socket; agent over vsock; Full and Diff snapshots.
//! - [`qemu`]: QEMU `microvm` driven over QMP; agent over a virtio-serial
//!   port; snapshots by migration to a file. KVM when the host has hardware
//!   virtualization, TCG (software emulation) otherwise.
//!
//! [`probe`] looks at the host and picks one.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bhatti_protocol::transport::BoxedStream;
use serde::{Deserialize, Serialize};

pub mod cgroup;
pub mod console;
pub mod firecracker;
pub mod limits;
pub mod probe;
pub mod process;
pub mod qemu;

/// Guest vsock port lohar listens on under Firecracker.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Name of the virtio-serial port lohar listens on under QEMU.
pub const AGENT_SERIAL_NAME: &str = "bhatti.agent";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Firecracker,
    Qemu,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Firecracker => "firecracker",
            BackendKind::Qemu => "qemu",
        })
    }
}

/// Everything a backend needs to start one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    /// Sandbox id; used in process names and logs.
    pub id: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    /// ELF vmlinux (both VMMs boot the same file).
    pub kernel: PathBuf,
    /// Kernel arguments beyond what the backend adds itself (console,
    /// root device, agent transport).
    pub kernel_args: String,
    /// The VM's own copy-on-write root disk (`/dev/vda`).
    pub root_disk: PathBuf,
    /// Read-only config drive (`/dev/vdb`), if any.
    pub config_disk: Option<PathBuf>,
    pub net: Option<NetConfig>,
    /// Network namespace (a name under `/run/netns`) the VMM process runs
    /// in, so it can open a TAP that lives there. `None`: the daemon's own.
    #[serde(default)]
    pub netns: Option<String>,
    /// Per-VM runtime directory: API/QMP/agent sockets, console log, pid.
    pub run_dir: PathBuf,
    /// Extra block devices (volumes), after the root and config disks, in
    /// this order. A restore must list the same disks as the boot did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_disks: Vec<DataDisk>,
}

/// One extra block device of a VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataDisk {
    /// The image file on the host.
    pub path: PathBuf,
    pub read_only: bool,
    /// What the guest reads as the disk's serial (`/sys/block/vdX/serial`):
    /// QEMU's virtio-blk `serial=`, Firecracker's drive id. At most
    /// [`MAX_SERIAL_LEN`] of `[A-Za-z0-9_]`.
    pub serial: String,
}

/// Longest virtio-blk serial (the spec's `VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL_LEN: usize = 20;

impl DataDisk {
    /// The serial of the `index`th data disk: `vol0`, `vol1`, …
    pub fn serial_for(index: usize) -> String {
        format!("vol{index}")
    }

    /// Whether `s` can be a serial on both backends.
    pub fn valid_serial(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_SERIAL_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetConfig {
    /// Host TAP device, already created and attached to a bridge.
    pub tap: String,
    /// Guest MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// All of guest memory.
    Full,
    /// Only pages dirtied since the previous snapshot (Firecracker).
    Diff,
}

/// Where a snapshot's files are. Backends write exactly these paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFiles {
    /// Device/vCPU state (Firecracker) or the whole migration stream (QEMU).
    pub state: PathBuf,
    /// Guest memory (Firecracker). QEMU keeps memory inside `state`.
    pub memory: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("the VMM binary was not found: {0}")]
    BinaryNotFound(String),
    #[error("starting the VMM failed: {0}")]
    Spawn(String),
    #[error("the VMM API refused {what}: {message}")]
    Api { what: String, message: String },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("the VMM process exited: {0}")]
    Exited(String),
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, VmmError>;

/// A way to run VMs.
#[async_trait]
pub trait VmmBackend: Send + Sync + Debug {
    fn kind(&self) -> BackendKind;

    /// Whether [`Vm::snapshot`] accepts [`SnapshotKind::Diff`].
    fn supports_diff_snapshots(&self) -> bool {
        false
    }

    /// Boots a fresh VM from `cfg`. Returns once the VMM runs the guest;
    /// the caller waits for the agent.
    async fn boot(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>>;

    /// Starts a new VMM process from a snapshot, running. `cfg` supplies the
    /// runtime paths, disks and network of the restored VM.
    async fn restore(&self, cfg: &VmConfig, snapshot: &SnapshotFiles) -> Result<Box<dyn Vm>>;

    /// Takes over a VMM process started earlier (by a daemon that has since
    /// restarted), found through `cfg.run_dir`.
    async fn adopt(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>>;
}

/// One running (or paused) VM.
#[async_trait]
pub trait Vm: Send + Sync + Debug {
    /// The VMM process id.
    fn pid(&self) -> u32;

    /// A fresh byte stream to the guest agent (transport handshake done;
    /// the protocol `Hello` is the caller's).
    async fn connect_agent(&self) -> Result<BoxedStream>;

    /// Stops the vCPUs.
    async fn pause(&self) -> Result<()>;

    async fn resume(&self) -> Result<()>;

    /// Asks the VMM whether the vCPUs are stopped (recovery trusts this, not
    /// a record written before a crash).
    async fn is_paused(&self) -> Result<bool>;

    /// Writes a snapshot of a paused VM to `files` (new files; the caller
    /// renames them into place). The VM stays paused.
    async fn snapshot(&self, kind: SnapshotKind, files: &SnapshotFiles) -> Result<()>;

    /// Snapshots this handle has written (or attempted). Backends that take
    /// Diff snapshots count them: a Diff covers the pages dirtied since the
    /// previous snapshot of the process (or since its restore), so a caller
    /// that restored a VM can tell whether a Diff still follows that
    /// snapshot (the count is unchanged since the restore). Others: 0.
    fn snapshots_taken(&self) -> u64 {
        0
    }

    /// Ends the VMM process and waits for it to be gone.
    async fn kill(&self) -> Result<()>;

    /// True while the VMM process exists.
    fn is_alive(&self) -> bool;

    /// The guest's serial console output.
    fn console_log(&self) -> PathBuf;
}

/// The last `max` bytes of a console log, lossily decoded, for errors.
pub fn console_tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(e) => format!("(console log unavailable: {e})"),
    }
}

/// A VM config with every device, for the backends' unit tests.
#[cfg(test)]
pub(crate) fn test_vm_config(id: &str) -> VmConfig {
    VmConfig {
        id: id.into(),
        vcpus: 2,
        memory_mib: 256,
        kernel: "/k/vmlinux".into(),
        kernel_args: "quiet".into(),
        root_disk: "/d/root.ext4".into(),
        config_disk: Some("/d/cfg.ext4".into()),
        net: Some(NetConfig {
            tap: "tap0".into(),
            mac: "02:00:00:00:00:01".into(),
        }),
        netns: None,
        run_dir: "/run/bhatti/sb1".into(),
        data_disks: vec![
            DataDisk {
                path: "/v/a.ext4".into(),
                read_only: false,
                serial: DataDisk::serial_for(0),
            },
            DataDisk {
                path: "/v/b.ext4".into(),
                read_only: true,
                serial: DataDisk::serial_for(1),
            },
        ],
    }
}
