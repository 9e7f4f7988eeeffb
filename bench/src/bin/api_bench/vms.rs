//! Part 2: the API with real VMs, beside the raw VMM doing the same thing.
//!
//! Engine side: an in-process daemon over the backend `[vm]` picks (QEMU
//! here), network in a netns of our own, thermal timers short
//! (`warm_after_secs = 1`) so a sandbox goes warm by itself and we poll
//! `GET /sandboxes/{id}` until it is. Raw side: the same backend driven
//! directly (boot + agent handshake + exec, cont + exec, restore +
//! handshake + exec), one VM at a time. Everything is removed at the end,
//! on errors too: VMMs (by their pid files), the XFS loop mount, the netns,
//! the temp dirs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bhatti::config::{Backend, DiskStrategy};
use bhatti_bench::{Recorder, Stats};
use bhatti_protocol::guest_config::{AgentTransport, GuestConfig};
use bhatti_protocol::AgentClient;
use bhatti_vmm::{BackendKind, SnapshotFiles, SnapshotKind, Vm, VmConfig, VmmBackend};

use crate::http::Conn;
use crate::{agent_exec, bench_config, create_sandbox, create_user, Args, Daemon, Line};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

pub struct Artifacts {
    kernel: PathBuf,
    rootfs: PathBuf,
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

/// Removes what part 2 leaves on the host, whatever happened.
struct Cleanup {
    data: PathBuf,
    raw: PathBuf,
    ns: String,
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
fn kill_vmm_of(run_dir: &Path) {
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

pub async fn run(args: &Args, art: &Artifacts) -> anyhow::Result<(String, Vec<Line>, Vec<String>)> {
    let dir = tempfile::Builder::new()
        .prefix("bhatti-api-bench-vm.")
        .tempdir()?;
    let ns = format!("bhatti-b-{}", bhatti::engine::random_hex(4));
    let mut config = bench_config(dir.path(), &art.kernel, &art.rootfs);
    let raw_root = dir.path().join("raw");
    std::fs::create_dir_all(&raw_root)?;
    // Declared after `dir`: dropped (and run) before the temp dir goes.
    let _cleanup = Cleanup {
        data: config.data_dir.clone(),
        raw: raw_root.clone(),
        ns: ns.clone(),
    };
    config.vm.backend = Backend::Auto;
    config.vm.boot_timeout_secs = BOOT_TIMEOUT.as_secs();
    config.vm.agent_timeout_secs = 60;
    config.vm.disk_strategy = DiskStrategy::Auto;
    config.vm.xfs_loop_size_mb = 16 << 10;
    config.network.netns = Some(ns.clone());
    config.network.dns_upstreams = vec![];
    config.thermal.warm_after_secs = 1;
    config.thermal.cold_after_secs = 0;
    config.thermal.sweep_interval_ms = 100;
    let backend = bhatti::daemon::backend(&config)?;
    let label = match backend.kind() {
        BackendKind::Qemu => {
            let kvm = std::path::Path::new("/dev/kvm").exists();
            format!("QEMU ({})", if kvm { "KVM if usable" } else { "TCG" })
        }
        BackendKind::Firecracker => "Firecracker".to_owned(),
    };
    let label = qemu_accel_label(&backend).unwrap_or(label);

    let key = create_user(&config, "bench")?;
    let sock = config.listen_unix.clone();
    let daemon = Daemon::start(config.clone(), backend.clone()).await?;
    let engine_side = engine_side(args, &sock, &key).await;
    let stopped = daemon.stop().await;
    let eng = engine_side?;
    stopped?;

    let raw = raw_side(args, art, backend.as_ref(), &raw_root, &config).await?;

    let s = "VM";
    let lines = vec![
        Line::new(s, eng.create).floor(raw.boot).seed(1_440_000.0),
        Line::new(s, eng.exec).floor(raw.exec).seed(1220.0),
        Line::new(s, eng.paused).floor(raw.paused).seed(2080.0),
        Line::new(s, eng.stopped).floor(raw.stopped).seed(40_600.0),
    ];
    let notes = vec![
        format!(
            "VM part: {label}, {} MiB guests, 1 vCPU; engine sandboxes have a NIC in netns {ns}, raw VMs none; \
             the raw boot's disk is a sparse copy made before the clock starts",
            args.memory_mb
        ),
        "paused = POST /exec on a sandbox the thermal manager paused (warm_after_secs=1; polled until thermal=warm); \
         stopped = POST /exec after POST /stop (memory snapshot on disk, VMM gone)"
            .to_owned(),
    ];
    Ok((label, lines, notes))
}

/// "QEMU (TCG)" / "QEMU (KVM)" from the backend's Debug output.
fn qemu_accel_label(b: &std::sync::Arc<dyn VmmBackend>) -> Option<String> {
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

struct EngineSide {
    create: Stats,
    exec: Stats,
    paused: Stats,
    stopped: Stats,
}

async fn engine_side(args: &Args, sock: &Path, key: &str) -> anyhow::Result<EngineSide> {
    let mut c = Conn::new(sock, Some(key));
    let mem = args.memory_mb;
    // One unmeasured create first (page cache, the XFS base import).
    let mut create = Recorder::new("create → first exec");
    let mut kept = None;
    for i in 0..=args.vm_boots.max(1) {
        let t = Instant::now();
        let id = create_sandbox(
            &mut c,
            serde_json::json!({"name": format!("bench{i}"), "cpus": 1, "memory_mb": mem}),
        )
        .await?;
        c.exec_true(&id).await?;
        let took = t.elapsed();
        eprintln!("[api-bench] engine create {i}: {:.2} s", took.as_secs_f64());
        if i > 0 {
            create.record(took);
        }
        if i < args.vm_boots.max(1) {
            c.delete(&format!("/sandboxes/{id}"))
                .await?
                .ok("delete", 204)?;
        } else {
            kept = Some(id);
        }
    }
    let id = kept.expect("a sandbox");
    let result = engine_ops(args, &mut c, &id).await;
    let _ = c.delete(&format!("/sandboxes/{id}")).await;
    let (exec, paused, stopped) = result?;
    Ok(EngineSide {
        create: create.stats(),
        exec,
        paused,
        stopped,
    })
}

async fn engine_ops(args: &Args, c: &mut Conn, id: &str) -> anyhow::Result<(Stats, Stats, Stats)> {
    for _ in 0..5 {
        c.exec_true(id).await?;
    }
    let mut exec = Recorder::new("POST /exec true");
    for _ in 0..args.vm_samples.max(1) {
        let t = Instant::now();
        c.exec_true(id).await?;
        exec.record(t.elapsed());
    }
    let mut paused = Recorder::new("POST /exec on a paused sandbox");
    for i in 0..args.vm_paused.max(1) {
        wait_thermal(c, id, "warm", Duration::from_secs(60)).await?;
        let t = Instant::now();
        c.exec_true(id).await?;
        let took = t.elapsed();
        paused.record(took);
        eprintln!("[api-bench] paused {i}: {:.1} ms", took.as_secs_f64() * 1e3);
    }
    let mut stopped = Recorder::new("POST /exec on a stopped sandbox");
    for i in 0..args.vm_stopped.max(1) {
        c.post(&format!("/sandboxes/{id}/stop"), serde_json::json!({}))
            .await?
            .ok("stop", 200)?;
        wait_thermal(c, id, "cold", Duration::from_secs(10)).await?;
        let t = Instant::now();
        c.exec_true(id).await?;
        let took = t.elapsed();
        stopped.record(took);
        eprintln!(
            "[api-bench] stopped {i}: {:.1} ms",
            took.as_secs_f64() * 1e3
        );
    }
    Ok((exec.stats(), paused.stats(), stopped.stats()))
}

async fn wait_thermal(c: &mut Conn, id: &str, want: &str, limit: Duration) -> anyhow::Result<()> {
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

struct RawSide {
    boot: Stats,
    exec: Stats,
    paused: Stats,
    stopped: Stats,
}

/// Ends the VM of a raw run on drop unless it was handed on.
async fn kill_vm(vm: Box<dyn Vm>) {
    if let Err(e) = vm.kill().await {
        eprintln!("[api-bench] killing a raw VM: {e}");
    }
}

async fn raw_side(
    args: &Args,
    art: &Artifacts,
    backend: &dyn VmmBackend,
    root: &Path,
    config: &bhatti::config::Config,
) -> anyhow::Result<RawSide> {
    let token = bhatti::engine::random_hex(16);
    let drive = root.join("config.ext4");
    let gc = GuestConfig {
        sandbox_id: "rawbench".into(),
        hostname: "rawbench".into(),
        token: token.clone(),
        env: Default::default(),
        files: Vec::new(),
        init: None,
        dns: Vec::new(),
        dns_search: Vec::new(),
        agent: match backend.kind() {
            BackendKind::Firecracker => AgentTransport::Vsock {
                port: bhatti_vmm::AGENT_VSOCK_PORT,
            },
            BackendKind::Qemu => AgentTransport::Serial {
                name: bhatti_vmm::AGENT_SERIAL_NAME.to_owned(),
            },
        },
        network: None,
    };
    bhatti::storage::write_config_drive(&drive, &gc).await?;
    let cfg_for = |i: usize| -> anyhow::Result<VmConfig> {
        let run_dir = root.join(format!("r{i}"));
        std::fs::create_dir_all(&run_dir)?;
        let disk = run_dir.join("rootfs.ext4");
        bhatti::storage::sparse_copy(&art.rootfs, &disk)?;
        Ok(VmConfig {
            id: format!("rawbench{i}"),
            vcpus: 1,
            memory_mib: args.memory_mb,
            kernel: art.kernel.clone(),
            kernel_args: config.vm.kernel_args.trim().to_owned(),
            root_disk: disk,
            config_disk: Some(drive.clone()),
            net: None,
            netns: None,
            run_dir,
        })
    };

    let mut boot = Recorder::new("raw boot → agent handshake → exec");
    let mut kept: Option<(VmConfig, Box<dyn Vm>, AgentClient)> = None;
    let boots = args.vm_boots.max(1);
    for i in 0..=boots {
        let cfg = cfg_for(i)?;
        let t = Instant::now();
        let vm = backend.boot(&cfg).await?;
        let client = match bhatti::engine::wait_for_agent(vm.as_ref(), &token, BOOT_TIMEOUT).await {
            Ok(c) => c,
            Err(e) => {
                let tail = bhatti_vmm::console_tail(&vm.console_log(), 2000);
                kill_vm(vm).await;
                anyhow::bail!("raw boot {i}: {e}; console:\n{tail}");
            }
        };
        if let Err(e) = agent_exec(&client).await {
            kill_vm(vm).await;
            return Err(e);
        }
        let took = t.elapsed();
        eprintln!("[api-bench] raw boot {i}: {:.2} s", took.as_secs_f64());
        if i > 0 {
            boot.record(took);
        }
        if i < boots {
            client.close();
            kill_vm(vm).await;
            let _ = std::fs::remove_dir_all(&cfg.run_dir);
        } else {
            kept = Some((cfg, vm, client));
        }
    }
    let (cfg, vm, client) = kept.expect("a raw VM");
    let (vm, result) = raw_ops(args, backend, &cfg, vm, client, &token).await;
    if let Some(vm) = vm {
        kill_vm(vm).await;
    }
    let (exec, paused, stopped) = result?;
    Ok(RawSide {
        boot: boot.stats(),
        exec,
        paused,
        stopped,
    })
}

/// Returns the VM still running (to be killed) with the results.
async fn raw_ops(
    args: &Args,
    backend: &dyn VmmBackend,
    cfg: &VmConfig,
    vm: Box<dyn Vm>,
    client: AgentClient,
    token: &str,
) -> (Option<Box<dyn Vm>>, anyhow::Result<(Stats, Stats, Stats)>) {
    let mut vm = Some(vm);
    let mut client = client;
    let r: anyhow::Result<(Stats, Stats, Stats)> = async {
        for _ in 0..5 {
            agent_exec(&client).await?;
        }
        let mut exec = Recorder::new("raw agent exec true");
        for _ in 0..args.vm_samples.max(1) {
            let t = Instant::now();
            agent_exec(&client).await?;
            exec.record(t.elapsed());
        }
        let mut paused = Recorder::new("raw resume (QMP cont) + exec");
        for _ in 0..args.vm_paused.max(1) {
            let v = vm.as_ref().context("vm")?;
            v.pause().await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t = Instant::now();
            v.resume().await?;
            agent_exec(&client).await?;
            paused.record(t.elapsed());
        }
        let mut stopped = Recorder::new("raw restore + handshake + exec");
        let snap_dir = cfg.run_dir.join("snap");
        std::fs::create_dir_all(&snap_dir)?;
        let files = SnapshotFiles {
            state: snap_dir.join("state"),
            memory: (backend.kind() == BackendKind::Firecracker).then(|| snap_dir.join("memory")),
        };
        for i in 0..args.vm_stopped.max(1) {
            {
                let v = vm.take().context("vm")?;
                agent_exec(&client).await?;
                let _ = client
                    .exec(
                        bhatti_protocol::ExecRequest {
                            argv: vec!["sync".into()],
                            ..Default::default()
                        },
                        None,
                    )
                    .await;
                let _ = std::fs::remove_file(&files.state);
                if let Some(m) = &files.memory {
                    let _ = std::fs::remove_file(m);
                }
                v.pause().await?;
                let snap = v.snapshot(SnapshotKind::Full, &files).await;
                client.close();
                kill_vm(v).await;
                snap?;
            }
            remove_sockets(&cfg.run_dir);
            let t = Instant::now();
            let v = backend.restore(cfg, &files).await?;
            vm = Some(v);
            let v = vm.as_ref().expect("vm");
            client = bhatti::engine::wait_for_agent(v.as_ref(), token, BOOT_TIMEOUT)
                .await
                .map_err(|e| anyhow::anyhow!("raw restore: {e}"))?;
            agent_exec(&client).await?;
            let took = t.elapsed();
            stopped.record(took);
            eprintln!(
                "[api-bench] raw restore {i}: {:.1} ms",
                took.as_secs_f64() * 1e3
            );
        }
        Ok((exec.stats(), paused.stats(), stopped.stats()))
    }
    .await;
    client.close();
    (vm, r)
}

/// Unix sockets left in a run dir by the previous VMM.
fn remove_sockets(dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_socket()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
