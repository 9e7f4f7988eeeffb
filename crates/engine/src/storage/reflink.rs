//! `FICLONE`: share all extents of one file with another (XFS with reflink,
//! btrfs). Both files must be on the same filesystem.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Makes `dest` (open for writing, empty) share `src`'s extents.
pub fn ficlone(src: &File, dest: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument;
    // both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(dest.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether files in `dir` can be reflinked: clones a small probe file.
/// `Err` says why not.
pub fn reflink_supported(dir: &Path) -> Result<(), String> {
    let src_path = dir.join(format!(".reflink-probe-{}-src", std::process::id()));
    let dst_path = dir.join(format!(".reflink-probe-{}-dst", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        // The source must be readable: FICLONE fails with EBADF otherwise.
        let mut src = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&src_path)?;
        src.write_all(&[0x5a; 4096])?;
        src.sync_all()?;
        let dst = File::create(&dst_path)?;
        ficlone(&src, &dst)
    })();
    let _ = std::fs::remove_file(&src_path);
    let _ = std::fs::remove_file(&dst_path);
    result.map_err(|e| format!("FICLONE in {}: {e}", dir.display()))
}
