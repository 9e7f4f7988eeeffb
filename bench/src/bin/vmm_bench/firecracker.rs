//! Firecracker rows of vmm-bench.
//!
//! 1. Always, when a binary is found (`BHATTI_FIRECRACKER`, else PATH): the
//!    tiny guest (`crates/vmm/tests/fixtures/tiny-guest`, assembled with
//!    binutils here as the lifecycle test does; it spins incrementing a
//!    counter at guest-physical 0x1800000 and prints `tick …` lines). Each
//!    backend call (`FirecrackerBackend` / `FirecrackerVm` /
//!    `merge_diff_snapshot`) beside the same operation done raw: a
//!    `firecracker` process spawned here, HTTP/1.1 written by hand on a
//!    blocking unix socket.
//! 2. With hardware KVM: the engine on a Linux guest with `FirecrackerBackend`
//!    beside raw Firecracker boots of the same kernel, rootfs and lohar
//!    ([`linux`]).
//!
//! Seccomp is off on both sides (`FirecrackerConfig { seccomp: false }`,
//! `--no-seccomp`): the self-built binary this was written against has
//! filters that do not match the host's libc.
//!
//! Cleanup: raw processes are [`RawFc`] values (SIGKILL + wait on drop);
//! the backend's VMMs are tracked by a [`Reaper`] that SIGKILLs them on drop
//! (errors, panics, Ctrl-C dropping the future); their run dirs are under
//! the bench's scratch dir (`raw/fc*`), which the main [`Guard`] scans for
//! `vmm.pid` files and then deletes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::ensure;
use bhatti_bench::fc_tiny::{
    build_tiny_guest, counter, data_extents, file_len, files, load_body, mem, raw_boot, raw_merge,
    remove_files, snapshot_body, RawFc, PAUSED, RESUMED, RUN_A_BIT, START, TINY_MEM_MIB,
};
use bhatti_bench::vm::{Artifacts, Guard};
use bhatti_bench::{Recorder, Row, Section};
use bhatti_vmm::firecracker::{
    merge_diff_snapshot, FirecrackerBackend, FirecrackerConfig, CONSOLE_LOG,
};
use bhatti_vmm::probe::HostProbe;
use bhatti_vmm::{SnapshotKind, VmConfig, VmmBackend};
use serde_json::json;

use super::Args;

#[path = "firecracker_linux.rs"]
mod linux;

/// Increments between two `tick` lines.
const TICK: u64 = 1 << 20;

/// The Firecracker sections: tiny guest, then the Linux guest under
/// hardware KVM. One `SKIP` line when there is no binary.
pub(super) async fn bench_firecracker(
    args: &Args,
    art: Option<&Artifacts>,
    guard: &Guard,
    host: &HostProbe,
) -> anyhow::Result<Vec<Section>> {
    let Some(bin) = host.firecracker.clone() else {
        println!("SKIP firecracker rows: no binary");
        return Ok(Vec::new());
    };
    let version = fc_version(&bin);
    eprintln!(
        "[vmm-bench] {version} at {}; seccomp OFF on every Firecracker here (--no-seccomp)",
        bin.display()
    );
    let mut out = Vec::new();
    if let Some(b) = bench_tiny(args, guard, &bin, &version).await? {
        out.push(b);
    }
    match (host.hardware_kvm, art) {
        (true, Some(art)) => {
            out.push(linux::bench_fc_linux(args, art, guard, &bin, &version).await?)
        }
        (true, None) => {
            println!("SKIP firecracker Linux-guest rows: kernel/rootfs/root missing (see above)")
        }
        (false, _) => println!(
            "SKIP firecracker Linux-guest rows: no hardware KVM ({}); Firecracker cannot boot \
             Linux here, tiny-guest rows only",
            if host.pvm {
                "PVM /dev/kvm"
            } else {
                "no usable /dev/kvm"
            }
        ),
    }
    Ok(out)
}

fn fc_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_owned())
        })
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| "Firecracker (unknown version)".into())
}

/// The backend's pre-boot PUTs for `cfg` (the same devices), serialized
/// before the clock starts, then InstanceStart.
fn same_boot_requests(cfg: &VmConfig) -> Vec<(String, String)> {
    let mut r: Vec<(String, String)> = FirecrackerBackend::boot_requests(cfg)
        .into_iter()
        .map(|(p, b)| (p, b.to_string()))
        .collect();
    r.push(("/actions".into(), START.into()));
    r
}

/// SIGKILLs the backend's VMMs it was told about (if still ours: the
/// command line names `marker`) when dropped.
struct Reaper {
    marker: String,
    pids: Vec<u32>,
}

impl Reaper {
    fn new(marker: &Path) -> Reaper {
        Reaper {
            marker: marker.to_string_lossy().into_owned(),
            pids: Vec::new(),
        }
    }

    fn track(&mut self, pid: u32) {
        self.pids.retain(|p| bhatti_vmm::process::pid_alive(*p));
        self.pids.push(pid);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.pids {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !bhatti_vmm::process::pid_alive(pid)
                || !String::from_utf8_lossy(&cmdline).contains(&self.marker)
            {
                continue;
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGKILL,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while bhatti_vmm::process::pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Values of the complete `tick` lines written to `console` after `from`.
fn ticks(console: &Path, from: u64) -> Vec<u64> {
    let bytes = std::fs::read(console).unwrap_or_default();
    let from = (from as usize).min(bytes.len());
    let mut text = &bytes[from..];
    if from > 0 && bytes[from - 1] != b'\n' {
        match text.iter().position(|b| *b == b'\n') {
            Some(i) => text = &text[i + 1..],
            None => return Vec::new(),
        }
    }
    let text = String::from_utf8_lossy(text);
    let Some(end) = text.rfind('\n') else {
        return Vec::new();
    };
    text[..end]
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter(|h| h.len() == 16)
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect()
}

/// The first tick the guest prints after byte `from` of `console`.
async fn first_tick(console: &Path, from: u64, what: &str) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(t) = ticks(console, from).first() {
            return Ok(*t);
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: no tick from the tiny guest; console:\n{}",
            bhatti_vmm::console_tail(console, 1500)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A copy of `src` at `dest`, on disk (so a merge's fsync is its own).
fn copy_synced(src: &Path, dest: &Path) -> anyhow::Result<()> {
    std::fs::copy(src, dest)?;
    File::open(dest)?.sync_all()?;
    Ok(())
}

/// Ours (backend calls) beside raw Firecracker API calls on the tiny guest.
/// One guest runs at a time (the tiny guest keeps a vCPU busy); each
/// iteration does ours, then raw.
async fn bench_tiny(
    args: &Args,
    guard: &Guard,
    bin: &Path,
    version: &str,
) -> anyhow::Result<Option<Section>> {
    let base = guard.dir.path().join("raw");
    let fdir = base.join("fc-files");
    let snaps = fdir.join("snapshots");
    std::fs::create_dir_all(&snaps)?;
    let kernel = match build_tiny_guest(&fdir) {
        Ok(k) => k,
        Err(e) => {
            println!("SKIP firecracker tiny-guest rows: cannot assemble the guest ({e:#})");
            return Ok(None);
        }
    };
    // The backend always attaches a root disk: an empty one per side.
    let disk = |name: &str| -> anyhow::Result<PathBuf> {
        let p = fdir.join(format!("{name}.img"));
        File::create(&p)?.set_len(1 << 20)?;
        Ok(p)
    };
    let (disk_o, disk_r) = (disk("root-ours")?, disk("root-raw")?);
    let vm_cfg = |name: &str, root_disk: &Path| VmConfig {
        id: format!("bench-{name}"),
        vcpus: 1,
        memory_mib: TINY_MEM_MIB,
        kernel: kernel.clone(),
        kernel_args: String::new(),
        root_disk: root_disk.to_path_buf(),
        config_disk: None,
        net: None,
        netns: None,
        run_dir: base.join(name),
        data_disks: Vec::new(),
    };
    let backend = FirecrackerBackend::new(FirecrackerConfig {
        binary: Some(bin.to_path_buf()),
        seccomp: false,
        ..FirecrackerConfig::default()
    })?;
    let mut reaper = Reaper::new(&base);
    let (n, warm) = (args.fc_samples.max(1), args.fc_warmup);
    let total = warm + n;
    let t_start = Instant::now();

    // 1. Boots: ours, raw with the same devices, raw minimal.
    let ob_cfg = vm_cfg("fco-boot", &disk_o);
    let rb_cfg = vm_cfg("fcr-boot", &disk_r);
    let rb_reqs = same_boot_requests(&rb_cfg);
    let rm_dir = base.join("fcr-min");
    let rm_reqs: Vec<(String, String)> = vec![
        (
            "/machine-config".into(),
            json!({ "vcpu_count": 1, "mem_size_mib": TINY_MEM_MIB, "track_dirty_pages": true })
                .to_string(),
        ),
        (
            "/boot-source".into(),
            json!({ "kernel_image_path": kernel, "boot_args": "console=ttyS0" }).to_string(),
        ),
        ("/actions".into(), START.into()),
    ];
    let mut boot_o = Recorder::new("boot → running (backend.boot)");
    let mut boot_r = Recorder::new("raw spawn + same PUTs + InstanceStart");
    let mut boot_m = Recorder::new("raw boot: machine+boot-source+Start");
    for i in 0..total {
        let from = file_len(&ob_cfg.run_dir.join(CONSOLE_LOG));
        let t = Instant::now();
        let vm = backend.boot(&ob_cfg).await?;
        let d_o = t.elapsed();
        reaper.track(vm.pid());
        if i == 0 {
            first_tick(&vm.console_log(), from, "ours, boot").await?;
        }
        vm.kill().await?;

        RawFc::prepare(&rb_cfg.run_dir)?;
        let from = file_len(&rb_cfg.run_dir.join(CONSOLE_LOG));
        let t = Instant::now();
        let fc = raw_boot(bin, &rb_cfg.run_dir, "bench-fcr-boot", None, &rb_reqs).await?;
        let d_r = t.elapsed();
        if i == 0 {
            first_tick(&fc.console(), from, "raw, boot").await?;
        }
        drop(fc);

        RawFc::prepare(&rm_dir)?;
        let from = file_len(&rm_dir.join(CONSOLE_LOG));
        let t = Instant::now();
        let fc = raw_boot(bin, &rm_dir, "bench-fcr-min", None, &rm_reqs).await?;
        let d_m = t.elapsed();
        if i == 0 {
            first_tick(&fc.console(), from, "raw minimal, boot").await?;
        }
        drop(fc);
        if i >= warm {
            boot_o.record(d_o);
            boot_r.record(d_r);
            boot_m.record(d_m);
        }
    }
    eprintln!(
        "[vmm-bench] firecracker/tiny-guest: {total}×3 boots in {:.1} s",
        t_start.elapsed().as_secs_f64()
    );

    // The two VMs of the pause and snapshot rows.
    let o_cfg = vm_cfg("fco", &disk_o);
    let vm = backend.boot(&o_cfg).await?;
    reaper.track(vm.pid());
    let r_dir = base.join("fcr");
    RawFc::prepare(&r_dir)?;
    let mut raw = raw_boot(
        bin,
        &r_dir,
        "bench-fcr",
        None,
        &same_boot_requests(&vm_cfg("fcr", &disk_r)),
    )
    .await?;
    first_tick(&vm.console_log(), 0, "ours").await?;
    first_tick(&raw.console(), 0, "raw").await?;
    raw.patch_vm(PAUSED).await?;

    // 2. Pause / resume: ours running while raw is paused and vice versa.
    let mut pause_o = Recorder::new("pause (Vm::pause)");
    let mut resume_o = Recorder::new("resume (Vm::resume)");
    let mut pause_r = Recorder::new("raw PATCH /vm Paused");
    let mut resume_r = Recorder::new("raw PATCH /vm Resumed");
    // Per side and iteration: run 1 ms, pause (timed), 1 ms paused, resume
    // (timed), run 1 ms, pause (untimed) and hand over to the other side,
    // which starts from an untimed resume. Which side goes first alternates.
    let ms = Duration::from_millis(1);
    vm.pause().await?;
    for i in 0..total {
        let rec = i >= warm;
        for side in [i % 2, 1 - i % 2] {
            if side == 0 {
                vm.resume().await?;
                tokio::time::sleep(ms).await;
                let t = Instant::now();
                vm.pause().await?;
                let a = t.elapsed();
                tokio::time::sleep(ms).await;
                let t = Instant::now();
                vm.resume().await?;
                let b = t.elapsed();
                tokio::time::sleep(ms).await;
                vm.pause().await?;
                if rec {
                    pause_o.record(a);
                    resume_o.record(b);
                }
            } else {
                raw.patch_vm(RESUMED).await?;
                tokio::time::sleep(ms).await;
                let t = Instant::now();
                raw.patch_vm(PAUSED).await?;
                let a = t.elapsed();
                tokio::time::sleep(ms).await;
                let t = Instant::now();
                raw.patch_vm(RESUMED).await?;
                let b = t.elapsed();
                tokio::time::sleep(ms).await;
                raw.patch_vm(PAUSED).await?;
                if rec {
                    pause_r.record(a);
                    resume_r.record(b);
                }
            }
        }
    }

    // 3. Full, then Diff after the guest ran a bit, then merge, per side.
    let (o_full, o_diff) = (files(&snaps, "ours-full"), files(&snaps, "ours-diff"));
    let (r_full, r_diff) = (files(&snaps, "raw-full"), files(&snaps, "raw-diff"));
    let (o_merged, r_merged) = (snaps.join("ours-merged.mem"), snaps.join("raw-merged.mem"));
    let (r_full_body, r_diff_body) = (
        snapshot_body("Full", &r_full),
        snapshot_body("Diff", &r_diff),
    );
    let mut full_o = Recorder::new(format!("Full snapshot {TINY_MEM_MIB} MiB (Vm::snapshot)"));
    let mut diff_o = Recorder::new("Diff snapshot (Vm::snapshot)");
    let mut merge_o = Recorder::new("merge_diff_snapshot");
    let mut full_r = Recorder::new("raw PUT /snapshot/create Full");
    let mut diff_r = Recorder::new("raw PUT /snapshot/create Diff");
    let mut merge_r = Recorder::new("raw pread+pwrite dirty extents+fsync");
    let mut buf = vec![0u8; 1 << 20];
    let mut diff_bytes = 0;
    for i in 0..total {
        // ours (raw paused)
        vm.resume().await?;
        tokio::time::sleep(RUN_A_BIT).await;
        vm.pause().await?;
        remove_files(&o_full);
        let t = Instant::now();
        vm.snapshot(SnapshotKind::Full, &o_full).await?;
        let a = t.elapsed();
        vm.resume().await?;
        tokio::time::sleep(RUN_A_BIT).await;
        vm.pause().await?;
        remove_files(&o_diff);
        let t = Instant::now();
        vm.snapshot(SnapshotKind::Diff, &o_diff).await?;
        let b = t.elapsed();
        copy_synced(mem(&o_full), &o_merged)?;
        let t = Instant::now();
        let bytes = merge_diff_snapshot(&o_merged, mem(&o_diff))?;
        let c = t.elapsed();
        if i == 0 {
            let (cf, cd, cm) = (
                counter(mem(&o_full))?,
                counter(mem(&o_diff))?,
                counter(&o_merged)?,
            );
            ensure!(
                cd > cf && cm == cd,
                "ours: counter Full {cf:#x}, Diff {cd:#x}, merged {cm:#x}"
            );
            diff_bytes = bytes;
        }
        // raw (ours paused)
        raw.patch_vm(RESUMED).await?;
        tokio::time::sleep(RUN_A_BIT).await;
        raw.patch_vm(PAUSED).await?;
        remove_files(&r_full);
        let t = Instant::now();
        raw.put("/snapshot/create", &r_full_body).await?;
        let d = t.elapsed();
        raw.patch_vm(RESUMED).await?;
        tokio::time::sleep(RUN_A_BIT).await;
        raw.patch_vm(PAUSED).await?;
        remove_files(&r_diff);
        let t = Instant::now();
        raw.put("/snapshot/create", &r_diff_body).await?;
        let e = t.elapsed();
        copy_synced(mem(&r_full), &r_merged)?;
        let extents = data_extents(mem(&r_diff))?;
        let t = Instant::now();
        raw_merge(&r_merged, mem(&r_diff), &extents, &mut buf)?;
        let f = t.elapsed();
        if i == 0 {
            let (cf, cd, cm) = (
                counter(mem(&r_full))?,
                counter(mem(&r_diff))?,
                counter(&r_merged)?,
            );
            ensure!(
                cd > cf && cm == cd,
                "raw: counter Full {cf:#x}, Diff {cd:#x}, merged {cm:#x}"
            );
        }
        if i >= warm {
            full_o.record(a);
            diff_o.record(b);
            merge_o.record(c);
            full_r.record(d);
            diff_r.record(e);
            merge_r.record(f);
        }
    }

    // 4. Restore from the last Full into a new process, to running (the
    // first restore of each side is checked: the counter continues).
    let (cf_o, cf_r) = (counter(mem(&o_full))?, counter(mem(&r_full))?);
    let or_cfg = vm_cfg("fco-r", &disk_o);
    let rr_dir = base.join("fcr-r");
    let r_load = load_body(&r_full, &rr_dir, None);
    let mut restore_o = Recorder::new("restore Full → running (backend)");
    let mut restore_r = Recorder::new("raw spawn + PUT /snapshot/load");
    for i in 0..total {
        let from = file_len(&or_cfg.run_dir.join(CONSOLE_LOG));
        let t = Instant::now();
        let vm2 = backend.restore(&or_cfg, &o_full).await?;
        let a = t.elapsed();
        reaper.track(vm2.pid());
        if i == 0 {
            let v = first_tick(&vm2.console_log(), from, "ours, restore").await?;
            ensure!(
                v >= cf_o && v <= cf_o + TICK,
                "ours: tick {v:#x} after restoring {cf_o:#x}"
            );
        }
        vm2.kill().await?;

        RawFc::prepare(&rr_dir)?;
        let from = file_len(&rr_dir.join(CONSOLE_LOG));
        let t = Instant::now();
        let mut fc = RawFc::spawn(bin, &rr_dir, "bench-fcr-r", None)?;
        fc.wait_api()?;
        fc.put("/snapshot/load", &r_load).await?;
        let b = t.elapsed();
        if i == 0 {
            let v = first_tick(&fc.console(), from, "raw, restore").await?;
            ensure!(
                v >= cf_r && v <= cf_r + TICK,
                "raw: tick {v:#x} after restoring {cf_r:#x}"
            );
        }
        drop(fc);
        if i >= warm {
            restore_o.record(a);
            restore_r.record(b);
        }
    }
    vm.kill().await?;
    drop(raw);
    drop(reaper);
    let took = t_start.elapsed();

    let row = |op: Recorder, floor: Option<Recorder>| Row {
        target: if floor.is_some() { "-" } else { "(raw, info)" }.into(),
        op: op.stats(),
        floor: floor.map(|f| f.stats()),
        met: None,
    };
    let rows = vec![
        row(boot_o, Some(boot_r)),
        row(boot_m, None),
        row(pause_o, Some(pause_r)),
        row(resume_o, Some(resume_r)),
        row(full_o, Some(full_r)),
        row(diff_o, Some(diff_r)),
        row(restore_o, Some(restore_r)),
        row(merge_o, Some(merge_r)),
    ];
    let label = "firecracker/tiny-guest".to_string();
    let notes = vec![
        format!(
            "{label}: {version}; 1 vCPU, {TINY_MEM_MIB} MiB, dirty-page tracking on, a 1 MiB \
             root disk, vsock and entropy devices (what the backend always attaches), no network; \
             {n} samples per side after {warm} unrecorded, in {:.1} s",
            took.as_secs_f64()
        ),
        "seccomp OFF on both sides (FirecrackerConfig { seccomp: false } / --no-seccomp): the \
         self-built binary's filters do not match this host"
            .into(),
        "raw = a firecracker process spawned here with the backend's arguments and HTTP/1.1 \
         written by hand on a tokio unix socket (keep-alive; API socket polled every 100 µs); \
         raw boot sends the backend's own device PUTs (FirecrackerBackend::boot_requests), the \
         'machine+boot-source' row only those two"
            .into(),
        format!(
            "one guest runs at a time (the tiny guest spins its vCPU); ours and raw alternate in \
             every iteration; snapshots are of a paused VM, the Diff after {} ms of guest run \
             ({diff_bytes} bytes of dirty pages), restore = new process from the last Full",
            RUN_A_BIT.as_millis()
        ),
        "merge: onto a synced copy of the Full memory file; floor: the Diff's data extents \
         found before the clock, pread+pwrite+fsync; ours also finds them (SEEK_DATA/SEEK_HOLE) \
         and checks that the filesystem reports holes"
            .into(),
    ];
    Ok(Some(Section::new(
        "vmm-bench",
        label,
        rows,
        Vec::new(),
        notes,
    )))
}
