//! The messages of envd's `process.Process` service in proto3's JSON
//! mapping, written by hand: lowerCamelCase names, `uint32` accepted as a
//! number or a string, `bytes` as base64, enums by name (or number),
//! oneofs as optional fields of which one is set. Unknown fields are
//! ignored, as proto3 JSON parsers do.

use std::collections::BTreeMap;

use bhatti_protocol::ExitStatus;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::e2b::error::ConnectError;
use crate::api_types::base64;

/// `ProcessConfig`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProcessConfig {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// `PTY.Size`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct Size {
    #[serde(deserialize_with = "uint32")]
    pub cols: u32,
    #[serde(deserialize_with = "uint32")]
    pub rows: u32,
}

/// `PTY`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Pty {
    pub size: Option<Size>,
}

impl Pty {
    /// (rows, cols) as a terminal takes them: each 1..=65535.
    pub fn rows_cols(&self) -> Result<(u16, u16), ConnectError> {
        let s = self.size.unwrap_or(Size { cols: 80, rows: 24 });
        let fit = |name: &str, v: u32| {
            u16::try_from(v).ok().filter(|v| *v > 0).ok_or_else(|| {
                ConnectError::invalid(format!("pty.size.{name}: {v} is not 1-65535"))
            })
        };
        Ok((fit("rows", s.rows)?, fit("cols", s.cols)?))
    }
}

/// `StartRequest`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StartRequest {
    pub process: Option<ProcessConfig>,
    pub pty: Option<Pty>,
    pub tag: Option<String>,
    pub stdin: Option<bool>,
}

/// `ProcessSelector` (a oneof: `pid` or `tag`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Selector {
    #[serde(deserialize_with = "opt_uint32")]
    pub pid: Option<u32>,
    pub tag: Option<String>,
}

/// `ProcessInput` (a oneof: `stdin` or `pty`, base64).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Input {
    pub stdin: Option<String>,
    pub pty: Option<String>,
}

impl Input {
    /// The bytes, whichever field carries them.
    pub fn bytes(&self) -> Result<Vec<u8>, ConnectError> {
        match (&self.stdin, &self.pty) {
            (Some(s), None) | (None, Some(s)) => unbase64(s)
                .ok_or_else(|| ConnectError::invalid("input: not valid base64".to_string())),
            (None, None) => Ok(Vec::new()),
            (Some(_), Some(_)) => Err(ConnectError::invalid("input: set stdin or pty, not both")),
        }
    }
}

/// Requests that name one process (`ConnectRequest`, `CloseStdinRequest`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ProcessRequest {
    pub process: Option<Selector>,
}

/// `SendInputRequest`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SendInputRequest {
    pub process: Option<Selector>,
    pub input: Option<Input>,
}

/// `SendSignalRequest`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SendSignalRequest {
    pub process: Option<Selector>,
    pub signal: Option<Value>,
}

impl SendSignalRequest {
    /// The signal number: `SIGNAL_SIGKILL`, `SIGNAL_SIGTERM` or their numbers.
    pub fn signal(&self) -> Result<i32, ConnectError> {
        match &self.signal {
            Some(Value::String(s)) if s == "SIGNAL_SIGKILL" || s == "9" => Ok(9),
            Some(Value::String(s)) if s == "SIGNAL_SIGTERM" || s == "15" => Ok(15),
            Some(Value::Number(n)) if n.as_u64() == Some(9) => Ok(9),
            Some(Value::Number(n)) if n.as_u64() == Some(15) => Ok(15),
            other => Err(ConnectError::invalid(format!(
                "signal: {} is not SIGNAL_SIGKILL or SIGNAL_SIGTERM",
                other
                    .as_ref()
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "unset".into())
            ))),
        }
    }
}

/// `UpdateRequest`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct UpdateRequest {
    pub process: Option<Selector>,
    pub pty: Option<Pty>,
}

/// `StreamInputRequest` (a oneof: `start`, `data` or `keepalive`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StreamInputRequest {
    pub start: Option<ProcessRequest>,
    pub data: Option<StreamInputData>,
    pub keepalive: Option<Value>,
}

/// `StreamInputRequest.DataEvent`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct StreamInputData {
    pub input: Option<Input>,
}

/// `ProcessInfo`.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessInfo {
    pub config: ProcessConfig,
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// `ListResponse`.
#[derive(Debug, Clone, Serialize)]
pub struct ListResponse {
    pub processes: Vec<ProcessInfo>,
}

/// `{"event": {"start": {"pid": N}}}`.
pub fn start_event(pid: u32) -> Value {
    json!({"event": {"start": {"pid": pid}}})
}

/// Which output a data event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
    Pty,
}

/// `{"event": {"data": {"stdout": "<base64>"}}}` (or `stderr`, `pty`).
pub fn data_event(stream: Stream, b: &[u8]) -> Value {
    let field = match stream {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
        Stream::Pty => "pty",
    };
    json!({"event": {"data": {field: base64(b)}}})
}

/// `{"event": {"keepalive": {}}}`.
pub fn keepalive_event() -> Value {
    json!({"event": {"keepalive": {}}})
}

/// The end event as envd (Go's `os.ProcessState`) reports it: an exit is
/// `exitCode` N, `exited` true, `status` "exit status N"; a signal is
/// `exitCode` -1, `exited` false, `status` "signal: killed".
pub fn end_event(status: &ExitStatus) -> Value {
    match status.signal {
        Some(sig) => json!({"event": {"end": {
            "exitCode": -1,
            "exited": false,
            "status": format!("signal: {}", signal_name(sig)),
        }}}),
        None => json!({"event": {"end": {
            "exitCode": status.exit_code,
            "exited": true,
            "status": format!("exit status {}", status.exit_code),
        }}}),
    }
}

/// The end event of a process whose end is unknown (the guest lost it).
pub fn lost_event(why: &str) -> Value {
    json!({"event": {"end": {
        "exitCode": -1,
        "exited": false,
        "status": "unknown",
        "error": why,
    }}})
}

/// Go's names for the signals (`syscall.Signal.String`).
fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        _ => return format!("signal {sig}"),
    };
    name.to_owned()
}

fn uint32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    opt_uint32(d).map(Option::unwrap_or_default)
}

/// A proto3 JSON `uint32`: a number, or a string holding one.
fn opt_uint32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| de::Error::custom(format!("{n} is not a uint32"))),
        Some(Value::String(s)) => s
            .trim()
            .parse::<u32>()
            .map(Some)
            .map_err(|_| de::Error::custom(format!("{s:?} is not a uint32"))),
        Some(v) => Err(de::Error::custom(format!("{v} is not a uint32"))),
    }
}

/// Base64 as proto3 JSON accepts it: standard or URL-safe alphabet,
/// padding optional. `None` when it is not base64.
pub fn unbase64(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 2);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c)? << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len() - 1]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_in_both_alphabets() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"\xff\xfe\xfd\x00"] {
            let enc = base64(data);
            assert_eq!(unbase64(&enc).as_deref(), Some(data));
            assert_eq!(unbase64(enc.trim_end_matches('=')).as_deref(), Some(data));
        }
        assert_eq!(unbase64("_-8").as_deref(), Some(&b"\xff\xef"[..]));
        assert_eq!(unbase64("a"), None);
        assert_eq!(unbase64("a*bc"), None);
    }

    #[test]
    fn requests_parse_in_proto3_json() {
        let r: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"1"}},
                "pty":{"size":{"cols":"80","rows":24}},"stdin":false,"unknown":1}"#,
        )
        .expect("parses");
        let p = r.process.expect("process");
        assert_eq!(p.args, ["-l", "-c", "echo hi"]);
        assert_eq!(r.pty.expect("pty").rows_cols().expect("size"), (24, 80));
        let s: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":"42"},"signal":"SIGNAL_SIGKILL"}"#)
                .expect("parses");
        assert_eq!(s.process.as_ref().and_then(|p| p.pid), Some(42));
        assert_eq!(s.signal().expect("signal"), 9);
        let bad: SendSignalRequest =
            serde_json::from_str(r#"{"signal":"SIGNAL_UNSPECIFIED"}"#).expect("parses");
        assert!(bad.signal().is_err());
        assert!(serde_json::from_str::<Selector>(r#"{"pid":-1}"#).is_err());
        let zero = Pty {
            size: Some(Size { cols: 0, rows: 1 }),
        };
        assert!(zero.rows_cols().is_err());
    }

    #[test]
    fn end_events_read_like_go() {
        let exit = ExitStatus {
            exit_code: 3,
            signal: None,
            timed_out: false,
            pid: None,
        };
        assert_eq!(
            end_event(&exit)["event"]["end"],
            json!({"exitCode": 3, "exited": true, "status": "exit status 3"})
        );
        let killed = ExitStatus {
            exit_code: 137,
            signal: Some(9),
            timed_out: false,
            pid: None,
        };
        assert_eq!(
            end_event(&killed)["event"]["end"],
            json!({"exitCode": -1, "exited": false, "status": "signal: killed"})
        );
    }
}
