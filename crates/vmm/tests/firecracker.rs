//! Firecracker lifecycle suite: the real Firecracker binary, driven through
//! the backend code the daemon uses, on the tiny non-Linux test guest
//! (`fixtures/tiny-guest`), so it runs on hosts where a Linux guest cannot
//! (PVM `/dev/kvm`).
//!
//! The guest increments a u64 at guest-physical 0x1800000 forever and prints
//! `tick <16 hex digits>` on its serial port every 2^20 increments. The
//! counter is observed through Full snapshots (8 bytes at that offset of the
//! memory file) and the ticks in `console.log`.
//!
//! Needs `as` and `ld` (binutils). Without a Firecracker binary
//! (`BHATTI_FIRECRACKER`, else `firecracker` on PATH) the test prints one
//! SKIP line and passes. Seccomp is off (`--no-seccomp`) so any build works.
//! Timings are printed as `MEASURE <what> <value>` lines (`--nocapture`).

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bhatti_vmm::firecracker::{
    find_firecracker, merge_diff_snapshot, FirecrackerBackend, FirecrackerConfig, API_SOCKET,
    LAUNCH_RECORD, VSOCK_SOCKET,
};
use bhatti_vmm::process::pid_alive;
use bhatti_vmm::{SnapshotFiles, SnapshotKind, Vm, VmConfig, VmmBackend};

/// Where the guest keeps its counter (guest-physical == memory file offset).
const COUNTER: u64 = 0x1800000;
/// Increments between two ticks.
const TICK: u64 = 1 << 20;
/// Deadline for anything the guest has to do (a tick takes milliseconds).
const DEADLINE: Duration = Duration::from_secs(30);
const MEM_MIB: u32 = 32;

/// SIGKILLs every VMM the test started, even when an assertion fails.
#[derive(Default)]
struct Reaper(Vec<u32>);

impl Reaper {
    fn track(&mut self, vm: &dyn Vm) {
        self.0.push(vm.pid());
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            if pid_alive(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assembles and links the tiny guest into `dir`.
fn build_guest(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-guest");
    let obj = dir.join("guest.o");
    let elf = dir.join("guest.elf");
    run(Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&obj)
        .arg(src.join("guest.S")));
    run(Command::new("ld")
        .args(["-static", "-no-pie", "-z", "max-page-size=0x1000", "-T"])
        .arg(src.join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(&obj));
    elf
}

/// The counter in a Full (or Diff) memory file.
fn counter(mem: &Path) -> u64 {
    let f = std::fs::File::open(mem).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, COUNTER).unwrap();
    u64::from_le_bytes(b)
}

fn console_len(vm: &dyn Vm) -> usize {
    std::fs::metadata(vm.console_log()).map_or(0, |m| m.len() as usize)
}

/// Values of the complete `tick` lines written after byte `from`.
fn ticks(console: &Path, from: usize) -> Vec<u64> {
    let bytes = std::fs::read(console).unwrap_or_default();
    let mut text = &bytes[from.min(bytes.len())..];
    // A line that started before `from` is not ours.
    if from > 0 && bytes.get(from - 1) != Some(&b'\n') {
        match text.iter().position(|b| *b == b'\n') {
            Some(i) => text = &text[i + 1..],
            None => return Vec::new(),
        }
    }
    let text = String::from_utf8_lossy(text);
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => return Vec::new(),
    };
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter(|h| h.len() == 16)
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .collect()
}

/// Polls the console until the ticks after `from` satisfy `done`.
async fn wait_ticks(
    vm: &dyn Vm,
    from: usize,
    what: &str,
    done: impl Fn(&[u64]) -> bool,
) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let t = ticks(&vm.console_log(), from);
        if done(&t) {
            return t;
        }
        assert!(vm.is_alive(), "VMM died waiting for {what}:\n{}", tail(vm));
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}; ticks {t:x?}; console:\n{}",
            tail(vm)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn tail(vm: &dyn Vm) -> String {
    bhatti_vmm::console_tail(&vm.console_log(), 2000)
}

fn files(dir: &Path, name: &str) -> SnapshotFiles {
    SnapshotFiles {
        state: dir.join(format!("{name}.state")),
        memory: Some(dir.join(format!("{name}.mem"))),
    }
}

fn mem(f: &SnapshotFiles) -> &Path {
    f.memory.as_deref().unwrap()
}

fn measure(what: &str, d: Duration) {
    eprintln!("MEASURE {what} {:.3}ms", d.as_secs_f64() * 1e3);
}

macro_rules! timed {
    ($what:expr, $e:expr) => {{
        let t = Instant::now();
        let v = $e;
        measure($what, t.elapsed());
        v
    }};
}

async fn snapshot(vm: &dyn Vm, kind: SnapshotKind, f: &SnapshotFiles, what: &str) {
    timed!(what, vm.snapshot(kind, f).await)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", tail(vm)));
}

fn assert_sockets_gone(run_dir: &Path) {
    for s in [API_SOCKET, VSOCK_SOCKET] {
        assert!(!run_dir.join(s).exists(), "{s} left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle() {
    let Some(binary) = find_firecracker(None) else {
        eprintln!("SKIP: no Firecracker binary (set BHATTI_FIRECRACKER)");
        return;
    };
    let mut tmp = tempfile::Builder::new()
        .prefix("bhatti-fc-test.")
        .tempdir()
        .unwrap();
    if std::env::var_os("BHATTI_TEST_KEEP").is_some() {
        eprintln!("keeping {}", tmp.path().display());
        tmp.disable_cleanup(true);
    }
    let dir = tmp.path();
    let kernel = build_guest(dir);
    let root_disk = dir.join("root.img");
    std::fs::File::create(&root_disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let run_dir = dir.join("run");
    let snaps = dir.join("snapshots");
    std::fs::create_dir_all(&snaps).unwrap();
    let cfg = VmConfig {
        id: "fc-lifecycle".into(),
        vcpus: 1,
        memory_mib: MEM_MIB,
        kernel,
        kernel_args: String::new(),
        root_disk,
        config_disk: None,
        net: None,
        netns: None,
        run_dir: run_dir.clone(),
    };
    let backend = FirecrackerBackend::new(FirecrackerConfig {
        binary: Some(binary),
        seccomp: false,
        ..FirecrackerConfig::default()
    })
    .unwrap();
    assert!(backend.supports_diff_snapshots());
    let mut reaper = Reaper::default();

    // Boot: the guest says hello and prints its first tick (counter 0).
    let vm = timed!(
        "boot (spawn to InstanceStart done)",
        backend.boot(&cfg).await
    )
    .unwrap();
    reaper.track(vm.as_ref());
    let vm = vm.as_ref();
    let booted = Instant::now();
    let t = wait_ticks(vm, 0, "the first tick", |t| !t.is_empty()).await;
    measure("InstanceStart done to first tick", booted.elapsed());
    assert_eq!(t[0], 0, "a cold boot starts counting at 0");
    let console = std::fs::read_to_string(vm.console_log()).unwrap();
    assert!(console.contains("tiny-guest: up"), "{console}");
    assert!(run_dir.join(LAUNCH_RECORD).is_file());

    // Pause: the counter stands still across two Full snapshots.
    timed!("pause", vm.pause().await).unwrap();
    let a = files(&snaps, "a");
    let b = files(&snaps, "b");
    snapshot(vm, SnapshotKind::Full, &a, "snapshot Full 32 MiB").await;
    snapshot(vm, SnapshotKind::Full, &b, "snapshot Full 32 MiB (again)").await;
    let (ca, cb) = (counter(mem(&a)), counter(mem(&b)));
    assert_eq!(ca, cb, "the counter moved while paused");

    // Resume: the counter moves. Poll: resume, snapshot (which pauses a
    // running VM itself), look, until it has moved.
    let c = files(&snaps, "c");
    let start = Instant::now();
    let cc = loop {
        timed!("resume", vm.resume().await).unwrap();
        tokio::task::yield_now().await;
        snapshot(
            vm,
            SnapshotKind::Full,
            &c,
            "snapshot Full (pausing a running VM)",
        )
        .await;
        let v = counter(mem(&c));
        if v > ca {
            break v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "counter stuck at {v:#x} after resume"
        );
    };

    // Pause/resume round trips while we are here.
    let mut rounds = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        vm.resume().await.unwrap();
        let r = t.elapsed();
        let t = Instant::now();
        vm.pause().await.unwrap();
        rounds.push((r, t.elapsed()));
    }
    rounds.sort_by_key(|(r, _)| *r);
    measure("resume p50 of 10", rounds[5].0);
    rounds.sort_by_key(|(_, p)| *p);
    measure("pause p50 of 10", rounds[5].1);

    // Diff: the pages dirtied since Full `c` (pause and resume do not reset
    // dirty tracking; snapshots do). Taken until the counter has moved;
    // every Diff after the first lands on the existing file of the right
    // size, which Firecracker updates in place, so `d` accumulates all the
    // pages dirtied since `c`.
    let d = files(&snaps, "d");
    let start = Instant::now();
    let cd = loop {
        vm.resume().await.unwrap();
        tokio::task::yield_now().await;
        snapshot(vm, SnapshotKind::Diff, &d, "snapshot Diff").await;
        let v = counter(mem(&d));
        if v > cc {
            break v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "counter stuck at {v:#x} before the Diff"
        );
    };
    let dmeta = std::fs::metadata(mem(&d)).unwrap();
    assert_eq!(
        dmeta.len(),
        u64::from(MEM_MIB) << 20,
        "Diff memory file is full-size"
    );
    assert!(
        dmeta.blocks() * 512 < (u64::from(MEM_MIB) << 20) / 4,
        "Diff memory file is not sparse: {} bytes allocated",
        dmeta.blocks() * 512
    );

    // Kill: process and sockets gone.
    let pid = vm.pid();
    timed!("kill", vm.kill().await).unwrap();
    assert!(!vm.is_alive());
    assert!(!pid_alive(pid));
    assert_sockets_gone(&run_dir);

    // Restore from Full `c`: the counter continues from the snapshot value
    // (a fresh guest would print "tick 0000000000000000" first) and grows.
    let from = console_len(vm);
    let vm2 = timed!(
        "restore (spawn to snapshot/load done)",
        backend.restore(&cfg, &c).await
    )
    .unwrap();
    reaper.track(vm2.as_ref());
    let vm2 = vm2.as_ref();
    assert_ne!(vm2.pid(), pid);
    let t = wait_ticks(vm2, from, "a tick after restoring Full", |t| !t.is_empty()).await;
    assert!(
        t[0] >= cc && t[0] <= cc + TICK,
        "first tick {:#x} after restore does not continue from {cc:#x}",
        t[0]
    );
    // Dirty tracking was requested again on load: a Diff works, and it
    // shows the counter still growing.
    let e = files(&snaps, "e");
    snapshot(vm2, SnapshotKind::Diff, &e, "snapshot Diff after restore").await;
    let ce = counter(mem(&e));
    assert!(
        ce >= t[0] && ce > cc,
        "counter {ce:#x} after restoring {cc:#x}"
    );
    vm2.kill().await.unwrap();
    assert_sockets_gone(&run_dir);

    // Restore from Full `c` + Diff `d`, merged.
    let merged = SnapshotFiles {
        state: d.state.clone(),
        memory: Some(snaps.join("merged.mem")),
    };
    std::fs::copy(mem(&c), mem(&merged)).unwrap();
    let bytes = timed!(
        "merge Diff onto a copy of Full",
        merge_diff_snapshot(mem(&merged), mem(&d))
    )
    .unwrap();
    eprintln!("MEASURE diff_bytes_merged {bytes}");
    assert!(bytes > 0 && bytes < u64::from(MEM_MIB) << 20, "{bytes}");
    assert_eq!(counter(mem(&merged)), cd);
    let from = console_len(vm2);
    let vm3 = timed!("restore merged", backend.restore(&cfg, &merged).await).unwrap();
    reaper.track(vm3.as_ref());
    let t = wait_ticks(
        vm3.as_ref(),
        from,
        "a tick after restoring the merge",
        |t| !t.is_empty(),
    )
    .await;
    assert!(
        t[0] >= cd && t[0] <= cd + TICK,
        "first tick {:#x} after the merged restore does not continue from {cd:#x}",
        t[0]
    );
    let f = files(&snaps, "f");
    snapshot(
        vm3.as_ref(),
        SnapshotKind::Full,
        &f,
        "snapshot Full after merged restore",
    )
    .await;
    let cf = counter(mem(&f));
    assert!(
        cf >= t[0] && cf > cd,
        "counter {cf:#x} after restoring {cd:#x}"
    );

    // Adopt (a restarted daemon) and clean up through the adopted handle.
    let adopted = backend.adopt(&cfg).await.unwrap();
    assert_eq!(adopted.pid(), vm3.pid());
    adopted.pause().await.unwrap();
    adopted.resume().await.unwrap();
    let pid3 = vm3.pid();
    adopted.kill().await.unwrap();
    assert!(!pid_alive(pid3));
    // The original handle learns of the exit when its waiter reaps the child.
    let start = Instant::now();
    while vm3.is_alive() {
        assert!(
            start.elapsed() < DEADLINE,
            "the boot handle still sees VMM {pid3}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_sockets_gone(&run_dir);
    assert!(backend.adopt(&cfg).await.is_err(), "adopted a dead VMM");
    for pid in &reaper.0 {
        assert!(!pid_alive(*pid), "VMM {pid} still running");
    }
}
