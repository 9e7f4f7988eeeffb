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

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bhatti_bench::{host_description, load_average, Recorder, Report};
use bhatti_vmm::firecracker::{
    merge_diff_snapshot, FirecrackerBackend, FirecrackerConfig, API_SOCKET, CONSOLE_LOG,
    VSOCK_SOCKET,
};
use bhatti_vmm::{SnapshotFiles, SnapshotKind, VmConfig, VmmBackend};
use serde_json::json;

use super::{ratios, row, Section};

const COUNTER: u64 = 0x1800000;
const TINY_MEM_MIB: u32 = 32;
/// Guest run time before each snapshot.
const RUN_A_BIT: Duration = Duration::from_millis(10);
const START: &str = r#"{"action_type":"InstanceStart"}"#;
const PAUSED: &str = r#"{"state":"Paused"}"#;
const RESUMED: &str = r#"{"state":"Resumed"}"#;

struct RawFc {
    child: Option<Child>,
    run_dir: PathBuf,
    api: Option<StdUnixStream>,
    buf: Vec<u8>,
}

impl RawFc {
    fn spawn(bin: &Path, run_dir: &Path) -> anyhow::Result<RawFc> {
        std::fs::create_dir_all(run_dir)?;
        for s in [API_SOCKET, VSOCK_SOCKET] {
            let _ = std::fs::remove_file(run_dir.join(s));
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join(CONSOLE_LOG))?;
        let child = Command::new(bin)
            .arg("--api-sock")
            .arg(run_dir.join(API_SOCKET))
            .args(["--id", "tb-fcr", "--level", "Warning", "--no-seccomp"])
            .current_dir(run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut fc = RawFc {
            child: Some(child),
            run_dir: run_dir.to_owned(),
            api: None,
            buf: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match StdUnixStream::connect(run_dir.join(API_SOCKET)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(600)))?;
                    fc.api = Some(s);
                    return Ok(fc);
                }
                Err(e) => {
                    ensure!(Instant::now() < deadline, "raw firecracker: no API: {e}");
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
    }

    fn call(&mut self, method: &str, path: &str, body: &str) -> anyhow::Result<()> {
        let s = self.api.as_mut().context("no API")?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())?;
        self.buf.clear();
        let mut chunk = [0u8; 2048];
        loop {
            if let Some(h) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..h]).into_owned();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .with_context(|| format!("bad status line in {head:?}"))?;
                let len: usize = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= h + 4 + len {
                    if !(200..300).contains(&status) {
                        let body = String::from_utf8_lossy(&self.buf[h + 4..h + 4 + len]);
                        bail!("raw {method} {path}: HTTP {status}: {body}");
                    }
                    return Ok(());
                }
            }
            let n = s.read(&mut chunk)?;
            ensure!(n > 0, "the API closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Drop for RawFc {
    fn drop(&mut self) {
        self.api = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.run_dir.join(API_SOCKET));
    }
}

fn build_tiny_guest(dir: &Path) -> anyhow::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/vmm/tests/fixtures/tiny-guest");
    let (obj, elf) = (dir.join("guest.o"), dir.join("guest.elf"));
    let run = |cmd: &mut Command| -> anyhow::Result<()> {
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        ensure!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    run(Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&obj)
        .arg(src.join("guest.S")))?;
    run(Command::new("ld")
        .args(["-static", "-no-pie", "-z", "max-page-size=0x1000", "-T"])
        .arg(src.join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(&obj))?;
    Ok(elf)
}

fn files(dir: &Path, name: &str) -> SnapshotFiles {
    SnapshotFiles {
        state: dir.join(format!("{name}.state")),
        memory: Some(dir.join(format!("{name}.mem"))),
    }
}

fn mem(f: &SnapshotFiles) -> &Path {
    f.memory
        .as_deref()
        .expect("Firecracker snapshots have memory")
}

fn remove_files(f: &SnapshotFiles) {
    let _ = std::fs::remove_file(&f.state);
    let _ = std::fs::remove_file(mem(f));
}

fn counter(mem: &Path) -> anyhow::Result<u64> {
    let mut b = [0u8; 8];
    File::open(mem)?.read_exact_at(&mut b, COUNTER)?;
    Ok(u64::from_le_bytes(b))
}

fn snapshot_body(kind: &str, f: &SnapshotFiles) -> String {
    json!({ "snapshot_type": kind, "snapshot_path": f.state, "mem_file_path": f.memory })
        .to_string()
}

/// The data extents of a sparse Diff memory file (SEEK_DATA / SEEK_HOLE).
fn data_extents(path: &Path) -> anyhow::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let f = File::open(path)?;
    let size = f.metadata()?.len() as i64;
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        let start = match lseek(&f, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = lseek(&f, start, Whence::SeekHole)?.min(size);
        if end <= start {
            break;
        }
        out.push((start as u64, end as u64));
        pos = end;
    }
    Ok(out)
}

/// The merge floor: the Diff's extents (found before the clock) copied onto
/// the base at their offsets, then fsync.
fn raw_merge(
    base: &Path,
    diff: &Path,
    extents: &[(u64, u64)],
    buf: &mut [u8],
) -> anyhow::Result<()> {
    let d = File::open(diff)?;
    let b = OpenOptions::new().write(true).open(base)?;
    for &(start, end) in extents {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            d.read_exact_at(&mut buf[..n], off)?;
            b.write_all_at(&buf[..n], off)?;
            off += n as u64;
        }
    }
    b.sync_all()?;
    Ok(())
}

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
        let mut raw = RawFc::spawn(bin, &r_cfg.run_dir)?;
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
    Ok(Some(Section {
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
        not_applicable: Vec::new(),
        notes,
    }))
}
