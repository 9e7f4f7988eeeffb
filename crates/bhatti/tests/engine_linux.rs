//! The engine on real Linux guests, against every backend that can boot
//! Linux on this host (QEMU: KVM or TCG; Firecracker with hardware KVM).
//!
//! Artifacts: `BHATTI_KERNEL` (else the newest
//! `/var/cache/bhatti-ci/kernel/*/vmlinux`) and `BHATTI_ROOTFS`, a rootfs
//! with lohar installed (else the newest
//! `/var/cache/bhatti-ci/rootfs/*/rootfs+lohar.ext4`, what
//! `LOHAR=… images/rootfs/build.sh` makes). Missing ones skip the test with
//! one line. Needs root (bridges, TAPs, loop mounts).
//!
//! Each test makes its own network namespace (`bhatti-t-<random>`) and data
//! dir and removes both, even on failure ([`TestEnv`]'s `Drop`). Tests run
//! one at a time: under TCG two guests per core only measure contention.
//! Within a test, one VM serves several independent checks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bhatti::engine::{CreateSpec, Engine, EngineConfig, SandboxState};
use bhatti::net::NetSettings;
use bhatti_protocol::client::PtyEvent;
use bhatti_protocol::{
    AgentClient, AttachRequest, ExecRequest, PtyRequest, ReadFileRequest, WriteFileRequest,
};
use bhatti_vmm::VmmBackend;
use bytes::Bytes;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// A boot under TCG takes seconds; four at once on two cores take longer.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

use bhatti_testkit::{
    artifacts, clean_data_dir, delete_netns, linux_backends as backends, Artifacts,
};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "bhatti=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A network namespace and a scratch dir, removed on drop together with
/// anything the engines under it left: VMM processes (by the pid files in
/// their run dirs, only if the process names that run dir) and XFS mounts.
struct TestEnv {
    ns: String,
    dir: tempfile::TempDir,
    art: Artifacts,
}

impl TestEnv {
    fn new(art: Artifacts) -> TestEnv {
        let ns = format!("bhatti-t-{}", bhatti::engine::random_hex(4));
        let dir = tempfile::Builder::new()
            .prefix("bhatti-engine-test.")
            .tempdir()
            .unwrap();
        TestEnv { ns, dir, art }
    }

    fn config(&self, name: &str, backend: Arc<dyn VmmBackend>) -> EngineConfig {
        let mut cfg = EngineConfig::new(
            self.dir.path().join(name),
            &self.art.kernel,
            &self.art.rootfs,
            backend,
        );
        cfg.net = Some(NetSettings {
            bridge: "bhatti0".into(),
            subnet: "10.77.0.1/24".into(),
            netns: Some(self.ns.clone()),
        });
        cfg.boot_timeout = BOOT_TIMEOUT;
        cfg.agent_timeout = Duration::from_secs(60);
        cfg.xfs_loop_size_mb = 16 << 10;
        cfg
    }

    async fn engine(&self, name: &str, backend: Arc<dyn VmmBackend>) -> Engine {
        Engine::new(self.config(name, backend))
            .await
            .expect("engine")
    }

    fn ip_ns(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(["-n", &self.ns])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Ok(engines) = std::fs::read_dir(self.dir.path()) {
            for engine in engines.flatten() {
                clean_data_dir(&engine.path());
            }
        }
        delete_netns(&self.ns);
    }
}

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout_ms: Some(60_000),
        ..Default::default()
    }
}

async fn sh(c: &AgentClient, script: &str) -> String {
    let out = c
        .exec(req(&["/bin/sh", "-c", script]), None)
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

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Reads PTY output until `needle` shows up; returns all of it.
async fn pty_until(s: &mut bhatti_protocol::client::PtyStream, needle: &str) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.next()).await {
            Ok(Ok(PtyEvent::Output(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(Ok(other)) => panic!("pty: {other:?} before {needle:?}; got {seen:?}"),
            Ok(Err(e)) => panic!("pty: {e}; got {seen:?}"),
            Err(_) => panic!("pty: no {needle:?} within 60s; got {seen:?}"),
        }
    }
    seen
}

fn assert_no_sockets(run_dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    for e in std::fs::read_dir(run_dir).into_iter().flatten().flatten() {
        assert!(
            !e.file_type().unwrap().is_socket(),
            "socket left: {}",
            e.path().display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_files_pty_pause() {
    init_tracing();
    let Some(art) = artifacts("exec_files_pty_pause") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    for (label, backend) in backends() {
        eprintln!("== exec_files_pty_pause on {label}");
        let env = TestEnv::new(art.clone());
        let engine = env.engine("e", backend).await;
        let t0 = Instant::now();
        let sb = engine
            .create(CreateSpec {
                name: Some("ops".into()),
                env: BTreeMap::from([("SANDBOX_VAR".into(), "from-spec".into())]),
                ..Default::default()
            })
            .await
            .expect("create");
        eprintln!("MEASURE {label} create {:?}", t0.elapsed());
        assert_eq!(sb.state, SandboxState::Running);
        let c = engine.agent(&sb.id).await.unwrap();
        // The same connection is handed out again.
        let again = engine.agent(&sb.id).await.unwrap();
        assert_eq!(again.hello(), c.hello());

        // Exec: output, exit codes, stderr apart, user, env, cwd, stdin.
        let t = Instant::now();
        let out = c.exec(req(&["echo", "hello"]), None).await.unwrap();
        eprintln!("MEASURE {label} exec_echo {:?}", t.elapsed());
        assert_eq!(&out.stdout[..], b"hello\n");
        assert_eq!(out.status.exit_code, 0);
        let out = c
            .exec(req(&["sh", "-c", "echo out; echo err >&2; exit 7"]), None)
            .await
            .unwrap();
        assert_eq!(
            (&out.stdout[..], &out.stderr[..], out.status.exit_code),
            (&b"out\n"[..], &b"err\n"[..], 7)
        );
        assert_eq!(sh(&c, "id -u").await.trim(), "1000");
        let mut r = req(&["sh", "-c", "echo $SANDBOX_VAR $REQ_VAR; pwd"]);
        r.env.insert("REQ_VAR".into(), "from-request".into());
        r.cwd = Some("/tmp".into());
        let out = c.exec(r, None).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "from-spec from-request\n/tmp\n"
        );
        let input = pattern(100_000, 3);
        let out = c
            .exec(req(&["sha256sum"]), Some(input.clone()))
            .await
            .unwrap();
        let host_sum = {
            let p = env.dir.path().join("stdin.bin");
            std::fs::write(&p, &input).unwrap();
            let o = std::process::Command::new("sha256sum")
                .arg(&p)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned()
        };
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with(&host_sum),
            "stdin did not arrive intact"
        );
        // The guest has its address on eth0 (kernel ip= argument).
        let ip = sb.ip.expect("ip").to_string();
        assert!(sh(&c, "ip -4 -o addr show eth0").await.contains(&ip));
        // And the host reaches a guest port over the bridge, inside the
        // namespace (no traffic leaves it).
        c.exec_detached(req(&["python3", "-m", "http.server", "8080"]))
            .await
            .unwrap();
        let probe = format!("exec 3<>/dev/tcp/{ip}/8080");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &env.ns, "timeout", "5", "bash", "-c", &probe,
                ])
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
                .success();
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no TCP connection to {ip}:8080 from the host"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        // A timeout kills the whole process group, background children too.
        let mut r = req(&["sh", "-c", "sleep 300 & echo $! > /tmp/child; wait"]);
        r.timeout_ms = Some(2_000);
        let t = Instant::now();
        let out = c.exec(r, None).await.unwrap();
        assert!(out.status.timed_out, "{:?}", out.status);
        assert!(t.elapsed() < Duration::from_secs(30));
        let out = c
            .exec(
                req(&["sh", "-c", "sleep 0.5; kill -0 $(cat /tmp/child)"]),
                None,
            )
            .await
            .unwrap();
        assert_ne!(out.status.exit_code, 0, "the background child survived");

        // Files: small and large round trips, truncated read.
        let small = pattern(1024, 5);
        let w = c
            .write_file(
                WriteFileRequest {
                    path: "/home/lohar/small.bin".into(),
                    mode: None,
                    ..Default::default()
                },
                small.clone(),
            )
            .await
            .unwrap();
        assert_eq!(w.bytes, 1024);
        let (got, done) = c
            .read_file_all(ReadFileRequest {
                path: "/home/lohar/small.bin".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(got, small);
        assert!(!done.truncated);
        assert_eq!(c.stat("/home/lohar/small.bin").await.unwrap().uid, 1000);
        let big = pattern(20 << 20, 9);
        let t = Instant::now();
        c.write_file(
            WriteFileRequest {
                path: "/home/lohar/big.bin".into(),
                mode: None,
                ..Default::default()
            },
            big.clone(),
        )
        .await
        .unwrap();
        let wt = t.elapsed();
        let t = Instant::now();
        let (got, done) = c
            .read_file_all(ReadFileRequest {
                path: "/home/lohar/big.bin".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        eprintln!(
            "MEASURE {label} write_20MiB {wt:?} read_20MiB {:?}",
            t.elapsed()
        );
        assert!(got == big, "20 MiB read back differs");
        assert_eq!(done.total_size, 20 << 20);
        let (got, done) = c
            .read_file_all(ReadFileRequest {
                path: "/home/lohar/big.bin".into(),
                max_bytes: Some(1000),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(got, big.slice(..1000));
        assert!(done.truncated);
        assert_eq!(done.total_size, 20 << 20);

        // PTY: output, detach, output produced while detached, reattach
        // from our offset (nothing lost or repeated), replay from 0.
        let mut p = c
            .pty(PtyRequest {
                argv: Some(vec!["/bin/sh".into()]),
                rows: 24,
                cols: 80,
                ..Default::default()
            })
            .await
            .unwrap();
        p.write(Bytes::from_static(b"echo mark-$((6*7))\n"))
            .await
            .unwrap();
        pty_until(&mut p, "mark-42").await;
        p.write(Bytes::from_static(b"sleep 2; echo late-$((1+1))\n"))
            .await
            .unwrap();
        // The terminal echoes the line once the shell has it.
        pty_until(&mut p, "sleep 2; echo").await;
        let session = p.session.clone();
        let end = p.detach().await.unwrap();
        let offset = match end {
            bhatti_protocol::PtyEnd::Detached { offset } => offset,
            other => panic!("detach: {other:?}"),
        };
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut p = c
            .attach(AttachRequest {
                session: session.clone(),
                offset: Some(offset),
            })
            .await
            .unwrap();
        assert_eq!(p.start_offset, offset);
        let seen = pty_until(&mut p, "late-2").await;
        assert!(
            !seen.contains("mark-42"),
            "replayed before the offset: {seen:?}"
        );
        drop(p);
        let mut p = c
            .attach(AttachRequest {
                session: session.clone(),
                offset: Some(0),
            })
            .await
            .unwrap();
        let seen = pty_until(&mut p, "late-2").await;
        assert!(seen.contains("mark-42"), "{seen:?}");
        drop(p);
        c.kill_session(&session, None).await.unwrap();

        // Pause: a request waits while paused and completes after resume.
        engine.pause(&sb.id).await.unwrap();
        assert_eq!(engine.get(&sb.id).unwrap().state, SandboxState::Paused);
        let pending = {
            let c = c.clone();
            tokio::spawn(async move { c.exec(req(&["echo", "woke"]), None).await })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!pending.is_finished(), "a paused guest answered");
        let t = Instant::now();
        engine.resume(&sb.id).await.unwrap();
        let out = tokio::time::timeout(Duration::from_secs(60), pending)
            .await
            .expect("request after resume")
            .unwrap()
            .unwrap();
        eprintln!("MEASURE {label} resume_to_reply {:?}", t.elapsed());
        assert_eq!(&out.stdout[..], b"woke\n");
        // `agent()` wakes a paused sandbox itself.
        engine.pause(&sb.id).await.unwrap();
        let c2 = engine.agent(&sb.id).await.unwrap();
        assert_eq!(engine.get(&sb.id).unwrap().state, SandboxState::Running);
        assert_eq!(sh(&c2, "echo ok").await, "ok\n");

        assert!(engine.destroy(&sb.id).await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_and_recover() {
    init_tracing();
    let Some(art) = artifacts("snapshot_restore_and_recover") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    for (label, backend) in backends() {
        eprintln!("== snapshot_restore_and_recover on {label}");
        let env = TestEnv::new(art.clone());
        let engine = env.engine("e", backend.clone()).await;
        let sb = engine
            .create(CreateSpec {
                name: Some("snap".into()),
                memory_mb: 256,
                ..Default::default()
            })
            .await
            .expect("create");
        let c = engine.agent(&sb.id).await.unwrap();
        let boot_id = c.hello().boot_id.clone();
        let bg = c
            .exec_detached(req(&[
                "sh",
                "-c",
                "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done",
            ]))
            .await
            .unwrap();
        let keep = pattern(64 << 10, 11);
        c.write_file(
            WriteFileRequest {
                path: "/home/lohar/keep.bin".into(),
                mode: None,
                ..Default::default()
            },
            keep.clone(),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let vmm_pid = sb.pid.expect("pid");

        let t = Instant::now();
        let cold = engine.snapshot_to_disk(&sb.id).await.expect("snapshot");
        eprintln!("MEASURE {label} snapshot_to_disk {:?}", t.elapsed());
        assert_eq!(cold.state, SandboxState::Stopped);
        assert!(cold.has_snapshot);
        assert_eq!(cold.pid, None);
        assert!(!bhatti_vmm::process::pid_alive(vmm_pid), "VMM still alive");
        assert!(
            c.is_closed() || {
                tokio::time::sleep(Duration::from_millis(500)).await;
                c.is_closed()
            }
        );
        assert!(sb.paths.dir.join("snapshot/state").is_file());
        assert!(!sb.paths.dir.join("snapshot.tmp").exists());
        assert_no_sockets(&sb.paths.run_dir);

        let t = Instant::now();
        let warm = engine.restore(&sb.id).await.expect("restore");
        eprintln!("MEASURE {label} restore {:?}", t.elapsed());
        assert_eq!(warm.state, SandboxState::Running);
        assert!(!warm.has_snapshot);
        let c = engine.agent(&sb.id).await.unwrap();
        assert_eq!(
            c.hello().boot_id,
            boot_id,
            "the guest rebooted instead of restoring"
        );
        // The background process lives on and keeps counting.
        assert_eq!(
            c.exec(req(&["kill", "-0", &bg.pid.to_string()]), None)
                .await
                .unwrap()
                .status
                .exit_code,
            0,
            "background process is gone"
        );
        let before: u64 = sh(&c, "cat /tmp/counter").await.trim().parse().unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after: u64 = sh(&c, "cat /tmp/counter").await.trim().parse().unwrap();
        assert!(after > before, "counter stuck at {before}");
        let (got, _) = c
            .read_file_all(ReadFileRequest {
                path: "/home/lohar/keep.bin".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(got == keep, "file changed across the snapshot");

        // Engine restart: a new engine adopts the running VMM.
        let pid = engine.get(&sb.id).unwrap().pid.expect("pid");
        engine.shutdown().await;
        drop(engine);
        let engine = env.engine("e", backend.clone()).await;
        let found = engine.recover().await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].state, SandboxState::Running);
        assert_eq!(found[0].pid, Some(pid));
        let c = engine.agent(&sb.id).await.expect("agent after adopt");
        assert_eq!(c.hello().boot_id, boot_id);
        assert_eq!(sh(&c, "echo adopted").await, "adopted\n");

        // A second cold cycle, from paused, woken by agent() alone.
        engine.pause("snap").await.unwrap();
        engine.snapshot_to_disk("snap").await.unwrap();
        let c = engine.agent("snap").await.expect("wake from cold");
        assert_eq!(c.hello().boot_id, boot_id);
        assert_eq!(
            c.exec(req(&["kill", "-0", &bg.pid.to_string()]), None)
                .await
                .unwrap()
                .status
                .exit_code,
            0
        );
        // A restart while cold: the sandbox is found stopped with its
        // snapshot and restores later.
        engine.snapshot_to_disk("snap").await.unwrap();
        drop(engine);
        let engine = env.engine("e", backend.clone()).await;
        let found = engine.recover().await.unwrap();
        assert_eq!(found[0].state, SandboxState::Stopped);
        assert!(found[0].has_snapshot);
        let c = engine.agent("snap").await.unwrap();
        assert_eq!(
            sh(&c, "cat /home/lohar/keep.bin | wc -c").await.trim(),
            "65536"
        );

        // A snapshot that cannot restore is flagged, not retried, and the
        // sandbox boots fresh from its disk (synced before the snapshot).
        engine.snapshot_to_disk("snap").await.unwrap();
        std::fs::write(sb.paths.dir.join("snapshot/state"), b"garbage").unwrap();
        let err = engine.restore("snap").await.expect_err("restored garbage");
        eprintln!("{label}: corrupt snapshot: {err}");
        assert!(err.to_string().contains("did not restore"), "{err}");
        let s = engine.get("snap").unwrap();
        assert_eq!(s.state, SandboxState::Stopped);
        assert!(!s.has_snapshot);
        assert!(s.error.is_some());
        assert!(
            engine.restore("snap").await.is_err(),
            "a flagged snapshot was retried"
        );
        // Waking it does not silently give up its memory: that takes an
        // explicit fresh start.
        let e = engine
            .agent("snap")
            .await
            .expect_err("woke without its snapshot");
        assert!(e.to_string().contains("start it fresh"), "{e}");
        engine
            .start_fresh("snap")
            .await
            .expect("fresh boot after a bad snapshot");
        let c = engine.agent("snap").await.unwrap();
        assert_ne!(c.hello().boot_id, boot_id, "expected a fresh boot");
        let (got, _) = c
            .read_file_all(ReadFileRequest {
                path: "/home/lohar/keep.bin".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(got == keep, "file lost across the fresh boot");
        assert!(engine.destroy("snap").await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_at_once_then_destroy_leaves_nothing() {
    init_tracing();
    let Some(art) = artifacts("four_at_once_then_destroy_leaves_nothing") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    for (label, backend) in backends() {
        eprintln!("== four_at_once on {label}");
        let env = TestEnv::new(art.clone());
        let engine = env.engine("e", backend).await;
        let t = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let e = engine.clone();
                tokio::spawn(async move {
                    e.create(CreateSpec {
                        name: Some(format!("par-{i}")),
                        memory_mb: 256,
                        ..Default::default()
                    })
                    .await
                })
            })
            .collect();
        let mut sbs = Vec::new();
        for t in tasks {
            sbs.push(t.await.unwrap().expect("create"));
        }
        eprintln!("MEASURE {label} create_4_parallel {:?}", t.elapsed());
        let mut ips: Vec<_> = sbs.iter().map(|s| s.ip.unwrap()).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 4);
        for sb in &sbs {
            let c = engine.agent(&sb.id).await.unwrap();
            assert_eq!(sh(&c, "hostname").await.trim(), sb.name);
        }
        assert!(engine
            .create(CreateSpec {
                name: Some("par-0".into()),
                ..Default::default()
            })
            .await
            .is_err());

        let data = engine.config().data_dir.clone();
        let tasks: Vec<_> = sbs
            .iter()
            .map(|sb| {
                let e = engine.clone();
                let id = sb.id.clone();
                tokio::spawn(async move { e.destroy(&id).await })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().unwrap());
        }
        for sb in &sbs {
            assert!(!bhatti_vmm::process::pid_alive(sb.pid.unwrap()), "VMM left");
            assert!(!sb.paths.dir.exists(), "state dir left");
            assert!(!sb.paths.run_dir.exists(), "run dir left");
            assert!(!sb.paths.root_disk.exists(), "disk left");
            assert!(
                !env.ip_ns(&["link"]).contains(sb.tap.as_deref().unwrap()),
                "TAP left"
            );
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            assert!(!mounts.contains(&sb.id), "mount left");
            assert!(!engine.destroy(&sb.id).await.unwrap(), "second destroy");
        }
        assert!(engine.list().is_empty());
        assert_eq!(
            std::fs::read_dir(data.join("sandboxes")).unwrap().count(),
            0
        );
        assert_eq!(std::fs::read_dir(data.join("run")).unwrap().count(), 0);
        if data.join("reflink/disks").exists() {
            assert_eq!(
                std::fs::read_dir(data.join("reflink/disks"))
                    .unwrap()
                    .count(),
                0
            );
        }
        let links = env.ip_ns(&["-br", "link"]);
        assert!(!links.lines().any(|l| l.starts_with("bt")), "{links}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_failures_report_the_console() {
    init_tracing();
    let Some(art) = artifacts("boot_failures_report_the_console") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    for (label, backend) in backends() {
        eprintln!("== boot_failures on {label}");
        let env = TestEnv::new(art.clone());

        // A kernel that finds no init.
        let mut cfg = env.config("noinit", backend.clone());
        cfg.kernel_args = "init=/nonexistent".into();
        let engine = Engine::new(cfg).await.unwrap();
        let t = Instant::now();
        let err = engine
            .create(CreateSpec::default())
            .await
            .expect_err("booted without init");
        let msg = err.to_string();
        eprintln!("{label}: no init after {:?}: {msg}", t.elapsed());
        assert!(msg.contains("did not boot"), "{msg}");
        assert!(msg.contains("guest console"), "{msg}");
        assert!(msg.contains("nonexistent") || msg.contains("init"), "{msg}");
        assert!(engine.list().is_empty());
        let data = engine.config().data_dir.clone();
        assert_eq!(
            std::fs::read_dir(data.join("sandboxes")).unwrap().count(),
            0
        );
        assert_eq!(std::fs::read_dir(data.join("run")).unwrap().count(), 0);
        assert!(!env
            .ip_ns(&["-br", "link"])
            .lines()
            .any(|l| l.starts_with("bt")));

        // A corrupt kernel image: the real one cut short.
        let bogus = env.dir.path().join("truncated-vmlinux");
        let kernel = std::fs::read(&env.art.kernel).unwrap();
        std::fs::write(&bogus, &kernel[..kernel.len() / 3]).unwrap();
        let mut cfg = env.config("badkernel", backend.clone());
        cfg.kernel = bogus;
        let engine = Engine::new(cfg).await.unwrap();
        let t = Instant::now();
        let err = engine
            .create(CreateSpec::default())
            .await
            .expect_err("booted a corrupt kernel");
        let msg = err.to_string();
        eprintln!("{label}: corrupt kernel after {:?}: {msg}", t.elapsed());
        assert!(msg.contains("did not boot"), "{msg}");
        let console = msg.split("guest console").nth(1).unwrap_or("");
        assert!(console.lines().count() > 1, "no console tail: {msg}");
        assert!(t.elapsed() < Duration::from_secs(60));
        assert!(engine.list().is_empty());
        let data = engine.config().data_dir.clone();
        assert_eq!(
            std::fs::read_dir(data.join("sandboxes")).unwrap().count(),
            0
        );
    }
}

/// Checkpoints and forks with plain copies (no reflink, no XFS loop): the
/// checkpoint's disk lives inside the checkpoint directory then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_and_fork_with_copied_disks() {
    init_tracing();
    let Some(art) = artifacts("checkpoint_and_fork_with_copied_disks") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    for (label, backend) in backends() {
        eprintln!("== checkpoint_and_fork_with_copied_disks on {label}");
        let env = TestEnv::new(art.clone());
        let mut cfg = env.config("e", backend);
        cfg.disk_strategy = bhatti::storage::DiskStrategy::Copy;
        let engine = Engine::new(cfg).await.expect("engine");
        let sb = engine
            .create(CreateSpec {
                name: Some("origin".into()),
                memory_mb: 256,
                ..Default::default()
            })
            .await
            .expect("create");
        let c = engine.agent(&sb.id).await.unwrap();
        sh(&c, "echo before > /workspace/mark").await;
        let cp_dir = env.dir.path().join("cp-copy");
        engine
            .checkpoint(&sb.id, &cp_dir)
            .await
            .expect("checkpoint");
        assert!(
            cp_dir.join("rootfs.ext4").is_file(),
            "the disk copy moved in with the checkpoint"
        );
        sh(&c, "echo after > /workspace/mark").await;
        let child = engine
            .fork(
                "fork-copy".into(),
                CreateSpec {
                    name: Some("child".into()),
                    ..Default::default()
                },
                &cp_dir,
            )
            .await
            .expect("fork");
        let cc = engine.agent(&child.id).await.unwrap();
        assert_eq!(sh(&cc, "cat /workspace/mark").await.trim(), "before");
        assert_eq!(sh(&c, "cat /workspace/mark").await.trim(), "after");
        assert_eq!(sh(&cc, "hostname").await.trim(), "child");
        engine.destroy(&child.id).await.unwrap();
        engine.destroy(&sb.id).await.unwrap();
    }
}
