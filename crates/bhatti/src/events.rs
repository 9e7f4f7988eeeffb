//! The event log: one place every part of the daemon records what happened
//! (lifecycle operations, failures, rejections, daemon starts); the store's
//! `events` table is the source of truth (`GET /events`, `bhatti admin
//! events`). Thermal transitions reach the same table through the thermal
//! manager's `Records` (store/thermal.rs).
//!
//! - Writes go through [`Store::run`] (the blocking pool), and a failed
//!   write only logs a warning: recording never fails a request.
//! - Rate-limit rejections are coalesced per user: at most one event a
//!   second, its detail carrying how many requests it stands for, so a
//!   client hammering the API cannot flood the log.
//! - Retention (`[events]`): [`EventLog::prune`] at start, every
//!   `prune_interval_secs` and after every [`PRUNE_EVERY_INSERTS`] inserts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::EventsConfig;
use crate::store::events::{self, NewEvent};
use crate::store::Store;

/// Inserts between two prunes (besides the periodic one).
pub const PRUNE_EVERY_INSERTS: u64 = 1000;
/// At most one `rate_limited` event per user in this long.
pub const COALESCE: Duration = Duration::from_secs(1);

/// A 429 as a response extension (set by `ApiError`), so the auth layer,
/// which knows the user, records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// A rate limit (the governor).
    RateLimited(String),
    /// A cap or quota (counts, bytes).
    Quota(String),
}

/// Rejections of one user not yet written.
#[derive(Debug)]
struct Coalesced {
    last_written: Instant,
    pending: u64,
    last_message: String,
}

/// See the module docs.
#[derive(Debug)]
pub struct EventLog {
    store: Store,
    cfg: EventsConfig,
    inserts: AtomicU64,
    rate_limited: Mutex<HashMap<String, Coalesced>>,
}

impl EventLog {
    pub fn new(store: Store, cfg: EventsConfig) -> Arc<EventLog> {
        Arc::new(EventLog {
            store,
            cfg,
            inserts: AtomicU64::new(0),
            rate_limited: Mutex::new(HashMap::new()),
        })
    }

    /// Writes `e` and waits for it; a failure is logged, not returned.
    pub async fn record(self: &Arc<Self>, e: NewEvent) {
        let kind = e.kind.clone();
        if let Err(err) = self.store.run(move |c| events::record(c, &e)).await {
            tracing::warn!(kind, "recording an event: {err}");
            return;
        }
        if self.inserts.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY_INSERTS
            == PRUNE_EVERY_INSERTS - 1
        {
            let me = self.clone();
            tokio::spawn(async move { me.prune().await });
        }
    }

    /// [`record`](Self::record) without waiting (rejections: the answer
    /// should not wait for the disk).
    pub fn spawn(self: &Arc<Self>, e: NewEvent) {
        let me = self.clone();
        tokio::spawn(async move { me.record(e).await });
    }

    /// An operation's outcome on a sandbox: `kind` with its latency when it
    /// worked, `<kind>_failed` with the error when the daemon or the guest
    /// failed it (5xx; a refused request, 4xx, is not an event).
    pub async fn outcome(
        self: &Arc<Self>,
        owner: &str,
        sandbox_id: &str,
        kind: &str,
        started: Instant,
        failure: Option<&crate::api::ApiError>,
    ) {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let e = match failure {
            None => NewEvent::new(sandbox_id, kind),
            Some(err) if err.status().is_server_error() => {
                NewEvent::new(sandbox_id, &format!("{kind}_failed")).detail(err.public_message())
            }
            Some(_) => return,
        };
        self.record(e.owner(owner).latency_ms(ms)).await;
    }

    /// A 429 the user got.
    pub fn rejected(self: &Arc<Self>, owner: &str, r: &Rejection) {
        match r {
            Rejection::Quota(m) => {
                self.spawn(NewEvent::daemon("quota_rejected").owner(owner).detail(m));
            }
            Rejection::RateLimited(m) => self.rate_limited(owner, m),
        }
    }

    /// Coalesced per user (see the module docs).
    fn rate_limited(self: &Arc<Self>, owner: &str, message: &str) {
        let now = Instant::now();
        let mut map = self.rate_limited.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(owner.to_owned()).or_insert_with(|| Coalesced {
            last_written: now - COALESCE,
            pending: 0,
            last_message: String::new(),
        });
        entry.last_message = message.to_owned();
        if entry.pending == 0 && now.duration_since(entry.last_written) >= COALESCE {
            entry.last_written = now;
            drop(map);
            self.spawn(rate_event(owner, 1, message));
            return;
        }
        entry.pending += 1;
        if entry.pending > 1 {
            return; // a flush is scheduled already
        }
        // The first of a burst: write the burst's count when the second is up.
        let due = entry.last_written + COALESCE;
        let (me, owner) = (self.clone(), owner.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            let flushed = {
                let mut map = me.rate_limited.lock().unwrap_or_else(|p| p.into_inner());
                map.get_mut(&owner).map(|c| {
                    c.last_written = Instant::now();
                    (std::mem::take(&mut c.pending), c.last_message.clone())
                })
            };
            if let Some((n, m)) = flushed.filter(|(n, _)| *n > 0) {
                me.record(rate_event(&owner, n, &m)).await;
            }
        });
    }

    /// At daemon start: a `daemon_start` event, and a `recovered` one for
    /// each sandbox the engine found again (its state says whether its VMM
    /// survived: running or paused, else stopped or failed).
    pub async fn record_start(self: &Arc<Self>, recovered: &[crate::Sandbox]) {
        let owners: HashMap<String, String> = match self
            .store
            .run(|c| crate::store::sandboxes::list_all(c))
            .await
        {
            Ok(rows) => rows.into_iter().map(|r| (r.id, r.owner)).collect(),
            Err(e) => {
                tracing::warn!("listing sandboxes for the event log: {e}");
                HashMap::new()
            }
        };
        self.record(NewEvent::daemon("daemon_start").detail(format!(
            "bhatti {}; {} sandbox(es) recovered",
            env!("CARGO_PKG_VERSION"),
            recovered.len()
        )))
        .await;
        for sb in recovered {
            // A sandbox no user owns is destroyed by reconcile: no event.
            let Some(owner) = owners.get(&sb.id) else {
                continue;
            };
            let state = serde_json::to_value(sb.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{:?}", sb.state));
            self.record(
                NewEvent::new(&sb.id, "recovered")
                    .owner(owner)
                    .detail(state),
            )
            .await;
        }
    }

    /// Applies `[events]` retention; returns how many events went.
    pub async fn prune(&self) -> usize {
        let max_age_ms = i64::from(self.cfg.max_age_days) * 86_400_000;
        let max_count = self.cfg.max_count;
        // Users whose bursts are long over.
        if let Ok(mut m) = self.rate_limited.lock() {
            m.retain(|_, c| c.pending > 0 || c.last_written.elapsed() < COALESCE * 60);
        }
        match self
            .store
            .run(move |c| events::prune(c, max_age_ms, max_count))
            .await
        {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(pruned = n, "events pruned");
                }
                n
            }
            Err(e) => {
                tracing::warn!("pruning events: {e}");
                0
            }
        }
    }

    /// Prunes now and every `prune_interval_secs` until aborted.
    pub fn spawn_pruner(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs(me.cfg.prune_interval_secs.max(1)));
            loop {
                tick.tick().await;
                me.prune().await;
            }
        })
    }
}

fn rate_event(owner: &str, n: u64, message: &str) -> NewEvent {
    NewEvent::daemon("rate_limited")
        .owner(owner)
        .detail(format!("{n} request(s) rejected: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::events::EventFilter;

    fn all(s: &Store, kind: &str) -> Vec<crate::store::events::Event> {
        s.with(|c| {
            events::query(
                c,
                &EventFilter {
                    kinds: vec![kind.into()],
                    limit: 1000,
                    ..Default::default()
                },
            )
        })
        .unwrap()
    }

    #[tokio::test]
    async fn rate_limited_events_coalesce_per_user() {
        let (s, _d) = crate::store::testutil::store();
        let log = EventLog::new(s.clone(), EventsConfig::default());
        for _ in 0..50 {
            log.rejected("alice", &Rejection::RateLimited("slow down".into()));
        }
        log.rejected("bob", &Rejection::RateLimited("slow down".into()));
        // One event at once per user, the rest of the burst a second later.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ev = all(&s, "rate_limited");
            let alice: Vec<_> = ev
                .iter()
                .filter(|e| e.owner.as_deref() == Some("alice"))
                .collect();
            if alice.len() == 2 {
                assert!(alice[0].detail.as_deref().unwrap().starts_with("1 request"));
                assert!(
                    alice[1]
                        .detail
                        .as_deref()
                        .unwrap()
                        .starts_with("49 request"),
                    "{:?}",
                    alice[1]
                );
                assert!(alice[1].at - alice[0].at >= 900, "{alice:?}");
                assert_eq!(ev.len(), 3, "{ev:?}");
                break;
            }
            assert!(alice.len() < 2 && Instant::now() < deadline, "{ev:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn quota_rejections_and_failures_are_recorded() {
        let (s, _d) = crate::store::testutil::store();
        let log = EventLog::new(s.clone(), EventsConfig::default());
        log.rejected("alice", &Rejection::Quota("too many sandboxes".into()));
        let t0 = Instant::now();
        log.outcome("alice", "sb1", "stop", t0, None).await;
        let bad = crate::api::ApiError::BadGateway("lost /var/lib/bhatti/run/x/vsock".into());
        log.outcome("alice", "sb1", "stop", t0, Some(&bad)).await;
        let refused = crate::api::ApiError::Conflict("busy".into());
        log.outcome("alice", "sb1", "stop", t0, Some(&refused))
            .await;
        assert_eq!(all(&s, "stop").len(), 1);
        let failed = all(&s, "stop_failed");
        // What the client was told: no host paths.
        let detail = failed[0].detail.as_deref().expect("detail");
        assert!(
            detail.starts_with("lost ") && !detail.contains("/var/lib"),
            "{detail}"
        );
        assert!(failed[0].latency_ms.is_some());
        let deadline = Instant::now() + Duration::from_secs(10);
        while all(&s, "quota_rejected").is_empty() {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
