//! Thermal transitions as events: a bounded in-memory ring (this run's
//! recent transitions, for tests and embedders) and, when the daemon has
//! one, its `Records` (the daemon's store: the durable event log behind
//! `GET /events`).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::ThermalState;

/// Events kept in memory.
pub const RING_CAPACITY: usize = 4096;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ThermalEventKind {
    /// hot → warm (paused).
    Warm,
    /// hot/warm → cold (snapshot written, VMM ended).
    Cold,
    /// warm/cold → hot on demand.
    Wake,
    /// A wake failed; the caller got the error.
    WakeFailed,
    /// Pausing or snapshotting an idle sandbox failed (retried later).
    CoolFailed,
}

impl ThermalEventKind {
    /// The `kind` column of the store's events table.
    pub fn as_str(self) -> &'static str {
        match self {
            ThermalEventKind::Warm => "warm",
            ThermalEventKind::Cold => "cold",
            ThermalEventKind::Wake => "wake",
            ThermalEventKind::WakeFailed => "wake_failed",
            ThermalEventKind::CoolFailed => "cool_failed",
        }
    }
}

/// One transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ThermalEvent {
    /// Increasing within a daemon run.
    pub seq: u64,
    /// Unix milliseconds.
    pub at_unix_ms: i64,
    pub sandbox_id: String,
    pub kind: ThermalEventKind,
    pub from: ThermalState,
    pub to: ThermalState,
    /// How long the transition took.
    pub latency_ms: f64,
    /// An error, or e.g. the snapshot kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A query over the ring: newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EventQuery {
    /// Only this sandbox.
    pub sandbox_id: Option<String>,
    /// Only these sandboxes (e.g. a user's); `None`: all.
    pub sandbox_ids: Option<Vec<String>>,
    /// Only events with `seq` greater than this (polling).
    pub after_seq: Option<u64>,
    /// At most this many (default 100).
    pub limit: Option<usize>,
}

#[derive(Debug, Default)]
pub(super) struct Ring {
    events: VecDeque<ThermalEvent>,
    next_seq: u64,
}

impl Ring {
    pub(super) fn push(&mut self, mut e: ThermalEvent) -> ThermalEvent {
        self.next_seq += 1;
        e.seq = self.next_seq;
        if self.events.len() == RING_CAPACITY {
            self.events.pop_front();
        }
        self.events.push_back(e.clone());
        e
    }

    pub(super) fn query(&self, q: &EventQuery) -> Vec<ThermalEvent> {
        self.events
            .iter()
            .rev()
            .filter(|e| q.sandbox_id.as_deref().is_none_or(|id| e.sandbox_id == id))
            .filter(|e| {
                q.sandbox_ids
                    .as_ref()
                    .is_none_or(|ids| ids.contains(&e.sandbox_id))
            })
            .filter(|e| q.after_seq.is_none_or(|s| e.seq > s))
            .take(q.limit.unwrap_or(100))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str) -> ThermalEvent {
        ThermalEvent {
            seq: 0,
            at_unix_ms: 0,
            sandbox_id: id.into(),
            kind: ThermalEventKind::Warm,
            from: ThermalState::Hot,
            to: ThermalState::Warm,
            latency_ms: 1.0,
            detail: None,
        }
    }

    #[test]
    fn ring_is_bounded_and_queries_newest_first() {
        let mut r = Ring::default();
        for i in 0..RING_CAPACITY + 10 {
            r.push(ev(if i % 2 == 0 { "a" } else { "b" }));
        }
        assert_eq!(r.events.len(), RING_CAPACITY);
        let all = r.query(&EventQuery {
            limit: Some(usize::MAX),
            ..Default::default()
        });
        assert_eq!(all.len(), RING_CAPACITY);
        assert_eq!(all[0].seq, (RING_CAPACITY + 10) as u64);
        let a = r.query(&EventQuery {
            sandbox_id: Some("a".into()),
            limit: Some(3),
            ..Default::default()
        });
        assert_eq!(a.len(), 3);
        assert!(a.iter().all(|e| e.sandbox_id == "a"));
        let newer = r.query(&EventQuery {
            after_seq: Some((RING_CAPACITY + 8) as u64),
            ..Default::default()
        });
        assert_eq!(newer.len(), 2);
        let none = r.query(&EventQuery {
            sandbox_ids: Some(vec!["c".into()]),
            ..Default::default()
        });
        assert!(none.is_empty());
    }
}
