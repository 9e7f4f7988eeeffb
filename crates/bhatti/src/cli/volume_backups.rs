//! `bhatti volume backup|backups|restore|backup-delete|schedule`: volume
//! backups to the daemon's object store (`docs/backups.md`).

use std::time::Duration;

use bhatti::api_types::{RestoreVolume, SetBackupSchedule};
use hyper::Method;
use serde_json::{json, Value};

use super::http::{enc, Client};
use super::output::{s, short_time, Printer};
use super::{CliError, ExitStatus, Result};

/// How often `--wait` asks whether a backup is done.
const POLL: Duration = Duration::from_millis(500);

pub async fn backup(c: &Client, out: &Printer, name: &str, wait: bool) -> Result<ExitStatus> {
    let path = format!("/volumes/{}/backups", enc(name));
    let (_, mut v) = c.json(Method::POST, &path, None).await?;
    if wait {
        let one = format!("{path}/{}", enc(&s(&v, "id")));
        while s(&v, "state") == "running" {
            tokio::time::sleep(POLL).await;
            v = c.get(&one).await?;
        }
        if s(&v, "state") == "failed" {
            return Err(CliError::new(format!(
                "backup {} of volume {name} failed: {}",
                s(&v, "id"),
                s(&v, "error")
            )));
        }
    }
    if out.json {
        out.json_value(&v)?;
    } else if wait {
        out.note(&format!(
            "backed up volume {name}: {} ({} bytes stored, sha256 {})",
            s(&v, "id"),
            num(&v, "stored_bytes"),
            s(&v, "sha256")
        ));
    } else {
        out.note(&format!(
            "backup {} of volume {name} started; see `bhatti volume backups {name}`",
            s(&v, "id")
        ));
    }
    Ok(ExitStatus::Success)
}

pub async fn list(c: &Client, out: &Printer, name: &str) -> Result<ExitStatus> {
    let v = c.get(&format!("/volumes/{}/backups", enc(name))).await?;
    if out.json {
        out.json_value(&v)?;
    } else {
        out.list_of(
            &v,
            "backups",
            &format!("no backups; make one with `bhatti volume backup {name}`"),
            &[
                "ID",
                "STATE",
                "RAW_BYTES",
                "STORED_BYTES",
                "CREATED",
                "ERROR",
            ],
            |b| {
                vec![
                    s(b, "id"),
                    s(b, "state"),
                    num(b, "raw_bytes"),
                    num(b, "stored_bytes"),
                    short_time(&s(b, "created_at")),
                    b.get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("-")
                        .to_string(),
                ]
            },
        )?;
    }
    Ok(ExitStatus::Success)
}

pub async fn restore(
    c: &Client,
    out: &Printer,
    name: &str,
    backup: String,
    into: Option<String>,
) -> Result<ExitStatus> {
    let b = serde_json::to_value(RestoreVolume { backup, into })
        .map_err(|e| CliError::new(e.to_string()))?;
    let path = format!("/volumes/{}/restore", enc(name));
    let (_, v) = c.json(Method::POST, &path, Some(b)).await?;
    if out.json {
        out.json_value(&v)?;
    } else {
        out.note(&format!(
            "restored backup {} into volume {} ({} bytes, sha256 {})",
            s(&v, "backup"),
            s(&v, "volume"),
            num(&v, "raw_bytes"),
            s(&v, "sha256")
        ));
    }
    Ok(ExitStatus::Success)
}

pub async fn delete(c: &Client, out: &Printer, name: &str, backup: &str) -> Result<ExitStatus> {
    let path = format!("/volumes/{}/backups/{}", enc(name), enc(backup));
    c.json(Method::DELETE, &path, None).await?;
    if out.json {
        out.json_value(&json!({ "deleted": backup }))?;
    } else {
        out.note(&format!("deleted backup {backup} of volume {name}"));
    }
    Ok(ExitStatus::Success)
}

/// Sets (`cron` and `keep`), removes (`off`) or shows the schedule.
pub async fn schedule(
    c: &Client,
    out: &Printer,
    name: &str,
    cron: Option<String>,
    keep: Option<u32>,
    off: bool,
) -> Result<ExitStatus> {
    let path = format!("/volumes/{}/backup-schedule", enc(name));
    if off {
        c.json(Method::DELETE, &path, None).await?;
        if out.json {
            out.json_value(&json!({ "deleted": name }))?;
        } else {
            out.note(&format!("volume {name} has no backup schedule now"));
        }
        return Ok(ExitStatus::Success);
    }
    let v = match cron {
        Some(cron) => {
            let keep_last = keep.ok_or_else(|| {
                CliError::usage("give --keep N: how many scheduled backups to keep")
            })?;
            let b = serde_json::to_value(SetBackupSchedule { cron, keep_last })
                .map_err(|e| CliError::new(e.to_string()))?;
            c.json(Method::PUT, &path, Some(b)).await?.1
        }
        None => c.get(&path).await?,
    };
    if out.json {
        out.json_value(&v)?;
    } else {
        out.note(&format!(
            "volume {name}: backups at \"{}\" (UTC), keeping {}; next {}{}",
            s(&v, "cron"),
            num(&v, "keep_last"),
            v.get("next_at").and_then(Value::as_str).unwrap_or("never"),
            v.get("last_error")
                .and_then(Value::as_str)
                .map(|e| format!("; last run failed: {e}"))
                .unwrap_or_default()
        ));
    }
    Ok(ExitStatus::Success)
}

fn num(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_u64)
        .map_or_else(|| "-".into(), |n| n.to_string())
}
