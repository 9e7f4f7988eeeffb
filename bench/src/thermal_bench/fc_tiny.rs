//! Firecracker rows of thermal-bench, on the tiny guest
//! (`crates/vmm/tests/fixtures/tiny-guest`: it spins incrementing a counter
//! at guest-physical 0x1800000): Full vs Diff `Vm::snapshot` and
//! `merge_diff_snapshot` through `FirecrackerBackend { seccomp: false }`,
//! beside raw API calls (a `firecracker` process spawned here, HTTP/1.1
//! written by hand on a blocking unix socket) and a raw merge.
//!
//! Cleanup: the raw process is SIGKILLed on drop; the backend's VMM is
//! killed at the end, and its run dir is under `<scratch>/fc/`, which the
//! main guard scans for `vmm.pid` files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::ensure;
use bhatti_bench::fc_tiny::{
    build_tiny_guest, counter, data_extents, files, mem, raw_merge, remove_files, snapshot_body,
    RawFc, PAUSED, RESUMED, RUN_A_BIT, START, TINY_MEM_MIB,
};
use bhatti_bench::{Recorder, Section};
use bhatti_vmm::firecracker::{merge_diff_snapshot, FirecrackerBackend, FirecrackerConfig};
use bhatti_vmm::{SnapshotKind, VmConfig, VmmBackend};

use super::row;

/// Full / Diff snapshot and merge, ours (backend) beside raw, alternating
/// per iteration, one guest running at a time. `None` (and a SKIP line)
/// when the guest cannot be assembled.
pub(crate) async fn bench(n: usize, scratch: &Path, bin: &Path) -> anyhow::Result<Option<Section>> {
    let base = scratch.join("fc");
    let fdir = scratch.join("fc-files");
    std::fs::create_dir_all(&fdir)?;
    let kernel = match build_tiny_guest(&fdir) {
        Ok(k) => k,
        Err(e) => {
            println!("SKIP firecracker tiny-guest rows: cannot assemble the guest ({e:#})");
            return Ok(None);
        }
    };
    let disk = |name: &str| -> anyhow::Result<PathBuf> {
        let p = fdir.join(format!("{name}.img"));
        File::create(&p)?.set_len(1 << 20)?;
        Ok(p)
    };
    let vm_cfg = |name: &str, root_disk: PathBuf| VmConfig {
        id: format!("tb-{name}"),
        vcpus: 1,
        memory_mib: TINY_MEM_MIB,
        kernel: kernel.clone(),
        kernel_args: String::new(),
        root_disk,
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
    let t_start = Instant::now();
    let o_cfg = vm_cfg("fco", disk("root-ours")?);
    let r_cfg = vm_cfg("fcr", disk("root-raw")?);
    let vm = backend.boot(&o_cfg).await?;
    let result = async {
        RawFc::prepare(&r_cfg.run_dir)?;
        let fc = RawFc::spawn(bin, &r_cfg.run_dir, "tb-fcr", None)?;
        let mut raw = fc.connect_blocking()?;
        for (p, b) in FirecrackerBackend::boot_requests(&r_cfg) {
            raw.call("PUT", &p, &b.to_string())?;
        }
        raw.call("PUT", "/actions", START)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        raw.call("PATCH", "/vm", PAUSED)?;
        vm.pause().await?;

        let snaps = fdir.join("snapshots");
        std::fs::create_dir_all(&snaps)?;
        let (o_full, o_diff) = (files(&snaps, "ours-full"), files(&snaps, "ours-diff"));
        let (r_full, r_diff) = (files(&snaps, "raw-full"), files(&snaps, "raw-diff"));
        let (o_merged, r_merged) = (snaps.join("ours-merged.mem"), snaps.join("raw-merged.mem"));
        let (r_full_body, r_diff_body) = (
            snapshot_body("Full", &r_full),
            snapshot_body("Diff", &r_diff),
        );
        let mut full_o = Recorder::new(format!("tiny: Full snapshot {TINY_MEM_MIB} MiB"));
        let mut diff_o = Recorder::new("tiny: Diff snapshot");
        let mut merge_o = Recorder::new("tiny: merge_diff_snapshot");
        let mut full_r = Recorder::new("raw PUT /snapshot/create Full");
        let mut diff_r = Recorder::new("raw PUT /snapshot/create Diff");
        let mut merge_r = Recorder::new("raw pread+pwrite extents+fsync");
        let mut buf = vec![0u8; 1 << 20];
        let mut diff_bytes = 0;
        let warm = 2;
        for i in 0..warm + n {
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
            std::fs::copy(mem(&o_full), &o_merged)?;
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
            raw.call("PATCH", "/vm", RESUMED)?;
            tokio::time::sleep(RUN_A_BIT).await;
            raw.call("PATCH", "/vm", PAUSED)?;
            remove_files(&r_full);
            let t = Instant::now();
            raw.call("PUT", "/snapshot/create", &r_full_body)?;
            let d = t.elapsed();
            raw.call("PATCH", "/vm", RESUMED)?;
            tokio::time::sleep(RUN_A_BIT).await;
            raw.call("PATCH", "/vm", PAUSED)?;
            remove_files(&r_diff);
            let t = Instant::now();
            raw.call("PUT", "/snapshot/create", &r_diff_body)?;
            let e = t.elapsed();
            std::fs::copy(mem(&r_full), &r_merged)?;
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
        drop(raw);
        drop(fc);
        let _ = std::fs::remove_dir_all(&snaps);
        Ok::<_, anyhow::Error>((
            vec![
                row(&full_o, Some(&full_r)),
                row(&diff_o, Some(&diff_r)),
                row(&merge_o, Some(&merge_r)),
            ],
            diff_bytes,
        ))
    }
    .await;
    let _ = vm.kill().await;
    let (rows, diff_bytes) = result?;
    let label = "firecracker/tiny-guest".to_string();
    let version = Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let notes = vec![
        format!(
            "{label} (tiny guest, NOT Linux: /dev/kvm is PVM here): {version}; 1 vCPU, \
             {TINY_MEM_MIB} MiB, dirty-page tracking on; seccomp OFF both sides; {n} samples per \
             side after 2 unrecorded, in {:.1} s",
            t_start.elapsed().as_secs_f64()
        ),
        format!(
            "each snapshot of a paused VM after {} ms of guest run; the Diff holds \
             {diff_bytes} bytes of dirty pages; raw = firecracker spawned here, HTTP/1.1 by hand \
             on a blocking socket; merge floor's extents are found before its clock",
            RUN_A_BIT.as_millis()
        ),
    ];
    Ok(Some(Section::new(
        "thermal-bench",
        label,
        rows,
        Vec::new(),
        notes,
    )))
}
