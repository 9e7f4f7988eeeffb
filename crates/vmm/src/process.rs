//! VMM processes that outlive the daemon.
//!
//! Each VMM runs in its own process group with its output appended to the
//! VM's console log, and its pid written to `<run_dir>/vmm.pid`, so a
//! restarted daemon can find and adopt it. While the daemon that started it
//! lives, a task waits on the child so it never lingers as a zombie.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::{Result, VmmError};

/// File under the run dir holding the VMM's pid.
pub const PID_FILE: &str = "vmm.pid";

#[derive(Debug, Clone)]
pub struct VmmProcess {
    pid: u32,
    /// Set when our own child exits; `None` for adopted processes.
    exited: Option<watch::Receiver<bool>>,
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
        if let Some(ns) = netns {
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
        let mut child = cmd
            .spawn()
            .map_err(|e| VmmError::Spawn(format!("{}: {e}", binary.display())))?;
        let pid = child
            .id()
            .ok_or_else(|| VmmError::Spawn("the VMM exited at once".into()))?;
        std::fs::write(run_dir.join(PID_FILE), pid.to_string())
            .map_err(|e| VmmError::io("writing the pid file", e))?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let _ = child.wait().await;
            let _ = tx.send(true);
        });
        Ok(VmmProcess {
            pid,
            exited: Some(rx),
        })
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
        Ok(VmmProcess { pid, exited: None })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn is_alive(&self) -> bool {
        match &self.exited {
            Some(rx) => !*rx.borrow(),
            None => pid_alive(self.pid),
        }
    }

    /// SIGKILLs the process and waits until it is gone.
    pub async fn kill(&self) -> Result<()> {
        if !self.is_alive() {
            return Ok(());
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::SIGKILL,
        );
        self.wait_gone(Duration::from_secs(10)).await
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_gone(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        if let Some(rx) = &self.exited {
            let mut rx = rx.clone();
            return tokio::time::timeout(timeout, rx.wait_for(|e| *e))
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
