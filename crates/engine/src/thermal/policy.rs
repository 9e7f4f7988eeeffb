//! The thermal policy: a pure function from what is known about a sandbox
//! to what should happen to it now.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::ThermalConfig;

/// Where a sandbox is on the idle ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ThermalState {
    /// vCPUs running.
    Hot,
    /// VMM alive, vCPUs paused.
    Warm,
    /// No VMM; memory in a snapshot on disk.
    Cold,
}

impl std::fmt::Display for ThermalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThermalState::Hot => "hot",
            ThermalState::Warm => "warm",
            ThermalState::Cold => "cold",
        })
    }
}

/// What to do with a sandbox now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// hot → warm.
    Pause,
    /// hot or warm → cold.
    SnapshotCold,
}

/// The idle windows; `None` never does that step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub warm_after: Option<Duration>,
    pub cold_after: Option<Duration>,
}

impl From<&ThermalConfig> for Timers {
    fn from(c: &ThermalConfig) -> Timers {
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Timers {
            warm_after: secs(c.warm_after_secs),
            cold_after: secs(c.cold_after_secs),
        }
    }
}

/// What the guest agent reported, and when it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestActivity {
    pub sampled_at: Instant,
    /// Time since the guest's last exec/file/session/forward activity.
    pub idle: Duration,
    pub running_execs: u32,
    pub attached_sessions: u32,
    pub open_forwards: u32,
}

impl GuestActivity {
    pub fn from_agent(sampled_at: Instant, a: &bhatti_protocol::message::Activity) -> Self {
        GuestActivity {
            sampled_at,
            idle: Duration::from_millis(a.idle_ms),
            running_execs: a.running_execs,
            attached_sessions: a.attached_sessions,
            open_forwards: a.open_forwards,
        }
    }

    /// Something runs or is attached: never cool it.
    pub fn busy(&self) -> bool {
        self.running_execs > 0 || self.attached_sessions > 0 || self.open_forwards > 0
    }

    /// When the guest was last active (by its own account).
    pub fn last_active(&self) -> Instant {
        self.sampled_at
            .checked_sub(self.idle)
            .unwrap_or(self.sampled_at)
    }
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyInput {
    pub now: Instant,
    /// The last API request that touched the guest (or the last wake, or
    /// when the manager first saw the sandbox).
    pub last_touch: Instant,
    /// For a hot sandbox: the agent's answer just now (`None`: it could not
    /// be asked, so idleness is unproven). For a warm one: the last answer
    /// before it was paused (`None`: unknown; API touches alone count).
    pub guest: Option<GuestActivity>,
    pub keep_hot: bool,
    pub state: ThermalState,
    pub timers: Timers,
}

impl PolicyInput {
    /// The last sign of life: an API touch or guest activity.
    pub fn last_active(&self) -> Instant {
        match &self.guest {
            Some(g) => self.last_touch.max(g.last_active()),
            None => self.last_touch,
        }
    }

    /// How long it has been idle.
    pub fn idle_for(&self) -> Duration {
        self.now.saturating_duration_since(self.last_active())
    }

    /// Whether nothing may cool it, whatever the timers say.
    pub fn pinned(&self) -> bool {
        self.keep_hot || self.guest.as_ref().is_some_and(GuestActivity::busy)
    }

    /// When it goes warm, when cold, if nothing happens meanwhile (`None`:
    /// never, or already past that step).
    pub fn deadlines(&self) -> (Option<Instant>, Option<Instant>) {
        if self.pinned() {
            return (None, None);
        }
        let from = self.last_active();
        let warm = match self.state {
            ThermalState::Hot => self.timers.warm_after.map(|d| from + d),
            _ => None,
        };
        let cold = match self.state {
            ThermalState::Hot | ThermalState::Warm => self.timers.cold_after.map(|d| from + d),
            ThermalState::Cold => None,
        };
        (warm, cold)
    }
}

/// The policy. Hot: cool only when the agent has just confirmed that
/// nothing runs, is attached or forwarded, and neither the API nor the
/// guest was active within the window; past `cold_after` it goes straight
/// to cold. Warm: cold once `cold_after` has passed since the last
/// activity. `keep_hot` never cools. Cold: nothing (waking is on demand).
pub fn decide(i: &PolicyInput) -> Action {
    if i.keep_hot {
        return Action::None;
    }
    let idle = i.idle_for();
    let past = |t: Option<Duration>| t.is_some_and(|t| idle >= t);
    match i.state {
        ThermalState::Hot => {
            let Some(g) = &i.guest else {
                return Action::None;
            };
            if g.busy() {
                Action::None
            } else if past(i.timers.cold_after) {
                Action::SnapshotCold
            } else if past(i.timers.warm_after) {
                Action::Pause
            } else {
                Action::None
            }
        }
        ThermalState::Warm => {
            if i.guest.as_ref().is_some_and(GuestActivity::busy) {
                Action::None
            } else if past(i.timers.cold_after) {
                Action::SnapshotCold
            } else {
                Action::None
            }
        }
        ThermalState::Cold => Action::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMERS: Timers = Timers {
        warm_after: Some(Duration::from_secs(2)),
        cold_after: Some(Duration::from_secs(6)),
    };

    fn idle_guest(now: Instant) -> GuestActivity {
        GuestActivity {
            sampled_at: now,
            idle: Duration::from_secs(3600),
            running_execs: 0,
            attached_sessions: 0,
            open_forwards: 0,
        }
    }

    fn input(start: Instant, state: ThermalState) -> PolicyInput {
        let now = Instant::now();
        PolicyInput {
            now,
            last_touch: start,
            guest: Some(idle_guest(now)),
            keep_hot: false,
            state,
            timers: TIMERS,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn hot_goes_warm_then_cold_on_time() {
        let start = Instant::now();
        assert_eq!(
            decide(&input(start, ThermalState::Hot)),
            Action::None,
            "just touched"
        );
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert_eq!(decide(&input(start, ThermalState::Hot)), Action::None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(decide(&input(start, ThermalState::Hot)), Action::Pause);
        let mut warm = input(start, ThermalState::Warm);
        warm.guest = None;
        assert_eq!(decide(&warm), Action::None);
        tokio::time::advance(Duration::from_secs(4)).await;
        let mut warm = input(start, ThermalState::Warm);
        warm.guest = None;
        assert_eq!(decide(&warm), Action::SnapshotCold);
        assert_eq!(decide(&input(start, ThermalState::Cold)), Action::None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hot_sandbox_idle_past_cold_goes_straight_cold() {
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(
            decide(&input(start, ThermalState::Hot)),
            Action::SnapshotCold
        );
        // With warm disabled, cold still comes.
        let mut i = input(start, ThermalState::Hot);
        i.timers.warm_after = None;
        assert_eq!(decide(&i), Action::SnapshotCold);
        // Both disabled: never.
        i.timers.cold_after = None;
        assert_eq!(decide(&i), Action::None);
    }

    #[tokio::test(start_paused = true)]
    async fn guest_activity_and_touches_restart_the_window() {
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        // The guest did something a second ago.
        let mut i = input(start, ThermalState::Hot);
        i.guest = Some(GuestActivity {
            idle: Duration::from_secs(1),
            ..idle_guest(now)
        });
        assert_eq!(decide(&i), Action::None);
        assert_eq!(i.idle_for(), Duration::from_secs(1));
        let (warm_at, cold_at) = i.deadlines();
        assert_eq!(warm_at, Some(now + Duration::from_secs(1)));
        assert_eq!(cold_at, Some(now + Duration::from_secs(5)));
        // An API touch a second ago, the guest idle for long.
        let mut i = input(now - Duration::from_secs(1), ThermalState::Hot);
        i.guest = Some(idle_guest(now));
        assert_eq!(decide(&i), Action::None);
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut i = input(now - Duration::from_secs(1), ThermalState::Hot);
        i.guest = Some(idle_guest(Instant::now()));
        assert_eq!(decide(&i), Action::Pause);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_exec_attached_session_or_forward_keeps_it_hot() {
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let now = Instant::now();
        for busy in [
            GuestActivity {
                running_execs: 1,
                ..idle_guest(now)
            },
            GuestActivity {
                attached_sessions: 1,
                ..idle_guest(now)
            },
            GuestActivity {
                open_forwards: 2,
                ..idle_guest(now)
            },
        ] {
            let mut i = input(start, ThermalState::Hot);
            i.guest = Some(busy);
            assert_eq!(decide(&i), Action::None, "{busy:?}");
            assert_eq!(i.deadlines(), (None, None));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_guest_activity_never_cools_a_hot_sandbox() {
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let mut i = input(start, ThermalState::Hot);
        i.guest = None;
        assert_eq!(decide(&i), Action::None);
    }

    #[tokio::test(start_paused = true)]
    async fn keep_hot_never_cools() {
        let start = Instant::now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        for state in [ThermalState::Hot, ThermalState::Warm] {
            let mut i = input(start, state);
            i.keep_hot = true;
            assert_eq!(decide(&i), Action::None);
            assert_eq!(i.deadlines(), (None, None));
        }
    }

    #[test]
    fn timers_from_config() {
        let t = Timers::from(&ThermalConfig {
            warm_after_secs: 0,
            cold_after_secs: 60,
            sweep_interval_ms: 1000,
        });
        assert_eq!(t.warm_after, None);
        assert_eq!(t.cold_after, Some(Duration::from_secs(60)));
    }
}
