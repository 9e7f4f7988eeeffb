//! Directory watching: `WatchDir` (a server stream) and the polling
//! watchers (`CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`). The
//! agent has no inotify operation, so the daemon lists the directory every
//! [`POLL`] and reports the differences as envd's events (create, write,
//! remove, chmod). Everything is bounded: the entries compared, the
//! watchers, and the events a polling watcher keeps for its reader.
//!
//! A poll goes through the thermal manager like any request, so a watched
//! sandbox stays awake while the watch lasts; a polling watcher nobody
//! reads for [`IDLE`] ends by itself.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{list_tree, request_user, resolve, EntryInfo};
use crate::api::e2b::auth::EnvdCaller;
use crate::api::e2b::connect::{
    error_stream, keepalive_interval, server_stream, unary, StreamRequest, Unary,
};
use crate::api::e2b::error::{Code, ConnectError};
use crate::api::AppStateRef;
use crate::auth::RequestClass;
use crate::store::sandboxes::SandboxRow;

/// How often a watched directory is listed (at least: a slow listing
/// stretches the period to twice its duration).
const POLL: Duration = Duration::from_millis(300);
/// Most entries a watch compares (recursive watches list subdirectories).
const MAX_WATCH_ENTRIES: usize = 2048;
/// Deepest level a recursive watch lists.
const MAX_DEPTH: u32 = 16;
/// Polling watchers in the daemon, and per sandbox.
const MAX_WATCHERS: usize = 1024;
const MAX_WATCHERS_PER_SANDBOX: usize = 32;
/// Events a polling watcher keeps until they are read (the oldest go).
const MAX_EVENTS: usize = 4096;
/// A polling watcher nobody read for this long ends.
const IDLE: Duration = Duration::from_secs(600);
/// Consecutive failed polls that end a watch.
const MAX_FAILURES: u32 = 3;
/// Keepalive of a `WatchDir` stream whose client named no interval.
const KEEPALIVE: Duration = Duration::from_secs(30);

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct WatchRequest {
    path: String,
    #[serde(alias = "recursive")]
    recursive: bool,
    #[serde(alias = "include_entry")]
    include_entry: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct WatcherIdRequest {
    #[serde(alias = "watcher_id")]
    watcher_id: String,
}

/// A watched directory's last listing: relative name → entry.
type Snapshot = HashMap<String, EntryInfo>;

/// What one watch polls.
struct Target {
    st: AppStateRef,
    row: SandboxRow,
    dir: String,
    recursive: bool,
    include_entry: bool,
}

impl Target {
    async fn snapshot(&self) -> Result<Snapshot, ConnectError> {
        let client = self.st.agent(&self.row).await?;
        let info = super::stat_path(&client, &self.dir).await?;
        if info.kind != "FILE_TYPE_DIRECTORY" {
            return Err(ConnectError::invalid(format!(
                "{} is not a directory",
                self.dir
            )));
        }
        let depth = if self.recursive { MAX_DEPTH } else { 1 };
        let entries = list_tree(&client, &self.dir, depth, MAX_WATCH_ENTRIES).await?;
        let prefix = if self.dir == "/" {
            "/".to_owned()
        } else {
            format!("{}/", self.dir)
        };
        Ok(entries
            .into_iter()
            .map(|e| {
                let rel = e.path.strip_prefix(&prefix).unwrap_or(&e.path).to_owned();
                (rel, e)
            })
            .collect())
    }
}

/// One watch's polls.
struct Poller {
    t: Target,
    snap: Snapshot,
    failures: u32,
    next_at: tokio::time::Instant,
}

impl Poller {
    fn new(t: Target, snap: Snapshot) -> Poller {
        Poller {
            t,
            snap,
            failures: 0,
            next_at: tokio::time::Instant::now() + POLL,
        }
    }

    /// Waits for the next poll and answers its events (often none); an
    /// error ends the watch.
    async fn next(&mut self) -> Result<Vec<Value>, ConnectError> {
        tokio::time::sleep_until(self.next_at).await;
        let started = tokio::time::Instant::now();
        let r = self.t.snapshot().await;
        // A slow listing stretches the period.
        self.next_at = tokio::time::Instant::now() + POLL.max(started.elapsed() * 2);
        match r {
            Ok(next) => {
                self.failures = 0;
                let events = diff(self.t.include_entry, &self.snap, &next);
                self.snap = next;
                Ok(events)
            }
            Err(e) => {
                self.failures += 1;
                // A watched directory that is gone ends the watch at once.
                if e.code == Code::NotFound || self.failures >= MAX_FAILURES {
                    Err(e)
                } else {
                    Ok(Vec::new())
                }
            }
        }
    }
}

/// envd's `FilesystemEvent`s from one listing to the next.
fn diff(include_entry: bool, old: &Snapshot, new: &Snapshot) -> Vec<Value> {
    let event = |name: &str, kind: &str, e: Option<&EntryInfo>| {
        let mut v = json!({"name": name, "type": kind});
        if let (true, Some(e)) = (include_entry, e) {
            v["entry"] = serde_json::to_value(e).unwrap_or(Value::Null);
        }
        v
    };
    let mut out = Vec::new();
    let mut names: Vec<&String> = new.keys().collect();
    names.sort();
    for name in names {
        let Some(n) = new.get(name) else { continue };
        match old.get(name) {
            None => out.push(event(name, "EVENT_TYPE_CREATE", Some(n))),
            Some(o) => {
                if o.kind != n.kind {
                    out.push(event(name, "EVENT_TYPE_REMOVE", None));
                    out.push(event(name, "EVENT_TYPE_CREATE", Some(n)));
                    continue;
                }
                if o.size != n.size || o.modified_time != n.modified_time {
                    out.push(event(name, "EVENT_TYPE_WRITE", Some(n)));
                }
                if o.mode != n.mode || o.owner != n.owner || o.group != n.group {
                    out.push(event(name, "EVENT_TYPE_CHMOD", Some(n)));
                }
            }
        }
    }
    let mut gone: Vec<&String> = old.keys().filter(|k| !new.contains_key(*k)).collect();
    gone.sort();
    for name in gone {
        out.push(event(name, "EVENT_TYPE_REMOVE", None));
    }
    out
}

fn target(
    st: &AppStateRef,
    env: &EnvdCaller,
    headers: &HeaderMap,
    req: &WatchRequest,
) -> Result<Target, ConnectError> {
    env.caller.rate(st, RequestClass::Read)?;
    let dir = resolve(&req.path, request_user(headers).as_deref())?;
    Ok(Target {
        st: st.clone(),
        row: env.sandbox.clone(),
        dir,
        recursive: req.recursive,
        include_entry: req.include_entry,
    })
}

/// `WatchDir`: a start event, then the directory's events and keepalives
/// until the client goes away or the directory does.
pub(super) async fn watch_dir(
    State(st): State<AppStateRef>,
    env: Result<EnvdCaller, ConnectError>,
    headers: HeaderMap,
    req: Result<StreamRequest<WatchRequest>, Response>,
) -> Response {
    let (env, StreamRequest(req)) = match (env, req) {
        (Err(e), _) => return error_stream(e),
        (_, Err(r)) => return r,
        (Ok(env), Ok(req)) => (env, req),
    };
    let t = match target(&st, &env, &headers, &req) {
        Ok(t) => t,
        Err(e) => return error_stream(e),
    };
    let first = match t.snapshot().await {
        Ok(s) => s,
        Err(e) => return error_stream(e),
    };
    let keepalive = keepalive_interval(&headers).unwrap_or(KEEPALIVE);
    let (tx, rx) = mpsc::channel::<Result<Value, ConnectError>>(64);
    tokio::spawn(async move {
        if tx.send(Ok(json!({"start": {}}))).await.is_err() {
            return;
        }
        let mut poller = Poller::new(t, first);
        let mut last = Instant::now();
        loop {
            let events = tokio::select! {
                r = poller.next() => r,
                _ = tx.closed() => return,
            };
            let events = match events {
                Ok(ev) => ev,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            for ev in events {
                last = Instant::now();
                if tx.send(Ok(json!({"filesystem": ev}))).await.is_err() {
                    return;
                }
            }
            if last.elapsed() >= keepalive {
                last = Instant::now();
                if tx.send(Ok(json!({"keepalive": {}}))).await.is_err() {
                    return;
                }
            }
        }
    });
    server_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|m| (m, rx))
    }))
}

// --------------------------------------------------------- polling watchers

struct Watcher {
    sandbox: String,
    events: VecDeque<Value>,
    /// Why the watch ended, told to the next reader.
    ended: Option<ConnectError>,
    last_read: Instant,
    task: tokio::task::AbortHandle,
}

type Registry = Mutex<HashMap<String, Watcher>>;

static WATCHERS: LazyLock<Arc<Registry>> = LazyLock::new(Default::default);

fn registry() -> std::sync::MutexGuard<'static, HashMap<String, Watcher>> {
    WATCHERS.lock().unwrap_or_else(|p| p.into_inner())
}

fn no_watcher(id: &str) -> ConnectError {
    ConnectError::not_found(format!("watcher {id:?} not found"))
}

pub(super) async fn create_watcher(
    State(st): State<AppStateRef>,
    env: EnvdCaller,
    headers: HeaderMap,
    Unary(req): Unary<WatchRequest>,
) -> Response {
    unary(
        async {
            let t = target(&st, &env, &headers, &req)?;
            let first = t.snapshot().await?;
            let id = format!("w{}", hex::encode(rand::random::<[u8; 12]>()));
            let mut reg = registry();
            // Watchers that ended (their sandbox or directory gone) and
            // that nobody read since make room.
            reg.retain(|_, w| !(w.task.is_finished() && w.last_read.elapsed() > IDLE));
            if reg.len() >= MAX_WATCHERS
                || reg.values().filter(|w| w.sandbox == env.sandbox.id).count()
                    >= MAX_WATCHERS_PER_SANDBOX
            {
                return Err(ConnectError::new(
                    Code::ResourceExhausted,
                    format!(
                        "too many watchers (at most {MAX_WATCHERS_PER_SANDBOX} per sandbox): \
                         stop some first"
                    ),
                ));
            }
            let wid = id.clone();
            let task = tokio::spawn(async move {
                let mut poller = Poller::new(t, first);
                loop {
                    let batch = poller.next().await;
                    let mut reg = registry();
                    let Some(w) = reg.get_mut(&wid) else {
                        return;
                    };
                    if w.last_read.elapsed() > IDLE {
                        reg.remove(&wid);
                        return;
                    }
                    match batch {
                        Ok(events) => {
                            for ev in events {
                                if w.events.len() >= MAX_EVENTS {
                                    w.events.pop_front();
                                }
                                w.events.push_back(ev);
                            }
                        }
                        Err(e) => {
                            w.ended = Some(e);
                            return;
                        }
                    }
                }
            });
            reg.insert(
                id.clone(),
                Watcher {
                    sandbox: env.sandbox.id.clone(),
                    events: VecDeque::new(),
                    ended: None,
                    last_read: Instant::now(),
                    task: task.abort_handle(),
                },
            );
            Ok(json!({"watcherId": id}))
        }
        .await,
    )
}

pub(super) async fn get_watcher_events(
    env: EnvdCaller,
    Unary(req): Unary<WatcherIdRequest>,
) -> Response {
    let id = req.watcher_id;
    let mut reg = registry();
    let r = match reg.get_mut(&id) {
        Some(w) if w.sandbox == env.sandbox.id => {
            w.last_read = Instant::now();
            let events: Vec<Value> = w.events.drain(..).collect();
            match w.ended.take() {
                // Events before the end first; the end on the next read.
                Some(e) if events.is_empty() => {
                    reg.remove(&id);
                    Err(e)
                }
                Some(e) => {
                    w.ended = Some(e);
                    Ok(json!({"events": events}))
                }
                None => Ok(json!({"events": events})),
            }
        }
        _ => Err(no_watcher(&id)),
    };
    drop(reg);
    unary(r)
}

pub(super) async fn remove_watcher(
    env: EnvdCaller,
    Unary(req): Unary<WatcherIdRequest>,
) -> Response {
    let id = req.watcher_id;
    let mut reg = registry();
    let r = match reg.get(&id) {
        Some(w) if w.sandbox == env.sandbox.id => {
            if let Some(w) = reg.remove(&id) {
                w.task.abort();
            }
            Ok(json!({}))
        }
        _ => Err(no_watcher(&id)),
    };
    drop(reg);
    unary(r)
}

#[cfg(test)]
mod tests {
    use super::super::entry;
    use super::*;

    fn e(path: &str, size: u64) -> EntryInfo {
        entry(
            path,
            &bhatti_protocol::FileStat {
                name: String::new(),
                kind: bhatti_protocol::FileKind::File,
                size,
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime_ms: 0,
            },
        )
    }

    #[test]
    fn diffs_are_envd_events() {
        let old: Snapshot = [("a".into(), e("/d/a", 1)), ("b".into(), e("/d/b", 1))].into();
        let new: Snapshot = [("a".into(), e("/d/a", 2)), ("c".into(), e("/d/c", 1))].into();
        let got: Vec<(String, String)> = diff(true, &old, &new)
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap_or("").into(),
                    v["type"].as_str().unwrap_or("").into(),
                )
            })
            .collect();
        let want = [
            ("a", "EVENT_TYPE_WRITE"),
            ("c", "EVENT_TYPE_CREATE"),
            ("b", "EVENT_TYPE_REMOVE"),
        ];
        assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())));
        assert_eq!(diff(true, &old, &new)[1]["entry"]["path"], "/d/c");
        assert!(diff(false, &old, &new)[1].get("entry").is_none());
    }
}
