//! What the agent runs with: the token, the user commands run as, limits.
//! In a VM it comes from the kernel command line and the config drive; in
//! test mode from command-line flags.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of one agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The per-sandbox secret every connection must present.
    pub token: String,
    /// Uid/gid user commands run as and files are owned by.
    pub uid: u32,
    pub gid: u32,
    /// The user's name for `USER`/`LOGNAME`.
    pub user_name: String,
    pub home: String,
    /// Working directory of commands that name none (else `home`).
    pub workdir: Option<String>,
    /// Login shell for PTY sessions without argv.
    pub shell: String,
    /// Sandbox-wide environment, under per-request env.
    pub env: BTreeMap<String, String>,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Channels open at once on one connection.
    pub max_channels: usize,
    /// PTY sessions held at once, running or exited.
    pub max_sessions: usize,
    /// Bytes of scrollback per session.
    pub scrollback_bytes: usize,
    /// How long an exited session is kept for a late reattach.
    pub exited_session_grace: Duration,
    /// Entries a `list` returns at most.
    pub max_list_entries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_channels: 1024,
            max_sessions: 64,
            scrollback_bytes: 256 * 1024,
            exited_session_grace: Duration::from_secs(600),
            max_list_entries: 10_000,
        }
    }
}

impl AgentConfig {
    /// The in-VM defaults: user `lohar` (1000:1000).
    pub fn guest_default(token: String) -> Self {
        AgentConfig {
            token,
            uid: 1000,
            gid: 1000,
            user_name: "lohar".into(),
            home: "/home/lohar".into(),
            workdir: None,
            shell: "/bin/bash".into(),
            env: BTreeMap::new(),
            limits: Limits::default(),
        }
    }
}

/// `lohar serve --unix PATH (--token T | --token-file F) [--uid N --gid N --home DIR --shell SH --workdir DIR]`
#[derive(Debug)]
pub struct TestModeArgs {
    pub socket: PathBuf,
    pub config: AgentConfig,
}

const USAGE: &str = "usage: lohar serve --unix PATH (--token TOKEN | --token-file FILE) \
[--uid N] [--gid N] [--home DIR] [--shell PATH] [--workdir DIR] [--scrollback BYTES] [--max-sessions N]\n\
(lohar runs as the guest's init when it is PID 1)";

impl TestModeArgs {
    pub fn from_env_args() -> Result<Self, String> {
        Self::parse(std::env::args().skip(1).collect())
    }

    pub fn parse(args: Vec<String>) -> Result<Self, String> {
        let mut it = args.into_iter();
        match it.next().as_deref() {
            Some("serve") => {}
            Some("--version") => return Err(format!("lohar {}", env!("CARGO_PKG_VERSION"))),
            _ => return Err(USAGE.into()),
        }
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let mut cfg = AgentConfig {
            token: String::new(),
            uid,
            gid,
            user_name: String::new(),
            home: std::env::var("HOME").unwrap_or_else(|_| "/".into()),
            workdir: None,
            shell: "/bin/bash".into(),
            env: BTreeMap::new(),
            limits: Limits::default(),
        };
        let mut socket = None;
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
            };
            let num = |v: String| {
                v.parse::<u64>()
                    .map_err(|_| format!("{flag}: not a number: {v}"))
            };
            match flag.as_str() {
                "--unix" => socket = Some(PathBuf::from(value()?)),
                "--token" => cfg.token = value()?,
                "--token-file" => {
                    let path = value()?;
                    cfg.token = std::fs::read_to_string(&path)
                        .map_err(|e| format!("--token-file {path}: {e}"))?
                        .trim()
                        .to_owned();
                }
                "--uid" => cfg.uid = num(value()?)? as u32,
                "--gid" => cfg.gid = num(value()?)? as u32,
                "--home" => cfg.home = value()?,
                "--shell" => cfg.shell = value()?,
                "--workdir" => cfg.workdir = Some(value()?),
                "--scrollback" => cfg.limits.scrollback_bytes = num(value()?)? as usize,
                "--max-sessions" => cfg.limits.max_sessions = num(value()?)? as usize,
                other => return Err(format!("unknown flag {other}\n{USAGE}")),
            }
        }
        if cfg.user_name.is_empty() {
            cfg.user_name = match cfg.uid {
                0 => "root".into(),
                1000 => "lohar".into(),
                n => n.to_string(),
            };
        }
        let socket = socket.ok_or_else(|| format!("--unix is required\n{USAGE}"))?;
        if cfg.token.is_empty() {
            return Err(format!("a non-empty token is required\n{USAGE}"));
        }
        Ok(TestModeArgs {
            socket,
            config: cfg,
        })
    }
}
