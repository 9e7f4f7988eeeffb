//! Folding a Diff snapshot's memory file into a Full one.
//!
//! Firecracker writes a Diff memory file at full guest size but only
//! writes the dirty pages; everything else is a hole. `SEEK_DATA` /
//! `SEEK_HOLE` therefore enumerate exactly the dirtied pages, and copying
//! those extents onto (a copy of) the base Full memory file gives a memory
//! image that goes with the Diff's state file.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use crate::{Result, VmmError};

const CHUNK: usize = 1 << 20;

/// Copies the data extents of `diff_mem` onto `base_mem` in place and
/// fsyncs it. Returns the number of bytes copied.
///
/// `base_mem` must be the memory file of the snapshot the Diff was taken
/// against (the previous snapshot of the same VM process, or the memory
/// file it was restored from), and must not be the file backing a live VM
/// (Firecracker maps it privately, but the page cache is shared: merge into
/// a copy, then rename). The Diff's state file then loads with the merged
/// memory.
///
/// Refuses filesystems that do not report holes (they would make the whole
/// Diff look like data and overwrite the base with zeros).
pub fn merge_diff_snapshot(base_mem: &Path, diff_mem: &Path) -> Result<u64> {
    let diff = File::open(diff_mem)
        .map_err(|e| VmmError::io(format!("opening {}", diff_mem.display()), e))?;
    let base = OpenOptions::new()
        .write(true)
        .open(base_mem)
        .map_err(|e| VmmError::io(format!("opening {}", base_mem.display()), e))?;
    let dmeta = diff
        .metadata()
        .map_err(|e| VmmError::io(format!("stat {}", diff_mem.display()), e))?;
    let bmeta = base
        .metadata()
        .map_err(|e| VmmError::io(format!("stat {}", base_mem.display()), e))?;
    let size = dmeta.len();
    if size != bmeta.len() {
        return Err(VmmError::io(
            "merging a diff snapshot",
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is {} bytes but the base {} is {} bytes (not the same VM memory size)",
                    diff_mem.display(),
                    size,
                    base_mem.display(),
                    bmeta.len()
                ),
            ),
        ));
    }
    let extents = data_extents(&diff, size)
        .map_err(|e| VmmError::io(format!("seeking the data of {}", diff_mem.display()), e))?;
    let data: u64 = extents.iter().map(|(s, e)| e - s).sum();
    let allocated = dmeta.blocks() * 512;
    // A filesystem without hole reporting claims the whole (sparse) file
    // is data; its allocated size gives it away.
    if data > allocated + (64 << 10) {
        return Err(VmmError::io(
            "merging a diff snapshot",
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "the filesystem of {} does not report holes (SEEK_DATA found {data} bytes of \
                     data but only {allocated} are allocated); take Full snapshots there",
                    diff_mem.display()
                ),
            ),
        ));
    }
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in &extents {
        let mut off = *start;
        while off < *end {
            let n = ((end - off) as usize).min(CHUNK);
            diff.read_exact_at(&mut buf[..n], off)
                .map_err(|e| VmmError::io(format!("reading {}", diff_mem.display()), e))?;
            base.write_all_at(&buf[..n], off)
                .map_err(|e| VmmError::io(format!("writing {}", base_mem.display()), e))?;
            off += n as u64;
        }
    }
    base.sync_all()
        .map_err(|e| VmmError::io(format!("syncing {}", base_mem.display()), e))?;
    Ok(data)
}

/// The `[start, end)` data ranges of `file` (of length `size`).
fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `pos`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = (start as u64, (end as u64).min(size));
        if end <= start {
            break;
        }
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;
    const SIZE: u64 = 64 * PAGE * 16; // 4 MiB

    fn sparse(path: &Path, pages: &[(u64, u8)]) {
        let f = File::create(path).unwrap();
        f.set_len(SIZE).unwrap();
        for (page, byte) in pages {
            f.write_all_at(&vec![*byte; PAGE as usize], page * PAGE)
                .unwrap();
        }
        f.sync_all().unwrap();
    }

    #[test]
    fn merges_only_dirty_pages() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.mem");
        let diff = dir.path().join("diff.mem");
        // Base: every page filled with 0x11.
        std::fs::write(&base, vec![0x11u8; SIZE as usize]).unwrap();
        // Diff: pages 0, 5, 6 (adjacent: one extent) and the last one dirty,
        // one of them dirtied to zeros (still data, must be copied).
        let last = SIZE / PAGE - 1;
        sparse(&diff, &[(0, 0xaa), (5, 0xbb), (6, 0x00), (last, 0xcc)]);
        let merged = merge_diff_snapshot(&base, &diff).unwrap();
        let got = std::fs::read(&base).unwrap();
        assert_eq!(got.len() as u64, SIZE);
        let page = |n: u64| &got[(n * PAGE) as usize..((n + 1) * PAGE) as usize];
        assert!(page(0).iter().all(|b| *b == 0xaa));
        assert!(page(1).iter().all(|b| *b == 0x11));
        assert!(page(4).iter().all(|b| *b == 0x11));
        assert!(page(5).iter().all(|b| *b == 0xbb));
        assert!(page(6).iter().all(|b| *b == 0x00));
        assert!(page(7).iter().all(|b| *b == 0x11));
        assert!(page(last).iter().all(|b| *b == 0xcc));
        // Exactly the written pages: a filesystem that rounded extents up
        // past a page would copy holes (zeros) over the base.
        assert_eq!(merged, 4 * PAGE);
        let changed = (0..SIZE / PAGE)
            .filter(|n| page(*n).iter().any(|b| *b != 0x11))
            .count();
        assert_eq!(changed, 4);
    }

    #[test]
    fn empty_diff_and_size_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.mem");
        let diff = dir.path().join("diff.mem");
        std::fs::write(&base, vec![0x22u8; SIZE as usize]).unwrap();
        sparse(&diff, &[]);
        assert_eq!(merge_diff_snapshot(&base, &diff).unwrap(), 0);
        assert!(std::fs::read(&base).unwrap().iter().all(|b| *b == 0x22));
        let small = dir.path().join("small.mem");
        std::fs::write(&small, vec![0u8; 4096]).unwrap();
        let e = merge_diff_snapshot(&small, &diff).unwrap_err().to_string();
        assert!(e.contains("not the same VM memory size"), "{e}");
    }
}
