//! The daemon's table of E2B processes, per sandbox.
//!
//! Each process IS a guest agent session (piped, or on a PTY): the agent
//! keeps it running and its output in a bounded scrollback whether or not
//! anyone is attached. What the table adds is what E2B names a process by
//! (the guest pid, a tag, the config it was started with) and, while
//! someone listens, one pump per process: a task attached to the session
//! that hands its output on
//! - to the stream that started it (the "primary": a bounded channel with
//!   back-pressure, so a command's own output is never lost), while that
//!   stream is read, and
//! - to `Connect` streams through a bounded broadcast (a slow one loses
//!   the oldest chunks rather than growing memory).
//!
//! When the last listener goes, the pump detaches: a detached session
//! does not keep the sandbox busy, so it can cool while a background
//! command runs, as with bhatti's own sessions. Input and resizes go
//! through the pump's channel, or a short attachment of their own.
//! An entry leaves the table when its process has ended and that was
//! seen, when the agent no longer knows its session, or when the guest
//! cannot be reached (the sandbox was destroyed).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bhatti_protocol::client::{PtyEvent, PtyStream};
use bhatti_protocol::mux::ChannelSender;
use bhatti_protocol::{AttachRequest, ErrorCode, ExitStatus, PtyEnd};
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, Notify};

use super::wire::{ProcessConfig, Selector, Stream};
use crate::api::e2b::error::{Code, ConnectError};
use crate::api::AppStateRef;
use crate::store::sandboxes::SandboxRow;

/// Processes per sandbox the table holds (the agent has its own limit).
pub const MAX_PROCESSES: usize = 256;
/// Output chunks (each at most 64 KiB) a `Connect` stream may fall behind.
const BROADCAST_CHUNKS: usize = 32;
/// Output chunks in flight to the starting stream.
const PRIMARY_CHUNKS: usize = 8;

/// What the pump hands on.
#[derive(Debug, Clone)]
pub enum Ev {
    Data(Stream, Bytes),
    /// The process ended.
    End(ExitStatus),
    /// The guest could not be reached; the process's fate is unknown.
    Lost(String),
}

/// One process.
#[derive(Debug)]
pub struct Proc {
    pub sandbox: String,
    pub session: String,
    pub pid: u32,
    pub tag: Option<String>,
    pub config: ProcessConfig,
    pub pty: bool,
    events: broadcast::Sender<Ev>,
    link: Mutex<Link>,
    /// Held while the pump attaches or detaches.
    attaching: tokio::sync::Mutex<()>,
    /// Streams reading the output (the primary and `Connect`s).
    listeners: AtomicUsize,
    /// Rung when a listener goes.
    idle: Notify,
}

#[derive(Debug, Default)]
struct Link {
    /// The attached channel, while the pump runs.
    sender: Option<ChannelSender>,
    /// The next output offset the pump will read.
    offset: u64,
    /// How the process ended, once it did.
    end: Option<ExitStatus>,
}

type Table = Mutex<HashMap<String, HashMap<u32, Arc<Proc>>>>;

fn table() -> MutexGuard<'static, HashMap<String, HashMap<u32, Arc<Proc>>>> {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The table's key of a sandbox: its id within this daemon (tests run
/// several daemons in one process).
pub fn scope(st: &AppStateRef, sandbox: &str) -> String {
    format!("{:x}/{sandbox}", Arc::as_ptr(st) as usize)
}

/// Room for one more process in `sandbox`, or `resource_exhausted`.
pub fn check_room(sandbox: &str) -> Result<(), ConnectError> {
    let n = table().get(sandbox).map_or(0, HashMap::len);
    if n >= MAX_PROCESSES {
        return Err(ConnectError::new(
            Code::ResourceExhausted,
            format!("{n} processes run in this sandbox (the limit)"),
        ));
    }
    Ok(())
}

/// The process `sel` names in `sandbox`, or `not_found`.
pub fn find(sandbox: &str, sel: Option<&Selector>) -> Result<Arc<Proc>, ConnectError> {
    let sel = sel.ok_or_else(|| ConnectError::invalid("process: a pid or a tag is required"))?;
    let t = table();
    let procs = t.get(sandbox);
    let found = match (sel.pid, &sel.tag) {
        (Some(pid), _) => procs.and_then(|m| m.get(&pid)).cloned(),
        (None, Some(tag)) => procs
            .and_then(|m| m.values().find(|p| p.tag.as_deref() == Some(tag.as_str())))
            .cloned(),
        (None, None) => return Err(ConnectError::invalid("process: a pid or a tag is required")),
    };
    found.ok_or_else(|| match (sel.pid, &sel.tag) {
        (Some(pid), _) => ConnectError::not_found(format!("process with pid {pid} not found")),
        (_, tag) => ConnectError::not_found(format!("process with tag {tag:?} not found")),
    })
}

/// Every process of `sandbox` the table holds.
pub fn all(sandbox: &str) -> Vec<Arc<Proc>> {
    let mut v: Vec<Arc<Proc>> = table()
        .get(sandbox)
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    v.sort_by_key(|p| p.pid);
    v
}

/// Drops `p` from the table (if it is still the entry for its pid).
pub fn remove(p: &Proc) {
    let mut t = table();
    if let Some(m) = t.get_mut(&p.sandbox) {
        if m.get(&p.pid).is_some_and(|q| q.session == p.session) {
            m.remove(&p.pid);
        }
        if m.is_empty() {
            t.remove(&p.sandbox);
        }
    }
}

/// Drops `sandbox`'s entries whose sessions the agent no longer runs.
pub fn prune(sandbox: &str, sessions: &[bhatti_protocol::SessionInfo]) {
    for p in all(sandbox) {
        match sessions.iter().find(|s| s.id == p.session) {
            None => remove(&p),
            Some(s) => {
                if let Some(status) = &s.exit {
                    p.finish(*status);
                }
            }
        }
    }
}

/// Drops the entries of sandboxes that no longer exist (destroyed ones
/// take no more requests, so nothing else would). Runs on every
/// [`SWEEP_EVERY`]th call.
pub async fn sweep(st: &AppStateRef) {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    if !CALLS
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(SWEEP_EVERY)
    {
        return;
    }
    let prefix = scope(st, "");
    let ids: Vec<String> = table()
        .keys()
        .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned))
        .collect();
    if ids.is_empty() {
        return;
    }
    let gone = st
        .store
        .read(move |c| {
            let mut gone = Vec::new();
            for id in ids {
                if crate::store::sandboxes::get_by_id(c, &id)?.is_none() {
                    gone.push(id);
                }
            }
            Ok(gone)
        })
        .await;
    if let Ok(gone) = gone {
        let mut t = table();
        for id in gone {
            t.remove(&scope(st, &id));
        }
    }
}

/// How often [`sweep`] looks.
const SWEEP_EVERY: usize = 32;

/// What [`register`] needs to know about a new process.
pub struct NewProc {
    pub sandbox: String,
    pub tag: Option<String>,
    pub config: ProcessConfig,
    pub pty: bool,
}

/// A listening stream, counted until it drops.
#[derive(Debug)]
pub struct Listener(Arc<Proc>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.listeners.fetch_sub(1, Ordering::SeqCst);
        self.0.idle.notify_one();
    }
}

impl Proc {
    fn listener(self: &Arc<Self>) -> Listener {
        self.listeners.fetch_add(1, Ordering::SeqCst);
        Listener(self.clone())
    }
}

/// Enters the process `stream` is attached to into the table and starts
/// its pump; the receiver is the primary's (the starting stream's).
pub fn register(
    st: &AppStateRef,
    row: &SandboxRow,
    new: NewProc,
    stream: PtyStream,
) -> (Arc<Proc>, mpsc::Receiver<Ev>, Listener) {
    let (events, _) = broadcast::channel(BROADCAST_CHUNKS);
    let p = Arc::new(Proc {
        sandbox: new.sandbox,
        session: stream.session.clone(),
        pid: stream.pid,
        tag: new.tag,
        config: new.config,
        pty: new.pty,
        events,
        link: Mutex::new(Link::default()),
        attaching: tokio::sync::Mutex::new(()),
        listeners: AtomicUsize::new(0),
        idle: Notify::new(),
    });
    {
        let mut t = table();
        // A pid the guest reused replaces an entry whose end was missed.
        t.entry(p.sandbox.clone())
            .or_default()
            .insert(p.pid, p.clone());
    }
    let listener = p.listener();
    let (tx, rx) = mpsc::channel(PRIMARY_CHUNKS);
    p.start_pump(st.clone(), row.clone(), stream, Some(tx));
    (p, rx, listener)
}

/// What a `Connect` stream gets: the end if it came already, else a
/// subscription to what follows.
pub enum Subscription {
    Ended(ExitStatus),
    Live(broadcast::Receiver<Ev>, Listener),
}

/// A channel to send input or a resize on.
pub enum Chan {
    /// The pump's.
    Pump(ChannelSender),
    /// An attachment of its own, detached by [`Chan::done`].
    Own(PtyStream),
}

impl Chan {
    pub fn sender(&self) -> &ChannelSender {
        match self {
            Chan::Pump(s) => s,
            Chan::Own(s) => &s.sender,
        }
    }

    /// Lets go of an own attachment (the agent delivers the input sent
    /// before it first).
    pub async fn done(self, p: &Proc) {
        if let Chan::Own(s) = self {
            if let Ok(PtyEnd::Exited { status, .. }) = s.detach().await {
                p.finish(status);
            }
        }
    }
}

impl Proc {
    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start_pump(
        self: &Arc<Self>,
        st: AppStateRef,
        row: SandboxRow,
        stream: PtyStream,
        primary: Option<mpsc::Sender<Ev>>,
    ) {
        {
            let mut l = self.link();
            l.sender = Some(stream.sender.clone());
            l.offset = stream.offset;
        }
        let p = self.clone();
        tokio::spawn(async move { p.pump(st, row, stream, primary).await });
    }

    /// The process ended: record it, tell the listeners, leave the table.
    pub fn finish(&self, status: ExitStatus) {
        {
            let mut l = self.link();
            if l.end.is_none() {
                l.end = Some(status);
                l.sender = None;
                let _ = self.events.send(Ev::End(status));
            }
        }
        remove(self);
    }

    async fn pump(
        self: Arc<Self>,
        st: AppStateRef,
        row: SandboxRow,
        mut stream: PtyStream,
        mut primary: Option<mpsc::Sender<Ev>>,
    ) {
        let data = if self.pty {
            Stream::Pty
        } else {
            Stream::Stdout
        };
        loop {
            let next = tokio::select! {
                n = stream.next() => n,
                _ = self.idle.notified() => {
                    if self.listeners.load(Ordering::SeqCst) > 0 {
                        continue;
                    }
                    let _g = self.attaching.lock().await;
                    if self.listeners.load(Ordering::SeqCst) > 0 {
                        continue;
                    }
                    // Nobody reads: detach, so the sandbox may cool.
                    self.link().sender = None;
                    match stream.detach().await {
                        Ok(PtyEnd::Exited { status, .. }) => self.finish(status),
                        Ok(PtyEnd::Detached { offset }) => self.link().offset = offset,
                        Err(e) => tracing::debug!(session = %self.session, "detaching: {e}"),
                    }
                    return;
                }
            };
            let ev = match next {
                Ok(PtyEvent::Output(b)) => Ev::Data(data, b),
                Ok(PtyEvent::Stderr(b)) => Ev::Data(Stream::Stderr, b),
                // Output the scrollback no longer held: nothing to hand on.
                Ok(PtyEvent::Gap(_)) => continue,
                Ok(PtyEvent::End(PtyEnd::Exited { status, .. })) => Ev::End(status),
                Ok(PtyEvent::End(PtyEnd::Detached { offset })) => {
                    // Only a lost connection detaches us: attach again.
                    self.link().offset = offset;
                    return self.lost(st, row, primary, "detached").await;
                }
                Err(e) => {
                    return self.lost(st, row, primary, &e.to_string()).await;
                }
            };
            self.link().offset = stream.offset;
            if let Ev::End(status) = &ev {
                self.finish(*status);
                if let Some(tx) = primary.take() {
                    let _ = tx.send(ev).await;
                }
                return;
            }
            let _ = self.events.send(ev.clone());
            if let Some(tx) = &primary {
                if tx.send(ev).await.is_err() {
                    // The starting stream is gone (a background command).
                    primary = None;
                }
            }
        }
    }

    /// The channel to the guest broke. With listeners, attach again
    /// (through the thermal manager, which wakes the sandbox if it must)
    /// from where the pump was; if that fails, the process is unreachable
    /// and leaves the table. Without, attach again when someone asks.
    async fn lost(
        self: Arc<Self>,
        st: AppStateRef,
        row: SandboxRow,
        primary: Option<mpsc::Sender<Ev>>,
        why: &str,
    ) {
        let _g = self.attaching.lock().await;
        self.link().sender = None;
        tracing::debug!(session = %self.session, "e2b process pump detached: {why}");
        if self.listeners.load(Ordering::SeqCst) == 0 {
            return;
        }
        let offset = self.link().offset;
        match self.attach(&st, &row, Some(offset)).await {
            Ok(stream) => self.start_pump(st, row, stream, primary),
            Err(e) => {
                let msg = format!("the sandbox's agent cannot be reached: {}", e.message);
                remove(&self);
                let ev = Ev::Lost(msg);
                let _ = self.events.send(ev.clone());
                if let Some(tx) = primary {
                    let _ = tx.send(ev).await;
                }
            }
        }
    }

    /// Attaches to the session from `offset` (`None`: from the end of
    /// its output); an ended or forgotten session is `not_found`.
    async fn attach(
        &self,
        st: &AppStateRef,
        row: &SandboxRow,
        offset: Option<u64>,
    ) -> Result<PtyStream, ConnectError> {
        let client = st.agent(row).await.map_err(ConnectError::from)?;
        let offset = match offset {
            Some(o) => o,
            None => {
                let sessions = client
                    .sessions()
                    .await
                    .map_err(|e| ConnectError::from(crate::api::ApiError::from(e)))?;
                match sessions.into_iter().find(|s| s.id == self.session) {
                    None => {
                        remove(self);
                        return Err(self.gone());
                    }
                    Some(s) => {
                        if let Some(status) = s.exit {
                            self.finish(status);
                            return Err(self.gone());
                        }
                        s.end_offset
                    }
                }
            }
        };
        match client
            .attach(AttachRequest {
                session: self.session.clone(),
                offset: Some(offset),
            })
            .await
        {
            Ok(s) => Ok(s),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                remove(self);
                Err(self.gone())
            }
            Err(e) => Err(ConnectError::from(crate::api::ApiError::from(e))),
        }
    }

    /// A channel for input and resizes: the pump's, or an own attachment.
    pub async fn channel(
        self: &Arc<Self>,
        st: &AppStateRef,
        row: &SandboxRow,
    ) -> Result<Chan, ConnectError> {
        let _g = self.attaching.lock().await;
        {
            let l = self.link();
            if l.end.is_some() {
                return Err(self.gone());
            }
            if let Some(s) = &l.sender {
                return Ok(Chan::Pump(s.clone()));
            }
        }
        Ok(Chan::Own(self.attach(st, row, None).await?))
    }

    /// Listens to the process's events from now on, attaching the pump
    /// if it is not.
    pub async fn listen(
        self: &Arc<Self>,
        st: &AppStateRef,
        row: &SandboxRow,
    ) -> Result<Subscription, ConnectError> {
        let _g = self.attaching.lock().await;
        let (rx, listener) = {
            let l = self.link();
            if let Some(status) = &l.end {
                return Ok(Subscription::Ended(*status));
            }
            (self.events.subscribe(), self.listener())
        };
        if self.link().sender.is_none() {
            let stream = self.attach(st, row, None).await?;
            self.start_pump(st.clone(), row.clone(), stream, None);
        }
        Ok(Subscription::Live(rx, listener))
    }

    /// Events from now on, for a watcher that does not keep the pump
    /// attached; `None` once the process ended.
    pub fn watch(&self) -> Option<broadcast::Receiver<Ev>> {
        let l = self.link();
        l.end.is_none().then(|| self.events.subscribe())
    }

    pub fn gone(&self) -> ConnectError {
        ConnectError::not_found(format!("process with pid {} not found", self.pid))
    }
}
