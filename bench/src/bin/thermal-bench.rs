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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context};
use bhatti::config::ThermalConfig;
use bhatti::engine::{
    new_sandbox_id, CheckpointMeta, CreateSpec, Engine, EngineConfig, SandboxRecord,
};
use bhatti::net::GuestNet;
use bhatti::thermal::{ThermalHandle, ThermalManager};
use bhatti_bench::vm::{
    artifact_paths, bench_engine_config, connect_qmp, drop_caches, exec_true, migrate_incoming,
    migrate_to_file, raw_agent, spawn_qemu, uncap_migration, Artifacts, Guard, BOOT_TIMEOUT,
};
use bhatti_bench::{host_description, load_average, Recorder, Row, Section};
use bhatti_protocol::AgentClient;
use bhatti_vmm::process::VmmProcess;
use bhatti_vmm::qemu::{Accel, QemuBackend, QemuConfig, Qmp};
use bhatti_vmm::{NetConfig, VmConfig, VmmBackend};
use clap::Parser;
use serde::Serialize;

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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Some(art) = artifacts() else {
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let guard = Guard::new("thermal-bench", "bhatti-t", &["raw", "fc"])?;
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
        s.print();
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
    bench_engine_config(&mut cfg, &args.subnet, &guard.ns);
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
    net.ensure_tap(&gnet).await?;

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
    Ok(Section::new(
        "thermal-bench",
        label,
        rows,
        vec![(
            "Diff snapshot (QEMU)".into(),
            "n/a on QEMU (no diff snapshots; see the firecracker/tiny-guest rows)".into(),
        )],
        notes,
    ))
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
        let console = cfg.run_dir.join(bhatti_vmm::qemu::CONSOLE_LOG);
        let file = std::fs::File::open(snapshot)?;
        let t0 = Instant::now();
        let process = spawn_qemu(&self.binary, self.accel, &cfg, true)?;
        let r = async {
            let mut q = connect_qmp(&cfg, &process).await?;
            migrate_incoming(&mut q, &file, t0).await?;
            let agent = cfg.run_dir.join(bhatti_vmm::qemu::AGENT_SOCKET);
            let c = raw_agent(&agent, token, &process, BOOT_TIMEOUT).await?;
            exec_true(&c).await?;
            Ok::<_, anyhow::Error>((q, c))
        }
        .await;
        let d = t0.elapsed();
        match r {
            Ok((mut q, client)) => {
                uncap_migration(&mut q).await?;
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
        migrate_to_file(&mut self.qmp, path).await
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        self.client.close();
        Ok(self.process.kill().await?)
    }
}

// ─────────────────────────────── artifacts ───────────────────────────────

/// The kernel and rootfs (as the engine tests find them), or one SKIP line.
fn artifacts() -> Option<Artifacts> {
    let (kernel, rootfs) = artifact_paths();
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (netns, bridge, TAPs, loop mount, drop_caches)");
    }
    if bhatti_vmm::probe::probe().qemu.is_none() {
        missing.push("qemu-system-x86_64");
    }
    if kernel.is_none() {
        missing.push("kernel (BHATTI_KERNEL)");
    }
    if rootfs.is_none() {
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
