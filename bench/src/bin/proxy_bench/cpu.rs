//! Where the CPU goes during a load: CPU time by thread name in this
//! process (the daemon's scheduler is the main thread) and of lohar, from
//! `/proc`, as shares of one CPU over a window.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

/// utime + stime (clock ticks) of a `/proc/…/stat` line.
fn ticks(stat: &str) -> Option<u64> {
    let f: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU ticks so far, by thread name (this process) and "lohar".
pub struct Cpu {
    at: Instant,
    ticks: BTreeMap<String, u64>,
}

/// A thread's (or lohar's) share of one CPU over a window.
#[derive(Debug, Clone, Serialize)]
pub struct Share {
    pub who: String,
    pub cpu: f64,
}

impl Cpu {
    pub fn now(lohar: &[u32]) -> Cpu {
        let mut ticks: BTreeMap<String, u64> = BTreeMap::new();
        let me = std::process::id();
        for t in std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = t.path();
            let (Ok(stat), Ok(comm)) = (
                std::fs::read_to_string(p.join("stat")),
                std::fs::read_to_string(p.join("comm")),
            ) else {
                continue;
            };
            let name = if t.file_name().to_string_lossy() == me.to_string() {
                "daemon (main thread)".to_owned()
            } else {
                comm.trim().to_owned()
            };
            *ticks.entry(name).or_default() += ticks_of(&stat);
        }
        for pid in lohar {
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                *ticks.entry("lohar".into()).or_default() += ticks_of(&stat);
            }
        }
        Cpu {
            at: Instant::now(),
            ticks,
        }
    }

    /// Shares of one CPU since `before` (≥ 1 %), largest first.
    pub fn since(&self, before: &Cpu) -> Vec<Share> {
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let secs = (self.at - before.at).as_secs_f64().max(1e-3);
        let mut v: Vec<Share> = self
            .ticks
            .iter()
            .map(|(who, t)| Share {
                who: who.clone(),
                cpu: t.saturating_sub(before.ticks.get(who).copied().unwrap_or(0)) as f64
                    / hz
                    / secs,
            })
            .filter(|s| s.cpu >= 0.01)
            .collect();
        v.sort_by(|a, b| b.cpu.total_cmp(&a.cpu));
        v
    }
}

fn ticks_of(stat: &str) -> u64 {
    ticks(stat).unwrap_or(0)
}
