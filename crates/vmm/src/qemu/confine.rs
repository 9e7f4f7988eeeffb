//! Confining QEMU: a seccomp filter, an unprivileged user, a cgroup.
//!
//! QEMU starts as root (it opens the TAP, `/dev/kvm`, vhost-net, the disks,
//! the console log and binds its sockets during initialisation), then
//! switches to [`Confinement::run_as`] just before running the guest
//! (`-runas`, or `-run-with user=` from QEMU 9.1). Everything it needs later
//! arrives as a descriptor: snapshot files through QMP `getfd` (the daemon
//! opens them), so the unprivileged QEMU needs no permission on any path.
//!
//! `-sandbox` installs QEMU's seccomp filter at startup, before the switch:
//! with `elevateprivileges=deny` the filter would kill QEMU at its own
//! `setgid` (SIGSYS, verified with QEMU 7.2). So when QEMU drops privileges
//! it runs with `elevateprivileges=allow`; once it has switched, it holds no
//! capabilities and `spawn=deny` forbids `execve`, so it cannot regain them
//! (QEMU itself checks that `setuid(0)` fails afterwards). Without a user
//! switch the filter uses `elevateprivileges=deny`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::cgroup::CgroupConfig;
use crate::{Result, VmmError};

/// The system user QEMU runs as when confined (created by
/// `scripts/install-deps.sh`).
pub const VMM_USER: &str = "bhatti-vmm";

/// How QEMU processes are confined. The default confines nothing (QEMU
/// runs as the daemon's user, unfiltered, in the daemon's cgroup).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Confinement {
    /// Unprivileged user QEMU switches to once it has opened its devices
    /// (`[vm] vmm_user`, normally [`VMM_USER`]). Must exist; must not be
    /// root. `None`: QEMU keeps running as the daemon's user.
    pub run_as: Option<String>,
    /// QEMU's seccomp filter: `-sandbox on,obsolete=deny,
    /// elevateprivileges=deny|allow,spawn=deny,resourcecontrol=deny`
    /// (`allow` only with `run_as`, see the module docs). QEMU must be
    /// built with seccomp.
    pub sandbox: bool,
    /// One cgroup per VM with the limits of
    /// [`crate::limits::ResourceLimits::for_vm`] (`[vm] cgroups`). `None`:
    /// QEMU stays in the daemon's cgroup.
    pub cgroups: Option<CgroupConfig>,
}

impl Confinement {
    /// Everything on: [`VMM_USER`], seccomp, cgroups under `bhatti/`.
    pub fn hardened() -> Confinement {
        Confinement {
            run_as: Some(VMM_USER.into()),
            sandbox: true,
            cgroups: Some(CgroupConfig::default()),
        }
    }
}

/// The option a QEMU binary switches users with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSwitch {
    /// `-run-with user=NAME` (QEMU ≥ 9.1; `-runas` is deprecated there).
    RunWith,
    /// `-runas NAME` (older QEMU).
    Runas,
}

/// What a QEMU binary offers, from its `-help`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    pub user_switch: Option<UserSwitch>,
    /// Built with seccomp (`-sandbox`).
    pub sandbox: bool,
}

/// Reads [`Features`] from `-help` text.
pub fn parse_help(help: &str) -> Features {
    // The lines documenting option `name` (it starts them).
    let option = |name: &str| -> Vec<&str> {
        help.lines()
            .map(str::trim_start)
            .filter(|l| l.split_whitespace().next() == Some(name))
            .collect()
    };
    let user_switch = if option("-run-with").iter().any(|l| l.contains("user=")) {
        Some(UserSwitch::RunWith)
    } else if !option("-runas").is_empty() {
        Some(UserSwitch::Runas)
    } else {
        None
    };
    Features {
        user_switch,
        sandbox: !option("-sandbox").is_empty(),
    }
}

/// [`Features`] of `binary`, asked once per binary and cached.
pub fn features(binary: &Path) -> Result<Features> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Features>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(f) = cache.lock().ok().and_then(|c| c.get(binary).copied()) {
        return Ok(f);
    }
    let out = std::process::Command::new(binary)
        .arg("-help")
        .output()
        .map_err(|e| VmmError::io(format!("running {} -help", binary.display()), e))?;
    if !out.status.success() {
        return Err(VmmError::Spawn(format!(
            "{} -help failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let f = parse_help(&String::from_utf8_lossy(&out.stdout));
    if let Ok(mut c) = cache.lock() {
        c.insert(binary.to_path_buf(), f);
    }
    Ok(f)
}

/// Checks that `user` can be switched to: it exists, is not root, and its
/// name survives QEMU's option syntax.
pub fn check_user(user: &str) -> Result<()> {
    if user.is_empty() || user.contains([',', '=', '\0']) {
        return Err(VmmError::Spawn(format!("invalid VMM user name {user:?}")));
    }
    let found = nix::unistd::User::from_name(user)
        .map_err(|e| VmmError::io(format!("looking up user {user}"), e.into()))?;
    match found {
        None => Err(VmmError::Spawn(format!(
            "the VMM user {user:?} does not exist; create it (scripts/install-deps.sh does: \
             useradd --system --no-create-home --home-dir /nonexistent \
             --shell /usr/sbin/nologin {user})"
        ))),
        Some(u) if u.uid.is_root() => Err(VmmError::Spawn(format!(
            "the VMM user {user:?} is root; it must be an unprivileged user"
        ))),
        Some(_) => Ok(()),
    }
}

/// The QEMU options for `c` (the cgroup is not a QEMU option).
pub fn args(c: &Confinement, switch: Option<UserSwitch>) -> Vec<String> {
    let mut a = Vec::new();
    let user = c.run_as.as_deref().zip(switch);
    if c.sandbox {
        let elevate = if user.is_some() { "allow" } else { "deny" };
        a.push("-sandbox".into());
        a.push(format!(
            "on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"
        ));
    }
    match user {
        Some((u, UserSwitch::RunWith)) => {
            a.push("-run-with".into());
            a.push(format!("user={u}"));
        }
        Some((u, UserSwitch::Runas)) => {
            a.push("-runas".into());
            a.push(u.into());
        }
        None => {}
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELP_7_2: &str = "\
-runas user     change to user id user just before starting the VM
                user can be numeric uid:gid instead
-sandbox on[,obsolete=allow|deny][,elevateprivileges=allow|deny|children]
          [,spawn=allow|deny][,resourcecontrol=allow|deny]
";
    const HELP_9_1: &str = "\
-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]
                Set miscellaneous QEMU process lifecycle options:
-runas user     change to user id user just before starting the VM
";
    const HELP_9_0: &str = "\
-run-with [async-teardown=on|off][,chroot=dir]
-runas user     change to user id user just before starting the VM
";

    #[test]
    fn help_parsing() {
        assert_eq!(
            parse_help(HELP_7_2),
            Features {
                user_switch: Some(UserSwitch::Runas),
                sandbox: true
            }
        );
        assert_eq!(parse_help(HELP_9_1).user_switch, Some(UserSwitch::RunWith));
        assert!(!parse_help(HELP_9_1).sandbox);
        // 9.0 has -run-with, but without user=.
        assert_eq!(parse_help(HELP_9_0).user_switch, Some(UserSwitch::Runas));
        // Only a mention inside another option's text does not count.
        assert_eq!(parse_help("-foo   see also -runas\n").user_switch, None);
    }

    #[test]
    fn option_lines() {
        let c = Confinement::hardened();
        assert_eq!(
            args(&c, Some(UserSwitch::Runas)).join(" "),
            "-sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny \
             -runas bhatti-vmm"
        );
        assert_eq!(
            args(&c, Some(UserSwitch::RunWith))[2..].join(" "),
            "-run-with user=bhatti-vmm"
        );
        let sandbox_only = Confinement {
            sandbox: true,
            ..Default::default()
        };
        assert!(args(&sandbox_only, None)[1].contains("elevateprivileges=deny"));
        assert!(args(&Confinement::default(), Some(UserSwitch::Runas)).is_empty());
    }

    #[test]
    fn users_are_checked() {
        assert!(check_user("root").is_err());
        assert!(check_user("a,b").is_err());
        assert!(check_user("no-such-user-bhatti-test").is_err());
        assert!(check_user("nobody").is_ok());
    }
}
