//! `bhatti ports`, `publish`, `unpublish`.

use hyper::Method;
use serde_json::{json, Value};

use super::args::{PortsArgs, PublishArgs, UnpublishArgs};
use super::http::Client;
use super::output::{n, s, Printer};
use super::sandbox::sandbox_path;
use super::settings::require_token;
use super::{ExitStatus, Result};

/// Listening ports of a sandbox, or (without one) your published ports.
pub async fn ports(c: &Client, a: PortsArgs, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let Some(sandbox) = a.sandbox else {
        let v = c.get("/ports").await?;
        if out.json {
            out.json_value(&v)?;
            return Ok(ExitStatus::Success);
        }
        return published_table(&v, out);
    };
    let v = c.get(&sandbox_path(&sandbox, "/ports")).await?;
    if out.json {
        out.json_value(&v)?;
        return Ok(ExitStatus::Success);
    }
    out.list_of(
        &v,
        "ports",
        &format!("nothing listens on a TCP port in {sandbox}"),
        &["PORT", "ADDRESS", "PUBLISHED AS"],
        |p| {
            let addrs = p
                .get("addresses")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let published = p
                .get("published")
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_string();
            vec![
                n(p, "port").map(|x| x.to_string()).unwrap_or_default(),
                addrs,
                published,
            ]
        },
    )?;
    Ok(ExitStatus::Success)
}

fn published_table(v: &Value, out: &Printer) -> Result<ExitStatus> {
    out.list_of(
        v,
        "published",
        "no published ports; publish one with `bhatti publish SANDBOX -p PORT`",
        &["SANDBOX", "PORT", "ALIAS", "URL"],
        |p| {
            vec![
                s(p, "sandbox_id"),
                n(p, "port").map(|x| x.to_string()).unwrap_or_default(),
                s(p, "alias"),
                s(p, "url"),
            ]
        },
    )?;
    Ok(ExitStatus::Success)
}

pub async fn publish(c: &Client, a: PublishArgs, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let mut body = json!({ "port": a.port });
    if let Some(alias) = &a.alias {
        body["alias"] = json!(alias);
    }
    let (_, v) = c
        .json(
            Method::POST,
            &sandbox_path(&a.sandbox, "/publish"),
            Some(body),
        )
        .await?;
    if out.json {
        out.json_value(&v)?;
        return Ok(ExitStatus::Success);
    }
    match v.get("url").and_then(Value::as_str) {
        Some(url) => out.line(url)?,
        None => {
            out.line(&s(&v, "alias"))?;
            out.note("the daemon has no public listener ([proxy] listen); reach the port with the authenticated proxy");
        }
    }
    Ok(ExitStatus::Success)
}

pub async fn unpublish(c: &Client, a: UnpublishArgs, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    c.json(
        Method::DELETE,
        &sandbox_path(&a.sandbox, &format!("/publish/{}", a.port)),
        None,
    )
    .await?;
    if out.json {
        out.json_value(&json!({ "unpublished": a.port }))?;
    } else {
        out.note(&format!("port {} of {} unpublished", a.port, a.sandbox));
    }
    Ok(ExitStatus::Success)
}
