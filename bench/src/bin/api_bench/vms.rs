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
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bhatti::config::Config;
use bhatti_bench::{Recorder, Stats};
use bhatti_protocol::guest_config::{AgentTransport, GuestConfig};
use bhatti_protocol::AgentClient;
use bhatti_vmm::{BackendKind, SnapshotFiles, SnapshotKind, Vm, VmConfig, VmmBackend};

use crate::daemon::{create_sandbox, create_user, Daemon};
use crate::http::Conn;
use crate::vm_env::{backend_label, wait_thermal, Artifacts, VmEnv, BOOT_TIMEOUT};
use crate::{agent_exec, Args, Line};

pub async fn run(args: &Args, art: &Artifacts) -> anyhow::Result<(String, Vec<Line>, Vec<String>)> {
    let env = VmEnv::new("bhatti-api-bench-vm.", art)?;
    let (config, ns, raw_root) = (env.config.clone(), env.ns.clone(), env.raw.clone());
    let backend = bhatti::daemon::backend(&config)?;
    let label = backend_label(&backend);

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
        user: None,
        workdir: None,
        mounts: Vec::new(),
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
            data_disks: Vec::new(),
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

// ---------------------------------------------------------------------------
// Part 3: GET /health while a ≥ 1 GiB memory snapshot is written.
//
// A sandbox of `--stall-memory-mb` fills `--stall-fill-mb` of its RAM (two
// tmpfs files of random, page-wise distinct data, so QEMU's migration can
// elide nothing); then a client on its own OS thread and runtime (not the
// daemon's scheduler thread, which it is there to watch) sends GET /health
// every `--stall-interval-ms` on one kept-alive connection: for
// `--stall-idle-secs` with the sandbox idle (the floor), then from the start
// to the end of POST /sandboxes/{id}/stop (pause, migrate RAM to a file,
// fsync, rename, end the VMM).

/// One GET /health: when it was sent, how long it took, and what the
/// snapshot looked like on disk when it was sent.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    latency: Duration,
    phase: Option<Phase>,
}

/// The snapshot's progress as seen from the host's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No snapshot file yet (guest sync, pause).
    Before,
    /// `snapshot.tmp/state` holds this many bytes (migration, fsync).
    Writing(u64),
    /// `snapshot/state` in place, the VMM still alive (kill).
    RenamedVmmAlive,
    /// `snapshot/state` in place, the VMM gone (cleanup, state change).
    RenamedVmmGone,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Before => write!(f, "no snapshot file yet (sync/pause)"),
            Phase::Writing(b) => write!(f, "snapshot.tmp/state at {} MiB", b >> 20),
            Phase::RenamedVmmAlive => write!(f, "snapshot renamed, VMM alive"),
            Phase::RenamedVmmGone => write!(f, "snapshot renamed, VMM gone"),
        }
    }
}

/// Where to look for the snapshot's progress.
#[derive(Debug, Clone)]
struct Probe {
    tmp_state: PathBuf,
    fin_state: PathBuf,
    vmm_pid: Option<i32>,
}

impl Probe {
    fn phase(&self) -> Phase {
        if let Ok(m) = std::fs::metadata(&self.tmp_state) {
            return Phase::Writing(m.len());
        }
        if !self.fin_state.exists() {
            return Phase::Before;
        }
        let alive = self
            .vmm_pid
            .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if alive {
            Phase::RenamedVmmAlive
        } else {
            Phase::RenamedVmmGone
        }
    }
}

/// GET /health at a fixed pace from a thread of its own until finished.
struct Hammer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    done: Option<tokio::sync::oneshot::Receiver<anyhow::Result<Vec<Sample>>>>,
}

impl Hammer {
    fn start(sock: &Path, every: Duration, probe: Option<Probe>) -> anyhow::Result<Hammer> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (sock, flag) = (sock.to_owned(), stop.clone());
        std::thread::Builder::new()
            .name("health-hammer".into())
            .spawn(move || {
                let r = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(hammer(&sock, every, probe, &flag)));
                let _ = tx.send(r);
            })?;
        Ok(Hammer {
            stop,
            done: Some(rx),
        })
    }

    async fn finish(mut self) -> anyhow::Result<Vec<Sample>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let rx = self.done.take().context("finished twice")?;
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .context("the /health client did not end within 30 s")?
            .context("the /health client thread died")?
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn hammer(
    sock: &Path,
    every: Duration,
    probe: Option<Probe>,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Vec<Sample>> {
    let mut c = Conn::new(sock, None);
    // Connect and warm the connection before the first timed request.
    for _ in 0..20 {
        c.get("/health").await?.ok("GET /health", 200)?;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        tick.tick().await;
        let phase = probe.as_ref().map(Probe::phase);
        let at = Instant::now();
        c.get("/health").await?.ok("GET /health", 200)?;
        out.push(Sample {
            at,
            latency: at.elapsed(),
            phase,
        });
    }
    Ok(out)
}

/// The samples' latencies; with `every`, corrected for coordinated
/// omission: a request that took k×`every` longer than `every` also stands
/// for the k requests the client would have sent meanwhile, each counted
/// from when it was due (HdrHistogram's `record_correct`).
fn stats_of<'a>(
    name: &str,
    samples: impl Iterator<Item = &'a Sample>,
    every: Option<Duration>,
) -> Stats {
    let mut r = Recorder::new(name);
    for s in samples {
        r.record(s.latency);
        if let Some(every) = every.filter(|e| !e.is_zero()) {
            let mut missed = s.latency.saturating_sub(every);
            while missed >= every {
                r.record(missed);
                missed -= every;
            }
        }
    }
    r.stats()
}

/// Runs a command in the guest through the API; fails unless it exits 0.
async fn guest(c: &mut Conn, id: &str, cmd: &[&str]) -> anyhow::Result<String> {
    let v = c
        .post(
            &format!("/sandboxes/{id}/exec"),
            serde_json::json!({ "cmd": cmd }),
        )
        .await?
        .ok("exec", 200)?
        .json()?;
    anyhow::ensure!(
        v["exit_code"] == 0,
        "guest {cmd:?}: exit {}; stderr: {}",
        v["exit_code"],
        v["stderr"].as_str().unwrap_or("")
    );
    Ok(v["stdout"].as_str().unwrap_or("").to_owned())
}

/// A `/proc/meminfo` field, in MiB.
fn meminfo_mib(meminfo: &str, field: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib >> 10)
}

pub async fn stall(
    args: &Args,
    art: &Artifacts,
) -> anyhow::Result<(String, Vec<Line>, Vec<String>)> {
    let env = VmEnv::new("bhatti-api-bench-stall.", art)?;
    let mut config = env.config.clone();
    // Nothing pauses or stops the sandbox but us.
    config.thermal.warm_after_secs = 0;
    config.thermal.cold_after_secs = 0;
    // The sandbox is bigger than the defaults may allow.
    let mem = args.stall_memory_mb;
    config.vm.max_memory_mb = config.vm.max_memory_mb.max(mem);
    config.limits.max_memory_mb = config.limits.max_memory_mb.max(mem);
    let backend = bhatti::daemon::backend(&config)?;
    let label = backend_label(&backend);
    let key = create_user(&config, "bench")?;
    let daemon = Daemon::start(config.clone(), backend).await?;
    let measured = stall_sandbox(args, &config, &key, &label).await;
    let stopped = daemon.stop().await;
    let (lines, notes) = measured?;
    stopped?;
    Ok((label, lines, notes))
}

async fn stall_sandbox(
    args: &Args,
    config: &Config,
    key: &str,
    label: &str,
) -> anyhow::Result<(Vec<Line>, Vec<String>)> {
    let mut c = Conn::new(&config.listen_unix, Some(key));
    let t = Instant::now();
    let id = create_sandbox(
        &mut c,
        serde_json::json!({"name": "stall", "cpus": 1, "memory_mb": args.stall_memory_mb}),
    )
    .await?;
    let result = async {
        c.exec_true(&id).await?;
        eprintln!(
            "[api-bench] stall: {} MiB sandbox up in {:.2} s",
            args.stall_memory_mb,
            t.elapsed().as_secs_f64()
        );
        stall_ops(args, config, &mut c, &id, label).await
    }
    .await;
    // The snapshot (GiBs) goes with the sandbox.
    if let Err(e) = c.delete(&format!("/sandboxes/{id}")).await {
        eprintln!("[api-bench] stall: deleting {id}: {e}");
    }
    result
}

async fn stall_ops(
    args: &Args,
    config: &Config,
    c: &mut Conn,
    id: &str,
    label: &str,
) -> anyhow::Result<(Vec<Line>, Vec<String>)> {
    let fill = args.stall_fill_mb.clamp(1, 4096);
    let sock = config.listen_unix.clone();
    let every = Duration::from_millis(args.stall_interval_ms.max(1));
    let load_before = bhatti_bench::load_average();

    // 1. Fill guest RAM: two tmpfs files, half in /dev/shm and half in /tmp
    // (each tmpfs may hold half the RAM; exec is not root, so neither can
    // grow); each MiB is the same random MiB rotated by a different number
    // of bytes (< 4096), so no two pages are alike and none is zero.
    let df = guest(c, id, &["df", "-m", "/dev/shm", "/tmp"]).await?;
    let script = format!(
        "import os\nb = os.urandom(1 << 20)\nn = {fill}\nh = n // 2\n\
         for p, r in (('/dev/shm/fill', range(h)), ('/tmp/fill', range(h, n))):\n\
         \twith open(p, 'wb') as f:\n\
         \t\tfor i in r:\n\
         \t\t\tf.write(b[i:] + b[:i])\n"
    );
    let t = Instant::now();
    guest(c, id, &["python3", "-c", &script])
        .await
        .with_context(|| format!("filling guest RAM; guest tmpfs sizes:\n{df}"))?;
    let fill_took = t.elapsed();
    eprintln!(
        "[api-bench] stall: filled {fill} MiB of guest RAM in {:.1} s",
        fill_took.as_secs_f64()
    );
    let meminfo = guest(c, id, &["cat", "/proc/meminfo"]).await?;
    let (total, avail, shmem) = (
        meminfo_mib(&meminfo, "MemTotal").unwrap_or(0),
        meminfo_mib(&meminfo, "MemAvailable").unwrap_or(0),
        meminfo_mib(&meminfo, "Shmem").unwrap_or(0),
    );
    // (Shmem lags the files' size by a few KiB of per-CPU counter batching.)
    anyhow::ensure!(
        shmem + 8 >= fill,
        "the guest holds {shmem} MiB of shmem, wanted ≥ {fill} MiB:\n{meminfo}"
    );
    let run_dir = config.data_dir.join("run").join(id);
    let vmm_pid = std::fs::read_to_string(run_dir.join("vmm.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    let vmm_rss = vmm_pid.and_then(|p| {
        let st = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
        meminfo_mib(&st, "VmRSS")
    });
    eprintln!(
        "[api-bench] stall: guest MemTotal {total} MiB, MemAvailable {avail} MiB, Shmem {shmem} MiB; \
         VMM RSS {} MiB",
        vmm_rss.map(|r| r.to_string()).unwrap_or("?".into())
    );

    // 2. The floor: the same client, the sandbox running idle.
    let h = Hammer::start(&sock, every, None)?;
    tokio::time::sleep(Duration::from_secs_f64(args.stall_idle_secs.max(0.5))).await;
    let idle = h.finish().await?;

    // 3. During POST /stop.
    let sb_dir = config.data_dir.join("sandboxes").join(id);
    let probe = Probe {
        tmp_state: sb_dir.join("snapshot.tmp").join("state"),
        fin_state: sb_dir.join("snapshot").join("state"),
        vmm_pid,
    };
    let h = Hammer::start(&sock, every, Some(probe))?;
    // Let it connect and settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let stop = c
        .post(&format!("/sandboxes/{id}/stop"), serde_json::json!({}))
        .await;
    let t1 = Instant::now();
    let all = h.finish().await?;
    stop?.ok("stop", 200)?;
    let stop_took = t1 - t0;
    let during: Vec<&Sample> = all.iter().filter(|s| s.at >= t0 && s.at <= t1).collect();
    anyhow::ensure!(
        !during.is_empty(),
        "no GET /health was sent during the stop"
    );
    let load_after = bhatti_bench::load_average();

    let snap = sb_dir.join("snapshot").join("state");
    let (snap_len, snap_alloc) = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&snap)
            .with_context(|| format!("no snapshot at {}", snap.display()))?;
        (m.len(), m.blocks() * 512)
    };
    anyhow::ensure!(
        snap_len >= fill << 20,
        "the snapshot is {} MiB, smaller than the {fill} MiB filled",
        snap_len >> 20
    );

    let floor = stats_of("GET /health, sandbox idle", idle.iter(), None);
    let gib = snap_len as f64 / (1u64 << 30) as f64;
    let name = format!("GET /health during POST /stop ({gib:.2} GiB snapshot)");
    let ours = stats_of(&name, during.iter().copied(), None);
    let met = ours.p99_us < 5000.0;
    let co_floor = stats_of("GET /health idle, CO-corrected", idle.iter(), Some(every));
    let co_name = "GET /health during POST /stop, CO-corrected";
    let co_ours = stats_of(co_name, during.iter().copied(), Some(every));
    let co_met = co_ours.p99_us < 5000.0;
    let slow: Vec<&&Sample> = during
        .iter()
        .filter(|s| s.latency >= Duration::from_millis(5))
        .collect();
    let mut worst: Vec<&Sample> = during.clone();
    worst.sort_by_key(|s| std::cmp::Reverse(s.latency));
    let worst: Vec<String> = worst
        .iter()
        .take(5)
        .map(|s| {
            format!(
                "{:.1} ms sent at +{:.0} ms ({})",
                s.latency.as_secs_f64() * 1e3,
                (s.at - t0).as_secs_f64() * 1e3,
                s.phase.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
            )
        })
        .collect();
    // When the snapshot file reached its full size (migration done).
    let migrated_at = all
        .iter()
        .find(|s| s.phase == Some(Phase::Writing(snap_len)))
        .map(|s| format!("+{:.0} ms", (s.at - t0).as_secs_f64() * 1e3))
        .unwrap_or_else(|| "not seen".into());
    let renamed_at = all
        .iter()
        .find(|s| {
            matches!(
                s.phase,
                Some(Phase::RenamedVmmAlive | Phase::RenamedVmmGone)
            )
        })
        .map(|s| format!("+{:.0} ms", (s.at - t0).as_secs_f64() * 1e3))
        .unwrap_or_else(|| "not seen".into());

    let lines = vec![
        Line::new(STALL_SECTION, ours)
            .floor(floor)
            .target("p99 < 5 ms", met),
        Line::new(STALL_SECTION, co_ours)
            .floor(co_floor)
            .target("p99 < 5 ms", co_met),
    ];
    let notes = vec![
        format!(
            "stall part: {label}, one {} MiB sandbox, 1 vCPU; {fill} MiB of guest RAM filled with page-wise \
             distinct random data in {:.1} s (guest MemTotal {total} MiB, MemAvailable {avail} MiB, Shmem {shmem} MiB; \
             VMM RSS {} MiB); GET /health every {} ms from a thread of its own on one kept-alive connection, \
             {:.1} s idle ({} requests) vs the whole POST /stop ({} requests); the CO-corrected rows also count, \
             for a request that took longer than that, the requests the client would have sent meanwhile",
            args.stall_memory_mb,
            fill_took.as_secs_f64(),
            vmm_rss.map(|r| r.to_string()).unwrap_or("?".into()),
            every.as_millis(),
            args.stall_idle_secs,
            idle.len(),
            during.len(),
        ),
        format!(
            "stall part: POST /stop took {:.2} s; snapshot/state {} MiB ({} MiB allocated on disk); \
             the file reached its full size at {migrated_at}, the snapshot dir was renamed into place at {renamed_at}; \
             load {load_before} before the fill, {load_after} after the stop",
            stop_took.as_secs_f64(),
            snap_len >> 20,
            snap_alloc >> 20,
        ),
        format!(
            "stall part: {} of {} /health requests during the stop took ≥ 5 ms; slowest: {}",
            slow.len(),
            during.len(),
            worst.join("; ")
        ),
    ];
    Ok((lines, notes))
}

/// The section of part 3's lines.
pub const STALL_SECTION: &str = "snapshot stall";
