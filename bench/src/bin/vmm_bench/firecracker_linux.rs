//! Firecracker on a Linux guest: the engine with `FirecrackerBackend`
//! beside raw Firecracker boots of the same kernel, rootfs and lohar, as
//! the QEMU section does for QEMU. Needs hardware KVM.
//!
//! NOT RUN where this was written: that host's /dev/kvm is PVM, on which
//! Firecracker cannot boot Linux (only the tiny guest). The code compiles
//! and follows the QEMU section's proven flow; the first run on a hardware
//! KVM host is its test.
//!
//! | ours (through `Engine`) | raw floor |
//! |---|---|
//! | `create` until the agent answers | firecracker spawned here, the backend's device PUTs + InstanceStart, until lohar's vsock handshake + ping (kernel→init from the console, info) |
//! | exec `true` | posix_spawn+waitpid of `/bin/true` inside the guest |
//! | `pause` / exec on a paused VM | `PATCH /vm Paused` / `PATCH /vm Resumed` + exec |
//! | `snapshot_to_disk` of a freshly booted VMM (Full) | pause + `PUT /snapshot/create` Full + fsync |
//! | `snapshot_to_disk` of a restored VMM (Diff + merge, where the engine chains) | pause + `PUT /snapshot/create` Diff + fsync |
//! | `restore` + first exec | new process + `PUT /snapshot/load` (resume) + handshake + exec |

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bhatti::engine::{random_hex, CreateSpec, Engine, EngineConfig};
use bhatti::net::{GuestNet, NetSettings, Network};
use bhatti_bench::{Recorder, Row, Stats};
use bhatti_protocol::guest_config::{AgentTransport, GuestConfig, NetworkConfig};
use bhatti_protocol::AgentClient;
use bhatti_vmm::firecracker::{FirecrackerBackend, FirecrackerConfig};
use bhatti_vmm::{NetConfig, SnapshotFiles, VmConfig, VmmBackend, AGENT_VSOCK_PORT};
use bytes::Bytes;

use bhatti_bench::fc_tiny::{
    files, load_body, mem, remove_files, snapshot_body, RawFc, PAUSED, RESUMED,
};
use bhatti_bench::vm::{clean_engine_dir, exec_true, Artifacts, Guard, BOOT_TIMEOUT};
use bhatti_bench::Section;

use super::same_boot_requests;
use crate::{
    compile_helper, guest_floor, host_tsc_ns_per_tick, share, time_into, watch_console, Args,
    BootTimes, RawDisk, GUEST_HELPER, ROUNDS,
};

/// The engine's data dir for this section, under the bench's scratch dir;
/// on drop: SIGKILLs its VMMs and unmounts its XFS loop (the main guard
/// only knows the QEMU section's `engine/`).
struct EngineDir(PathBuf);

impl Drop for EngineDir {
    fn drop(&mut self) {
        clean_engine_dir(&self.0, None);
    }
}

struct RawLinux<'a> {
    bin: PathBuf,
    net: &'a Network,
    dir: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    vcpus: u8,
    memory_mib: u32,
    netns: String,
}

struct RawVm {
    cfg: VmConfig,
    gnet: GuestNet,
    token: String,
    fc: RawFc,
    client: Option<AgentClient>,
}

impl RawLinux<'_> {
    /// Disk, config drive (agent on vsock), TAP: before the clock.
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
            agent: AgentTransport::Vsock {
                port: AGENT_VSOCK_PORT,
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

    /// Spawn → device PUTs → InstanceStart → lohar handshake + ping.
    async fn boot(&self, id: &str, disk: &RawDisk) -> anyhow::Result<(RawVm, BootTimes)> {
        let (cfg, gnet, token) = self.prepare(id, disk).await?;
        let reqs = same_boot_requests(&cfg);
        RawFc::prepare(&cfg.run_dir)?;
        let console = cfg.run_dir.join(bhatti_vmm::firecracker::CONSOLE_LOG);
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn(watch_console(console, t0, stop.clone()));
        let booted = super::raw_boot(&self.bin, &cfg.run_dir, id, Some(&self.netns), &reqs).await;
        let mut fc = match booted {
            Ok(fc) => fc,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                self.release(&gnet).await;
                return Err(e);
            }
        };
        let client = raw_agent(&mut fc, &token).await;
        let agent = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        let (init, user) = watcher.await.unwrap_or((None, None));
        let vm = RawVm {
            cfg,
            gnet,
            token,
            fc,
            client: None,
        };
        match client {
            Ok(c) => Ok((
                RawVm {
                    client: Some(c),
                    ..vm
                },
                BootTimes { agent, init, user },
            )),
            Err(e) => {
                let tail = vm.fc.tail();
                vm.destroy(self.net).await;
                bail!("raw Firecracker boot of {id}: {e}; console:\n{tail}")
            }
        }
    }

    async fn release(&self, gnet: &GuestNet) {
        if let Err(e) = self.net.remove_tap(&gnet.tap).await {
            eprintln!("[vmm-bench] removing {}: {e}", gnet.tap);
        }
        self.net.release(gnet);
    }
}

impl RawVm {
    fn client(&self) -> anyhow::Result<&AgentClient> {
        self.client.as_ref().context("raw VM: no agent connection")
    }

    /// Pause, `PUT /snapshot/create`, fsync both files. Stays paused.
    async fn snapshot(&mut self, kind: &str, f: &SnapshotFiles) -> anyhow::Result<()> {
        self.fc.patch_vm(PAUSED).await?;
        self.fc
            .put("/snapshot/create", &snapshot_body(kind, f))
            .await?;
        for p in [&f.state, mem(f)] {
            std::fs::File::open(p)?.sync_all()?;
        }
        Ok(())
    }

    /// Kill, then a new process loading `f` (resumed): until the first exec
    /// over a fresh agent connection answers.
    async fn restore(&mut self, raw: &RawLinux<'_>, f: &SnapshotFiles) -> anyhow::Result<Duration> {
        if let Some(c) = self.client.take() {
            c.close();
        }
        self.fc.kill();
        let body = load_body(f, &self.cfg.run_dir, Some(&self.gnet.tap));
        let t0 = Instant::now();
        self.fc = RawFc::spawn(&raw.bin, &self.cfg.run_dir, &self.cfg.id, Some(&raw.netns))?;
        self.fc.wait_api()?;
        self.fc.put("/snapshot/load", &body).await?;
        let c = raw_agent(&mut self.fc, &self.token).await?;
        exec_true(&c).await?;
        let d = t0.elapsed();
        self.client = Some(c);
        Ok(d)
    }

    async fn destroy(mut self, net: &Network) {
        if let Some(c) = self.client.take() {
            c.close();
        }
        self.fc.kill();
        let _ = net.remove_tap(&self.gnet.tap).await;
        net.release(&self.gnet);
        let _ = std::fs::remove_file(&self.cfg.root_disk);
        let _ = std::fs::remove_dir_all(&self.cfg.run_dir);
    }
}

/// lohar through Firecracker's vsock socket: `CONNECT 1024`, the protocol
/// handshake and a ping, retried every ms until it answers.
async fn raw_agent(fc: &mut RawFc, token: &str) -> anyhow::Result<AgentClient> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let vsock = fc.vsock();
    let mut last = String::from("no attempt");
    loop {
        ensure!(fc.alive(), "firecracker exited ({last})");
        ensure!(
            Instant::now() < deadline,
            "no agent within {BOOT_TIMEOUT:?} ({last})"
        );
        let attempt = async {
            let s = bhatti_protocol::transport::connect_firecracker_vsock(
                &vsock,
                AGENT_VSOCK_PORT,
                Duration::from_secs(5),
            )
            .await
            .map_err(|e| e.to_string())?;
            let c = AgentClient::connect(s, token)
                .await
                .map_err(|e| e.to_string())?;
            c.ping().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(c)
        };
        match attempt.await {
            Ok(c) => return Ok(c),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub(super) async fn bench_fc_linux(
    args: &Args,
    art: &Artifacts,
    guard: &Guard,
    bin: &Path,
    version: &str,
) -> anyhow::Result<Section> {
    let label = "firecracker/linux".to_string();
    let backend = FirecrackerBackend::new(FirecrackerConfig {
        binary: Some(bin.to_path_buf()),
        seccomp: false,
        ..FirecrackerConfig::default()
    })?;
    let helper = compile_helper(guard.dir.path())?;
    let spec = CreateSpec::default();
    let data_dir = EngineDir(guard.dir.path().join("engine-fc"));
    let mut cfg = EngineConfig::new(
        data_dir.0.clone(),
        &art.kernel,
        &art.rootfs,
        Arc::new(backend) as Arc<dyn VmmBackend>,
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
    let raw = RawLinux {
        bin: bin.to_path_buf(),
        net: engine.network().context("the engine has no network")?,
        dir: guard.dir.path().join("raw"),
        kernel: art.kernel.clone(),
        rootfs: art.rootfs.clone(),
        vcpus: spec.cpus,
        memory_mib: spec.memory_mb,
        netns: guard.ns.clone(),
    };
    let snaps = guard.dir.path().join("raw").join("fcl-snapshots");
    std::fs::create_dir_all(&snaps)?;
    let mut notes = vec![
        format!(
            "{label}: {version}, seccomp OFF (--no-seccomp) on both sides; {} vCPU, {} MiB \
             (CreateSpec defaults); disks: {}",
            spec.cpus,
            spec.memory_mb,
            engine.disk_method()
        ),
        "raw boots get their disk, config drive and TAP before the clock starts and send the \
         backend's own device PUTs; the engine's create includes making them"
            .into(),
    ];

    // 1. Boots, each followed by a Full snapshot (a freshly booted VMM:
    // the engine writes Full). The last pair is restored and kept.
    let n = args.fc_samples.max(1);
    let total = args.fc_warmup + n;
    let mut create = Recorder::new("create-to-ready (engine)");
    let mut raw_boot = Recorder::new("raw FC spawn → lohar handshake+ping");
    let mut raw_init = Recorder::new("raw FC spawn → kernel runs init");
    let mut full = Recorder::new("Full snapshot (snapshot_to_disk)");
    let mut raw_full = Recorder::new("raw Paused+create Full+fsync");
    let mut restore = Recorder::new("restore-to-first-exec (engine)");
    let mut raw_restore = Recorder::new("raw spawn+snapshot/load+handshake+exec");
    let mut disk = RawDisk::Scratch;
    let mut kept = None;
    for i in 0..total {
        let measured = i >= args.fc_warmup;
        let last = i + 1 == total;
        let t = Instant::now();
        let sb = engine
            .create(CreateSpec {
                name: Some(format!("fc-bench-{i}")),
                ..CreateSpec::default()
            })
            .await?;
        let c = t.elapsed();
        let t = Instant::now();
        engine.snapshot_to_disk(&sb.id).await?;
        let s = t.elapsed();
        if i == 0 {
            disk = RawDisk::like_engine(&engine, &data_dir.0, &art.rootfs);
        }
        if !last {
            engine.destroy(&sb.id).await?;
        }
        let (mut vm, times) = raw.boot(&format!("fcl-{i}"), &disk).await?;
        let f = files(&snaps, &format!("full-{i}"));
        let t = Instant::now();
        let snapped = vm.snapshot("Full", &f).await;
        let rs = t.elapsed();
        if let Err(e) = snapped {
            vm.destroy(raw.net).await;
            return Err(e);
        }
        if measured {
            create.record(c);
            full.record(s);
            raw_boot.record(times.agent);
            raw_full.record(rs);
            if let Some(t) = times.init {
                raw_init.record(t);
            }
        }
        eprintln!(
            "[vmm-bench] {label} boot {}/{total}: engine create {:.3} s + Full {:.3} s; raw {:.3} s \
             + Full {:.3} s",
            i + 1,
            c.as_secs_f64(),
            s.as_secs_f64(),
            times.agent.as_secs_f64(),
            rs.as_secs_f64()
        );
        if last {
            kept = Some((sb.id, vm, f));
        } else {
            vm.destroy(raw.net).await;
            remove_files(&f);
        }
    }
    let (id, mut vm, mut base) = kept.expect("at least one boot");
    // Both back to running from their Full snapshots (restore samples too).
    let t = Instant::now();
    engine.restore(&id).await?;
    exec_true(&engine.agent(&id).await?).await?;
    restore.record(t.elapsed());
    engine.pause(&id).await?;
    raw_restore.record(vm.restore(&raw, &base).await?);

    // 2. Exec beside the in-guest spawn floor, on the engine's VM alone.
    vm.fc.patch_vm(PAUSED).await?;
    engine.resume(&id).await?;
    let samples = args.samples.max(1);
    let gs = args.guest_samples.max(1);
    let rounds = ROUNDS.min(samples).min(gs);
    let tsc = host_tsc_ns_per_tick();
    let c = engine.agent(&id).await?;
    c.write_file(
        bhatti_protocol::WriteFileRequest {
            path: GUEST_HELPER.into(),
            mode: Some(0o755),
            place: false,
        },
        Bytes::from(std::fs::read(&helper)?),
    )
    .await?;
    drop(c);
    let mut exec = Recorder::new("exec true (engine)");
    let mut spawn_floor = Recorder::new("in-guest posix_spawn+wait true");
    for r in 0..rounds {
        let (k, gk) = (share(samples, rounds, r), share(gs, rounds, r));
        let e = engine.clone();
        time_into(&mut exec, if r == 0 { 10 } else { 0 }, k, || {
            let (e, id) = (e.clone(), id.clone());
            async move { exec_true(&e.agent(&id).await?).await }
        })
        .await?;
        let c = engine.agent(&id).await?;
        guest_floor(&c, &mut spawn_floor, "spawn", gk, None, tsc).await?;
    }

    // 3. A request on a paused VM, engine and raw alternating.
    let mut pause = Recorder::new("pause (engine)");
    let mut wake = Recorder::new("paused: resume+exec true (engine)");
    let mut stop = Recorder::new("raw PATCH /vm Paused");
    let mut cont_exec = Recorder::new("raw PATCH /vm Resumed + exec true");
    for _ in 0..args.pauses.max(1) {
        let t = Instant::now();
        engine.pause(&id).await?;
        pause.record(t.elapsed());
        let t = Instant::now();
        vm.fc.patch_vm(RESUMED).await?;
        exec_true(vm.client()?).await?;
        cont_exec.record(t.elapsed());
        let t = Instant::now();
        vm.fc.patch_vm(PAUSED).await?;
        stop.record(t.elapsed());
        let t = Instant::now();
        exec_true(&engine.agent(&id).await?).await?;
        wake.record(t.elapsed());
    }

    // 4. Snapshot cycles on restored VMMs: Diff (the engine folds it into
    // a copy of the image it restored from; raw: the Diff alone, merged
    // before the clock of the next restore) → restore → first exec.
    let mut diff = Recorder::new("snapshot_to_disk of a restored VMM");
    let mut raw_diff = Recorder::new("raw Paused+create Diff+fsync");
    for k in 0..args.snapshots.max(1).min(n) {
        // raw (engine paused)
        engine.pause(&id).await?;
        vm.fc.patch_vm(RESUMED).await?;
        let d = files(&snaps, &format!("diff-{k}"));
        let t = Instant::now();
        vm.snapshot("Diff", &d).await?;
        raw_diff.record(t.elapsed());
        let merged = files(&snaps, &format!("merged-{k}"));
        std::fs::copy(mem(&base), mem(&merged))?;
        bhatti_vmm::firecracker::merge_diff_snapshot(mem(&merged), mem(&d))?;
        std::fs::rename(&d.state, &merged.state)?;
        remove_files(&d);
        raw_restore.record(vm.restore(&raw, &merged).await?);
        remove_files(&base);
        base = merged;
        vm.fc.patch_vm(PAUSED).await?;
        // engine (raw paused)
        engine.resume(&id).await?;
        let t = Instant::now();
        engine.snapshot_to_disk(&id).await?;
        let s = t.elapsed();
        diff.record(s);
        let t = Instant::now();
        engine.restore(&id).await?;
        exec_true(&engine.agent(&id).await?).await?;
        let r = t.elapsed();
        restore.record(r);
        eprintln!(
            "[vmm-bench] {label} snapshot cycle {}: engine {:.3} s, restore→exec {:.3} s",
            k + 1,
            s.as_secs_f64(),
            r.as_secs_f64()
        );
    }
    vm.destroy(raw.net).await;
    remove_files(&base);
    engine.destroy(&id).await?;

    let ratio_met = |op: &Stats, floor: &Stats, max: f64| Some(op.p50_us <= max * floor.p50_us);
    let row = |op: Stats, floor: Option<Stats>, target: &str| Row {
        op,
        floor,
        target: target.into(),
        met: None,
    };
    let (create, raw_boot, exec, spawn_floor) = (
        create.stats(),
        raw_boot.stats(),
        exec.stats(),
        spawn_floor.stats(),
    );
    let mut rows = vec![
        Row {
            met: ratio_met(&create, &raw_boot, 1.15),
            op: create,
            floor: Some(raw_boot),
            target: "≤ 1.15 × floor".into(),
        },
        row(raw_init.stats(), None, "(raw, info)"),
        Row {
            met: ratio_met(&exec, &spawn_floor, 1.1),
            op: exec,
            floor: Some(spawn_floor),
            target: "≤ 1.1 × floor".into(),
        },
        row(pause.stats(), Some(stop.stats()), "-"),
        row(wake.stats(), Some(cont_exec.stats()), "-"),
        row(full.stats(), Some(raw_full.stats()), "-"),
        row(diff.stats(), Some(raw_diff.stats()), "-"),
        row(restore.stats(), Some(raw_restore.stats()), "-"),
    ];
    rows.retain(|r| r.op.samples > 0);
    notes.push(
        "engine snapshot = guest sync + pause + snapshot + fsync + VMM kill; after a restore the \
         engine takes a Diff and merges it into a copy of the image it restored from (where it \
         chains snapshots); the raw Diff floor is pause + create Diff + fsync"
            .into(),
    );
    Ok(Section::new("vmm-bench", label, rows, Vec::new(), notes))
}
