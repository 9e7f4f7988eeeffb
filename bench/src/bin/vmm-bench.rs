//! Issue-3 benchmark: the sandbox engine on real VMs, per VMM backend
//! present, beside the raw floors of the same VMM measured in the same run
//! on the same kernel, rootfs and lohar.
//!
//! ```text
//! eval "$(scripts/artifacts.sh)"          # BHATTI_KERNEL, BHATTI_ROOTFS (cached)
//! cargo build --release -p bhatti-bench --bin vmm-bench
//! sudo -E target/release/vmm-bench [--boots 15] [--samples 200] [--json out.json]   # ~5 min
//! ```
//!
//! What is compared (QEMU):
//!
//! | ours (through [`Engine`]) | raw floor |
//! |---|---|
//! | `create` until the agent answers | QEMU spawned with the backend's own command line ([`qemu_args`]) on a prepared disk + config drive, until lohar's handshake and a ping answer |
//! | `agent()` + exec `true` | a static C program in the guest timing posix_spawn+waitpid of `/bin/true` |
//! | `agent()` + write / read 1 KiB | the same program doing what lohar does: tmp file, write, fsync, rename / open, fstat, read |
//! | `pause` | QMP `stop` |
//! | `agent()` + exec `true` on a paused VM | QMP `cont` + exec `true` over a direct agent connection |
//! | `snapshot_to_disk` (sync, pause, migrate, fsync, kill) | QMP `stop` + `migrate` to an fd + fsync |
//! | `restore` + first exec | new QEMU `-incoming defer`, `migrate-incoming`, `cont`, handshake, exec |
//!
//! Every VM runs inside a network namespace the program creates and deletes
//! (a bridge there; a TAP per VM, the raw VMs' too, so the device layout is
//! the same). A guard removes every VM process, the XFS loop mount, the
//! namespace and the scratch dir, on errors, panics and Ctrl-C too. Only one
//! VM runs at a time while something is measured (the other is paused): on
//! two cores under TCG a second busy guest would only measure contention.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use bhatti::engine::{random_hex, CreateSpec, Engine, EngineConfig};
use bhatti::net::{GuestNet, Network};
use bhatti_bench::vm::{
    artifact_paths, bench_engine_config, connect_qmp, exec_true, migrate_incoming, migrate_to_file,
    raw_agent, spawn_qemu, uncap_migration, Artifacts, Guard, BOOT_TIMEOUT,
};
use bhatti_bench::{host_description, load_average, sample, Recorder, Row, Section, Stats};
use bhatti_protocol::client::ExecOutput;
use bhatti_protocol::guest_config::{AgentTransport, GuestConfig, NetworkConfig};
use bhatti_protocol::{AgentClient, ExecRequest, ReadFileRequest, WriteFileRequest};
use bhatti_vmm::process::VmmProcess;
use bhatti_vmm::qemu::{Accel, QemuBackend, QemuConfig, Qmp};
use bhatti_vmm::{NetConfig, VmConfig, VmmBackend};
use bytes::Bytes;
use clap::Parser;
use serde::Serialize;
use serde_json::Value;

#[derive(Parser, Debug, Clone, Serialize)]
#[command(about = "Benchmark the sandbox engine on real VMs beside raw VMM floors")]
struct Args {
    /// Measured boots per side (engine create / raw QEMU boot), alternated.
    #[arg(long, default_value_t = 15)]
    boots: usize,
    /// Unmeasured boots per side first (page cache, the XFS base import).
    #[arg(long, default_value_t = 1)]
    warmup_boots: usize,
    /// Samples of exec `true`, 1 KiB read and 1 KiB write.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Iterations of the in-guest floor program per operation.
    #[arg(long, default_value_t = 300)]
    guest_samples: usize,
    /// Pause → request cycles per side.
    #[arg(long, default_value_t = 30)]
    pauses: usize,
    /// Snapshot → restore cycles per side.
    #[arg(long, default_value_t = 15)]
    snapshots: usize,
    /// Guest subnet inside the bench's network namespace.
    #[arg(long, default_value = "10.79.0.1/24")]
    subnet: String,
    /// Write the JSON report here (default: stdout after the table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Samples per side of each Firecracker tiny-guest operation (and of
    /// the Linux-guest boots and snapshot cycles under hardware KVM).
    #[arg(long, default_value_t = 30)]
    fc_samples: usize,
    /// Unrecorded Firecracker samples per operation and side first.
    #[arg(long, default_value_t = 2)]
    fc_warmup: usize,
    /// Run only this backend's rows.
    #[arg(long, value_parser = ["qemu", "firecracker"])]
    only: Option<String>,
}

/// Where the floor program goes in the guest, and the files it and we use.
const GUEST_HELPER: &str = "/tmp/vmm-bench-helper";
const GUEST_FILE: &str = "/home/lohar/vmm-bench.dat";
const GUEST_FLOOR_FILE: &str = "/home/lohar/vmm-bench-floor.dat";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let art = artifacts();
    let only_fc = args.only.as_deref() == Some("firecracker");
    if art.is_none() && !only_fc {
        return Ok(());
    }
    if art.is_none() {
        eprintln!("[vmm-bench] --only firecracker: the tiny-guest rows need none of that");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let guard = Guard::new("vmm-bench", "bhatti-b", &["raw"])?;
    let load_start = load_average();
    eprintln!(
        "[vmm-bench] netns {}, scratch {}, load average {load_start}",
        guard.ns,
        guard.dir.path().display()
    );
    let result = rt.block_on(async {
        tokio::select! {
            r = run(&args, art.as_ref(), &guard) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    // Everything is removed before the report is printed (or the error).
    drop(guard);
    let backends = result?;
    let out = Output {
        benchmark: "vmm-bench".into(),
        host: host_description(),
        load_average_start: load_start,
        load_average_end: load_average(),
        network: "every VM in a network namespace the bench creates and deletes".into(),
        args,
        backends,
    };
    for b in &out.backends {
        b.print();
    }
    println!(
        "load average (1/5/15 min): {} at start, {} at end",
        out.load_average_start, out.load_average_end
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
    network: String,
    args: Args,
    backends: Vec<Section>,
}

async fn run(args: &Args, art: Option<&Artifacts>, guard: &Guard) -> anyhow::Result<Vec<Section>> {
    let host = bhatti_vmm::probe::probe();
    let mut out = Vec::new();
    let only = args.only.as_deref();
    match (host.qemu.is_some(), art) {
        _ if only == Some("firecracker") => {}
        (true, Some(art)) => {
            let backend = QemuBackend::new(QemuConfig::default())?;
            if backend.accel() == Accel::Tcg {
                eprintln!(
                    "[vmm-bench] no hardware KVM here: QEMU runs guests under TCG (software \
                     emulation); absolute figures are those of an emulated CPU"
                );
            }
            out.push(bench_qemu(args, art, guard, backend).await?);
        }
        _ => eprintln!("[vmm-bench] SKIP qemu: qemu-system-x86_64 not found (BHATTI_QEMU or PATH)"),
    }
    if only != Some("qemu") {
        out.extend(firecracker::bench_firecracker(args, art, guard, &host).await?);
    }
    ensure!(!out.is_empty(), "no VMM backend present");
    Ok(out)
}

// Firecracker rows (tiny guest always; Linux guest with hardware KVM).
#[path = "vmm_bench/firecracker.rs"]
mod firecracker;

async fn bench_qemu(
    args: &Args,
    art: &Artifacts,
    guard: &Guard,
    backend: QemuBackend,
) -> anyhow::Result<Section> {
    let label = format!("qemu/{:?}", backend.accel()).to_lowercase();
    let helper = compile_helper(guard.dir.path())?;
    let spec = CreateSpec::default();
    let mut cfg = EngineConfig::new(
        guard.dir.path().join("engine"),
        &art.kernel,
        &art.rootfs,
        Arc::new(backend.clone()) as Arc<dyn VmmBackend>,
    );
    bench_engine_config(&mut cfg, &args.subnet, &guard.ns);
    let engine = Engine::new(cfg).await?;
    let raw = RawQemu {
        binary: backend.binary().to_path_buf(),
        accel: backend.accel(),
        net: engine.network().context("the engine has no network")?,
        dir: guard.dir.path().join("raw"),
        kernel: art.kernel.clone(),
        rootfs: art.rootfs.clone(),
        vcpus: spec.cpus,
        memory_mib: spec.memory_mb,
        netns: guard.ns.clone(),
    };
    std::fs::create_dir_all(&raw.dir)?;
    let mut notes = vec![
        format!(
            "{label}: {} vCPU, {} MiB (CreateSpec defaults) on both sides; disks: {}",
            spec.cpus,
            spec.memory_mb,
            engine.disk_method()
        ),
        "raw boots get their disk copy, config drive and TAP before the clock starts; \
         the engine's create includes making them"
            .into(),
    ];

    // 1. Boots, alternated so drift in the machine's load hits all sides:
    // engine create, raw boot with the disk on the engine's filesystem, raw
    // boot with a page-cached scratch copy. One VM runs at a time.
    let mut create = Recorder::new("create-to-ready (engine)");
    let mut raw_boot = Recorder::new("raw QEMU spawn → lohar handshake+ping");
    let mut raw_boot_scratch = Recorder::new("raw boot, disk page-cached on scratch");
    let mut raw_init = Recorder::new("raw QEMU spawn → kernel runs init");
    let mut raw_user = Recorder::new("raw QEMU spawn → 1st userspace byte");
    let total = args.warmup_boots + args.boots.max(1);
    let data_dir = guard.dir.path().join("engine");
    let mut engine_disk = RawDisk::Scratch;
    let mut kept: Option<(String, RawVm)> = None;
    for i in 0..total {
        let measured = i >= args.warmup_boots;
        let last = i + 1 == total;
        let t = Instant::now();
        let sb = engine
            .create(CreateSpec {
                name: Some(format!("bench-{i}")),
                ..CreateSpec::default()
            })
            .await?;
        let d = t.elapsed();
        if measured {
            create.record(d);
        }
        if last {
            engine.pause(&sb.id).await?;
        } else {
            engine.destroy(&sb.id).await?;
        }
        if i == 0 {
            engine_disk = RawDisk::like_engine(&engine, &data_dir, &art.rootfs);
            notes.push(match &engine_disk {
                RawDisk::EngineFs { .. } => format!(
                    "raw boot floor: its disk is reflinked on the engine's disk filesystem ({}), \
                     as the engine's are; the scratch-disk row has a page-cached sparse copy",
                    engine.disk_method()
                ),
                RawDisk::Scratch => "raw boot floor: its disk is a sparse copy on scratch".into(),
            });
        }
        let (scratch_vm, scratch) = raw.boot(&format!("raw-s{i}"), &RawDisk::Scratch).await?;
        scratch_vm.destroy(raw.net).await?;
        let (vm, times) = raw.boot(&format!("raw-{i}"), &engine_disk).await?;
        if measured {
            raw_boot.record(times.agent);
            raw_boot_scratch.record(scratch.agent);
            if let Some(t) = times.init {
                raw_init.record(t);
            }
            if let Some(t) = times.user {
                raw_user.record(t);
            }
        }
        eprintln!(
            "[vmm-bench] boot {}/{}{}: engine create {:.2} s, raw {:.2} s (init {:.2} s, \
             userspace {:.2} s), raw with scratch disk {:.2} s",
            i + 1,
            total,
            if measured { "" } else { " (warm-up)" },
            d.as_secs_f64(),
            times.agent.as_secs_f64(),
            times.init.unwrap_or_default().as_secs_f64(),
            times.user.unwrap_or_default().as_secs_f64(),
            scratch.agent.as_secs_f64(),
        );
        if last {
            kept = Some((sb.id, vm));
        } else {
            vm.destroy(raw.net).await?;
        }
    }
    let (id, mut vm) = kept.expect("at least one boot");
    if raw_user.stats().samples == 0 {
        notes.push("no userspace console byte was recognised after 'Run … as init process'".into());
    }

    // 2. Exec, files, and the in-guest floors, on the engine's VM (the raw
    // VM stopped). Engine samples and floor runs alternate in rounds, so a
    // change in the machine's load hits both.
    vm.qmp("stop", None).await?;
    engine.resume(&id).await?;
    let n = args.samples.max(1);
    let gs = args.guest_samples.max(1);
    let rounds = ROUNDS.min(n).min(gs);
    let tsc = host_tsc_ns_per_tick();
    let c = engine.agent(&id).await?;
    c.write_file(
        WriteFileRequest {
            path: GUEST_HELPER.into(),
            mode: Some(0o755),
            place: false,
        },
        Bytes::from(std::fs::read(&helper)?),
    )
    .await?;
    let clocksource = exec_ok(
        &c,
        &[
            "cat",
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        ],
    )
    .await
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    .unwrap_or_else(|e| format!("unknown ({e})"));
    drop(c);
    let mut exec = Recorder::new("exec true (engine)");
    let mut write = Recorder::new("write 1 KiB (engine)");
    let mut read = Recorder::new("read 1 KiB (engine)");
    let mut spawn_floor = Recorder::new("in-guest posix_spawn+wait true");
    let mut write_floor = Recorder::new("in-guest tmp+write+fsync+rename");
    let mut read_floor = Recorder::new("in-guest open+fstat+read 1 KiB");
    let mut tsc_check = Vec::new();
    let e = engine.clone();
    for r in 0..rounds {
        let (k, gk) = (share(n, rounds, r), share(gs, rounds, r));
        let warm = if r == 0 { 10 } else { 0 };
        time_into(&mut exec, warm, k, || {
            let (e, id) = (e.clone(), id.clone());
            async move { exec_true(&e.agent(&id).await?).await }
        })
        .await?;
        time_into(&mut write, warm, k, || {
            let (e, id) = (e.clone(), id.clone());
            async move {
                let w = e
                    .agent(&id)
                    .await?
                    .write_file(
                        WriteFileRequest {
                            path: GUEST_FILE.into(),
                            mode: None,
                            place: false,
                        },
                        Bytes::from(vec![b'b'; 1024]),
                    )
                    .await?;
                ensure!(w.bytes == 1024);
                Ok(())
            }
        })
        .await?;
        time_into(&mut read, warm, k, || {
            let (e, id) = (e.clone(), id.clone());
            async move {
                let (b, _) = e
                    .agent(&id)
                    .await?
                    .read_file_all(ReadFileRequest {
                        path: GUEST_FILE.into(),
                        ..Default::default()
                    })
                    .await?;
                ensure!(b.len() == 1024);
                Ok(())
            }
        })
        .await?;
        let c = engine.agent(&id).await?;
        for (rec, mode, path) in [
            (&mut spawn_floor, "spawn", None),
            (&mut write_floor, "write", Some(GUEST_FLOOR_FILE)),
            (&mut read_floor, "read", Some(GUEST_FLOOR_FILE)),
        ] {
            tsc_check.push(guest_floor(&c, rec, mode, gk, path, tsc).await?);
        }
    }
    let (exec, write, read) = (exec.stats(), write.stats(), read.stats());
    let (spawn_floor, write_floor, read_floor) =
        (spawn_floor.stats(), write_floor.stats(), read_floor.stats());
    let (guest_ms, host_ms) = tsc_check
        .iter()
        .fold((0.0, 0.0), |(g, h), (a, b)| (g + a, h + b));
    notes.push(format!(
        "in-guest floors are timed with rdtsc at the host's TSC rate ({:.4} GHz; under TCG \
         the guest TSC is the host's): the helper runs' own TSC spans add up to {guest_ms:.0} ms \
         of {host_ms:.0} ms of exec seen from the host. The guest's clocksource is \
         {clocksource}{}",
        1.0 / tsc,
        if clocksource.contains("jiffies") {
            " (4 ms steps at HZ=250): too coarse for one operation"
        } else {
            ""
        },
    ));

    // 3. A request on a paused VM: engine and raw cycles alternate, each VM
    // paused while the other works (so each stays paused for a while).
    let pauses = args.pauses.max(1);
    let mut pause = Recorder::new("pause (engine)");
    let mut wake = Recorder::new("paused: resume+exec true (engine)");
    let mut stop = Recorder::new("raw QMP stop");
    let mut cont = Recorder::new("raw QMP cont");
    let mut cont_exec = Recorder::new("raw QMP cont + exec true");
    let rc = vm.client.clone().context("raw agent")?;
    for _ in 0..pauses {
        // engine running, raw stopped
        let t = Instant::now();
        engine.pause(&id).await?;
        pause.record(t.elapsed());
        let t = Instant::now();
        vm.qmp("cont", None).await?;
        cont.record(t.elapsed());
        exec_true(&rc).await?;
        cont_exec.record(t.elapsed());
        let t = Instant::now();
        vm.qmp("stop", None).await?;
        stop.record(t.elapsed());
        let t = Instant::now();
        exec_true(&engine.agent(&id).await?).await?;
        wake.record(t.elapsed());
    }

    // 4. The raw VM alone (engine paused): exec and ping over a direct
    // agent connection, i.e. the agent without the engine.
    engine.pause(&id).await?;
    vm.qmp("cont", None).await?;
    let raw_exec = sample("exec true (raw VM, AgentClient)", 10, n, || {
        let rc = rc.clone();
        async move { exec_true(&rc).await }
    })
    .await?;
    let raw_ping = sample("agent ping (raw VM, AgentClient)", 20, n, || {
        let rc = rc.clone();
        async move { Ok(rc.ping().await?) }
    })
    .await?;
    drop(rc);

    // 5. Snapshot → restore, engine and raw cycles alternating, the other
    // VM paused.
    let snaps = args.snapshots.max(1);
    let mut snap = Recorder::new("Full snapshot (snapshot_to_disk)");
    let mut restore = Recorder::new("restore-to-first-exec (engine)");
    let mut raw_snap = Recorder::new("raw QMP stop+migrate→file+fsync");
    let mut raw_running = Recorder::new("raw QEMU -incoming → running");
    let mut raw_restore = Recorder::new("raw -incoming+cont+handshake+exec");
    let file = vm.cfg.run_dir.join("snapshot.state");
    for i in 0..snaps {
        // raw running, engine paused
        let t = Instant::now();
        vm.snapshot(&file).await?;
        let rs = t.elapsed();
        raw_snap.record(rs);
        vm.kill().await?;
        let (running, first_exec) = vm.restore(&raw, &file).await?;
        raw_running.record(running);
        raw_restore.record(first_exec);
        let _ = std::fs::remove_file(&file);
        vm.qmp("stop", None).await?;
        engine.resume(&id).await?;
        let t = Instant::now();
        engine.snapshot_to_disk(&id).await?;
        let s = t.elapsed();
        snap.record(s);
        let t = Instant::now();
        engine.restore(&id).await?;
        exec_true(&engine.agent(&id).await?).await?;
        let r = t.elapsed();
        restore.record(r);
        engine.pause(&id).await?;
        vm.qmp("cont", None).await?;
        eprintln!(
            "[vmm-bench] snapshot {}/{snaps}: engine {:.3} s, restore→exec {:.3} s; \
             raw {:.3} s, restore→exec {:.3} s",
            i + 1,
            s.as_secs_f64(),
            r.as_secs_f64(),
            rs.as_secs_f64(),
            first_exec.as_secs_f64()
        );
    }
    vm.destroy(raw.net).await?;
    engine.destroy(&id).await?;

    let ratio_met = |op: &Stats, floor: &Stats, max: f64| Some(op.p50_us <= max * floor.p50_us);
    let row = |op: Stats, floor: Option<Stats>, target: &str| Row {
        op,
        floor,
        target: target.into(),
        met: None,
    };
    let create = create.stats();
    let raw_boot = raw_boot.stats();
    let mut rows = vec![
        Row {
            met: ratio_met(&create, &raw_boot, 1.15),
            op: create,
            floor: Some(raw_boot),
            target: "≤ 1.15 × floor".into(),
        },
        row(raw_boot_scratch.stats(), None, "(raw, info)"),
        row(raw_init.stats(), None, "(raw, info)"),
        row(raw_user.stats(), None, "(raw, info)"),
        Row {
            met: ratio_met(&exec, &spawn_floor, 1.1),
            op: exec,
            floor: Some(spawn_floor.clone()),
            target: "≤ 1.1 × floor".into(),
        },
        row(raw_exec, Some(spawn_floor), "(info)"),
        row(raw_ping, None, "(raw, info)"),
        row(write, Some(write_floor), "-"),
        row(read, Some(read_floor), "-"),
        row(pause.stats(), Some(stop.stats()), "-"),
        row(wake.stats(), Some(cont_exec.stats()), "-"),
        row(cont.stats(), None, "(raw, info)"),
        row(snap.stats(), Some(raw_snap.stats()), "-"),
        row(restore.stats(), Some(raw_restore.stats()), "-"),
        row(raw_running.stats(), None, "(raw, info)"),
    ];
    rows.retain(|r| r.op.samples > 0);
    notes.push(
        "write/read floors: the same syscalls lohar makes, timed inside the guest by a static \
         C program (gcc -static at bench time), not the agent round trip"
            .into(),
    );
    notes.push(
        "engine snapshot = guest sync + pause + migrate + fsync + VMM kill; the raw floor has \
         no sync and no kill"
            .into(),
    );
    Ok(Section::new(
        "vmm-bench",
        label,
        rows,
        vec![(
            "Diff snapshot".into(),
            "n/a (QEMU has no diff snapshots)".into(),
        )],
        notes,
    ))
}

async fn exec_ok(c: &AgentClient, argv: &[&str]) -> anyhow::Result<ExecOutput> {
    let out = c
        .exec(
            ExecRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                timeout_ms: Some(600_000),
                ..Default::default()
            },
            None,
        )
        .await?;
    ensure!(
        out.status.exit_code == 0,
        "{argv:?} exited {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// Runs the floor program in the guest, adding its samples to `rec`. Its
/// stdout: one TSC tick count a line, after a `# ` line with the total ticks
/// of the run. Returns (the run's TSC span, the exec's duration on the
/// host), both in ms, to check the TSC rate.
async fn guest_floor(
    c: &AgentClient,
    rec: &mut Recorder,
    mode: &str,
    n: usize,
    path: Option<&str>,
    ns_per_tick: f64,
) -> anyhow::Result<(f64, f64)> {
    let n_s = n.to_string();
    let mut argv = vec![GUEST_HELPER, mode, n_s.as_str()];
    argv.extend(path);
    let t = Instant::now();
    let out = exec_ok(c, &argv).await?;
    let host_ms = t.elapsed().as_secs_f64() * 1e3;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (mut got, mut span_ms) = (0, 0.0);
    for line in stdout.lines() {
        if let Some(info) = line.strip_prefix("# ") {
            let total: f64 = info
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("total_ticks="))
                .and_then(|v| v.parse().ok())
                .context("floor program: no total_ticks")?;
            span_ms = total * ns_per_tick / 1e6;
            continue;
        }
        let ticks: f64 = line
            .trim()
            .parse()
            .with_context(|| format!("floor program printed {line:?}"))?;
        rec.record(Duration::from_nanos((ticks * ns_per_tick) as u64));
        got += 1;
    }
    ensure!(got == n, "floor program gave {got} of {n} samples");
    Ok((span_ms, host_ms))
}

/// Engine and floor samples are taken in this many alternating rounds.
const ROUNDS: usize = 5;

/// Round `r`'s part of `n` samples split over `rounds`.
fn share(n: usize, rounds: usize, r: usize) -> usize {
    n / rounds + usize::from(r < n % rounds)
}

/// [`sample`] into an existing recorder.
async fn time_into<F, Fut>(
    rec: &mut Recorder,
    warmup: usize,
    n: usize,
    mut f: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..warmup {
        f().await?;
    }
    for _ in 0..n {
        let t = Instant::now();
        f().await?;
        rec.record(t.elapsed());
    }
    Ok(())
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter; it has no memory effects and exists on
    // every x86-64 CPU.
    unsafe { std::arch::x86_64::_rdtsc() }
}

/// ns per TSC tick on this host, measured against the monotonic clock.
fn host_tsc_ns_per_tick() -> f64 {
    let measure = || {
        let (t0, k0) = (Instant::now(), rdtsc());
        std::thread::sleep(Duration::from_millis(250));
        let (ns, k1) = (t0.elapsed().as_nanos() as f64, rdtsc());
        ns / (k1 - k0) as f64
    };
    (measure() + measure()) / 2.0
}

/// The in-guest floor program: N× one operation (after a warm-up), each
/// timed in TSC ticks, printed after the loop.
const HELPER_C: &str = r##"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;
static char buf[1024];

static void die(const char *what) { perror(what); exit(1); }

static void once(const char *mode, const char *path, const char *tmp) {
    if (!strcmp(mode, "spawn")) {
        char *av[] = {"/bin/true", NULL};
        pid_t pid;
        int st, e = posix_spawn(&pid, "/bin/true", NULL, NULL, av, environ);
        if (e) { errno = e; die("posix_spawn"); }
        if (waitpid(pid, &st, 0) < 0) die("waitpid");
        if (!WIFEXITED(st) || WEXITSTATUS(st)) { fputs("true failed\n", stderr); exit(1); }
    } else if (!strcmp(mode, "write")) {
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0) die("open tmp");
        if (write(fd, buf, sizeof buf) != (ssize_t)sizeof buf) die("write");
        if (fsync(fd)) die("fsync");
        if (fchmod(fd, 0644)) die("fchmod");
        if (close(fd)) die("close");
        if (rename(tmp, path)) die("rename");
    } else if (!strcmp(mode, "read")) {
        struct stat sb;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) die("open");
        if (fstat(fd, &sb)) die("fstat");
        ssize_t n = read(fd, buf, sizeof buf);
        if (n != 1024) { fprintf(stderr, "short read %zd\n", n); exit(1); }
        close(fd);
    } else {
        fputs("usage: helper spawn|write|read N [path]\n", stderr);
        exit(2);
    }
}

/* Timing: the guest's CLOCK_MONOTONIC may tick in jiffies (4 ms under TCG
 * microvm, where the kernel trusts no TSC), too coarse for one operation.
 * So each operation is timed in TSC ticks (lfence; rdtsc); the host converts
 * them at its own TSC rate (under TCG the guest reads the host's TSC). */
static inline unsigned long long tsc(void) {
    unsigned int lo, hi;
    __asm__ __volatile__("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((unsigned long long)hi << 32) | lo;
}

int main(int argc, char **argv) {
    if (argc < 3) { fputs("usage: helper spawn|write|read N [path]\n", stderr); return 2; }
    const char *mode = argv[1];
    int n = atoi(argv[2]);
    const char *path = argc > 3 ? argv[3] : "/tmp/vmm-bench.dat";
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    memset(buf, 'b', sizeof buf);
    int warm = n / 10 < 5 ? 5 : n / 10;
    unsigned long long *d = malloc(sizeof *d * (n > 0 ? n : 1));
    if (!d) die("malloc");
    unsigned long long k0 = tsc();
    for (int i = 0; i < warm; i++) once(mode, path, tmp);
    for (int i = 0; i < n; i++) {
        unsigned long long t = tsc();
        once(mode, path, tmp);
        d[i] = tsc() - t;
    }
    printf("# total_ticks=%llu\n", tsc() - k0);
    for (int i = 0; i < n; i++) printf("%llu\n", d[i]);
    return 0;
}
"##;

fn compile_helper(dir: &Path) -> anyhow::Result<PathBuf> {
    let src = dir.join("helper.c");
    let bin = dir.join("helper");
    std::fs::write(&src, HELPER_C)?;
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .context("running gcc")?;
    ensure!(
        out.status.success(),
        "gcc -static failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(bin)
}

// ─────────────────────────────── raw QEMU ───────────────────────────────

/// Boots VMs by spawning QEMU directly with the backend's command line.
struct RawQemu<'a> {
    binary: PathBuf,
    accel: Accel,
    /// The engine's network: addresses from its pool, TAPs on its bridge.
    net: &'a Network,
    dir: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    vcpus: u8,
    memory_mib: u32,
    netns: String,
}

/// Where a raw VM's root disk is made (before the clock starts).
#[derive(Debug, Clone)]
enum RawDisk {
    /// A sparse copy in the scratch dir: fresh in the host's page cache.
    Scratch,
    /// A reflink of `base` into `dir`, on the engine's own disk filesystem
    /// (its XFS loop here), as the engine's disks are.
    EngineFs { base: PathBuf, dir: PathBuf },
}

impl RawDisk {
    /// The engine's way when it reflinks (after its first create imported
    /// the base), else a scratch copy.
    fn like_engine(engine: &Engine, data_dir: &Path, rootfs: &Path) -> RawDisk {
        use bhatti::storage::DiskMethod;
        match engine.disk_method() {
            DiskMethod::XfsLoop => {
                let bases = data_dir.join("reflink").join("bases");
                let base = std::fs::read_dir(&bases)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|x| x == "ext4"));
                match base {
                    Some(base) => RawDisk::EngineFs {
                        base,
                        dir: data_dir.join("reflink").join("bench-raw"),
                    },
                    None => RawDisk::Scratch,
                }
            }
            DiskMethod::Reflink => RawDisk::EngineFs {
                base: rootfs.to_path_buf(),
                dir: data_dir.join("bench-raw"),
            },
            DiskMethod::Copy => RawDisk::Scratch,
        }
    }

    fn make(&self, id: &str, run_dir: &Path, rootfs: &Path) -> anyhow::Result<PathBuf> {
        match self {
            RawDisk::Scratch => {
                let disk = run_dir.join("rootfs.ext4");
                bhatti::storage::sparse_copy(rootfs, &disk)?;
                Ok(disk)
            }
            RawDisk::EngineFs { base, dir } => {
                std::fs::create_dir_all(dir)?;
                let disk = dir.join(format!("{id}.ext4"));
                let src = std::fs::File::open(base)?;
                let dst = std::fs::File::create(&disk)?;
                bhatti::storage::ficlone(&src, &dst).with_context(|| {
                    format!("reflinking {} to {}", base.display(), disk.display())
                })?;
                Ok(disk)
            }
        }
    }
}

struct BootTimes {
    agent: Duration,
    init: Option<Duration>,
    user: Option<Duration>,
}

struct RawVm {
    cfg: VmConfig,
    gnet: GuestNet,
    token: String,
    process: VmmProcess,
    qmp: Option<Qmp>,
    client: Option<AgentClient>,
}

impl RawQemu<'_> {
    /// Disk copy, config drive, TAP: what the engine's create makes.
    async fn prepare(
        &self,
        id: &str,
        disk: &RawDisk,
    ) -> anyhow::Result<(VmConfig, GuestNet, String)> {
        let run_dir = self.dir.join(id);
        std::fs::create_dir_all(&run_dir)?;
        let root_disk = disk.make(id, &run_dir, &self.rootfs)?;
        let gnet = self.net.allocate(id)?;
        self.net.ensure_tap(&gnet).await?;
        let token = random_hex(32);
        let config_disk = run_dir.join("config.ext4");
        let gc = GuestConfig {
            sandbox_id: id.to_owned(),
            hostname: id.to_owned(),
            token: token.clone(),
            env: Default::default(),
            files: Vec::new(),
            init: None,
            dns: Vec::new(),
            dns_search: Vec::new(),
            agent: AgentTransport::Serial {
                name: bhatti_vmm::AGENT_SERIAL_NAME.to_owned(),
            },
            network: Some(NetworkConfig {
                address: format!("{}/{}", gnet.ip, gnet.prefix),
                gateway: Some(gnet.gateway),
                interface: "eth0".into(),
            }),
            user: None,
            workdir: None,
            mounts: Vec::new(),
        };
        bhatti::storage::write_config_drive(&config_disk, &gc).await?;
        let cfg = VmConfig {
            id: id.to_owned(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: self.kernel.clone(),
            kernel_args: self.net.subnet().kernel_ip_arg(gnet.ip),
            root_disk,
            config_disk: Some(config_disk),
            net: Some(NetConfig {
                tap: gnet.tap.clone(),
                mac: gnet.mac.clone(),
            }),
            netns: Some(self.netns.clone()),
            run_dir,
            data_disks: Vec::new(),
        };
        Ok((cfg, gnet, token))
    }

    fn spawn(&self, cfg: &VmConfig, incoming: bool) -> anyhow::Result<VmmProcess> {
        spawn_qemu(&self.binary, self.accel, cfg, incoming)
    }

    /// Spawn → handshake+ping answered; QMP connected afterwards, unmeasured.
    async fn boot(&self, id: &str, disk: &RawDisk) -> anyhow::Result<(RawVm, BootTimes)> {
        let (cfg, gnet, token) = self.prepare(id, disk).await?;
        let console = cfg.run_dir.join(bhatti_vmm::qemu::CONSOLE_LOG);
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn(watch_console(console.clone(), t0, stop.clone()));
        let process = match self.spawn(&cfg, false) {
            Ok(p) => p,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                self.release(&gnet).await;
                return Err(e);
            }
        };
        let agent_sock = cfg.run_dir.join(bhatti_vmm::qemu::AGENT_SOCKET);
        let mut vm = RawVm {
            cfg,
            gnet,
            token,
            process,
            qmp: None,
            client: None,
        };
        let client = raw_agent(&agent_sock, &vm.token, &vm.process, BOOT_TIMEOUT).await;
        let agent = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        let (init, user) = watcher.await.unwrap_or((None, None));
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                let tail = bhatti_vmm::console_tail(&console, 2048);
                let _ = vm.destroy(self.net).await;
                bail!("raw boot of {id}: {e}; console:\n{tail}");
            }
        };
        vm.client = Some(client);
        vm.connect_qmp().await?;
        Ok((vm, BootTimes { agent, init, user }))
    }

    async fn release(&self, gnet: &GuestNet) {
        if let Err(e) = self.net.remove_tap(&gnet.tap).await {
            eprintln!("[vmm-bench] removing {}: {e}", gnet.tap);
        }
        self.net.release(gnet);
    }
}

impl RawVm {
    async fn connect_qmp(&mut self) -> anyhow::Result<()> {
        let mut q = connect_qmp(&self.cfg, &self.process).await?;
        uncap_migration(&mut q).await?;
        self.qmp = Some(q);
        Ok(())
    }

    async fn qmp(&mut self, cmd: &str, args: Option<Value>) -> anyhow::Result<Value> {
        let q = self.qmp.as_mut().context("no QMP connection")?;
        Ok(q.execute(cmd, args).await?)
    }

    /// stop, migrate into `path` through an fd, wait for completion, fsync.
    async fn snapshot(&mut self, path: &Path) -> anyhow::Result<()> {
        let q = self.qmp.as_mut().context("no QMP connection")?;
        migrate_to_file(q, path).await
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.client.take() {
            c.close();
        }
        self.qmp = None;
        Ok(self.process.kill().await?)
    }

    /// A new QEMU loading `snapshot`: (until running, until first exec answered).
    async fn restore(
        &mut self,
        raw: &RawQemu<'_>,
        snapshot: &Path,
    ) -> anyhow::Result<(Duration, Duration)> {
        let file = std::fs::File::open(snapshot)?;
        let t0 = Instant::now();
        self.process = raw.spawn(&self.cfg, true)?;
        let mut q = connect_qmp(&self.cfg, &self.process).await?;
        migrate_incoming(&mut q, &file, t0).await?;
        let running = t0.elapsed();
        let agent = self.cfg.run_dir.join(bhatti_vmm::qemu::AGENT_SOCKET);
        let c = raw_agent(&agent, &self.token, &self.process, BOOT_TIMEOUT).await?;
        exec_true(&c).await?;
        let first_exec = t0.elapsed();
        uncap_migration(&mut q).await?;
        self.qmp = Some(q);
        self.client = Some(c);
        Ok((running, first_exec))
    }

    async fn destroy(mut self, net: &Network) -> anyhow::Result<()> {
        self.kill().await?;
        net.remove_tap(&self.gnet.tap).await?;
        net.release(&self.gnet);
        let _ = std::fs::remove_file(&self.cfg.root_disk);
        let _ = std::fs::remove_dir_all(&self.cfg.run_dir);
        Ok(())
    }
}

/// Polls the console log: when the kernel hands over to init, and the first
/// byte after that which is not a kernel message (lohar's own output).
async fn watch_console(
    path: PathBuf,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> (Option<Duration>, Option<Duration>) {
    const INIT: &str = "as init process";
    let (mut init, mut user) = (None, None);
    let mut seen_len = 0;
    while !stop.load(Ordering::Relaxed) && user.is_none() {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len != seen_len {
            seen_len = len;
            let text = std::fs::read(&path).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            if let Some(at) = text.find(INIT) {
                init.get_or_insert_with(|| t0.elapsed());
                let after = &text[at..];
                let rest = after.split_once('\n').map(|x| x.1).unwrap_or("");
                // Kernel lines start with "[" (printk time); a line
                // starting otherwise comes from userspace.
                if rest
                    .lines()
                    .any(|l| !l.trim().is_empty() && !l.starts_with('['))
                {
                    user = Some(t0.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (init, user)
}

// ─────────────────────────────── artifacts ───────────────────────────────

/// The kernel and rootfs (as the engine tests find them), or one SKIP line.
fn artifacts() -> Option<Artifacts> {
    let (kernel, rootfs) = artifact_paths();
    let gcc = Command::new("gcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (netns, bridge, TAPs, loop mount)");
    }
    if bhatti_vmm::probe::probe().qemu.is_none() && bhatti_vmm::probe::probe().firecracker.is_none()
    {
        missing.push("a VMM (qemu-system-x86_64 / firecracker)");
    }
    if kernel.is_none() {
        missing.push("kernel (BHATTI_KERNEL)");
    }
    if rootfs.is_none() {
        missing.push("rootfs with lohar (BHATTI_ROOTFS)");
    }
    if !gcc {
        missing.push("gcc (for the in-guest floor program)");
    }
    if !missing.is_empty() {
        println!(
            "SKIP vmm-bench: missing {} (eval \"$(scripts/artifacts.sh)\" sets the artifacts)",
            missing.join(", ")
        );
        return None;
    }
    Some(Artifacts {
        kernel: kernel.expect("checked"),
        rootfs: rootfs.expect("checked"),
    })
}
