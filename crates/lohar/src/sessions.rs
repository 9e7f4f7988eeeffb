//! The table of PTY sessions and their scrollback rings.

use crate::config::Limits;

#[derive(Debug)]
pub struct SessionTable {
    _limits: Limits,
}

impl SessionTable {
    pub fn new(limits: Limits) -> Self {
        SessionTable { _limits: limits }
    }

    /// (attached sessions, running sessions)
    pub fn counts(&self) -> (u32, u32) {
        (0, 0)
    }
}
