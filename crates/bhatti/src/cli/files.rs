//! `bhatti file read|write|ls`.

use std::io::Read;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};

use super::args::FileCommand;
use super::http::{query, Body, Client};
use super::output::{self, base64, human_bytes, s, short_time, Printer};
use super::sandbox::sandbox_path;
use super::settings::require_token;
use super::{CliError, ExitStatus, Result};

fn check_path(path: &str) -> Result<()> {
    bhatti::api_types::validate_guest_path("path", path).map_err(|e| CliError::usage(e.to_string()))
}

pub async fn file(c: &Client, cmd: FileCommand, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    match cmd {
        FileCommand::Read(a) => {
            check_path(&a.path)?;
            let mut q = vec![("path", a.path.clone())];
            if let Some(o) = a.offset {
                q.push(("offset", o.to_string()));
            }
            if let Some(l) = a.limit {
                q.push(("limit", l.to_string()));
            }
            if let Some(m) = a.max_bytes {
                q.push(("max_bytes", m.to_string()));
            }
            let path = format!("{}{}", sandbox_path(&a.sandbox, "/files"), query(&q));
            let resp = c.ok(Method::GET, &path, Body::Empty, None).await?;
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let size = header("x-file-size").and_then(|v| v.parse::<u64>().ok());
            let truncated = header("x-truncated").as_deref() == Some("true");
            let mut body = resp.into_body();
            if out.json {
                let bytes = super::http::read_body(body).await?;
                let (encoding, content) = match std::str::from_utf8(&bytes) {
                    Ok(t) => ("utf-8", t.to_string()),
                    Err(_) => ("base64", base64(&bytes)),
                };
                out.json_value(&json!({
                    "path": a.path,
                    "size": size,
                    "truncated": truncated,
                    "encoding": encoding,
                    "content": content,
                }))?;
            } else {
                // Streamed: a large file never sits in memory whole.
                while let Some(frame) = body.frame().await {
                    let frame = frame
                        .map_err(|e| CliError::new(format!("reading {} failed: {e}", a.path)))?;
                    if let Ok(data) = frame.into_data() {
                        output::write_stdout(&data)?;
                    }
                }
                if truncated {
                    out.note(&format!(
                        "bhatti: output truncated ({} in all; use --offset/--limit/--max-bytes)",
                        size.map_or("?".into(), human_bytes)
                    ));
                }
            }
        }
        FileCommand::Write(a) => {
            check_path(&a.path)?;
            let data = match &a.local {
                Some(p) if p.as_os_str() != "-" => std::fs::read(p)
                    .map_err(|e| CliError::new(format!("cannot read {}: {e}", p.display())))?,
                _ => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .lock()
                        .read_to_end(&mut buf)
                        .map_err(|e| CliError::new(format!("cannot read stdin: {e}")))?;
                    buf
                }
            };
            let mut q = vec![("path", a.path.clone())];
            if let Some(m) = a.mode {
                q.push(("mode", format!("{m:04o}")));
            }
            let path = format!("{}{}", sandbox_path(&a.sandbox, "/files"), query(&q));
            let len = data.len();
            let resp = c
                .ok(
                    Method::PUT,
                    &path,
                    Body::Raw(Bytes::from(data)),
                    Some("application/json"),
                )
                .await?;
            let answer = super::http::read_body(resp.into_body()).await?;
            let v: Value =
                serde_json::from_slice(&answer).unwrap_or_else(|_| json!({ "bytes": len }));
            if out.json {
                out.json_value(&v)?;
            } else {
                out.note(&format!(
                    "wrote {} to {}",
                    human_bytes(v.get("bytes").and_then(Value::as_u64).unwrap_or(len as u64)),
                    a.path
                ));
            }
        }
        FileCommand::Ls(a) => {
            check_path(&a.path)?;
            let q = [("path", a.path.clone()), ("ls", "true".to_string())];
            let v = c
                .get(&format!(
                    "{}{}",
                    sandbox_path(&a.sandbox, "/files"),
                    query(&q)
                ))
                .await?;
            if out.json {
                out.json_value(&v)?;
            } else {
                let empty = Vec::new();
                let entries = v.get("entries").and_then(Value::as_array).unwrap_or(&empty);
                let rows = entries.iter().map(entry_row).collect();
                out.table(&["MODE", "SIZE", "MODIFIED", "NAME"], rows)?;
                if v.get("truncated").and_then(Value::as_bool) == Some(true) {
                    out.note("bhatti: the listing was truncated");
                }
            }
        }
    }
    Ok(ExitStatus::Success)
}

fn entry_row(e: &Value) -> Vec<String> {
    let kind = e.get("kind").and_then(Value::as_str).unwrap_or("other");
    let mode = e.get("mode").and_then(Value::as_u64).unwrap_or(0) & 0o7777;
    let k = match kind {
        "dir" => 'd',
        "symlink" => 'l',
        "file" => '-',
        _ => '?',
    };
    let modified = match e.get("modified_at").and_then(Value::as_str) {
        Some(t) => short_time(t),
        None => e
            .get("mtime_ms")
            .and_then(Value::as_i64)
            .map_or("-".into(), |ms| {
                short_time(&bhatti::api_types::rfc3339_ms(ms))
            }),
    };
    let mut name = s(e, "name");
    if kind == "dir" {
        name.push('/');
    }
    vec![
        format!("{k}{}", rwx(mode as u32)),
        e.get("size")
            .and_then(Value::as_u64)
            .map_or("-".into(), |n| n.to_string()),
        modified,
        name,
    ]
}

/// 0o754 → "rwxr-xr--".
fn rwx(mode: u32) -> String {
    let mut s = String::with_capacity(9);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_rows_from_either_shape() {
        assert_eq!(rwx(0o754), "rwxr-xr--");
        let a = json!({"name": "etc", "kind": "dir", "size": 4096, "mode": 0o755, "modified_at": "2026-01-02T03:04:05.000Z"});
        assert_eq!(
            entry_row(&a),
            ["drwxr-xr-x", "4096", "2026-01-02 03:04:05", "etc/"]
        );
        let b = json!({"name": "x", "kind": "file", "size": 3, "mode": 0o100644, "mtime_ms": 0});
        assert_eq!(
            entry_row(&b),
            ["-rw-r--r--", "3", "1970-01-01 00:00:00", "x"]
        );
        assert!(check_path("rel").is_err());
        assert!(check_path("/ok").is_ok());
    }
}
