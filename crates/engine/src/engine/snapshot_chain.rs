//! Cold snapshots as a chain: the first one of a VMM process is Full; once
//! a sandbox has been restored from `<sandbox>/snapshot/`, its next cold
//! snapshot is a Diff where the backend supports it (Firecracker), folded
//! into a copy of the memory image it was restored from, so what lands in
//! `snapshot/` is always a complete memory image that restores exactly as
//! a Full one does.
//!
//! A Diff holds the pages dirtied since the previous snapshot *of the same
//! VMM process* (or since its restore). So a Diff is taken only when the
//! running VMM is the one restored from `snapshot/` (same pid) and has
//! written no snapshot since (a checkpoint in between resets dirty
//! tracking: [`bhatti_vmm::Vm::snapshots_taken`] tells). Anything else, and
//! any failure on the Diff path, gives a Full snapshot.
//!
//! File discipline (see `do_snapshot`): everything is written under
//! `snapshot.tmp/` and renamed into place. The memory file the live VM was
//! restored from (and maps privately) is only ever read, to make the copy
//! the Diff is merged into; it is never written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bhatti_vmm::firecracker::merge_diff_snapshot;
use bhatti_vmm::{SnapshotFiles, SnapshotKind, Vm, VmmError};

use super::Inner;

/// What the running VMM of a sandbox was restored from.
#[derive(Debug, Clone)]
pub(super) struct ChainBase {
    pid: u32,
    snapshots_taken: u64,
    /// `<sandbox>/snapshot/memory`
    memory: PathBuf,
}

/// Per sandbox id: the base its next Diff would be merged into.
#[derive(Debug, Default)]
pub(super) struct Chains(std::sync::Mutex<HashMap<String, ChainBase>>);

impl Chains {
    fn get(&self, id: &str) -> Option<ChainBase> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
    }
}

impl Inner {
    /// Notes that `vm` was just restored from `files` (call after a restore).
    pub(super) fn note_restored(&self, id: &str, vm: &dyn Vm, files: &SnapshotFiles) {
        let mut chains = self
            .chains
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &files.memory {
            Some(memory) if self.cfg.backend.supports_diff_snapshots() => {
                chains.insert(
                    id.to_owned(),
                    ChainBase {
                        pid: vm.pid(),
                        snapshots_taken: vm.snapshots_taken(),
                        memory: memory.clone(),
                    },
                );
            }
            _ => {
                chains.remove(id);
            }
        }
    }

    /// Forgets a sandbox's chain (its VMM ended or it booted fresh).
    pub(super) fn forget_chain(&self, id: &str) {
        self.chains
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    /// The kind the next cold snapshot of `vm` will be.
    pub(super) fn next_snapshot_kind(&self, id: &str, vm: &dyn Vm) -> SnapshotKind {
        match self.diff_base(id, vm) {
            Some(_) => SnapshotKind::Diff,
            None => SnapshotKind::Full,
        }
    }

    fn diff_base(&self, id: &str, vm: &dyn Vm) -> Option<ChainBase> {
        if !self.cfg.backend.supports_diff_snapshots() {
            return None;
        }
        self.chains.get(id).filter(|b| {
            b.pid == vm.pid() && b.snapshots_taken == vm.snapshots_taken() && b.memory.is_file()
        })
    }

    /// Writes the cold snapshot of paused `vm` into `files` (new files in a
    /// fresh directory). Diff + merge when the chain allows it, else (or
    /// when that fails) Full. Returns the kind written: `Diff` means a
    /// merged, complete memory image with the Diff's state file.
    pub(super) async fn write_chained_snapshot(
        &self,
        id: &str,
        vm: &dyn Vm,
        files: &SnapshotFiles,
    ) -> Result<SnapshotKind, VmmError> {
        if let (Some(base), Some(memory)) = (self.diff_base(id, vm), &files.memory) {
            let started = std::time::Instant::now();
            match write_merged_diff(vm, &base.memory, files, memory).await {
                Ok(bytes) => {
                    tracing::info!(
                        diff_bytes = bytes,
                        ms = started.elapsed().as_millis() as u64,
                        "diff snapshot merged into a copy of the previous memory image"
                    );
                    return Ok(SnapshotKind::Diff);
                }
                Err(e) => {
                    tracing::warn!("diff snapshot failed, writing a full one instead: {e}");
                    for p in [&files.state, memory, &diff_path(memory)] {
                        let _ = std::fs::remove_file(p);
                    }
                }
            }
        }
        // A Full snapshot is complete whatever dirty tracking says.
        vm.snapshot(SnapshotKind::Full, files).await?;
        Ok(SnapshotKind::Full)
    }
}

fn diff_path(memory: &Path) -> PathBuf {
    memory.with_file_name("memory.diff")
}

/// Diff into `memory.diff`, copy the base image to `memory`, fold the Diff
/// into it, drop the Diff. Returns the bytes of dirty pages merged.
async fn write_merged_diff(
    vm: &dyn Vm,
    base: &Path,
    files: &SnapshotFiles,
    memory: &Path,
) -> Result<u64, VmmError> {
    let diff = diff_path(memory);
    vm.snapshot(
        SnapshotKind::Diff,
        &SnapshotFiles {
            state: files.state.clone(),
            memory: Some(diff.clone()),
        },
    )
    .await?;
    let (base, memory2, diff2) = (base.to_path_buf(), memory.to_path_buf(), diff.clone());
    tokio::task::spawn_blocking(move || {
        copy_image(&base, &memory2)?;
        let n = merge_diff_snapshot(&memory2, &diff2)?;
        std::fs::remove_file(&diff2)
            .map_err(|e| VmmError::io(format!("removing {}", diff2.display()), e))?;
        Ok(n)
    })
    .await
    .map_err(|e| VmmError::io("merging the diff snapshot", std::io::Error::other(e)))?
}

/// A new file `dest` with the content of `src`: a reflink where the
/// filesystem shares extents, else a copy.
fn copy_image(src: &Path, dest: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what: String| move |e| VmmError::io(what, e);
    let s = std::fs::File::open(src).map_err(io(format!("opening {}", src.display())))?;
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(io(format!("creating {}", dest.display())))?;
    if crate::storage::ficlone(&s, &d).is_ok() {
        return Ok(());
    }
    drop(d);
    std::fs::remove_file(dest).map_err(io(format!("removing {}", dest.display())))?;
    std::fs::copy(src, dest).map(|_| ()).map_err(io(format!(
        "copying {} to {}",
        src.display(),
        dest.display()
    )))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use bhatti_protocol::transport::BoxedStream;

    use super::*;

    const PAGE: u64 = 4096;
    const SIZE: u64 = 64 * PAGE;

    /// A VMM whose Diff snapshot dirties pages 3 and 40 (sparse file, like
    /// Firecracker's) and whose Full snapshot writes all of memory.
    #[derive(Debug)]
    struct FakeVm;

    fn page(n: u64, byte: u8) -> (u64, Vec<u8>) {
        (n * PAGE, vec![byte; PAGE as usize])
    }

    #[async_trait::async_trait]
    impl Vm for FakeVm {
        fn pid(&self) -> u32 {
            1
        }
        async fn connect_agent(&self) -> bhatti_vmm::Result<BoxedStream> {
            Err(VmmError::Unsupported("agent"))
        }
        async fn pause(&self) -> bhatti_vmm::Result<()> {
            Ok(())
        }
        async fn resume(&self) -> bhatti_vmm::Result<()> {
            Ok(())
        }
        async fn is_paused(&self) -> bhatti_vmm::Result<bool> {
            Ok(false)
        }
        async fn snapshot(
            &self,
            kind: SnapshotKind,
            files: &SnapshotFiles,
        ) -> bhatti_vmm::Result<()> {
            std::fs::write(&files.state, format!("{kind:?}")).unwrap();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(files.memory.as_ref().unwrap())
                .unwrap();
            f.set_len(SIZE).unwrap();
            for (off, data) in [page(3, 0xd3), page(40, 0xd4)] {
                f.write_all_at(&data, off).unwrap();
            }
            Ok(())
        }
        async fn kill(&self) -> bhatti_vmm::Result<()> {
            Ok(())
        }
        fn is_alive(&self) -> bool {
            true
        }
        fn console_log(&self) -> PathBuf {
            PathBuf::from("/dev/null")
        }
    }

    #[tokio::test]
    async fn a_diff_is_merged_into_a_copy_and_the_base_is_untouched() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("snapshot-memory");
        let base_bytes: Vec<u8> = (0..SIZE).map(|i| (i / PAGE) as u8).collect();
        std::fs::write(&base, &base_bytes).unwrap();
        let tmp = d.path().join("snapshot.tmp");
        std::fs::create_dir(&tmp).unwrap();
        let files = SnapshotFiles {
            state: tmp.join("state"),
            memory: Some(tmp.join("memory")),
        };
        let n = write_merged_diff(&FakeVm, &base, &files, files.memory.as_ref().unwrap())
            .await
            .unwrap();
        assert_eq!(n, 2 * PAGE);
        // The base (what a live VM maps) is unchanged.
        assert_eq!(std::fs::read(&base).unwrap(), base_bytes);
        // The merged image: the base with the dirty pages on top.
        let mut want = base_bytes.clone();
        for (off, data) in [page(3, 0xd3), page(40, 0xd4)] {
            want[off as usize..(off + PAGE) as usize].copy_from_slice(&data);
        }
        assert!(std::fs::read(files.memory.as_ref().unwrap()).unwrap() == want);
        assert_eq!(std::fs::read_to_string(&files.state).unwrap(), "Diff");
        // Only the two files are left.
        let mut names: Vec<_> = std::fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["memory", "state"]);
    }

    #[test]
    fn copy_image_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, b"base").unwrap();
        std::fs::write(&b, b"live").unwrap();
        assert!(copy_image(&a, &b).is_err());
        assert_eq!(std::fs::read(&b).unwrap(), b"live");
        let c = d.path().join("c");
        copy_image(&a, &c).unwrap();
        assert_eq!(std::fs::read(&c).unwrap(), b"base");
    }
}
