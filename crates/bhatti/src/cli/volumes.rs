//! `bhatti volume …`: ext4 volumes that outlive sandboxes.

use bhatti::api_types::{CloneVolume, CreateVolume, ResizeVolume, SandboxVolume};
use clap::Subcommand;
use hyper::Method;
use serde_json::{json, Value};

use super::args::parse_name;
use super::http::{enc, Client};
use super::output::{s, short_time, Printer};
use super::settings::require_token;
use super::{CliError, ExitStatus, Result};

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create an empty volume.
    Create {
        #[arg(value_parser = parse_name)]
        name: String,
        /// Size in MiB.
        #[arg(long, value_name = "MB")]
        size: u64,
    },
    /// List your volumes and where they are attached.
    #[command(visible_alias = "ls")]
    List,
    /// Show one volume.
    Inspect { name: String },
    /// Delete a volume and its data (refused while a sandbox has it).
    #[command(visible_alias = "rm")]
    Delete { name: String },
    /// Grow a volume (only while no sandbox has it).
    Resize {
        name: String,
        /// The new size in MiB.
        #[arg(long, value_name = "MB")]
        size: u64,
    },
    /// Copy a volume into a new one.
    Clone {
        /// The source volume.
        name: String,
        /// The new volume's name.
        #[arg(value_parser = parse_name)]
        new_name: String,
    },
    /// Back a volume up to the daemon's object store (while no sandbox
    /// has it read-write).
    Backup {
        name: String,
        /// Wait until the upload is done (exit 1 if it fails).
        #[arg(long)]
        wait: bool,
    },
    /// List a volume's backups, newest first.
    Backups { name: String },
    /// Restore a backup into the volume (while no sandbox has it), or into
    /// a new volume.
    Restore {
        name: String,
        /// The backup's id (see `bhatti volume backups NAME`).
        backup: String,
        /// Restore into a new volume of this name instead.
        #[arg(long, value_name = "NEW", value_parser = parse_name)]
        into: Option<String>,
    },
    /// Delete one backup of a volume.
    #[command(visible_alias = "backup-rm")]
    BackupDelete { name: String, backup: String },
    /// Back a volume up on a cron schedule (UTC), keeping the newest N;
    /// without CRON, show the schedule.
    Schedule {
        name: String,
        /// 5-field cron expression, e.g. "0 3 * * *", or @daily.
        #[arg(conflicts_with = "off")]
        cron: Option<String>,
        /// How many scheduled backups to keep.
        #[arg(long, value_name = "N", requires = "cron")]
        keep: Option<u32>,
        /// Remove the schedule (backups stay).
        #[arg(long)]
        off: bool,
    },
}

/// `--volume NAME:/MOUNT[:ro]` of `bhatti create`.
pub fn parse_volume_spec(s: &str) -> std::result::Result<SandboxVolume, String> {
    let bad = || format!("expected NAME:/MOUNT or NAME:/MOUNT:ro, got {s:?}");
    let (name, rest) = s.split_once(':').ok_or_else(bad)?;
    let (mount, read_only) = match rest.rsplit_once(':') {
        Some((m, "ro")) => (m, true),
        Some((m, "rw")) => (m, false),
        _ => (rest, false),
    };
    if name.is_empty() || !mount.starts_with('/') {
        return Err(bad());
    }
    Ok(SandboxVolume {
        name: name.to_owned(),
        mount: mount.to_owned(),
        read_only,
        ..Default::default()
    })
}

pub async fn volume(c: &Client, cmd: VolumeCommand, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    match cmd {
        VolumeCommand::Create { name, size } => {
            let b = body(&CreateVolume {
                name,
                size_mb: size,
            })?;
            let (_, v) = c.json(Method::POST, "/volumes", Some(b)).await?;
            done(out, &v, |v| {
                format!(
                    "volume {} created ({} MiB)",
                    s(v, "name"),
                    num(v, "size_mb")
                )
            })?;
        }
        VolumeCommand::List => {
            let v = c.get("/volumes").await?;
            if out.json {
                out.json_value(&v)?;
            } else {
                out.list_of(
                    &v,
                    "volumes",
                    "no volumes; create one with `bhatti volume create NAME --size MB`",
                    &["NAME", "SIZE_MB", "ATTACHED", "CREATED"],
                    |t| {
                        vec![
                            s(t, "name"),
                            num(t, "size_mb"),
                            attached(t),
                            short_time(&s(t, "created_at")),
                        ]
                    },
                )?;
            }
        }
        VolumeCommand::Inspect { name } => {
            let v = c.get(&format!("/volumes/{}", enc(&name))).await?;
            out.json_value(&v)?;
        }
        VolumeCommand::Delete { name } => {
            c.json(Method::DELETE, &format!("/volumes/{}", enc(&name)), None)
                .await?;
            if out.json {
                out.json_value(&json!({ "deleted": name }))?;
            } else {
                out.note(&format!("deleted volume {name}"));
            }
        }
        VolumeCommand::Resize { name, size } => {
            let b = body(&ResizeVolume { size_mb: size })?;
            let path = format!("/volumes/{}/resize", enc(&name));
            let (_, v) = c.json(Method::POST, &path, Some(b)).await?;
            done(out, &v, |v| {
                format!("volume {} is now {} MiB", s(v, "name"), num(v, "size_mb"))
            })?;
        }
        VolumeCommand::Clone { name, new_name } => {
            let b = body(&CloneVolume { name: new_name })?;
            let path = format!("/volumes/{}/clone", enc(&name));
            let (_, v) = c.json(Method::POST, &path, Some(b)).await?;
            done(out, &v, |v| {
                format!("volume {} cloned to {}", name, s(v, "name"))
            })?;
        }
        VolumeCommand::Backup { name, wait } => {
            return super::volume_backups::backup(c, out, &name, wait).await
        }
        VolumeCommand::Backups { name } => return super::volume_backups::list(c, out, &name).await,
        VolumeCommand::Restore { name, backup, into } => {
            return super::volume_backups::restore(c, out, &name, backup, into).await
        }
        VolumeCommand::BackupDelete { name, backup } => {
            return super::volume_backups::delete(c, out, &name, &backup).await
        }
        VolumeCommand::Schedule {
            name,
            cron,
            keep,
            off,
        } => return super::volume_backups::schedule(c, out, &name, cron, keep, off).await,
    }
    Ok(ExitStatus::Success)
}

fn body<T: serde::Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| CliError::new(e.to_string()))
}

fn done(out: &Printer, v: &Value, note: impl Fn(&Value) -> String) -> Result<()> {
    if out.json {
        out.json_value(v)?;
    } else {
        out.note(&note(v));
    }
    Ok(())
}

fn num(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_u64)
        .map_or_else(|| "-".into(), |n| n.to_string())
}

/// `sandbox:/mount(ro)` of each attachment, or `-`.
fn attached(v: &Value) -> String {
    let list: Vec<String> = v
        .get("attachments")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|x| {
                    let ro = x.get("read_only").and_then(Value::as_bool) == Some(true);
                    format!(
                        "{}:{}{}",
                        s(x, "sandbox_name"),
                        s(x, "mount"),
                        if ro { " (ro)" } else { "" }
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_specs() {
        let v = parse_volume_spec("data:/data").unwrap();
        assert_eq!(
            (v.name.as_str(), v.mount.as_str(), v.read_only),
            ("data", "/data", false)
        );
        let v = parse_volume_spec("m:/models/x:ro").unwrap();
        assert_eq!((v.mount.as_str(), v.read_only), ("/models/x", true));
        assert!(parse_volume_spec("data").is_err());
        assert!(parse_volume_spec("data:rel").is_err());
        assert!(parse_volume_spec(":/x").is_err());
    }
}
