//! The Firecracker tiny guest (`crates/vmm/tests/fixtures/tiny-guest`: it
//! spins incrementing a counter at guest-physical 0x1800000 and prints
//! `tick …` lines) and a raw Firecracker client: a `firecracker` process
//! spawned here, HTTP/1.1 written and parsed by hand on a unix socket.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bhatti_vmm::firecracker::{API_SOCKET, CONSOLE_LOG, VSOCK_SOCKET};
use bhatti_vmm::SnapshotFiles;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Guest-physical address of the tiny guest's counter.
pub const COUNTER: u64 = 0x1800000;
pub const TINY_MEM_MIB: u32 = 32;
/// Guest run time before each snapshot.
pub const RUN_A_BIT: Duration = Duration::from_millis(10);
/// Poll step of the raw side (tokio's timer has 1 ms steps).
pub const RAW_POLL: Duration = Duration::from_micros(100);
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
pub const START: &str = r#"{"action_type":"InstanceStart"}"#;
pub const PAUSED: &str = r#"{"state":"Paused"}"#;
pub const RESUMED: &str = r#"{"state":"Resumed"}"#;

// ───────────────────────────── raw Firecracker ─────────────────────────────

/// One HTTP/1.1 request as written on the API socket.
fn request(method: &str, path: &str, body: &str) -> String {
    if body.is_empty() {
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
    } else {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }
}

/// (status, body) once `buf` holds a whole response.
fn response(buf: &[u8]) -> anyhow::Result<Option<(u16, String)>> {
    let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..h]);
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
    if buf.len() < h + 4 + len {
        return Ok(None);
    }
    let body = String::from_utf8_lossy(&buf[h + 4..h + 4 + len]).into_owned();
    Ok(Some((status, body)))
}

/// Firecracker's API on a unix socket, HTTP/1.1 written and parsed by
/// hand, one keep-alive connection: the least a client can do. (Async: on
/// this host a thread blocked in read(2) woke measurably later than a tokio
/// worker parked in epoll, so the blocking variant was not the floor.)
pub struct RawApi {
    s: tokio::net::UnixStream,
    buf: Vec<u8>,
}

impl RawApi {
    /// One request; (status, body).
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
    ) -> anyhow::Result<(u16, String)> {
        self.s
            .write_all(request(method, path, body).as_bytes())
            .await?;
        self.buf.clear();
        let mut chunk = [0u8; 2048];
        loop {
            if let Some(r) = response(&self.buf)? {
                return Ok(r);
            }
            let n = self.s.read(&mut chunk).await?;
            ensure!(n > 0, "the API closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The same client on a blocking socket (thermal-bench's floor).
pub struct BlockingApi {
    s: StdUnixStream,
    buf: Vec<u8>,
}

impl BlockingApi {
    /// One request; an error unless 2xx.
    pub fn call(&mut self, method: &str, path: &str, body: &str) -> anyhow::Result<()> {
        self.s.write_all(request(method, path, body).as_bytes())?;
        self.buf.clear();
        let mut chunk = [0u8; 2048];
        loop {
            if let Some((status, body)) = response(&self.buf)? {
                if !(200..300).contains(&status) {
                    bail!("raw {method} {path}: HTTP {status}: {body}");
                }
                return Ok(());
            }
            let n = self.s.read(&mut chunk)?;
            ensure!(n > 0, "the API closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A `firecracker` process spawned here (not through `VmmProcess`), with the
/// backend's own arguments. SIGKILLed and reaped on drop.
pub struct RawFc {
    child: Option<Child>,
    run_dir: PathBuf,
    api: Option<RawApi>,
}

impl RawFc {
    /// Makes the run dir and removes leftover sockets (before the clock).
    pub fn prepare(run_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(run_dir)?;
        for s in [API_SOCKET, VSOCK_SOCKET] {
            match std::fs::remove_file(run_dir.join(s)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn spawn(
        bin: &Path,
        run_dir: &Path,
        id: &str,
        netns: Option<&str>,
    ) -> anyhow::Result<RawFc> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join(CONSOLE_LOG))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--api-sock")
            .arg(run_dir.join(API_SOCKET))
            .args(["--id", id, "--level", "Warning", "--no-seccomp"])
            .current_dir(run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0);
        if let Some(ns) = netns {
            let f = File::open(format!("/run/netns/{ns}"))
                .with_context(|| format!("opening netns {ns}"))?;
            // SAFETY: between fork and exec only setns(2) (async-signal-safe)
            // on a descriptor opened before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        Ok(RawFc {
            child: Some(child),
            run_dir: run_dir.to_owned(),
            api: None,
        })
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn console(&self) -> PathBuf {
        self.run_dir.join(CONSOLE_LOG)
    }

    pub fn vsock(&self) -> PathBuf {
        self.run_dir.join(VSOCK_SOCKET)
    }

    pub fn tail(&self) -> String {
        bhatti_vmm::console_tail(&self.console(), 1500)
    }

    /// Connects (polling every 100 µs: tokio's timer has 1 ms steps, so a
    /// thread sleep) once the API listens.
    pub fn wait_api(&mut self) -> anyhow::Result<()> {
        let sock = self.run_dir.join(API_SOCKET);
        let deadline = Instant::now() + API_TIMEOUT;
        loop {
            match StdUnixStream::connect(&sock) {
                Ok(s) => {
                    s.set_nonblocking(true)?;
                    self.api = Some(RawApi {
                        s: tokio::net::UnixStream::from_std(s)?,
                        buf: Vec::with_capacity(1024),
                    });
                    return Ok(());
                }
                Err(e) => {
                    ensure!(
                        self.alive(),
                        "raw firecracker exited before its API answered; console:\n{}",
                        self.tail()
                    );
                    ensure!(
                        Instant::now() < deadline,
                        "no API at {}: {e}",
                        sock.display()
                    );
                    std::thread::sleep(RAW_POLL);
                }
            }
        }
    }

    /// A blocking API connection (polling every 100 µs until it listens;
    /// reads time out after 600 s).
    pub fn connect_blocking(&self) -> anyhow::Result<BlockingApi> {
        let deadline = Instant::now() + API_TIMEOUT;
        loop {
            match StdUnixStream::connect(self.run_dir.join(API_SOCKET)) {
                Ok(s) => {
                    s.set_read_timeout(Some(SNAPSHOT_TIMEOUT))?;
                    return Ok(BlockingApi { s, buf: Vec::new() });
                }
                Err(e) => {
                    ensure!(Instant::now() < deadline, "raw firecracker: no API: {e}");
                    std::thread::sleep(RAW_POLL);
                }
            }
        }
    }

    pub async fn call(&mut self, method: &str, path: &str, body: &str) -> anyhow::Result<()> {
        let api = self.api.as_mut().context("no API connection")?;
        let r = tokio::time::timeout(SNAPSHOT_TIMEOUT, api.call(method, path, body))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
        match r {
            Ok((st, _)) if (200..300).contains(&st) => Ok(()),
            Ok((st, b)) => bail!("raw {method} {path}: HTTP {st}: {b}"),
            Err(e) => bail!("raw {method} {path}: {e}; console:\n{}", self.tail()),
        }
    }

    pub async fn put(&mut self, path: &str, body: &str) -> anyhow::Result<()> {
        self.call("PUT", path, body).await
    }

    pub async fn patch_vm(&mut self, state: &str) -> anyhow::Result<()> {
        self.call("PATCH", "/vm", state).await
    }

    /// SIGKILL, reap, remove the sockets.
    pub fn kill(&mut self) {
        self.api = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = RawFc::prepare(&self.run_dir);
    }
}

impl Drop for RawFc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawn, API, `reqs` in order (the last being InstanceStart).
pub async fn raw_boot(
    bin: &Path,
    run_dir: &Path,
    id: &str,
    netns: Option<&str>,
    reqs: &[(String, String)],
) -> anyhow::Result<RawFc> {
    let mut fc = RawFc::spawn(bin, run_dir, id, netns)?;
    fc.wait_api()?;
    for (p, b) in reqs {
        fc.put(p, b).await?;
    }
    Ok(fc)
}

pub fn snapshot_body(kind: &str, f: &SnapshotFiles) -> String {
    json!({
        "snapshot_type": kind,
        "snapshot_path": f.state,
        "mem_file_path": f.memory,
    })
    .to_string()
}

/// The `PUT /snapshot/load` body the backend sends (File memory backend,
/// dirty tracking, resume, vsock moved to `run_dir`), written out here.
pub fn load_body(f: &SnapshotFiles, run_dir: &Path, tap: Option<&str>) -> String {
    let mut b = json!({
        "snapshot_path": f.state,
        "mem_backend": { "backend_type": "File", "backend_path": f.memory },
        "track_dirty_pages": true,
        "resume_vm": true,
        "vsock_override": { "uds_path": run_dir.join(VSOCK_SOCKET) },
    });
    if let Some(tap) = tap {
        b["network_overrides"] = json!([{ "iface_id": "eth0", "host_dev_name": tap }]);
    }
    b.to_string()
}

pub fn remove_files(f: &SnapshotFiles) {
    let _ = std::fs::remove_file(&f.state);
    if let Some(m) = &f.memory {
        let _ = std::fs::remove_file(m);
    }
}

pub fn mem(f: &SnapshotFiles) -> &Path {
    f.memory
        .as_deref()
        .expect("Firecracker snapshots have memory")
}

pub fn files(dir: &Path, name: &str) -> SnapshotFiles {
    SnapshotFiles {
        state: dir.join(format!("{name}.state")),
        memory: Some(dir.join(format!("{name}.mem"))),
    }
}

// ─────────────────────────────── tiny guest ───────────────────────────────

/// Assembles and links the tiny guest into `dir` (binutils).
pub fn build_tiny_guest(dir: &Path) -> anyhow::Result<PathBuf> {
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

pub fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// The counter in a (Full, Diff or merged) memory file.
pub fn counter(mem: &Path) -> anyhow::Result<u64> {
    let mut b = [0u8; 8];
    File::open(mem)?.read_exact_at(&mut b, COUNTER)?;
    Ok(u64::from_le_bytes(b))
}

/// The data extents of a sparse Diff memory file (SEEK_DATA / SEEK_HOLE).
pub fn data_extents(path: &Path) -> anyhow::Result<Vec<(u64, u64)>> {
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

/// The merge floor: the Diff's dirty extents (found before the clock)
/// read and written onto the base at their offsets, then fsync.
pub fn raw_merge(
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
