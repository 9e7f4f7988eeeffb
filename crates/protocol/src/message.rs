//! JSON bodies carried by `Hello`, `Open`, `Control`, `Event` and `Close`
//! frames. Field names are the wire format: see `docs/protocol.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to frames or messages.
pub const PROTOCOL_VERSION: u32 = 1;

/// First frame a client sends (channel 0, kind `Hello`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub token: String,
}

/// The agent's answer to a valid `Hello`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelloOk {
    pub version: u32,
    /// Agent name and version, e.g. `lohar 0.1.0`.
    pub agent: String,
    /// Random id chosen at agent start: changes when the guest reboots, not
    /// when it is restored from a snapshot.
    pub boot_id: String,
}

/// What an `Open` frame asks for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Answered with an empty `Close`: a bare channel round trip.
    Ping,
    Exec(ExecRequest),
    Pty(PtyRequest),
    Attach(AttachRequest),
    Sessions,
    KillSession {
        id: String,
        #[serde(default)]
        signal: Option<i32>,
    },
    ReadFile(ReadFileRequest),
    WriteFile(WriteFileRequest),
    Stat {
        path: String,
    },
    List {
        path: String,
        #[serde(default)]
        limit: Option<u32>,
    },
    Mkdir {
        path: String,
    },
    Remove {
        path: String,
        #[serde(default)]
        recursive: bool,
    },
    Forward {
        port: u16,
    },
    Activity,
    /// The guest's listening TCP ports.
    Ports,
    Sync,
    Shutdown,
    /// Take a fresh identity after a restore into a new sandbox.
    Reidentify(ReidentifyRequest),
}

/// A new identity for a guest restored from another sandbox's checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReidentifyRequest {
    /// The token every *future* connection must present.
    pub token: String,
    pub hostname: String,
    pub sandbox_id: String,
    /// eth0's new MAC, `aa:bb:cc:dd:ee:ff`.
    #[serde(default)]
    pub mac: Option<String>,
    /// eth0's new address, `a.b.c.d/len`.
    #[serde(default)]
    pub address: Option<String>,
    /// The new default gateway.
    #[serde(default)]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Host random bytes (hex) mixed into the guest's RNG.
    #[serde(default)]
    pub entropy: Option<String>,
    /// Replaces the sandbox-wide environment of commands started from now
    /// (a pre-booted guest taking its sandbox's env and secrets); absent:
    /// unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<std::collections::BTreeMap<String, String>>,
}

/// Reply to `reidentify`: the parts applied and the ones that failed (with
/// why). The token is always among `applied`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReidentifyDone {
    pub applied: Vec<String>,
    #[serde(default)]
    pub failed: Vec<String>,
}

/// A piped (non-PTY) command.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// When true the client streams stdin as `Data` frames ending with
    /// `Eof`; otherwise stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group after this long; the exit then has
    /// `timed_out: true`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Start and answer at once; the command outlives the channel and the
    /// connection. Output goes to `output_file` (default `/dev/null`).
    #[serde(default)]
    pub detach: bool,
    #[serde(default)]
    pub output_file: Option<String>,
    /// Leave out the `started` event; the exit status carries the pid
    /// instead. One frame and one client wake-up fewer per command, for
    /// callers that only want the result.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_started_event: bool,
}

/// A command on a pseudo-terminal: a new session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PtyRequest {
    /// `None` runs the user's login shell.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default = "default_rows")]
    pub rows: u16,
    #[serde(default = "default_cols")]
    pub cols: u16,
    /// A piped session instead of a terminal: stdin, stdout and stderr are
    /// pipes, stderr output arrives as `Stderr` frames, `Eof` closes the
    /// command's stdin, and the size is ignored. Older agents refuse it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub piped: bool,
    /// A piped session that loses no output to its attached clients:
    /// while one is attached and a quarter of the scrollback behind,
    /// the agent stops reading the command's output (the command then
    /// blocks writing, as on a pipe). Detached, it drains as any session.
    /// Older agents refuse it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
}

fn default_rows() -> u16 {
    24
}
fn default_cols() -> u16 {
    80
}

/// Re-attach to an existing session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    pub session: String,
    /// Absolute output offset to replay from. `None` replays all scrollback
    /// still held. An offset older than the scrollback is reported as a gap.
    #[serde(default)]
    pub offset: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReadFileRequest {
    pub path: String,
    /// First line to return (0-based), when reading by lines.
    #[serde(default)]
    pub offset: Option<u64>,
    /// Maximum number of lines to return.
    #[serde(default)]
    pub limit: Option<u64>,
    /// Stop after this many bytes; the reply says it was truncated.
    #[serde(default)]
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WriteFileRequest {
    pub path: String,
    /// Permission bits; default 0644.
    #[serde(default)]
    pub mode: Option<u32>,
    /// Own the file (and directories made for it) as a file from the
    /// config drive would be: the user under their home or `/workspace`,
    /// else root. Otherwise the user owns it wherever it is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub place: bool,
}

/// Client → agent, on an open channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    Resize { rows: u16, cols: u16 },
    Signal { signal: i32 },
}

/// Agent → client, on an open channel, before its `Close`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A piped exec's process started.
    Started { pid: u32 },
    /// A PTY session exists and this channel is attached to it. Output
    /// `Data` that follows starts at absolute offset `offset`.
    Attached {
        session: String,
        pid: u32,
        offset: u64,
        /// Output the client asked for that the scrollback no longer holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gap: Option<Gap>,
    },
    /// A file read is about to stream `Data`.
    FileInfo {
        size: u64,
        mode: u32,
        /// How many `Data` bytes follow (fewer only if the file shrinks
        /// meanwhile), and whether the read's window stops before the end
        /// of the file: known before the first byte, so a client can
        /// stream a windowed read instead of buffering it to learn its
        /// length. Absent from older agents.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        truncated: Option<bool>,
    },
    /// A port-forward connected to the guest port.
    Connected { port: u16 },
    /// A live PTY attachment fell behind the scrollback: output `[from, to)`
    /// is lost to it and the `Data` that follows starts at `to`.
    Gap { from: u64, to: u64 },
}

/// Bytes `[from, to)` of a session's output that can no longer be replayed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
}

/// Body of the agent's final `Close` frame.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(serde_json::Value),
    Error(ErrorBody),
}

/// A machine-readable code plus a human message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request or a frame was malformed, or a field out of range.
    BadRequest,
    /// Missing or wrong token.
    Unauthorized,
    NotFound,
    PermissionDenied,
    AlreadyExists,
    /// The path is not a regular file.
    NotAFile,
    NotADirectory,
    /// A frame or a request exceeded a limit.
    TooLarge,
    /// Too many channels or sessions.
    LimitReached,
    /// The peer broke the protocol (window overrun, unexpected frame).
    Protocol,
    /// The channel was cancelled by the client.
    Cancelled,
    Unsupported,
    Io,
    Internal,
    /// A code from a newer peer.
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        f.write_str(&s)
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal number when killed by a signal.
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
    /// The process that ended, when the agent knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// Reply to a detached exec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Detached {
    pub pid: u32,
    pub output_file: String,
}

/// Final reply on a PTY channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PtyEnd {
    /// The session's process exited; `offset` is the end of its output.
    Exited { status: ExitStatus, offset: u64 },
    /// The client detached (sent `Close`); the session runs on.
    Detached { offset: u64 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReadFileDone {
    /// Bytes sent on the channel.
    pub bytes: u64,
    /// Size of the whole file.
    pub total_size: u64,
    /// True when `limit` or `max_bytes` stopped the read before the end.
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WriteFileDone {
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileStat {
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, milliseconds since the Unix epoch.
    pub mtime_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<FileStat>,
    /// True when the directory had more entries than the limit.
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    pub pid: u32,
    pub argv: Vec<String>,
    pub rows: u16,
    pub cols: u16,
    /// Channels currently attached.
    pub attached: u32,
    /// `None` while running.
    pub exit: Option<ExitStatus>,
    /// Total bytes of output so far (the next byte's offset).
    pub end_offset: u64,
    /// Oldest offset still in the scrollback.
    pub start_offset: u64,
    pub started_unix_ms: i64,
    /// A piped session (no terminal). Absent from older agents.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub piped: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sessions {
    pub sessions: Vec<SessionInfo>,
}

/// What the agent reports for idle detection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Activity {
    /// Milliseconds since the last exec start/output, stdin, file operation
    /// or session input/output.
    pub idle_ms: u64,
    /// Running execs, and the init script while it runs.
    pub running_execs: u32,
    pub attached_sessions: u32,
    pub running_sessions: u32,
    pub open_forwards: u32,
}

/// One listening TCP socket in the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListeningPort {
    pub port: u16,
    /// The local address it is bound to (`0.0.0.0`, `127.0.0.1`, `::`, …).
    pub address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ports {
    /// Sorted by port, then address; one entry per distinct pair.
    pub ports: Vec<ListeningPort>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_shape() {
        let r: Request = serde_json::from_str(r#"{"op":"exec","argv":["true"]}"#).unwrap();
        assert_eq!(
            r,
            Request::Exec(ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            })
        );
        let r: Request = serde_json::from_str(r#"{"op":"ping"}"#).unwrap();
        assert_eq!(r, Request::Ping);
        assert!(serde_json::from_str::<Request>(r#"{"op":"nope"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"exec","argv":["x"],"bogus":1}"#).is_err()
        );
    }

    #[test]
    fn outcome_wire_shape() {
        let ok = Outcome::Ok(serde_json::json!({"bytes": 3}));
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"ok":{"bytes":3}}"#);
        let err = Outcome::Error(ErrorBody::new(ErrorCode::NotFound, "no such file"));
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"error":{"code":"not_found","message":"no such file"}}"#
        );
        // An older agent's file_info, without the read's extent.
        let info: Event =
            serde_json::from_str(r#"{"type":"file_info","size":3,"mode":420}"#).unwrap();
        assert_eq!(
            info,
            Event::FileInfo {
                size: 3,
                mode: 420,
                bytes: None,
                truncated: None
            }
        );
        let unknown: ErrorBody =
            serde_json::from_str(r#"{"code":"from_the_future","message":"x"}"#).unwrap();
        assert_eq!(unknown.code, ErrorCode::Unknown);
    }
}
