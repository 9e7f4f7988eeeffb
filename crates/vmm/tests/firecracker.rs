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
//!
//! The jailed tests run Firecracker under its jailer (found via
//! `BHATTI_JAILER`, else next to the Firecracker binary, else one SKIP
//! line; they need root and a static, musl, Firecracker build): uid/gid,
//! chroot and cgroup limits of the process, snapshots and restores through
//! the chroot, a fork restoring another VM's snapshot with its own disk,
//! adopt, and nothing left after a kill. As uid/gid they use the
//! `bhatti-vmm` user, else nobody.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bhatti_vmm::firecracker::jail::{Jail, JAIL_USER};
use bhatti_vmm::firecracker::{
    find_firecracker, find_jailer, merge_diff_snapshot, FirecrackerBackend, FirecrackerConfig,
    JailerConfig, LaunchRecord, API_SOCKET, LAUNCH_RECORD, VSOCK_SOCKET,
};
use bhatti_vmm::limits::ResourceLimits;
use bhatti_vmm::process::pid_alive;
use bhatti_vmm::{DataDisk, SnapshotFiles, SnapshotKind, Vm, VmConfig, VmmBackend};

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
        data_disks: data_disks(dir, "fc-lifecycle"),
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

// ---------------------------------------------------------------------------
// Jailed: Firecracker under its jailer (chroot, uid/gid, cgroup limits).
// ---------------------------------------------------------------------------

/// The jailer, Firecracker and the uid/gid to jail as; `None` after one
/// SKIP line.
fn jail_setup(test: &str) -> Option<(PathBuf, PathBuf, u32, u32)> {
    let Some(firecracker) = find_firecracker(None) else {
        eprintln!("SKIP {test}: no Firecracker binary (set BHATTI_FIRECRACKER)");
        return None;
    };
    let Some(jailer) = find_jailer(None, Some(&firecracker)) else {
        eprintln!(
            "SKIP {test}: no jailer next to {} (set BHATTI_JAILER)",
            firecracker.display()
        );
        return None;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP {test}: the jailer needs root");
        return None;
    }
    // The daemon's user if the host has it, else nobody: any non-root
    // uid shows the drop.
    let (uid, gid) = match nix::unistd::User::from_name(JAIL_USER) {
        Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
        _ => (65534, 65534),
    };
    Some((firecracker, jailer, uid, gid))
}

/// Removes, even when an assertion fails, every jail the test made: kills
/// their processes, unmounts, removes the chroots and cgroups (and the
/// test's parent cgroups, if empty).
struct JailReaper {
    pids: Vec<u32>,
    jails: Vec<Jail>,
    parents: Vec<PathBuf>,
    mounts: Vec<PathBuf>,
}

impl JailReaper {
    fn new(parent_cgroup: &str) -> JailReaper {
        let parents = [
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/pids",
            "/sys/fs/cgroup",
        ]
        .iter()
        .map(|m| Path::new(m).join(parent_cgroup))
        .collect();
        JailReaper {
            pids: Vec::new(),
            jails: Vec::new(),
            parents,
            mounts: Vec::new(),
        }
    }

    /// Tracks a VM's process and jail (from its launch record).
    fn track(&mut self, vm: &dyn Vm, run_dir: &Path) -> Jail {
        self.pids.push(vm.pid());
        let j = jail_of(run_dir);
        self.jails.push(j.clone());
        j
    }
}

fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

impl Drop for JailReaper {
    fn drop(&mut self) {
        for pid in &self.pids {
            if pid_alive(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
        let start = Instant::now();
        while self.pids.iter().any(|p| pid_alive(*p)) && start.elapsed() < DEADLINE {
            std::thread::sleep(Duration::from_millis(10));
        }
        for j in &self.jails {
            for m in mounts_below(&j.dir) {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
            let _ = std::fs::remove_dir_all(&j.dir);
            for d in &j.cgroups {
                // The kernel frees a cgroup a moment after its last task.
                let start = Instant::now();
                while d.exists()
                    && std::fs::remove_dir(d).is_err()
                    && start.elapsed() < Duration::from_secs(3)
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        for p in &self.parents {
            let _ = std::fs::remove_dir(p);
        }
        for m in &self.mounts {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The jail recorded in a run dir's launch record.
fn jail_of(run_dir: &Path) -> Jail {
    let bytes = std::fs::read(run_dir.join(LAUNCH_RECORD)).unwrap();
    let rec: LaunchRecord = serde_json::from_slice(&bytes).unwrap();
    rec.jail.expect("a jailed launch record names its jail")
}

fn dev_ino(p: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// `(uid, gid)` lines of `/proc/<pid>/status`: real, effective, saved, fs.
fn ids_of(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    (field("Uid:"), field("Gid:"))
}

/// The VMM runs as the jail's uid/gid, chrooted in its jail, in its
/// cgroups with `cfg`'s limits (read back from the files of the cgroups
/// `/proc/<pid>/cgroup` names).
fn assert_jailed(pid: u32, j: &Jail, cfg: &VmConfig) {
    let (uids, gids) = ids_of(pid);
    assert_eq!(uids, [j.uid; 4], "uids of {pid}");
    assert_eq!(gids, [j.gid; 4], "gids of {pid}");
    assert_ne!(j.uid, 0);
    // /proc/<pid>/root reads as "/" (its own mount namespace); the inode
    // it leads to is the chroot.
    let root = dev_ino(Path::new(&format!("/proc/{pid}/root")));
    assert!(root.is_some());
    assert_eq!(
        root,
        dev_ino(&j.root),
        "{pid} is not chrooted in {}",
        j.root.display()
    );
    assert!(
        j.root.ends_with(format!("{}/root", j.id)),
        "{}",
        j.root.display()
    );

    let limits = ResourceLimits::for_vm(cfg);
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    // The directory of `controller`'s cgroup for this process.
    let dir = |controller: &str| -> PathBuf {
        let (mount, path) = if j.cgroup_version == 2 {
            let m = mounts
                .lines()
                .map(|l| l.split(' ').collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[2] == "cgroup2")
                .map(|f| f[1].to_owned())
                .unwrap();
            let p = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            (m, p.to_owned())
        } else {
            let m = mounts
                .lines()
                .map(|l| l.split(' ').collect::<Vec<_>>())
                .find(|f| {
                    f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == controller)
                })
                .map(|f| f[1].to_owned())
                .unwrap_or_else(|| panic!("no {controller} mount"));
            let p = text
                .lines()
                .find_map(|l| {
                    let mut it = l.splitn(3, ':');
                    let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
                    ctrls
                        .split(',')
                        .any(|c| c == controller)
                        .then(|| path.to_owned())
                })
                .unwrap_or_else(|| panic!("{pid} has no {controller} cgroup: {text}"));
            (m, p)
        };
        let d = Path::new(&mount).join(path.trim_start_matches('/'));
        assert!(
            j.cgroups.contains(&d),
            "{} not among {:?}",
            d.display(),
            j.cgroups
        );
        assert!(d.ends_with(&j.id), "{}", d.display());
        d
    };
    let read = |d: PathBuf, f: &str| -> String {
        std::fs::read_to_string(d.join(f))
            .unwrap_or_else(|e| panic!("{}/{f}: {e}", d.display()))
            .trim()
            .to_owned()
    };
    if j.cgroup_version == 2 {
        assert_eq!(read(dir("cpu"), "cpu.max"), limits.cpu_max());
        assert_eq!(
            read(dir("memory"), "memory.max"),
            limits.memory_bytes.to_string()
        );
    } else {
        assert_eq!(
            read(dir("cpu"), "cpu.cfs_quota_us"),
            limits.cpu_quota_us.to_string()
        );
        assert_eq!(
            read(dir("cpu"), "cpu.cfs_period_us"),
            limits.cpu_period_us.to_string()
        );
        assert_eq!(
            read(dir("memory"), "memory.limit_in_bytes"),
            limits.memory_bytes.to_string()
        );
    }
    assert_eq!(read(dir("pids"), "pids.max"), limits.pids_max.to_string());
}

/// The files open in `pid`: `(link text, (dev, ino))`.
fn open_files(pid: u32) -> Vec<(String, Option<(u64, u64)>)> {
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let link = std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            (link, dev_ino(&e.path()))
        })
        .collect()
}

/// After a kill: no process, no chroot (nor mounts in it), no cgroups.
fn assert_jail_gone(pid: u32, j: &Jail) {
    assert!(!pid_alive(pid), "VMM {pid} still running");
    assert!(!j.dir.exists(), "{} left behind", j.dir.display());
    assert!(
        mounts_below(&j.dir).is_empty(),
        "mounts left in {}",
        j.dir.display()
    );
    for d in &j.cgroups {
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
}

/// A snapshot file written through the jail: outside it, the daemon's,
/// readable (not writable) by the jail's group.
fn assert_sealed(p: &Path, j: &Jail) {
    let m = std::fs::symlink_metadata(p).unwrap();
    assert!(m.file_type().is_file(), "{}", p.display());
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o777),
        (0, j.gid, 0o640),
        "{}",
        p.display()
    );
    for n in ["snapshot.state", "snapshot.mem"] {
        assert!(!j.root.join(n).exists(), "{n} left in the chroot");
    }
}

fn disk(path: &Path, marker: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(marker, 0).unwrap();
}

fn jailed_cfg(id: &str, dir: &Path, kernel: &Path, root_disk: &Path) -> VmConfig {
    VmConfig {
        id: id.into(),
        vcpus: 1,
        memory_mib: MEM_MIB,
        kernel: kernel.to_path_buf(),
        kernel_args: String::new(),
        root_disk: root_disk.to_path_buf(),
        config_disk: None,
        net: None,
        netns: None,
        run_dir: dir.join(format!("run-{id}")),
        data_disks: data_disks(dir, id),
    }
}

/// Two data disks: the VM's own read-write one and a read-only one all
/// VMs in `dir` share (volumes). The tiny guest never reads them; the API
/// must accept them at boot and reopen them on restore (in the jail too).
fn data_disks(dir: &Path, id: &str) -> Vec<DataDisk> {
    let own = dir.join(format!("{id}-vol.img"));
    let shared = dir.join("shared-ro-vol.img");
    for p in [&own, &shared] {
        if !p.exists() {
            std::fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
        }
    }
    vec![
        DataDisk {
            path: own,
            read_only: false,
            serial: DataDisk::serial_for(0),
        },
        DataDisk {
            path: shared,
            read_only: true,
            serial: DataDisk::serial_for(1),
        },
    ]
}

/// Resumes and takes `kind` snapshots into `f` until the counter in its
/// memory passes `above`; returns the counter.
async fn snapshot_until_moved(
    vm: &dyn Vm,
    kind: SnapshotKind,
    f: &SnapshotFiles,
    above: u64,
) -> u64 {
    let start = Instant::now();
    loop {
        vm.resume().await.unwrap();
        tokio::task::yield_now().await;
        snapshot(vm, kind, f, "snapshot (jailed)").await;
        let v = counter(mem(f));
        if v > above {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "counter stuck at {v:#x}");
    }
}

/// The first tick of a restored VM continues from `from`.
async fn assert_continues(vm: &dyn Vm, console_from: usize, from: u64, what: &str) {
    let t = wait_ticks(vm, console_from, what, |t| !t.is_empty()).await;
    assert!(
        t[0] >= from && t[0] <= from + TICK,
        "{what}: first tick {:#x} does not continue from {from:#x}",
        t[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_lifecycle_and_fork() {
    let test = "jailed_lifecycle_and_fork";
    let Some((firecracker, jailer, uid, gid)) = jail_setup(test) else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("bhatti-fc-jail.")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let kernel = build_guest(dir);
    let (disk_a, disk_b) = (dir.join("a.img"), dir.join("b.img"));
    disk(&disk_a, b"disk of A");
    // Longer than sun_path once the run dir is appended inside the chroot:
    // sockets are reached through /proc/self/fd.
    let chroot_base = dir.join("j".repeat(80));
    let snaps = dir.join("snapshots");
    std::fs::create_dir_all(&snaps).unwrap();
    let parent = format!("bhatti-test-{}", std::process::id());
    let mut reaper = JailReaper::new(&parent);
    let backend = FirecrackerBackend::new(FirecrackerConfig {
        binary: Some(firecracker),
        seccomp: false,
        jailer: Some(JailerConfig {
            binary: Some(jailer),
            uid: Some(uid),
            gid: Some(gid),
            chroot_base: chroot_base.clone(),
            cgroup_version: None,
            parent_cgroup: parent.clone(),
        }),
        ..FirecrackerConfig::default()
    })
    .unwrap();
    let cfg_a = jailed_cfg("fc-jail-a", dir, &kernel, &disk_a);

    // Boot A, jailed.
    let a = timed!("jailed boot", backend.boot(&cfg_a).await).unwrap();
    let ja = reaper.track(a.as_ref(), &cfg_a.run_dir);
    let a = a.as_ref();
    let t = wait_ticks(a, 0, "A's first tick", |t| !t.is_empty()).await;
    assert_eq!(t[0], 0);
    assert_jailed(a.pid(), &ja, &cfg_a);
    let rec: LaunchRecord =
        serde_json::from_slice(&std::fs::read(cfg_a.run_dir.join(LAUNCH_RECORD)).unwrap()).unwrap();
    eprintln!(
        "jailed command line: {} {}",
        rec.binary.display(),
        rec.args.join(" ")
    );
    assert!(rec.args.iter().any(|a| a == "--cgroup"), "{:?}", rec.args);
    assert!(
        rec.api_socket.as_os_str().len() >= 108,
        "the test means a socket path beyond sun_path: {}",
        rec.api_socket.display()
    );
    assert!(rec.api_socket.starts_with(&ja.root));
    // A's Firecracker has A's disk open, through the chroot's name for it.
    let a_disk = dev_ino(&disk_a);
    assert_eq!(dev_ino(&ja.root.join("rootfs.ext4")), a_disk);
    assert!(open_files(a.pid()).iter().any(|(_, di)| *di == a_disk));

    // Full snapshots of a paused VM: the counter stands still; the files
    // land outside the chroot, sealed.
    a.pause().await.unwrap();
    let (s1, s2) = (files(&snaps, "a1"), files(&snaps, "a2"));
    snapshot(a, SnapshotKind::Full, &s1, "jailed Full").await;
    snapshot(a, SnapshotKind::Full, &s2, "jailed Full (again)").await;
    assert_eq!(counter(mem(&s1)), counter(mem(&s2)), "moved while paused");
    for p in [&s1.state, mem(&s1)] {
        assert_sealed(p, &ja);
    }
    // Resumed, it counts on.
    let c = files(&snaps, "c");
    let cc = snapshot_until_moved(a, SnapshotKind::Full, &c, counter(mem(&s1))).await;

    // A Diff onto a copy of Full `c`: Firecracker updates it in place
    // through the chroot (the copy becomes the merged image).
    let merged = SnapshotFiles {
        state: snaps.join("d.state"),
        memory: Some(snaps.join("d.mem")),
    };
    std::fs::copy(mem(&c), mem(&merged)).unwrap();
    let cd = snapshot_until_moved(a, SnapshotKind::Diff, &merged, cc).await;
    assert_sealed(mem(&merged), &ja);
    assert_eq!(
        std::fs::metadata(mem(&merged)).unwrap().len(),
        u64::from(MEM_MIB) << 20
    );

    // Fork: B restores A's snapshot `c` (whose state names A's disk as
    // /rootfs.ext4) with a copy of A's disk of its own, while A runs.
    std::fs::copy(&disk_a, &disk_b).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&disk_b)
        .unwrap()
        .write_all_at(b"disk of B", 0)
        .unwrap();
    a.resume().await.unwrap();
    let cfg_b = jailed_cfg("fc-jail-b", dir, &kernel, &disk_b);
    let b = timed!("jailed fork restore", backend.restore(&cfg_b, &c).await).unwrap();
    let jb = reaper.track(b.as_ref(), &cfg_b.run_dir);
    let b = b.as_ref();
    assert_continues(b, 0, cc, "the fork").await;
    assert_jailed(b.pid(), &jb, &cfg_b);
    assert_ne!(ja.root, jb.root);
    let b_disk = dev_ino(&disk_b);
    assert_ne!(a_disk, b_disk);
    let fds = open_files(b.pid());
    let disk_fds: Vec<&String> = fds
        .iter()
        .filter(|(_, di)| *di == b_disk)
        .map(|(l, _)| l)
        .collect();
    assert!(!disk_fds.is_empty(), "B has not opened its disk: {fds:?}");
    // Named inside B's chroot: the path recorded in the snapshot.
    assert!(
        disk_fds.iter().all(|l| *l == "/rootfs.ext4"),
        "{disk_fds:?}"
    );
    assert_eq!(dev_ino(&jb.root.join("rootfs.ext4")), b_disk);
    assert!(
        !fds.iter().any(|(_, di)| *di == a_disk),
        "the fork opened its origin's disk: {fds:?}"
    );
    // A still has its own.
    assert!(open_files(a.pid()).iter().any(|(_, di)| *di == a_disk));

    // Kill A: process, chroot and cgroups gone.
    let pid_a = a.pid();
    timed!("jailed kill", a.kill().await).unwrap();
    assert_jail_gone(pid_a, &ja);

    // Restore A from the in-place Diff: it continues from the Diff.
    let from = console_len(a);
    let a2 = backend.restore(&cfg_a, &merged).await.unwrap();
    let ja2 = reaper.track(a2.as_ref(), &cfg_a.run_dir);
    assert_continues(a2.as_ref(), from, cd, "the merged Diff").await;
    assert!(open_files(a2.pid()).iter().any(|(_, di)| *di == a_disk));
    let pid_a2 = a2.pid();
    a2.kill().await.unwrap();
    assert_jail_gone(pid_a2, &ja2);

    // Adopt B (a restarted daemon), snapshot and kill through that handle.
    let adopted = backend.adopt(&cfg_b).await.unwrap();
    assert_eq!(adopted.pid(), b.pid());
    adopted.pause().await.unwrap();
    assert!(adopted.is_paused().await.unwrap());
    let e = files(&snaps, "e");
    snapshot(
        adopted.as_ref(),
        SnapshotKind::Full,
        &e,
        "jailed Full after adopt",
    )
    .await;
    assert!(counter(mem(&e)) > cc);
    assert_sealed(mem(&e), &jb);
    adopted.resume().await.unwrap();
    let pid_b = b.pid();
    adopted.kill().await.unwrap();
    assert_jail_gone(pid_b, &jb);
    assert!(backend.adopt(&cfg_b).await.is_err(), "adopted a dead VMM");

    // Nothing of the jails remains under the chroot base.
    let left: Vec<_> = std::fs::read_dir(chroot_base.join("firecracker"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The chroot base on another filesystem (a tmpfs): disks and the kernel
/// are bind-mounted in, snapshots written in the chroot and copied out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_across_filesystems() {
    let test = "jailed_across_filesystems";
    let Some((firecracker, jailer, uid, gid)) = jail_setup(test) else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("bhatti-fc-jailx.")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let kernel = build_guest(dir);
    let root_disk = dir.join("root.img");
    disk(&root_disk, b"disk");
    let snaps = dir.join("snapshots");
    std::fs::create_dir_all(&snaps).unwrap();
    let chroot_base = dir.join("jailfs");
    std::fs::create_dir_all(&chroot_base).unwrap();
    let parent = format!("bhatti-test-x{}", std::process::id());
    let mut reaper = JailReaper::new(&parent);
    nix::mount::mount(
        Some("bhatti-jail-test"),
        &chroot_base,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64m,mode=0755"),
    )
    .unwrap();
    reaper.mounts.push(chroot_base.clone());
    assert_ne!(
        std::fs::metadata(&chroot_base).unwrap().dev(),
        std::fs::metadata(&root_disk).unwrap().dev()
    );
    let backend = FirecrackerBackend::new(FirecrackerConfig {
        binary: Some(firecracker),
        seccomp: false,
        jailer: Some(JailerConfig {
            binary: Some(jailer),
            uid: Some(uid),
            gid: Some(gid),
            chroot_base: chroot_base.clone(),
            cgroup_version: None,
            parent_cgroup: parent,
        }),
        ..FirecrackerConfig::default()
    })
    .unwrap();
    let cfg = jailed_cfg("fc-jailx", dir, &kernel, &root_disk);
    let vm = backend.boot(&cfg).await.unwrap();
    let j = reaper.track(vm.as_ref(), &cfg.run_dir);
    let vm = vm.as_ref();
    wait_ticks(vm, 0, "the first tick", |t| !t.is_empty()).await;
    assert_jailed(vm.pid(), &j, &cfg);
    // Bind mounts: the disk's and kernel's own inodes, the kernel read-only.
    let mounted = mounts_below(&j.dir);
    assert_eq!(mounted.len(), 2, "{mounted:?}");
    let disk_id = dev_ino(&root_disk);
    assert!(open_files(vm.pid()).iter().any(|(_, di)| *di == disk_id));
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .open(j.root.join("vmlinux"))
        .is_err_and(|e| e.raw_os_error() == Some(libc::EROFS)));

    vm.pause().await.unwrap();
    let c = files(&snaps, "c");
    snapshot(vm, SnapshotKind::Full, &c, "jailed Full, copied out").await;
    assert_sealed(&c.state, &j);
    assert_sealed(mem(&c), &j);
    let cc = counter(mem(&c));
    // A Diff onto a copy of `c`: written sparse in the chroot, folded onto
    // the copy.
    let merged = SnapshotFiles {
        state: snaps.join("d.state"),
        memory: Some(snaps.join("d.mem")),
    };
    std::fs::copy(mem(&c), mem(&merged)).unwrap();
    let cd = snapshot_until_moved(vm, SnapshotKind::Diff, &merged, cc).await;
    assert_sealed(mem(&merged), &j);
    // A fresh Diff file stays sparse.
    let d2 = files(&snaps, "d2");
    vm.pause().await.unwrap();
    snapshot(vm, SnapshotKind::Diff, &d2, "jailed Diff, copied out").await;
    let m = std::fs::metadata(mem(&d2)).unwrap();
    assert_eq!(m.len(), u64::from(MEM_MIB) << 20);
    assert!(
        m.blocks() * 512 < m.len() / 4,
        "{} bytes allocated",
        m.blocks() * 512
    );
    let pid = vm.pid();
    vm.kill().await.unwrap();
    assert_jail_gone(pid, &j);

    // Restore from the merged Diff: inputs bind-mounted read-only.
    let from = console_len(vm);
    let vm2 = backend.restore(&cfg, &merged).await.unwrap();
    let j2 = reaper.track(vm2.as_ref(), &cfg.run_dir);
    assert_continues(vm2.as_ref(), from, cd, "the merged Diff").await;
    assert_eq!(mounts_below(&j2.dir).len(), 3, "disk, state, memory");
    assert!(open_files(vm2.pid()).iter().any(|(_, di)| *di == disk_id));
    let pid2 = vm2.pid();
    vm2.kill().await.unwrap();
    assert_jail_gone(pid2, &j2);
}
