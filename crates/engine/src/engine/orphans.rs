//! What a crash can leave behind, and the start-up pass that removes it:
//! run dirs (maybe with a VMM still in them) and sandbox dirs or disks that
//! no sandbox record accounts for, and checkpoint temp dirs with their
//! disks. Also the crash points the recovery tests use.

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

use super::{kill_stray, remove_dir_if_exists, Engine};

/// The environment variable naming a crash point (tests only): the daemon
/// aborts when it reaches that point, as a power cut or SIGKILL would.
pub const CRASH_AT_ENV: &str = "BHATTI_CRASH_AT";

/// Aborts the process if [`CRASH_AT_ENV`] names `point`. Inert unless that
/// variable is set; it is read once.
pub fn crash_point(point: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(CRASH_AT_ENV).ok().filter(|v| !v.is_empty()));
    if at.as_deref() == Some(point) {
        tracing::error!(point, "crash point reached: aborting ({CRASH_AT_ENV})");
        std::process::abort();
    }
}

/// What [`Engine::collect_orphans`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Orphans {
    pub run_dirs: Vec<String>,
    pub sandbox_dirs: Vec<String>,
    pub disks: Vec<String>,
    pub checkpoint_temps: Vec<String>,
}

impl Orphans {
    pub fn is_empty(&self) -> bool {
        self.run_dirs.is_empty()
            && self.sandbox_dirs.is_empty()
            && self.disks.is_empty()
            && self.checkpoint_temps.is_empty()
    }
}

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

impl Engine {
    /// Removes leftovers no known sandbox accounts for (call after
    /// [`Engine::recover`]). A VMM still running in an orphaned run dir is
    /// ended first. `checkpoints_dir` is where the caller keeps checkpoints:
    /// `<name>.tmp` dirs there are checkpoints that never finished.
    pub async fn collect_orphans(&self, checkpoints_dir: Option<&Path>) -> Orphans {
        let inner = &self.inner;
        let known: HashSet<String> = inner
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        let mut out = Orphans::default();
        for id in names(&inner.run_root) {
            if known.contains(&id) {
                continue;
            }
            let dir = inner.run_root.join(&id);
            kill_stray(&dir).await;
            remove_dir_if_exists(&dir);
            out.run_dirs.push(id);
        }
        for id in names(&inner.sandboxes_dir) {
            if known.contains(&id) {
                continue;
            }
            let dir = inner.sandboxes_dir.join(&id);
            let _ = inner
                .storage
                .remove_root_disk(&inner.storage.root_disk_path(&id, &dir));
            remove_dir_if_exists(&dir);
            out.sandbox_dirs.push(id);
        }
        if let Some(disks) = inner.storage.disks_dir() {
            for f in names(&disks) {
                let Some(id) = f.strip_suffix(".ext4") else {
                    continue;
                };
                if !known.contains(id) && inner.storage.remove_root_disk(&disks.join(&f)).is_ok() {
                    out.disks.push(f);
                }
            }
        }
        if let Some(cps) = checkpoints_dir {
            for name in names(cps) {
                let Some(key) = name.strip_suffix(".tmp") else {
                    continue;
                };
                remove_dir_if_exists(&cps.join(&name));
                let fin = cps.join(key);
                if !fin.exists() {
                    // Its disk, when it lives outside the dir (xfs-loop).
                    let _ = inner
                        .storage
                        .remove_root_disk(&inner.storage.checkpoint_disk_path(key, &fin));
                }
                out.checkpoint_temps.push(name);
            }
            if let Some(cdisks) = inner.storage.checkpoint_disks_dir() {
                for f in names(&cdisks) {
                    let Some(key) = f.strip_suffix(".ext4") else {
                        continue;
                    };
                    if !cps.join(key).exists()
                        && inner.storage.remove_root_disk(&cdisks.join(&f)).is_ok()
                    {
                        out.disks.push(format!("checkpoints/{f}"));
                    }
                }
            }
        }
        if !out.is_empty() {
            tracing::warn!(?out, "removed leftovers of an earlier crash");
        }
        out
    }
}
