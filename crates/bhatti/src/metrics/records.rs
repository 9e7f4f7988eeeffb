//! The thermal manager's [`Records`] sink, wrapped: every transition it
//! records (with its latency) is also counted here, so the engine itself
//! needs no metrics code.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::Metrics;
use crate::engine::Engine;
use crate::thermal::{Records, SandboxRecord, ThermalEvent, ThermalEventKind};

/// `inner` (the store) plus metrics.
#[derive(Clone)]
pub struct Metered {
    pub inner: Arc<dyn Records>,
    pub metrics: Arc<Metrics>,
    /// To size cold snapshots.
    pub engine: Engine,
}

impl Records for Metered {
    fn record(&self, owner: Option<String>, e: ThermalEvent) -> BoxFuture<'static, ()> {
        let took = Duration::from_secs_f64(e.latency_ms.max(0.0) / 1000.0);
        match e.kind {
            ThermalEventKind::Wake => self.metrics.wake(e.from, took, true),
            ThermalEventKind::WakeFailed => self.metrics.wake(e.from, took, false),
            ThermalEventKind::Warm => self.metrics.snapshot("warm", took, None),
            ThermalEventKind::Cold => {
                let bytes = self
                    .engine
                    .get(&e.sandbox_id)
                    .ok()
                    .map(|sb| dir_bytes(&sb.paths.dir.join("snapshot")));
                self.metrics.snapshot("cold", took, bytes)
            }
            ThermalEventKind::CoolFailed => self.metrics.cool_failed(),
        }
        self.inner.record(owner, e)
    }

    fn sandboxes(&self) -> BoxFuture<'static, Result<Vec<SandboxRecord>, String>> {
        self.inner.sandboxes()
    }
}

/// Bytes allocated on disk by the files of `dir` (snapshot memory files
/// are sparse: their apparent size would overstate what was written).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}
