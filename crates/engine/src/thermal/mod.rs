//! Thermal management: idle sandboxes go warm (vCPUs paused) and then cold
//! (snapshot on disk, VMM gone), and wake on demand.
//!
//! - [`policy`]: a pure function from what is known about a sandbox (last
//!   API touch, the guest agent's activity report, `keep_hot`, its state,
//!   the timers) to an [`Action`].
//! - The manager ([`ThermalManager::spawn`]): one background task that
//!   sweeps every `sweep_interval_ms` (and when notified). For each hot
//!   sandbox it asks the agent for its activity over the connection the
//!   engine already has (never waking anything to ask), decides, and
//!   pauses or snapshots it through the engine; the engine re-checks under
//!   the sandbox's lock that no request touched it since the decision
//!   ([`Engine::pause_if`]), so a request never finds a sandbox it just
//!   used paused behind its back. Actions run as their own tasks, one at a
//!   time per sandbox; a failed one is retried with backoff, never in a
//!   loop. The task stops when the [`ThermalManager`] (a drop guard) is
//!   dropped.
//! - [`ThermalHandle`]: what the API holds. [`ThermalHandle::agent`] is
//!   `Engine::agent` plus bookkeeping (touch, wake event with its latency);
//!   [`ThermalHandle::info`] is what `inspect` shows; [`ThermalHandle::events`]
//!   queries the ring of transitions (also written to the store).
//!
//! Idle means: no API request touched the guest within the window, and the
//! agent reports no activity within it, no running exec, no attached
//! session and no open forward. A hot sandbox whose agent cannot be asked
//! is never cooled.

mod config;
pub mod events;
pub mod policy;
mod records;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bhatti_protocol::{Activity, AgentClient};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::engine::{Engine, EngineError, SandboxState, WakeReport};

pub use config::ThermalConfig;
pub use records::{Records, SandboxRecord};

pub use events::{EventQuery, ThermalEvent, ThermalEventKind};
pub use policy::{decide, Action, GuestActivity, PolicyInput, ThermalState, Timers};

/// How long the agent may take to report its activity.
const ACTIVITY_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failed pause or snapshot; doubles up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);

/// The thermal state of an engine state (as the API shows it).
pub fn thermal_of(state: SandboxState) -> ThermalState {
    match state {
        SandboxState::Running | SandboxState::Creating => ThermalState::Hot,
        SandboxState::Paused => ThermalState::Warm,
        SandboxState::Stopped | SandboxState::Failed => ThermalState::Cold,
    }
}

/// A check run under the sandbox's lock right before it is cooled.
pub type Still = Box<dyn FnOnce(SandboxState) -> bool + Send>;

/// What the manager needs from the engine (a fake in unit tests).
pub trait Fleet: Send + Sync + Debug + 'static {
    /// Every sandbox and its state; never waits for operations.
    fn states(&self) -> Vec<(String, SandboxState)>;
    /// One sandbox's state.
    fn state(&self, id: &str) -> Option<SandboxState>;
    /// The guest agent's activity report, if the sandbox runs and its
    /// agent answers. Never wakes the sandbox.
    fn activity<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Activity>>;
    /// Pauses ([`Action::Pause`]) or snapshots ([`Action::SnapshotCold`])
    /// the sandbox if `still` holds under its lock; `Ok(true)` when done.
    fn cool<'a>(
        &'a self,
        id: &'a str,
        action: Action,
        still: Still,
    ) -> BoxFuture<'a, Result<bool, String>>;
}

impl Fleet for Engine {
    fn states(&self) -> Vec<(String, SandboxState)> {
        self.list().into_iter().map(|s| (s.id, s.state)).collect()
    }

    fn state(&self, id: &str) -> Option<SandboxState> {
        self.get(id).ok().map(|s| s.state)
    }

    fn activity<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Activity>> {
        Box::pin(async move {
            let client = match self.agent_if_connected(id).await {
                Some(c) => c,
                // Running without an open connection (e.g. adopted after a
                // daemon restart): connecting is not waking.
                None => self.agent_if_running(id).await?,
            };
            client.activity().await.ok()
        })
    }

    fn cool<'a>(
        &'a self,
        id: &'a str,
        action: Action,
        still: Still,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let r = match action {
                Action::None => return Ok(false),
                Action::Pause => self.pause_if(id, still).await,
                Action::SnapshotCold => self.snapshot_if(id, still).await,
            };
            r.map_err(|e| e.to_string())
        })
    }
}

/// What `inspect` shows about a sandbox's thermal life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ThermalInfo {
    pub state: ThermalState,
    pub keep_hot: bool,
    /// The configured windows (0: never).
    pub warm_after_secs: u64,
    pub cold_after_secs: u64,
    /// Last API request touching the guest or guest activity (unix ms).
    pub last_active_unix_ms: i64,
    pub idle_ms: u64,
    /// When it goes warm / cold if nothing happens (unix ms); absent when
    /// it never will from here (keep_hot, busy, disabled, already past).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_at_unix_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_at_unix_ms: Option<i64>,
    /// The agent's last report (hot sandboxes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_execs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_sessions: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_forwards: Option<u32>,
    /// The last failed pause/snapshot, while it waits to be retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Per-sandbox bookkeeping.
#[derive(Debug)]
struct Entry {
    last_touch: Instant,
    /// Bumped by every touch; a cool-down re-checks it under the lock.
    touches: u64,
    guest: Option<GuestActivity>,
    keep_hot: bool,
    owner: Option<String>,
    /// The state the manager last saw or made.
    seen: Option<ThermalState>,
    /// An evaluation or action task runs for it.
    in_flight: bool,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            last_touch: now,
            touches: 0,
            guest: None,
            keep_hot: false,
            owner: None,
            seen: None,
            in_flight: false,
            failures: 0,
            retry_at: None,
            last_error: None,
        }
    }

    fn touch(&mut self, now: Instant) {
        self.last_touch = self.last_touch.max(now);
        self.touches += 1;
    }
}

struct Shared {
    fleet: Arc<dyn Fleet>,
    engine: Option<Engine>,
    store: Option<Arc<dyn Records>>,
    config: ThermalConfig,
    timers: Timers,
    table: Mutex<HashMap<String, Entry>>,
    ring: Mutex<events::Ring>,
    notify: Notify,
    shutdown: AtomicBool,
}

impl Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The running manager; dropping it stops the background task (actions in
/// flight finish first).
#[derive(Debug)]
pub struct ThermalManager {
    handle: ThermalHandle,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A cheap, clonable handle for the API.
#[derive(Debug, Clone)]
pub struct ThermalHandle {
    shared: Arc<Shared>,
}

impl ThermalManager {
    /// Starts the manager over `engine` (store: events are also written
    /// there, and `keep_hot`/owners are read from its sandboxes).
    pub fn spawn(
        engine: Engine,
        store: Option<Arc<dyn Records>>,
        config: &ThermalConfig,
    ) -> ThermalManager {
        Self::spawn_inner(Arc::new(engine.clone()), Some(engine), store, config)
    }

    /// Starts the manager over any [`Fleet`] (tests).
    pub fn spawn_with(fleet: Arc<dyn Fleet>, config: &ThermalConfig) -> ThermalManager {
        Self::spawn_inner(fleet, None, None, config)
    }

    fn spawn_inner(
        fleet: Arc<dyn Fleet>,
        engine: Option<Engine>,
        store: Option<Arc<dyn Records>>,
        config: &ThermalConfig,
    ) -> ThermalManager {
        let shared = Arc::new(Shared {
            fleet,
            engine,
            store,
            config: config.clone(),
            timers: Timers::from(config),
            table: Mutex::new(HashMap::new()),
            ring: Mutex::new(events::Ring::default()),
            notify: Notify::new(),
            shutdown: AtomicBool::new(false),
        });
        let task = tokio::spawn(run(shared.clone()));
        ThermalManager {
            handle: ThermalHandle { shared },
            task: Some(task),
        }
    }

    pub fn handle(&self) -> ThermalHandle {
        self.handle.clone()
    }

    /// Stops the sweeper and waits until its evaluations in flight have
    /// finished (no pause or snapshot is cut off half way).
    pub async fn shutdown(mut self) {
        self.handle.shared.shutdown.store(true, Ordering::SeqCst);
        self.handle.shared.notify.notify_one();
        if let Some(t) = self.task.take() {
            if let Err(e) = t.await {
                tracing::warn!("the thermal manager ended with {e}");
            }
        }
    }
}

impl Drop for ThermalManager {
    fn drop(&mut self) {
        self.handle.shared.shutdown.store(true, Ordering::SeqCst);
        self.handle.shared.notify.notify_one();
    }
}

impl ThermalHandle {
    /// An API request is about to touch the guest: restarts its idle
    /// window. Call it before waking the sandbox (see [`Self::agent`]).
    pub fn touch(&self, id: &str) {
        let id = &self.canonical(id);
        let now = Instant::now();
        let mut t = self
            .shared
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.entry(id.to_owned())
            .or_insert_with(|| Entry::new(now))
            .touch(now);
    }

    /// The sandbox's agent, woken first (exactly one wake for concurrent
    /// callers); records the touch and the wake (with its latency) or the
    /// failed wake. The error of a failed wake is returned, never retried.
    pub async fn agent(&self, id: &str) -> Result<AgentClient, EngineError> {
        let engine = self
            .shared
            .engine
            .as_ref()
            .expect("ThermalHandle::agent needs the manager spawned over an engine");
        let id = &self.canonical(id);
        self.touch(id);
        let (client, report) = engine.agent_reporting(id).await;
        if let Some(r) = report {
            self.record_wake(id, &r);
        }
        if client.is_ok() {
            self.touch(id);
        }
        client
    }

    /// A sandbox's id, given its id or name (the table is keyed by id).
    fn canonical(&self, id_or_name: &str) -> String {
        match &self.shared.engine {
            Some(e) => e
                .get(id_or_name)
                .map(|s| s.id)
                .unwrap_or_else(|_| id_or_name.to_owned()),
            None => id_or_name.to_owned(),
        }
    }

    /// Records a wake done through [`Engine::agent_reporting`] directly.
    pub fn record_wake(&self, id: &str, r: &WakeReport) {
        let from = thermal_of(r.from);
        let now = Instant::now();
        let owner = {
            let mut t = self
                .shared
                .table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let e = t.entry(id.to_owned()).or_insert_with(|| Entry::new(now));
            if r.error.is_none() {
                e.seen = Some(ThermalState::Hot);
                e.touch(now);
            }
            e.owner.clone()
        };
        let (kind, to) = match &r.error {
            None => (ThermalEventKind::Wake, ThermalState::Hot),
            Some(_) => (ThermalEventKind::WakeFailed, from),
        };
        self.shared.record(
            owner,
            id,
            kind,
            from,
            to,
            r.latency,
            r.error.as_ref().map(|e| first_line(e)),
        );
    }

    /// Sets `keep_hot` (PATCH). With a store it is also re-read from the
    /// sandboxes table at every sweep, so write the row first.
    pub fn set_keep_hot(&self, id: &str, keep_hot: bool) {
        let id = &self.canonical(id);
        let now = Instant::now();
        {
            let mut t = self
                .shared
                .table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            t.entry(id.to_owned())
                .or_insert_with(|| Entry::new(now))
                .keep_hot = keep_hot;
        }
        self.shared.notify.notify_one();
    }

    /// Forgets a destroyed sandbox (the sweep also notices).
    pub fn forget(&self, id: &str) {
        self.shared
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    /// Runs a sweep now.
    pub fn sweep_now(&self) {
        self.shared.notify.notify_one();
    }

    /// The configuration in force.
    pub fn config(&self) -> &ThermalConfig {
        &self.shared.config
    }

    /// What `inspect` shows; `None` for an unknown sandbox.
    pub fn info(&self, id: &str) -> Option<ThermalInfo> {
        let state = self.shared.fleet.state(id)?;
        let id = &self.canonical(id);
        let th = thermal_of(state);
        let now = Instant::now();
        let t = self
            .shared
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let e = t.get(id);
        let input = PolicyInput {
            now,
            last_touch: e.map(|e| e.last_touch).unwrap_or(now),
            guest: e.and_then(|e| e.guest),
            keep_hot: e.is_some_and(|e| e.keep_hot),
            state: th,
            timers: self.shared.timers,
        };
        let (warm_at, cold_at) = if th == ThermalState::Cold {
            (None, None)
        } else {
            input.deadlines()
        };
        let hot_guest = input.guest.filter(|_| th == ThermalState::Hot);
        Some(ThermalInfo {
            state: th,
            keep_hot: input.keep_hot,
            warm_after_secs: self.shared.config.warm_after_secs,
            cold_after_secs: self.shared.config.cold_after_secs,
            last_active_unix_ms: unix_ms(input.last_active()),
            idle_ms: input.idle_for().as_millis() as u64,
            warm_at_unix_ms: warm_at.map(unix_ms),
            cold_at_unix_ms: cold_at.map(unix_ms),
            running_execs: hot_guest.map(|g| g.running_execs),
            attached_sessions: hot_guest.map(|g| g.attached_sessions),
            open_forwards: hot_guest.map(|g| g.open_forwards),
            last_error: e.and_then(|e| e.last_error.clone()),
        })
    }

    /// Transitions, newest first (`GET /events`, `bhatti admin events`).
    pub fn events(&self, q: &EventQuery) -> Vec<ThermalEvent> {
        self.shared
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .query(q)
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

/// An `Instant` as unix milliseconds.
fn unix_ms(t: Instant) -> i64 {
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let now = Instant::now();
    if t >= now {
        now_unix + (t - now).as_millis() as i64
    } else {
        now_unix - (now - t).as_millis() as i64
    }
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        owner: Option<String>,
        id: &str,
        kind: ThermalEventKind,
        from: ThermalState,
        to: ThermalState,
        latency: Duration,
        detail: Option<String>,
    ) {
        let e = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(ThermalEvent {
                seq: 0,
                at_unix_ms: unix_ms(Instant::now()),
                sandbox_id: id.to_owned(),
                kind,
                from,
                to,
                latency_ms: latency.as_secs_f64() * 1000.0,
                detail,
            });
        tracing::info!(
            id,
            kind = kind.as_str(),
            %from,
            %to,
            latency_ms = e.latency_ms,
            detail = e.detail.as_deref().unwrap_or(""),
            "thermal"
        );
        if let Some(store) = &self.store {
            let store = store.clone();
            tokio::spawn(async move { store.record(owner, e).await });
        }
    }

    /// `keep_hot` and owners from the store's rows.
    async fn refresh_from_store(&self) {
        let Some(store) = &self.store else {
            return;
        };
        match store.sandboxes().await {
            Ok(rows) => {
                let now = Instant::now();
                let mut t = self
                    .table
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for r in rows {
                    let e = t.entry(r.id).or_insert_with(|| Entry::new(now));
                    e.keep_hot = r.keep_hot;
                    e.owner = Some(r.owner);
                }
            }
            Err(e) => tracing::warn!("thermal: reading keep_hot from the store: {e}"),
        }
    }

    /// One pass over all sandboxes: starts an evaluation task for each
    /// that may need one.
    async fn sweep(self: &Arc<Self>, tasks: &mut JoinSet<()>) {
        self.refresh_from_store().await;
        let states = self.fleet.states();
        let now = Instant::now();
        let mut t = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.retain(|id, _| states.iter().any(|(s, _)| s == id));
        for (id, state) in states {
            let th = match state {
                SandboxState::Running => ThermalState::Hot,
                SandboxState::Paused => ThermalState::Warm,
                _ => {
                    if let Some(e) = t.get_mut(&id) {
                        e.seen = Some(thermal_of(state));
                    }
                    continue;
                }
            };
            let e = t.entry(id.clone()).or_insert_with(|| Entry::new(now));
            if e.seen != Some(th) {
                // Woken (or paused) by someone else: that counts as use.
                if th == ThermalState::Hot && e.seen.is_some() {
                    e.touch(now);
                }
                e.seen = Some(th);
            }
            if e.in_flight || e.keep_hot || e.retry_at.is_some_and(|r| now < r) {
                continue;
            }
            e.in_flight = true;
            let me = self.clone();
            tasks.spawn(async move {
                me.evaluate(&id, th).await;
                if let Some(e) = me
                    .table
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_mut(&id)
                {
                    e.in_flight = false;
                }
            });
        }
    }

    /// Asks, decides and acts for one sandbox.
    async fn evaluate(self: &Arc<Self>, id: &str, th: ThermalState) {
        let guest = if th == ThermalState::Hot {
            let a = tokio::time::timeout(ACTIVITY_TIMEOUT, self.fleet.activity(id))
                .await
                .ok()
                .flatten();
            let g = a.map(|a| GuestActivity::from_agent(Instant::now(), &a));
            if let Some(e) = self
                .table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_mut(id)
            {
                e.guest = g;
            }
            g
        } else {
            None
        };
        let (input, touches, owner) = {
            let t = self
                .table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(e) = t.get(id) else {
                return;
            };
            let input = PolicyInput {
                now: Instant::now(),
                last_touch: e.last_touch,
                // Warm: the last report before it was paused.
                guest: if th == ThermalState::Hot {
                    guest
                } else {
                    e.guest
                },
                keep_hot: e.keep_hot,
                state: th,
                timers: self.timers,
            };
            (input, e.touches, e.owner.clone())
        };
        let action = decide(&input);
        if action == Action::None {
            return;
        }
        let still: Still = {
            let me = self.clone();
            let id = id.to_owned();
            Box::new(move |_state| {
                let t = me
                    .table
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                t.get(&id)
                    .is_some_and(|e| e.touches == touches && !e.keep_hot)
            })
        };
        let started = Instant::now();
        let r = self.fleet.cool(id, action, still).await;
        let latency = started.elapsed();
        let to = match action {
            Action::Pause => ThermalState::Warm,
            _ => ThermalState::Cold,
        };
        match r {
            Ok(true) => {
                if let Some(e) = self
                    .table
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_mut(id)
                {
                    e.seen = Some(to);
                    e.failures = 0;
                    e.retry_at = None;
                    e.last_error = None;
                }
                let kind = match to {
                    ThermalState::Warm => ThermalEventKind::Warm,
                    _ => ThermalEventKind::Cold,
                };
                self.record(owner, id, kind, th, to, latency, None);
            }
            Ok(false) => {}
            Err(err) => {
                let backoff = {
                    let mut t = self
                        .table
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let Some(e) = t.get_mut(id) else {
                        return;
                    };
                    let backoff = FIRST_BACKOFF
                        .saturating_mul(1 << e.failures.min(10))
                        .min(MAX_BACKOFF);
                    e.failures += 1;
                    e.retry_at = Some(Instant::now() + backoff);
                    e.last_error = Some(first_line(&err));
                    backoff
                };
                self.record(
                    owner,
                    id,
                    ThermalEventKind::CoolFailed,
                    th,
                    th,
                    latency,
                    Some(format!(
                        "{} (retry in {}s)",
                        first_line(&err),
                        backoff.as_secs()
                    )),
                );
            }
        }
    }
}

/// The manager's task: sweeps on its interval and when notified, until
/// the [`ThermalManager`] is dropped; then waits for actions in flight.
async fn run(shared: Arc<Shared>) {
    let interval = Duration::from_millis(shared.config.sweep_interval_ms.max(10));
    let mut tasks = JoinSet::new();
    let mut next = Instant::now();
    loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        tokio::select! {
            _ = shared.notify.notified() => {}
            _ = tokio::time::sleep_until(next) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        next = Instant::now() + interval;
        shared.sweep(&mut tasks).await;
    }
    while tasks.join_next().await.is_some() {}
    tracing::debug!("thermal manager stopped");
}

#[cfg(test)]
mod tests;
