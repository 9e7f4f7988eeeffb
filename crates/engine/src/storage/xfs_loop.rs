//! The engine's own reflink-capable filesystem, for hosts whose data dir
//! cannot reflink: a sparse XFS image (`<data_dir>/reflink.img`, made with
//! `mkfs.xfs -m reflink=1`) loop-mounted at `<data_dir>/reflink`.
//!
//! Setup is idempotent: an existing image is reused and an existing mount
//! is kept. `mount -o loop` attaches the loop device with autoclear, so
//! unmounting also frees the device.

use std::path::{Path, PathBuf};

use super::{reflink_supported, Result, StorageError};
use crate::cmd::run;

pub const IMAGE_NAME: &str = "reflink.img";
pub const MOUNT_NAME: &str = "reflink";

/// Makes sure the image exists and is mounted; returns the mount point.
pub async fn ensure(data_dir: &Path, size_mb: u64) -> Result<PathBuf> {
    let img = data_dir.join(IMAGE_NAME);
    let mnt = data_dir.join(MOUNT_NAME);
    if is_mountpoint(&mnt) {
        reflink_supported(&mnt)
            .map_err(|why| StorageError::Unavailable(super::DiskStrategy::XfsLoop, why))?;
        return Ok(mnt);
    }
    if !img.exists() {
        let tmp = data_dir.join(format!(".{IMAGE_NAME}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::fs::File::create(&tmp)
            .and_then(|f| f.set_len(size_mb.saturating_mul(1 << 20)))
            .map_err(|e| StorageError::io(format!("creating {}", tmp.display()), e))?;
        if let Err(e) = run(
            "mkfs.xfs",
            [
                "-q".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                tmp.as_os_str(),
            ],
        )
        .await
        {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        std::fs::rename(&tmp, &img)
            .map_err(|e| StorageError::io(format!("renaming {}", tmp.display()), e))?;
        tracing::info!(image = %img.display(), size_mb, "made the XFS reflink image");
    }
    std::fs::create_dir_all(&mnt)
        .map_err(|e| StorageError::io(format!("creating {}", mnt.display()), e))?;
    run(
        "mount",
        [
            "-t".as_ref(),
            "xfs".as_ref(),
            "-o".as_ref(),
            "loop,noatime".as_ref(),
            img.as_os_str(),
            mnt.as_os_str(),
        ],
    )
    .await?;
    if let Err(why) = reflink_supported(&mnt) {
        let _ = unmount(&mnt).await;
        return Err(StorageError::Unavailable(super::DiskStrategy::XfsLoop, why));
    }
    tracing::info!(mount = %mnt.display(), "mounted the XFS reflink image");
    Ok(mnt)
}

/// Unmounts `<data_dir>/reflink` if mounted (and frees its loop device).
/// The image file stays. For tests and host teardown; the engine itself
/// leaves the mount in place.
pub async fn unmount_xfs_loop(data_dir: &Path) -> Result<()> {
    let mnt = data_dir.join(MOUNT_NAME);
    if is_mountpoint(&mnt) {
        unmount(&mnt).await?;
    }
    Ok(())
}

async fn unmount(mnt: &Path) -> Result<()> {
    run("umount", ["-d".as_ref(), mnt.as_os_str()]).await?;
    Ok(())
}

/// Whether `path` is a mount point (per `/proc/self/mountinfo`).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(&unescape_mountinfo(m)) == canon)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/x\\"), r"/x\\");
        assert!(is_mountpoint(Path::new("/")));
        assert!(!is_mountpoint(Path::new("/nonexistent-bhatti")));
    }
}
