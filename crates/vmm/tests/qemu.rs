//! Real-VM tests of the QEMU backend alone (no daemon).
//!
//! Needs QEMU, a guest kernel, a rootfs and a static lohar:
//! - `BHATTI_KERNEL`, else the newest `/var/cache/bhatti-ci/kernel/*/vmlinux`;
//! - `BHATTI_ROOTFS`, else `/var/cache/bhatti-ci/rootfs/*/rootfs.ext4`;
//! - `BHATTI_LOHAR`, else `target/x86_64-unknown-linux-gnu/lohar/lohar` (what
//!   `scripts/build-lohar.sh` builds).
//!
//! A missing artifact skips the test with one line on stderr. Each test
//! copies the rootfs (sparse) into a temp dir, installs lohar into the copy
//! and builds a config drive carrying the token. The tests are serialized:
//! under TCG two guests at once on two cores only measure contention.
//!
//! Timings are printed as `MEASURE <what> <value>` lines (run with
//! `--nocapture` to see them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bhatti_protocol::{AgentClient, ExecRequest};
use bhatti_vmm::cgroup::{CgroupConfig, Hierarchy};
use bhatti_vmm::qemu::{Accel, Confinement, QemuBackend, QemuConfig, VMM_USER};
use bhatti_vmm::{SnapshotFiles, SnapshotKind, Vm, VmConfig, VmmBackend};

const TOKEN: &str = "qemu-backend-test-token";
/// Boot budget under TCG on a loaded 2-core host.
const AGENT_TIMEOUT: Duration = Duration::from_secs(90);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("workspace root")
        .to_path_buf()
}

fn newest(glob_dir: &Path, file: &str) -> Option<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(glob_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with(['.', '_']))
        .map(|e| e.path().join(file))
        .filter(|p| p.is_file())
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

fn from_env(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

struct Artifacts {
    kernel: PathBuf,
    rootfs: PathBuf,
    lohar: PathBuf,
}

/// One SKIP line; under `BHATTI_REQUIRE_VMS` (CI) a failure instead.
fn skip(test: &str, why: &str) {
    let required = std::env::var("BHATTI_REQUIRE_VMS").is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(
        !required,
        "{test} cannot run: {why} (BHATTI_REQUIRE_VMS is set)"
    );
    eprintln!("SKIP {test}: {why}");
}

fn artifacts(test: &str) -> Option<Artifacts> {
    let cache = Path::new("/var/cache/bhatti-ci");
    let root = workspace_root();
    let kernel = from_env("BHATTI_KERNEL").or_else(|| newest(&cache.join("kernel"), "vmlinux"));
    let rootfs = from_env("BHATTI_ROOTFS").or_else(|| newest(&cache.join("rootfs"), "rootfs.ext4"));
    let lohar = from_env("BHATTI_LOHAR").or_else(|| {
        // Where scripts/build-lohar.sh puts it (static glibc), then musl.
        [
            "x86_64-unknown-linux-gnu/lohar",
            "x86_64-unknown-linux-musl/lohar",
            "x86_64-unknown-linux-musl/release",
        ]
        .iter()
        .map(|p| root.join("target").join(p).join("lohar"))
        .find(|p| p.is_file())
    });
    let qemu = bhatti_vmm::probe::probe().qemu;
    let missing: Vec<&str> = [
        ("qemu-system-x86_64", qemu.is_some()),
        (
            "kernel (BHATTI_KERNEL)",
            kernel.as_ref().is_some_and(|p| p.is_file()),
        ),
        (
            "rootfs (BHATTI_ROOTFS)",
            rootfs.as_ref().is_some_and(|p| p.is_file()),
        ),
        (
            "lohar (BHATTI_LOHAR)",
            lohar.as_ref().is_some_and(|p| p.is_file()),
        ),
    ]
    .iter()
    .filter(|(_, ok)| !ok)
    .map(|(n, _)| *n)
    .collect();
    if !missing.is_empty() {
        skip(test, &format!("missing {}", missing.join(", ")));
        return None;
    }
    Some(Artifacts {
        kernel: kernel.unwrap(),
        rootfs: rootfs.unwrap(),
        lohar: lohar.unwrap(),
    })
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

/// A temp dir with the VM's own disks.
struct Fixture {
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

impl Fixture {
    fn new(a: &Artifacts) -> Fixture {
        Fixture::with_config(a, serde_json::json!({}))
    }

    /// `extra`: more `config.json` fields (e.g. `network`).
    fn with_config(a: &Artifacts, extra: serde_json::Value) -> Fixture {
        let mut dir = tempfile::Builder::new()
            .prefix("bhatti-qemu-test.")
            .tempdir()
            .unwrap();
        if std::env::var_os("BHATTI_TEST_KEEP").is_some() {
            eprintln!("keeping {}", dir.path().display());
            dir.disable_cleanup(true);
        }
        let disk = dir.path().join("root.ext4");
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(&a.rootfs)
            .arg(&disk));
        run(
            Command::new(workspace_root().join("images/rootfs/install-lohar.sh"))
                .arg(&disk)
                .arg(&a.lohar),
        );
        let cfg_dir = dir.path().join("config");
        std::fs::create_dir(&cfg_dir).unwrap();
        let mut config = serde_json::json!({
            "sandbox_id": "qemu-test",
            "hostname": "qemu-test",
            "token": TOKEN,
            "agent": {"kind": "serial", "name": bhatti_vmm::AGENT_SERIAL_NAME},
        });
        for (k, v) in extra.as_object().expect("object") {
            config[k] = v.clone();
        }
        std::fs::write(cfg_dir.join("config.json"), config.to_string()).unwrap();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-d"])
            .arg(&cfg_dir)
            .args(["-L", "bhatti-config"])
            .arg(dir.path().join("cfg.ext4"))
            .arg("4M"));
        Fixture {
            dir,
            kernel: a.kernel.clone(),
        }
    }

    fn config(&self, run: &str) -> VmConfig {
        let run_dir = self.dir.path().join(run);
        std::fs::create_dir_all(&run_dir).unwrap();
        VmConfig {
            id: format!("qemu-test-{run}"),
            vcpus: 1,
            memory_mib: 256,
            kernel: self.kernel.clone(),
            kernel_args: String::new(),
            root_disk: self.dir.path().join("root.ext4"),
            config_disk: Some(self.dir.path().join("cfg.ext4")),
            net: None,
            netns: None,
            run_dir,
            data_disks: Vec::new(),
        }
    }
}

fn backend() -> QemuBackend {
    QemuBackend::new(QemuConfig {
        binary: None,
        accel: Accel::Auto,
        extra_args: vec![],
    })
    .expect("QEMU backend")
}

/// Connects to the agent, retrying until it answers the handshake.
async fn agent(vm: &dyn Vm, timeout: Duration) -> AgentClient {
    let deadline = Instant::now() + timeout;
    loop {
        let stream = vm.connect_agent().await.expect("agent socket");
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, AgentClient::connect(stream, TOKEN)).await {
            Ok(Ok(c)) => return c,
            Ok(Err(e)) if Instant::now() < deadline => {
                eprintln!("agent handshake failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => panic!(
                "agent handshake: {e}; console:\n{}",
                bhatti_vmm::console_tail(&vm.console_log(), 3000)
            ),
            Err(_) => panic!(
                "no agent after {timeout:?}; console:\n{}",
                bhatti_vmm::console_tail(&vm.console_log(), 3000)
            ),
        }
    }
}

fn exec_req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        cwd: None,
        stdin: false,
        timeout_ms: Some(30_000),
        ..Default::default()
    }
}

async fn sh(c: &AgentClient, script: &str) -> String {
    let out = c
        .exec(exec_req(&["/bin/sh", "-c", script]), None)
        .await
        .expect("exec");
    assert_eq!(
        out.status.exit_code,
        0,
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Seconds from `start` until `needle` shows up in the console log.
fn console_time(log: &Path, needle: &str, start: Instant, timeout: Duration) -> Option<Duration> {
    while start.elapsed() < timeout {
        if std::fs::read(log)
            .map(|b| String::from_utf8_lossy(&b).contains(needle))
            .unwrap_or(false)
        {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}

fn stats(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!(
        "MEASURE {name} n={} min={} p50={} p90={} max={}",
        v.len(),
        ms(v[0]),
        ms(p(0.5)),
        ms(p(0.9)),
        ms(v[v.len() - 1])
    );
}

/// SIGKILLs a VMM if the test panics before killing it itself.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if bhatti_vmm::process::pid_alive(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::SIGKILL,
            );
        }
    }
}

async fn assert_gone(vm: &dyn Vm) {
    let pid = vm.pid();
    vm.kill().await.expect("kill");
    assert!(!vm.is_alive());
    assert!(
        !bhatti_vmm::process::pid_alive(pid),
        "QEMU {pid} still exists after kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_exec_pause_resume() {
    let Some(a) = artifacts("boot_exec_pause_resume") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new(&a);
    let be = backend();
    let cfg = fx.config("run1");

    let t0 = Instant::now();
    let vm = be.boot(&cfg).await.expect("boot");
    let spawned = t0.elapsed();
    let _guard = KillOnDrop(vm.pid());
    let console = vm.console_log();
    let watcher = {
        let console = console.clone();
        std::thread::spawn(move || {
            console_time(&console, "as init process", t0, Duration::from_secs(90))
        })
    };
    let client = agent(vm.as_ref(), AGENT_TIMEOUT).await;
    let agent_up = t0.elapsed();
    println!("MEASURE qemu_spawn_to_qmp {}", ms(spawned));
    if let Some(init) = watcher.join().unwrap() {
        println!("MEASURE boot_to_init {}", ms(init));
    }
    println!("MEASURE boot_to_agent_hello {}", ms(agent_up));
    println!("agent: {:?}", client.hello());

    client.ping().await.expect("ping");
    assert_eq!(sh(&client, "echo hello").await, "hello\n");
    // The root disk is /dev/vda (2 GiB), writable; the config drive vdb.
    let mounts = sh(&client, "cat /proc/mounts").await;
    assert!(mounts.lines().any(|l| l.contains(" / ext4 rw")), "{mounts}");
    let sizes = sh(&client, "cat /sys/block/vda/size /sys/block/vdb/size").await;
    let sizes: Vec<u64> = sizes
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(sizes[1], 8192, "vdb is the 4 MiB config drive");
    assert!(sizes[0] > sizes[1], "vda is the root disk: {sizes:?}");

    // An exec started while paused completes only after resume.
    vm.pause().await.expect("pause");
    let c2 = client.clone();
    let pending = tokio::spawn(async move { c2.exec(exec_req(&["echo", "late"]), None).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!pending.is_finished(), "exec completed while paused");
    vm.resume().await.expect("resume");
    let out = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .expect("exec after resume")
        .unwrap()
        .expect("exec");
    assert_eq!(&out.stdout[..], b"late\n");

    // QMP stop/cont latency.
    let (mut stops, mut conts) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        let t = Instant::now();
        vm.pause().await.unwrap();
        stops.push(t.elapsed());
        let t = Instant::now();
        vm.resume().await.unwrap();
        conts.push(t.elapsed());
    }
    stats("qmp_stop", stops);
    stats("qmp_cont", conts);
    client.ping().await.expect("ping after pause/resume cycles");

    assert_gone(vm.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore() {
    let Some(a) = artifacts("snapshot_restore") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new(&a);
    let be = backend();
    let cfg = fx.config("run1");
    let vm = be.boot(&cfg).await.expect("boot");
    let _guard = KillOnDrop(vm.pid());
    let client = agent(vm.as_ref(), AGENT_TIMEOUT).await;
    let boot_id = client.hello().boot_id.clone();

    // State that must survive: a background process, a file (not synced:
    // its data may live only in the guest page cache, i.e. in RAM), and a
    // file synced to the disk.
    let mut bg = exec_req(&["/bin/sh", "-c", "while :; do sleep 0.2; done"]);
    bg.timeout_ms = None;
    let bg = client.exec_detached(bg).await.expect("detached exec");
    sh(
        &client,
        "cd /workspace && echo cached > cached && echo synced > synced && sync synced",
    )
    .await;

    // BHATTI_TEST_FILL_MIB=N: dirty N MiB of guest RAM first (tmpfs), to
    // measure a snapshot of a guest whose memory is not mostly zero.
    if let Some(mib) = std::env::var("BHATTI_TEST_FILL_MIB")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        sh(
            &client,
            &format!("head -c {mib}M /dev/urandom > /dev/shm/fill"),
        )
        .await;
    }
    vm.pause().await.unwrap();
    let snap = SnapshotFiles {
        state: fx.dir.path().join("snap.state"),
        memory: None,
    };
    assert!(matches!(
        vm.snapshot(SnapshotKind::Diff, &snap).await,
        Err(bhatti_vmm::VmmError::Unsupported(_))
    ));
    let t = Instant::now();
    vm.snapshot(SnapshotKind::Full, &snap)
        .await
        .expect("snapshot");
    let took = t.elapsed();
    let meta = std::fs::metadata(&snap.state).unwrap();
    println!(
        "MEASURE snapshot_256MiB {} size={:.1}MiB",
        ms(took),
        meta.len() as f64 / (1 << 20) as f64
    );
    assert!(vm.is_alive(), "snapshot must leave the VM alive (paused)");
    client.close();
    assert_gone(vm.as_ref()).await;

    let cfg2 = fx.config("run2");
    let t = Instant::now();
    let vm2 = be.restore(&cfg2, &snap).await.expect("restore");
    let restored = t.elapsed();
    let _guard2 = KillOnDrop(vm2.pid());
    let client2 = agent(vm2.as_ref(), Duration::from_secs(30)).await;
    let hello = t.elapsed();
    client2.ping().await.expect("ping after restore");
    let answering = t.elapsed();
    println!(
        "MEASURE restore_to_running {} restore_to_hello {} restore_to_ping {}",
        ms(restored),
        ms(hello),
        ms(answering)
    );
    assert_eq!(client2.hello().boot_id, boot_id, "restore is not a reboot");
    assert_eq!(
        sh(&client2, "cat /workspace/cached /workspace/synced").await,
        "cached\nsynced\n"
    );
    let alive = sh(&client2, &format!("kill -0 {} && echo alive", bg.pid)).await;
    assert_eq!(alive, "alive\n");
    // The restored guest keeps running and writing.
    assert_eq!(
        sh(
            &client2,
            "echo after > /workspace/after && cat /workspace/after"
        )
        .await,
        "after\n"
    );

    // Pause/resume and a second snapshot work on a restored VM too.
    vm2.pause().await.unwrap();
    let snap2 = SnapshotFiles {
        state: fx.dir.path().join("snap2.state"),
        memory: None,
    };
    vm2.snapshot(SnapshotKind::Full, &snap2)
        .await
        .expect("second snapshot");
    // Again without a resume in between (QEMU's post-migration state).
    let snap3 = SnapshotFiles {
        state: fx.dir.path().join("snap3.state"),
        memory: None,
    };
    vm2.snapshot(SnapshotKind::Full, &snap3)
        .await
        .expect("snapshot after snapshot");
    vm2.resume().await.expect("resume after snapshot");
    assert_eq!(sh(&client2, "echo still").await, "still\n");

    assert_gone(vm2.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_after_handle_drop() {
    let Some(a) = artifacts("adopt_after_handle_drop") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new(&a);
    let be = backend();
    let cfg = fx.config("run1");
    let vm = be.boot(&cfg).await.expect("boot");
    let pid = vm.pid();
    let _guard = KillOnDrop(pid);
    let client = agent(vm.as_ref(), AGENT_TIMEOUT).await;
    client.ping().await.unwrap();
    client.close();
    // A new daemon: forget the handle (and its QMP connection), adopt.
    drop(vm);
    let vm = be.adopt(&cfg).await.expect("adopt");
    assert_eq!(vm.pid(), pid);
    vm.pause().await.expect("pause adopted");
    vm.resume().await.expect("resume adopted");
    let client = agent(vm.as_ref(), Duration::from_secs(30)).await;
    assert_eq!(sh(&client, "echo adopted").await, "adopted\n");
    assert_gone(vm.as_ref()).await;
}

/// A network namespace with a TAP in it, removed on drop. Nothing is
/// routed out of the namespace.
struct NetNs(String);

impl NetNs {
    fn new(tap: &str, host_cidr: &str) -> NetNs {
        let name = format!("bhatti-qt-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs(name);
        let ip = |args: &[&str]| {
            run(Command::new("ip")
                .args(["netns", "exec", &ns.0, "ip"])
                .args(args))
        };
        ip(&["link", "set", "lo", "up"]);
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["addr", "add", host_cidr, "dev", tap]);
        ip(&["link", "set", tap, "up"]);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_in_netns_and_poweroff() {
    tap_in_netns("tap_in_netns_and_poweroff", false).await;
}

/// The same, confined: QEMU opens the TAP as root before switching users,
/// and its cgroup goes when it exits on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confined_tap_in_netns_and_poweroff() {
    tap_in_netns("confined_tap_in_netns_and_poweroff", true).await;
}

async fn tap_in_netns(test: &str, confined: bool) {
    let Some(a) = artifacts(test) else {
        return;
    };
    if !Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        skip(test, "no iproute2");
        return;
    }
    let (root, be) = if confined {
        let Some(root) = CgroupRoot::new(test) else {
            return;
        };
        let Some(be) = confined_backend(test, &root) else {
            return;
        };
        (Some(root), be)
    } else {
        (None, backend())
    };
    let _serial = SERIAL.lock().await;
    let ns = NetNs::new("tap0", "10.213.0.1/24");
    let fx = Fixture::with_config(
        &a,
        serde_json::json!({"network": {"address": "10.213.0.2/24", "gateway": "10.213.0.1"}}),
    );
    let mut cfg = fx.config("run1");
    cfg.netns = Some(ns.0.clone());
    cfg.net = Some(bhatti_vmm::NetConfig {
        tap: "tap0".into(),
        mac: "02:b4:00:00:00:02".into(),
    });
    let vm = be.boot(&cfg).await.expect("boot");
    let _guard = KillOnDrop(vm.pid());
    let client = agent(vm.as_ref(), AGENT_TIMEOUT).await;
    let dirs = root
        .as_ref()
        .map(|r| assert_confined(vm.pid(), &cfg, r))
        .unwrap_or_default();
    let link = sh(&client, "cat /sys/class/net/eth0/address").await;
    assert_eq!(link.trim(), "02:b4:00:00:00:02");
    let ping = client
        .exec(
            exec_req(&["ping", "-c", "1", "-W", "5", "10.213.0.1"]),
            None,
        )
        .await
        .expect("exec ping");
    assert_eq!(
        ping.status.exit_code,
        0,
        "ping the host end of the TAP: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );

    // A guest poweroff ends QEMU (lohar reboots, -no-reboot exits).
    client.shutdown().await.expect("shutdown request");
    let t = Instant::now();
    while vm.is_alive() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "QEMU still running after the guest powered off; console:\n{}",
            bhatti_vmm::console_tail(&vm.console_log(), 2000)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("MEASURE poweroff_to_exit {}", ms(t.elapsed()));
    vm.kill().await.expect("kill after exit");
    assert_removed(&dirs);
}

// ───────────────────────────── confinement ─────────────────────────────

/// This test's own cgroup root (`bhatti-test-<pid>-<test>` in every
/// hierarchy),
/// removed with any VM cgroup left in it on drop. Declare it before the
/// VMs' guards so it is dropped after they are killed.
struct CgroupRoot {
    name: String,
    mounts: Vec<PathBuf>,
}

impl CgroupRoot {
    fn new(test: &str) -> Option<CgroupRoot> {
        match Hierarchy::detect() {
            Ok(h) => Some(CgroupRoot {
                // Per test: the tests of this binary share its pid.
                name: format!("bhatti-test-{}-{test}", std::process::id()),
                mounts: h.mounts().iter().map(|m| m.point.clone()).collect(),
            }),
            Err(e) => {
                skip(test, &format!("no usable cgroup hierarchy: {e}"));
                None
            }
        }
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for m in &self.mounts {
            let root = m.join(&self.name);
            let children: Vec<PathBuf> = std::fs::read_dir(&root)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            // A VMM killed by a guard a moment ago may still be exiting.
            for dir in children.iter().chain([&root]) {
                while std::fs::remove_dir(dir).is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// The QEMU backend with everything confined, its cgroups under `root`.
/// `None` (one SKIP line, or a failure under BHATTI_REQUIRE_VMS) without
/// the VMM user.
fn confined_backend(test: &str, root: &CgroupRoot) -> Option<QemuBackend> {
    if !matches!(nix::unistd::User::from_name(VMM_USER), Ok(Some(_))) {
        skip(
            test,
            &format!("no user {VMM_USER} (scripts/install-deps.sh creates it)"),
        );
        return None;
    }
    let c = Confinement {
        cgroups: Some(CgroupConfig {
            root: root.name.clone(),
        }),
        ..Confinement::hardened()
    };
    Some(
        backend()
            .with_confinement(c)
            .expect("confined QEMU backend"),
    )
}

/// A `/proc/<pid>/status` field, e.g. `Uid`.
fn status_field(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// QEMU `pid` runs as the VMM user under seccomp, in `cfg`'s cgroup with
/// `cfg`'s limits. Returns its cgroup directories.
fn assert_confined(pid: u32, cfg: &VmConfig, root: &CgroupRoot) -> Vec<PathBuf> {
    let user = nix::unistd::User::from_name(VMM_USER)
        .expect("getpwnam")
        .expect("VMM user");
    let ids = |key| -> Vec<u32> {
        status_field(pid, key)
            .split_whitespace()
            .map(|v| v.parse().expect("id"))
            .collect()
    };
    // Real, effective, saved and filesystem ids all dropped.
    assert_eq!(ids("Uid"), vec![user.uid.as_raw(); 4], "QEMU {pid} uid");
    assert_eq!(ids("Gid"), vec![user.gid.as_raw(); 4], "QEMU {pid} gid");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filter mode");
    let st = bhatti_vmm::cgroup::inspect(pid).expect("cgroup of QEMU");
    let want = Path::new(&root.name).join(&cfg.id);
    for d in &st.dirs {
        assert!(d.ends_with(&want), "QEMU {pid} is in {}", d.display());
    }
    // Accel::Auto: KVM where usable, else TCG (whose translation cache
    // counts toward the limit).
    let accel = if bhatti_vmm::probe::probe().hardware_kvm {
        bhatti_vmm::qemu::Accel::Kvm
    } else {
        bhatti_vmm::qemu::Accel::Tcg
    };
    let limits = bhatti_vmm::qemu::limits_for(cfg, accel);
    assert!(st.matches(&limits), "{st:?} != {limits:?}");
    println!("cgroup of QEMU {pid}: {st:?}");
    let mut dirs = st.dirs.to_vec();
    dirs.dedup();
    dirs
}

fn assert_removed(dirs: &[PathBuf]) {
    for d in dirs {
        assert!(!d.exists(), "cgroup {} still exists", d.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confined_boot_adopt_kill() {
    let test = "confined_boot_adopt_kill";
    let Some(a) = artifacts(test) else {
        return;
    };
    let Some(root) = CgroupRoot::new(test) else {
        return;
    };
    let Some(be) = confined_backend(test, &root) else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new(&a);
    let cfg = fx.config("run1");
    let vm = be.boot(&cfg).await.expect("confined boot");
    let pid = vm.pid();
    let _guard = KillOnDrop(pid);
    let client = agent(vm.as_ref(), AGENT_TIMEOUT).await;
    assert_eq!(sh(&client, "echo confined").await, "confined\n");
    let dirs = assert_confined(pid, &cfg, &root);
    // The guest sees its vCPU and memory, the cgroup only bounds QEMU.
    let nproc = sh(&client, "nproc").await;
    assert_eq!(nproc.trim(), cfg.vcpus.to_string());
    vm.pause().await.expect("pause");
    vm.resume().await.expect("resume");

    // A new daemon adopts it: same process, same cgroup, nothing moved.
    client.close();
    drop(vm);
    let vm = be.adopt(&cfg).await.expect("adopt confined");
    assert_eq!(vm.pid(), pid);
    assert_eq!(assert_confined(pid, &cfg, &root), dirs);
    vm.pause().await.expect("pause adopted");
    vm.resume().await.expect("resume adopted");
    let client = agent(vm.as_ref(), Duration::from_secs(30)).await;
    assert_eq!(sh(&client, "echo adopted").await, "adopted\n");
    assert_gone(vm.as_ref()).await;
    assert_removed(&dirs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confined_snapshot_restore() {
    let test = "confined_snapshot_restore";
    let Some(a) = artifacts(test) else {
        return;
    };
    let Some(root) = CgroupRoot::new(test) else {
        return;
    };
    let Some(be) = confined_backend(test, &root) else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let fx = Fixture::new(&a);
    // The fixture (disks, run dirs, snapshots) is root's, mode 0700: the
    // unprivileged QEMU cannot open any path in it, only use descriptors.
    std::fs::set_permissions(
        fx.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let cfg = fx.config("run1");
    let vm = be.boot(&cfg).await.expect("confined boot");
    let _guard = KillOnDrop(vm.pid());
    let client = agent(vm.as_ref(), AGENT_TIMEOUT).await;
    let boot_id = client.hello().boot_id.clone();
    sh(&client, "echo kept > /workspace/kept").await;
    let dirs = assert_confined(vm.pid(), &cfg, &root);
    vm.pause().await.unwrap();
    let snap = SnapshotFiles {
        state: fx.dir.path().join("snap.state"),
        memory: None,
    };
    vm.snapshot(SnapshotKind::Full, &snap)
        .await
        .expect("confined snapshot");
    assert!(std::fs::metadata(&snap.state).unwrap().len() > 1 << 20);
    client.close();
    assert_gone(vm.as_ref()).await;
    assert_removed(&dirs);

    let cfg2 = fx.config("run2");
    let vm2 = be.restore(&cfg2, &snap).await.expect("confined restore");
    let _guard2 = KillOnDrop(vm2.pid());
    let client2 = agent(vm2.as_ref(), Duration::from_secs(30)).await;
    assert_eq!(client2.hello().boot_id, boot_id, "restore is not a reboot");
    assert_eq!(sh(&client2, "cat /workspace/kept").await, "kept\n");
    let dirs2 = assert_confined(vm2.pid(), &cfg2, &root);
    // And again from the restored VM.
    vm2.pause().await.unwrap();
    let snap2 = SnapshotFiles {
        state: fx.dir.path().join("snap2.state"),
        memory: None,
    };
    vm2.snapshot(SnapshotKind::Full, &snap2)
        .await
        .expect("snapshot of the restored VM");
    vm2.resume().await.unwrap();
    assert_eq!(sh(&client2, "echo still").await, "still\n");
    assert_gone(vm2.as_ref()).await;
    assert_removed(&dirs2);
}

/// A guest printing far more than the cap leaves `console.log` bounded,
/// and its newest output readable at the end. `BHATTI_TEST_FLOOD_MIB`
/// sets the flood: 16 MiB by default, because QEMU's serial port moves
/// about 0.4 MiB/s under TCG (one write(2) per byte); 100 MiB takes four
/// minutes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_flood_is_capped() {
    let Some(a) = artifacts("console_flood_is_capped") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let flood_mib: u64 = std::env::var("BHATTI_TEST_FLOOD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let fx = Fixture::new(&a);
    let cap = bhatti_vmm::console::DEFAULT_MAX_BYTES;
    let be = backend();
    let cfg = fx.config("run1");
    let vm = be.boot(&cfg).await.expect("boot");
    let _guard = KillOnDrop(vm.pid());
    let client = agent(vm.as_ref(), AGENT_TIMEOUT).await;
    let log = vm.console_log();

    // Sample the size while the guest floods its serial console.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut largest = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                largest = largest.max(std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(10));
            }
            largest
        })
    };
    let t = Instant::now();
    // Commands run as the guest user; the serial port is root's.
    let mut req = exec_req(&[
        "sudo",
        "/bin/sh",
        "-c",
        &format!(
            "yes 'flood flood flood flood flood flood flood flood flood flood' \
             | head -c {flood_mib}M > /dev/ttyS0 && echo FLOOD-END > /dev/ttyS0"
        ),
    ]);
    req.timeout_ms = Some(1_800_000);
    let out = client.exec(req, None).await.expect("flood");
    assert_eq!(
        out.status.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = t.elapsed();
    tokio::time::sleep(bhatti_vmm::console::POLL * 3).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let largest = sampler.join().unwrap();
    let len = std::fs::metadata(&log).unwrap().len();
    println!(
        "MEASURE console_flood {flood_mib}MiB in {} ({:.1} MiB/s) largest={largest} final={len}",
        ms(took),
        flood_mib as f64 / took.as_secs_f64()
    );
    assert!(len <= cap, "console.log is {len} bytes after the flood");
    // Between two checks the guest adds what it prints in POLL.
    assert!(
        largest <= cap + (4 << 20),
        "console.log reached {largest} bytes"
    );
    let tail = bhatti_vmm::console_tail(&log, 4096);
    assert!(tail.contains("FLOOD-END"), "{tail}");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .starts_with("[bhatti: "),
        "the compacted log starts with the marker"
    );
    client.ping().await.expect("guest fine after the flood");
    assert_gone(vm.as_ref()).await;
}
