//! Volume backups against a real S3 server (moto on 127.0.0.1, checking
//! SigV4 signatures; see bhatti_testkit::s3): back up an ext4 image,
//! overwrite it, restore, same sha256; restore into a new file; retention;
//! wrong credentials and a missing bucket give clear errors and change
//! nothing; a failed or cancelled upload leaves no object and no pending
//! multipart upload.
//!
//! Needs `python3` with `moto[server]` (scripts/install-deps.sh).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bhatti::backups::{new_id, BackupError, BackupStore, Target};
use bhatti::config::BackupsConfig;
use bhatti_testkit::s3::S3Server;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const MIB: usize = 1 << 20;

/// The server, or `None` after one SKIP line.
fn server(test: &str, bucket: &str) -> Option<S3Server> {
    if let Some(why) = bhatti_testkit::s3::missing() {
        bhatti_testkit::skip(test, &format!("no {why}"));
        return None;
    }
    Some(S3Server::start(bucket))
}

fn config(s: &S3Server) -> BackupsConfig {
    BackupsConfig {
        endpoint: s.endpoint.clone(),
        bucket: s.bucket.clone(),
        access_key_id: s.access_key_id.clone(),
        secret_access_key: s.secret_access_key.clone(),
        prefix: "test/backups".into(),
        part_size_mb: 5,
        ..Default::default()
    }
}

fn client(c: &BackupsConfig) -> BackupStore {
    BackupStore::from_config(c).unwrap().expect("backups on")
}

fn target(vol: &str) -> Target {
    Target {
        owner: "usr-1".into(),
        volume_name: vol.into(),
        volume_id: format!("vol-{vol}"),
    }
}

fn sha(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return hex::encode(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// Random bytes.
fn noise(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::fill(&mut v[..]);
    v
}

/// A 64 MiB ext4 image (mkfs.ext4 when installed) with 24 MiB of random
/// data and some text written into it: compressible and not.
fn volume_image(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(64 * MIB as u64).unwrap();
    drop(f);
    let _ = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status();
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(8 * MIB as u64)).unwrap();
    f.write_all(&noise(24 * MIB)).unwrap();
    f.seek(std::io::SeekFrom::Start(40 * MIB as u64)).unwrap();
    for i in 0..100_000 {
        writeln!(f, "line {i} of a log the volume keeps").unwrap();
    }
}

/// Files in `dir` (the restore's temp files must be gone).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_overwrite_restore_same_checksum() {
    let Some(s3) = server("backup_overwrite_restore_same_checksum", "vols-a") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The secret from a file this time.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{}\n", s3.secret_access_key)).unwrap();
    let mut c = config(&s3);
    c.secret_access_key = String::new();
    c.secret_access_key_file = secret.to_string_lossy().into_owned();
    c.compression_threads = 2;
    let store = client(&c);
    store
        .check()
        .await
        .expect("credentials and bucket are fine");

    let vol = dir.path().join("data.ext4");
    volume_image(&vol);
    let before = sha(&vol);
    let id = new_id();
    let info = store
        .backup(&target("data"), &id, &vol, &CancellationToken::new())
        .await
        .expect("backup");
    assert_eq!(info.id, id);
    assert_eq!(info.sha256, before);
    assert_eq!(info.raw_bytes, 64 * MIB as u64);
    assert!(
        info.stored_bytes < info.raw_bytes / 2 && info.stored_bytes > 24 * MIB as u64,
        "zstd: {} of {} bytes",
        info.stored_bytes,
        info.raw_bytes
    );
    assert_eq!(
        info.object_key,
        format!("test/backups/usr-1/data/{id}.ext4.zst")
    );
    assert_eq!(
        store.list("usr-1", "data").await.unwrap(),
        vec![info.clone()]
    );
    assert_eq!(store.get("usr-1", "data", &id).await.unwrap(), info);

    // Overwrite the volume, then restore it in place.
    std::fs::write(&vol, noise(3 * MIB)).unwrap();
    assert_ne!(sha(&vol), before);
    let r = store.restore(&info, &vol).await.expect("restore");
    assert_eq!(
        (r.raw_bytes, r.sha256.as_str()),
        (info.raw_bytes, before.as_str())
    );
    assert_eq!(sha(&vol), before);
    // Into a new volume's file too.
    let copy = dir.path().join("copy.ext4");
    store
        .restore(&info, &copy)
        .await
        .expect("restore into a new file");
    assert_eq!(sha(&copy), before);
    assert_eq!(names(dir.path()), ["copy.ext4", "data.ext4", "secret"]);

    // A manifest that does not match the data: refused, file untouched.
    std::fs::write(&copy, b"keep me").unwrap();
    let mut wrong = info.clone();
    wrong.sha256 = "00".repeat(32);
    let e = store.restore(&wrong, &copy).await.unwrap_err();
    assert!(matches!(e, BackupError::Corrupt { .. }), "{e}");
    assert_eq!(std::fs::read(&copy).unwrap(), b"keep me");
    assert_eq!(names(dir.path()), ["copy.ext4", "data.ext4", "secret"]);

    store.delete("usr-1", "data", &id).await.unwrap();
    assert!(store.list("usr-1", "data").await.unwrap().is_empty());
    let e = store.get("usr-1", "data", &id).await.unwrap_err();
    assert!(matches!(e, BackupError::NotFound(_)), "{e}");
    let e = store.restore(&info, &copy).await.unwrap_err();
    assert!(matches!(e, BackupError::NotFound(_)), "{e}");
    assert!(s3.pending_uploads().is_empty());
}

/// Backs up `n` small files of one volume; returns them oldest first.
async fn some_backups(
    store: &BackupStore,
    dir: &Path,
    vol: &str,
    n: usize,
) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for i in 0..n {
        let p = dir.join(format!("{vol}-{i}"));
        std::fs::write(&p, noise(MIB + i)).unwrap();
        let id = new_id();
        store
            .backup(&target(vol), &id, &p, &CancellationToken::new())
            .await
            .unwrap();
        out.push((id, p));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_n() {
    let Some(s3) = server("retention_keeps_the_newest_n", "vols-b") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = client(&config(&s3));
    let made = some_backups(&store, dir.path(), "data", 5).await;
    // Another volume's backups are not touched.
    let other = some_backups(&store, dir.path(), "logs", 1).await;
    let deleted = store.keep_last("usr-1", "data", 2).await.unwrap();
    let mut deleted: Vec<String> = deleted.into_iter().map(|b| b.id).collect();
    deleted.sort();
    let ids: Vec<String> = made.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(deleted, ids[..3]);
    let kept: Vec<String> = store
        .list("usr-1", "data")
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(kept, [ids[4].clone(), ids[3].clone()], "newest first");
    // The data objects of the deleted ones are gone too.
    for (id, p) in &made[..3] {
        let info = bhatti::backups::BackupInfo {
            id: id.clone(),
            ..store.get("usr-1", "data", &ids[4]).await.unwrap()
        };
        let e = store.restore(&info, p).await.unwrap_err();
        assert!(matches!(e, BackupError::NotFound(_)), "{e}");
    }
    assert_eq!(store.list("usr-1", "logs").await.unwrap()[0].id, other[0].0);
    // Idempotent.
    assert!(store
        .keep_last("usr-1", "data", 2)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_a_clear_error_and_change_nothing() {
    let Some(s3) = server(
        "wrong_credentials_are_a_clear_error_and_change_nothing",
        "vols-c",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let good = client(&config(&s3));
    let made = some_backups(&good, dir.path(), "data", 3).await;
    let info = good.get("usr-1", "data", &made[0].0).await.unwrap();
    let local = dir.path().join("local.ext4");
    std::fs::write(&local, b"current contents").unwrap();

    let wrong_secret = BackupsConfig {
        secret_access_key: "not-the-secret".into(),
        ..config(&s3)
    };
    let wrong_key = BackupsConfig {
        access_key_id: "AKIANOSUCHKEY0000000".into(),
        ..config(&s3)
    };
    for c in [wrong_secret, wrong_key] {
        let bad = client(&c);
        let check = |e: BackupError| {
            assert!(matches!(e, BackupError::Credentials(_)), "{e:?}");
            assert!(e.to_string().contains("refused the credentials"), "{e}");
        };
        check(bad.check().await.unwrap_err());
        check(bad.list("usr-1", "data").await.unwrap_err());
        check(bad.keep_last("usr-1", "data", 1).await.unwrap_err());
        check(bad.delete("usr-1", "data", &made[1].0).await.unwrap_err());
        check(bad.restore(&info, &local).await.unwrap_err());
        check(
            bad.backup(
                &target("data"),
                &new_id(),
                &made[2].1,
                &CancellationToken::new(),
            )
            .await
            .unwrap_err(),
        );
    }
    // Nothing was deleted, overwritten or added.
    assert_eq!(std::fs::read(&local).unwrap(), b"current contents");
    assert_eq!(names(dir.path()).len(), 4, "no temp files");
    let mut ids: Vec<String> = good
        .list("usr-1", "data")
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    ids.sort();
    assert_eq!(ids, made.iter().map(|m| m.0.clone()).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bucket_is_a_clear_error() {
    let Some(s3) = server("missing_bucket_is_a_clear_error", "vols-d") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = client(&BackupsConfig {
        bucket: "no-such-bucket".into(),
        ..config(&s3)
    });
    let f = dir.path().join("v");
    std::fs::write(&f, noise(MIB)).unwrap();
    let errs = [
        store.check().await.unwrap_err(),
        store.list("usr-1", "data").await.unwrap_err(),
        store
            .backup(&target("data"), &new_id(), &f, &CancellationToken::new())
            .await
            .unwrap_err(),
    ];
    for e in errs {
        assert!(matches!(e, BackupError::NoBucket { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("bucket 'no-such-bucket' does not exist"),
            "{e}"
        );
    }
}

/// Yields 1 MiB blocks of noise; after `fail_after` bytes it either fails
/// or fires `cancel` (and then keeps yielding).
struct Flaky {
    given: usize,
    fail_after: usize,
    cancel: Option<CancellationToken>,
}

impl Read for Flaky {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.given >= self.fail_after {
            match &self.cancel {
                None => return Err(std::io::Error::other("disk went away")),
                Some(c) => c.cancel(),
            }
        }
        let n = buf.len().min(MIB);
        rand::fill(&mut buf[..n]);
        self.given += n;
        Ok(n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_or_cancelled_upload_leaves_nothing() {
    let Some(s3) = server("failed_or_cancelled_upload_leaves_nothing", "vols-e") else {
        return;
    };
    let store = client(&config(&s3));
    // Fails after 24 MiB: several 5 MiB parts were uploaded already.
    let id = new_id();
    let reader = Flaky {
        given: 0,
        fail_after: 24 * MIB,
        cancel: None,
    };
    let e = store
        .backup_reader(&target("data"), &id, reader, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("disk went away"), "{e}");
    // Cancelled after 24 MiB; the reader would go on for ever.
    let cancel = CancellationToken::new();
    let reader = Flaky {
        given: 0,
        fail_after: 24 * MIB,
        cancel: Some(cancel.clone()),
    };
    let id2 = new_id();
    let e = store
        .backup_reader(&target("data"), &id2, reader, &cancel)
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::Cancelled), "{e}");

    assert!(store.list("usr-1", "data").await.unwrap().is_empty());
    assert_eq!(
        s3.pending_uploads(),
        Vec::<String>::new(),
        "uploads aborted"
    );
    // And no data object either.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("v");
    let ok = some_backups(&store, dir.path(), "data", 1).await;
    for gone in [id, id2] {
        let info = bhatti::backups::BackupInfo {
            id: gone,
            ..store.get("usr-1", "data", &ok[0].0).await.unwrap()
        };
        let e = store.restore(&info, &f).await.unwrap_err();
        assert!(matches!(e, BackupError::NotFound(_)), "{e}");
    }
    assert!(!f.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_keeps_rows_and_bucket_in_step() {
    use bhatti::backups::{Backups, ServiceError, Source};
    use bhatti::store::backups::BackupState;
    use bhatti::store::{users, Store, StoreError};

    let Some(s3) = server("service_keeps_rows_and_bucket_in_step", "vols-f") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("bhatti.db")).unwrap();
    let owner = store
        .with(|c| {
            users::insert(
                c,
                &users::NewUser {
                    name: "alice".into(),
                    key_sha256: "0".repeat(64),
                    caps: users::UserCaps::default(),
                },
            )
        })
        .unwrap()
        .id;
    let t = Target {
        owner: owner.clone(),
        volume_name: "data".into(),
        volume_id: "vol-1".into(),
    };
    // Off without [backups]: a clear error, nothing recorded.
    let off = Backups::new(store.clone(), None);
    let f = dir.path().join("data.ext4");
    std::fs::write(&f, noise(3 * MIB)).unwrap();
    let src = |remove_after| Source {
        path: f.clone(),
        remove_after,
    };
    let e = off.start(t.clone(), src(false)).await.unwrap_err();
    assert!(
        matches!(e, ServiceError::Backup(BackupError::NotConfigured)),
        "{e}"
    );
    assert!(off.list(&owner, "data").await.unwrap().is_empty());

    let b = Backups::new(store.clone(), Some(client(&config(&s3))));
    let first = b.start(t.clone(), src(false)).await.unwrap();
    assert_eq!(first.state, BackupState::Running);
    // One running backup per volume.
    match b.start(t.clone(), src(false)).await {
        Err(ServiceError::Store(StoreError::Conflict(_))) => {}
        // The first finished already: it must be done by now.
        Ok(second) => {
            let rows = b.list(&owner, "data").await.unwrap();
            assert!(rows.iter().any(|r| r.id == second.id));
        }
        Err(e) => panic!("{e}"),
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let done = loop {
        let rows = b.list(&owner, "data").await.unwrap();
        if rows.iter().all(|r| r.state != BackupState::Running) {
            break rows;
        }
        assert!(std::time::Instant::now() < deadline, "backup did not end");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let want = sha(&f);
    assert!(
        done.iter()
            .all(|r| r.state == BackupState::Done && r.sha256 == want),
        "{done:?}"
    );
    // A scheduled-style run waits for the end and removes its temp copy.
    let copy = dir.path().join("copy.ext4");
    std::fs::copy(&f, &copy).unwrap();
    let third = b
        .run(
            t.clone(),
            Source {
                path: copy.clone(),
                remove_after: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(third.state, BackupState::Done);
    assert!(!copy.exists());
    // Retention drops bucket objects and rows alike.
    let gone = b.keep_last(&owner, "data", 1).await.unwrap();
    assert_eq!(gone.len(), done.len());
    let rows = b.list(&owner, "data").await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [third.id.as_str()]
    );
    assert_eq!(b.list_remote(&owner, "data").await.unwrap().len(), 1);
    // Restore into the volume after it changed.
    std::fs::write(&f, b"changed").unwrap();
    b.restore(&owner, "data", &third.id, &f).await.unwrap();
    assert_eq!(sha(&f), want);
    // Schedules are checked.
    let e = b.set_schedule(&t, "not cron", 3).await.unwrap_err();
    assert!(e.to_string().contains("invalid cron"), "{e}");
    let s = b.set_schedule(&t, "0 3 * * *", 3).await.unwrap();
    assert!(s.next_at > bhatti::store::now_ms());
    b.delete(&owner, "data", &third.id).await.unwrap();
    assert!(b.list(&owner, "data").await.unwrap().is_empty());
    assert!(b.list_remote(&owner, "data").await.unwrap().is_empty());
    b.shutdown().await;
}
