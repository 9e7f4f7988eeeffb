//! Sparse file copy: only the data extents (found with `SEEK_DATA` and
//! `SEEK_HOLE`) are copied, holes stay holes.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{Result, StorageError};

/// Copies `src` to a new file `dest`, keeping holes.
pub fn sparse_copy(src: &Path, dest: &Path) -> Result<()> {
    let ctx = || format!("copying {} to {}", src.display(), dest.display());
    let s = File::open(src).map_err(|e| StorageError::io(ctx(), e))?;
    let d = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|e| StorageError::io(ctx(), e))?;
    let len = s.metadata().map_err(|e| StorageError::io(ctx(), e))?.len();
    d.set_len(len).map_err(|e| StorageError::io(ctx(), e))?;
    let mut pos: i64 = 0;
    let end = len as i64;
    while pos < end {
        let data = match seek(&s, pos, libc::SEEK_DATA) {
            Ok(off) => off,
            // ENXIO: no data after `pos`, the rest is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(StorageError::io(ctx(), e)),
        };
        let hole = seek(&s, data, libc::SEEK_HOLE).map_err(|e| StorageError::io(ctx(), e))?;
        copy_range(&s, &d, data, hole - data).map_err(|e| StorageError::io(ctx(), e))?;
        pos = hole;
    }
    Ok(())
}

fn seek(f: &File, off: i64, whence: libc::c_int) -> std::io::Result<i64> {
    // SAFETY: lseek on an open descriptor has no memory-safety preconditions.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Copies `len` bytes at `off` from `s` to the same offset in `d`.
fn copy_range(s: &File, d: &File, mut off: i64, mut len: i64) -> std::io::Result<()> {
    while len > 0 {
        let mut off_in = off;
        let mut off_out = off;
        let chunk = len.min(1 << 30) as usize;
        // SAFETY: both descriptors are open; the offset pointers are valid
        // locals the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                s.as_raw_fd(),
                &mut off_in,
                d.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Across filesystems (or where unsupported), copy by hand.
                Some(libc::EXDEV | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => {
                    return copy_range_rw(s, d, off as u64, len as u64)
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "source shrank during the copy",
            ));
        }
        off += n as i64;
        len -= n as i64;
    }
    Ok(())
}

/// `copy_range` with plain reads and writes.
fn copy_range_rw(s: &File, d: &File, mut off: u64, mut len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while len > 0 {
        let want = len.min(buf.len() as u64) as usize;
        let n = s.read_at(&mut buf[..want], off)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "source shrank during the copy",
            ));
        }
        d.write_all_at(&buf[..n], off)?;
        off += n as u64;
        len -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        f.set_len(32 << 20).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        sparse_copy(&src, &dst).unwrap();
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert_eq!(a, b);
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&dst).unwrap().blocks();
        assert!(
            blocks * 512 < 4 << 20,
            "copy is not sparse: {blocks} blocks"
        );
    }
}
