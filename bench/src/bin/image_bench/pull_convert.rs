//! Part 2: pull + convert of a ~100 MB image from a registry on 127.0.0.1.
//!
//! Debian's `docker-registry` serves an image built here with `umoci` from
//! real directory trees of this host (Python's standard library, Perl,
//! /usr/share/doc: many small files, symlinks) in three layers, pushed by
//! `skopeo`. Each round then runs, in alternating order:
//!
//! - bhatti: `image::pull` into an empty cache, `unpack_pulled` onto an
//!   empty directory, `inject_lohar`, `build_ext4`;
//! - the floor: `skopeo copy docker://… oci:…`, `umoci raw unpack`, lohar
//!   copied in, `mkfs.ext4 -d` of the tree into a file of the same size
//!   with the same inode count;
//! - where a daemon can run (root, kernel, rootfs): `POST /images/pull`
//!   through an in-process daemon until its task succeeded.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use bhatti_bench::{Recorder, Stats};
use bhatti_engine::image::{self, ext4, PullAuth};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::daemon::{create_user, Daemon};
use crate::http::Conn;
use crate::vm_env::{Artifacts, VmEnv};

const TOOLS: [&str; 4] = ["docker-registry", "umoci", "skopeo", "mkfs.ext4"];

/// Files over this size are left out of the image.
const MAX_FILE: u64 = 4 << 20;

/// The image's layers: (host trees, byte budget).
const LAYERS: [(&[&str], u64); 3] = [
    (&["/usr/lib/python3.11", "/usr/lib/python3"], 50 << 20),
    (
        &[
            "/usr/lib/x86_64-linux-gnu/perl",
            "/usr/share/perl",
            "/usr/share/perl5",
            "/usr/share/i18n",
            "/usr/lib/x86_64-linux-gnu/gconv",
        ],
        30 << 20,
    ),
    (&["/usr/share/doc", "/usr/share/locale"], 20 << 20),
];

#[derive(Debug, Serialize)]
pub struct PullConvert {
    pub samples: usize,
    pub image: ImageInfo,
    pub bhatti: Stats,
    pub floor: Stats,
    /// The same through the daemon: `POST /images/pull` until its task
    /// succeeded (then `DELETE /images/{name}`, untimed, so the next pull
    /// downloads again).
    pub api: Option<ApiPull>,
    /// bhatti / floor at p50, p95, p99.
    pub ratio: [f64; 3],
    pub target: String,
    pub met: bool,
    /// bhatti's phases: pull, unpack (+ lohar), ext4.
    pub bhatti_phases: Vec<Stats>,
    /// The floor's phases: skopeo copy, umoci raw unpack (+ lohar), mkfs.
    pub floor_phases: Vec<Stats>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ApiPull {
    pub stats: Stats,
    /// API / floor at p50, p95, p99.
    pub ratio: [f64; 3],
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub reference: String,
    pub layers: usize,
    /// Compressed layer bytes (what is downloaded).
    pub layer_bytes: u64,
    /// The unpacked tree: bytes (4 KiB blocks) and inodes.
    pub content_bytes: u64,
    pub content_inodes: u64,
    pub disk_bytes: u64,
}

/// Which tool is missing, if one is.
pub fn missing_tool() -> Option<&'static str> {
    TOOLS.into_iter().find(|t| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// With `art`, also `POST /images/pull` through an in-process daemon.
pub async fn run(
    samples: usize,
    lohar: &Path,
    art: Option<&Artifacts>,
) -> anyhow::Result<PullConvert> {
    let registry = Registry::start()?;
    let work = tempfile::Builder::new()
        .prefix("bhatti-image-bench-pull.")
        .tempdir()?;
    eprintln!("[image-bench] building and pushing the image");
    let reference = build_and_push(&registry, work.path())?;
    let mut api = match art {
        Some(art) => Some(ApiSide::start(art, lohar).await?),
        None => None,
    };
    let result = rounds(
        samples,
        lohar,
        &registry,
        work.path(),
        &reference,
        api.as_mut(),
    )
    .await;
    if let Some(a) = api {
        a.stop().await?;
    }
    result
}

async fn rounds(
    samples: usize,
    lohar: &Path,
    registry: &Registry,
    work: &Path,
    reference: &str,
    mut api: Option<&mut ApiSide>,
) -> anyhow::Result<PullConvert> {
    let mut through_api = Recorder::new("POST /images/pull → task succeeded");

    let mut bh = Recorder::new("bhatti pull + unpack + ext4");
    let mut fl = Recorder::new("skopeo copy + umoci unpack + mkfs.ext4 -d");
    let mut bh_phases = [
        Recorder::new("bhatti: pull (empty cache)"),
        Recorder::new("bhatti: unpack + lohar"),
        Recorder::new("bhatti: ext4 (size + mkfs -d)"),
    ];
    let mut fl_phases = [
        Recorder::new("floor: skopeo copy"),
        Recorder::new("floor: umoci raw unpack + lohar"),
        Recorder::new("floor: mkfs.ext4 -d"),
    ];
    let mut info: Option<ImageInfo> = None;
    // Round 0 is a warm-up that also sizes the floor's disk.
    for round in 0..=samples {
        if let Some(a) = api.as_deref_mut() {
            let took = a.pull(reference, &format!("bench{round}")).await?;
            eprintln!(
                "[image-bench] {round}: POST /images/pull {:.2} s",
                took.as_secs_f64()
            );
            if round > 0 {
                through_api.record(took);
            }
        }
        for k in 0..2 {
            let dir = work.join(format!("r{round}-{k}"));
            std::fs::create_dir_all(&dir)?;
            if (round + k) % 2 == 0 {
                let (total, phases, i) = ours(reference, &dir, lohar).await?;
                eprintln!(
                    "[image-bench] {round}: bhatti {:.2} s (pull {:.2}, unpack {:.2}, ext4 {:.2})",
                    total.as_secs_f64(),
                    phases[0].as_secs_f64(),
                    phases[1].as_secs_f64(),
                    phases[2].as_secs_f64()
                );
                if round > 0 {
                    bh.record(total);
                    for (r, p) in bh_phases.iter_mut().zip(phases) {
                        r.record(p);
                    }
                }
                info.get_or_insert(i);
            } else {
                // Round 0 starts with bhatti, which sizes the floor's disk.
                let i = info.as_ref().context("the floor ran before bhatti")?;
                let (total, phases) = floor(&registry.addr, &dir, lohar, i).await?;
                eprintln!(
                    "[image-bench] {round}: floor {:.2} s (copy {:.2}, unpack {:.2}, mkfs {:.2})",
                    total.as_secs_f64(),
                    phases[0].as_secs_f64(),
                    phases[1].as_secs_f64(),
                    phases[2].as_secs_f64()
                );
                if round > 0 {
                    fl.record(total);
                    for (r, p) in fl_phases.iter_mut().zip(phases) {
                        r.record(p);
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let info = info.context("no image info")?;
    let (bhatti, floor) = (bh.stats(), fl.stats());
    let r = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let ratio = [
        r(bhatti.p50_us, floor.p50_us),
        r(bhatti.p95_us, floor.p95_us),
        r(bhatti.p99_us, floor.p99_us),
    ];
    let mut notes = vec![
        format!(
            "image {}: {} layers, {:.1} MiB compressed, {:.1} MiB / {} inodes unpacked (host trees: Python stdlib, Perl, /usr/share/doc), disk {} MiB",
            info.reference,
            info.layers,
            info.layer_bytes as f64 / 1048576.0,
            info.content_bytes as f64 / 1048576.0,
            info.content_inodes,
            info.disk_bytes >> 20
        ),
        "registry: Debian's docker-registry on 127.0.0.1 (plain HTTP); both sides download into empty directories every round"
            .to_owned(),
        "floor's disk: the same size and inode count as bhatti's, same mkfs.ext4 options (-m 0 -N … -d)".to_owned(),
    ];
    if api.is_some() {
        notes.push(
            "API row: an in-process daemon, POST /images/pull polled every 10 ms through GET /tasks/{id} until succeeded, \
             then DELETE /images/{name} (untimed; it sweeps the blob cache, so every pull downloads)"
                .to_owned(),
        );
    }
    let api = api.map(|_| {
        let s = through_api.stats();
        ApiPull {
            ratio: [
                r(s.p50_us, floor.p50_us),
                r(s.p95_us, floor.p95_us),
                r(s.p99_us, floor.p99_us),
            ],
            stats: s,
        }
    });
    Ok(PullConvert {
        samples,
        api,
        image: info,
        ratio,
        target: "bhatti ≤ 1.3 × floor (p50)".into(),
        met: ratio[0] <= 1.3,
        bhatti,
        floor,
        bhatti_phases: bh_phases.iter().map(Recorder::stats).collect(),
        floor_phases: fl_phases.iter().map(Recorder::stats).collect(),
        notes,
    })
}

/// bhatti's pull + unpack + lohar + ext4 into `dir`; the total, the three
/// phases and what the image holds.
async fn ours(
    reference: &str,
    dir: &Path,
    lohar: &Path,
) -> anyhow::Result<(Duration, [Duration; 3], ImageInfo)> {
    let cache = dir.join("cache");
    let root = dir.join("rootfs");
    let disk = dir.join("disk.ext4");
    let none = CancellationToken::new();
    let t = Instant::now();
    let pulled = image::pull(reference, &PullAuth::Anonymous, &cache, &|_| {}, &none).await?;
    anyhow::ensure!(!pulled.cached, "the pull found a cached image");
    let t_pull = t.elapsed();
    std::fs::create_dir(&root)?;
    image::unpack_pulled(&pulled, &root).await?;
    let (r, l) = (root.clone(), lohar.to_owned());
    tokio::task::spawn_blocking(move || ext4::inject_lohar(&r, &l)).await??;
    let t_unpack = t.elapsed();
    let disk_bytes = ext4::build_ext4(&root, &disk).await?;
    let total = t.elapsed();
    let r = root.clone();
    let content = tokio::task::spawn_blocking(move || ext4::content_size(&r)).await??;
    let info = ImageInfo {
        reference: reference.to_owned(),
        layers: pulled.layers.len(),
        layer_bytes: pulled.layers.iter().map(|l| l.size).sum(),
        content_bytes: content.bytes,
        content_inodes: content.inodes,
        disk_bytes,
    };
    Ok((total, [t_pull, t_unpack - t_pull, total - t_unpack], info))
}

/// The floor into `dir`: the total and the three phases.
async fn floor(
    addr: &str,
    dir: &Path,
    lohar: &Path,
    info: &ImageInfo,
) -> anyhow::Result<(Duration, [Duration; 3])> {
    let layout = dir.join("oci");
    let root = dir.join("rootfs");
    let disk = dir.join("disk.ext4");
    let image = format!("{}:v1", layout.display());
    // As bhatti's build_ext4 does for this content.
    let inodes = (info.content_inodes * 2 + 4096).max(info.disk_bytes / 16384);
    let t = Instant::now();
    run_async(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{addr}/bench:v1"))
            .arg(format!("oci:{image}")),
    )
    .await?;
    let t_copy = t.elapsed();
    run_async(
        Command::new("umoci")
            .args(["raw", "unpack", "--image", &image])
            .arg(&root),
    )
    .await?;
    let dest = root.join(ext4::LOHAR_PATH);
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::copy(lohar, &dest)?;
    let t_unpack = t.elapsed();
    std::fs::File::create(&disk)?.set_len(info.disk_bytes)?;
    run_async(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-N", &inodes.to_string(), "-d"])
            .arg(&root)
            .arg(&disk),
    )
    .await?;
    let total = t.elapsed();
    Ok((total, [t_copy, t_unpack - t_copy, total - t_unpack]))
}

/// Runs `cmd` to the end off the runtime's thread; fails on a non-zero exit.
async fn run_async(cmd: &mut Command) -> anyhow::Result<()> {
    let out = tokio::process::Command::from(std::mem::replace(cmd, Command::new("true")))
        .stdin(Stdio::null())
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A `docker-registry` on a free loopback port, killed by its pid and
/// reaped when dropped.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start() -> anyhow::Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("bhatti-image-bench-registry.")
            .tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("storage").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry")?;
        let registry = Registry {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }
}

/// Builds the image in an OCI layout under `work` (one umoci layer per
/// entry of [`LAYERS`]) and pushes it as `<registry>/bench:v1`.
fn build_and_push(registry: &Registry, work: &Path) -> anyhow::Result<String> {
    let layout = work.join("layout");
    let image = format!("{}:v1", layout.display());
    sh(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout))?;
    sh(Command::new("umoci").args(["new", "--image", &image]))?;
    for (i, (trees, budget)) in LAYERS.iter().enumerate() {
        let bundle = work.join(format!("bundle{i}"));
        sh(Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle))?;
        let rootfs = bundle.join("rootfs");
        let mut left = *budget;
        for tree in trees.iter().map(Path::new).filter(|t| t.is_dir()) {
            let rel = tree.strip_prefix("/")?;
            copy_tree(tree, &rootfs.join(rel), &mut left)?;
            if left == 0 {
                break;
            }
        }
        sh(Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle))?;
        std::fs::remove_dir_all(&bundle)?;
    }
    sh(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "--config.workingdir",
        "/",
    ]))?;
    let reference = format!("{}/bench:v1", registry.addr);
    sh(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{image}"))
        .arg(format!("docker://{reference}")))?;
    std::fs::remove_dir_all(&layout)?;
    Ok(reference)
}

/// Copies `src` to `dest` (directories, regular files with their modes,
/// symlinks; nothing else) in name order until `left` bytes are spent
/// (within 64 KiB).
fn copy_tree(src: &Path, dest: &Path, left: &mut u64) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::symlink_metadata(src)?;
    if m.is_dir() {
        std::fs::create_dir_all(dest)?;
        std::fs::set_permissions(
            dest,
            std::fs::Permissions::from_mode(m.permissions().mode() & 0o7777),
        )?;
        let mut entries: Vec<PathBuf> = std::fs::read_dir(src)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            if *left == 0 {
                break;
            }
            let name = e.file_name().context("a file name")?;
            copy_tree(&e, &dest.join(name), left)?;
        }
    } else if m.is_symlink() {
        if !dest.exists() {
            std::os::unix::fs::symlink(std::fs::read_link(src)?, dest)?;
        }
    } else if m.is_file() && !dest.exists() {
        // A file past the budget is skipped (smaller ones may still fit),
        // and so are static libraries and the like (over 4 MiB).
        if m.len() > (*left).min(MAX_FILE) {
            if *left < 64 << 10 {
                *left = 0;
            }
            return Ok(());
        }
        std::fs::copy(src, dest)?;
        *left -= m.len();
    }
    Ok(())
}

/// An in-process daemon for `POST /images/pull`.
pub struct ApiSide {
    conn: Conn,
    daemon: Daemon,
    // Dropped after the daemon stops: its VMMs, mounts and netns.
    _env: VmEnv,
}

impl ApiSide {
    async fn start(art: &Artifacts, lohar: &Path) -> anyhow::Result<ApiSide> {
        let mut env = VmEnv::new("bhatti-image-bench-api.", art)?;
        env.config.images.lohar = std::fs::canonicalize(lohar)?;
        let backend = bhatti::daemon::backend(&env.config)?;
        let key = create_user(&env.config, "bench")?;
        let daemon = Daemon::start(env.config.clone(), backend).await?;
        Ok(ApiSide {
            conn: Conn::new(&env.config.listen_unix, Some(&key)),
            daemon,
            _env: env,
        })
    }

    /// `POST /images/pull`, polled until the task succeeded; then the
    /// image is deleted (untimed).
    async fn pull(&mut self, reference: &str, name: &str) -> anyhow::Result<Duration> {
        let c = &mut self.conn;
        let t = Instant::now();
        let v = c
            .post(
                "/images/pull",
                serde_json::json!({"ref": reference, "name": name}),
            )
            .await?
            .ok("images/pull", 202)?
            .json()?;
        let task = v.get("task").unwrap_or(&v);
        let id = task["id"]
            .as_str()
            .with_context(|| format!("images/pull: no task id in {v}"))?
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let v = c
                .get(&format!("/tasks/{id}"))
                .await?
                .ok("task", 200)?
                .json()?;
            match v["state"].as_str() {
                Some("succeeded") => break,
                Some("running") => {}
                _ => anyhow::bail!("pull task {id}: {v}"),
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "pull task {id} still running: {v}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = t.elapsed();
        c.delete(&format!("/images/{name}"))
            .await?
            .ok("delete image", 204)?;
        Ok(took)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.daemon.stop().await
    }
}
