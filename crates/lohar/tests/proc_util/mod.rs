//! Process-tree helpers for the exec and PTY tests: find and kill what an
//! agent started, so no test leaves processes behind even when it fails.
#![allow(dead_code)]

use std::ops::Deref;

use crate::common::TestAgent;

/// (pid, ppid, state) of every process, from /proc.
pub fn processes() -> Vec<(i32, i32, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces and parentheses: split after
        // the last ')'.
        let rest = stat.rsplit_once(')')?.1;
        let mut fields = rest.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let ppid = fields.next()?.parse().ok()?;
        Some((pid, ppid, state))
    })
    .collect()
}

/// Direct children of `pid` that are zombies.
pub fn zombie_children(pid: i32) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|&(_, ppid, st)| ppid == pid && st == 'Z')
        .map(|(p, _, _)| p)
        .collect()
}

/// Every descendant of `pid`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let all = processes();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(c, pp, _) in &all {
            if pp == p && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// True if /proc has an entry for `pid` at all (zombies included).
pub fn pid_exists(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A test agent that SIGKILLs everything it started when dropped, before
/// the agent itself goes.
pub struct Agent(pub TestAgent);

impl Agent {
    pub fn start(extra: &[&str]) -> Agent {
        Agent(TestAgent::start(extra))
    }
}

impl Deref for Agent {
    type Target = TestAgent;
    fn deref(&self) -> &TestAgent {
        &self.0
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Session leaders and detached commands have left the agent's
        // process group, so killing the agent alone would leak them.
        let agent = self.0.pid() as i32;
        for pid in descendants(agent) {
            // SAFETY: kill(2) with plain integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Let the agent reap them: orphaned zombies would outlive the test.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !descendants(agent).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
