//! Pulling from a real registry: Debian's `docker-registry` on 127.0.0.1,
//! images built without Docker by `umoci` and pushed by `skopeo`. Then the
//! layers are unpacked and the tree is made into an ext4 disk with lohar.
//!
//! Needs `docker-registry umoci skopeo apache2-utils e2fsprogs`
//! (scripts/install-deps.sh); without them each test prints one SKIP line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bhatti_engine::image::{self, ImageError, PullAuth};
use bhatti_testkit::registry::{missing_tool, run, Registry};
use tokio_util::sync::CancellationToken;

/// Builds a two-layer image in an OCI layout with umoci and pushes it as
/// `<registry>/test:v1`. Layer 1: /etc/hello, /etc/gone, /app/data,
/// /bin/tool (0755, a hard link /bin/tool2, a symlink /bin/t). Layer 2
/// deletes /etc/gone and adds /etc/added. Config: env, workdir, user.
fn build_and_push(registry: &Registry, creds: Option<&str>) -> String {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let image = format!("{}:v1", layout.display());
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));

    let bundle = work.path().join("b1");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    for d in ["etc", "app", "bin"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::write(rootfs.join("etc/hello"), "hello from layer 1\n").unwrap();
    std::fs::write(rootfs.join("etc/gone"), "deleted in layer 2\n").unwrap();
    std::fs::write(rootfs.join("app/data"), vec![7u8; 300_000]).unwrap();
    std::fs::write(rootfs.join("bin/tool"), "#!/bin/sh\necho tool\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        rootfs.join("bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::hard_link(rootfs.join("bin/tool"), rootfs.join("bin/tool2")).unwrap();
    std::os::unix::fs::symlink("tool", rootfs.join("bin/t")).unwrap();
    std::os::unix::fs::chown(rootfs.join("app/data"), Some(1000), Some(1000)).unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));

    let bundle = work.path().join("b2");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    std::fs::remove_file(rootfs.join("etc/gone")).unwrap();
    std::fs::write(rootfs.join("etc/added"), "added in layer 2\n").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));

    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "GREETING=hello world",
        "--config.env",
        "PATH=/bin:/usr/bin",
        "--config.workingdir",
        "/app",
        "--config.user",
        "1000:1000",
        "--config.cmd",
        "/bin/tool",
    ]));

    let reference = format!("{}/test:v1", registry.addr);
    let mut push = Command::new("skopeo");
    push.args(["copy", "--dest-tls-verify=false"]);
    if let Some(c) = creds {
        push.args(["--dest-creds", c]);
    }
    push.arg(format!("oci:{image}"))
        .arg(format!("docker://{reference}"));
    run(&mut push);
    reference
}

/// Every entry under `dir`, for "nothing left behind" checks.
fn entries(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(r) => r.map(|e| e.unwrap().path()).collect(),
        Err(_) => vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_unpack_and_build_a_disk() {
    if let Some(tool) = missing_tool() {
        bhatti_testkit::skip(
            "oci_pull::pull_unpack_and_build_a_disk",
            &format!("{tool} is not installed"),
        );
        return;
    }
    let registry = Registry::start(None);
    let reference = build_and_push(&registry, None);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let none = CancellationToken::new();

    // Cancel at the first progress report: an error, and nothing left.
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    let err = image::pull(
        &reference,
        &PullAuth::Anonymous,
        &cache,
        &move |_| c2.cancel(),
        &cancel,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ImageError::Cancelled), "{err}");
    assert_eq!(
        entries(&cache),
        Vec::<PathBuf>::new(),
        "a cancelled pull left files"
    );

    // A real pull, with progress up to the total.
    let last = AtomicU64::new(0);
    let total = AtomicU64::new(0);
    let pulled = image::pull(
        &reference,
        &PullAuth::Anonymous,
        &cache,
        &|p| {
            last.store(p.done, Ordering::SeqCst);
            total.store(p.total, Ordering::SeqCst);
        },
        &none,
    )
    .await
    .unwrap();
    assert!(!pulled.cached);
    assert_eq!(pulled.layers.len(), 2);
    assert!(pulled.manifest_digest.starts_with("sha256:"));
    assert!(total.load(Ordering::SeqCst) > 0);
    assert_eq!(last.load(Ordering::SeqCst), total.load(Ordering::SeqCst));
    assert!(
        pulled
            .config
            .env
            .contains(&"GREETING=hello world".to_owned()),
        "{:?}",
        pulled.config
    );
    assert_eq!(pulled.config.working_dir.as_deref(), Some("/app"));
    assert_eq!(pulled.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(pulled.config.cmd, ["/bin/tool"]);
    assert_eq!(entries(&cache).len(), 1, "{:?}", entries(&cache));

    // The same ref again: at once, from the cache, no bytes downloaded.
    let calls = AtomicUsize::new(0);
    let again = image::pull(
        &reference,
        &PullAuth::Anonymous,
        &cache,
        &|_| {
            calls.fetch_add(1, Ordering::SeqCst);
        },
        &none,
    )
    .await
    .unwrap();
    assert!(again.cached);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(again.manifest_digest, pulled.manifest_digest);
    assert_eq!(again.layers, pulled.layers);

    // Unpack: layer 1's files, layer 2's change, the deleted file absent.
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    image::unpack_pulled(&pulled, &root).await.unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hello")).unwrap(),
        "hello from layer 1\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/added")).unwrap(),
        "added in layer 2\n"
    );
    assert!(!root.join("etc/gone").exists(), "whiteout not applied");
    let data = std::fs::metadata(root.join("app/data")).unwrap();
    assert_eq!((data.len(), data.uid(), data.gid()), (300_000, 1000, 1000));
    let tool = std::fs::metadata(root.join("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o777, 0o755);
    assert_eq!(
        tool.ino(),
        std::fs::metadata(root.join("bin/tool2")).unwrap().ino()
    );
    assert_eq!(
        std::fs::read_link(root.join("bin/t")).unwrap(),
        Path::new("tool")
    );

    // Disk: lohar in, ext4 out, readable with debugfs.
    let lohar = work.path().join("lohar");
    std::fs::write(&lohar, b"\x7fELF not really lohar").unwrap();
    image::ext4::inject_lohar(&root, &lohar).unwrap();
    let disk = work.path().join("rootfs.ext4");
    let size = image::ext4::build_ext4(&root, &disk).await.unwrap();
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), size);
    assert!(size >= image::ext4::HEADROOM_BYTES);
    let cat = |p: &str| {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat {p}")])
            .arg(&disk)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(cat("/etc/hello"), "hello from layer 1\n");
    assert_eq!(cat("/usr/local/bin/lohar"), "\x7fELF not really lohar");
    let stat = Command::new("debugfs")
        .args(["-R", "stat /etc/gone"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&stat.stderr).contains("not found"),
        "{stat:?}"
    );
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // Refs that cannot be pulled say why.
    let err = image::pull("no such:ref", &PullAuth::Anonymous, &cache, &|_| {}, &none)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::BadReference { .. }), "{err}");
    let missing = format!("{}/test:nope", registry.addr);
    let err = image::pull(&missing, &PullAuth::Anonymous, &cache, &|_| {}, &none)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("MANIFEST_UNKNOWN") || msg.contains("not found") || msg.contains("404"),
        "{msg}"
    );
    assert_eq!(
        entries(&cache).len(),
        1,
        "a failed pull left files: {:?}",
        entries(&cache)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_with_basic_auth() {
    if let Some(tool) = missing_tool() {
        bhatti_testkit::skip(
            "oci_pull::a_registry_with_basic_auth",
            &format!("{tool} is not installed"),
        );
        return;
    }
    let registry = Registry::start(Some(("bhatti", "s3cret")));
    let reference = build_and_push(&registry, Some("bhatti:s3cret"));
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let none = CancellationToken::new();

    let err = image::pull(&reference, &PullAuth::Anonymous, &cache, &|_| {}, &none)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("401"), "{err}");

    let wrong = PullAuth::Basic {
        username: "bhatti".into(),
        password: "wrong".into(),
    };
    let err = image::pull(&reference, &wrong, &cache, &|_| {}, &none)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err:?}");
    assert_eq!(entries(&cache), Vec::<PathBuf>::new());

    let right = PullAuth::Basic {
        username: "bhatti".into(),
        password: "s3cret".into(),
    };
    let pulled = image::pull(&reference, &right, &cache, &|_| {}, &none)
        .await
        .unwrap();
    assert_eq!(pulled.layers.len(), 2);
    assert_eq!(pulled.config.working_dir.as_deref(), Some("/app"));
}
