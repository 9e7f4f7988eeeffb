//! Volume images: plain ext4 filesystems in sparse files, made, cloned and
//! grown on the host while no VM has them open.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{blocking, ficlone_file, sparse_copy, Result, StorageError};

/// How a clone was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// Shared extents (copy-on-write).
    Reflink,
    /// A sparse copy of the data extents.
    Copy,
}

/// Makes a new volume image at `path` (which must not exist): a sparse file
/// of `size_mb` MiB holding an empty ext4 filesystem. Nothing is left
/// behind on failure.
pub async fn create_volume(path: &Path, size_mb: u64) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| StorageError::io(format!("creating {}", parent.display()), e))?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StorageError::io(format!("creating {}", path.display()), e))?;
    let made = async {
        f.set_len(size_mb.saturating_mul(1 << 20))
            .map_err(|e| StorageError::io(format!("sizing {}", path.display()), e))?;
        drop(f);
        // No lazy init: the guest would otherwise zero inode tables in the
        // background after every first mount.
        crate::cmd::run(
            "mkfs.ext4",
            [
                "-q".as_ref(),
                "-F".as_ref(),
                "-E".as_ref(),
                "lazy_itable_init=0,lazy_journal_init=0,discard".as_ref(),
                "-L".as_ref(),
                "bhatti-volume".as_ref(),
                path.as_os_str(),
            ],
        )
        .await?;
        Ok(())
    }
    .await;
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Copies the volume image `src` to `dest` (a new file): shared extents
/// where the filesystem has them, else a sparse copy.
pub async fn clone_volume(src: &Path, dest: &Path) -> Result<CloneMethod> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| StorageError::io(format!("creating {}", parent.display()), e))?;
    }
    let (s, d) = (src.to_path_buf(), dest.to_path_buf());
    let r = blocking(move || match ficlone_file(&s, &d) {
        Ok(()) => Ok(CloneMethod::Reflink),
        Err(e) => {
            let _ = std::fs::remove_file(&d);
            tracing::debug!("reflink of {} failed ({e}); copying", s.display());
            sparse_copy(&s, &d).map(|()| CloneMethod::Copy)
        }
    })
    .await;
    if r.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    r
}

/// Grows the volume image at `path` to `size_mb` MiB: a forced check
/// (`e2fsck -f`, which `resize2fs` wants), the file extended, the
/// filesystem grown. Never shrinks; the volume must be attached nowhere.
pub async fn grow_volume(path: &Path, size_mb: u64) -> Result<()> {
    let want = size_mb.saturating_mul(1 << 20);
    let have = std::fs::metadata(path)
        .map_err(|e| StorageError::io(format!("reading {}", path.display()), e))?
        .len();
    if want <= have {
        return Ok(());
    }
    // Exit code 1: errors were corrected; fine for a resize.
    match crate::cmd::run("e2fsck", ["-f".as_ref(), "-p".as_ref(), path.as_os_str()]).await {
        Ok(_) => {}
        Err(e) if e.code == Some(1) => {}
        Err(e) => return Err(e.into()),
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(want))
        .map_err(|e| StorageError::io(format!("extending {}", path.display()), e))?;
    crate::cmd::run("resize2fs", [path.as_os_str()]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn create_clone_grow() {
        if crate::cmd::run("mkfs.ext4", ["-V"]).await.is_err() {
            bhatti_testkit::skip("volume", "mkfs.ext4 is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("o/a.ext4");
        create_volume(&a, 64).await.unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().len(), 64 << 20);
        // Exists already: refused, the file kept.
        assert!(create_volume(&a, 64).await.is_err());
        assert!(a.exists());
        let b = dir.path().join("o/b.ext4");
        clone_volume(&a, &b).await.unwrap();
        grow_volume(&b, 128).await.unwrap();
        assert_eq!(std::fs::metadata(&b).unwrap().len(), 128 << 20);
        assert_eq!(std::fs::metadata(&a).unwrap().len(), 64 << 20);
        // The grown filesystem fills the file: dumpe2fs reports the blocks.
        let out = crate::cmd::run("dumpe2fs", ["-h".as_ref(), b.as_os_str()])
            .await
            .unwrap();
        let blocks: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("Block count:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        let bsize: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("Block size:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        assert_eq!(blocks * bsize, 128 << 20);
        // Smaller than it is: nothing changes.
        grow_volume(&b, 64).await.unwrap();
        assert_eq!(std::fs::metadata(&b).unwrap().len(), 128 << 20);
    }
}
