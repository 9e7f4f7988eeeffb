//! Part 1: create → first exec through the API, three ways, interleaved.
//!
//! - boot: `POST /sandboxes {}` + `POST /sandboxes/{id}/exec`;
//! - instant: `POST /sandboxes {"template": "bench"}` + exec, restored from
//!   the template's pre-booted snapshot (`origin: "instant"` checked). On a
//!   daemon without `/templates` the same restore path is taken through a
//!   checkpoint fork (`POST /snapshots/{name}/resume`);
//! - floor: the same snapshot files restored straight with the VMM backend
//!   on a clone of the snapshot's disk (made before the clock starts), the
//!   agent handshake with the snapshot's token, one exec.
//!
//! Each round runs one of each in a rotating order; sandboxes are deleted
//! and raw VMs killed after their sample (not timed).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bhatti::engine::CheckpointMeta;
use bhatti_bench::{Recorder, Stats};
use bhatti_protocol::guest_config::{AgentTransport, GuestConfig};
use bhatti_protocol::{AgentClient, ExecRequest, ReidentifyRequest};
use bhatti_vmm::{BackendKind, NetConfig, Vm, VmConfig, VmmBackend};
use serde::Serialize;

use crate::daemon::{create_user, Daemon};
use crate::http::Conn;
use crate::vm_env::{backend_label, Artifacts, VmEnv, BOOT_TIMEOUT};

/// The template (or checkpoint) the instant path restores from.
const TEMPLATE: &str = "bench";
/// The raw floor's TAP in the bench's netns.
const RAW_TAP: &str = "bbraw0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstantVia {
    /// `POST /templates` + `POST /sandboxes {"template"}`.
    Template,
    /// `POST /sandboxes/{id}/checkpoint` + `POST /snapshots/{name}/resume`
    /// (the daemon has no templates API yet).
    CheckpointFork,
}

#[derive(Debug, Serialize)]
pub struct CreateExec {
    pub backend: String,
    pub instant_via: InstantVia,
    pub samples: usize,
    pub boot: Stats,
    pub instant: Stats,
    pub floor: Stats,
    /// The floor plus the fork's guest-side step: reidentify (new token,
    /// MAC, address, gateway, entropy) on the same connection.
    pub raw_fork: Stats,
    /// The floor's disk clone, done before its clock starts (reflink).
    pub floor_disk_clone: Stats,
    /// How long the template's pre-booted snapshot took to be ready (or
    /// the checkpoint to be taken), once.
    pub prepare_ms: f64,
    /// instant / floor at p50, p95, p99.
    pub instant_over_floor: [f64; 3],
    /// boot / instant at p50, p95, p99.
    pub boot_over_instant: [f64; 3],
    /// instant / raw fork at p50, p95, p99.
    pub instant_over_raw_fork: [f64; 3],
    /// boot / floor at p50, p95, p99.
    pub boot_over_floor: [f64; 3],
    pub target: String,
    pub met: bool,
    pub notes: Vec<String>,
}

fn ratio(a: &Stats, b: &Stats) -> [f64; 3] {
    let r = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
    [
        r(a.p50_us, b.p50_us),
        r(a.p95_us, b.p95_us),
        r(a.p99_us, b.p99_us),
    ]
}

pub async fn run(samples: usize, art: &Artifacts) -> anyhow::Result<CreateExec> {
    let env = VmEnv::new("bhatti-image-bench.", art)?;
    let config = env.config.clone();
    let backend = bhatti::daemon::backend(&config)?;
    let label = backend_label(&backend);
    let key = create_user(&config, "bench")?;
    let daemon = Daemon::start(config.clone(), backend.clone()).await?;
    let result = measure(samples, art, &env, &backend, &key).await;
    let stopped = daemon.stop().await;
    let mut out = result?;
    stopped?;
    out.backend = label;
    Ok(out)
}

async fn measure(
    samples: usize,
    art: &Artifacts,
    env: &VmEnv,
    backend: &Arc<dyn VmmBackend>,
    key: &str,
) -> anyhow::Result<CreateExec> {
    let config = &env.config;
    let mut c = Conn::new(&config.listen_unix, Some(key));

    // One unmeasured boot first (page cache, the XFS base import).
    let id = create(&mut c, serde_json::json!({"name": "warm0"})).await?;
    exec_true(&mut c, &id).await?;
    delete(&mut c, &id).await?;

    eprintln!("[image-bench] preparing the instant path's snapshot");
    let t = Instant::now();
    let (via, snap_dir) = prepare_instant(&mut c, &config.data_dir).await?;
    let prepare_ms = t.elapsed().as_secs_f64() * 1e3;
    let meta = CheckpointMeta::load(&snap_dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", snap_dir.display()))?;
    eprintln!(
        "[image-bench] instant path via {via:?}: snapshot {} ready after {:.1} s ({} vCPU, {} MiB, networked {})",
        snap_dir.display(),
        prepare_ms / 1e3,
        meta.vcpus,
        meta.memory_mib,
        meta.networked
    );

    let raw = RawFloor::new(art, env, backend.clone(), &meta).await?;
    let mut boot = Recorder::new("create → first exec, boot path");
    let mut instant = Recorder::new(match via {
        InstantVia::Template => "create → first exec, instant (template)",
        InstantVia::CheckpointFork => "create → first exec, instant (checkpoint fork)",
    });
    let mut floor = Recorder::new("raw restore → handshake → exec");
    let mut fork = Recorder::new("raw restore → handshake → reidentify → exec");
    let mut clone = Recorder::new("floor's disk clone (untimed)");
    let mut origins = std::collections::BTreeSet::new();

    // Round 0 is a warm-up of the instant path and the floor.
    for round in 0..=samples {
        for k in 0..4 {
            let which = (round + k) % 4;
            let name = format!("s{round}x{which}");
            match which {
                0 if round > 0 => {
                    let t = Instant::now();
                    let id = create(&mut c, serde_json::json!({"name": name})).await?;
                    exec_true(&mut c, &id).await?;
                    let took = t.elapsed();
                    boot.record(took);
                    eprintln!("[image-bench] {round}: boot {:.3} s", took.as_secs_f64());
                    delete(&mut c, &id).await?;
                }
                0 => {}
                1 => {
                    let t = Instant::now();
                    let (id, origin) = create_instant(&mut c, via, &name).await?;
                    exec_true(&mut c, &id).await?;
                    let took = t.elapsed();
                    if via == InstantVia::Template {
                        anyhow::ensure!(
                            origin.as_deref() == Some("instant"),
                            "a sandbox from template {TEMPLATE} has origin {origin:?}, not \"instant\""
                        );
                    }
                    origins.insert(origin.unwrap_or_else(|| "-".into()));
                    if round > 0 {
                        instant.record(took);
                    }
                    eprintln!("[image-bench] {round}: instant {:.3} s", took.as_secs_f64());
                    delete(&mut c, &id).await?;
                }
                2 => {
                    let (took, _) = raw.sample(round, true).await?;
                    if round > 0 {
                        fork.record(took);
                    }
                    eprintln!(
                        "[image-bench] {round}: raw fork {:.3} s",
                        took.as_secs_f64()
                    );
                }
                _ => {
                    let (took, cloned) = raw.sample(round, false).await?;
                    if round > 0 {
                        floor.record(took);
                        clone.record(cloned);
                    }
                    eprintln!(
                        "[image-bench] {round}: floor {:.3} s (disk clone before it {:.1} ms)",
                        took.as_secs_f64(),
                        cloned.as_secs_f64() * 1e3
                    );
                }
            }
        }
    }
    raw.finish();
    if via == InstantVia::Template {
        let _ = c.delete(&format!("/templates/{TEMPLATE}")).await;
    }

    let (boot, instant, floor, fork) = (boot.stats(), instant.stats(), floor.stats(), fork.stats());
    let iof = ratio(&instant, &floor);
    let notes = vec![
        format!(
            "guests: {} vCPU, {} MiB (the daemon's defaults), a NIC in netns {}; the floor's VM gets a TAP of its own there",
            meta.vcpus, meta.memory_mib, env.ns
        ),
        format!(
            "instant path via {}: origin(s) seen {:?}; its snapshot took {:.1} s to be ready (once, not in the samples)",
            match via {
                InstantVia::Template => "POST /templates + POST /sandboxes {\"template\"}",
                InstantVia::CheckpointFork =>
                    "POST /sandboxes/{id}/checkpoint + POST /snapshots/{name}/resume (no /templates in this daemon)",
            },
            origins,
            prepare_ms / 1e3
        ),
        "floor: QEMU restore of the same snapshot files + agent handshake with the snapshot's token + exec true, \
         on a reflink clone of the snapshot's disk made before the clock starts"
            .to_owned(),
        "raw fork: the floor plus what a fork adds in the guest (reidentify with a new token, MAC, address, \
         gateway and entropy, on the same connection, as the engine does), to split instant − floor into guest work and the daemon's"
            .to_owned(),
        "each round runs boot, instant, floor and raw fork once, in a rotating order; deletes and kills are not timed"
            .to_owned(),
    ];
    Ok(CreateExec {
        backend: String::new(),
        instant_via: via,
        samples,
        instant_over_floor: iof,
        boot_over_instant: ratio(&boot, &instant),
        boot_over_floor: ratio(&boot, &floor),
        instant_over_raw_fork: ratio(&instant, &fork),
        raw_fork: fork,
        target: "instant ≤ 1.25 × floor (p50)".into(),
        met: iof[0] <= 1.25,
        boot,
        instant,
        floor,
        floor_disk_clone: clone.stats(),
        prepare_ms,
        notes,
    })
}

/// Creates the instant path's snapshot: a template's pre-booted snapshot
/// where the daemon has `/templates`, else a checkpoint of a fresh
/// sandbox. Returns the way and the snapshot's directory.
async fn prepare_instant(c: &mut Conn, data: &Path) -> anyhow::Result<(InstantVia, PathBuf)> {
    let r = c
        .post("/templates", serde_json::json!({"name": TEMPLATE}))
        .await?;
    if r.status.is_success() {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let v = c
                .get(&format!("/templates/{TEMPLATE}"))
                .await?
                .ok("get template", 200)?
                .json()?;
            match v["prebooted"]["state"].as_str() {
                Some("ready") => break,
                Some("failed") => anyhow::bail!("template {TEMPLATE}: pre-boot failed: {v}"),
                _ => {}
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "template {TEMPLATE} not ready after 600 s: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Pre-booted snapshots are checkpoints named `pb_<key>`.
        let dir = newest_checkpoint(&data.join("checkpoints"), "pb_")?;
        return Ok((InstantVia::Template, dir));
    }
    anyhow::ensure!(
        matches!(r.status.as_u16(), 404 | 405),
        "POST /templates: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    eprintln!(
        "[image-bench] no /templates in this daemon ({}): the instant path is a checkpoint fork",
        r.status
    );
    let id = create(c, serde_json::json!({"name": "bench-source"})).await?;
    exec_true(c, &id).await?;
    c.post(
        &format!("/sandboxes/{id}/checkpoint"),
        serde_json::json!({"name": TEMPLATE}),
    )
    .await?
    .ok("checkpoint", 201)?;
    // Checkpoints outlive their sandbox.
    delete(c, &id).await?;
    let dir = newest_checkpoint(&data.join("checkpoints"), "cp_")?;
    Ok((InstantVia::CheckpointFork, dir))
}

/// The newest directory under `root` named `prefix…` holding a `meta.json`.
fn newest_checkpoint(root: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(root).with_context(|| format!("listing {}", root.display()))? {
        let p = e?.path();
        if !p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        {
            continue;
        }
        let meta = p.join(bhatti::engine::CHECKPOINT_META);
        if let Ok(m) = std::fs::metadata(&meta) {
            let at = m.modified()?;
            if best.as_ref().is_none_or(|(b, _)| at > *b) {
                best = Some((at, p));
            }
        }
    }
    best.map(|(_, p)| p)
        .with_context(|| format!("no snapshot {prefix}… (meta.json) under {}", root.display()))
}

async fn create(c: &mut Conn, body: serde_json::Value) -> anyhow::Result<String> {
    crate::daemon::create_sandbox(c, body).await
}

/// The instant path's create; returns the id and the view's `origin`.
async fn create_instant(
    c: &mut Conn,
    via: InstantVia,
    name: &str,
) -> anyhow::Result<(String, Option<String>)> {
    let r = match via {
        InstantVia::Template => {
            c.post(
                "/sandboxes",
                serde_json::json!({"name": name, "template": TEMPLATE}),
            )
            .await?
        }
        InstantVia::CheckpointFork => {
            c.post(
                &format!("/snapshots/{TEMPLATE}/resume"),
                serde_json::json!({"name": name}),
            )
            .await?
        }
    };
    let v = r.ok("instant create", 201)?.json()?;
    let id = v["id"]
        .as_str()
        .map(str::to_owned)
        .context("instant create: no id")?;
    Ok((id, v["origin"].as_str().map(str::to_owned)))
}

/// `POST /sandboxes/{id}/exec {"cmd":["true"]}`, checked.
async fn exec_true(c: &mut Conn, id: &str) -> anyhow::Result<()> {
    let v = c
        .post(
            &format!("/sandboxes/{id}/exec"),
            serde_json::json!({"cmd": ["true"]}),
        )
        .await?
        .ok("exec", 200)?
        .json()?;
    anyhow::ensure!(v["exit_code"] == 0, "exec true: {v}");
    Ok(())
}

async fn delete(c: &mut Conn, id: &str) -> anyhow::Result<()> {
    c.delete(&format!("/sandboxes/{id}"))
        .await?
        .ok("delete", 204)?;
    Ok(())
}

/// The floor: the snapshot restored straight with the backend.
struct RawFloor {
    backend: Arc<dyn VmmBackend>,
    meta: CheckpointMeta,
    root: PathBuf,
    drive: PathBuf,
    kernel: PathBuf,
    kernel_args: String,
    ns: String,
    tap: bool,
}

impl RawFloor {
    async fn new(
        art: &Artifacts,
        env: &VmEnv,
        backend: Arc<dyn VmmBackend>,
        meta: &CheckpointMeta,
    ) -> anyhow::Result<RawFloor> {
        anyhow::ensure!(
            meta.backend == backend.kind(),
            "the snapshot was made by {} and the backend is {}",
            meta.backend,
            backend.kind()
        );
        // The restored guest reads its config drive never again, but the
        // device must be there, as in the snapshot.
        let drive = env.raw.join("config.ext4");
        let gc = GuestConfig {
            sandbox_id: "rawimage".into(),
            hostname: "rawimage".into(),
            token: meta.token.clone(),
            env: Default::default(),
            files: Vec::new(),
            init: None,
            dns: Vec::new(),
            dns_search: Vec::new(),
            agent: match backend.kind() {
                BackendKind::Firecracker => AgentTransport::Vsock {
                    port: bhatti_vmm::AGENT_VSOCK_PORT,
                },
                BackendKind::Qemu => AgentTransport::Serial {
                    name: bhatti_vmm::AGENT_SERIAL_NAME.to_owned(),
                },
            },
            network: None,
            user: None,
            workdir: None,
            mounts: Vec::new(),
        };
        bhatti::storage::write_config_drive(&drive, &gc).await?;
        let tap = meta.networked;
        if tap {
            ip(&[
                "-n", &env.ns, "tuntap", "add", "dev", RAW_TAP, "mode", "tap",
            ])?;
            ip(&["-n", &env.ns, "link", "set", RAW_TAP, "up"])?;
        }
        Ok(RawFloor {
            backend,
            meta: meta.clone(),
            root: env.raw.clone(),
            drive,
            kernel: art.kernel.clone(),
            kernel_args: env.config.vm.kernel_args.trim().to_owned(),
            ns: env.ns.clone(),
            tap,
        })
    }

    /// One restore → handshake → exec; returns its time and the time of
    /// the disk clone made before it.
    async fn sample(&self, i: usize, reidentify: bool) -> anyhow::Result<(Duration, Duration)> {
        let i = format!("{i}{}", if reidentify { "f" } else { "" });
        let run_dir = self.root.join(format!("r{i}"));
        std::fs::create_dir_all(&run_dir)?;
        // Beside the snapshot's disk: the same file system, so a reflink.
        let disk = self.meta.disk.with_file_name(format!("bench-raw-{i}.ext4"));
        let t = Instant::now();
        clone_file(&self.meta.disk, &disk)?;
        let cloned = t.elapsed();
        let cfg = VmConfig {
            id: format!("rawimage{i}"),
            vcpus: self.meta.vcpus,
            memory_mib: self.meta.memory_mib,
            kernel: self.kernel.clone(),
            kernel_args: self.kernel_args.clone(),
            root_disk: disk.clone(),
            config_disk: Some(self.drive.clone()),
            net: self.tap.then(|| NetConfig {
                tap: RAW_TAP.to_owned(),
                mac: "02:42:ac:1f:00:02".to_owned(),
            }),
            netns: Some(self.ns.clone()),
            run_dir: run_dir.clone(),
            data_disks: Vec::new(),
        };
        let result = self.restore_exec(&cfg, reidentify).await;
        let _ = std::fs::remove_file(&disk);
        let _ = std::fs::remove_dir_all(&run_dir);
        Ok((result?, cloned))
    }

    async fn restore_exec(&self, cfg: &VmConfig, reidentify: bool) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let vm = self.backend.restore(cfg, &self.meta.snapshot).await?;
        let r = async {
            let wait = |token: String| {
                let vm = vm.as_ref();
                async move {
                    bhatti::engine::wait_for_agent(vm, &token, BOOT_TIMEOUT)
                        .await
                        .map_err(|e| anyhow::anyhow!("raw restore: {e}"))
                }
            };
            let client = wait(self.meta.token.clone()).await?;
            if reidentify {
                let done = client
                    .reidentify(ReidentifyRequest {
                        token: bhatti::engine::random_hex(32),
                        hostname: cfg.id.clone(),
                        sandbox_id: cfg.id.clone(),
                        mac: cfg.net.as_ref().map(|n| n.mac.clone()),
                        address: cfg.net.as_ref().map(|_| "10.255.0.2/24".to_owned()),
                        gateway: cfg.net.as_ref().map(|_| [10, 255, 0, 1].into()),
                        entropy: Some(bhatti::engine::random_hex(64)),
                        env: None,
                    })
                    .await?;
                anyhow::ensure!(done.failed.is_empty(), "reidentify: {:?}", done.failed);
                // As the engine does: the connection that reidentified
                // stays authenticated, no second handshake.
            }
            let r = agent_exec(&client).await;
            let took = t.elapsed();
            client.close();
            r.map(|()| took)
        }
        .await;
        kill_vm(vm).await;
        r
    }

    fn finish(&self) {
        if self.tap {
            let _ = ip(&["-n", &self.ns, "link", "del", RAW_TAP]);
        }
    }
}

async fn agent_exec(c: &AgentClient) -> anyhow::Result<()> {
    let out = c
        .exec(
            ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            },
            None,
        )
        .await?;
    anyhow::ensure!(out.status.exit_code == 0, "raw exec true failed");
    Ok(())
}

async fn kill_vm(vm: Box<dyn Vm>) {
    if let Err(e) = vm.kill().await {
        eprintln!("[image-bench] killing a raw VM: {e}");
    }
}

/// A reflink of `src` at `dest`, or a sparse copy where reflinks fail.
fn clone_file(src: &Path, dest: &Path) -> anyhow::Result<()> {
    let s = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .with_context(|| format!("creating {}", dest.display()))?;
    if bhatti::storage::ficlone(&s, &d).is_ok() {
        return Ok(());
    }
    drop(d);
    std::fs::remove_file(dest)?;
    bhatti::storage::sparse_copy(src, dest)?;
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
