//! `bhatti template …`: named sandbox recipes, kept pre-booted.

use bhatti::api_types::CreateTemplate;
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

use super::args::{parse_key_values, parse_name, KeyValues};
use super::http::{enc, Client};
use super::output::{s, short_time, Printer};
use super::settings::require_token;
use super::{CliError, ExitStatus, Result};

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Create a template; its pre-booted snapshot is built in the background.
    Create(TemplateArgs),
    /// List your templates and the state of their pre-booted snapshots.
    #[command(visible_alias = "ls")]
    List,
    /// Show one template.
    Inspect {
        #[arg(value_parser = parse_name)]
        name: String,
    },
    /// Delete a template (sandboxes made from it stay).
    #[command(visible_alias = "rm")]
    Delete {
        #[arg(value_parser = parse_name)]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct TemplateArgs {
    #[arg(value_parser = parse_name)]
    pub name: String,
    /// Catalogue image (default: the default rootfs).
    #[arg(long)]
    pub image: Option<String>,
    /// vCPUs.
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long, value_name = "MB")]
    pub memory: Option<u32>,
    /// Root disk size in MiB.
    #[arg(long, visible_alias = "disk-size", value_name = "MB")]
    pub disk: Option<u64>,
    /// Environment: KEY=VALUE, or several as A=1,B=2 (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE[,…]", value_parser = parse_key_values)]
    pub env: Vec<KeyValues>,
    /// One of your secrets, given to each sandbox at create (repeatable).
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
    /// Script run once before the snapshot is taken (its result is in
    /// every sandbox from the template).
    #[arg(long, value_name = "SCRIPT")]
    pub init: Option<String>,
    /// Sandboxes from it are never paused or snapshotted when idle.
    #[arg(long)]
    pub keep_hot: bool,
}

pub async fn template(c: &Client, cmd: TemplateCommand, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    match cmd {
        TemplateCommand::Create(a) => {
            let body = CreateTemplate {
                name: a.name,
                image: a.image,
                cpus: a.cpus,
                memory_mb: a.memory,
                disk_mb: a.disk,
                env: a.env.into_iter().flat_map(|kv| kv.0).collect(),
                secrets: a.secrets,
                init: a.init,
                keep_hot: a.keep_hot,
            };
            let body = serde_json::to_value(&body).map_err(|e| CliError::new(e.to_string()))?;
            let (_, v) = c.json(Method::POST, "/templates", Some(body)).await?;
            if out.json {
                out.json_value(&v)?;
            } else {
                out.note(&format!(
                    "template {} created; its pre-booted snapshot is {}",
                    s(&v, "name"),
                    prebooted_state(&v)
                ));
            }
        }
        TemplateCommand::List => {
            let v = c.get("/templates").await?;
            if out.json {
                out.json_value(&v)?;
            } else {
                out.list_of(
                    &v,
                    "templates",
                    "no templates; create one with `bhatti template create NAME`",
                    &["NAME", "IMAGE", "CPUS", "MEMORY", "PREBOOTED", "CREATED"],
                    |t| {
                        vec![
                            s(t, "name"),
                            t.get("image")
                                .and_then(Value::as_str)
                                .unwrap_or("(default)")
                                .to_owned(),
                            opt(t, "cpus"),
                            opt(t, "memory_mb"),
                            prebooted_state(t),
                            short_time(&s(t, "created_at")),
                        ]
                    },
                )?;
            }
        }
        TemplateCommand::Inspect { name } => {
            let v = c.get(&format!("/templates/{}", enc(&name))).await?;
            out.json_value(&v)?;
        }
        TemplateCommand::Delete { name } => {
            c.json(Method::DELETE, &format!("/templates/{}", enc(&name)), None)
                .await?;
            if out.json {
                out.json_value(&json!({ "deleted": name }))?;
            } else {
                out.note(&format!("deleted template {name}"));
            }
        }
    }
    Ok(ExitStatus::Success)
}

fn opt(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_u64)
        .map_or_else(|| "-".into(), |n| n.to_string())
}

fn prebooted_state(v: &Value) -> String {
    let p = v.get("prebooted");
    let state = p
        .and_then(|p| p.get("state"))
        .and_then(Value::as_str)
        .unwrap_or("none");
    match p.and_then(|p| p.get("error")).and_then(Value::as_str) {
        Some(e) if state == "failed" => format!("failed: {e}"),
        _ => state.to_owned(),
    }
}
