//! The table of PTY sessions and their scrollback rings.
//!
//! Output is addressed by absolute byte offsets from the session's start.
//! The ring keeps the last `scrollback_bytes` of it; every attachment reads
//! from its own cursor, so a slow client never holds the session back: it
//! falls behind the ring and is told about the gap instead.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use bhatti_protocol::{ErrorBody, ErrorCode, ExitStatus, Gap, SessionInfo};
use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::config::Limits;

/// The smallest scrollback a session gets, whatever the limits say.
pub const MIN_SCROLLBACK: usize = 64 * 1024;

/// The last `cap` bytes of a stream, addressed by absolute offsets. A
/// piped session's stdout and stderr share the offsets: `stderr` marks the
/// ranges that came from stderr.
#[derive(Debug)]
pub struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
    /// Offset of the byte after the last one written.
    end: u64,
    /// Where the stream switches, as (offset, is_stderr) from there on;
    /// empty means all stdout. Only switches still in the ring are kept
    /// (plus the one in force at its start).
    switches: VecDeque<(u64, bool)>,
}

impl Ring {
    pub fn new(cap: usize) -> Self {
        Ring {
            buf: VecDeque::new(),
            cap: cap.max(1),
            end: 0,
            switches: VecDeque::new(),
        }
    }

    /// Oldest offset still held.
    pub fn start(&self) -> u64 {
        self.end - self.buf.len() as u64
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    #[cfg(test)]
    pub fn push(&mut self, data: &[u8]) {
        self.push_from(data, false);
    }

    /// Appends output of stdout (`stderr` false) or stderr.
    pub fn push_from(&mut self, data: &[u8], stderr: bool) {
        if data.is_empty() {
            return;
        }
        if self.stream_at(self.end) != stderr {
            self.switches.push_back((self.end, stderr));
        }
        self.end += data.len() as u64;
        let data = &data[data.len().saturating_sub(self.cap)..];
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(data);
        let start = self.start();
        while self.switches.get(1).is_some_and(|&(at, _)| at <= start) {
            self.switches.pop_front();
        }
    }

    /// Whether the byte at `offset` is (or the next one would be) stderr.
    fn stream_at(&self, offset: u64) -> bool {
        self.switches
            .iter()
            .rev()
            .find(|&&(at, _)| at <= offset)
            .is_some_and(|&(_, e)| e)
    }

    /// Up to `max` bytes from `from` of one stream, and whether it is
    /// stderr; a read never crosses a switch between the streams.
    fn read_tagged(&self, from: u64, max: usize) -> (Bytes, bool) {
        let stderr = self.stream_at(from);
        let limit = self
            .switches
            .iter()
            .find(|&&(at, _)| at > from)
            .map_or(max, |&(at, _)| max.min((at - from) as usize));
        (self.read(from, limit), stderr)
    }

    /// Up to `max` bytes from `from`, which must be within `[start, end]`.
    fn read(&self, from: u64, max: usize) -> Bytes {
        let skip = (from.saturating_sub(self.start())) as usize;
        let n = self.buf.len().saturating_sub(skip).min(max);
        Bytes::from_iter(self.buf.range(skip..skip + n).copied())
    }
}

/// What an attachment at some cursor should do next.
#[derive(Debug)]
pub enum Next {
    /// Output starting at the cursor; `true` when it is stderr.
    Output(Bytes, bool),
    /// The cursor is older than the ring: skip to `gap.to`.
    Gap(Gap),
    /// Nothing new; `Some` once the session has ended for good.
    CaughtUp(Option<ExitStatus>),
}

#[derive(Debug)]
struct State {
    ring: Ring,
    rows: u16,
    cols: u16,
    exit: Option<ExitStatus>,
    /// An attachment has read the output to the end after the exit: the
    /// session has nothing left to give, so a full table may drop it.
    drained: bool,
    attached: u32,
    /// Where each attachment is (by attachment id), for a holding session.
    cursors: HashMap<u64, u64>,
    next_attachment: u64,
    /// The PTY master while the session's output is still open; for a
    /// piped session, its stdin pipe until closed.
    master: Option<Arc<AsyncFd<OwnedFd>>>,
}

/// One PTY session.
#[derive(Debug)]
pub struct Session {
    pub id: String,
    pub pid: u32,
    pub argv: Vec<String>,
    pub started_unix_ms: i64,
    /// Pipes, not a terminal.
    pub piped: bool,
    /// Never removed after it exits (the init script's session).
    pub kept: bool,
    /// Stops reading output while an attachment lags (piped sessions).
    pub hold: bool,
    state: Mutex<State>,
    /// Rung when an attachment moves or goes.
    moved: tokio::sync::Notify,
    /// Bumped on new output and when the session ends.
    updates: watch::Sender<()>,
}

impl Session {
    pub fn new(
        id: String,
        pid: u32,
        argv: Vec<String>,
        rows: u16,
        cols: u16,
        scrollback: usize,
        master: Arc<AsyncFd<OwnedFd>>,
    ) -> Self {
        let started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Session {
            id,
            pid,
            argv,
            started_unix_ms,
            piped: false,
            kept: false,
            hold: false,
            state: Mutex::new(State {
                ring: Ring::new(scrollback),
                rows,
                cols,
                exit: None,
                drained: false,
                attached: 0,
                cursors: HashMap::new(),
                next_attachment: 0,
                master: Some(master),
            }),
            moved: tokio::sync::Notify::new(),
            updates: watch::channel(()).0,
        }
    }

    /// Marks a session as piped (before it is shared).
    pub fn with_piped(mut self, piped: bool) -> Self {
        self.piped = piped;
        self
    }

    /// Makes a session hold its output for lagging attachments (before
    /// it is shared).
    pub fn with_hold(mut self, hold: bool) -> Self {
        self.hold = hold;
        self
    }

    /// Whether a holding session's output must wait: an attachment is
    /// more than a quarter of the scrollback behind (the rest takes what
    /// the pipes still hold when the process exits).
    pub fn held(&self) -> bool {
        if !self.hold {
            return false;
        }
        let st = self.state();
        let end = st.ring.end();
        st.cursors
            .values()
            .min()
            .is_some_and(|&c| end.saturating_sub(c) >= (st.ring.cap / 4) as u64)
    }

    /// Resolves when an attachment moved or went (after [`Session::held`]).
    pub async fn moved(&self) {
        self.moved.notified().await
    }

    /// Where attachment `id` is now.
    pub fn set_cursor(&self, id: u64, cursor: u64) {
        if !self.hold {
            return;
        }
        self.state().cursors.insert(id, cursor);
        self.moved.notify_one();
    }

    /// Keeps the session after it exits (before it is shared).
    pub fn with_kept(mut self, kept: bool) -> Self {
        self.kept = kept;
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends process output and wakes attachments.
    pub fn push_output(&self, data: &[u8]) {
        self.push_stream(data, false);
    }

    /// Appends stdout (`stderr` false) or stderr output and wakes attachments.
    pub fn push_stream(&self, data: &[u8], stderr: bool) {
        self.state().ring.push_from(data, stderr);
        self.updates.send_replace(());
    }

    /// Closes a piped session's stdin: the command sees end of input.
    pub fn close_input(&self) {
        if self.piped {
            self.state().master = None;
        }
    }

    /// The process exited and its output is complete.
    pub fn finish(&self, status: ExitStatus) {
        {
            let mut st = self.state();
            st.exit = Some(status);
            st.master = None;
        }
        self.updates.send_replace(());
    }

    pub fn exit(&self) -> Option<ExitStatus> {
        self.state().exit
    }

    pub fn master(&self) -> Option<Arc<AsyncFd<OwnedFd>>> {
        self.state().master.clone()
    }

    /// A receiver woken on new output or the end. Mark it seen *before*
    /// calling [`Session::next`] so no update can slip in between.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.updates.subscribe()
    }

    /// What an attachment whose next byte is `cursor` gets now.
    pub fn next(&self, cursor: u64, max: usize) -> Next {
        let mut st = self.state();
        let start = st.ring.start();
        if cursor < start {
            return Next::Gap(Gap {
                from: cursor,
                to: start,
            });
        }
        if cursor >= st.ring.end() {
            st.drained |= st.exit.is_some();
            return Next::CaughtUp(st.exit);
        }
        let (b, stderr) = st.ring.read_tagged(cursor, max);
        Next::Output(b, stderr)
    }

    /// Where a new attachment asking for `offset` starts, and the gap if
    /// that offset is no longer held. Beyond the end is a bad request.
    pub fn resolve_offset(&self, offset: Option<u64>) -> Result<(u64, Option<Gap>), ErrorBody> {
        let st = self.state();
        let (start, end) = (st.ring.start(), st.ring.end());
        match offset {
            None => Ok((start, None)),
            Some(o) if o > end => Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!("offset {o} is beyond the end of the output ({end})"),
            )),
            Some(o) if o < start => Ok((start, Some(Gap { from: o, to: start }))),
            Some(o) => Ok((o, None)),
        }
    }

    /// Remembers the window size (the caller sets it on the PTY).
    pub fn set_size(&self, rows: u16, cols: u16) {
        let mut st = self.state();
        st.rows = rows;
        st.cols = cols;
    }

    /// Counts an attachment (at `cursor`) until the guard drops.
    pub fn attach(self: &Arc<Self>, cursor: u64) -> AttachGuard {
        let mut st = self.state();
        st.attached += 1;
        st.next_attachment += 1;
        let id = st.next_attachment;
        if self.hold {
            st.cursors.insert(id, cursor);
        }
        AttachGuard {
            session: self.clone(),
            id,
        }
    }

    pub fn info(&self) -> SessionInfo {
        let st = self.state();
        SessionInfo {
            id: self.id.clone(),
            pid: self.pid,
            argv: self.argv.clone(),
            rows: st.rows,
            cols: st.cols,
            attached: st.attached,
            exit: st.exit,
            end_offset: st.ring.end(),
            start_offset: st.ring.start(),
            started_unix_ms: self.started_unix_ms,
            piped: self.piped,
        }
    }
}

#[derive(Debug)]
pub struct AttachGuard {
    session: Arc<Session>,
    pub id: u64,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        {
            let mut st = self.session.state();
            st.attached = st.attached.saturating_sub(1);
            st.cursors.remove(&self.id);
        }
        self.session.moved.notify_one();
    }
}

#[derive(Debug)]
pub struct SessionTable {
    limits: Limits,
    map: Mutex<HashMap<String, Arc<Session>>>,
}

impl SessionTable {
    pub fn new(limits: Limits) -> Self {
        SessionTable {
            limits,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Scrollback bytes for a new session.
    pub fn scrollback(&self) -> usize {
        self.limits.scrollback_bytes.max(MIN_SCROLLBACK)
    }

    /// Creates a session with `make` unless the table is full. The table
    /// stays locked meanwhile, so concurrent starts cannot overshoot. A full
    /// table first drops its oldest exited session whose output a client
    /// has read to the end (kept sessions excepted): without that, a client
    /// running many short sessions would hit the limit for the whole grace
    /// period of sessions nobody will read again.
    pub fn create(
        &self,
        make: impl FnOnce() -> Result<Arc<Session>, ErrorBody>,
    ) -> Result<Arc<Session>, ErrorBody> {
        let mut map = self.map();
        if map.len() >= self.limits.max_sessions {
            let spent = map
                .values()
                .filter(|s| !s.kept && s.state().drained)
                .min_by_key(|s| (s.started_unix_ms, s.id.clone()))
                .map(|s| s.id.clone());
            if let Some(id) = spent {
                map.remove(&id);
            }
        }
        if map.len() >= self.limits.max_sessions {
            return Err(ErrorBody::new(
                ErrorCode::LimitReached,
                format!(
                    "{} sessions exist (the limit, counting exited ones whose output was not read to the end)",
                    map.len()
                ),
            ));
        }
        let session = make()?;
        map.insert(session.id.clone(), session.clone());
        Ok(session)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.map().get(id).cloned()
    }

    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    /// Every session, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self.map().values().map(|s| s.info()).collect();
        v.sort_by(|a, b| (a.started_unix_ms, &a.id).cmp(&(b.started_unix_ms, &b.id)));
        v
    }

    /// (attached sessions, running sessions)
    pub fn counts(&self) -> (u32, u32) {
        let map = self.map();
        let mut attached = 0;
        let mut running = 0;
        for s in map.values() {
            let st = s.state();
            attached += u32::from(st.attached > 0);
            running += u32::from(st.exit.is_none());
        }
        (attached, running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_tail_at_absolute_offsets() {
        let mut r = Ring::new(8);
        r.push(b"hello");
        assert_eq!((r.start(), r.end()), (0, 5));
        r.push(b" world");
        assert_eq!((r.start(), r.end()), (3, 11));
        assert_eq!(&r.read(3, 100)[..], b"lo world");
        assert_eq!(&r.read(6, 3)[..], b"wor");
        r.push(b"0123456789abc");
        assert_eq!((r.start(), r.end()), (16, 24));
        assert_eq!(&r.read(16, 100)[..], b"56789abc");
        assert!(r.read(24, 10).is_empty());
    }

    #[test]
    fn ring_tags_stdout_and_stderr_ranges() {
        let mut r = Ring::new(10);
        r.push_from(b"out", false);
        r.push_from(b"ERR", true);
        r.push_from(b"more", false);
        assert_eq!(r.read_tagged(0, 100), (Bytes::from_static(b"out"), false));
        assert_eq!(r.read_tagged(1, 100), (Bytes::from_static(b"ut"), false));
        assert_eq!(r.read_tagged(3, 100), (Bytes::from_static(b"ERR"), true));
        assert_eq!(r.read_tagged(4, 1), (Bytes::from_static(b"R"), true));
        assert_eq!(r.read_tagged(6, 100), (Bytes::from_static(b"more"), false));
        // The head falls out of the ring; the tags of what remains hold.
        r.push_from(b"E2", true);
        assert_eq!(r.start(), 2);
        assert_eq!(r.read_tagged(2, 100), (Bytes::from_static(b"t"), false));
        assert_eq!(r.read_tagged(3, 100), (Bytes::from_static(b"ERR"), true));
        assert_eq!(r.read_tagged(10, 100), (Bytes::from_static(b"E2"), true));
        r.push_from(b"0123456789", false);
        assert_eq!(r.switches.len(), 1);
        assert!(!r.read_tagged(12, 100).1);
    }
}
