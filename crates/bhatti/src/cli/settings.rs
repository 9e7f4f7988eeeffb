//! The CLI's own settings: the daemon URL and API key, resolved as flag >
//! environment (`BHATTI_URL`, `BHATTI_TOKEN`; clap reads both) > the file
//! `bhatti setup` writes > the default unix socket. The file is
//! `$XDG_CONFIG_HOME/bhatti/config.toml` (else `~/.config/bhatti/…`), mode
//! 0600. Beside it, `sessions.json` keeps the last output offset seen per
//! shell session so a reattach replays exactly what was missed.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::args::{GlobalArgs, SetupArgs};
use super::http::{Client, Endpoint, DEFAULT_SOCKET};
use super::output::Printer;
use super::{CliError, ExitStatus, Result};

/// `config.toml`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The CLI's config directory.
pub fn config_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })
        .ok_or_else(|| CliError::new("neither XDG_CONFIG_HOME nor HOME is set"))?;
    Ok(base.join("bhatti"))
}

pub fn config_path() -> Result<PathBuf> {
    Ok(config_dir()?.join("config.toml"))
}

/// The saved settings, or none when there is no file.
pub fn load_file(path: &Path) -> Result<FileConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| {
            CliError::new(format!(
                "invalid CLI config {}: {} (rerun `bhatti setup`)",
                path.display(),
                super::one_line(&e.to_string())
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(CliError::new(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Writes `bytes` to `path` atomically with mode 0600 (directory 0700).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| CliError::new(format!("{} has no parent directory", path.display())))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CliError::new(format!("cannot create {}: {e}", dir.display())))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        CliError::new(format!("cannot write {}: {e}", path.display()))
    })
}

/// The API client for this run.
pub fn client(g: &GlobalArgs) -> Result<Client> {
    let file = if g.url.is_none() || g.token.is_none() {
        load_file(&config_path()?)?
    } else {
        FileConfig::default()
    };
    let url = g
        .url
        .clone()
        .filter(|u| !u.is_empty())
        .or(file.url)
        .unwrap_or_else(|| format!("unix://{DEFAULT_SOCKET}"));
    let token = g.token.clone().filter(|t| !t.is_empty()).or(file.token);
    Ok(Client {
        endpoint: Endpoint::parse(&url)?,
        token,
    })
}

/// Fails early when no key is configured.
pub fn require_token(c: &Client) -> Result<()> {
    if c.token.is_none() {
        return Err(CliError::new(
            "no API key: run `bhatti setup`, pass --token or set BHATTI_TOKEN",
        ));
    }
    Ok(())
}

fn prompt(question: &str, default: Option<&str>) -> Result<String> {
    let mut err = std::io::stderr();
    match default {
        Some(d) => write!(err, "{question} [{d}]: "),
        None => write!(err, "{question}: "),
    }
    .and_then(|()| err.flush())
    .map_err(|e| CliError::new(e.to_string()))?;
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::new(format!("cannot read stdin: {e}")))?;
    if n == 0 {
        return Err(CliError::new("stdin closed before an answer"));
    }
    let answer = line.trim().to_string();
    Ok(if answer.is_empty() {
        default.unwrap_or_default().to_string()
    } else {
        answer
    })
}

/// Reads a line from the terminal without echoing it.
pub fn prompt_secret(question: &str) -> Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin)
        .map_err(|e| CliError::new(format!("cannot read the terminal's mode: {e}")))?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL);
    tcsetattr(&stdin, SetArg::TCSANOW, &quiet)
        .map_err(|e| CliError::new(format!("cannot turn off echo: {e}")))?;
    let answer = prompt(question, None);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    answer
}

/// `bhatti setup`: asks (or takes flags) for URL and key, checks them
/// against the daemon, and saves them.
pub async fn setup(g: &GlobalArgs, a: SetupArgs, out: &Printer) -> Result<ExitStatus> {
    let path = config_path()?;
    let current = load_file(&path)?;
    let interactive = std::io::stdin().is_terminal();
    let default_url = current
        .url
        .clone()
        .unwrap_or_else(|| format!("unix://{DEFAULT_SOCKET}"));
    // Missing flags are asked for on stdin, a terminal or not (a script
    // can pipe the answers); an empty endpoint keeps the default.
    let url = match &g.url {
        Some(u) => u.clone(),
        None => {
            if interactive {
                out.note(&format!("(press Enter for {default_url})"));
            }
            let u = prompt("API endpoint", None).map_err(|e| {
                CliError::usage(format!(
                    "no API endpoint: pass --url (or BHATTI_URL) or give it on stdin ({})",
                    e.message
                ))
            })?;
            if u.is_empty() {
                default_url
            } else {
                u
            }
        }
    };
    let endpoint = Endpoint::parse(&url)?;
    let token = match &g.token {
        Some(t) => t.clone(),
        None => {
            let t = if interactive {
                out.note("(bht_…, input hidden; empty keeps the saved one)");
                prompt_secret("API key")?
            } else {
                prompt("API key", None).map_err(|e| {
                    CliError::usage(format!(
                        "no API key: pass --token (or BHATTI_TOKEN) or give it on stdin ({})",
                        e.message
                    ))
                })?
            };
            match (t.is_empty(), &current.token) {
                (true, Some(saved)) => saved.clone(),
                _ => t,
            }
        }
    };
    if !bhatti::auth::is_well_formed(&token) {
        return Err(CliError::usage(
            "that is not a bhatti API key (expected bht_ and 43 letters or digits)",
        ));
    }
    let client = Client {
        endpoint: endpoint.clone(),
        token: Some(token.clone()),
    };
    let mut connected = None;
    if !a.no_verify {
        // Health needs no key; listing checks the key.
        let health = client.get("/health").await?;
        let list = client.get("/sandboxes").await?;
        let n = list
            .get("sandboxes")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        connected = Some(format!(
            "connected to {endpoint}: bhatti {} ({}), key accepted, {n} sandbox{}",
            health.get("version").and_then(Value::as_str).unwrap_or("?"),
            health.get("backend").and_then(Value::as_str).unwrap_or("?"),
            if n == 1 { "" } else { "es" }
        ));
    }
    let file = FileConfig {
        url: Some(endpoint.to_string()),
        token: Some(token),
    };
    let text = toml::to_string(&file).map_err(|e| CliError::new(e.to_string()))?;
    write_private(&path, text.as_bytes())?;
    if out.json {
        out.json_value(&json!({
            "config": path,
            "url": endpoint.to_string(),
            "verified": !a.no_verify,
        }))?;
    } else {
        if let Some(c) = &connected {
            out.line(c)?;
        }
        out.line(&format!("saved {} (daemon {endpoint})", path.display()))?;
    }
    Ok(ExitStatus::Success)
}

/// Last output offsets seen per shell session, keyed by
/// `<endpoint> <sandbox id> <session id>`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SessionOffsets {
    #[serde(default)]
    pub offsets: BTreeMap<String, SeenOffset>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SeenOffset {
    pub offset: u64,
    pub saved_unix_ms: i64,
}

/// Most sessions remembered; the oldest are forgotten past this.
const MAX_REMEMBERED: usize = 256;

impl SessionOffsets {
    fn path() -> Result<PathBuf> {
        Ok(config_dir()?.join("sessions.json"))
    }

    pub fn key(endpoint: &Endpoint, sandbox_id: &str, session: &str) -> String {
        format!("{endpoint} {sandbox_id} {session}")
    }

    /// The saved offsets (none when the file is missing or unreadable).
    pub fn load() -> SessionOffsets {
        Self::path()
            .ok()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Records `offset` for `key` (or forgets it with `None`) and saves.
    pub fn update(key: &str, offset: Option<u64>) -> Result<()> {
        let mut s = Self::load();
        match offset {
            Some(o) => {
                s.offsets.insert(
                    key.to_string(),
                    SeenOffset {
                        offset: o,
                        saved_unix_ms: bhatti::store::now_ms(),
                    },
                );
            }
            None => {
                s.offsets.remove(key);
            }
        }
        while s.offsets.len() > MAX_REMEMBERED {
            let oldest = s
                .offsets
                .iter()
                .min_by_key(|(_, v)| v.saved_unix_ms)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => s.offsets.remove(&k),
                None => break,
            };
        }
        let bytes = serde_json::to_vec_pretty(&s).map_err(|e| CliError::new(e.to_string()))?;
        write_private(&Self::path()?, &bytes)
    }

    pub fn get(&self, key: &str) -> Option<u64> {
        self.offsets.get(key).map(|s| s.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        let f = FileConfig {
            url: Some("unix:///x.sock".into()),
            token: Some("bht_x".into()),
        };
        write_private(&path, toml::to_string(&f).unwrap().as_bytes()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_file(&path).unwrap(), f);
        assert_eq!(
            load_file(&dir.path().join("none")).unwrap(),
            FileConfig::default()
        );
        std::fs::write(&path, "urll = 1").unwrap();
        let e = load_file(&path).unwrap_err();
        assert!(e.message.contains("invalid CLI config"), "{}", e.message);
        assert!(!e.message.contains('\n'));
    }
}
