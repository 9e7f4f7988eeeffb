//! Volumes: ext4 block devices the host attached, mounted at boot before
//! files are placed and init starts. A disk is found by its virtio-blk
//! serial (`/sys/block/vdX/serial`), never by its position.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use bhatti_protocol::guest_config::GuestMount;
use nix::mount::{mount, MsFlags};

const SYS_BLOCK: &str = "/sys/block";

/// Mounts every volume; the first failure ends the boot (a missing volume
/// must not silently become a directory on the root disk).
pub(crate) fn mount_all(mounts: &[GuestMount], uid: u32, gid: u32) -> anyhow::Result<()> {
    for m in mounts {
        mount_one(m, uid, gid).with_context(|| format!("volume {} at {}", m.serial, m.path))?;
    }
    Ok(())
}

fn mount_one(m: &GuestMount, uid: u32, gid: u32) -> anyhow::Result<()> {
    let target = Path::new(&m.path);
    if !target.is_absolute()
        || target
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        anyhow::bail!("the mount point must be absolute, without '..'");
    }
    let dev = find_by_serial(Path::new(SYS_BLOCK), &m.serial)?
        .with_context(|| format!("no disk with serial {:?}", m.serial))?;
    crate::files::ensure_dirs(target, uid, gid)
        .with_context(|| format!("creating {}", target.display()))?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if m.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(Some(&dev), target, Some("ext4"), flags, None::<&str>)
        .with_context(|| format!("mounting {} on {}", dev.display(), target.display()))?;
    if !m.read_only {
        give_fresh_root(target, uid, gid);
    }
    tracing::info!(serial = %m.serial, dev = %dev.display(), path = %m.path, ro = m.read_only, "volume mounted");
    Ok(())
}

/// `/dev/<name>` of the block device whose serial is `serial`.
fn find_by_serial(sys_block: &Path, serial: &str) -> anyhow::Result<Option<PathBuf>> {
    let entries = fs::read_dir(sys_block).with_context(|| format!("reading {SYS_BLOCK}"))?;
    for e in entries.flatten() {
        let Ok(s) = fs::read_to_string(e.path().join("serial")) else {
            continue;
        };
        if s.trim_end_matches(['\n', '\0']) == serial {
            return Ok(Some(Path::new("/dev").join(e.file_name())));
        }
    }
    Ok(None)
}

/// A new filesystem's root belongs to root; hand it to the user (only
/// when it holds nothing but `lost+found`, so an owner chosen later stays).
fn give_fresh_root(root: &Path, uid: u32, gid: u32) {
    let Ok(md) = fs::metadata(root) else { return };
    if md.uid() != 0 || (uid == 0 && gid == 0) {
        return;
    }
    let fresh = fs::read_dir(root)
        .map(|d| d.flatten().all(|e| e.file_name() == "lost+found"))
        .unwrap_or(false);
    if fresh {
        if let Err(e) = std::os::unix::fs::chown(root, Some(uid), Some(gid)) {
            tracing::warn!("giving {} to {uid}:{gid}: {e}", root.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_disks_by_serial() {
        let dir = tempfile::tempdir().unwrap();
        for (name, serial) in [
            ("vda", None),
            ("vdb", Some("vol0\n")),
            ("vdc", Some("vol1")),
        ] {
            let d = dir.path().join(name);
            fs::create_dir(&d).unwrap();
            if let Some(s) = serial {
                fs::write(d.join("serial"), s).unwrap();
            }
        }
        assert_eq!(
            find_by_serial(dir.path(), "vol0").unwrap(),
            Some(PathBuf::from("/dev/vdb"))
        );
        assert_eq!(
            find_by_serial(dir.path(), "vol1").unwrap(),
            Some(PathBuf::from("/dev/vdc"))
        );
        assert_eq!(find_by_serial(dir.path(), "vol2").unwrap(), None);
    }
}
