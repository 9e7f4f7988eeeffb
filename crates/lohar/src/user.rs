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

/// A user as an image config names it, resolved against the guest's
/// `/etc/passwd` and `/etc/group` texts (read at boot: the agent is static,
/// so there is no NSS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: String,
    /// The login shell from passwd, if it names one.
    pub shell: Option<String>,
}

/// Resolves `name`, `uid`, `name:group` or `uid:gid` (Docker's `USER`
/// forms). A uid without a passwd entry gets gid 0 (unless given) and home
/// `/`, as Docker does; an unknown name or group is an error.
pub fn resolve(user: &str, passwd: &str, group: &str) -> Result<Resolved, String> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if u.is_empty() {
        return Err(format!("user {user:?} names no user"));
    }
    // name:password:uid:gid:gecos:home:shell
    let entries = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 7);
    let found = match u.parse::<u32>() {
        Ok(uid) => entries.into_iter().find(|f| f[2].parse() == Ok(uid)),
        Err(_) => entries.into_iter().find(|f| f[0] == u),
    };
    let mut r = match (found, u.parse::<u32>()) {
        (Some(f), _) => Resolved {
            uid: f[2]
                .parse()
                .map_err(|_| format!("bad uid in passwd for {}", f[0]))?,
            gid: f[3]
                .parse()
                .map_err(|_| format!("bad gid in passwd for {}", f[0]))?,
            name: f[0].to_owned(),
            home: if f[5].is_empty() {
                "/".into()
            } else {
                f[5].to_owned()
            },
            shell: (!f[6].is_empty()).then(|| f[6].to_owned()),
        },
        (None, Ok(uid)) => Resolved {
            uid,
            gid: 0,
            name: uid.to_string(),
            home: "/".into(),
            shell: None,
        },
        (None, Err(_)) => return Err(format!("no user {u:?} in /etc/passwd")),
    };
    if let Some(g) = g.filter(|g| !g.is_empty()) {
        r.gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("no group {g:?} in /etc/group"))?,
        };
    }
    Ok(r)
}

/// A command for `spec` running as the configured user in a new session,
/// with the sandbox-wide environment under the request's
/// (its own process group, so it can be signalled as a whole). The caller
/// sets stdio and starts it through `reaper::spawn`.
pub fn command(
    cfg: &AgentConfig,
    sandbox_env: &BTreeMap<String, String>,
    spec: &Spec<'_>,
) -> Result<spawn::Command, ErrorBody> {
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
    let cwd = spec.cwd.or(cfg.workdir.as_deref()).unwrap_or(&cfg.home);
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
    for (k, v) in sandbox_env.iter().chain(spec.env.iter()) {
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
    let name = cfg.user_name.as_str();
    for (k, v) in [
        ("PATH", PATH),
        ("HOME", cfg.home.as_str()),
        ("USER", name),
        ("LOGNAME", name),
        ("SHELL", cfg.shell.as_str()),
        ("TERM", term),
        ("LANG", "C.UTF-8"),
    ] {
        env.insert(k, v);
    }
    for (k, v) in sandbox_env.iter().chain(spec.env.iter()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
app:x:1001:1002:App:/home/app:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:\napp:x:1002:\n";

    #[test]
    fn resolves_docker_user_forms() {
        let r = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!(
            (r.uid, r.gid, r.name.as_str(), r.home.as_str()),
            (1001, 1002, "app", "/home/app")
        );
        assert_eq!(r.shell.as_deref(), Some("/bin/sh"));
        let r = resolve("1001", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid, r.name.as_str()), (1001, 1002, "app"));
        let r = resolve("app:staff", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (1001, 50));
        let r = resolve("4242:7", PASSWD, GROUP).unwrap();
        assert_eq!(
            (r.uid, r.gid, r.home.as_str(), r.name.as_str()),
            (4242, 7, "/", "4242")
        );
        let r = resolve("4242", PASSWD, GROUP).unwrap();
        assert_eq!(r.gid, 0);
        assert_eq!(resolve("root", PASSWD, GROUP).unwrap().uid, 0);
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(resolve("ghost", PASSWD, GROUP)
            .unwrap_err()
            .contains("ghost"));
        assert!(resolve("app:nogroup", PASSWD, GROUP)
            .unwrap_err()
            .contains("nogroup"));
        assert!(resolve("", PASSWD, GROUP).is_err());
        assert!(resolve(":5", PASSWD, GROUP).is_err());
        // Short or garbled lines are skipped, not trusted.
        assert!(resolve("x", "x:1\n", "").is_err());
    }
}
