//! Issue-5 benchmark: thermal states (hot / warm / cold), snapshots and
//! forks through the engine and its [`ThermalHandle`], each beside the raw
//! VMM floor measured in the same run on the same kernel, rootfs and lohar.
//!
//! ```text
//! eval "$(scripts/artifacts.sh)"          # BHATTI_KERNEL, BHATTI_ROOTFS (cached)
//! cargo build --release -p bhatti-bench --bin thermal-bench
//! sudo -E target/release/thermal-bench [--warm 100] [--cold 20] [--forks 20] [--fc-samples 30] [--json out.json]   # ~70 s
//! ```
//!
//! | ours | raw floor (same run) |
//! |---|---|
//! | warm: `ThermalHandle::agent` (touch + resume + wake event) + exec `true` on a paused sandbox | QMP `cont` + exec `true` over an open agent connection |
//! | cold: `ThermalHandle::agent` (restore) + exec `true` after `snapshot_to_disk`, page cache dropped / not | a new QEMU `-incoming defer` loading *the same snapshot file* (on a reflink of the same disk) until lohar answers + exec |
//! | Full snapshot: `snapshot_to_disk` of an idle hot sandbox | QMP `stop` + `migrate` to a file + fsync |
//! | fork-to-first-exec: `Engine::fork` of a checkpoint + exec | QEMU `-incoming` of the checkpoint's snapshot (reflinked disk) until lohar answers + exec |
//! | Firecracker tiny guest: Full / Diff `Vm::snapshot`, `merge_diff_snapshot` | raw `PUT /snapshot/create`, pread/pwrite of the dirty extents |
//!
//! Every VM runs inside a network namespace the program creates and deletes;
//! a guard kills every VMM started under the scratch dir, unmounts the XFS
//! loop, deletes the namespace and the dir (on errors, panics, Ctrl-C too).
//! One VM runs at a time while something is measured.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use bhatti::config::ThermalConfig;
use bhatti::engine::{
    new_sandbox_id, random_hex, CheckpointMeta, CreateSpec, Engine, EngineConfig, SandboxRecord,
};
use bhatti::net::{GuestNet, NetSettings};
use bhatti::thermal::{ThermalHandle, ThermalManager};
use bhatti_bench::{host_description, load_average, Recorder, Report, Row};
use bhatti_protocol::{AgentClient, ExecRequest};
use bhatti_vmm::process::VmmProcess;
use bhatti_vmm::qemu::{qemu_args, Accel, QemuBackend, QemuConfig, Qmp};
use bhatti_vmm::{NetConfig, VmConfig, VmmBackend};
use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};

#[path = "../thermal_bench/fc_tiny.rs"]
mod fc_tiny;

#[derive(Parser, Debug, Clone, Serialize)]
#[command(about = "Benchmark warm/cold wakes, snapshots and forks beside raw VMM floors")]
pub(crate) struct Args {
    /// Measured warm wakes per side (after 2 unrecorded).
    #[arg(long, default_value_t = 100)]
    warm: usize,
    /// Measured cold wakes per side and page-cache variant (after 1
    /// unrecorded cycle); each cycle also gives one Full-snapshot sample.
    #[arg(long, default_value_t = 20)]
    cold: usize,
    /// Measured forks per side (after 1 unrecorded).
    #[arg(long, default_value_t = 20)]
    forks: usize,
    /// Samples per side of each Firecracker tiny-guest snapshot operation.
    #[arg(long, default_value_t = 30)]
    fc_samples: usize,
    /// Skip the Firecracker tiny-guest rows.
    #[arg(long)]
    no_firecracker: bool,
    /// Guest subnet inside the bench's network namespace.
    #[arg(long, default_value = "10.78.0.1/24")]
    subnet: String,
    /// Write the JSON report here (default: stdout after the table).
    #[arg(long)]
    json: Option<PathBuf>,
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Some(art) = artifacts() else {
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let guard = Guard::new()?;
    let load_start = load_average();
    let t0 = Instant::now();
    eprintln!(
        "[thermal-bench] netns {}, scratch {}, load average {load_start}",
        guard.ns,
        guard.dir.path().display()
    );
    let result = rt.block_on(async {
        tokio::select! {
            r = run(&args, &art, &guard) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    drop(rt);
    drop(guard);
    let mut out = result?;
    out.load_average_start = load_start;
    out.load_average_end = load_average();
    out.wall_seconds = t0.elapsed().as_secs_f64();
    for s in &out.sections {
        s.report.print_table_ms();
        for (what, why) in &s.not_applicable {
            println!("{what:<36} {why}");
        }
        for n in &s.notes {
            println!("note: {n}");
        }
    }
    println!(
        "load average (1/5/15 min): {} at start, {} at end; whole run {:.0} s",
        out.load_average_start, out.load_average_end, out.wall_seconds
    );
    let json = serde_json::to_string_pretty(&out)?;
    match &out.args.json {
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Output {
    benchmark: String,
    host: String,
    load_average_start: String,
    load_average_end: String,
    wall_seconds: f64,
    args: Args,
    sections: Vec<Section>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Section {
    pub backend: String,
    pub report: Report,
    pub ratios: Vec<Ratio>,
    pub not_applicable: Vec<(String, String)>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Ratio {
    op: String,
    floor: String,
    p50: f64,
    p95: f64,
    p99: f64,
}

pub(crate) fn ratios(rows: &[Row]) -> Vec<Ratio> {
    rows.iter()
        .filter_map(|r| {
            let [p50, p95, p99] = r.ratios()?;
            Some(Ratio {
                op: r.op.name.clone(),
                floor: r.floor.as_ref()?.name.clone(),
                p50,
                p95,
                p99,
            })
        })
        .collect()
}

pub(crate) fn row(op: &Recorder, floor: Option<&Recorder>) -> Row {
    Row {
        target: if floor.is_some() { "-" } else { "(info)" }.into(),
        op: op.stats(),
        floor: floor.map(Recorder::stats),
        met: None,
    }
}

async fn run(args: &Args, art: &Artifacts, guard: &Guard) -> anyhow::Result<Output> {
    let host = bhatti_vmm::probe::probe();
    let mut sections = Vec::new();
    if host.qemu.is_some() {
        sections.push(bench_qemu(args, art, guard).await?);
    } else {
        println!("SKIP thermal-bench qemu rows: qemu-system-x86_64 not found");
    }
    match (&host.firecracker, args.no_firecracker) {
        (_, true) => {}
        (None, _) => {
            println!("SKIP thermal-bench firecracker rows: no binary (BHATTI_FIRECRACKER / PATH)")
        }
        (Some(bin), false) => {
            if let Some(s) = fc_tiny::bench(args.fc_samples.max(1), guard.dir.path(), bin).await? {
                sections.push(s);
            }
        }
    }
    ensure!(!sections.is_empty(), "no VMM backend present");
    Ok(Output {
        benchmark: "thermal-bench".into(),
        host: host_description(),
        load_average_start: String::new(),
        load_average_end: String::new(),
        wall_seconds: 0.0,
        args: args.clone(),
        sections,
    })
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`.
fn drop_caches() -> anyhow::Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

async fn exec_true(c: &AgentClient) -> anyhow::Result<()> {
    let out = c
        .exec(
            ExecRequest {
                argv: vec!["/bin/true".into()],
                ..Default::default()
            },
            None,
        )
        .await?;
    ensure!(out.status.exit_code == 0, "true exited {:?}", out.status);
    Ok(())
}

/// Wake (if needed) through the thermal handle, then exec `true`.
async fn thermal_exec(th: &ThermalHandle, id: &str) -> anyhow::Result<()> {
    let c = th.agent(id).await?;
    exec_true(&c).await
}

async fn bench_qemu(args: &Args, art: &Artifacts, guard: &Guard) -> anyhow::Result<Section> {
    let backend = QemuBackend::new(QemuConfig::default())?;
    let label = format!("qemu/{:?}", backend.accel()).to_lowercase();
    let mut cfg = EngineConfig::new(
        guard.dir.path().join("engine"),
        &art.kernel,
        &art.rootfs,
        Arc::new(backend.clone()) as Arc<dyn VmmBackend>,
    );
    cfg.net = Some(NetSettings {
        bridge: "bhatti0".into(),
        subnet: args.subnet.clone(),
        netns: Some(guard.ns.clone()),
    });
    cfg.boot_timeout = BOOT_TIMEOUT;
    cfg.agent_timeout = Duration::from_secs(60);
    cfg.xfs_loop_size_mb = 16 << 10;
    let engine = Engine::new(cfg).await?;
    // The manager never cools anything by itself here (both timers 0): the
    // bench decides when a sandbox goes warm or cold, the handle wakes it.
    let manager = ThermalManager::spawn(
        engine.clone(),
        None,
        &ThermalConfig {
            warm_after_secs: 0,
            cold_after_secs: 0,
            sweep_interval_ms: 3_600_000,
        },
    );
    let th = manager.handle();
    let net = engine.network().context("the engine has no network")?;
    let raw = RawQemu {
        binary: backend.binary().to_path_buf(),
        accel: backend.accel(),
        netns: guard.ns.clone(),
    };
    let raw_dir = guard.dir.path().join("raw");
    std::fs::create_dir_all(&raw_dir)?;
    // The raw VMs' own TAP on the engine's bridge (one raw VM at a time).
    let gnet = net.allocate("tb-raw")?;
    net.ensure_tap(&gnet.tap).await?;

    let t_create = Instant::now();
    let sb = engine
        .create(CreateSpec {
            name: Some("thermal".into()),
            ..CreateSpec::default()
        })
        .await?;
    let id = sb.id.clone();
    eprintln!(
        "[thermal-bench] {label}: sandbox {id} ready in {:.1} s ({})",
        t_create.elapsed().as_secs_f64(),
        engine.disk_method()
    );
    for _ in 0..5 {
        thermal_exec(&th, &id).await?;
    }

    // 1. Cold: snapshot_to_disk (also the Full-snapshot samples), then the
    // raw floor restores that very file, then ours wakes. Page-cache
    // variants alternate cycle by cycle; cycle 0 is unrecorded.
    let mut full = Recorder::new("Full snapshot (snapshot_to_disk)");
    let mut full_raw = Recorder::new("raw QMP stop+migrate→file+fsync");
    let mut cold = [
        Recorder::new("cold: wake+exec, page cache warm"),
        Recorder::new("cold: wake+exec, caches dropped"),
    ];
    let mut cold_raw = [
        Recorder::new("raw -incoming same file→exec (cached)"),
        Recorder::new("raw -incoming same file→exec (dropped)"),
    ];
    let mut snap_bytes = 0u64;
    let cycles = 1 + 2 * args.cold.max(1);
    let raw_snap_file = raw_dir.join("raw-snapshot.state");
    let mut kept: Option<RawVm> = None;
    for i in 0..cycles {
        let measured = i > 0;
        let dropped = i % 2 == 0;
        let t = Instant::now();
        engine.snapshot_to_disk(&id).await?;
        let d_snap = t.elapsed();
        let rec = SandboxRecord::load(&sb.paths.dir)?;
        let snap = rec
            .usable_snapshot()
            .context("no snapshot after snapshot_to_disk")?;
        snap_bytes = std::fs::metadata(&snap.files.state).map_or(0, |m| m.len());
        let disk = reflink_copy(&rec.disk.path, "tb-raw-cold")?;
        let vm_cfg = raw_cfg(&rec.vm, &raw_dir.join("cold"), &disk, &gnet);
        if dropped {
            drop_caches()?;
        }
        let (mut vm, d_raw) = raw.restore(&vm_cfg, &snap.files.state, &rec.token).await?;
        let t = Instant::now();
        vm.snapshot(&raw_snap_file).await?;
        let d_raw_snap = t.elapsed();
        let _ = std::fs::remove_file(&raw_snap_file);
        let last = i + 1 == cycles;
        if last {
            // Kept (stopped) for the warm rows.
            kept = Some(vm);
        } else {
            vm.kill().await?;
            let _ = std::fs::remove_file(&disk);
        }
        if dropped {
            drop_caches()?;
        }
        let t = Instant::now();
        thermal_exec(&th, &id).await?;
        let d_wake = t.elapsed();
        if measured {
            full.record(d_snap);
            full_raw.record(d_raw_snap);
            cold[usize::from(dropped)].record(d_wake);
            cold_raw[usize::from(dropped)].record(d_raw);
        }
        eprintln!(
            "[thermal-bench] cold {}/{cycles}{}{}: snapshot {:.3} s (raw {:.3} s), wake+exec \
             {:.3} s (raw restore+exec {:.3} s)",
            i + 1,
            if dropped { " caches dropped" } else { "" },
            if measured { "" } else { " (warm-up)" },
            d_snap.as_secs_f64(),
            d_raw_snap.as_secs_f64(),
            d_wake.as_secs_f64(),
            d_raw.as_secs_f64()
        );
    }
    let mut vm = kept.context("a raw VM kept")?;

    // 2. Warm: engine paused through its thermal path (pause_if), the raw
    // VM resumed; then swap. One VM runs at a time.
    let mut warm = Recorder::new("warm: ThermalHandle::agent+exec");
    let mut warm_raw = Recorder::new("raw QMP cont + exec true");
    let mut hot = Recorder::new("hot: ThermalHandle::agent+exec");
    let mut hot_raw = Recorder::new("raw exec true (running VM)");
    let mut pause = Recorder::new("pause (Engine::pause_if)");
    let mut stop_raw = Recorder::new("raw QMP stop");
    let rc = vm.client.clone();
    for i in 0..2 + args.warm.max(1) {
        let measured = i >= 2;
        let t = Instant::now();
        ensure!(
            engine.pause_if(&id, |_| true).await?,
            "pause_if did not pause"
        );
        let d_pause = t.elapsed();
        let t = Instant::now();
        vm.qmp.execute("cont", None).await?;
        exec_true(&rc).await?;
        let d_raw = t.elapsed();
        let t = Instant::now();
        exec_true(&rc).await?;
        let d_hot_raw = t.elapsed();
        let t = Instant::now();
        vm.qmp.execute("stop", None).await?;
        let d_stop = t.elapsed();
        let t = Instant::now();
        thermal_exec(&th, &id).await?;
        let d_warm = t.elapsed();
        let t = Instant::now();
        thermal_exec(&th, &id).await?;
        let d_hot = t.elapsed();
        if measured {
            warm.record(d_warm);
            warm_raw.record(d_raw);
            hot.record(d_hot);
            hot_raw.record(d_hot_raw);
            pause.record(d_pause);
            stop_raw.record(d_stop);
        }
    }
    drop(rc);
    vm.kill().await?;
    let _ = std::fs::remove_file(&vm.cfg.root_disk);
    let wake_events = th
        .info(&id)
        .map(|i| format!("{i:?}"))
        .unwrap_or_else(|| "none".into());

    // 3. Fork: one checkpoint, then forks (ours) and raw restores of the
    // checkpoint's files, alternating; the source is paused meanwhile.
    let ckpt = guard.dir.path().join("checkpoint");
    let t = Instant::now();
    let meta = engine.checkpoint(&id, &ckpt).await?;
    let d_ckpt = t.elapsed();
    engine.pause(&id).await?;
    let src = SandboxRecord::load(&sb.paths.dir)?;
    let mut fork = Recorder::new("fork → first exec (Engine::fork)");
    let mut fork_raw = Recorder::new("raw -incoming checkpoint→exec");
    for i in 0..1 + args.forks.max(1) {
        let measured = i > 0;
        let disk = reflink_copy(&meta.disk, "tb-raw-fork")?;
        let vm_cfg = raw_cfg(&src.vm, &raw_dir.join("fork"), &disk, &gnet);
        let (mut vm, d_raw) = raw
            .restore(&vm_cfg, &meta.snapshot.state, &meta.token)
            .await?;
        vm.kill().await?;
        let _ = std::fs::remove_file(&disk);
        let fid = new_sandbox_id();
        let t = Instant::now();
        let f = engine
            .fork(
                fid.clone(),
                CreateSpec {
                    name: Some(format!("fork-{i}")),
                    ..CreateSpec::default()
                },
                &ckpt,
            )
            .await?;
        exec_true(&engine.agent(&f.id).await?).await?;
        let d_fork = t.elapsed();
        engine.destroy(&f.id).await?;
        if measured {
            fork.record(d_fork);
            fork_raw.record(d_raw);
        }
        eprintln!(
            "[thermal-bench] fork {}/{}{}: fork→exec {:.3} s (raw {:.3} s)",
            i + 1,
            1 + args.forks.max(1),
            if measured { "" } else { " (warm-up)" },
            d_fork.as_secs_f64(),
            d_raw.as_secs_f64()
        );
    }
    engine.destroy(&id).await?;
    CheckpointMeta::remove(&ckpt)?;
    drop(manager);
    net.remove_tap(&gnet.tap).await?;
    net.release(&gnet);

    let rows = vec![
        row(&warm, Some(&warm_raw)),
        row(&hot, Some(&hot_raw)),
        row(&pause, Some(&stop_raw)),
        row(&cold[0], Some(&cold_raw[0])),
        row(&cold[1], Some(&cold_raw[1])),
        row(&full, Some(&full_raw)),
        row(&fork, Some(&fork_raw)),
    ];
    let notes = vec![
        format!(
            "{label}: {} vCPU, {} MiB (CreateSpec defaults) everywhere; disks: {}; QEMU snapshot \
             (migration stream) {:.0} MiB; no hardware KVM here, so absolute figures are TCG's",
            sb.cpus,
            sb.memory_mb,
            engine.disk_method(),
            snap_bytes as f64 / (1 << 20) as f64
        ),
        "ours wakes through ThermalHandle::agent (touch + Engine::agent_reporting + wake event); \
         the thermal manager runs with both timers 0 (it never cools on its own)"
            .into(),
        "raw restores: QEMU spawned with the backend's own command line (+ -incoming defer) on a \
         reflink of the same disk, migrate-incoming fd:, cont, lohar handshake+ping, exec; own \
         TAP on the same bridge; the engine sandbox is cold/paused meanwhile"
            .into(),
        "caches dropped = sync; echo 3 > /proc/sys/vm/drop_caches before each such sample, both \
         sides; cached/dropped cycles alternate"
            .into(),
        "Full snapshot: ours = guest sync + pause + migrate + fsync + VMM kill + record; raw = \
         QMP stop + migrate to an fd + fsync (of the raw VM restored from the same snapshot)"
            .into(),
        format!(
            "fork: one checkpoint ({:.2} s), then fork → first exec (new id, TAP, disk clone, \
             restore, reidentify, reconnect); raw = restore of the checkpoint file + handshake \
             with the checkpoint's token + exec (no reidentify)",
            d_ckpt.as_secs_f64()
        ),
        format!("thermal info after the warm rows: {wake_events}"),
    ];
    Ok(Section {
        backend: label.clone(),
        ratios: ratios(&rows),
        report: Report {
            benchmark: format!("thermal-bench {label}"),
            host: format!(
                "{}; load average now {}",
                host_description(),
                load_average()
            ),
            rows,
        },
        not_applicable: vec![(
            "Diff snapshot (QEMU)".into(),
            "n/a on QEMU (no diff snapshots; see the firecracker/tiny-guest rows)".into(),
        )],
        notes,
    })
}

/// A reflink (else sparse copy) of `disk` beside it, named `name.ext4`.
fn reflink_copy(disk: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dst_path = disk.with_file_name(format!("{name}.ext4"));
    let _ = std::fs::remove_file(&dst_path);
    let src = std::fs::File::open(disk)?;
    let dst = std::fs::File::create(&dst_path)?;
    if bhatti::storage::ficlone(&src, &dst).is_err() {
        drop(dst);
        bhatti::storage::sparse_copy(disk, &dst_path)?;
    }
    Ok(dst_path)
}

/// The engine's VM config with our run dir, disk and TAP.
fn raw_cfg(engine_vm: &VmConfig, run_dir: &Path, disk: &Path, gnet: &GuestNet) -> VmConfig {
    let mut c = engine_vm.clone();
    c.id = "tb-raw".into();
    c.run_dir = run_dir.to_path_buf();
    c.root_disk = disk.to_path_buf();
    c.net = c.net.as_ref().map(|_| NetConfig {
        tap: gnet.tap.clone(),
        mac: gnet.mac.clone(),
    });
    c
}

// ─────────────────────────────── raw QEMU ───────────────────────────────

struct RawQemu {
    binary: PathBuf,
    accel: Accel,
    netns: String,
}

struct RawVm {
    cfg: VmConfig,
    process: VmmProcess,
    qmp: Qmp,
    client: AgentClient,
}

impl RawQemu {
    /// A new QEMU loading `snapshot` until the agent answers and an exec
    /// `true` is done; the time from spawn.
    async fn restore(
        &self,
        cfg: &VmConfig,
        snapshot: &Path,
        token: &str,
    ) -> anyhow::Result<(RawVm, Duration)> {
        std::fs::create_dir_all(&cfg.run_dir)?;
        for s in [bhatti_vmm::qemu::QMP_SOCKET, bhatti_vmm::qemu::AGENT_SOCKET] {
            let _ = std::fs::remove_file(cfg.run_dir.join(s));
        }
        let mut cfg = cfg.clone();
        cfg.netns = Some(self.netns.clone());
        let args = qemu_args(&cfg, self.accel, &[], true);
        let console = cfg.run_dir.join(bhatti_vmm::qemu::CONSOLE_LOG);
        let file = std::fs::File::open(snapshot)?;
        let t0 = Instant::now();
        let process = VmmProcess::spawn(
            &self.binary,
            &args,
            &cfg.run_dir,
            &console,
            cfg.netns.as_deref(),
        )?;
        let r = async {
            let sock = cfg.run_dir.join(bhatti_vmm::qemu::QMP_SOCKET);
            bhatti_vmm::process::wait_for_path(&sock, Duration::from_secs(20), &process).await?;
            let mut q = Qmp::connect(&sock, Duration::from_secs(20)).await?;
            q.send_fd("snap", file.as_fd()).await?;
            q.execute("migrate-incoming", Some(json!({ "uri": "fd:snap" })))
                .await?;
            loop {
                let st = q.execute("query-status", None).await?;
                match st.get("status").and_then(Value::as_str).unwrap_or("") {
                    "running" => break,
                    "paused" | "postmigrate" => {
                        q.execute("cont", None).await?;
                        break;
                    }
                    "inmigrate" | "prelaunch" | "restore-vm" => {}
                    other => bail!("raw restore: QEMU is {other}"),
                }
                ensure!(t0.elapsed() < BOOT_TIMEOUT, "raw restore timed out");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let agent = cfg.run_dir.join(bhatti_vmm::qemu::AGENT_SOCKET);
            let c = raw_agent(&agent, token, &process, BOOT_TIMEOUT).await?;
            exec_true(&c).await?;
            Ok((q, c))
        }
        .await;
        let d = t0.elapsed();
        match r {
            Ok((mut q, client)) => {
                q.execute(
                    "migrate-set-parameters",
                    Some(json!({ "max-bandwidth": 64u64 << 30 })),
                )
                .await?;
                Ok((
                    RawVm {
                        cfg,
                        process,
                        qmp: q,
                        client,
                    },
                    d,
                ))
            }
            Err(e) => {
                let _ = process.kill().await;
                Err(e.context(format!(
                    "raw restore; console:\n{}",
                    bhatti_vmm::console_tail(&console, 2048)
                )))
            }
        }
    }
}

impl RawVm {
    /// stop, migrate into `path` through an fd, wait for completion, fsync.
    async fn snapshot(&mut self, path: &Path) -> anyhow::Result<()> {
        self.qmp.execute("stop", None).await?;
        let file = std::fs::File::create(path)?;
        self.qmp.send_fd("snap", file.as_fd()).await?;
        self.qmp
            .execute("migrate", Some(json!({ "uri": "fd:snap" })))
            .await?;
        loop {
            let info = self.qmp.execute("query-migrate", None).await?;
            match info.get("status").and_then(Value::as_str).unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => bail!("raw migrate failed: {info}"),
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
        file.sync_all()?;
        Ok(())
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        self.client.close();
        Ok(self.process.kill().await?)
    }
}

/// Connects to lohar through QEMU's chardev socket until the handshake and
/// a ping answer, polling every 1 ms.
async fn raw_agent(
    sock: &Path,
    token: &str,
    process: &VmmProcess,
    timeout: Duration,
) -> anyhow::Result<AgentClient> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    loop {
        ensure!(process.is_alive(), "QEMU exited ({last})");
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "no agent within {timeout:?} ({last})");
        if let Ok(stream) = tokio::net::UnixStream::connect(sock).await {
            let attempt = async {
                let c = AgentClient::connect(stream, token).await?;
                c.ping().await?;
                Ok::<_, bhatti_protocol::ClientError>(c)
            };
            match tokio::time::timeout(left.min(Duration::from_secs(30)), attempt).await {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "handshake timed out".into(),
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ──────────────────────────── artifacts, guard ────────────────────────────

struct Artifacts {
    kernel: PathBuf,
    rootfs: PathBuf,
}

fn newest(dir: &Path, file: &str) -> Option<PathBuf> {
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

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The kernel and rootfs (as the engine tests find them), or one SKIP line.
fn artifacts() -> Option<Artifacts> {
    let cache = Path::new("/var/cache/bhatti-ci");
    let kernel = env_path("BHATTI_KERNEL").or_else(|| newest(&cache.join("kernel"), "vmlinux"));
    let rootfs =
        env_path("BHATTI_ROOTFS").or_else(|| newest(&cache.join("rootfs"), "rootfs+lohar.ext4"));
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (netns, bridge, TAPs, loop mount, drop_caches)");
    }
    if bhatti_vmm::probe::probe().qemu.is_none() {
        missing.push("qemu-system-x86_64");
    }
    if !kernel.as_ref().is_some_and(|p| p.is_file()) {
        missing.push("kernel (BHATTI_KERNEL)");
    }
    if !rootfs.as_ref().is_some_and(|p| p.is_file()) {
        missing.push("rootfs with lohar (BHATTI_ROOTFS)");
    }
    if !missing.is_empty() {
        println!(
            "SKIP thermal-bench: missing {} (eval \"$(scripts/artifacts.sh)\" sets the artifacts)",
            missing.join(", ")
        );
        return None;
    }
    Some(Artifacts {
        kernel: kernel.expect("checked"),
        rootfs: rootfs.expect("checked"),
    })
}

/// The bench's network namespace and scratch dir; dropping it removes every
/// VMM process started under the dir, the engine's XFS loop mount, the
/// namespace (with its bridge and TAPs) and the dir.
pub(crate) struct Guard {
    ns: String,
    dir: tempfile::TempDir,
}

impl Guard {
    fn new() -> anyhow::Result<Guard> {
        Ok(Guard {
            ns: format!("bhatti-t-{}", random_hex(4)),
            dir: tempfile::Builder::new()
                .prefix("bhatti-thermal-bench.")
                .tempdir()?,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let root = self.dir.path();
        let run_dirs = [
            root.join("raw"),
            root.join("engine").join("run"),
            root.join("fc"),
        ];
        for d in run_dirs {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                kill_vmm_of(&e.path());
            }
        }
        let mnt = root.join("engine").join("reflink");
        let deadline = Instant::now() + Duration::from_secs(15);
        while bhatti::storage::is_mountpoint(&mnt) && Instant::now() < deadline {
            let _ = Command::new("umount")
                .arg("-d")
                .arg(&mnt)
                .stderr(std::process::Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(100));
        }
        if bhatti::storage::is_mountpoint(&mnt) {
            eprintln!(
                "[thermal-bench] {} still mounted; lazy unmount",
                mnt.display()
            );
            let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        }
        if Path::new("/run/netns").join(&self.ns).exists() {
            let ok = Command::new("ip")
                .args(["netns", "del", &self.ns])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("[thermal-bench] could not delete netns {}", self.ns);
            }
        }
        eprintln!(
            "[thermal-bench] cleaned up (VMs, mount, netns {}, scratch dir)",
            self.ns
        );
    }
}

/// SIGKILLs the VMM named by `<run_dir>/vmm.pid` if its command line names
/// that run dir (never a recycled pid), and waits until it is gone.
fn kill_vmm_of(run_dir: &Path) {
    let Ok(pid) = std::fs::read_to_string(run_dir.join(bhatti_vmm::process::PID_FILE)) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !bhatti_vmm::process::pid_alive(pid as u32)
        || !String::from_utf8_lossy(&cmdline).contains(&*run_dir.to_string_lossy())
    {
        return;
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while bhatti_vmm::process::pid_alive(pid as u32) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}
