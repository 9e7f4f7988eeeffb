//! Host-side commands, run as root where the daemon runs: `serve`, `user …`
//! (directly on the daemon's SQLite database; WAL lets them run beside a
//! live daemon) and `admin status`.

use std::path::{Path, PathBuf};

use bhatti::api_types::{rfc3339_ms, IssuedKeyView, UserView};
use bhatti::auth::{self, EffectiveCaps};
use bhatti::config::Config;
use bhatti::store::users::UserCaps;
use bhatti::store::Store;
use serde_json::{json, Value};

use super::args::{AdminCommand, AdminEventsArgs, HostArgs, UserCommand};
use super::http::{Client, Endpoint};
use super::output::{short_time, Printer};
use super::{CliError, ExitStatus, Result};

/// Used when neither `--config` nor `BHATTI_CONFIG` is given and it exists.
pub const DEFAULT_CONFIG: &str = "/etc/bhatti/config.toml";

/// The daemon config: `--config`/`BHATTI_CONFIG` (clap reads both), else
/// [`DEFAULT_CONFIG`] when present, else the built-in defaults.
pub fn load_config(host: &HostArgs) -> Result<(Config, Option<PathBuf>)> {
    let path = host
        .config
        .clone()
        .filter(|p| !p.as_os_str().is_empty())
        .or_else(|| {
            let p = Path::new(DEFAULT_CONFIG);
            p.is_file().then(|| p.to_path_buf())
        });
    let cfg = match &path {
        Some(p) => Config::from_file(p),
        None => Config::load(None),
    }
    .map_err(|e| CliError::new(e.to_string()))?;
    Ok((cfg, path))
}

fn open_store(cfg: &Config) -> Result<Store> {
    Store::open(cfg.db_path()).map_err(|e| {
        let hint = if nix::unistd::geteuid().is_root() {
            ""
        } else {
            " (user commands run on the daemon's host, usually as root)"
        };
        CliError::new(format!("{e}{hint}"))
    })
}

/// `bhatti serve`.
pub fn serve(host: &HostArgs) -> Result<ExitStatus> {
    let (cfg, _) = load_config(host)?;
    let rt = bhatti::daemon::runtime(cfg.worker_threads)
        .map_err(|e| CliError::new(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        bhatti::daemon::serve(cfg, shutdown_signal())
            .await
            .map_err(|e| CliError::new(e.to_string()))
    })?;
    Ok(ExitStatus::Success)
}

/// Resolves on Ctrl+C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn user_view(u: &bhatti::store::users::User, cfg: &Config) -> UserView {
    let caps = EffectiveCaps::resolve(&u.caps, &cfg.limits, &cfg.vm);
    UserView {
        id: u.id.clone(),
        name: u.name.clone(),
        max_sandboxes: caps.max_sandboxes,
        max_cpus: caps.max_cpus,
        max_memory_mb: caps.max_memory_mb,
        max_snapshots: caps.max_snapshots,
        created_at: rfc3339_ms(u.created_at),
    }
}

fn print_key(out: &Printer, issued: &auth::IssuedKey, verb: &str) -> Result<()> {
    if out.json {
        let v = IssuedKeyView {
            name: issued.user.name.clone(),
            api_key: issued.api_key.clone(),
        };
        out.json_value(&serde_json::to_value(v).map_err(|e| CliError::new(e.to_string()))?)
    } else {
        out.note(&format!(
            "{verb} user '{}'; its API key (shown only now, store it safely):",
            issued.user.name
        ));
        out.line(&issued.api_key)?;
        out.note("use it with: bhatti setup --token <key>   (or BHATTI_TOKEN=<key>)");
        Ok(())
    }
}

/// `bhatti user …`.
pub fn user(cmd: UserCommand, out: &Printer) -> Result<ExitStatus> {
    match cmd {
        UserCommand::Create {
            host,
            name,
            max_sandboxes,
            max_cpus,
            max_memory,
            max_snapshots,
            isolate,
        } => {
            let (cfg, _) = load_config(&host)?;
            if let Some(c) = max_cpus {
                bhatti::api_types::validate_cpus(c, cfg.vm.max_cpus)
                    .map_err(|e| CliError::usage(format!("--max-cpus: {}", e.message)))?;
            }
            if let Some(m) = max_memory {
                bhatti::api_types::validate_memory_mb(m, cfg.vm.max_memory_mb)
                    .map_err(|e| CliError::usage(format!("--max-memory: {}", e.message)))?;
            }
            let caps = UserCaps {
                max_sandboxes,
                max_cpus,
                max_memory_mb: max_memory,
                max_snapshots,
            };
            let store = open_store(&cfg)?;
            let issued = store
                .with(|c| Ok(auth::create_user(c, &name, caps)))?
                .map_err(|e| CliError::new(e.to_string()))?;
            if isolate.is_some() {
                store
                    .with(|c| bhatti::store::users::set_net_isolated(c, &name, isolate))
                    .map_err(|e| CliError::new(e.to_string()))?;
            }
            print_key(out, &issued, "created")?;
        }
        UserCommand::Isolate { host, name, value } => {
            let isolated = match value.as_str() {
                "true" | "on" | "yes" => Some(true),
                "false" | "off" | "no" => Some(false),
                "default" => None,
                other => {
                    return Err(CliError::usage(format!(
                        "expected true, false or default, not {other:?}"
                    )))
                }
            };
            let (cfg, _) = load_config(&host)?;
            let store = open_store(&cfg)?;
            let u = store
                .with(|c| bhatti::store::users::set_net_isolated(c, &name, isolated))
                .map_err(|e| CliError::new(e.to_string()))?;
            let effective = u.net_isolated.unwrap_or(cfg.network.isolate_sandboxes);
            if out.json {
                out.json_value(&json!({ "name": name, "isolated": effective }))?;
            } else {
                out.note(&format!(
                    "user '{name}': sandboxes {} each other (with their next create, or the daemon's next start)",
                    if effective { "cannot reach" } else { "can reach" }
                ));
            }
        }
        UserCommand::List { host } => {
            let (cfg, _) = load_config(&host)?;
            let store = open_store(&cfg)?;
            let users = store
                .with(|c| Ok(auth::list_users(c)))?
                .map_err(|e| CliError::new(e.to_string()))?;
            let views: Vec<UserView> = users.iter().map(|u| user_view(u, &cfg)).collect();
            if out.json {
                out.json_value(&json!({ "users": views }))?;
            } else if views.is_empty() {
                out.note("no users; create one with `bhatti user create --name NAME`");
            } else {
                let rows = views
                    .iter()
                    .map(|u| {
                        vec![
                            u.name.clone(),
                            u.id.clone(),
                            u.max_sandboxes.to_string(),
                            u.max_cpus.to_string(),
                            format!("{}M", u.max_memory_mb),
                            u.max_snapshots.to_string(),
                            short_time(&u.created_at),
                        ]
                    })
                    .collect();
                out.table(
                    &[
                        "NAME",
                        "ID",
                        "MAX SANDBOXES",
                        "MAX CPUS",
                        "MAX MEMORY",
                        "MAX CHECKPOINTS",
                        "CREATED",
                    ],
                    rows,
                )?;
            }
        }
        UserCommand::Delete { host, name } => {
            let (cfg, _) = load_config(&host)?;
            let store = open_store(&cfg)?;
            store
                .with(|c| Ok(auth::delete_user(c, &name)))?
                .map_err(|e| CliError::new(e.to_string()))?;
            if out.json {
                out.json_value(&json!({ "deleted": name }))?;
            } else {
                out.note(&format!("deleted user '{name}'"));
            }
        }
        UserCommand::RotateKey { host, name } => {
            let (cfg, _) = load_config(&host)?;
            let store = open_store(&cfg)?;
            let issued = store
                .with(|c| Ok(auth::rotate_key(c, &name)))?
                .map_err(|e| CliError::new(e.to_string()))?;
            print_key(out, &issued, "new key for")?;
        }
    }
    Ok(ExitStatus::Success)
}

/// Users and sandboxes by status, read without creating or migrating the
/// database (a status check must not race the daemon's own migration); a
/// missing or unreadable database counts as empty.
fn read_counts(db: &Path) -> (i64, std::collections::BTreeMap<String, i64>) {
    use rusqlite::{Connection, OpenFlags};
    let mut by_status = std::collections::BTreeMap::new();
    let Ok(c) = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return (0, by_status);
    };
    let _ = c.busy_timeout(std::time::Duration::from_secs(2));
    let users = c
        .query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))
        .unwrap_or(0);
    if let Ok(mut st) = c.prepare("SELECT status, COUNT(*) FROM sandboxes GROUP BY status") {
        if let Ok(rows) = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))) {
            by_status.extend(rows.flatten());
        }
    }
    (users, by_status)
}

/// One user's network as the store and the namespace show it.
struct UserNetRow {
    user: String,
    bridge: String,
    subnet: String,
    isolated: bool,
    sandboxes: i64,
    up: bool,
}

/// Every user with sandboxes: their bridge, /24, isolation and whether the
/// bridge exists (read-only, like [`read_counts`]).
fn read_user_networks(cfg: &Config) -> Vec<UserNetRow> {
    use rusqlite::{Connection, OpenFlags};
    let Ok(c) = Connection::open_with_flags(cfg.db_path(), OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return Vec::new();
    };
    let _ = c.busy_timeout(std::time::Duration::from_secs(2));
    let Ok(mut st) = c.prepare(
        "SELECT u.name, u.net_index, u.net_isolated, COUNT(s.id) FROM users u
         JOIN sandboxes s ON s.owner = u.id AND s.ip_host IS NOT NULL
         GROUP BY u.id ORDER BY u.net_index",
    ) else {
        return Vec::new();
    };
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<i64>>(1)?,
            r.get::<_, Option<bool>>(2)?,
            r.get::<_, i64>(3)?,
        ))
    });
    let Ok(rows) = rows else { return Vec::new() };
    let pool = cfg.network.pool_cidr();
    rows.flatten()
        .filter_map(|(user, index, isolated, sandboxes)| {
            let index = u32::try_from(index?).ok()?;
            let (bridge, subnet, _) = bhatti::net::tenants::user_network(pool, index)?;
            let mut ip = std::process::Command::new("ip");
            if let Some(ns) = &cfg.network.netns {
                ip.args(["-n", ns]);
            }
            let up = ip
                .args(["link", "show", "dev", &bridge])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            Some(UserNetRow {
                user,
                bridge,
                subnet: subnet.to_string(),
                isolated: isolated.unwrap_or(cfg.network.isolate_sandboxes),
                sandboxes,
                up,
            })
        })
        .collect()
}

/// `bhatti admin status`.
pub fn admin(cmd: AdminCommand, out: &Printer) -> Result<ExitStatus> {
    let host = match cmd {
        AdminCommand::Status { host } => host,
        AdminCommand::ExampleConfig => {
            out.raw(Config::example_toml().as_bytes())?;
            return Ok(ExitStatus::Success);
        }
        AdminCommand::Events(a) => return admin_events(a, out),
    };
    let (cfg, path) = load_config(&host)?;
    let rt = super::runtime()?;
    let client = Client {
        endpoint: Endpoint::Unix(cfg.listen_unix.clone()),
        token: None,
    };
    let health: std::result::Result<Value, String> =
        rt.block_on(client.get("/health")).map_err(|e| e.message);
    let (users, by_status) = read_counts(&cfg.db_path());
    let nets = if cfg.network.enabled {
        read_user_networks(&cfg)
    } else {
        Vec::new()
    };
    let v = json!({
        "networks": nets.iter().map(|n| json!({
            "user": n.user, "bridge": n.bridge, "subnet": n.subnet,
            "isolated": n.isolated, "sandboxes": n.sandboxes, "bridge_up": n.up,
        })).collect::<Vec<_>>(),
        "config": path,
        "data_dir": cfg.data_dir,
        "socket": cfg.listen_unix,
        "tcp": cfg.listen_tcp.map(|a| a.to_string()),
        "daemon": match &health {
            Ok(h) => json!({"up": true, "health": h}),
            Err(e) => json!({"up": false, "error": e}),
        },
        "users": users,
        "sandboxes": by_status,
    });
    if out.json {
        out.json_value(&v)?;
    } else {
        let daemon = match &health {
            Ok(h) => format!(
                "up (version {}, backend {})",
                super::output::s(h, "version"),
                super::output::s(h, "backend")
            ),
            Err(e) => format!("down: {e}"),
        };
        let sb = if by_status.is_empty() {
            "none".to_string()
        } else {
            by_status
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.fields(&[
            (
                "config",
                path.map_or("(built-in defaults)".into(), |p| p.display().to_string()),
            ),
            ("data_dir", cfg.data_dir.display().to_string()),
            ("socket", cfg.listen_unix.display().to_string()),
            (
                "tcp",
                cfg.listen_tcp.map_or("off".into(), |a| a.to_string()),
            ),
            ("daemon", daemon),
            ("users", users.to_string()),
            ("sandboxes", sb),
        ])?;
        if !nets.is_empty() {
            let rows = nets
                .iter()
                .map(|n| {
                    vec![
                        n.user.clone(),
                        n.bridge.clone(),
                        n.subnet.clone(),
                        n.sandboxes.to_string(),
                        if n.isolated { "yes" } else { "no" }.to_string(),
                        if n.up { "up" } else { "missing" }.to_string(),
                    ]
                })
                .collect();
            out.table(
                &["USER", "BRIDGE", "SUBNET", "SANDBOXES", "ISOLATED", "STATE"],
                rows,
            )?;
        }
    }
    Ok(if health.is_ok() {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}

/// `bhatti admin events`: every user's events (or one user's), straight
/// from the daemon's database, the newest `limit`, oldest first.
fn admin_events(a: AdminEventsArgs, out: &Printer) -> Result<ExitStatus> {
    use bhatti::store::events::{self, EventFilter};
    let (cfg, _) = load_config(&a.host)?;
    let store = open_store(&cfg)?;
    let (users, rows) = store
        .with(|c| {
            let users: std::collections::HashMap<String, String> = bhatti::store::users::list(c)?
                .into_iter()
                .map(|u| (u.id, u.name))
                .collect();
            let owner = match &a.user {
                Some(name) => match users.iter().find(|(_, n)| *n == name) {
                    Some((id, _)) => Some(id.clone()),
                    None => return Ok(Err(format!("no user named '{name}'"))),
                },
                None => None,
            };
            let f = EventFilter {
                owner,
                sandbox_id: a.sandbox.clone(),
                kinds: a
                    .kind
                    .as_deref()
                    .map(|k| k.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                limit: a.limit,
                since: None,
            };
            Ok(Ok((users.clone(), events::latest(c, &f)?)))
        })
        .map_err(|e| CliError::new(e.to_string()))?
        .map_err(CliError::new)?;
    let user_of = |e: &events::Event| {
        e.owner
            .as_ref()
            .map(|o| users.get(o).cloned().unwrap_or_else(|| o.clone()))
    };
    if out.json {
        let list: Vec<Value> = rows
            .iter()
            .map(|e| {
                json!({
                    "id": e.id, "at_unix_ms": e.at, "at": rfc3339_ms(e.at), "type": e.kind,
                    "user": user_of(e), "sandbox_id": e.sandbox_id,
                    "latency_ms": e.latency_ms, "detail": e.detail,
                })
            })
            .collect();
        out.json_value(&json!({ "events": list }))?;
        return Ok(ExitStatus::Success);
    }
    if rows.is_empty() {
        out.note("no events");
        return Ok(ExitStatus::Success);
    }
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let table = rows
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                short_time(&rfc3339_ms(e.at)),
                dash(user_of(e)),
                dash(e.sandbox_id.clone()),
                e.kind.clone(),
                dash(e.latency_ms.map(|l| format!("{l:.1} ms"))),
                dash(e.detail.clone()),
            ]
        })
        .collect();
    out.table(
        &[
            "ID", "TIME", "USER", "SANDBOX", "EVENT", "LATENCY", "DETAIL",
        ],
        table,
    )?;
    Ok(ExitStatus::Success)
}
