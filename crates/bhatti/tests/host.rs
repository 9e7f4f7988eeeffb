//! Host-side pieces without VMs: disk methods (with timings) and the
//! bridge/TAP setup inside a throwaway network namespace. Need root.

use std::path::{Path, PathBuf};
use std::time::Instant;

use bhatti::net::{NetSettings, Network};
use bhatti::storage::{unmount_xfs_loop, DiskMethod, DiskStrategy, Storage, StorageConfig};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The base image to clone: `BHATTI_ROOTFS`, else a synthetic sparse ext4.
async fn base_image(dir: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("BHATTI_ROOTFS").map(PathBuf::from) {
        if p.is_file() {
            return p;
        }
    }
    let p = dir.join("base.ext4");
    bhatti::cmd::run(
        "mkfs.ext4",
        ["-q".as_ref(), "-F".as_ref(), p.as_os_str(), "512M".as_ref()],
    )
    .await
    .unwrap();
    p
}

/// Unmounts the XFS loop image even when the test fails.
struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let mnt = self.0.join("reflink");
        if bhatti::storage::is_mountpoint(&mnt) {
            let _ = std::process::Command::new("umount")
                .arg("-d")
                .arg(&mnt)
                .status();
        }
    }
}

#[tokio::test]
async fn disk_methods_and_timings() {
    if !is_root() {
        bhatti_testkit::skip("disk_methods_and_timings", "needs root (loop mounts)");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let base = base_image(scratch.path()).await;
    let base_data = bhatti::cmd::run("du", ["-k".as_ref(), base.as_os_str()])
        .await
        .unwrap();
    eprintln!(
        "base {} ({} bytes apparent, {} KiB data)",
        base.display(),
        std::fs::metadata(&base).unwrap().len(),
        base_data.split_whitespace().next().unwrap_or("?")
    );
    for strategy in [
        DiskStrategy::Reflink,
        DiskStrategy::XfsLoop,
        DiskStrategy::Copy,
        DiskStrategy::Auto,
    ] {
        let data = tempfile::tempdir().unwrap();
        let _guard = Unmount(data.path().to_path_buf());
        let t0 = Instant::now();
        let storage = match Storage::new(StorageConfig {
            data_dir: data.path().to_path_buf(),
            rootfs: base.clone(),
            strategy,
            xfs_loop_size_mb: 8 << 10,
        })
        .await
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{strategy:?}: unavailable here: {e}");
                assert_eq!(strategy, DiskStrategy::Reflink, "{e}");
                continue;
            }
        };
        let setup = t0.elapsed();
        let mut times = Vec::new();
        for i in 0..4 {
            let id = format!("t{i}");
            let sdir = data.path().join("sandboxes").join(&id);
            std::fs::create_dir_all(&sdir).unwrap();
            let t = Instant::now();
            let disk = storage
                .create_root_disk(&id, &sdir, None, None)
                .await
                .unwrap();
            times.push(t.elapsed());
            assert_eq!(disk.method, storage.method());
            assert_eq!(
                std::fs::metadata(&disk.path).unwrap().len(),
                std::fs::metadata(&base).unwrap().len()
            );
        }
        // The first disk of the XFS method includes importing the base.
        eprintln!(
            "{strategy:?} -> {}: setup {:?}, per-disk {:?}",
            storage.method(),
            setup,
            times
        );
        // Grow: a bigger disk_mb extends the file and the filesystem.
        let sdir = data.path().join("sandboxes").join("grow");
        std::fs::create_dir_all(&sdir).unwrap();
        let size_mb = std::fs::metadata(&base).unwrap().len() / (1 << 20) + 256;
        let t = Instant::now();
        let disk = storage
            .create_root_disk("grow", &sdir, None, Some(size_mb))
            .await
            .unwrap();
        eprintln!("  grown to {size_mb} MiB in {:?}", t.elapsed());
        assert_eq!(std::fs::metadata(&disk.path).unwrap().len(), size_mb << 20);
        let fsck = bhatti::cmd::run("e2fsck", ["-fn".as_ref(), disk.path.as_os_str()]).await;
        assert!(fsck.is_ok(), "{fsck:?}");
        storage.remove_root_disk(&disk.path).unwrap();
        assert!(!disk.path.exists());
        if storage.method() == DiskMethod::XfsLoop {
            unmount_xfs_loop(data.path()).await.unwrap();
            assert!(!bhatti::storage::is_mountpoint(
                &data.path().join("reflink")
            ));
        }
    }
}

/// Deletes the namespace even when the test fails.
struct NetnsGuard(String);
impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[tokio::test]
async fn bridge_and_taps_in_a_netns() {
    if !is_root() {
        bhatti_testkit::skip("bridge_and_taps_in_a_netns", "needs root");
        return;
    }
    let ns = format!("bhatti-t-{}", bhatti::engine::random_hex(4));
    let _guard = NetnsGuard(ns.clone());
    let settings = NetSettings {
        bridge: "bhtest0".into(),
        subnet: "10.77.9.1/24".into(),
        netns: Some(ns.clone()),
    };
    let net = Network::setup(settings.clone()).await.unwrap();
    // Idempotent.
    let net2 = Network::setup(settings).await.unwrap();
    drop(net2);
    // The default bridge appears with its first TAP.
    assert!(!net.link_exists("bhtest0").await);
    let g = net.allocate("sb-abc").unwrap();
    assert_eq!(g.ip.to_string(), "10.77.9.2");
    net.ensure_tap(&g).await.unwrap();
    net.ensure_tap(&g).await.unwrap();
    let show = bhatti::cmd::run("ip", ["-n", &ns, "-br", "addr", "show", "bhtest0"])
        .await
        .unwrap();
    assert!(show.contains("10.77.9.1/24"), "{show}");
    // A TAP for another bridge joins that one.
    net.ensure_bridge("bhtest1", "10.77.10.1/24").await.unwrap();
    let other = net
        .identity(
            "sb-def",
            Some(&bhatti::net::NetAttach {
                bridge: "bhtest1".into(),
                ip: "10.77.10.2".parse().unwrap(),
                gateway: "10.77.10.1".parse().unwrap(),
                prefix: 24,
                dns: vec![],
                dns_search: vec![],
            }),
        )
        .unwrap();
    net.ensure_tap(&other).await.unwrap();
    let link = bhatti::cmd::run("ip", ["-n", &ns, "-d", "link", "show", &other.tap])
        .await
        .unwrap();
    assert!(link.contains("master bhtest1"), "{link}");
    assert!(net.links().await.unwrap().contains(&"bhtest1".to_string()));
    net.remove_link(&other.tap).await.unwrap();
    net.remove_link("bhtest1").await.unwrap();
    assert!(!net.link_exists("bhtest1").await);
    let link = bhatti::cmd::run("ip", ["-n", &ns, "-d", "link", "show", &g.tap])
        .await
        .unwrap();
    assert!(link.contains("master bhtest0"), "{link}");
    assert!(link.contains("tun"), "{link}");
    // Not in the host's namespace.
    assert!(bhatti::cmd::run("ip", ["link", "show", &g.tap])
        .await
        .is_err());
    net.remove_tap(&g.tap).await.unwrap();
    net.remove_tap(&g.tap).await.unwrap();
    assert!(!net.link_exists(&g.tap).await);
    net.release(&g);
}
