//! What outlives the thermal manager: its events, and the sandboxes'
//! `keep_hot` flags and owners. The daemon's store implements [`Records`];
//! the manager runs without one in tests.

use futures_util::future::BoxFuture;

use super::ThermalEvent;

/// A sandbox as the manager needs it from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    pub id: String,
    pub owner: String,
    pub keep_hot: bool,
}

pub trait Records: Send + Sync + 'static {
    /// Appends an event (best effort: the implementation logs failures).
    fn record(&self, owner: Option<String>, event: ThermalEvent) -> BoxFuture<'static, ()>;
    /// Every sandbox.
    fn sandboxes(&self) -> BoxFuture<'static, Result<Vec<SandboxRecord>, String>>;
}
