//! Turning an unpacked image into a bootable root disk: lohar goes in at
//! `/usr/local/bin/lohar` (the kernel command line both VMMs use says
//! `init=/usr/local/bin/lohar`, as for the stock rootfs of
//! `images/rootfs/install-lohar.sh`), then `mkfs.ext4 -d` copies the tree,
//! owners, modes, links and xattrs included, into a sparse file sized to the
//! content plus headroom. The image's own init or CMD is never started.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::ImageError;

/// Where lohar lives inside a root disk (relative to the root).
pub const LOHAR_PATH: &str = "usr/local/bin/lohar";
/// Space left free on top of the content: a fifth, plus this.
pub const HEADROOM_BYTES: u64 = 64 << 20;
const BLOCK: u64 = 4096;

/// What a tree holds, as ext4 will need it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContentSize {
    /// Bytes, each file's and directory's apparent size rounded up to 4 KiB
    /// blocks; hard-linked files counted once.
    pub bytes: u64,
    /// Inodes (files, directories, links, nodes), hard links counted once.
    pub inodes: u64,
}

/// Copies `lohar` to `<root>/usr/local/bin/lohar` (root:root 0755),
/// replacing whatever the image had there. Parent directories are resolved
/// inside the rootfs, so an image whose `/usr/local` is a symlink cannot send
/// the copy elsewhere on the host. Blocking.
pub fn inject_lohar(root: &Path, lohar: &Path) -> Result<(), ImageError> {
    let parts: Vec<std::ffi::OsString> = ["usr", "local", "bin"].iter().map(Into::into).collect();
    let root = fs::canonicalize(root)
        .map_err(|e| ImageError::io(format!("rootfs {}", root.display()), e))?;
    let dir = super::unpack::resolve_dir(&root, &parts, true)?;
    let dest = dir.join("lohar");
    match fs::symlink_metadata(&dest) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(&dest),
        Ok(_) => fs::remove_file(&dest),
        Err(_) => Ok(()),
    }
    .map_err(|e| ImageError::io(format!("removing {}", dest.display()), e))?;
    let mut src = fs::File::open(lohar)
        .map_err(|e| ImageError::io(format!("opening {}", lohar.display()), e))?;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o755)
        .open(&dest)
        .map_err(|e| ImageError::io(format!("creating {}", dest.display()), e))?;
    std::io::copy(&mut src, &mut out)
        .map_err(|e| ImageError::io(format!("writing {}", dest.display()), e))?;
    drop(out);
    std::os::unix::fs::lchown(&dest, Some(0), Some(0))
        .map_err(|e| ImageError::io(format!("chown {}", dest.display()), e))?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))
        .map_err(|e| ImageError::io(format!("chmod {}", dest.display()), e))
}

/// Sums the tree under `root` without following symlinks. Blocking.
pub fn content_size(root: &Path) -> Result<ContentSize, ImageError> {
    let mut size = ContentSize::default();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let m = fs::symlink_metadata(&path)
            .map_err(|e| ImageError::io(format!("stat {}", path.display()), e))?;
        if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        size.inodes += 1;
        size.bytes += m.len().div_ceil(BLOCK) * BLOCK;
        if m.is_dir() {
            let read = fs::read_dir(&path)
                .map_err(|e| ImageError::io(format!("listing {}", path.display()), e))?;
            for child in read {
                let child =
                    child.map_err(|e| ImageError::io(format!("listing {}", path.display()), e))?;
                stack.push(child.path());
            }
        }
    }
    Ok(size)
}

/// The disk size for `content`: content + 20% + [`HEADROOM_BYTES`], in MiB.
pub fn disk_size(content: ContentSize) -> u64 {
    let mib = 1u64 << 20;
    // Inode tables and the journal cost space too: 256 bytes an inode.
    let want = content.bytes + content.bytes / 5 + content.inodes * 256 + HEADROOM_BYTES;
    want.div_ceil(mib) * mib
}

/// Builds `dest` (a new sparse file) as an ext4 filesystem holding the tree
/// under `root`; returns its size in bytes. On failure `dest` is removed.
pub async fn build_ext4(root: &Path, dest: &Path) -> Result<u64, ImageError> {
    let root_owned = root.to_path_buf();
    let content = tokio::task::spawn_blocking(move || content_size(&root_owned))
        .await
        .map_err(|e| ImageError::Layer(format!("sizing task: {e}")))??;
    let bytes = disk_size(content);
    // Room for the content's inodes and as many again for what the sandbox
    // adds, but never fewer than mkfs's default one per 16 KiB.
    let inodes = (content.inodes * 2 + 4096).max(bytes / 16384);
    let result = async {
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| ImageError::io(format!("creating {}", dest.display()), e))?;
        f.set_len(bytes)
            .map_err(|e| ImageError::io(format!("sizing {}", dest.display()), e))?;
        drop(f);
        crate::cmd::run(
            "mkfs.ext4",
            [
                "-q".as_ref(),
                "-F".as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                "-N".as_ref(),
                inodes.to_string().as_ref(),
                "-d".as_ref(),
                root.as_os_str(),
                dest.as_os_str(),
            ] as [&std::ffi::OsStr; 9],
        )
        .await?;
        Ok(bytes)
    }
    .await;
    if result.is_err() {
        let _ = fs::remove_file(dest);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_count_blocks_inodes_and_hard_links_once() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("a"), vec![0u8; 5000]).unwrap();
        fs::hard_link(t.path().join("a"), t.path().join("b")).unwrap();
        std::os::unix::fs::symlink("a", t.path().join("l")).unwrap();
        let s = content_size(t.path()).unwrap();
        assert_eq!(s.inodes, 3); // root, a(=b), l
        let dir_bytes = fs::metadata(t.path()).unwrap().len().div_ceil(BLOCK) * BLOCK;
        assert_eq!(s.bytes, dir_bytes + 8192 + 4096);
        assert_eq!(
            disk_size(ContentSize {
                bytes: 0,
                inodes: 0
            }),
            HEADROOM_BYTES
        );
        assert!(disk_size(s) >= s.bytes + HEADROOM_BYTES);
    }

    #[test]
    fn lohar_is_injected_inside_the_rootfs_even_through_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        let t = tempfile::tempdir().unwrap();
        let bin = t.path().join("lohar-bin");
        fs::write(&bin, b"\x7fELF fake").unwrap();
        let root = t.path().join("root");
        fs::create_dir_all(root.join("usr")).unwrap();
        // /usr/local -> an absolute host path: must resolve inside the root.
        std::os::unix::fs::symlink(outside.path(), root.join("usr/local")).unwrap();
        inject_lohar(&root, &bin).unwrap();
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        let inside = root
            .join(outside.path().strip_prefix("/").unwrap())
            .join("bin/lohar");
        assert_eq!(fs::read(&inside).unwrap(), b"\x7fELF fake");
        assert_eq!(fs::metadata(&inside).unwrap().mode() & 0o7777, 0o755);
        // (On the host, root/usr/local/bin/lohar would follow the absolute
        // link out of the root; in the guest it resolves to `inside`.)
    }
}
