//! What the thermal manager needs from the engine: wakes that report
//! themselves, and cool-downs that re-check their reason under the
//! sandbox's lock.
//!
//! Single flight: every wake runs under the per-sandbox mutex, so of many
//! concurrent requests to a sleeping sandbox the first resumes or restores
//! it and the others then find it running (and share its one agent
//! connection). Bounded: resuming is one VMM call with a timeout, a restore
//! waits at most `boot_timeout` for the agent; a failed wake is the
//! caller's error (a snapshot that will not restore is flagged and not
//! tried again, see `do_start`).
//!
//! No lost wake-up: [`Engine::pause_if`] and [`Engine::snapshot_if`] run
//! their check under the same lock. A request that marks the sandbox busy
//! before it calls [`Engine::agent`] either is seen by the check, or waits
//! for the lock and then wakes the sandbox it finds paused or cold.

use std::time::{Duration, Instant};

use bhatti_protocol::AgentClient;

use super::{Engine, Result, SandboxState};

/// A wake an [`Engine::agent_reporting`] call performed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeReport {
    /// `paused` (warm) or `stopped`/`failed` (cold).
    pub from: SandboxState,
    pub latency: Duration,
    /// The error, when the wake failed.
    pub error: Option<String>,
}

impl Engine {
    /// [`Engine::agent`], also saying whether this call woke the sandbox
    /// (`None`: it was running already, or it does not exist).
    pub async fn agent_reporting(&self, id: &str) -> (Result<AgentClient>, Option<WakeReport>) {
        if let Some(c) = self.agent_at_hand(id) {
            return (Ok(c), None);
        }
        let r = self
            .op(id, |inner, slot, live| {
                Box::pin(async move {
                    let from = live.rec.state;
                    let started = Instant::now();
                    let woke = inner.wake(slot, live).await;
                    let report = (from != SandboxState::Running).then(|| WakeReport {
                        from,
                        latency: started.elapsed(),
                        error: woke.as_ref().err().map(|e| e.to_string()),
                    });
                    let client = match woke {
                        Ok(()) => inner.connected_agent(slot, live).await,
                        Err(e) => Err(e),
                    };
                    Ok((client, report))
                })
            })
            .await;
        match r {
            Ok(pair) => pair,
            Err(e) => (Err(e), None),
        }
    }

    /// The agent of a sandbox that is running, reconnecting to it if its
    /// connection has closed; `None` for any other state. Never wakes.
    pub async fn agent_if_running(&self, id: &str) -> Option<AgentClient> {
        self.op(id, |inner, slot, live| {
            Box::pin(async move {
                if live.rec.state != SandboxState::Running {
                    return Ok(None);
                }
                Ok(inner.connected_agent(slot, live).await.ok())
            })
        })
        .await
        .ok()
        .flatten()
    }

    /// Pauses a running sandbox if `still(state)` holds under its lock.
    /// `Ok(true)` when it paused it.
    pub async fn pause_if<F>(&self, id: &str, still: F) -> Result<bool>
    where
        F: FnOnce(SandboxState) -> bool + Send + 'static,
    {
        self.op(id, move |inner, slot, live| {
            Box::pin(async move {
                if live.rec.state != SandboxState::Running || !still(live.rec.state) {
                    return Ok(false);
                }
                inner.do_pause(slot, live).await?;
                Ok(true)
            })
        })
        .await
    }

    /// Snapshots a running or paused sandbox to disk (cold) if
    /// `still(state)` holds under its lock. `Ok(true)` when it did.
    pub async fn snapshot_if<F>(&self, id: &str, still: F) -> Result<bool>
    where
        F: FnOnce(SandboxState) -> bool + Send + 'static,
    {
        self.op(id, move |inner, slot, live| {
            Box::pin(async move {
                let state = live.rec.state;
                if !matches!(state, SandboxState::Running | SandboxState::Paused) || !still(state) {
                    return Ok(false);
                }
                inner.do_snapshot(slot, live).await?;
                Ok(true)
            })
        })
        .await
    }

    /// The kind the sandbox's next cold snapshot would be (Diff when it
    /// runs restored from its last snapshot on a backend with Diff
    /// support). `None` when it has no live VMM.
    pub async fn next_snapshot_kind(&self, id: &str) -> Option<bhatti_vmm::SnapshotKind> {
        self.op(id, |inner, slot, live| {
            Box::pin(async move {
                Ok(live
                    .vm
                    .as_deref()
                    .map(|vm| inner.next_snapshot_kind(&slot.id, vm)))
            })
        })
        .await
        .ok()
        .flatten()
    }
}
