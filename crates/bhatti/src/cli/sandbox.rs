//! Sandbox lifecycle, exec, checkpoints and secrets over the API.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::time::{Duration, Instant};

use bhatti::api_types::{
    CreateFile, CreateSandbox, ExecEvent, ExecRequest, NetworkPolicy, PatchSandbox,
};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use super::args::{
    CreateArgs, EditArgs, EventsArgs, ExecArgs, KillArgs, ListArgs, SecretCommand, SnapshotCommand,
    StartArgs,
};
use super::http::{enc, Body, Client};
use super::output::{self, human_bytes, labels, n, s, short_time, Printer};
use super::settings::{prompt_secret, require_token};
use super::{CliError, ExitStatus, Result};

/// `/sandboxes/{ref}` with the reference encoded.
pub fn sandbox_path(sandbox: &str, rest: &str) -> String {
    format!("/sandboxes/{}{rest}", enc(sandbox))
}

/// A spinner on stderr while `fut` runs, only when stderr is a terminal and
/// the output is not JSON.
async fn with_spinner<T>(
    out: &Printer,
    message: String,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    if out.json || !output::stderr_is_tty() {
        return fut.await;
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    pb.set_message(message);
    pb.enable_steady_tick(Duration::from_millis(100));
    let r = fut.await;
    pb.finish_and_clear();
    r
}

fn sandbox_fields(v: &Value) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("name", s(v, "name")),
        ("id", s(v, "id")),
        ("status", s(v, "status")),
        ("thermal", s(v, "thermal")),
        ("cpus", s(v, "cpus")),
        (
            "memory",
            n(v, "memory_mb").map_or("-".into(), |m| format!("{m} MiB")),
        ),
        (
            "disk",
            n(v, "disk_mb").map_or("image size".into(), |m| format!("{m} MiB")),
        ),
        ("keep_hot", s(v, "keep_hot")),
        ("labels", labels(v)),
        ("ip", s(v, "ip")),
        ("created", s(v, "created_at")),
    ];
    for (k, label) in [
        ("origin", "origin"),
        ("image", "image"),
        ("template", "template"),
    ] {
        if let Some(x) = v.get(k).and_then(Value::as_str) {
            f.push((label, x.to_owned()));
        }
    }
    if let Some(init) = v.get("init").filter(|i| i.is_object()) {
        let mut state = s(init, "state");
        if let Some(code) = init.get("exit_code").and_then(Value::as_i64) {
            state.push_str(&format!(" (exit {code})"));
        }
        if let Some(e) = init.get("error").and_then(Value::as_str) {
            state.push_str(&format!(": {e}"));
        }
        f.push(("init", state));
    }
    if let Some(vols) = v.get("volumes").and_then(Value::as_array) {
        let shown: Vec<String> = vols
            .iter()
            .map(|x| {
                let ro = x.get("read_only").and_then(Value::as_bool) == Some(true);
                format!(
                    "{} at {}{}",
                    s(x, "name"),
                    s(x, "mount"),
                    if ro { " (read-only)" } else { "" }
                )
            })
            .collect();
        if !shown.is_empty() {
            f.push(("volumes", shown.join(", ")));
        }
    }
    if let Some(net) = v.get("network").filter(|n| n.is_object()) {
        f.push(("gateway", s(net, "gateway")));
        f.push(("dns name", s(net, "dns_name")));
        let rules = |k: &str| {
            net.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        let mut egress = s(net, "egress");
        if !rules("allow").is_empty() {
            egress.push_str(&format!("; allow {}", rules("allow")));
        }
        if !rules("deny").is_empty() {
            egress.push_str(&format!("; deny {}", rules("deny")));
        }
        f.push(("egress", egress));
    }
    if v.get("error").is_some_and(|e| !e.is_null()) {
        f.push(("error", s(v, "error")));
    }
    if let Some(t) = v.get("thermal_info").filter(|t| t.is_object()) {
        let secs = |k: &str| match n(t, k) {
            Some(0) => "never".to_string(),
            Some(x) => format!("{x} s idle"),
            None => "-".into(),
        };
        f.push(("warm after", secs("warm_after_secs")));
        f.push(("cold after", secs("cold_after_secs")));
        f.push((
            "idle",
            n(t, "idle_ms").map_or("-".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0)),
        ));
        let at = |k: &str| {
            t.get(k)
                .and_then(Value::as_i64)
                .map(|ms| short_time(&bhatti::api_types::rfc3339_ms(ms)))
        };
        if let Some(w) = at("warm_at_unix_ms") {
            f.push(("goes warm at", w));
        }
        if let Some(c) = at("cold_at_unix_ms") {
            f.push(("goes cold at", c));
        }
    }
    f
}

fn print_sandbox(out: &Printer, v: &Value) -> Result<()> {
    if out.json {
        out.json_value(v)
    } else {
        out.fields(&sandbox_fields(v))
    }
}

/// `--no-internet`, `--allow`, `--deny` as a policy; `None` when none is
/// given (the daemon's default applies).
fn network_policy(
    no_internet: bool,
    allow: Vec<String>,
    deny: Vec<String>,
) -> Option<NetworkPolicy> {
    if !no_internet && allow.is_empty() && deny.is_empty() {
        return None;
    }
    Some(NetworkPolicy {
        // An allowlist alone means "only these".
        egress: (no_internet || !allow.is_empty()).then(|| "deny".to_string()),
        allow,
        deny,
    })
}

pub async fn create(c: &Client, a: CreateArgs, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let name = a.name.or(a.name_flag);
    // Files are read first: a missing one changes nothing.
    let mut files = Vec::with_capacity(a.files.len());
    for f in &a.files {
        let data = std::fs::read(&f.local).map_err(|e| {
            CliError::usage(format!("--file: cannot read {}: {e}", f.local.display()))
        })?;
        let mode = match f.mode {
            Some(m) => m,
            None => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::metadata(&f.local)
                    .map_err(|e| CliError::usage(format!("--file: {}: {e}", f.local.display())))?
                    .permissions()
                    .mode()
                    & 0o7777
            }
        };
        files.push(CreateFile::new(f.guest.clone(), &data, Some(mode)));
    }
    let req = CreateSandbox {
        name: name.clone(),
        cpus: a.cpus,
        memory_mb: a.memory,
        disk_mb: a.disk,
        env: a.env.into_iter().flat_map(|kv| kv.0).collect(),
        init: a.init,
        keep_hot: a.keep_hot,
        labels: a.labels.into_iter().collect(),
        secrets: a.secrets,
        from_snapshot: a.from_snapshot,
        image: a.image,
        template: a.template,
        network: network_policy(a.no_internet, a.allow, a.deny),
        volumes: a.volumes,
        new_volumes: Vec::new(),
        files,
        wait_init: a.wait_init,
    };
    let body = serde_json::to_value(&req).map_err(|e| CliError::new(e.to_string()))?;
    let what = name
        .as_deref()
        .map_or("a sandbox".to_string(), |n| format!("'{n}'"));
    let started = Instant::now();
    let (status, v) = with_spinner(
        out,
        format!(
            "creating {what}, waiting for it to boot{}",
            if req.wait_init {
                " and its init to end"
            } else {
                ""
            }
        ),
        c.json(Method::POST, "/sandboxes", Some(body)),
    )
    .await?;
    if status == StatusCode::OK {
        out.note(&format!("sandbox '{}' already exists", s(&v, "name")));
    } else {
        out.note(&format!(
            "created sandbox '{}' in {:.1}s",
            s(&v, "name"),
            started.elapsed().as_secs_f64()
        ));
    }
    print_sandbox(out, &v)?;
    Ok(ExitStatus::Success)
}

pub async fn list(c: &Client, a: ListArgs, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let path = if a.labels.is_empty() {
        "/sandboxes".to_string()
    } else {
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "/sandboxes{}",
            super::http::query(&[("label", labels.join(","))])
        )
    };
    let v = c.get(&path).await?;
    if out.json {
        out.json_value(&v)?;
        return Ok(ExitStatus::Success);
    }
    out.list_of(
        &v,
        "sandboxes",
        "no sandboxes; create one with `bhatti create NAME`",
        &[
            "NAME", "ID", "STATUS", "THERMAL", "CPUS", "MEMORY", "IP", "CREATED", "LABELS",
        ],
        |sb| {
            vec![
                s(sb, "name"),
                s(sb, "id"),
                s(sb, "status"),
                s(sb, "thermal"),
                s(sb, "cpus"),
                n(sb, "memory_mb").map_or("-".into(), |m| format!("{m}M")),
                s(sb, "ip"),
                short_time(&s(sb, "created_at")),
                labels(sb),
            ]
        },
    )?;
    Ok(ExitStatus::Success)
}

pub async fn inspect(c: &Client, sandbox: &str, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let v = c.get(&sandbox_path(sandbox, "")).await?;
    print_sandbox(out, &v)?;
    Ok(ExitStatus::Success)
}

pub async fn edit(c: &Client, a: EditArgs, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let touches_labels = a.clear_labels || !a.labels.is_empty() || !a.remove_labels.is_empty();
    let network = if a.internet {
        Some(NetworkPolicy {
            egress: Some("allow".into()),
            allow: a.allow.clone(),
            deny: a.deny.clone(),
        })
    } else {
        network_policy(a.no_internet, a.allow.clone(), a.deny.clone())
    };
    if a.keep_hot.is_none() && !touches_labels && a.rename.is_none() && network.is_none() {
        return Err(CliError::usage(
            "nothing to change: pass --keep-hot, --label, --remove-label, --clear-labels, --rename, --no-internet, --internet, --allow or --deny",
        ));
    }
    let path = sandbox_path(&a.sandbox, "");
    let labels = if touches_labels {
        // PATCH replaces all labels: start from the current ones.
        let mut current: BTreeMap<String, String> = if a.clear_labels {
            BTreeMap::new()
        } else {
            let v = c.get(&path).await?;
            serde_json::from_value(v.get("labels").cloned().unwrap_or(json!({})))
                .map_err(|e| CliError::new(format!("unexpected labels from the daemon: {e}")))?
        };
        for k in &a.remove_labels {
            current.remove(k);
        }
        current.extend(a.labels);
        Some(current)
    } else {
        None
    };
    let patch = PatchSandbox {
        keep_hot: a.keep_hot,
        labels,
        name: a.rename,
        network,
    };
    let body = serde_json::to_value(&patch).map_err(|e| CliError::new(e.to_string()))?;
    let (_, v) = c.json(Method::PATCH, &path, Some(body)).await?;
    print_sandbox(out, &v)?;
    Ok(ExitStatus::Success)
}

pub async fn stop(c: &Client, sandbox: &str, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let (_, v) = with_spinner(
        out,
        format!("stopping '{sandbox}'"),
        c.json(Method::POST, &sandbox_path(sandbox, "/stop"), None),
    )
    .await?;
    out.note(&format!("stopped '{}'", s(&v, "name")));
    if out.json {
        out.json_value(&v)?;
    }
    Ok(ExitStatus::Success)
}

pub async fn start(c: &Client, a: StartArgs, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let body = json!({ "fresh": a.fresh });
    let (_, v) = with_spinner(
        out,
        format!("starting '{}'", a.sandbox),
        c.json(
            Method::POST,
            &sandbox_path(&a.sandbox, "/start"),
            Some(body),
        ),
    )
    .await?;
    out.note(&format!("started '{}'", s(&v, "name")));
    if out.json {
        out.json_value(&v)?;
    }
    Ok(ExitStatus::Success)
}

/// `bhatti kill SANDBOX SESSION`.
pub async fn kill(c: &Client, a: KillArgs, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let mut path = sandbox_path(&a.sandbox, &format!("/sessions/{}", enc(&a.session)));
    if let Some(sig) = a.signal {
        path.push_str(&format!("?signal={sig}"));
    }
    c.json(Method::DELETE, &path, None).await?;
    if out.json {
        out.json_value(&json!({ "killed": a.session }))?;
    } else {
        out.note(&format!("killed session {}", a.session));
    }
    Ok(ExitStatus::Success)
}

pub async fn destroy(c: &Client, sandbox: &str, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    with_spinner(
        out,
        format!("destroying '{sandbox}'"),
        c.json(Method::DELETE, &sandbox_path(sandbox, ""), None),
    )
    .await?;
    if out.json {
        out.json_value(&json!({ "destroyed": sandbox }))?;
    } else {
        out.note(&format!("destroyed '{sandbox}'"));
    }
    Ok(ExitStatus::Success)
}

/// Piped stdin, read whole (UTF-8 text: the API carries it as a string).
fn piped_stdin() -> Result<Option<String>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(None);
    }
    let mut buf = Vec::new();
    match stdin.lock().read_to_end(&mut buf) {
        Ok(_) => {}
        // No stdin at all (closed fd): nothing to forward.
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => return Ok(None),
        Err(e) => return Err(CliError::new(format!("cannot read stdin: {e}"))),
    }
    if buf.is_empty() {
        return Ok(None);
    }
    String::from_utf8(buf).map(Some).map_err(|_| {
        CliError::new(
            "stdin is not UTF-8 text; upload binary data with `bhatti file write` instead",
        )
    })
}

pub async fn exec(c: &Client, a: ExecArgs, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let stdin = if a.no_stdin || a.detach {
        None
    } else {
        piped_stdin()?
    };
    let req = ExecRequest {
        cmd: a.cmd,
        env: a.env.into_iter().collect(),
        cwd: a.cwd,
        stdin,
        timeout_sec: a.timeout,
        detach: a.detach,
    };
    req.validate().map_err(|e| CliError::usage(e.to_string()))?;
    let body = serde_json::to_value(&req).map_err(|e| CliError::new(e.to_string()))?;
    let path = sandbox_path(&a.sandbox, "/exec");
    if a.detach {
        let (_, v) = c.json(Method::POST, &path, Some(body)).await?;
        if out.json {
            out.json_value(&v)?;
        } else {
            out.line(&s(&v, "pid"))?;
            out.note("started in the background (pid above)");
        }
        return Ok(ExitStatus::Success);
    }
    if out.json {
        // One document: {exit_code, stdout, stderr[, timed_out]}.
        let (_, v) = c.json(Method::POST, &path, Some(body)).await?;
        out.json_value(&v)?;
        if v.get("timed_out").and_then(Value::as_bool) == Some(true) {
            eprintln!("bhatti: the command timed out");
        }
        note_truncated(&v);
        return Ok(ExitStatus::remote(n(&v, "exit_code").unwrap_or(255)));
    }
    let resp = c
        .ok(
            Method::POST,
            &path,
            Body::Json(body),
            Some("application/x-ndjson"),
        )
        .await?;
    let is_ndjson = resp
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/x-ndjson"));
    let mut body = resp.into_body();
    if !is_ndjson {
        // A daemon that buffers: the whole result at once.
        let bytes = super::http::read_body(body).await?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| CliError::new(format!("invalid exec answer from the daemon: {e}")))?;
        output::write_stdout(s_raw(&v, "stdout").as_bytes())?;
        output::write_stderr(s_raw(&v, "stderr").as_bytes());
        note_truncated(&v);
        return Ok(ExitStatus::remote(n(&v, "exit_code").unwrap_or(255)));
    }
    let mut lines = NdjsonLines::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CliError::new(format!("the exec stream broke: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for line in lines.push(&data) {
            match parse_event(&line)? {
                Some(ExecEvent::Stdout { data }) => output::write_stdout(data.as_bytes())?,
                Some(ExecEvent::Stderr { data }) => output::write_stderr(data.as_bytes()),
                Some(ExecEvent::Exit { exit_code }) => {
                    return Ok(ExitStatus::remote(i64::from(exit_code)))
                }
                Some(ExecEvent::Error { error }) => return Err(CliError::new(error)),
                None => {}
            }
        }
    }
    Err(CliError::new(
        "the exec stream ended without the command's exit code (daemon restarted or connection lost)",
    ))
}

/// A buffered answer holds a limited amount of each stream: say so when
/// some was dropped.
fn note_truncated(v: &Value) {
    for stream in ["stdout", "stderr"] {
        if v.get(format!("{stream}_truncated"))
            .and_then(Value::as_bool)
            == Some(true)
        {
            eprintln!(
                "bhatti: {stream} was cut at the daemon's limit and the rest dropped \
                 (without --json, exec streams it whole)"
            );
        }
    }
}

fn s_raw(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// One NDJSON line; unknown event types are skipped (forward compatible).
fn parse_event(line: &[u8]) -> Result<Option<ExecEvent>> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| CliError::new(format!("invalid line in the exec stream: {e}")))?;
    match v.get("type").and_then(Value::as_str) {
        Some("stdout" | "stderr" | "exit" | "error") => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| CliError::new(format!("invalid event in the exec stream: {e}"))),
        _ => Ok(None),
    }
}

/// Splits a byte stream into lines.
#[derive(Default)]
pub struct NdjsonLines {
    buf: Vec<u8>,
}

impl NdjsonLines {
    pub fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=i).collect();
            line.pop();
            out.push(line);
        }
        out
    }
}

pub async fn snapshot(c: &Client, cmd: SnapshotCommand, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    match cmd {
        SnapshotCommand::Create {
            sandbox,
            name,
            name_flag,
        } => {
            let name = name.or(name_flag).unwrap_or_default();
            let (_, v) = with_spinner(
                out,
                format!("checkpointing '{sandbox}' as '{name}'"),
                c.json(
                    Method::POST,
                    &sandbox_path(&sandbox, "/checkpoint"),
                    Some(json!({ "name": name })),
                ),
            )
            .await?;
            if out.json {
                out.json_value(&v)?;
            } else {
                out.note(&format!(
                    "checkpoint '{}' of '{sandbox}' saved ({})",
                    s(&v, "name"),
                    n(&v, "size_bytes").map_or("-".into(), |b| human_bytes(b.max(0) as u64))
                ));
            }
        }
        SnapshotCommand::List => {
            let v = c.get("/snapshots").await?;
            if out.json {
                out.json_value(&v)?;
            } else {
                let empty = Vec::new();
                let list = v
                    .get("snapshots")
                    .and_then(Value::as_array)
                    .unwrap_or(&empty);
                if list.is_empty() {
                    out.note("no checkpoints; make one with `bhatti snapshot create SANDBOX NAME`");
                } else {
                    let rows = list
                        .iter()
                        .map(|cp| {
                            vec![
                                s(cp, "name"),
                                s(cp, "sandbox_id"),
                                n(cp, "size_bytes")
                                    .map_or("-".into(), |b| human_bytes(b.max(0) as u64)),
                                short_time(&s(cp, "created_at")),
                            ]
                        })
                        .collect();
                    out.table(&["NAME", "SANDBOX", "SIZE", "CREATED"], rows)?;
                }
            }
        }
        SnapshotCommand::Resume {
            snapshot,
            name,
            keep_hot,
        } => {
            let mut body = json!({});
            if let Some(n) = &name {
                body["name"] = json!(n);
            }
            if keep_hot {
                body["keep_hot"] = json!(true);
            }
            let (_, v) = with_spinner(
                out,
                format!("resuming checkpoint '{snapshot}'"),
                c.json(
                    Method::POST,
                    &format!("/snapshots/{}/resume", enc(&snapshot)),
                    Some(body),
                ),
            )
            .await?;
            out.note(&format!(
                "sandbox '{}' resumed from '{snapshot}'",
                s(&v, "name")
            ));
            print_sandbox(out, &v)?;
        }
        SnapshotCommand::Delete { name } => {
            c.json(Method::DELETE, &format!("/snapshots/{}", enc(&name)), None)
                .await?;
            if out.json {
                out.json_value(&json!({ "deleted": name }))?;
            } else {
                out.note(&format!("deleted checkpoint '{name}'"));
            }
        }
    }
    Ok(ExitStatus::Success)
}

pub async fn secret(c: &Client, cmd: SecretCommand, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    match cmd {
        SecretCommand::Set { name, value } => {
            let value = match value {
                Some(v) => v,
                None if std::io::stdin().is_terminal() => {
                    prompt_secret(&format!("Value of {name} (input hidden)"))?
                }
                None => {
                    let mut v = String::new();
                    std::io::stdin()
                        .lock()
                        .read_to_string(&mut v)
                        .map_err(|e| {
                            CliError::new(format!("cannot read the value from stdin: {e}"))
                        })?;
                    // `echo x | bhatti secret set X` means "x", not "x\n".
                    if v.ends_with('\n') {
                        v.pop();
                        if v.ends_with('\r') {
                            v.pop();
                        }
                    }
                    v
                }
            };
            bhatti::secrets::validate_value(&value).map_err(|e| CliError::usage(e.to_string()))?;
            c.json(
                Method::PUT,
                &format!("/secrets/{}", enc(&name)),
                Some(json!({ "value": value })),
            )
            .await?;
            if out.json {
                out.json_value(&json!({ "name": name }))?;
            } else {
                out.note(&format!("secret {name} saved"));
            }
        }
        SecretCommand::List => {
            let v = c.get("/secrets").await?;
            if out.json {
                out.json_value(&v)?;
            } else {
                let empty = Vec::new();
                let list = v.get("secrets").and_then(Value::as_array).unwrap_or(&empty);
                if list.is_empty() {
                    out.note("no secrets; set one with `bhatti secret set NAME`");
                } else {
                    let rows = list
                        .iter()
                        .map(|x| {
                            vec![
                                s(x, "name"),
                                short_time(&s(x, "created_at")),
                                short_time(&s(x, "updated_at")),
                            ]
                        })
                        .collect();
                    out.table(&["NAME", "CREATED", "UPDATED"], rows)?;
                }
            }
        }
        SecretCommand::Delete { name } => {
            c.json(Method::DELETE, &format!("/secrets/{}", enc(&name)), None)
                .await?;
            if out.json {
                out.json_value(&json!({ "deleted": name }))?;
            } else {
                out.note(&format!("deleted secret {name}"));
            }
        }
    }
    Ok(ExitStatus::Success)
}

/// `bhatti events [SANDBOX]`: the event log; `--follow` polls with the
/// cursor until Ctrl-C.
pub async fn events(c: &Client, a: EventsArgs, out: &Printer) -> Result<ExitStatus> {
    require_token(c)?;
    let mut since = a.since.unwrap_or(0);
    let page = |since: u64| {
        let mut q = vec![("limit", a.limit.to_string()), ("since", since.to_string())];
        if let Some(sb) = &a.sandbox {
            q.push(("sandbox", sb.clone()));
        }
        if let Some(k) = &a.kind {
            q.push(("type", k.clone()));
        }
        format!("/events{}", super::http::query(&q))
    };
    if !a.follow {
        let v = c.get(&page(since)).await?;
        if out.json {
            out.json_value(&v)?;
            return Ok(ExitStatus::Success);
        }
        let empty = Vec::new();
        let list = v.get("events").and_then(Value::as_array).unwrap_or(&empty);
        if list.is_empty() {
            out.note("no events");
            return Ok(ExitStatus::Success);
        }
        out.table(&EVENT_HEADER, list.iter().map(event_row).collect())?;
        return Ok(ExitStatus::Success);
    }
    // Following: one line per event as it comes (a table cannot grow).
    if !out.json {
        out.line(&EVENT_HEADER.join("  "))?;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitStatus::Success),
        }
        // Drain: a full page means more are waiting.
        loop {
            let v = c.get(&page(since)).await?;
            let list = v
                .get("events")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for e in &list {
                if out.json {
                    let line = serde_json::to_string(e)
                        .map_err(|e| CliError::new(format!("cannot encode JSON: {e}")))?;
                    out.line(&line)?;
                } else {
                    out.line(&event_row(e).join("  "))?;
                }
            }
            if let Some(next) = v.get("next").and_then(Value::as_u64) {
                since = since.max(next);
            }
            if list.len() < a.limit as usize {
                break;
            }
        }
    }
}

const EVENT_HEADER: [&str; 6] = ["ID", "TIME", "SANDBOX", "EVENT", "LATENCY", "DETAIL"];

/// An event as a row of [`EVENT_HEADER`].
fn event_row(e: &Value) -> Vec<String> {
    let at = e
        .get("at_unix_ms")
        .and_then(Value::as_i64)
        .map_or("-".into(), |ms| {
            short_time(&bhatti::api_types::rfc3339_ms(ms))
        });
    let latency = e
        .get("latency_ms")
        .and_then(Value::as_f64)
        .map_or("-".into(), |l| format!("{l:.1} ms"));
    vec![
        n(e, "id").map_or("-".into(), |i| i.to_string()),
        at,
        s(e, "sandbox_id"),
        s(e, "type"),
        latency,
        s(e, "detail"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_lines_across_chunks() {
        let mut l = NdjsonLines::default();
        assert!(l.push(b"{\"type\":\"std").is_empty());
        let got = l.push(b"out\",\"data\":\"a\"}\n{\"type\":\"exit\",\"exit_code\":7}\n{");
        assert_eq!(got.len(), 2);
        assert_eq!(
            parse_event(&got[0]).unwrap(),
            Some(ExecEvent::Stdout { data: "a".into() })
        );
        assert_eq!(
            parse_event(&got[1]).unwrap(),
            Some(ExecEvent::Exit { exit_code: 7 })
        );
        assert_eq!(parse_event(b"{\"type\":\"progress\"}").unwrap(), None);
        assert_eq!(parse_event(b"  ").unwrap(), None);
        assert!(parse_event(b"nope").is_err());
    }

    #[test]
    fn paths_are_encoded() {
        assert_eq!(sandbox_path("dev", "/exec"), "/sandboxes/dev/exec");
        assert_eq!(sandbox_path("../x", ""), "/sandboxes/%2E%2E%2Fx");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitStatus::remote(7).code(), 7);
        assert_eq!(ExitStatus::remote(0).code(), 0);
        assert_eq!(ExitStatus::remote(300).code(), 255);
        assert_eq!(ExitStatus::remote(-1).code(), 255);
        assert_eq!(ExitStatus::RemoteFailed.code(), 255);
        assert_eq!(ExitStatus::Usage.code(), 2);
    }
}
