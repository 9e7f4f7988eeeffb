//! The daemon process' own resources, from `/proc/self` (Linux only; the
//! daemon is Linux only). Zero where a file cannot be read.

/// One reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub rss_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
}

impl Stats {
    /// This process now.
    pub fn read() -> Stats {
        Stats::of("self")
    }

    /// Process `pid` (`"self"` or a number) now.
    pub fn of(pid: &str) -> Stats {
        let base = std::path::Path::new("/proc").join(pid);
        let status = std::fs::read_to_string(base.join("status")).unwrap_or_default();
        let mut s = parse_status(&status);
        s.open_fds = std::fs::read_dir(base.join("fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        s
    }
}

/// `VmRSS` and `Threads` of a `/proc/<pid>/status` text.
fn parse_status(text: &str) -> Stats {
    let mut s = Stats::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("VmRSS:") => {
                s.rss_bytes = it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024
            }
            Some("Threads:") => s.threads = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            _ => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read() {
        let s = parse_status("Name:\tbhatti\nVmRSS:\t   2048 kB\nThreads:\t7\n");
        assert_eq!((s.rss_bytes, s.threads), (2 << 20, 7));
    }

    #[test]
    fn this_process_has_memory_threads_and_fds() {
        let s = Stats::read();
        assert!(s.rss_bytes > 0 && s.threads > 0 && s.open_fds > 0, "{s:?}");
    }
}
