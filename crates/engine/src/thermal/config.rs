//! `[thermal]`: the idle timers.

use serde::{Deserialize, Serialize};

/// `[thermal]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThermalConfig {
    /// Seconds without activity after which a running sandbox is paused
    /// (warm); 0 never pauses. Default 30.
    pub warm_after_secs: u64,
    /// Seconds without activity after which a sandbox is snapshotted to disk
    /// and its VMM ended (cold); 0 never does. Must exceed `warm_after_secs`
    /// when both are set. Default 1800.
    pub cold_after_secs: u64,
    /// How often (milliseconds) the idle sweeper looks at sandboxes.
    /// Default 1000.
    pub sweep_interval_ms: u64,
}

impl Default for ThermalConfig {
    fn default() -> Self {
        ThermalConfig {
            warm_after_secs: 30,
            cold_after_secs: 1800,
            sweep_interval_ms: 1000,
        }
    }
}
