//! A consistent copy of a running sandbox's root disk (`save-image`) or of
//! one of its volumes (backups): the guest flushes its filesystems, the
//! vCPUs stop while the disk is cloned (a reflink where the storage has
//! them), and the sandbox goes on in the state it was in.

use std::path::Path;

use super::{Engine, EngineError, Inner, Live, Result, SandboxState, Slot};

impl Engine {
    /// Copies sandbox `id`'s root disk to `dest` (a new file) and returns
    /// its size in bytes. A stopped sandbox's disk is copied as it is
    /// (it was flushed when the sandbox stopped); nothing is woken.
    pub async fn save_disk(&self, id: &str, dest: &Path) -> Result<u64> {
        let dest = dest.to_path_buf();
        self.op(id, move |inner, slot, live| {
            Box::pin(async move { inner.do_save_disk(slot, live, None, &dest).await })
        })
        .await
    }

    /// Copies the volume image `volume`, attached to sandbox `id`, to
    /// `dest` the same way (a backup of a volume in use).
    pub async fn save_volume(&self, id: &str, volume: &Path, dest: &Path) -> Result<u64> {
        let (volume, dest) = (volume.to_path_buf(), dest.to_path_buf());
        self.op(id, move |inner, slot, live| {
            Box::pin(async move { inner.do_save_disk(slot, live, Some(&volume), &dest).await })
        })
        .await
    }
}

impl Inner {
    async fn do_save_disk(
        &self,
        slot: &Slot,
        live: &mut Live,
        volume: Option<&Path>,
        dest: &Path,
    ) -> Result<u64> {
        if dest.exists() {
            return Err(EngineError::AlreadyExists(dest.display().to_string()));
        }
        let from = live.rec.state;
        let src = match volume {
            None => live.rec.disk.path.clone(),
            Some(v) if live.rec.spec.volumes.iter().any(|m| m.path == v) => v.to_path_buf(),
            Some(v) => {
                return Err(EngineError::Invalid(format!(
                    "{} is not a volume of sandbox {}",
                    v.display(),
                    slot.id
                )))
            }
        };
        let id = slot.id.clone();
        let live_vm = matches!(from, SandboxState::Running | SandboxState::Paused);
        match from {
            SandboxState::Creating => {
                return Err(self.state_err(slot, "it is still being created".into()))
            }
            SandboxState::Paused => {
                self.live_vm(slot, live)?
                    .resume()
                    .await
                    .map_err(|source| EngineError::Vmm {
                        id: id.clone(),
                        context: "resuming to sync",
                        source,
                    })?;
            }
            _ => {}
        }
        if live_vm {
            // The guest's page cache reaches the disk first.
            self.sync_guest(slot, live, "saving the disk").await;
            self.live_vm(slot, live)?
                .pause()
                .await
                .map_err(|source| EngineError::Vmm {
                    id: id.clone(),
                    context: "pausing to copy the disk",
                    source,
                })?;
        }
        let started = std::time::Instant::now();
        let copied = self.storage.clone_disk(&src, dest).await;
        if live_vm && from == SandboxState::Running {
            if let Some(vm) = live.vm.as_deref() {
                if let Err(e) = vm.resume().await {
                    tracing::error!("resuming after saving the disk: {e}");
                }
            }
        }
        copied?;
        let d = dest.to_path_buf();
        let size = super::off_thread(move || {
            let f = std::fs::File::open(&d)?;
            f.sync_all()?;
            Ok(f.metadata()?.len())
        })
        .await
        .map_err(|e| {
            let _ = std::fs::remove_file(dest);
            EngineError::io(format!("syncing {}", dest.display()), e)
        })?;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            size,
            src = %src.display(),
            dest = %dest.display(),
            "disk saved"
        );
        Ok(size)
    }
}
