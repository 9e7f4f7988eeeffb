//! envd's `filesystem.Filesystem` Connect service, mapped onto the guest
//! agent's file operations (`Stat`, `List`, `Mkdir`, `Remove`, and `mv` run
//! in the guest for `Move`). Paths that are not absolute are relative to
//! the user's home, as envd resolves them. Directory watching polls the
//! agent's listings ([`watch`]).

mod watch;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bhatti_protocol::client::ExecEvent;
use bhatti_protocol::{AgentClient, ErrorCode, ExecRequest, FileKind, FileStat};
use serde::{Deserialize, Serialize, Serializer};

use super::auth::EnvdCaller;
use super::connect::{unary, Unary};
use super::error::{Code, ConnectError};
use crate::api::AppStateRef;
use crate::auth::RequestClass;

pub(super) fn routes() -> Router<AppStateRef> {
    Router::new()
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Move", post(move_))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/WatchDir", post(watch::watch_dir))
        .route(
            "/filesystem.Filesystem/CreateWatcher",
            post(watch::create_watcher),
        )
        .route(
            "/filesystem.Filesystem/GetWatcherEvents",
            post(watch::get_watcher_events),
        )
        .route(
            "/filesystem.Filesystem/RemoveWatcher",
            post(watch::remove_watcher),
        )
}

/// bhatti's guest images run commands as `lohar` (uid 1000).
pub(super) const DEFAULT_USER: &str = "lohar";
const DEFAULT_UID: u32 = 1000;

/// Most entries a recursive `ListDir` answers.
const MAX_LIST_ENTRIES: usize = 10_000;

// ------------------------------------------------------------------ paths

/// The user an envd request acts as: `Authorization: Basic <user:>` (the
/// SDKs' `user=` option), else bhatti's default user.
pub(super) fn request_user(h: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let v = h.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let b64 = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let user = s.split(':').next().unwrap_or("").trim().to_owned();
    (!user.is_empty()).then_some(user)
}

/// A user's home directory, as envd expands relative paths against it.
fn home_of(user: Option<&str>) -> String {
    match user.unwrap_or(DEFAULT_USER) {
        "root" => "/root".into(),
        u => format!("/home/{u}"),
    }
}

/// An absolute, lexically clean guest path: relative paths (and `~`) are
/// under the user's home; `.` and `..` are resolved. Bad paths are
/// `invalid_argument`.
pub(super) fn resolve(path: &str, user: Option<&str>) -> Result<String, ConnectError> {
    if path.contains('\0') {
        return Err(ConnectError::invalid("the path contains a NUL byte"));
    }
    if path.len() > 4096 {
        return Err(ConnectError::invalid("the path is longer than 4096 bytes"));
    }
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else if path == "~" {
        home_of(user)
    } else if let Some(rest) = path.strip_prefix("~/") {
        format!("{}/{rest}", home_of(user))
    } else {
        format!("{}/{path}", home_of(user))
    };
    let mut parts: Vec<&str> = Vec::new();
    for c in joined.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

// ----------------------------------------------------------------- entries

/// proto3 JSON of an int64: a string.
fn int64<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

/// `filesystem.EntryInfo`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(super) struct EntryInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub path: String,
    #[serde(serialize_with = "int64")]
    pub size: u64,
    pub mode: u32,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    pub modified_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

pub(super) fn file_type(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "FILE_TYPE_FILE",
        FileKind::Dir => "FILE_TYPE_DIRECTORY",
        FileKind::Symlink => "FILE_TYPE_SYMLINK",
        FileKind::Other => "FILE_TYPE_UNSPECIFIED",
    }
}

/// `ls -l` style permissions, as Go's `FileMode.String()` prints them.
fn permissions(kind: FileKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'L',
        FileKind::File => '-',
        FileKind::Other => '?',
    });
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

/// A user name for a guest uid (the agent reports numbers).
fn user_name(uid: u32) -> String {
    match uid {
        0 => "root".into(),
        DEFAULT_UID => DEFAULT_USER.into(),
        n => n.to_string(),
    }
}

fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(super) fn entry(path: &str, st: &FileStat) -> EntryInfo {
    let name = if path == "/" {
        "/".to_owned()
    } else {
        path.rsplit('/').next().unwrap_or(path).to_owned()
    };
    EntryInfo {
        name,
        kind: file_type(st.kind),
        path: path.to_owned(),
        size: st.size,
        mode: st.mode & 0o777,
        permissions: permissions(st.kind, st.mode),
        owner: user_name(st.uid),
        group: user_name(st.gid),
        modified_time: rfc3339_ms(st.mtime_ms),
        symlink_target: None,
    }
}

// ---------------------------------------------------------------- requests

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathRequest {
    path: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ListDirRequest {
    path: String,
    depth: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MoveRequest {
    source: String,
    destination: String,
}

#[derive(Debug, Serialize)]
struct EntryResponse {
    entry: EntryInfo,
}

#[derive(Debug, Serialize)]
struct ListDirResponse {
    entries: Vec<EntryInfo>,
}

#[derive(Debug, Serialize)]
struct Empty {}

/// The request's sandbox's agent (waking it), after the rate check.
pub(super) async fn agent(
    st: &AppStateRef,
    env: &EnvdCaller,
    class: RequestClass,
) -> Result<AgentClient, ConnectError> {
    env.caller.rate(st, class)?;
    Ok(st.agent(&env.sandbox).await?)
}

fn agent_error(path: &str, e: bhatti_protocol::ClientError) -> ConnectError {
    match e.code() {
        Some(ErrorCode::NotFound) => {
            ConnectError::not_found(format!("{path}: no such file or directory"))
        }
        Some(ErrorCode::AlreadyExists) => {
            ConnectError::new(Code::AlreadyExists, format!("{path}: already exists"))
        }
        Some(ErrorCode::PermissionDenied) => {
            ConnectError::new(Code::PermissionDenied, format!("{path}: permission denied"))
        }
        Some(ErrorCode::NotADirectory) => ConnectError::invalid(format!("{path}: not a directory")),
        _ => crate::api::ApiError::from(e).into(),
    }
}

pub(super) async fn stat_path(client: &AgentClient, path: &str) -> Result<EntryInfo, ConnectError> {
    let st = client.stat(path).await.map_err(|e| agent_error(path, e))?;
    Ok(entry(path, &st))
}

async fn stat(
    State(st): State<AppStateRef>,
    env: EnvdCaller,
    headers: HeaderMap,
    Unary(req): Unary<PathRequest>,
) -> Response {
    unary(
        async {
            let path = resolve(&req.path, request_user(&headers).as_deref())?;
            let client = agent(&st, &env, RequestClass::Read).await?;
            Ok(EntryResponse {
                entry: stat_path(&client, &path).await?,
            })
        }
        .await,
    )
}

/// Lists `dir` to `depth` levels (breadth first), at most `max` entries.
pub(super) async fn list_tree(
    client: &AgentClient,
    dir: &str,
    depth: u32,
    max: usize,
) -> Result<Vec<EntryInfo>, ConnectError> {
    let mut out = Vec::new();
    let mut level = vec![dir.to_owned()];
    for d in 0..depth.max(1) {
        let mut next = Vec::new();
        for dir in &level {
            let listing = match client.list(dir, None).await {
                Ok(l) => l,
                // A subdirectory removed (or unreadable) meanwhile is skipped.
                Err(_) if d > 0 => continue,
                Err(e) => return Err(agent_error(dir, e)),
            };
            for f in &listing.entries {
                if out.len() >= max {
                    return Ok(out);
                }
                let path = join(dir, &f.name);
                if f.kind == FileKind::Dir {
                    next.push(path.clone());
                }
                out.push(entry(&path, f));
            }
        }
        level = next;
        if level.is_empty() {
            break;
        }
    }
    Ok(out)
}

async fn list_dir(
    State(st): State<AppStateRef>,
    env: EnvdCaller,
    headers: HeaderMap,
    Unary(req): Unary<ListDirRequest>,
) -> Response {
    unary(
        async {
            let path = resolve(&req.path, request_user(&headers).as_deref())?;
            let client = agent(&st, &env, RequestClass::Read).await?;
            let info = stat_path(&client, &path).await?;
            if info.kind != "FILE_TYPE_DIRECTORY" {
                return Err(ConnectError::invalid(format!("{path} is not a directory")));
            }
            let entries = list_tree(&client, &path, req.depth, MAX_LIST_ENTRIES).await?;
            Ok(ListDirResponse { entries })
        }
        .await,
    )
}

async fn make_dir(
    State(st): State<AppStateRef>,
    env: EnvdCaller,
    headers: HeaderMap,
    Unary(req): Unary<PathRequest>,
) -> Response {
    unary(
        async {
            let path = resolve(&req.path, request_user(&headers).as_deref())?;
            let client = agent(&st, &env, RequestClass::Exec).await?;
            match client.stat(&path).await {
                Ok(s) if s.kind == FileKind::Dir => {
                    return Err(ConnectError::new(
                        Code::AlreadyExists,
                        format!("directory {path} already exists"),
                    ))
                }
                Ok(_) => {
                    return Err(ConnectError::invalid(format!(
                        "{path} exists and is not a directory"
                    )))
                }
                Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
                Err(e) => return Err(agent_error(&path, e)),
            }
            client
                .mkdir(&path)
                .await
                .map_err(|e| agent_error(&path, e))?;
            Ok(EntryResponse {
                entry: stat_path(&client, &path).await?,
            })
        }
        .await,
    )
}

/// Most bytes of `mv`'s error kept for the message.
const MV_ERR_MAX: usize = 1024;

/// `mv -T -- src dst` in the guest: its exit code and the start of its
/// stderr (the rest, and stdout, are read past: bounded memory whatever
/// the guest prints).
async fn mv(
    client: &AgentClient,
    src: &str,
    dst: &str,
) -> Result<(i32, Vec<u8>), bhatti_protocol::ClientError> {
    let mut stream = client
        .exec_stream(ExecRequest {
            argv: vec![
                "mv".into(),
                "-T".into(),
                "--".into(),
                src.into(),
                dst.into(),
            ],
            timeout_ms: Some(60_000),
            no_started_event: true,
            ..Default::default()
        })
        .await?;
    let mut stderr = Vec::new();
    loop {
        match stream.next().await? {
            ExecEvent::Stderr(b) => {
                let room = MV_ERR_MAX.saturating_sub(stderr.len());
                stderr.extend_from_slice(&b[..b.len().min(room)]);
            }
            ExecEvent::Exit(status) => return Ok((status.exit_code, stderr)),
            ExecEvent::Started { .. } | ExecEvent::Stdout(_) => {}
        }
    }
}

async fn move_(
    State(st): State<AppStateRef>,
    env: EnvdCaller,
    headers: HeaderMap,
    Unary(req): Unary<MoveRequest>,
) -> Response {
    unary(
        async {
            let user = request_user(&headers);
            let src = resolve(&req.source, user.as_deref())?;
            let dst = resolve(&req.destination, user.as_deref())?;
            if src == "/" || dst == "/" {
                return Err(ConnectError::invalid("cannot move / or onto /"));
            }
            let client = agent(&st, &env, RequestClass::Exec).await?;
            // A missing source is not_found (as envd answers), not an mv error.
            stat_path(&client, &src).await?;
            let parent = parent_of(&dst);
            client
                .mkdir(parent)
                .await
                .map_err(|e| agent_error(parent, e))?;
            // The agent has no rename operation: `mv -T` in the guest
            // (a rename on one filesystem, a copy across).
            let (code, stderr) = mv(&client, &src, &dst)
                .await
                .map_err(|e| agent_error(&src, e))?;
            if code != 0 {
                let msg = String::from_utf8_lossy(&stderr).trim().to_owned();
                let code = if msg.contains("Permission denied") {
                    Code::PermissionDenied
                } else {
                    Code::InvalidArgument
                };
                return Err(ConnectError::new(
                    code,
                    format!("moving {src} to {dst}: {msg}"),
                ));
            }
            Ok(EntryResponse {
                entry: stat_path(&client, &dst).await?,
            })
        }
        .await,
    )
}

async fn remove(
    State(st): State<AppStateRef>,
    env: EnvdCaller,
    headers: HeaderMap,
    Unary(req): Unary<PathRequest>,
) -> Response {
    unary(
        async {
            let path = resolve(&req.path, request_user(&headers).as_deref())?;
            if path == "/" {
                return Err(ConnectError::invalid("refusing to remove /"));
            }
            let client = agent(&st, &env, RequestClass::Exec).await?;
            // envd removes recursively, and a missing path is not an error.
            match client.remove(&path, true).await {
                Ok(()) => Ok(Empty {}),
                Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(Empty {}),
                Err(e) => Err(agent_error(&path, e)),
            }
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_like_envd() {
        assert_eq!(resolve("/tmp/a", None).unwrap(), "/tmp/a");
        assert_eq!(resolve("a/b", None).unwrap(), "/home/lohar/a/b");
        assert_eq!(resolve("~/x", Some("root")).unwrap(), "/root/x");
        assert_eq!(resolve("", None).unwrap(), "/home/lohar");
        assert_eq!(resolve("/a/../../b/./c/", None).unwrap(), "/b/c");
        assert!(resolve("a\0b", None).is_err());
        assert_eq!(parent_of("/a/b"), "/a");
        assert_eq!(parent_of("/a"), "/");
    }

    #[test]
    fn entries_in_proto3_json() {
        let st = FileStat {
            name: "f".into(),
            kind: FileKind::File,
            size: 5,
            mode: 0o644,
            uid: 1000,
            gid: 0,
            mtime_ms: 1_700_000_000_123,
        };
        let v = serde_json::to_value(entry("/home/lohar/f", &st)).unwrap();
        assert_eq!(v["name"], "f");
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["size"], "5");
        assert_eq!(v["permissions"], "-rw-r--r--");
        assert_eq!(v["owner"], "lohar");
        assert_eq!(v["group"], "root");
        assert_eq!(v["modifiedTime"], "2023-11-14T22:13:20.123Z");
        assert!(v.get("symlinkTarget").is_none());
    }
}
