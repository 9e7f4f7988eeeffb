//! Bounded console logs.
//!
//! A VMM appends the guest's serial console (and its own stderr) to
//! `console.log` in the run dir, and a guest can print without end. The VMM
//! cannot rotate that file, so [`ConsoleCap`] watches it from the host and,
//! once it is longer than the cap, rewrites it in place to its last half
//! ([`compact`]).
//!
//! Why in place, with the VMM keeping its descriptors: every writer opened
//! the file `O_APPEND`, so after the truncation their next write lands at
//! the new end; nothing has to be reopened (QEMU cannot reopen it once it
//! runs unprivileged, and an adopted VMM's descriptors are out of our
//! reach), nothing is lost if the daemon is gone for a while (the file just
//! grows until the next daemon adopts the VM), and [`crate::console_tail`]
//! keeps reading the newest lines from the same path. A pipe or socket read
//! by the daemon would lose the console whenever the daemon restarts.
//!
//! The bound is the cap plus what the guest writes between two checks
//! ([`POLL`]); under a flood that is a few MiB at most.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default cap of a console log.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 20;

/// How often [`ConsoleCap`] looks at the file's size.
pub const POLL: Duration = Duration::from_millis(100);

/// Keeps one console log at most `max` bytes (plus [`POLL`]'s worth) while
/// it lives; stops when dropped.
#[derive(Debug)]
pub struct ConsoleCap {
    task: tokio::task::JoinHandle<()>,
}

impl ConsoleCap {
    /// Starts watching `path` (which may not exist yet). Needs a tokio
    /// runtime.
    pub fn spawn(path: PathBuf, max: u64) -> ConsoleCap {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let len = match std::fs::metadata(&path) {
                    Ok(m) => m.len(),
                    Err(_) => continue,
                };
                if len <= max {
                    continue;
                }
                let p = path.clone();
                match tokio::task::spawn_blocking(move || compact(&p, max)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(path = %path.display(), error = %e, "capping the console log")
                    }
                    Err(_) => return,
                }
            }
        });
        ConsoleCap { task }
    }
}

impl Drop for ConsoleCap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// If `path` is longer than `max`, rewrites it in place to a marker line
/// and its last `max / 2` bytes (from a line start), and returns the bytes
/// dropped (0 if it was short enough).
///
/// Bytes a writer appends between the last size check here and the
/// truncation are lost; under a flood that is a few bytes of it.
pub fn compact(path: &Path, max: u64) -> std::io::Result<u64> {
    // Not O_APPEND: positional writes must go where they are told.
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    let len = f.metadata()?.len();
    if len <= max {
        return Ok(0);
    }
    let keep = max / 2;
    let from = len - keep;
    let mut tail = vec![0u8; usize::try_from(keep).map_err(std::io::Error::other)?];
    f.read_exact_at(&mut tail, from)?;
    // Whatever was appended while we read.
    let mut end = len;
    loop {
        let now = f.metadata()?.len();
        if now <= end {
            break;
        }
        let mut more = vec![0u8; usize::try_from(now - end).map_err(std::io::Error::other)?];
        f.read_exact_at(&mut more, end)?;
        tail.extend_from_slice(&more);
        end = now;
    }
    // Start at a line, unless the tail is one long line.
    let skip = tail
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| i + 1)
        .filter(|&i| i < tail.len())
        .unwrap_or(0);
    let dropped = from + skip as u64;
    let marker = format!("[bhatti: {dropped} earlier bytes of console output dropped]\n");
    let mut out = Vec::with_capacity(marker.len() + tail.len() - skip);
    out.extend_from_slice(marker.as_bytes());
    out.extend_from_slice(&tail[skip..]);
    f.write_all_at(&out, 0)?;
    f.set_len(out.len() as u64)?;
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn compacts_in_place_keeping_the_tail() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        // An O_APPEND writer, like the VMM, that keeps writing afterwards.
        let mut w = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        for i in 0..1000 {
            writeln!(w, "line {i:04} {}", "x".repeat(90)).unwrap();
        }
        assert_eq!(compact(&p, 200_000).unwrap(), 0, "under the cap: untouched");
        let dropped = compact(&p, 40_000).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.len() <= 20_000 + 100, "{}", text.len());
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap(),
            format!("[bhatti: {dropped} earlier bytes of console output dropped]")
        );
        assert!(
            lines.next().unwrap().starts_with("line "),
            "starts at a line"
        );
        assert!(text.ends_with(&format!("line 0999 {}\n", "x".repeat(90))));
        writeln!(w, "after").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.ends_with("\nafter\n") && !text.contains('\0'),
            "appends follow the tail"
        );
    }

    #[tokio::test]
    async fn cap_keeps_a_growing_log_bounded() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        let _cap = ConsoleCap::spawn(p.clone(), 64 << 10);
        let mut w = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        let chunk = vec![b'y'; 8 << 10];
        for _ in 0..64 {
            w.write_all(&chunk).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(POLL * 3).await;
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len <= 64 << 10, "{len}");
    }
}
