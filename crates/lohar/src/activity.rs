//! What the host's idle detection asks about: when the guest last did
//! anything on the host's behalf, and what is still running.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use bhatti_protocol::Activity;

use crate::server::AgentState;

#[derive(Debug)]
pub struct ActivityTracker {
    last: Mutex<Instant>,
    running_execs: AtomicU32,
    open_forwards: AtomicU32,
}

impl Default for ActivityTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl ActivityTracker {
    pub fn new() -> Self {
        ActivityTracker {
            last: Mutex::new(Instant::now()),
            running_execs: AtomicU32::new(0),
            open_forwards: AtomicU32::new(0),
        }
    }

    /// Records activity now (exec start/output, stdin, file ops, session I/O).
    pub fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Counts a running exec until the guard drops.
    pub fn exec_guard(&self) -> CountGuard<'_> {
        self.touch();
        CountGuard::new(&self.running_execs, self)
    }

    /// Counts an open port forward until the guard drops.
    pub fn forward_guard(&self) -> CountGuard<'_> {
        self.touch();
        CountGuard::new(&self.open_forwards, self)
    }

    /// The reply to an `activity` request (which itself is not activity).
    pub fn snapshot(&self, agent: &AgentState) -> serde_json::Value {
        let idle = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        let (attached, running) = agent.sessions.counts();
        // A running init script counts as an exec: the host does not cool
        // a sandbox while its init (maybe silent for minutes) still works.
        let init = agent
            .sessions
            .get(bhatti_protocol::guest_config::INIT_SESSION)
            .is_some_and(|s| s.exit().is_none());
        serde_json::to_value(Activity {
            idle_ms: idle.as_millis() as u64,
            running_execs: self.running_execs.load(Ordering::SeqCst) + u32::from(init),
            attached_sessions: attached,
            running_sessions: running,
            open_forwards: self.open_forwards.load(Ordering::SeqCst),
        })
        .unwrap_or_default()
    }
}

#[derive(Debug)]
pub struct CountGuard<'a> {
    counter: &'a AtomicU32,
    tracker: &'a ActivityTracker,
}

impl<'a> CountGuard<'a> {
    fn new(counter: &'a AtomicU32, tracker: &'a ActivityTracker) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        CountGuard { counter, tracker }
    }
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
        self.tracker.touch();
    }
}
