//! `bhatti image …`: the image catalogue over the API (`/images`, `/tasks`).

use std::io::{IsTerminal, Read};
use std::time::Duration;

use hyper::Method;
use serde_json::{json, Value};

use super::args::ImageCommand;
use super::http::{enc, Body, Client};
use super::output::{self, human_bytes, n, s, short_time, Printer};
use super::sandbox::sandbox_path;
use super::settings::require_token;
use super::{CliError, ExitStatus, Result};

/// How often a pull's task is polled.
const POLL: Duration = Duration::from_millis(300);

pub async fn image(c: &Client, cmd: ImageCommand, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    match cmd {
        ImageCommand::Pull {
            reference,
            name,
            username,
            password_stdin,
            token_stdin,
        } => {
            pull(
                c,
                out,
                reference,
                name,
                username,
                password_stdin,
                token_stdin,
            )
            .await
        }
        ImageCommand::Import { file, name } => {
            let data = std::fs::read(&file)
                .map_err(|e| CliError::new(format!("cannot read {}: {e}", file.display())))?;
            out.note(&format!(
                "uploading {} ({})",
                file.display(),
                human_bytes(data.len() as u64)
            ));
            let resp = c
                .ok(
                    Method::POST,
                    &format!("/images/import?name={}", enc(&name)),
                    Body::Raw(data.into()),
                    Some("application/json"),
                )
                .await?;
            let body = super::http::read_body(resp.into_body()).await?;
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| CliError::new(format!("the daemon sent invalid JSON: {e}")))?;
            done(out, &v, "imported")
        }
        ImageCommand::Save { sandbox, name } => {
            let (_, v) = c
                .json(
                    Method::POST,
                    &sandbox_path(&sandbox, "/save-image"),
                    Some(json!({ "name": name })),
                )
                .await?;
            done(out, &v, &format!("saved from '{sandbox}' as"))
        }
        ImageCommand::List => {
            let v = c.get("/images").await?;
            if out.json {
                out.json_value(&v)?;
                return Ok(ExitStatus::Success);
            }
            out.list_of(
                &v,
                "images",
                "no images; pull one with `bhatti image pull REF`",
                &["NAME", "SOURCE", "SIZE", "REFERENCE", "CREATED"],
                |i| {
                    let shared = i.get("shared").and_then(Value::as_bool) == Some(true);
                    vec![
                        s(i, "name"),
                        if shared {
                            "shared".into()
                        } else {
                            s(i, "source")
                        },
                        n(i, "size_bytes").map_or("-".into(), |b| human_bytes(b.max(0) as u64)),
                        s(i, "reference"),
                        short_time(&s(i, "created_at")),
                    ]
                },
            )?;
            Ok(ExitStatus::Success)
        }
        ImageCommand::Delete { name } => {
            c.json(Method::DELETE, &format!("/images/{}", enc(&name)), None)
                .await?;
            out.note(&format!("image '{name}' deleted"));
            Ok(ExitStatus::Success)
        }
    }
}

fn done(out: &Printer, v: &Value, what: &str) -> Result<ExitStatus> {
    if out.json {
        out.json_value(v)?;
    } else {
        out.note(&format!(
            "image {what} '{}' ({})",
            s(v, "name"),
            n(v, "size_bytes").map_or("-".into(), |b| human_bytes(b.max(0) as u64))
        ));
    }
    Ok(ExitStatus::Success)
}

/// A secret from stdin, without its trailing newline.
fn stdin_secret(what: &str) -> Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(CliError::usage(format!(
            "--{what}-stdin: pipe the {what} in (e.g. `echo \"$TOKEN\" | bhatti image pull …`)"
        )));
    }
    let mut s = String::new();
    stdin
        .lock()
        .read_to_string(&mut s)
        .map_err(|e| CliError::new(format!("cannot read the {what} from stdin: {e}")))?;
    let s = s.trim_end_matches(['\n', '\r']).to_owned();
    if s.is_empty() {
        return Err(CliError::usage(format!("--{what}-stdin: stdin was empty")));
    }
    Ok(s)
}

async fn pull(
    c: &Client,
    out: &Printer,
    reference: String,
    name: Option<String>,
    username: Option<String>,
    password_stdin: bool,
    token_stdin: bool,
) -> Result<ExitStatus> {
    let auth = match (username, password_stdin, token_stdin) {
        (Some(u), true, false) => {
            Some(json!({"username": u, "password": stdin_secret("password")?}))
        }
        (Some(_), false, _) => {
            return Err(CliError::usage(
                "--username needs --password-stdin (the password is read from stdin)",
            ))
        }
        (None, false, true) => Some(json!({"token": stdin_secret("token")?})),
        (None, false, false) => None,
        _ => {
            return Err(CliError::usage(
                "use --username with --password-stdin, or --token-stdin, not both",
            ))
        }
    };
    let mut body = json!({ "ref": reference });
    if let Some(n) = name {
        body["name"] = json!(n);
    }
    if let Some(a) = auth {
        body["auth"] = a;
    }
    let (_, v) = c.json(Method::POST, "/images/pull", Some(body)).await?;
    let id = v
        .get("task")
        .and_then(|t| t.get("id"))
        .and_then(Value::as_str)
        .ok_or_else(|| CliError::new("the daemon's answer has no task id"))?
        .to_owned();
    let path = format!("/tasks/{}", enc(&id));
    let bar = (!out.json && output::stderr_is_tty()).then(|| {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.enable_steady_tick(Duration::from_millis(100));
        pb
    });
    let task = loop {
        let t = tokio::select! {
            t = c.get(&path) => t?,
            _ = tokio::signal::ctrl_c() => {
                if let Some(pb) = &bar {
                    pb.set_message("cancelling");
                }
                let r = c.json(Method::DELETE, &path, None).await;
                if let Some(pb) = &bar {
                    pb.finish_and_clear();
                }
                r?;
                return Err(CliError::new(format!("pull of {reference} cancelled")));
            }
        };
        if let Some(pb) = &bar {
            let phase = s(&t, "phase");
            let p = t.get("progress").cloned().unwrap_or(Value::Null);
            let (done, total) = (
                n(&p, "done").unwrap_or(0).max(0) as u64,
                n(&p, "total").unwrap_or(0).max(0) as u64,
            );
            pb.set_message(format!("{reference}: {phase}"));
            if phase == "downloading" {
                pb.set_length(total);
                pb.set_position(done);
            }
        }
        if s(&t, "state") != "running" {
            break t;
        }
        tokio::time::sleep(POLL).await;
    };
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    match s(&task, "state").as_str() {
        "succeeded" => {
            let image = task.get("image").cloned().unwrap_or(Value::Null);
            done(out, &image, &format!("{reference} pulled as"))
        }
        state => {
            if out.json {
                out.json_value(&task)?;
            }
            Err(CliError::new(format!(
                "pull of {reference} {state}: {}",
                s(&task, "error")
            )))
        }
    }
}
