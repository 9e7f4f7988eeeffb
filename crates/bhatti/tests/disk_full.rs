//! A full data disk: the daemon's data dir is a small loop-mounted ext4
//! (sandbox disks as sparse copies: no reflink on ext4), filled with a
//! fallocated file. Create, checkpoint and stop then fail with a clear 507
//! (`no space left on the data disk: …`) and change nothing: no half-made
//! sandbox or checkpoint, the running sandbox still answers, the stored
//! data (files, a checkpoint, the SQLite db) intact. Once the filler is
//! gone, create, checkpoint, stop, start and resume all work again.
//!
//! The loop device and mount are undone on drop, even when the test fails.

mod api_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use api_support::*;
use bhatti::config::DiskStrategy;
use bhatti::store::users::UserCaps;
use serde_json::{json, Value};

/// Data disk size: one sandbox (a ~250 MB sparse root disk copy, 256 MiB
/// of memory) and one checkpoint of it fit, with room to spare.
const DISK_MB: u64 = 1536;

/// An ext4 image on a loop device, mounted at `mnt`.
struct LoopDisk {
    mnt: PathBuf,
    dev: String,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl LoopDisk {
    fn new(img: &Path, mnt: &Path, mb: u64) -> LoopDisk {
        let f = std::fs::File::create(img).expect("image");
        f.set_len(mb << 20).expect("size the image");
        // -m 0: no blocks reserved for root (the daemon runs as root).
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(img))
        .expect("mkfs");
        let dev =
            run(Command::new("losetup").args(["--find", "--show"]).arg(img)).expect("losetup");
        let disk = LoopDisk {
            mnt: mnt.to_owned(),
            dev,
        };
        std::fs::create_dir_all(mnt).expect("mount point");
        run(Command::new("mount").arg(&disk.dev).arg(mnt)).expect("mount");
        disk
    }

    /// Bytes free.
    fn free(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.mnt).expect("statvfs");
        s.blocks_free() as u64 * s.fragment_size() as u64
    }

    /// Fills the disk with one fallocated file `name` but `leave` bytes.
    fn fill(&self, leave: u64, name: &str) -> PathBuf {
        let p = self.mnt.join(name);
        let mut size = self.free().saturating_sub(leave);
        // ext4 refuses the last blocks it keeps back: ask for less until
        // it gives.
        while size > 0 {
            let ok = Command::new("fallocate")
                .args(["-l", &size.to_string()])
                .arg(&p)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return p;
            }
            size = size.saturating_sub(1 << 20);
        }
        p
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        // VMMs and their files first, then the mount and the device.
        bhatti_testkit::clean_data_dir(&self.mnt);
        for _ in 0..50 {
            if run(Command::new("umount").arg(&self.mnt)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = run(Command::new("umount").arg("-l").arg(&self.mnt));
        let _ = run(Command::new("losetup").arg("-d").arg(&self.dev));
    }
}

fn names(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The data dir's contents that must not change when an operation fails.
fn layout(d: &Path) -> Vec<String> {
    ["sandboxes", "run", "checkpoints"]
        .iter()
        .flat_map(|s| {
            entries(&d.join(s))
                .into_iter()
                .map(move |e| format!("{s}/{e}"))
        })
        .collect()
}

/// A 507 whose `{"error"}` says the disk is full (else the daemon's log).
#[track_caller]
fn full(env: &Env, r: &Resp, what: &str) {
    if r.status != 507 {
        let log = std::fs::read_to_string(env.dir.path().join("daemon-1.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        println!(
            "daemon log (last lines, newest first):\n{}",
            tail.join("\n")
        );
    }
    println!(
        "disk_full: {what}: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let e = r.expect_err(507);
    assert!(e.contains("no space left"), "{what}: {e}");
}

fn integrity(db: &Path) -> String {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open db");
    c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
        .expect("integrity_check")
}

async fn answers(c: &Client, sb: &str) {
    let r = tokio::time::timeout(Duration::from_secs(60), c.sh(sb, "echo ok"))
        .await
        .unwrap_or_else(|_| panic!("{sb} did not answer an exec within 60 s"));
    assert_eq!((r.0, r.1.as_str()), (0, "ok\n"), "{sb}: {}", r.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_data_disk_fails_cleanly_then_recovers() {
    let Some(art) = artifacts("full_data_disk_fails_cleanly_then_recovers") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    let disk = LoopDisk::new(&env.dir.path().join("data.img"), &env.data_dir(), DISK_MB);
    let mut cfg = env.config();
    cfg.vm.disk_strategy = DiskStrategy::Copy;
    env.write_config(&cfg);
    let key = env.user("alice", UserCaps::default());
    let c = env.client(Some(&key));
    let mut daemon = Proc::spawn(&env, 1);
    ready(&env, &mut daemon, 1).await;
    let data = env.data_dir();

    let before = disk.free();
    c.post("/sandboxes", json!({"name": "a", "memory_mb": 256}))
        .await
        .expect(201);
    c.put("/sandboxes/a/files?path=/home/lohar/keep.txt", "kept\n")
        .await
        .expect(200);
    assert_eq!(c.sh("a", "sync && echo synced").await.1, "synced\n");
    let one = disk.free();
    c.post("/sandboxes/a/checkpoint", json!({"name": "cp1"}))
        .await
        .expect(201);
    println!(
        "disk_full: a sandbox costs {} MiB of the data disk, its checkpoint {} MiB",
        (before - one) >> 20,
        (one - disk.free()) >> 20
    );

    // Phase 1: room for the database, not for a disk or a memory image
    // (ext4 keeps ~16 MiB back from ordinary writes; 32 MiB more).
    let filler = disk.fill(48 << 20, "filler");
    println!("disk_full: filled; {} MiB free", disk.free() >> 20);
    let stored = layout(&data);

    // Create: 507, and no trace of the sandbox.
    let create_b = || {
        c.try_send(
            hyper::Method::POST,
            "/sandboxes",
            &[("content-type", "application/json")],
            bytes::Bytes::from(json!({"name": "b", "memory_mb": 256}).to_string()),
        )
    };
    full(
        &env,
        &create_b().await.expect("create"),
        "create (disk copy)",
    );
    let list = c.get("/sandboxes").await.expect(200);
    assert_eq!(names(&list, "sandboxes"), ["a"], "{list}");
    assert_eq!(layout(&data), stored, "the failed create left files");

    // Checkpoint: 507, no half-written checkpoint; the sandbox runs on.
    let r = c
        .post("/sandboxes/a/checkpoint", json!({"name": "cp2"}))
        .await;
    full(&env, &r, "checkpoint");
    let snaps = c.get("/snapshots").await.expect(200);
    assert!(!snaps.to_string().contains("cp2"), "{snaps}");
    assert_eq!(layout(&data), stored, "the failed checkpoint left files");
    answers(&c, "a").await;

    // Stop (memory to disk): 507; still running and usable.
    let r = c.post("/sandboxes/a/stop", json!({})).await;
    full(&env, &r, "stop");
    let v = c.get("/sandboxes/a").await.expect(200);
    assert_eq!(
        (v["status"].as_str(), v["thermal"].as_str()),
        (Some("running"), Some("hot")),
        "{v}"
    );
    answers(&c, "a").await;
    assert_eq!(layout(&data), stored, "the failed stop left files");

    assert_eq!(c.sh("a", "cat /home/lohar/keep.txt").await.1, "kept\n");

    // A write inside the guest needs new blocks of its sparse disk: QEMU
    // pauses the guest on ENOSPC (it stalls, nothing fails or is lost)
    // and the engine continues it, so it completes once space is freed.
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            c.sh(
                "a",
                "dd if=/dev/urandom of=/home/lohar/big bs=1M count=64 conv=fsync 2>/dev/null; echo rc=$?; sha256sum /home/lohar/big | cut -c1-64",
            )
            .await
        })
    };
    eventually(
        "the guest write stalls on the full disk",
        Duration::from_secs(120),
        || async {
            // Space taken by the guest's writes until the disk is out of it.
            (disk.free() < (17 << 20)).then_some(())
        },
    )
    .await;
    assert!(
        !writer.is_finished(),
        "the guest write finished on a full disk"
    );
    println!(
        "disk_full: the guest write stalls ({} KiB free)",
        disk.free() >> 10
    );

    // Now not even the database can grow: still a clean 507.
    full(
        &env,
        &create_b().await.expect("create"),
        "create (disk full)",
    );
    let list = c.get("/sandboxes").await.expect(200);
    assert_eq!(names(&list, "sandboxes"), ["a"], "{list}");
    assert_eq!(layout(&data), stored, "the failed create left files");
    // Nothing stored was harmed.
    assert_eq!(integrity(&data.join("bhatti.db")), "ok");

    // Space again: the stalled write completes, everything works.
    std::fs::remove_file(&filler).expect("remove the filler");
    let (code, out, err) = tokio::time::timeout(Duration::from_secs(180), writer)
        .await
        .expect("the stalled guest write completes once space is freed")
        .expect("writer");
    assert_eq!((code, out.lines().next()), (0, Some("rc=0")), "{out} {err}");
    let sum = out.lines().nth(1).unwrap_or_default().to_owned();
    assert_eq!(
        c.sh("a", "sync; sha256sum /home/lohar/big | cut -c1-64")
            .await
            .1
            .trim(),
        sum
    );
    c.post("/sandboxes", json!({"name": "b", "memory_mb": 256}))
        .await
        .expect(201);
    answers(&c, "b").await;
    c.delete("/sandboxes/b").await.expect(204);
    c.post("/sandboxes/a/checkpoint", json!({"name": "cp2"}))
        .await
        .expect(201);
    c.post("/sandboxes/a/stop", json!({})).await.expect(200);
    let v = c.post("/sandboxes/a/start", json!({})).await.expect(200);
    assert_eq!(v["status"], "running", "{v}");
    assert_eq!(c.sh("a", "cat /home/lohar/keep.txt").await.1, "kept\n");
    // The checkpoint taken before the disk filled resumes whole.
    c.post("/snapshots/cp1/resume", json!({"name": "r"}))
        .await
        .expect(201);
    assert_eq!(c.sh("r", "cat /home/lohar/keep.txt").await.1, "kept\n");
    for sb in ["a", "r"] {
        c.delete(&format!("/sandboxes/{sb}")).await.expect(204);
    }
    assert_eq!(integrity(&data.join("bhatti.db")), "ok");
    drop(daemon);
}
