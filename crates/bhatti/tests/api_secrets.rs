//! Secret values never reach the host's disk in plaintext: a sandbox with a
//! secret goes through create, exec, stop, start (from memory), a fresh
//! boot from its disk, checkpoint and fork; the secret is in the guest's
//! environment every time, and no file under the data dir holds its value
//! (memory snapshots excepted: they hold guest memory, see
//! docs/api.md#secrets).

mod api_support;

use std::path::{Path, PathBuf};

use api_support::*;
use bhatti::store::users::UserCaps;
use bytes::Bytes;
use hyper::Method;
use serde_json::json;

/// Memory snapshot files: guest memory, secrets included (documented).
fn is_guest_memory(p: &Path) -> bool {
    p.components().any(|c| {
        let c = c.as_os_str().to_string_lossy();
        c == "snapshot" || c == "snapshot.old" || c == "snapshot.tmp"
    })
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&p, out),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
}

/// The data regions of a sparse file: (offset, length), via SEEK_DATA and
/// SEEK_HOLE, so a 16 GiB loop image is read only where it has data.
fn data_regions(f: &std::fs::File) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a file descriptor we own; no memory is touched.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        out.push((data as u64, (end - data) as u64));
        pos = end;
    }
    out
}

/// Files (memory snapshots aside) that contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let finder = memchr::memmem::Finder::new(needle);
    let mut files = Vec::new();
    files_under(dir, &mut files);
    let mut hits = Vec::new();
    // The XFS loop image's files are searched through its mount.
    let searched = files
        .into_iter()
        .filter(|f| !is_guest_memory(f) && !f.ends_with("reflink.img"));
    'files: for f in searched {
        let Ok(mut file) = std::fs::File::open(&f) else {
            continue;
        };
        let mut buf = vec![0u8; 4 << 20];
        for (start, len) in data_regions(&file) {
            if file.seek(SeekFrom::Start(start)).is_err() {
                continue;
            }
            let mut left = len;
            // Chunks overlap by the needle's length: nothing straddles.
            let mut carry: Vec<u8> = Vec::new();
            while left > 0 {
                let want = buf.len().min(left as usize);
                let n = match file.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                left -= n as u64;
                carry.extend_from_slice(&buf[..n]);
                if finder.find(&carry).is_some() {
                    hits.push(f.clone());
                    continue 'files;
                }
                let keep = carry.len().saturating_sub(needle.len());
                carry.drain(..keep);
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_never_land_on_the_host_disk() {
    let Some(art) = artifacts("secret_values_never_land_on_the_host_disk") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    init_tracing();
    let env = Env::new(art);
    let key = env.user("alice", UserCaps::default());
    let daemon = Daemon::start(&env, env.config()).await;
    let a = env.client(Some(&key));
    let value = format!("sv-{}", bhatti::engine::random_hex(12));
    a.send(
        Method::PUT,
        "/secrets/API_TOKEN",
        &[],
        Bytes::from(json!({"value": value}).to_string()),
    )
    .await
    .expect(204);
    let seen = |out: String| out.trim().to_owned();

    a.post(
        "/sandboxes",
        json!({"name": "dev", "secrets": ["API_TOKEN"], "env": {"PLAIN": "p"}}),
    )
    .await
    .expect(201);
    let (_, out, _) = a.sh("dev", "echo $API_TOKEN").await;
    assert_eq!(seen(out), value, "after create");

    a.post("/sandboxes/dev/stop", json!({})).await.expect(200);
    a.post("/sandboxes/dev/start", json!({})).await.expect(200);
    let (_, out, _) = a.sh("dev", "echo $API_TOKEN").await;
    assert_eq!(seen(out), value, "after a restore from memory");

    // A fresh boot reads a config drive again: the secret is decrypted
    // for it and the drive rewritten without it once the guest has read it.
    a.post("/sandboxes/dev/stop", json!({})).await.expect(200);
    a.post("/sandboxes/dev/start", json!({"fresh": true}))
        .await
        .expect(200);
    let (_, out, _) = a.sh("dev", "echo $API_TOKEN $PLAIN").await;
    assert_eq!(seen(out), format!("{value} p"), "after a fresh boot");

    a.post("/sandboxes/dev/checkpoint", json!({"name": "cp"}))
        .await
        .expect(201);
    a.post("/snapshots/cp/resume", json!({"name": "fork"}))
        .await
        .expect(201);
    let (_, out, _) = a.sh("fork", "echo $API_TOKEN").await;
    assert_eq!(seen(out), value, "in the fork");
    // Host side: the fork's VMM has its own disk open, never its origin's.
    let id_of = |v: serde_json::Value| v["id"].as_str().expect("id").to_owned();
    let dev_id = id_of(a.get("/sandboxes/dev").await.expect(200));
    let fork_id = id_of(a.get("/sandboxes/fork").await.expect(200));
    let fork_pid = env
        .vmm_pids()
        .into_iter()
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(&fork_id)
        })
        .expect("the fork's VMM");
    let open: Vec<String> = std::fs::read_dir(format!("/proc/{fork_pid}/fd"))
        .expect("fds")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(open.iter().any(|p| p.contains(&fork_id)), "{open:?}");
    assert!(!open.iter().any(|p| p.contains(&dev_id)), "{open:?}");

    let hits = files_containing(&env.data_dir(), value.as_bytes());
    assert!(hits.is_empty(), "the secret is on disk in {hits:?}");
    // The search itself works: a plain env value is found (sandbox.json).
    let plain = files_containing(&env.data_dir(), b"\"PLAIN\"");
    assert!(!plain.is_empty(), "the search finds nothing at all");
    daemon.stop().await;
}
