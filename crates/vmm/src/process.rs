//! VMM processes that outlive the daemon.
//!
//! Each VMM runs in its own process group with its output appended to the
//! VM's console log, and its pid written to `<run_dir>/vmm.pid`, so a
//! restarted daemon can find and adopt it. While the daemon that started it
//! lives, a task waits on the child so it never lingers as a zombie.
//!
//! A VMM may be given a cgroup ([`SpawnOptions::cgroup`]): the child joins
//! it before `exec`, and it is removed once the process is gone (by the
//! waiting task, or by [`VmmProcess::kill`] for an adopted process).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::cgroup::VmCgroup;
use crate::{Result, VmmError};

/// File under the run dir holding the VMM's pid.
pub const PID_FILE: &str = "vmm.pid";

/// Where our own child is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Running,
    /// Reaped; its cgroup may still be being removed.
    Exited,
    /// Reaped and its cgroup removed.
    Gone,
}

/// How to start a VMM beyond its command line.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    /// Network namespace (a name under `/run/netns`) to run in.
    pub netns: Option<String>,
    /// A cgroup (already created, limits written) the child joins before
    /// `exec`; removed when the process is gone.
    pub cgroup: Option<VmCgroup>,
}

#[derive(Debug, Clone)]
pub struct VmmProcess {
    pid: u32,
    /// Follows our own child; `None` for adopted processes.
    exited: Option<watch::Receiver<Stage>>,
    /// Removed once the process is gone.
    cgroup: Option<VmCgroup>,
}

impl VmmProcess {
    /// Starts `binary args…` detached from the daemon's process group.
    pub fn spawn(
        binary: &Path,
        args: &[String],
        run_dir: &Path,
        console_log: &Path,
        netns: Option<&str>,
    ) -> Result<VmmProcess> {
        let opts = SpawnOptions {
            netns: netns.map(str::to_owned),
            cgroup: None,
        };
        VmmProcess::spawn_with(binary, args, run_dir, console_log, opts)
    }

    /// [`VmmProcess::spawn`] with a cgroup and other [`SpawnOptions`].
    pub fn spawn_with(
        binary: &Path,
        args: &[String],
        run_dir: &Path,
        console_log: &Path,
        opts: SpawnOptions,
    ) -> Result<VmmProcess> {
        let r = VmmProcess::spawn_inner(binary, args, run_dir, console_log, &opts);
        if r.is_err() {
            // Nothing ever ran in it.
            if let Some(cg) = &opts.cgroup {
                let _ = cg.remove_now();
            }
        }
        r
    }

    fn spawn_inner(
        binary: &Path,
        args: &[String],
        run_dir: &Path,
        console_log: &Path,
        opts: &SpawnOptions,
    ) -> Result<VmmProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(console_log)
            .map_err(|e| VmmError::io(format!("opening {}", console_log.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| VmmError::io("duplicating the console log handle", e))?;
        let mut cmd = tokio::process::Command::new(binary);
        cmd.args(args)
            .current_dir(run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(false);
        if let Some(ns) = &opts.netns {
            let path = format!("/run/netns/{ns}");
            let ns_file = std::fs::File::open(&path)
                .map_err(|e| VmmError::io(format!("opening {path}"), e))?;
            // SAFETY: between fork and exec we only call setns(2), which is
            // async-signal-safe, on a descriptor opened before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
        }
        if let Some(cg) = &opts.cgroup {
            // Joined by the child itself before exec: the VMM never runs
            // outside its limits, and cannot fork away before being moved.
            let procs = cg.open_procs()?;
            // SAFETY: the hook only calls write(2) (async-signal-safe) on
            // descriptors opened before the fork, and allocates nothing.
            unsafe {
                cmd.pre_exec(move || crate::cgroup::join_self(&procs));
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| VmmError::Spawn(format!("{}: {e}", binary.display())))?;
        let pid = child
            .id()
            .ok_or_else(|| VmmError::Spawn("the VMM exited at once".into()))?;
        let (tx, rx) = watch::channel(Stage::Running);
        let cgroup = opts.cgroup.clone();
        tokio::spawn(async move {
            let _ = child.wait().await;
            // Reaped: from here the pid may be reused, so `is_alive` must
            // turn false before the (possibly slow) cgroup removal.
            tx.send_replace(Stage::Exited);
            if let Some(cg) = cgroup {
                if let Err(e) = cg.remove().await {
                    tracing::warn!(pid, error = %e, "removing the VMM's cgroup");
                }
            }
            tx.send_replace(Stage::Gone);
        });
        let process = VmmProcess {
            pid,
            exited: Some(rx),
            cgroup: opts.cgroup.clone(),
        };
        if let Err(e) = std::fs::write(run_dir.join(PID_FILE), pid.to_string()) {
            // Unadoptable: end it (the task above reaps it and removes its
            // cgroup).
            if process.is_alive() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::SIGKILL,
                );
            }
            return Err(VmmError::io("writing the pid file", e));
        }
        Ok(process)
    }

    /// Takes over the process named in `<run_dir>/vmm.pid`, if it is alive
    /// and its command line mentions `run_dir` (so a recycled pid is never
    /// mistaken for our VMM).
    pub fn adopt(run_dir: &Path) -> Result<VmmProcess> {
        let pid_path = run_dir.join(PID_FILE);
        let pid: u32 = std::fs::read_to_string(&pid_path)
            .map_err(|e| VmmError::io(format!("reading {}", pid_path.display()), e))?
            .trim()
            .parse()
            .map_err(|_| VmmError::Exited(format!("{} holds no pid", pid_path.display())))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let needle = run_dir.to_string_lossy();
        let mentions = String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .contains(needle.as_ref());
        if !pid_alive(pid) || !mentions {
            return Err(VmmError::Exited(format!(
                "no VMM process {pid} for {}",
                run_dir.display()
            )));
        }
        Ok(VmmProcess {
            pid,
            exited: None,
            cgroup: None,
        })
    }

    /// The cgroup an adopted process was started in (from its launch
    /// record), to remove once it is gone. Nothing is moved or created.
    pub fn with_cgroup(mut self, cgroup: Option<VmCgroup>) -> VmmProcess {
        self.cgroup = cgroup;
        self
    }

    pub fn cgroup(&self) -> Option<&VmCgroup> {
        self.cgroup.as_ref()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn is_alive(&self) -> bool {
        match &self.exited {
            Some(rx) => *rx.borrow() == Stage::Running,
            None => pid_alive(self.pid),
        }
    }

    /// SIGKILLs the process and waits until it (and its cgroup) is gone.
    pub async fn kill(&self) -> Result<()> {
        if self.is_alive() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::SIGKILL,
            );
        }
        self.wait_gone(Duration::from_secs(10)).await
    }

    /// Waits for the process to exit on its own, then for its cgroup to be
    /// removed.
    pub async fn wait_gone(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        if let Some(rx) = &self.exited {
            let mut rx = rx.clone();
            return tokio::time::timeout(timeout, rx.wait_for(|s| *s == Stage::Gone))
                .await
                .map(|_| ())
                .map_err(|_| {
                    VmmError::Timeout(timeout, format!("VMM process {} to exit", self.pid))
                });
        }
        while pid_alive(self.pid) {
            if Instant::now() > deadline {
                return Err(VmmError::Timeout(
                    timeout,
                    format!("VMM process {} to exit", self.pid),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cg.remove().await {
                tracing::warn!(pid = self.pid, error = %e, "removing the VMM's cgroup");
            }
        }
        Ok(())
    }
}

/// True if the pid exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => {
            !matches!(stat.rsplit(')').next().map(str::trim_start), Some(s) if s.starts_with('Z') || s.starts_with('X'))
        }
        Err(_) => false,
    }
}

/// Polls for a path to appear (a socket the VMM creates).
///
/// A VMM creates its socket within milliseconds, and tokio's timers tick
/// in whole milliseconds: poll every 100 µs from a blocking thread for the
/// first 50 ms (where boot latency is decided), then every millisecond.
pub async fn wait_for_path(path: &Path, timeout: Duration, proc: &VmmProcess) -> Result<()> {
    let started = Instant::now();
    let deadline = started + timeout;
    let fine = Duration::from_millis(50).min(timeout);
    let fine_path = path.to_path_buf();
    let appeared = tokio::task::spawn_blocking(move || {
        while started.elapsed() < fine {
            if fine_path.exists() {
                return true;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        false
    })
    .await
    .unwrap_or(false);
    if appeared {
        return Ok(());
    }
    while !path.exists() {
        if !proc.is_alive() {
            return Err(VmmError::Exited(format!(
                "before creating {}",
                path.display()
            )));
        }
        if Instant::now() > deadline {
            return Err(VmmError::Timeout(
                timeout,
                format!("{} to appear", path.display()),
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Finds a binary: an explicit path, else `name` on PATH.
pub fn find_binary(explicit: Option<&Path>, name: &str) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Writes what a backend needs to adopt or restore its VMM later (its
/// launch record) as `<run_dir>/<file>`.
pub fn write_record<T: serde::Serialize>(run_dir: &Path, file: &str, record: &T) -> Result<()> {
    let json = serde_json::to_vec_pretty(record)
        .map_err(|e| VmmError::io(format!("encoding {file}"), std::io::Error::other(e)))?;
    std::fs::write(run_dir.join(file), json).map_err(|e| VmmError::io(format!("writing {file}"), e))
}
