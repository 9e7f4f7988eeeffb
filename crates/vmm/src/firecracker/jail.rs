//! Firecracker under its jailer: one chroot, one unprivileged uid/gid and
//! one cgroup per VM.
//!
//! The jailer (`docs/jailer.md` in Firecracker's source) is started in
//! place of Firecracker. It creates `<chroot_base>/<exec name>/<jail id>/root`,
//! copies the Firecracker binary into it, creates the VM's cgroups from its
//! `--cgroup` flags and joins them, `pivot_root`s into the chroot (in a
//! mount namespace of its own), drops to the jail uid/gid and execs
//! Firecracker. Without `--daemonize` and `--new-pid-ns` the exec happens in
//! place, so the pid we spawn *is* Firecracker's: our waiter reaps it, the
//! pid file holds it and [`crate::process::VmmProcess::adopt`] finds it.
//!
//! Every path Firecracker is given is relative to its chroot. Before the
//! jailer starts, the files a VM needs are put in the chroot under fixed
//! names, so a snapshot records the same names for every VM:
//!
//! | in the chroot | what | how |
//! |---|---|---|
//! | `/vmlinux` | `VmConfig::kernel` (boot) | read-only |
//! | `/rootfs.ext4` | `VmConfig::root_disk` | read-write |
//! | `/config.ext4` | `VmConfig::config_disk` | read-only |
//! | `/vol<i>.ext4` | `VmConfig::data_disks[i]` | as the disk says |
//! | `/restore.state`, `/restore.mem` | the snapshot a restore loads | read-only |
//! | `/snapshot.state`, `/snapshot.mem` | a snapshot being written | see below |
//! | `<run_dir>/fc.sock`, `<run_dir>/vsock.sock` | API and vsock sockets | bound by Firecracker |
//!
//! That is the point of the jail for restores: Firecracker reopens block
//! devices at the paths recorded in the snapshot, and a fork restores its
//! origin's snapshot. Recorded as `/rootfs.ext4`, that path is the disk of
//! the VM being started (its own chroot), never its origin's live disk.
//!
//! The sockets sit at the run dir's own path *inside* the chroot, so
//! Firecracker's command line names the run dir (what
//! `VmmProcess::adopt` checks to tell our VMM from a recycled pid), and
//! the paths it binds are as long as unjailed ones. We reach them at
//! `<chroot><run_dir>/…` through `/proc/self/fd` ([`open_socket`]), which
//! has no 108-byte `sun_path` limit and never follows a symlink the jailed
//! process may have put there.
//!
//! Files get into the chroot as hard links (the same inode: a disk's writes
//! land in the VM's disk file, a Diff snapshot can update an existing memory
//! file in place) when `chroot_base` is on their filesystem, else as bind
//! mounts made before the jailer starts (its mount namespace copies them).
//! Ownership: a read-write file (the root disk) is given to the jail uid;
//! a read-only one must be readable but not writable by the jail, else it
//! becomes `root:<jail gid>` mode `0640` (a memory file shared by several
//! forks must not be writable by any of them).
//!
//! Snapshot files: with the destination on the chroot's filesystem, the
//! destination file itself (created empty if missing) is linked into the
//! chroot, Firecracker writes it, the link is removed. Otherwise Firecracker
//! writes files inside the chroot and they are copied out (a memory file by
//! its data extents, so a Diff stays sparse, or is folded into an existing
//! memory file of the same size as Firecracker would have done in place).
//! Either way the results are `root:<jail gid>` `0640` and nothing is left
//! in the chroot.
//!
//! Cleanup (kill, a failed start, a dead VMM found by adopt): unmount what
//! was bind-mounted under the jail dir, remove `<chroot_base>/<exec
//! name>/<jail id>`, remove the VM's cgroups.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cgroup::{limit_files, VmCgroup};
use crate::limits::ResourceLimits;
use crate::process::find_binary;
use crate::{Result, SnapshotFiles, SnapshotKind, VmmError};

/// The jailer binary looked up next to Firecracker or on PATH.
pub const JAILER_BINARY: &str = "jailer";
/// Environment variable naming the jailer binary.
pub const JAILER_ENV: &str = "BHATTI_JAILER";
/// The system user Firecracker runs as by default
/// (`scripts/install-deps.sh` creates it).
pub const JAIL_USER: &str = "bhatti-vmm";
/// The jailer's own default chroot base.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";
/// Default cgroup (below each hierarchy's root) holding the VM cgroups; the
/// same as [`crate::cgroup::DEFAULT_ROOT`], so all VMM cgroups sit together.
pub const DEFAULT_PARENT_CGROUP: &str = crate::cgroup::DEFAULT_ROOT;

/// Names inside the chroot (see the module docs).
pub const JAIL_KERNEL: &str = "/vmlinux";
pub const JAIL_ROOT_DISK: &str = "/rootfs.ext4";
pub const JAIL_CONFIG_DISK: &str = "/config.ext4";
pub const JAIL_RESTORE_STATE: &str = "/restore.state";
pub const JAIL_RESTORE_MEMORY: &str = "/restore.mem";
pub const JAIL_SNAPSHOT_STATE: &str = "/snapshot.state";
pub const JAIL_SNAPSHOT_MEMORY: &str = "/snapshot.mem";

/// The name of the `index`th data disk inside the chroot.
pub fn data_disk(index: usize) -> String {
    format!("/vol{index}.ext4")
}

/// How Firecracker is jailed ([`super::FirecrackerConfig::jailer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JailerConfig {
    /// The jailer binary (of the same Firecracker release; it copies the
    /// Firecracker binary into each chroot, so that must be static: the
    /// musl build). `None`: `BHATTI_JAILER`, else `jailer` next to the
    /// Firecracker binary, else `jailer` on PATH.
    pub binary: Option<PathBuf>,
    /// The uid Firecracker runs as. `None`: the `bhatti-vmm` user's. Never
    /// 0. All VMs share it: their chroots keep them apart.
    pub uid: Option<u32>,
    /// The gid Firecracker runs as. `None`: the `bhatti-vmm` user's group.
    /// Read-only inputs (config drive, snapshot files) are made readable to
    /// this group.
    pub gid: Option<u32>,
    /// Where the chroots are: `<chroot_base>/<Firecracker binary
    /// name>/<jail id>/root`, created and removed per VM. Must be a local
    /// filesystem without `nodev` (the jailer creates `/dev/kvm` in each
    /// chroot), root-owned and not writable by others. Best on the
    /// filesystem of the disks and snapshots (e.g. under the data dir):
    /// files are then hard-linked in; elsewhere disks are bind-mounted and
    /// snapshots copied out. Its length does not matter (sockets are
    /// reached through `/proc/self/fd`).
    pub chroot_base: PathBuf,
    /// cgroup hierarchy for the jailer's `--cgroup-version`: 1 or 2.
    /// `None`: v2 if the first cgroup2 mount offers cpu, memory and pids,
    /// else v1 (hybrid hosts, whose cgroup2 has no controllers).
    pub cgroup_version: Option<u8>,
    /// The jailer's `--parent-cgroup`: a relative path below each
    /// hierarchy's root; a VM's cgroup is `<parent_cgroup>/<jail id>`.
    pub parent_cgroup: String,
}

impl Default for JailerConfig {
    fn default() -> Self {
        JailerConfig {
            binary: None,
            uid: None,
            gid: None,
            chroot_base: DEFAULT_CHROOT_BASE.into(),
            cgroup_version: None,
            parent_cgroup: DEFAULT_PARENT_CGROUP.into(),
        }
    }
}

/// Finds the jailer: explicit path, else `BHATTI_JAILER`, else `jailer`
/// next to the Firecracker binary, else PATH.
pub fn find_jailer(explicit: Option<&Path>, firecracker: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return find_binary(Some(p), JAILER_BINARY);
    }
    if let Some(p) = std::env::var_os(JAILER_ENV).filter(|p| !p.is_empty()) {
        return find_binary(Some(Path::new(&p)), JAILER_BINARY);
    }
    let beside = firecracker
        .and_then(Path::parent)
        .map(|d| d.join(JAILER_BINARY))
        .filter(|p| p.is_file());
    beside.or_else(|| find_binary(None, JAILER_BINARY))
}

/// Where the cgroup controllers the VM limits use are mounted, found the
/// way the jailer finds them (the first matching line of `/proc/mounts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMounts {
    V1 {
        cpu: PathBuf,
        memory: PathBuf,
        pids: PathBuf,
    },
    V2(PathBuf),
}

const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

impl CgroupMounts {
    /// From this host's `/proc/mounts`.
    pub fn detect(want: Option<u8>) -> Result<CgroupMounts> {
        let text = std::fs::read_to_string("/proc/mounts")
            .map_err(|e| VmmError::io("reading /proc/mounts", e))?;
        CgroupMounts::from_mounts(&text, want, |p| {
            std::fs::read_to_string(p.join("cgroup.controllers"))
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default()
        })
    }

    /// `controllers` lists what a cgroup2 mount offers.
    pub fn from_mounts(
        mounts: &str,
        want: Option<u8>,
        controllers: impl Fn(&Path) -> Vec<String>,
    ) -> Result<CgroupMounts> {
        // `source dir fstype options dump pass`
        let lines: Vec<(&str, &str, &str)> = mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.len() >= 4).then(|| (f[1], f[2], f[3]))
            })
            .collect();
        let v2 = lines
            .iter()
            .find(|(_, t, _)| *t == "cgroup2")
            .map(|(d, _, _)| PathBuf::from(d));
        let v2_missing: Vec<&str> = match &v2 {
            Some(d) => {
                let have = controllers(d);
                CONTROLLERS
                    .into_iter()
                    .filter(|c| !have.iter().any(|h| h == c))
                    .collect()
            }
            None => CONTROLLERS.to_vec(),
        };
        let v1 = |c: &str| {
            lines
                .iter()
                .find(|(_, t, o)| *t == "cgroup" && o.split(',').any(|x| x == c))
                .map(|(d, _, _)| PathBuf::from(d))
        };
        let v1_all = match (v1("cpu"), v1("memory"), v1("pids")) {
            (Some(cpu), Some(memory), Some(pids)) => Some(CgroupMounts::V1 { cpu, memory, pids }),
            _ => None,
        };
        let v2_ok = v2.filter(|_| v2_missing.is_empty()).map(CgroupMounts::V2);
        let found = match want {
            Some(2) => v2_ok,
            Some(1) => v1_all,
            Some(v) => {
                return Err(VmmError::Spawn(format!(
                    "cgroup version {v}: the jailer knows 1 and 2"
                )))
            }
            None => v2_ok.or(v1_all),
        };
        found.ok_or_else(|| {
            VmmError::Spawn(format!(
                "no cgroup{} hierarchy with cpu, memory and pids for the jailer (cgroup2 lacks [{}]; \
                 cgroup v1 {})",
                want.map(|v| format!(" v{v}")).unwrap_or_default(),
                v2_missing.join(" "),
                if v1("cpu").is_some() && v1("memory").is_some() && v1("pids").is_some() {
                    "has them"
                } else {
                    "lacks some"
                }
            ))
        })
    }

    pub fn version(&self) -> u8 {
        match self {
            CgroupMounts::V1 { .. } => 1,
            CgroupMounts::V2(_) => 2,
        }
    }

    /// The cgroup directories the jailer creates for `id` (one per distinct
    /// mount).
    pub fn dirs(&self, parent: &Path, id: &str) -> Vec<PathBuf> {
        let mounts: Vec<&PathBuf> = match self {
            CgroupMounts::V1 { cpu, memory, pids } => vec![cpu, memory, pids],
            CgroupMounts::V2(m) => vec![m],
        };
        let mut dirs: Vec<PathBuf> = Vec::new();
        for m in mounts {
            let d = m.join(parent).join(id);
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        dirs
    }

    /// Whether the kernel accounts swap, so a swap limit can be written.
    fn has_swap_limit(&self, parent: &Path) -> bool {
        match self {
            CgroupMounts::V1 { memory, .. } => memory.join("memory.memsw.limit_in_bytes").exists(),
            // The root cgroup has no memory.* limit files: look at the
            // parent, else at any child with the memory controller.
            CgroupMounts::V2(m) => {
                m.join(parent).join("memory.swap.max").exists()
                    || std::fs::read_dir(m).is_ok_and(|rd| {
                        rd.flatten()
                            .any(|e| e.path().join("memory.swap.max").exists())
                    })
            }
        }
    }
}

/// A [`JailerConfig`] resolved against the host.
#[derive(Debug, Clone)]
pub struct Jailer {
    pub binary: PathBuf,
    /// The Firecracker binary, canonical (the jailer names the chroot
    /// after its file name).
    pub firecracker: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub cgroups: CgroupMounts,
    pub parent_cgroup: PathBuf,
    swap_limit: bool,
}

impl Jailer {
    pub fn new(cfg: &JailerConfig, firecracker: &Path) -> Result<Jailer> {
        let binary = find_jailer(cfg.binary.as_deref(), Some(firecracker)).ok_or_else(|| {
            VmmError::BinaryNotFound(match &cfg.binary {
                Some(p) => p.display().to_string(),
                None => format!(
                    "{JAILER_BINARY} (set {JAILER_ENV}, put it next to {} or on PATH)",
                    firecracker.display()
                ),
            })
        })?;
        let firecracker = std::fs::canonicalize(firecracker)
            .map_err(|e| VmmError::io(format!("resolving {}", firecracker.display()), e))?;
        let (uid, gid) = match (cfg.uid, cfg.gid) {
            (Some(u), Some(g)) => (u, g),
            (u, g) => {
                let user = nix::unistd::User::from_name(JAIL_USER)
                    .ok()
                    .flatten()
                    .ok_or_else(|| {
                        VmmError::Spawn(format!(
                            "no uid/gid configured for the jailer and no `{JAIL_USER}` user \
                             (create it: useradd --system --no-create-home --home-dir \
                             /nonexistent --shell /usr/sbin/nologin {JAIL_USER})"
                        ))
                    })?;
                (
                    u.unwrap_or(user.uid.as_raw()),
                    g.unwrap_or(user.gid.as_raw()),
                )
            }
        };
        if uid == 0 || gid == 0 {
            return Err(VmmError::Spawn(
                "the jailer must drop to a non-root uid and gid".into(),
            ));
        }
        if !cfg.chroot_base.is_absolute() {
            return Err(VmmError::Spawn(format!(
                "the jailer's chroot base {} is not absolute",
                cfg.chroot_base.display()
            )));
        }
        let parent_cgroup = PathBuf::from(&cfg.parent_cgroup);
        let relative = !cfg.parent_cgroup.is_empty()
            && parent_cgroup
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !relative {
            return Err(VmmError::Spawn(format!(
                "invalid parent cgroup {:?}: must be a relative path without `..`",
                cfg.parent_cgroup
            )));
        }
        let cgroups = CgroupMounts::detect(cfg.cgroup_version)?;
        let swap_limit = cgroups.has_swap_limit(&parent_cgroup);
        Ok(Jailer {
            binary,
            firecracker,
            uid,
            gid,
            chroot_base: cfg.chroot_base.clone(),
            cgroups,
            parent_cgroup,
            swap_limit,
        })
    }

    fn exec_name(&self) -> String {
        self.firecracker
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".into())
    }

    /// The jail of VM `id` (nothing is created yet).
    pub fn jail_for(&self, id: &str) -> Result<Jail> {
        std::fs::create_dir_all(&self.chroot_base)
            .map_err(|e| VmmError::io(format!("creating {}", self.chroot_base.display()), e))?;
        // The jailer canonicalizes its base too: the same dir either way.
        let base = std::fs::canonicalize(&self.chroot_base)
            .map_err(|e| VmmError::io(format!("resolving {}", self.chroot_base.display()), e))?;
        let jail_id = jail_id(id);
        let dir = base.join(self.exec_name()).join(&jail_id);
        Ok(Jail {
            root: dir.join("root"),
            dir,
            chroot_base: base,
            uid: self.uid,
            gid: self.gid,
            cgroup_version: self.cgroups.version(),
            cgroups: self.cgroups.dirs(&self.parent_cgroup, &jail_id),
            id: jail_id,
        })
    }

    /// `--cgroup` values imposing `limits`.
    pub fn cgroup_args(&self, limits: &ResourceLimits) -> Vec<String> {
        limit_files(self.cgroups.version() == 2, limits)
            .into_iter()
            .filter(|f| !f.optional || self.swap_limit)
            .map(|f| format!("{}={}", f.file, f.value))
            .collect()
    }

    /// The jailer's command line (without the binary), ending with
    /// Firecracker's own arguments after `--`.
    pub fn args(
        &self,
        jail: &Jail,
        limits: &ResourceLimits,
        firecracker: &[String],
    ) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--id".into(),
            jail.id.clone(),
            "--exec-file".into(),
            self.firecracker.to_string_lossy().into_owned(),
            "--uid".into(),
            self.uid.to_string(),
            "--gid".into(),
            self.gid.to_string(),
            "--chroot-base-dir".into(),
            jail.chroot_base.to_string_lossy().into_owned(),
            "--cgroup-version".into(),
            self.cgroups.version().to_string(),
            "--parent-cgroup".into(),
            self.parent_cgroup.to_string_lossy().into_owned(),
        ];
        for c in self.cgroup_args(limits) {
            a.extend(["--cgroup".into(), c]);
        }
        a.push("--".into());
        a.extend(firecracker.iter().cloned());
        a
    }
}

/// The jailer's `--id` for VM `id`: 1–64 ASCII letters, digits and hyphens.
/// An id that had to be changed gets a hash of the original, so two VMs
/// never share a chroot.
pub fn jail_id(id: &str) -> String {
    let clean = super::instance_id(id);
    if clean == id {
        return clean;
    }
    // FNV-1a: stable across builds and daemons (the chroot is found again
    // after a restart).
    let hash = id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let head: String = clean.chars().take(55).collect();
    format!("{head}-{hash:08x}")
}

/// One VM's jail; kept in the launch record so a restarted daemon can
/// adopt the VM and clean up after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jail {
    /// The jailer's `--id`.
    pub id: String,
    /// The (canonical) `--chroot-base-dir`.
    pub chroot_base: PathBuf,
    /// `<chroot_base>/<exec name>/<id>`: removed with the VM.
    pub dir: PathBuf,
    /// `<dir>/root`: Firecracker's `/`.
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_version: u8,
    /// The VM's cgroup directories (one per hierarchy mount).
    pub cgroups: Vec<PathBuf>,
}

/// How Firecracker uses a file put into the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A snapshot file being written through the jail.
#[derive(Debug)]
pub struct Staged {
    /// Name in the chroot.
    jail: &'static str,
    dst: PathBuf,
    how: StagedHow,
}

#[derive(Debug)]
enum StagedHow {
    /// `dst` is linked in; `prior` is its owner and mode before, `None` if
    /// we created it.
    Linked { prior: Option<(u32, u32, u32)> },
    /// Firecracker writes a file of its own in the chroot; copied out.
    Local,
}

impl Jail {
    /// Where Firecracker's path `p` is on the host.
    pub fn host_path(&self, p: &Path) -> PathBuf {
        let rel: PathBuf = p
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        self.root.join(rel)
    }

    /// Whether the jail's uid/gid may (read, write) a file of this owner
    /// and mode.
    fn access(&self, m: &Metadata) -> (bool, bool) {
        let mode = m.mode();
        let bits = if m.uid() == self.uid {
            mode >> 6
        } else if m.gid() == self.gid {
            mode >> 3
        } else {
            mode
        } & 0o7;
        (bits & 0o4 != 0, bits & 0o2 != 0)
    }

    /// Removes leftovers of an earlier VM with this id, then creates the
    /// chroot and, inside it, `run_dir` owned by the jail (where Firecracker
    /// binds its sockets).
    pub async fn prepare(&self, run_dir: &Path) -> Result<()> {
        if self.occupied() {
            return Err(VmmError::Spawn(format!(
                "a VMM still runs in the cgroups of jail {} ({})",
                self.id,
                self.dir.display()
            )));
        }
        self.cleanup().await?;
        std::fs::create_dir_all(&self.root)
            .map_err(|e| VmmError::io(format!("creating {}", self.root.display()), e))?;
        let sockets = self.host_path(run_dir);
        std::fs::create_dir_all(&sockets)
            .map_err(|e| VmmError::io(format!("creating {}", sockets.display()), e))?;
        std::os::unix::fs::chown(&sockets, Some(self.uid), Some(self.gid))
            .and_then(|()| {
                std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| VmmError::io(format!("handing {} to the jail", sockets.display()), e))
    }

    /// Puts `src` into the chroot as `name`: hard link, else (another
    /// filesystem) a bind mount, read-only for `ReadOnly`. Before the
    /// jailer starts only: its mount namespace does not see later mounts.
    pub fn place(&self, src: &Path, name: &str, access: Access) -> Result<()> {
        match access {
            Access::ReadWrite => self.give(src)?,
            Access::ReadOnly => self.seal_input(src)?,
        }
        let dst = self.host_path(Path::new(name));
        remove_entry(&dst)?;
        match std::fs::hard_link(src, &dst) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                bind(src, &dst, access == Access::ReadOnly)
            }
            Err(e) => Err(VmmError::io(
                format!("linking {} into {}", src.display(), self.root.display()),
                e,
            )),
        }
    }

    /// Makes `p` readable and writable by the jail uid (a VM's own disk).
    fn give(&self, p: &Path) -> Result<()> {
        let m =
            std::fs::metadata(p).map_err(|e| VmmError::io(format!("stat {}", p.display()), e))?;
        if m.uid() != self.uid || m.gid() != self.gid {
            std::os::unix::fs::chown(p, Some(self.uid), Some(self.gid))
                .map_err(|e| VmmError::io(format!("chown {}", p.display()), e))?;
        }
        if m.mode() & 0o600 != 0o600 {
            std::fs::set_permissions(
                p,
                std::fs::Permissions::from_mode(m.mode() & 0o7777 | 0o600),
            )
            .map_err(|e| VmmError::io(format!("chmod {}", p.display()), e))?;
        }
        Ok(())
    }

    /// Makes `p` readable but not writable by the jail: left alone if it
    /// already is, else `root:<jail gid>`, group read, nothing for others.
    fn seal_input(&self, p: &Path) -> Result<()> {
        let m =
            std::fs::metadata(p).map_err(|e| VmmError::io(format!("stat {}", p.display()), e))?;
        if m.uid() != self.uid && self.access(&m) == (true, false) {
            return Ok(());
        }
        self.seal(p, &m)
    }

    fn seal(&self, p: &Path, m: &Metadata) -> Result<()> {
        std::os::unix::fs::chown(p, Some(0), Some(self.gid))
            .and_then(|()| {
                std::fs::set_permissions(
                    p,
                    std::fs::Permissions::from_mode(m.mode() & 0o700 | 0o040),
                )
            })
            .map_err(|e| VmmError::io(format!("sealing {}", p.display()), e))
    }

    /// Makes the snapshot destinations `files` writable through the jail
    /// (see the module docs). Undone by [`Jail::finish_snapshot`].
    pub fn stage_snapshot(&self, files: &SnapshotFiles) -> Result<Vec<Staged>> {
        let mut staged = Vec::new();
        let targets = std::iter::once((JAIL_SNAPSHOT_STATE, &files.state))
            .chain(files.memory.as_ref().map(|m| (JAIL_SNAPSHOT_MEMORY, m)));
        for (name, dst) in targets {
            match self.stage(name, dst) {
                Ok(s) => staged.push(s),
                Err(e) => {
                    let _ = self.finish_snapshot(staged, false, SnapshotKind::Full);
                    return Err(e);
                }
            }
        }
        Ok(staged)
    }

    fn stage(&self, name: &'static str, dst: &Path) -> Result<Staged> {
        let in_jail = self.host_path(Path::new(name));
        remove_entry(&in_jail)?;
        let io = |what: &str, e| VmmError::io(format!("{what} {}", dst.display()), e);
        let prior = match std::fs::symlink_metadata(dst) {
            Ok(m) if m.file_type().is_file() => Some((m.uid(), m.gid(), m.mode() & 0o7777)),
            Ok(_) => {
                return Err(io(
                    "snapshot target",
                    io::Error::other("exists and is not a regular file"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(dst)
                    .map_err(|e| io("creating", e))?;
                None
            }
            Err(e) => return Err(io("stat", e)),
        };
        let undo = |prior: Option<(u32, u32, u32)>| match prior {
            None => {
                let _ = std::fs::remove_file(dst);
            }
            Some((u, g, mode)) => {
                let _ = std::os::unix::fs::chown(dst, Some(u), Some(g));
                let _ = std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode));
            }
        };
        if let Err(e) = self.give(dst) {
            undo(prior);
            return Err(e);
        }
        match std::fs::hard_link(dst, &in_jail) {
            Ok(()) => Ok(Staged {
                jail: name,
                dst: dst.to_path_buf(),
                how: StagedHow::Linked { prior },
            }),
            Err(e) => {
                undo(prior);
                if e.raw_os_error() == Some(libc::EXDEV) {
                    Ok(Staged {
                        jail: name,
                        dst: dst.to_path_buf(),
                        how: StagedHow::Local,
                    })
                } else {
                    Err(io("linking into the jail", e))
                }
            }
        }
    }

    /// After `PUT /snapshot/create`: on success the destinations hold the
    /// snapshot, sealed; on failure they are as before. Nothing is left in
    /// the chroot either way.
    pub fn finish_snapshot(&self, staged: Vec<Staged>, ok: bool, kind: SnapshotKind) -> Result<()> {
        let mut first_err = None;
        for s in staged {
            let in_jail = self.host_path(Path::new(s.jail));
            let r = match (&s.how, ok) {
                (StagedHow::Linked { .. }, true) => std::fs::metadata(&s.dst)
                    .map_err(|e| VmmError::io(format!("stat {}", s.dst.display()), e))
                    .and_then(|m| self.seal(&s.dst, &m)),
                (StagedHow::Linked { prior: None }, false) => std::fs::remove_file(&s.dst)
                    .or_else(not_found_ok)
                    .map_err(|e| VmmError::io(format!("removing {}", s.dst.display()), e)),
                (
                    StagedHow::Linked {
                        prior: Some((u, g, mode)),
                    },
                    false,
                ) => std::os::unix::fs::chown(&s.dst, Some(*u), Some(*g))
                    .and_then(|()| {
                        std::fs::set_permissions(&s.dst, std::fs::Permissions::from_mode(*mode))
                    })
                    .map_err(|e| VmmError::io(format!("restoring {}", s.dst.display()), e)),
                (StagedHow::Local, true) => {
                    let memory = s.jail == JAIL_SNAPSHOT_MEMORY;
                    copy_out(&in_jail, &s.dst, memory && kind == SnapshotKind::Diff).and_then(
                        |()| {
                            let m = std::fs::metadata(&s.dst).map_err(|e| {
                                VmmError::io(format!("stat {}", s.dst.display()), e)
                            })?;
                            self.seal(&s.dst, &m)
                        },
                    )
                }
                (StagedHow::Local, false) => Ok(()),
            };
            let removed = remove_entry(&in_jail);
            if let Err(e) = r.and(removed) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// True if some process is in the VM's cgroups (a jailed Firecracker
    /// never leaves them).
    pub fn occupied(&self) -> bool {
        self.cgroups.iter().any(|d| {
            std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|s| !s.trim().is_empty())
        })
    }

    /// Removes the jail: mounts under it, its directory, its cgroups. For a
    /// VM whose Firecracker is gone.
    pub async fn cleanup(&self) -> Result<()> {
        let mut errors = Vec::new();
        if let Err(e) = unmount_under(&self.dir) {
            errors.push(e.to_string());
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("removing {}: {e}", self.dir.display())),
        }
        let cg = VmCgroup {
            dirs: self.cgroups.clone(),
        };
        if let Err(e) = cg.remove().await {
            errors.push(e.to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(VmmError::io(
                format!("cleaning up jail {}", self.id),
                io::Error::other(errors.join("; ")),
            ))
        }
    }
}

fn not_found_ok(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Removes a chroot entry we put (or Firecracker left) there: unmounts it
/// first if it is a bind mount. Never follows a symlink.
fn remove_entry(p: &Path) -> Result<()> {
    let _ = nix::mount::umount2(
        p,
        nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
    );
    std::fs::remove_file(p)
        .or_else(not_found_ok)
        .map_err(|e| VmmError::io(format!("removing {}", p.display()), e))
}

/// Bind-mounts file `src` onto a new empty file `dst`.
fn bind(src: &Path, dst: &Path, read_only: bool) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| VmmError::io(format!("creating {}", dst.display()), e))?;
    let fail = |what: &str, e: nix::Error| {
        VmmError::io(
            format!("{what} {} on {}", src.display(), dst.display()),
            io::Error::from(e),
        )
    };
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| fail("bind-mounting", e))?;
    if read_only {
        // A bind mount takes its flags from a remount.
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, dst, None::<&str>, flags, None::<&str>) {
            let _ = remove_entry(dst);
            return Err(fail("remounting read-only", e));
        }
    }
    Ok(())
}

/// Mount points strictly below `dir` in mountinfo text, deepest first.
fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| {
            l.split(' ')
                .nth(4)
                .map(|p| PathBuf::from(crate::cgroup::unescape(p)))
        })
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn unmount_under(dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| VmmError::io("reading /proc/self/mountinfo", e))?;
    for p in mounts_under(&text, dir) {
        match nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => {
                return Err(VmmError::io(
                    format!("unmounting {}", p.display()),
                    io::Error::from(e),
                ))
            }
        }
    }
    Ok(())
}

/// Copies a file Firecracker wrote in the chroot to `dst` (outside it),
/// refusing anything but a regular file (the jail could have put a symlink
/// to a host file there). A memory file is copied by its data extents
/// (holes stay holes); with `onto_existing` and a `dst` of the same size,
/// the extents are written onto it, as Firecracker does with a Diff.
fn copy_out(src: &Path, dst: &Path, onto_existing: bool) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(src)
        .map_err(|e| VmmError::io(format!("opening {}", src.display()), e))?;
    let m = f
        .metadata()
        .map_err(|e| VmmError::io(format!("stat {}", src.display()), e))?;
    if !m.file_type().is_file() {
        return Err(VmmError::io(
            format!("copying {}", src.display()),
            io::Error::other("not a regular file"),
        ));
    }
    // The very inode we checked, whatever happens to the name meanwhile.
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
    let same_size = std::fs::metadata(dst).is_ok_and(|d| d.is_file() && d.len() == m.len());
    if !(onto_existing && same_size) {
        let out = File::create(dst)
            .map_err(|e| VmmError::io(format!("creating {}", dst.display()), e))?;
        out.set_len(m.len())
            .map_err(|e| VmmError::io(format!("sizing {}", dst.display()), e))?;
    }
    super::merge_diff_snapshot(dst, &by_fd).map(|_| ())
}

/// Opens the unix socket at `path` for connecting through
/// `/proc/self/fd/<n>` (returned with the descriptor, which must stay open
/// until the connection is made): there is no 108-byte `sun_path` limit.
///
/// With `beneath` (a jail's root, whose own path is ours), each component
/// of `path` below it is opened without following symlinks: the jailed
/// Firecracker owns directories on the way and could plant one pointing at
/// a host socket. Without it only the last component is not followed. The
/// result must be a socket.
pub fn open_socket(path: &Path, beneath: Option<&Path>) -> io::Result<(File, PathBuf)> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a socket path", path.display()),
        )
    };
    let (start, rel) = match beneath {
        Some(b) => (b, path.strip_prefix(b).map_err(|_| invalid())?),
        None => match (path.parent(), path.file_name()) {
            (Some(d), Some(n)) => (d, Path::new(n)),
            _ => return Err(invalid()),
        },
    };
    let start = if start.as_os_str().is_empty() {
        Path::new(".")
    } else {
        start
    };
    let names = rel
        .components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(invalid()),
        })
        .collect::<io::Result<Vec<_>>>()?;
    let (last, dirs) = names.split_last().ok_or_else(invalid)?;
    let path_flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir = nix::fcntl::open(
        start,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    for d in dirs {
        // O_NOFOLLOW with O_DIRECTORY: a symlink fails (ENOTDIR).
        dir = openat(&dir, *d, path_flags | OFlag::O_DIRECTORY, Mode::empty())?;
    }
    // O_PATH|O_NOFOLLOW opens a symlink itself: not a socket, refused.
    let f = File::from(openat(&dir, *last, path_flags, Mode::empty())?);
    if !f.metadata()?.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a socket", path.display()),
        ));
    }
    let via = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
    Ok((f, via))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hybrid() -> &'static str {
        "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
         cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
         cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0\n\
         cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
         cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n\
         cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n"
    }

    #[test]
    fn cgroup_mounts() {
        let none = |_: &Path| Vec::new();
        let all = |_: &Path| vec!["cpu".into(), "memory".into(), "pids".into(), "io".into()];
        let v1 = CgroupMounts::from_mounts(hybrid(), None, none).unwrap();
        assert_eq!(
            v1,
            CgroupMounts::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                memory: "/sys/fs/cgroup/memory".into(),
                pids: "/sys/fs/cgroup/pids".into(),
            }
        );
        assert_eq!(
            v1.dirs(Path::new("bhatti"), "sb-1"),
            [
                PathBuf::from("/sys/fs/cgroup/cpu/bhatti/sb-1"),
                "/sys/fs/cgroup/memory/bhatti/sb-1".into(),
                "/sys/fs/cgroup/pids/bhatti/sb-1".into()
            ]
        );
        // The hybrid's cgroup2 has no controllers: asking for v2 fails.
        let e = CgroupMounts::from_mounts(hybrid(), Some(2), none).unwrap_err();
        assert!(e.to_string().contains("lacks [cpu memory pids]"), "{e}");
        // cpu,cpuacct in one mount.
        let joint = "cgroup /c/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
                     cgroup /c/memory cgroup rw,memory 0 0\n\
                     cgroup /c/pids cgroup rw,pids 0 0\n";
        match CgroupMounts::from_mounts(joint, Some(1), none).unwrap() {
            CgroupMounts::V1 { cpu, .. } => assert_eq!(cpu, Path::new("/c/cpu,cpuacct")),
            other => panic!("{other:?}"),
        }
        let pure = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        let v2 = CgroupMounts::from_mounts(pure, None, all).unwrap();
        assert_eq!(v2, CgroupMounts::V2("/sys/fs/cgroup".into()));
        assert_eq!(v2.version(), 2);
        assert_eq!(
            v2.dirs(Path::new("a/b"), "x"),
            [PathBuf::from("/sys/fs/cgroup/a/b/x")]
        );
        assert!(CgroupMounts::from_mounts(pure, Some(1), all).is_err());
        assert!(CgroupMounts::from_mounts(pure, Some(3), all).is_err());
    }

    fn jailer(cgroups: CgroupMounts, swap_limit: bool) -> Jailer {
        Jailer {
            binary: "/opt/fc/jailer".into(),
            firecracker: "/opt/fc/firecracker".into(),
            uid: 999,
            gid: 995,
            chroot_base: "/srv/jailer".into(),
            cgroups,
            parent_cgroup: "bhatti".into(),
            swap_limit,
        }
    }

    fn jail() -> Jail {
        Jail {
            id: "sb-1".into(),
            chroot_base: "/srv/jailer".into(),
            dir: "/srv/jailer/firecracker/sb-1".into(),
            root: "/srv/jailer/firecracker/sb-1/root".into(),
            uid: 999,
            gid: 995,
            cgroup_version: 2,
            cgroups: vec![],
        }
    }

    #[test]
    fn jailer_command_line() {
        let mut cfg = crate::test_vm_config("sb_1");
        cfg.vcpus = 2;
        cfg.memory_mib = 512;
        let limits = ResourceLimits::for_vm(&cfg);
        let j = jailer(CgroupMounts::V2("/sys/fs/cgroup".into()), true);
        let fc = ["--api-sock".to_string(), "/run/x/fc.sock".into()];
        assert_eq!(
            j.args(&jail(), &limits, &fc).join(" "),
            "--id sb-1 --exec-file /opt/fc/firecracker --uid 999 --gid 995 \
             --chroot-base-dir /srv/jailer --cgroup-version 2 --parent-cgroup bhatti \
             --cgroup cpu.max=200000 100000 --cgroup memory.max=805306368 \
             --cgroup memory.swap.max=0 --cgroup pids.max=256 -- --api-sock /run/x/fc.sock"
        );
        let v1 = CgroupMounts::from_mounts(hybrid(), None, |_| Vec::new()).unwrap();
        assert_eq!(
            jailer(v1.clone(), false).cgroup_args(&limits),
            [
                "cpu.cfs_period_us=100000",
                "cpu.cfs_quota_us=200000",
                "memory.limit_in_bytes=805306368",
                "pids.max=256"
            ]
        );
        assert!(jailer(v1, true)
            .cgroup_args(&limits)
            .contains(&"memory.memsw.limit_in_bytes=805306368".to_string()));
    }

    #[test]
    fn jail_ids_and_paths() {
        assert_eq!(jail_id("sb-0123456789ab"), "sb-0123456789ab");
        let (a, b) = (jail_id("sb_1"), jail_id("sb.1"));
        assert!(a.starts_with("sb-1-") && b.starts_with("sb-1-"), "{a} {b}");
        assert_ne!(a, b, "distinct ids must not share a chroot");
        assert_eq!(jail_id("sb_1"), a, "stable");
        let long = jail_id(&"é".repeat(100));
        assert!(long.len() <= 64, "{long}");
        assert_eq!(
            jail().host_path(Path::new("/run/bhatti/sb1/fc.sock")),
            Path::new("/srv/jailer/firecracker/sb-1/root/run/bhatti/sb1/fc.sock")
        );
        assert_eq!(
            jail().host_path(Path::new("/../x")),
            Path::new("/srv/jailer/firecracker/sb-1/root/x")
        );
    }

    #[test]
    fn mountinfo_below_a_dir() {
        let text = "1 0 8:1 / / rw - ext4 /dev/vda rw\n\
                    2 1 8:1 /d/a.img /j/x/root/rootfs.ext4 rw - ext4 /dev/vda rw\n\
                    3 1 8:1 /k /j/x/root/sub\\040dir/vmlinux ro - ext4 /dev/vda rw\n\
                    4 1 8:1 /k /j/xy/root/vmlinux ro - ext4 /dev/vda rw\n";
        assert_eq!(
            mounts_under(text, Path::new("/j/x")),
            [
                PathBuf::from("/j/x/root/sub dir/vmlinux"),
                "/j/x/root/rootfs.ext4".into()
            ]
        );
    }

    #[test]
    fn file_access_and_sealing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let j = Jail {
            root: dir.path().join("root"),
            ..jail()
        };
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let set = |mode: u32| {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let meta = || std::fs::metadata(&f).unwrap();
        set(0o644);
        // root-owned, world-readable: readable, not writable by the jail.
        assert_eq!(j.access(&meta()), (true, false));
        set(0o600);
        assert_eq!(j.access(&meta()), (false, false));
        if nix::unistd::geteuid().is_root() {
            j.seal_input(&f).unwrap();
            let m = meta();
            assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (0, 995, 0o640));
            assert_eq!(j.access(&m), (true, false));
            j.give(&f).unwrap();
            let m = meta();
            assert_eq!((m.uid(), m.gid()), (999, 995));
            assert_eq!(j.access(&m), (true, true));
            // Owned by the jail: writable, so sealed again.
            j.seal_input(&f).unwrap();
            assert_eq!(meta().uid(), 0);
        }
    }

    #[test]
    fn sockets_through_proc_fd() {
        let dir = tempfile::tempdir().unwrap();
        // Deeper than sun_path allows.
        let deep = dir.path().join("d".repeat(100)).join("e".repeat(100));
        std::fs::create_dir_all(&deep).unwrap();
        let sock = deep.join("s.sock");
        let link = dir.path().join("l.sock");
        let _listener =
            std::os::unix::net::UnixListener::bind(open_dir_relative(&deep, "s.sock").as_path())
                .unwrap();
        for beneath in [None, Some(dir.path())] {
            let (_fd, via) = open_socket(&sock, beneath).unwrap();
            std::os::unix::net::UnixStream::connect(&via).unwrap();
        }
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        assert!(open_socket(&link, None).is_err(), "followed a symlink");
        assert!(open_socket(&dir.path().join("missing"), None).is_err());
        let file = dir.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        assert!(open_socket(&file, None).is_err(), "not a socket");
        // A symlinked directory below the jail root is not followed (the
        // last-component check alone would not see it).
        let hop = dir.path().join("hop");
        std::os::unix::fs::symlink(dir.path().join("d".repeat(100)), &hop).unwrap();
        let via_hop = hop.join("e".repeat(100)).join("s.sock");
        assert!(open_socket(&via_hop, None).is_ok());
        assert!(open_socket(&via_hop, Some(dir.path())).is_err());
        assert!(open_socket(&sock, Some(Path::new("/elsewhere"))).is_err());
    }

    /// Binds in a deep dir through `/proc/self/fd/<dir fd>/name`.
    fn open_dir_relative(dir: &Path, name: &str) -> PathBuf {
        let d = File::open(dir).unwrap();
        let p = PathBuf::from(format!("/proc/self/fd/{}/{name}", d.as_raw_fd()));
        // The descriptor must outlive the bind: leak it (test only).
        std::mem::forget(d);
        p
    }
}
