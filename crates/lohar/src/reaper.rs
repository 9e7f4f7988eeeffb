//! Child reaping that never steals an exit status.
//!
//! lohar inherits every orphan (as PID 1 in the VM, or as a child subreaper
//! in test mode), so one task reaps with `waitpid(-1, WNOHANG)` on every
//! `SIGCHLD`. A status goes to whoever registered that pid; statuses of
//! orphans are kept briefly (bounded) for [`register`] and then dropped.
//!
//! Because of `waitpid(-1)`, nothing else in lohar may wait for children
//! itself: never `tokio::process`, never `std::process::Child::wait`. Spawn
//! with [`spawn`] and await the returned receiver instead.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::spawn::{Child, Command};

/// Unclaimed statuses kept at most (orphans can be many: bounded).
const MAX_UNCLAIMED: usize = 256;
/// How long an unclaimed status waits for a late [`register`]. Short, so a
/// recycled pid is very unlikely to pick up a stale status.
const UNCLAIMED_TTL: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Registry {
    waiting: HashMap<i32, oneshot::Sender<WaitStatus>>,
    unclaimed: VecDeque<(i32, WaitStatus, Instant)>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
static STARTED: AtomicBool = AtomicBool::new(false);

fn registry() -> MutexGuard<'static, Option<Registry>> {
    // A poisoned lock only means a panic elsewhere; the map is still sound.
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the reaper task on the current tokio runtime. `pid1` is true in
/// the VM (the kernel already makes PID 1 the reaper of orphans); on the
/// host lohar asks to become a child subreaper so tests see the same.
pub fn start(pid1: bool) -> anyhow::Result<()> {
    if STARTED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    if !pid1 {
        // SAFETY: prctl with integer arguments only; no memory is shared.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            tracing::warn!(
                "PR_SET_CHILD_SUBREAPER failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    // Register for SIGCHLD before the first sweep so no exit is missed.
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            reap_all();
            if sigchld.recv().await.is_none() {
                tracing::error!("SIGCHLD stream ended; children will no longer be reaped");
                return;
            }
        }
    });
    Ok(())
}

/// Reaps every exited child now. Each `waitpid` happens under the registry
/// lock, which [`spawn`] holds across fork and registration: a child can
/// never be reaped before its waiter is in the map.
fn reap_all() {
    loop {
        let mut guard = registry();
        let reg = guard.get_or_insert_with(Registry::default);
        let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!("waitpid: {e}");
                return;
            }
            Ok(s) => s,
        };
        let Some(pid) = status.pid() else { continue };
        if !matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
            // Stops and continues are not ends; only reported if traced.
            continue;
        }
        match reg.waiting.remove(&pid.as_raw()) {
            // A dropped receiver (a detached exec) is fine: nobody cares.
            Some(tx) => {
                let _ = tx.send(status);
            }
            None => {
                let now = Instant::now();
                reg.unclaimed
                    .retain(|(_, _, at)| now.duration_since(*at) < UNCLAIMED_TTL);
                if reg.unclaimed.len() >= MAX_UNCLAIMED {
                    reg.unclaimed.pop_front();
                }
                reg.unclaimed.push_back((pid.as_raw(), status, now));
            }
        }
    }
}

/// Spawns `cmd` and registers its pid atomically with respect to the
/// reaper. The `Child` gives access to its pipes; never call its `wait`.
pub fn spawn(cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<WaitStatus>)> {
    let mut guard = registry();
    let reg = guard.get_or_insert_with(Registry::default);
    // Holding the lock also keeps the reaper away from a child whose exec
    // failed: `Command::spawn` reaps that one itself.
    let child = cmd.spawn()?;
    let (tx, rx) = oneshot::channel();
    let pid = child.id() as i32;
    // A status left over from an earlier process with this pid is stale.
    reg.unclaimed.retain(|(p, _, _)| *p != pid);
    reg.waiting.insert(pid, tx);
    Ok((child, rx))
}

/// Claims the exit status of a child forked outside [`spawn`]; if it was
/// already reaped (within the last few seconds) it is delivered at once.
#[allow(dead_code)] // for PID 1 code that forks by other means
pub fn register(pid: u32) -> oneshot::Receiver<WaitStatus> {
    let (tx, rx) = oneshot::channel();
    let mut guard = registry();
    let reg = guard.get_or_insert_with(Registry::default);
    let pid = pid as i32;
    if let Some(i) = reg.unclaimed.iter().position(|(p, _, _)| *p == pid) {
        if let Some((_, status, _)) = reg.unclaimed.remove(i) {
            let _ = tx.send(status);
            return rx;
        }
    }
    reg.waiting.insert(pid, tx);
    rx
}

/// The protocol's view of a wait status: exit code, or 128 + signal.
pub fn exit_status(status: WaitStatus, timed_out: bool) -> bhatti_protocol::ExitStatus {
    let (exit_code, signal) = match status {
        WaitStatus::Exited(_, code) => (code, None),
        WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, Some(sig as i32)),
        // Not produced by the reaper; report as an unknown failure.
        _ => (-1, None),
    };
    bhatti_protocol::ExitStatus {
        exit_code,
        signal,
        timed_out,
        pid: status.pid().map(|p| p.as_raw() as u32),
    }
}
