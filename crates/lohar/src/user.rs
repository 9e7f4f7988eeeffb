//! Building the environment and credentials user commands run with.
//!
//! Numeric ids only: the agent is a static glibc binary, so NSS (and with it
//! `getpwnam`) is unavailable. Everything the child does between fork and
//! exec is prepared here beforehand, because only async-signal-safe calls
//! are allowed there (no allocation).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use bhatti_protocol::{ErrorBody, ErrorCode};

use crate::config::AgentConfig;
use crate::spawn;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the child is attached to, which decides `TERM` and the tty setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// Pipes or files: `TERM=dumb`.
    Pipes,
    /// A pseudo-terminal on fds 0–2, made the controlling terminal.
    Pty,
}

/// A user command to build.
#[derive(Debug)]
pub struct Spec<'a> {
    pub argv: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: Option<&'a str>,
    pub stdio: Stdio,
}

/// The user name for the environment; there is no passwd lookup.
fn user_name(uid: u32) -> String {
    match uid {
        0 => "root".into(),
        1000 => "lohar".into(),
        n => n.to_string(),
    }
}

/// A command for `spec` running as the configured user in a new session
/// (its own process group, so it can be signalled as a whole). The caller
/// sets stdio and starts it through `reaper::spawn`.
pub fn command(cfg: &AgentConfig, spec: &Spec<'_>) -> Result<spawn::Command, ErrorBody> {
    let Some(program) = spec.argv.first() else {
        return Err(ErrorBody::new(ErrorCode::BadRequest, "argv is empty"));
    };
    if program.is_empty() {
        return Err(ErrorBody::new(ErrorCode::BadRequest, "argv[0] is empty"));
    }
    if spec.argv.iter().any(|a| a.contains('\0')) {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "argv contains a NUL byte",
        ));
    }
    let cwd = spec.cwd.unwrap_or(&cfg.home);
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ErrorBody::new(
                ErrorCode::NotADirectory,
                format!("working directory {cwd} is not a directory"),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("working directory {cwd} does not exist"),
            ))
        }
        Err(e) => {
            return Err(crate::handlers::io_error(
                &format!("working directory {cwd}"),
                &e,
            ))
        }
    }
    for (k, v) in cfg.env.iter().chain(spec.env.iter()) {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!("invalid environment variable {k:?}"),
            ));
        }
    }

    let cwd_c = CString::new(Path::new(cwd).as_os_str().as_bytes())
        .map_err(|_| ErrorBody::new(ErrorCode::BadRequest, "cwd contains a NUL byte"))?;
    let term = match spec.stdio {
        Stdio::Pty => "xterm-256color",
        Stdio::Pipes => "dumb",
    };
    // Later entries override earlier ones, as with `Command::env`.
    let mut env: BTreeMap<&str, &str> = BTreeMap::new();
    let name = user_name(cfg.uid);
    for (k, v) in [
        ("PATH", PATH),
        ("HOME", cfg.home.as_str()),
        ("USER", name.as_str()),
        ("LOGNAME", name.as_str()),
        ("SHELL", cfg.shell.as_str()),
        ("TERM", term),
        ("LANG", "C.UTF-8"),
    ] {
        env.insert(k, v);
    }
    for (k, v) in cfg.env.iter().chain(spec.env.iter()) {
        env.insert(k, v);
    }
    // NULs were rejected above, so these conversions cannot fail.
    let cstr = |s: String| CString::new(s).unwrap_or_default();
    let envp = env.iter().map(|(k, v)| cstr(format!("{k}={v}"))).collect();
    let argv = spec.argv.iter().map(|a| cstr(a.clone())).collect();

    let mut cmd = spawn::Command::new(program.clone(), argv, envp, cwd_c);
    // Switch only when needed: in test mode lohar may run as that user
    // already, and then setuid/setgroups would fail for lack of privilege.
    if nix::unistd::geteuid().as_raw() != cfg.uid || nix::unistd::getegid().as_raw() != cfg.gid {
        cmd.creds = Some((cfg.uid, cfg.gid));
    }
    cmd.ctty = spec.stdio == Stdio::Pty;
    Ok(cmd)
}

/// The error for a failed spawn of `argv0`.
pub fn spawn_error(argv0: &str, e: &std::io::Error) -> ErrorBody {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            ErrorBody::new(ErrorCode::NotFound, format!("{argv0}: command not found"))
        }
        _ => crate::handlers::io_error(&format!("cannot run {argv0}"), e),
    }
}
