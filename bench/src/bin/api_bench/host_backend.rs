//! `HostProcessBackend`: a bench-only [`VmmBackend`] whose "VM" is a `lohar
//! serve --unix` process on the host (the agent's test mode). The engine,
//! the store, the API and the protocol all run as in production; only the
//! VMM and the guest kernel are missing, so what is measured on top of the
//! raw agent calls is the orchestrator's own overhead.
//!
//! The token: the engine saves the sandbox record (`sandbox.json`, next to
//! the config drive, token included) before it boots the VM, so `boot`
//! reads it from there. Pause/resume are SIGSTOP/SIGCONT on lohar, kill is
//! SIGKILL; snapshots are not supported.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use async_trait::async_trait;
use bhatti::config::{Config, DiskStrategy};
use bhatti_protocol::transport::BoxedStream;
use bhatti_protocol::AgentClient;
use bhatti_vmm::{BackendKind, SnapshotFiles, SnapshotKind, Vm, VmConfig, VmmBackend, VmmError};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[derive(Debug, Clone)]
pub struct HostProcessBackend {
    pub lohar: PathBuf,
    /// Every lohar started, for the final cleanup.
    pub pids: Arc<Mutex<Vec<u32>>>,
}

impl HostProcessBackend {
    pub fn new(lohar: PathBuf) -> Self {
        HostProcessBackend {
            lohar,
            pids: Arc::default(),
        }
    }

    /// SIGKILLs every lohar still running (cleanup on any exit path).
    pub fn kill_all(&self) {
        for pid in self.pids.lock().expect("pids").drain(..) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// The agent socket of a run dir.
pub fn agent_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("agent.sock")
}

/// The token the engine gave sandbox `cfg.id` (from its saved record).
pub fn token_of(cfg: &VmConfig) -> std::io::Result<String> {
    let dir = cfg
        .config_disk
        .as_deref()
        .and_then(Path::parent)
        .ok_or_else(|| std::io::Error::other("no config drive, so no sandbox dir"))?;
    let bytes = std::fs::read(dir.join(bhatti::engine::RECORD_FILE))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
    v["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| std::io::Error::other("the sandbox record has no token"))
}

/// `explicit`, or the `lohar` next to this program; it must exist.
pub fn lohar_path(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let lohar = match explicit {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .context("no parent dir")?
            .join("lohar"),
    };
    anyhow::ensure!(lohar.is_file(), "no lohar at {}", lohar.display());
    Ok(lohar)
}

/// A benchmark daemon's config on `dir` for this backend: placeholder
/// kernel and rootfs files (the engine insists on them; lohar needs
/// neither), disks copied, no network.
pub fn host_config(dir: &Path) -> anyhow::Result<Config> {
    let kernel = dir.join("vmlinux.none");
    std::fs::write(&kernel, b"no kernel: host-process backend")?;
    let rootfs = dir.join("rootfs.none");
    std::fs::File::create(&rootfs)?.set_len(1 << 20)?;
    let mut config = crate::daemon::bench_config(dir, &kernel, &rootfs);
    config.vm.disk_strategy = DiskStrategy::Copy;
    config.network.enabled = false;
    Ok(config)
}

/// A second agent connection, straight to the lohar the engine started
/// for sandbox `id` of the daemon on `data_dir` (the raw floor).
pub async fn raw_agent(data_dir: &Path, id: &str) -> anyhow::Result<AgentClient> {
    let run_dir = data_dir.join("run").join(id);
    let vmcfg = VmConfig {
        id: id.to_owned(),
        vcpus: 1,
        memory_mib: 0,
        kernel: PathBuf::new(),
        kernel_args: String::new(),
        root_disk: PathBuf::new(),
        config_disk: Some(data_dir.join("sandboxes").join(id).join("config.ext4")),
        net: None,
        netns: None,
        run_dir: run_dir.clone(),
        data_disks: Vec::new(),
    };
    let token = token_of(&vmcfg).context("the sandbox's agent token")?;
    let sock = agent_socket(&run_dir);
    let stream = tokio::net::UnixStream::connect(&sock)
        .await
        .with_context(|| format!("connecting to {}", sock.display()))?;
    Ok(AgentClient::connect(stream, &token).await?)
}

#[async_trait]
impl VmmBackend for HostProcessBackend {
    fn kind(&self) -> BackendKind {
        // Only decides the agent transport written to the (unused) config
        // drive; lohar here listens on a unix socket.
        BackendKind::Qemu
    }

    async fn boot(&self, cfg: &VmConfig) -> bhatti_vmm::Result<Box<dyn Vm>> {
        let token = token_of(cfg).map_err(|e| VmmError::io("reading the sandbox token", e))?;
        let sock = agent_socket(&cfg.run_dir);
        let _ = std::fs::remove_file(&sock);
        let console = cfg.run_dir.join(bhatti::engine::CONSOLE_LOG);
        let log = std::fs::File::create(&console)
            .map_err(|e| VmmError::io(format!("creating {}", console.display()), e))?;
        let child = Command::new(&self.lohar)
            .args(["serve", "--unix"])
            .arg(&sock)
            .args(["--token", &token])
            .env("LOHAR_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| VmmError::Spawn(format!("{}: {e}", self.lohar.display())))?;
        let pid = child.id();
        self.pids.lock().expect("pids").push(pid);
        let _ = std::fs::write(cfg.run_dir.join("vmm.pid"), pid.to_string());
        Ok(Box::new(HostVm {
            pid,
            child: Mutex::new(child),
            sock,
            console,
        }))
    }

    async fn restore(
        &self,
        _cfg: &VmConfig,
        _snapshot: &SnapshotFiles,
    ) -> bhatti_vmm::Result<Box<dyn Vm>> {
        Err(VmmError::Unsupported("restore"))
    }

    async fn adopt(&self, _cfg: &VmConfig) -> bhatti_vmm::Result<Box<dyn Vm>> {
        Err(VmmError::Unsupported("adopt"))
    }
}

#[derive(Debug)]
pub struct HostVm {
    pid: u32,
    child: Mutex<Child>,
    sock: PathBuf,
    console: PathBuf,
}

impl HostVm {
    fn signal(&self, s: Signal) -> bhatti_vmm::Result<()> {
        kill(Pid::from_raw(self.pid as i32), s).map_err(|e| {
            VmmError::io(
                format!("{s} to lohar {}", self.pid),
                std::io::Error::from(e),
            )
        })
    }
}

#[async_trait]
impl Vm for HostVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn connect_agent(&self) -> bhatti_vmm::Result<BoxedStream> {
        bhatti_protocol::transport::connect_unix(&self.sock)
            .await
            .map_err(|e| VmmError::io(format!("connecting to {}", self.sock.display()), e))
    }

    async fn pause(&self) -> bhatti_vmm::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    async fn resume(&self) -> bhatti_vmm::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    async fn is_paused(&self) -> bhatti_vmm::Result<bool> {
        // /proc/<pid>/stat's state field: T when stopped by a signal.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .map_err(|e| bhatti_vmm::VmmError::io("reading the process state", e))?;
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        Ok(state == Some('T'))
    }

    async fn snapshot(
        &self,
        _kind: SnapshotKind,
        _files: &SnapshotFiles,
    ) -> bhatti_vmm::Result<()> {
        Err(VmmError::Unsupported("snapshot"))
    }

    async fn kill(&self) -> bhatti_vmm::Result<()> {
        let mut child = self.child.lock().expect("child");
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
        }
        child
            .wait()
            .map_err(|e| VmmError::io(format!("waiting for lohar {}", self.pid), e))?;
        Ok(())
    }

    fn is_alive(&self) -> bool {
        matches!(self.child.lock().expect("child").try_wait(), Ok(None))
    }

    fn console_log(&self) -> PathBuf {
        self.console.clone()
    }
}
