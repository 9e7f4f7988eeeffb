//! The manager's timing against a fake fleet, with tokio's paused clock.

use super::*;

#[derive(Debug, Default)]
struct FakeFleet {
    inner: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    states: HashMap<String, SandboxState>,
    /// Guest: last active, running execs.
    guest: HashMap<String, (Instant, u32)>,
    cools: Vec<(String, Action)>,
    fail_cool: bool,
}

impl FakeFleet {
    fn add(&self, id: &str) {
        let mut s = self.inner.lock().unwrap();
        s.states.insert(id.into(), SandboxState::Running);
        s.guest.insert(id.into(), (Instant::now(), 0));
    }
    fn state_of(&self, id: &str) -> SandboxState {
        self.inner.lock().unwrap().states[id]
    }
    fn set_execs(&self, id: &str, n: u32) {
        let mut s = self.inner.lock().unwrap();
        s.guest.insert(id.into(), (Instant::now(), n));
    }
    fn wake(&self, id: &str) {
        self.inner
            .lock()
            .unwrap()
            .states
            .insert(id.into(), SandboxState::Running);
    }
    fn cools(&self) -> Vec<(String, Action)> {
        self.inner.lock().unwrap().cools.clone()
    }
}

impl Fleet for FakeFleet {
    fn states(&self) -> Vec<(String, SandboxState)> {
        let s = self.inner.lock().unwrap();
        let mut v: Vec<_> = s.states.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
    fn state(&self, id: &str) -> Option<SandboxState> {
        self.inner.lock().unwrap().states.get(id).copied()
    }
    fn activity<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Activity>> {
        Box::pin(async move {
            let s = self.inner.lock().unwrap();
            if s.states.get(id) != Some(&SandboxState::Running) {
                return None;
            }
            let (last, execs) = *s.guest.get(id)?;
            Some(Activity {
                idle_ms: last.elapsed().as_millis() as u64,
                running_execs: execs,
                attached_sessions: 0,
                running_sessions: 0,
                open_forwards: 0,
            })
        })
    }
    fn cool<'a>(
        &'a self,
        id: &'a str,
        action: Action,
        still: Still,
    ) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let mut s = self.inner.lock().unwrap();
            let st = s.states[id];
            if !still(st) {
                return Ok(false);
            }
            s.cools.push((id.into(), action));
            if s.fail_cool {
                return Err("disk full".into());
            }
            let to = match action {
                Action::Pause => SandboxState::Paused,
                _ => SandboxState::Stopped,
            };
            s.states.insert(id.into(), to);
            Ok(true)
        })
    }
}

fn config() -> ThermalConfig {
    ThermalConfig {
        warm_after_secs: 2,
        cold_after_secs: 6,
        sweep_interval_ms: 100,
    }
}

async fn at(start: Instant, ms: u64) {
    tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
}

#[tokio::test(start_paused = true)]
async fn idle_sandbox_goes_warm_then_cold_on_time() {
    let fleet = Arc::new(FakeFleet::default());
    fleet.add("a");
    let start = Instant::now();
    let m = ThermalManager::spawn_with(fleet.clone(), &config());
    let h = m.handle();
    at(start, 1800).await;
    assert_eq!(fleet.state_of("a"), SandboxState::Running);
    let info = h.info("a").unwrap();
    assert_eq!(info.state, ThermalState::Hot);
    assert!(info.warm_at_unix_ms.is_some() && info.cold_at_unix_ms.is_some());
    at(start, 2200).await;
    assert_eq!(fleet.state_of("a"), SandboxState::Paused);
    at(start, 5800).await;
    assert_eq!(fleet.state_of("a"), SandboxState::Paused);
    at(start, 6200).await;
    assert_eq!(fleet.state_of("a"), SandboxState::Stopped);
    assert_eq!(
        fleet.cools(),
        vec![
            ("a".into(), Action::Pause),
            ("a".into(), Action::SnapshotCold)
        ]
    );
    let ev = h.events(&EventQuery::default());
    let kinds: Vec<_> = ev.iter().rev().map(|e| (e.kind, e.from, e.to)).collect();
    assert_eq!(
        kinds,
        vec![
            (
                ThermalEventKind::Warm,
                ThermalState::Hot,
                ThermalState::Warm
            ),
            (
                ThermalEventKind::Cold,
                ThermalState::Warm,
                ThermalState::Cold
            ),
        ]
    );
    let info = h.info("a").unwrap();
    assert_eq!(info.state, ThermalState::Cold);
    assert_eq!(info.warm_at_unix_ms, None);
}

#[tokio::test(start_paused = true)]
async fn touches_restart_the_window_and_wakes_count_as_use() {
    let fleet = Arc::new(FakeFleet::default());
    fleet.add("a");
    let start = Instant::now();
    let m = ThermalManager::spawn_with(fleet.clone(), &config());
    let h = m.handle();
    for i in 1..=5 {
        at(start, i * 1000).await;
        h.touch("a");
    }
    at(start, 6900).await;
    assert_eq!(fleet.state_of("a"), SandboxState::Running);
    at(start, 7200).await;
    assert_eq!(fleet.state_of("a"), SandboxState::Paused);
    // Woken by someone else (e.g. `start`): a fresh window.
    fleet.wake("a");
    at(start, 8500).await;
    assert_eq!(fleet.state_of("a"), SandboxState::Running);
    at(start, 9500).await;
    assert_eq!(fleet.state_of("a"), SandboxState::Paused);
}

#[tokio::test(start_paused = true)]
async fn a_long_exec_keeps_it_hot_and_keep_hot_pins_it() {
    let fleet = Arc::new(FakeFleet::default());
    fleet.add("busy");
    fleet.add("pinned");
    fleet.set_execs("busy", 1);
    let start = Instant::now();
    let m = ThermalManager::spawn_with(fleet.clone(), &config());
    let h = m.handle();
    h.set_keep_hot("pinned", true);
    at(start, 3_600_000).await;
    assert_eq!(fleet.state_of("busy"), SandboxState::Running);
    assert_eq!(fleet.state_of("pinned"), SandboxState::Running);
    assert!(fleet.cools().is_empty());
    assert!(h.info("pinned").unwrap().keep_hot);
    assert_eq!(h.info("busy").unwrap().running_execs, Some(1));
    // The exec ends: its output was the last activity.
    fleet.set_execs("busy", 0);
    let t = Instant::now();
    tokio::time::sleep_until(t + Duration::from_millis(1900)).await;
    assert_eq!(fleet.state_of("busy"), SandboxState::Running);
    tokio::time::sleep_until(t + Duration::from_millis(2300)).await;
    assert_eq!(fleet.state_of("busy"), SandboxState::Paused);
    // PATCH keep_hot=false.
    h.set_keep_hot("pinned", false);
    tokio::time::sleep_until(t + Duration::from_millis(2500)).await;
    // Idle for an hour already: straight to cold.
    assert_eq!(fleet.state_of("pinned"), SandboxState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_touch_after_the_decision_cancels_the_cool_down() {
    // The engine runs `still` under the sandbox lock; a touch in between
    // the decision and the lock makes it refuse.
    let fleet = Arc::new(FakeFleet::default());
    fleet.add("a");
    let m = ThermalManager::spawn_with(fleet.clone(), &config());
    let h = m.handle();
    let touches = {
        let t = h.shared.table.lock().unwrap();
        t.get("a").map(|e| e.touches).unwrap_or(0)
    };
    h.touch("a");
    let me = h.shared.clone();
    let still: Still = Box::new(move |_| {
        me.table
            .lock()
            .unwrap()
            .get("a")
            .is_some_and(|e| e.touches == touches)
    });
    assert_eq!(fleet.cool("a", Action::Pause, still).await, Ok(false));
    assert_eq!(fleet.state_of("a"), SandboxState::Running);
}

#[tokio::test(start_paused = true)]
async fn a_failing_cool_down_backs_off_instead_of_looping() {
    let fleet = Arc::new(FakeFleet::default());
    fleet.add("a");
    fleet.inner.lock().unwrap().fail_cool = true;
    let start = Instant::now();
    let m = ThermalManager::spawn_with(fleet.clone(), &config());
    let h = m.handle();
    at(start, 120_000).await;
    // At 2 s, then after 30 s and 60 s of backoff: three attempts.
    assert_eq!(fleet.cools().len(), 3, "{:?}", fleet.cools());
    assert!(h
        .info("a")
        .unwrap()
        .last_error
        .unwrap()
        .contains("disk full"));
    let failed = h.events(&EventQuery::default());
    assert!(failed
        .iter()
        .all(|e| e.kind == ThermalEventKind::CoolFailed));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_manager_stops_it() {
    let fleet = Arc::new(FakeFleet::default());
    fleet.add("a");
    let start = Instant::now();
    let m = ThermalManager::spawn_with(fleet.clone(), &config());
    let weak = Arc::downgrade(&m.handle().shared);
    drop(m);
    at(start, 10_000).await;
    assert!(fleet.cools().is_empty());
    assert!(weak.upgrade().is_none(), "the task still holds its state");
}
