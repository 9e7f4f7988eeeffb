//! File operations against the real agent in host test mode.
//!
//! The agent's file operations run as the agent's own user (root in a VM
//! and in CI) and hand what they create to `--uid/--gid`. Ownership checks
//! therefore only make sense when the tests run as root; they are skipped
//! (with a message) otherwise.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bhatti_protocol::{ErrorCode, FileKind, ReadFileRequest, WriteFileRequest};
use bytes::Bytes;
use common::*;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn read_req(path: &Path) -> ReadFileRequest {
    ReadFileRequest {
        path: path.to_str().expect("utf-8 path").into(),
        ..Default::default()
    }
}

fn write_req(path: &Path, mode: Option<u32>) -> WriteFileRequest {
    WriteFileRequest {
        path: path.to_str().expect("utf-8 path").into(),
        mode,
        ..Default::default()
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Temp files the agent leaves next to targets while writing.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".bhatti-tmp"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn read_whole_truncated_and_by_lines() {
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;
    let path = agent.path("lines.txt");
    let lines: Vec<String> = (0..100_000).map(|i| format!("line {i}\n")).collect();
    let all = lines.concat();
    std::fs::write(&path, &all).unwrap();
    let total = all.len() as u64;

    let (data, done) = client.read_file_all(read_req(&path)).await.unwrap();
    assert_eq!(data, all.as_bytes());
    assert_eq!(
        (done.bytes, done.total_size, done.truncated),
        (total, total, false)
    );

    let mut req = read_req(&path);
    req.max_bytes = Some(1000);
    let (data, done) = client.read_file_all(req).await.unwrap();
    assert_eq!(data, all.as_bytes()[..1000]);
    assert_eq!(
        (done.bytes, done.total_size, done.truncated),
        (1000, total, true)
    );

    // Lines [50_000, 50_250): exactly those, across chunk boundaries.
    let mut req = read_req(&path);
    req.offset = Some(50_000);
    req.limit = Some(250);
    let (data, done) = client.read_file_all(req).await.unwrap();
    assert_eq!(data, lines[50_000..50_250].concat().as_bytes());
    assert!(done.truncated);
    assert_eq!(done.total_size, total);

    // A limit past the end returns the rest and is not truncated.
    let mut req = read_req(&path);
    req.offset = Some(99_998);
    req.limit = Some(10);
    let (data, done) = client.read_file_all(req).await.unwrap();
    assert_eq!(data, lines[99_998..].concat().as_bytes());
    assert!(!done.truncated);

    // Lines and bytes together: the byte cap wins mid-line.
    let mut req = read_req(&path);
    req.offset = Some(10);
    req.limit = Some(5);
    req.max_bytes = Some(12);
    let (data, done) = client.read_file_all(req).await.unwrap();
    assert_eq!(data, &b"line 10\nline"[..]);
    assert!(done.truncated);

    // Beyond the last line: nothing, not truncated.
    let mut req = read_req(&path);
    req.offset = Some(200_000);
    let (data, done) = client.read_file_all(req).await.unwrap();
    assert!(data.is_empty());
    assert!(!done.truncated);
}

#[tokio::test]
async fn large_write_then_read_round_trip() {
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;
    let path = agent.path("big.bin");
    let data = noise(20 << 20, 0x9e37_79b9_7f4a_7c15);

    let mut w = client.write_file_stream(write_req(&path, None)).unwrap();
    for chunk in data.chunks(1 << 20) {
        w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let done = w.finish().await.unwrap();
    assert_eq!(done.bytes, data.len() as u64);
    assert!(
        std::fs::read(&path).unwrap() == data,
        "file on disk differs"
    );

    let (back, done) = client.read_file_all(read_req(&path)).await.unwrap();
    assert_eq!(done.total_size, data.len() as u64);
    assert!(!done.truncated);
    assert!(back == data, "read back differs");
    assert!(temp_files(agent.dir.path()).is_empty());
}

#[tokio::test]
async fn read_errors() {
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;
    for p in [agent.dir.path(), Path::new("/dev/null")] {
        let err = client.read_file_all(read_req(p)).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotAFile), "{}", p.display());
    }
    let err = client
        .read_file_all(read_req(&agent.path("missing")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    // A FIFO must be refused, not block the agent.
    let fifo = agent.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = client.read_file_all(read_req(&fifo)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotAFile));
    client.ping().await.unwrap();
}

#[tokio::test]
async fn bad_paths_are_bad_requests() {
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;
    for bad in ["", "relative/file", "/tmp/nul\0byte"] {
        let err = client
            .write_file(
                WriteFileRequest {
                    path: bad.into(),
                    mode: None,
                    ..Default::default()
                },
                Bytes::from_static(b"x"),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest), "write {bad:?}");
        let err = client
            .read_file_all(ReadFileRequest {
                path: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest), "read {bad:?}");
        let err = client.stat(bad).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest), "stat {bad:?}");
    }
    let err = client
        .write_file(write_req(&agent.path("x"), Some(0o17777)), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
}

#[tokio::test]
async fn permission_denied_is_reported() {
    // The agent runs file operations as root; creating files in sysfs is
    // something root cannot do either.
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;
    let err = client
        .write_file(
            WriteFileRequest {
                path: "/sys/bhatti-test-file".into(),
                mode: None,
                ..Default::default()
            },
            Bytes::from_static(b"x"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PermissionDenied), "{err}");
}

#[tokio::test]
async fn write_creates_parents_with_owner_and_mode() {
    let agent = TestAgent::start(&["--uid", "1000", "--gid", "1000"]);
    let client = agent.client().await;
    let path = agent.path("a/b/c/file.txt");
    let done = client
        .write_file(write_req(&path, Some(0o600)), Bytes::from_static(b"secret"))
        .await
        .unwrap();
    assert_eq!(done.bytes, 6);
    assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    let md = std::fs::metadata(&path).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o600);

    let default = agent.path("a/default.txt");
    client
        .write_file(write_req(&default, None), Bytes::from_static(b"d"))
        .await
        .unwrap();
    let dmd = std::fs::metadata(&default).unwrap();
    assert_eq!(dmd.permissions().mode() & 0o7777, 0o644);

    if !is_root() {
        eprintln!("not root: skipping ownership checks");
        return;
    }
    for p in [
        path.clone(),
        agent.path("a"),
        agent.path("a/b"),
        agent.path("a/b/c"),
        default,
    ] {
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!((md.uid(), md.gid()), (1000, 1000), "{}", p.display());
    }
    // The temp dir itself existed before: left alone.
    assert_eq!(std::fs::metadata(agent.dir.path()).unwrap().uid(), 0);

    // Writing over a directory is refused.
    let err = client
        .write_file(write_req(&agent.path("a/b"), None), Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotAFile));
}

#[tokio::test]
async fn concurrent_reader_never_sees_a_partial_file() {
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;
    let path = agent.path("swap.bin");
    const SIZE: usize = 512 * 1024;
    const VERSIONS: u8 = 50;
    std::fs::write(&path, vec![0u8; SIZE]).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, path) = (stop.clone(), reads.clone(), path.clone());
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::SeqCst) {
                let data = std::fs::read(&path).map_err(|e| format!("read: {e}"))?;
                if data.len() != SIZE {
                    return Err(format!("saw {} bytes", data.len()));
                }
                let first = data[0];
                if first > VERSIONS || data.iter().any(|&b| b != first) {
                    return Err(format!("saw a mixed file starting with {first}"));
                }
                reads.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    for v in 1..=VERSIONS {
        client
            .write_file(write_req(&path, None), Bytes::from(vec![v; SIZE]))
            .await
            .unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap().unwrap();
    assert!(reads.load(Ordering::SeqCst) > 0, "the reader never read");
    assert_eq!(std::fs::read(&path).unwrap(), vec![VERSIONS; SIZE]);
    assert!(temp_files(agent.dir.path()).is_empty());
}

#[tokio::test]
async fn cancelled_write_leaves_old_content_and_no_temp_file() {
    let agent = TestAgent::start(&[]);
    let dir = agent.dir.path().to_path_buf();
    let path = agent.path("keep.txt");
    std::fs::write(&path, b"old").unwrap();

    // Cancel by dropping the writer, then by dropping the whole connection.
    for disconnect in [false, true] {
        let client = agent.client().await;
        let mut w = client.write_file_stream(write_req(&path, None)).unwrap();
        w.write(Bytes::from(vec![7u8; 1 << 20])).await.unwrap();
        let temp = eventually("the temp file", Duration::from_secs(10), || {
            let t = temp_files(&dir);
            async move { t.into_iter().next() }
        })
        .await;
        if disconnect {
            client.close();
        }
        drop(w);
        eventually("temp file removal", Duration::from_secs(10), || {
            let gone = !dir.join(&temp).exists();
            async move { gone.then_some(()) }
        })
        .await;
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }
    assert!(temp_files(&dir).is_empty());
}

#[tokio::test]
async fn stat_list_mkdir_remove() {
    let agent = TestAgent::start(&["--uid", "1000", "--gid", "1000"]);
    let client = agent.client().await;
    let root = agent.path("tree");
    let root_s = root.to_str().unwrap().to_owned();

    client.mkdir(&format!("{root_s}/x/y/z")).await.unwrap();
    // mkdir -p of an existing directory is fine.
    client.mkdir(&format!("{root_s}/x/y")).await.unwrap();
    assert!(agent.path("tree/x/y/z").is_dir());
    if is_root() {
        assert_eq!(
            std::fs::metadata(agent.path("tree/x/y/z")).unwrap().uid(),
            1000
        );
    }
    for name in ["e", "c", "a", "d", "b"] {
        std::fs::write(root.join(name), name.repeat(3)).unwrap();
    }
    std::os::unix::fs::symlink("a", root.join("link")).unwrap();
    // mkdir over a file is refused.
    let err = client.mkdir(&format!("{root_s}/a")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyExists));

    let st = client.stat(&format!("{root_s}/c")).await.unwrap();
    assert_eq!(
        (st.name.as_str(), st.kind, st.size),
        ("c", FileKind::File, 3)
    );
    assert!(st.mtime_ms > 0);
    let st = client.stat(&format!("{root_s}/link")).await.unwrap();
    assert_eq!(st.kind, FileKind::Symlink);
    let st = client.stat(&root_s).await.unwrap();
    assert_eq!(st.kind, FileKind::Dir);
    assert_eq!(client.stat("/").await.unwrap().name, "/");
    let err = client.stat(&format!("{root_s}/nope")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    let all = client.list(&root_s, None).await.unwrap();
    let names: Vec<_> = all.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d", "e", "link", "x"]);
    assert!(!all.truncated);
    let some = client.list(&root_s, Some(3)).await.unwrap();
    let names: Vec<_> = some.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(some.truncated);
    let err = client.list(&format!("{root_s}/a"), None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotADirectory));

    // Non-recursive remove of a non-empty directory is refused.
    let err = client
        .remove(&format!("{root_s}/x"), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    client
        .remove(&format!("{root_s}/x/y/z"), false)
        .await
        .unwrap();
    assert!(!agent.path("tree/x/y/z").exists());
    client.remove(&format!("{root_s}/a"), false).await.unwrap();
    assert!(!agent.path("tree/a").exists());
    // The link's target is gone; removing the link still works.
    client
        .remove(&format!("{root_s}/link"), false)
        .await
        .unwrap();
    client.remove(&root_s, true).await.unwrap();
    assert!(!root.exists());
    let err = client.remove(&root_s, true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    for slash in ["/", "//", "/.", "/tmp/.."] {
        let err = client.remove(slash, true).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{slash}");
    }
    assert!(Path::new("/tmp").is_dir());
}
