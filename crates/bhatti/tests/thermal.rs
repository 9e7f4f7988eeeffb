//! The thermal manager on real VMs (QEMU here; Firecracker with hardware
//! KVM), with short timers: warm after 2 s, cold after 6 s.
//!
//! Artifacts and isolation as in `engine_linux.rs`: `BHATTI_KERNEL` /
//! `BHATTI_ROOTFS` (else the newest in `/var/cache/bhatti-ci`), root, one
//! network namespace and data dir per test, removed on drop. One test, one
//! engine, few VMs: under TCG every boot and snapshot costs seconds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bhatti::config::ThermalConfig;
use bhatti::engine::{CreateSpec, Engine, EngineConfig, SandboxState};
use bhatti::net::NetSettings;
use bhatti::thermal::{EventQuery, ThermalEventKind, ThermalManager, ThermalState};
use bhatti_protocol::client::PtyEvent;
use bhatti_protocol::{AgentClient, AttachRequest, ExecRequest, PtyRequest};
use bhatti_vmm::VmmBackend;
use bytes::Bytes;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

use bhatti_testkit::{artifacts, clean_data_dir, delete_netns, Artifacts};

/// The backend the daemon would pick for Linux guests here: Firecracker
/// with hardware KVM (Diff snapshots), else QEMU.
fn backend() -> Option<(String, Arc<dyn VmmBackend>)> {
    let found = bhatti_testkit::linux_backends().into_iter().next();
    if found.is_none() {
        bhatti_testkit::skip("thermal", "no VMM backend can boot Linux on this host");
    }
    found
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "bhatti=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A network namespace and a scratch dir, removed on drop with any VMM
/// and XFS mount left under it.
struct TestEnv {
    ns: String,
    dir: tempfile::TempDir,
    kernel: PathBuf,
    rootfs: PathBuf,
}

impl TestEnv {
    fn new(Artifacts { kernel, rootfs }: Artifacts) -> TestEnv {
        let ns = format!("bhatti-t-{}", bhatti::engine::random_hex(4));
        let dir = tempfile::Builder::new()
            .prefix("bhatti-thermal-test.")
            .tempdir()
            .unwrap();
        TestEnv {
            ns,
            dir,
            kernel,
            rootfs,
        }
    }

    async fn engine(&self, backend: Arc<dyn VmmBackend>) -> Engine {
        let mut cfg = EngineConfig::new(
            self.dir.path().join("e"),
            &self.kernel,
            &self.rootfs,
            backend,
        );
        cfg.net = Some(NetSettings {
            bridge: "bhatti0".into(),
            subnet: "10.78.0.1/24".into(),
            netns: Some(self.ns.clone()),
        });
        cfg.boot_timeout = BOOT_TIMEOUT;
        cfg.agent_timeout = Duration::from_secs(60);
        cfg.xfs_loop_size_mb = 16 << 10;
        Engine::new(cfg).await.expect("engine")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        clean_data_dir(&self.dir.path().join("e"));
        delete_netns(&self.ns);
    }
}

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout_ms: Some(120_000),
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

/// Polls `id`'s engine state every 100 ms until `want` or `limit`.
async fn wait_state(engine: &Engine, id: &str, want: SandboxState, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let s = engine.get(id).unwrap().state;
        if s == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{id} is {s}, not {want}, after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What must survive every cycle: file checksums and the counter process.
async fn fingerprint(c: &AgentClient) -> String {
    sh(c, "sync; sha256sum /home/lohar/f* | sort").await
}

async fn counter(c: &AgentClient) -> u64 {
    sh(c, "cat /tmp/counter").await.trim().parse().unwrap()
}

/// The counter process still runs and counts on.
async fn assert_counting(c: &AgentClient, pid: u32, before: u64) {
    let alive = c
        .exec(req(&["kill", "-0", &pid.to_string()]), None)
        .await
        .unwrap();
    assert_eq!(alive.status.exit_code, 0, "the counter process is gone");
    let now = counter(c).await;
    assert!(now >= before, "counter went back: {before} -> {now}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = counter(c).await;
    assert!(later > now, "counter stuck at {now}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thermal_cycles_on_real_vms() {
    init_tracing();
    let Some(art) = artifacts("thermal_cycles_on_real_vms") else {
        return;
    };
    let Some((label, backend)) = backend() else {
        return;
    };
    eprintln!("== thermal on {label}");
    let env = TestEnv::new(art);
    let engine = env.engine(backend).await;
    let spec = |name: &str| CreateSpec {
        name: Some(name.into()),
        memory_mb: 256,
        ..Default::default()
    };
    let a = engine.create(spec("idle")).await.expect("create idle");
    let b = engine.create(spec("pinned")).await.expect("create pinned");
    let thermal = ThermalManager::spawn(
        engine.clone(),
        None,
        &ThermalConfig {
            warm_after_secs: 2,
            cold_after_secs: 6,
            sweep_interval_ms: 200,
        },
    );
    let th = thermal.handle();
    th.set_keep_hot(&b.id, true);

    // State before: a counter loop and files.
    let c = th.agent(&a.id).await.unwrap();
    let boot_id = c.hello().boot_id.clone();
    let bg = c
        .exec_detached(req(&[
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done",
        ]))
        .await
        .unwrap();
    sh(
        &c,
        "head -c 3000000 /dev/urandom > /home/lohar/f1; seq 1 100000 > /home/lohar/f2",
    )
    .await;
    let fp = fingerprint(&c).await;

    // 1. A long exec keeps it hot throughout.
    let long = {
        let c = c.clone();
        tokio::spawn(async move { c.exec(req(&["sleep", "10"]), None).await })
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(9) {
        assert_eq!(
            engine.get(&a.id).unwrap().state,
            SandboxState::Running,
            "paused during a long exec ({:?} in)",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let out = long.await.unwrap().expect("long exec");
    assert_eq!(out.status.exit_code, 0);
    let info = th.info(&a.id).unwrap();
    eprintln!("info after the long exec: {info:?}");
    assert_eq!(info.state, ThermalState::Hot);
    assert_eq!((info.warm_after_secs, info.cold_after_secs), (2, 6));

    // 2. Idle: warm after ~2 s, cold after ~6 s, by itself.
    let t = Instant::now();
    let to_warm = wait_state(
        &engine,
        &a.id,
        SandboxState::Paused,
        Duration::from_secs(15),
    )
    .await;
    eprintln!("MEASURE {label} idle_to_warm {to_warm:?}");
    assert!(
        to_warm >= Duration::from_millis(1500),
        "warm too early: {to_warm:?}"
    );
    assert_eq!(th.info(&a.id).unwrap().state, ThermalState::Warm);
    wait_state(
        &engine,
        &a.id,
        SandboxState::Stopped,
        Duration::from_secs(60),
    )
    .await;
    let to_cold = t.elapsed();
    eprintln!("MEASURE {label} idle_to_cold {to_cold:?}");
    assert!(
        to_cold >= Duration::from_secs(5),
        "cold too early: {to_cold:?}"
    );
    let sb = engine.get(&a.id).unwrap();
    assert!(sb.has_snapshot && sb.pid.is_none());
    assert_eq!(th.info(&a.id).unwrap().state, ThermalState::Cold);
    // keep_hot kept the other one hot all along.
    assert_eq!(engine.get(&b.id).unwrap().state, SandboxState::Running);
    let ev = th.events(&EventQuery {
        sandbox_id: Some(a.id.clone()),
        ..Default::default()
    });
    let kinds: Vec<_> = ev.iter().rev().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![ThermalEventKind::Warm, ThermalEventKind::Cold],
        "{ev:?}"
    );
    assert!(th
        .events(&EventQuery {
            sandbox_id: Some(b.id.clone()),
            ..Default::default()
        })
        .is_empty());

    // 3. Wakes on exec with its processes and files.
    let t = Instant::now();
    let c = th.agent(&a.id).await.expect("wake from cold");
    eprintln!("MEASURE {label} wake_from_cold {:?}", t.elapsed());
    assert_eq!(c.hello().boot_id, boot_id, "rebooted instead of restored");
    assert_eq!(fingerprint(&c).await, fp);
    assert_counting(&c, bg.pid, 1).await;
    let wake = &th.events(&EventQuery {
        sandbox_id: Some(a.id.clone()),
        limit: Some(1),
        ..Default::default()
    })[0];
    assert_eq!(
        (wake.kind, wake.from, wake.to),
        (
            ThermalEventKind::Wake,
            ThermalState::Cold,
            ThermalState::Hot
        )
    );
    assert!(wake.latency_ms > 0.0);

    // 4. Repeated cycles restore exactly: cold, wake, write, cold, wake.
    let mut c = c;
    for round in 0..2 {
        sh(
            &c,
            &format!("head -c 1000000 /dev/urandom > /home/lohar/f-round{round}"),
        )
        .await;
        let fp = fingerprint(&c).await;
        let n = counter(&c).await;
        engine.snapshot_to_disk(&a.id).await.expect("cold");
        let c2 = th.agent(&a.id).await.expect("wake");
        assert_eq!(c2.hello().boot_id, boot_id);
        assert_eq!(fingerprint(&c2).await, fp, "round {round}");
        assert_counting(&c2, bg.pid, n).await;
        c = c2;
    }

    // 5. A shell attached across a warm cycle keeps working; a detached
    // session's scrollback survives a cold cycle and reattaches from its
    // offset.
    let c = th.agent(&a.id).await.unwrap();
    let mut p = c
        .pty(PtyRequest {
            argv: Some(vec!["/bin/sh".into()]),
            rows: 24,
            cols: 80,
            ..Default::default()
        })
        .await
        .unwrap();
    p.write(Bytes::from_static(b"echo before-$((6*7))\n"))
        .await
        .unwrap();
    pty_until(&mut p, "before-42").await;
    // Attached: the manager leaves it hot...
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(engine.get(&a.id).unwrap().state, SandboxState::Running);
    assert_eq!(th.info(&a.id).unwrap().attached_sessions, Some(1));
    // ...and across a warm cycle (as if the user had gone idle) the shell
    // works once a request wakes it.
    engine.pause(&a.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    th.agent(&a.id).await.expect("wake from warm");
    p.write(Bytes::from_static(b"echo after-$((7*7))\n"))
        .await
        .unwrap();
    pty_until(&mut p, "after-49").await;
    let session = p.session.clone();
    let offset = match p.detach().await.unwrap() {
        bhatti_protocol::PtyEnd::Detached { offset } => offset,
        other => panic!("detach: {other:?}"),
    };
    // Idle again (a detached session is no activity): cold by itself.
    c.exec(req(&["true"]), None).await.unwrap();
    let t = Instant::now();
    wait_state(
        &engine,
        &a.id,
        SandboxState::Stopped,
        Duration::from_secs(60),
    )
    .await;
    eprintln!("detached session: cold after {:?}", t.elapsed());
    let c = th.agent(&a.id).await.expect("wake");
    let mut p = c
        .attach(AttachRequest {
            session: session.clone(),
            offset: Some(offset),
        })
        .await
        .expect("reattach after a cold cycle");
    assert_eq!(p.start_offset, offset);
    p.write(Bytes::from_static(b"echo again-$((8*8))\n"))
        .await
        .unwrap();
    let seen = pty_until(&mut p, "again-64").await;
    assert!(!seen.contains("after-49"), "replayed before the offset");
    drop(p);
    let mut p = c
        .attach(AttachRequest {
            session: session.clone(),
            offset: Some(0),
        })
        .await
        .unwrap();
    let seen = pty_until(&mut p, "again-64").await;
    assert!(seen.contains("before-42"), "scrollback lost: {seen:?}");
    drop(p);
    c.kill_session(&session, None).await.unwrap();

    // 6. 20 concurrent requests to a cold sandbox: one wake, all succeed.
    engine.snapshot_to_disk(&a.id).await.unwrap();
    let last_seq = th.events(&EventQuery::default())[0].seq;
    let t = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let th = th.clone();
            let id = a.id.clone();
            tokio::spawn(async move {
                let c = th.agent(&id).await?;
                let out = c
                    .exec(req(&["echo", &format!("req-{i}")]), None)
                    .await
                    .expect("exec");
                Ok::<_, bhatti::EngineError>(String::from_utf8_lossy(&out.stdout).into_owned())
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let out = task.await.unwrap().expect("request on a cold sandbox");
        assert_eq!(out, format!("req-{i}\n"));
    }
    eprintln!("MEASURE {label} 20_concurrent_on_cold {:?}", t.elapsed());
    let new = th.events(&EventQuery {
        after_seq: Some(last_seq),
        ..Default::default()
    });
    let wakes: Vec<_> = new
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                ThermalEventKind::Wake | ThermalEventKind::WakeFailed
            )
        })
        .collect();
    assert_eq!(wakes.len(), 1, "{new:?}");
    assert_eq!(wakes[0].from, ThermalState::Cold);
    let c = th.agent(&a.id).await.unwrap();
    assert_eq!(c.hello().boot_id, boot_id);

    // 7. A corrupted snapshot: a clear error (no hang, no retry, no silent
    // reboot), then a fresh start boots from the disk with the files.
    let fp = fingerprint(&c).await;
    engine.snapshot_to_disk(&a.id).await.unwrap();
    std::fs::write(a.paths.dir.join("snapshot/state"), b"garbage").unwrap();
    let t = Instant::now();
    let err = th.agent(&a.id).await.expect_err("woke from garbage");
    eprintln!("corrupt snapshot after {:?}: {err}", t.elapsed());
    assert!(err.to_string().contains("did not restore"), "{err}");
    let failed = &th.events(&EventQuery {
        limit: Some(1),
        ..Default::default()
    })[0];
    assert_eq!(failed.kind, ThermalEventKind::WakeFailed);
    let t = Instant::now();
    let err = th
        .agent(&a.id)
        .await
        .expect_err("retried a failed snapshot");
    assert!(err.to_string().contains("start it fresh"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "it tried again");
    assert_eq!(engine.get(&a.id).unwrap().state, SandboxState::Stopped);
    engine.start_fresh(&a.id).await.expect("start fresh");
    let c = th.agent(&a.id).await.unwrap();
    assert_ne!(c.hello().boot_id, boot_id, "expected a fresh boot");
    assert_eq!(
        fingerprint(&c).await,
        fp,
        "files lost across the fresh boot"
    );

    // The pinned one never moved; unpinned, it cools.
    assert_eq!(engine.get(&b.id).unwrap().state, SandboxState::Running);
    th.set_keep_hot(&b.id, false);
    wait_state(
        &engine,
        &b.id,
        SandboxState::Stopped,
        Duration::from_secs(60),
    )
    .await;

    drop(thermal);
    for id in [&a.id, &b.id] {
        assert!(engine.destroy(id).await.unwrap());
    }
}
