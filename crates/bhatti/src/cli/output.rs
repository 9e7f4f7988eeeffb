//! Writing results: JSON or human tables on stdout, notes on stderr.

use std::io::{IsTerminal, Write};

use comfy_table::{presets, ContentArrangement, Table};
use serde_json::Value;

use super::{CliError, Result};

/// Where results go and in which form.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    /// `--json`: one JSON document on stdout, no tables.
    pub json: bool,
}

impl Printer {
    /// Pretty JSON and a newline on stdout.
    pub fn json_value(&self, v: &Value) -> Result<()> {
        let mut s = serde_json::to_string_pretty(v)
            .map_err(|e| CliError::new(format!("cannot encode JSON: {e}")))?;
        s.push('\n');
        self.raw(s.as_bytes())
    }

    /// Bytes on stdout, flushed; a closed stdout ends the program quietly.
    pub fn raw(&self, bytes: &[u8]) -> Result<()> {
        write_stdout(bytes)
    }

    /// A line on stdout.
    pub fn line(&self, s: &str) -> Result<()> {
        let mut l = String::with_capacity(s.len() + 1);
        l.push_str(s);
        l.push('\n');
        self.raw(l.as_bytes())
    }

    /// A note for a person, on stderr (never in `--json` mode).
    pub fn note(&self, s: &str) {
        if !self.json {
            eprintln!("{s}");
        }
    }

    /// A table on stdout.
    /// The array `v[key]` as a table of one row per item, or `empty` as a
    /// note when it has none.
    pub fn list_of(
        &self,
        v: &Value,
        key: &str,
        empty: &str,
        header: &[&str],
        row: impl Fn(&Value) -> Vec<String>,
    ) -> Result<()> {
        let items = v
            .get(key)
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        if items.is_empty() {
            self.note(empty);
            return Ok(());
        }
        self.table(header, items.iter().map(row).collect())
    }

    pub fn table(&self, header: &[&str], rows: Vec<Vec<String>>) -> Result<()> {
        let mut t = Table::new();
        t.load_style(presets::NOTHING)
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(header.iter().copied());
        for r in rows {
            t.add_row(r);
        }
        // comfy-table pads every cell; trailing blanks are noise in a pipe.
        let text: String = t
            .to_string()
            .lines()
            .map(|l| {
                format!(
                    "{}\n",
                    l.trim_end().strip_prefix(' ').unwrap_or(l.trim_end())
                )
            })
            .collect();
        self.raw(text.as_bytes())
    }

    /// `key: value` lines on stdout.
    pub fn fields(&self, fields: &[(&str, String)]) -> Result<()> {
        let w = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
        let mut s = String::new();
        for (k, v) in fields {
            s.push_str(&format!("{:<w$} {v}\n", format!("{k}:")));
        }
        self.raw(s.as_bytes())
    }
}

/// Writes and flushes stdout; EPIPE becomes a quiet success.
pub fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(CliError::broken_pipe()),
        Err(e) => Err(CliError::new(format!("cannot write to stdout: {e}"))),
    }
}

/// Writes and flushes stderr (a closed stderr is ignored).
pub fn write_stderr(bytes: &[u8]) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(bytes).and_then(|()| err.flush());
}

pub fn stderr_is_tty() -> bool {
    std::io::stderr().is_terminal()
}

/// A string field, or "-".
pub fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// An integer field.
pub fn n(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

/// `k=v,k2=v2` of a JSON object, or "-".
pub fn labels(v: &Value) -> String {
    match v.get("labels").and_then(Value::as_object) {
        Some(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// An RFC 3339 timestamp shortened for a table: `2026-11-29 04:40:00`.
pub fn short_time(ts: &str) -> String {
    if ts.len() >= 19 && ts.as_bytes()[10] == b'T' {
        format!("{} {}", &ts[..10], &ts[11..19])
    } else {
        ts.to_string()
    }
}

/// Standard base64 (for binary file contents in `--json`).
pub fn base64(data: &[u8]) -> String {
    bhatti::api_types::base64(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(
            short_time("2026-11-29T04:40:00.123Z"),
            "2026-11-29 04:40:00"
        );
        assert_eq!(short_time("x"), "x");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        let v = serde_json::json!({"a": "x", "b": null, "c": 3, "labels": {"k": "v", "z": "1"}});
        assert_eq!(s(&v, "a"), "x");
        assert_eq!(s(&v, "b"), "-");
        assert_eq!(s(&v, "c"), "3");
        assert_eq!(s(&v, "nope"), "-");
        assert_eq!(labels(&v), "k=v,z=1");
    }
}
