//! `bhatti share SANDBOX [--revoke]`: a link that opens the sandbox's
//! terminal in a browser (the daemon's web shell), or revoking every link.
//! The daemon answers with a path unless it knows its public address
//! (`[shell] public_url`); the CLI then puts its own endpoint in front.

use clap::Args;
use hyper::Method;
use serde_json::{json, Value};

use super::http::{Client, Endpoint};
use super::output::{s, Printer};
use super::sandbox::sandbox_path;
use super::{CliError, ExitStatus, Result};

#[derive(Debug, Args)]
pub struct ShareArgs {
    /// Sandbox name or id.
    pub sandbox: String,
    /// Revoke every link to this sandbox's terminal (open pages close).
    #[arg(long)]
    pub revoke: bool,
}

/// The link as a browser opens it: `url` when absolute, else the CLI's own
/// TCP endpoint in front; `None` over a unix socket.
fn absolute(endpoint: &Endpoint, url: &str) -> Option<String> {
    if !url.starts_with('/') {
        return Some(url.to_owned());
    }
    match endpoint {
        Endpoint::Tcp { .. } => Some(format!("{endpoint}{url}")),
        Endpoint::Unix(_) => None,
    }
}

pub async fn share(c: &Client, a: ShareArgs, out: &Printer) -> Result<ExitStatus> {
    let path = sandbox_path(&a.sandbox, "/shell-token");
    if a.revoke {
        c.json(Method::DELETE, &path, None).await?;
        if out.json {
            out.json_value(&json!({"sandbox": a.sandbox, "revoked": true}))?;
        } else {
            out.line(&format!("revoked every shell link of {}", a.sandbox))?;
        }
        return Ok(ExitStatus::Success);
    }
    let (_, mut v) = c.json(Method::POST, &path, Some(json!({}))).await?;
    let url = v
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| CliError::new("the daemon's answer has no url"))?
        .to_owned();
    let full = absolute(&c.endpoint, &url);
    if let Some(f) = &full {
        v["url"] = Value::String(f.clone());
    }
    if out.json {
        out.json_value(&v)?;
    } else {
        out.line(full.as_deref().unwrap_or(&url))?;
        if full.is_none() {
            out.note(
                "note: the daemon is reached over a unix socket, so this is only the link's path; \
                 put the daemon's browser address in front (or set [shell] public_url in its config)",
            );
        }
        out.note(&format!(
            "anyone with this link can use the terminal of {} until {}; `bhatti share {} --revoke` revokes it",
            a.sandbox,
            s(&v, "expires_at"),
            a.sandbox
        ));
    }
    Ok(ExitStatus::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_made_absolute_when_possible() {
        let tcp = Endpoint::parse("http://127.0.0.1:8080").unwrap();
        let unix = Endpoint::parse("/run/bhatti/bhatti.sock").unwrap();
        let path = "/_shell/sb-1#token=bhs_x";
        assert_eq!(
            absolute(&tcp, path).as_deref(),
            Some("http://127.0.0.1:8080/_shell/sb-1#token=bhs_x")
        );
        assert_eq!(absolute(&unix, path), None);
        let abs = "https://b.example.com/_shell/sb-1#token=bhs_x";
        assert_eq!(absolute(&unix, abs).as_deref(), Some(abs));
    }
}
