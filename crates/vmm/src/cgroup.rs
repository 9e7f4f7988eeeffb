//! Per-VM cgroups: every VMM process runs in `<hierarchy>/<root>/<vm id>`
//! with the limits of [`ResourceLimits::for_vm`], so a guest (or a
//! compromised VMM) cannot take more CPU, memory or processes than its
//! share of the host.
//!
//! The hierarchy is detected from `/proc/self/mountinfo`, not assumed:
//!
//! - cgroup v2 (unified): one tree whose `cgroup.controllers` offers `cpu`,
//!   `memory` and `pids`. The controllers are enabled in the
//!   `cgroup.subtree_control` of every ancestor of the VM's cgroup, and the
//!   limits go to `cpu.max`, `memory.max`, `memory.swap.max` (0, if the
//!   kernel accounts swap) and `pids.max`.
//! - cgroup v1 (legacy, or "hybrid" with a controller-less cgroup2 beside
//!   it): one tree per controller (`cpu` may share a mount with `cpuacct`).
//!   The VM gets a directory in each, with `cpu.cfs_period_us` /
//!   `cpu.cfs_quota_us`, `memory.limit_in_bytes` (and
//!   `memory.memsw.limit_in_bytes`, memory + swap, if present) and
//!   `pids.max`.
//!
//! The VMM joins its cgroup from the forked child before `exec`
//! ([`join_self`] in a `pre_exec` hook), so it never runs a single
//! instruction (let alone guest code) outside its limits, and there is no
//! window in which it could fork out of reach. The cgroup is removed once
//! the process is gone ([`VmCgroup::remove`]).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::limits::ResourceLimits;
use crate::{Result, VmmError};

/// Default subtree (under each hierarchy's root) holding the VM cgroups.
pub const DEFAULT_ROOT: &str = "bhatti";

/// How long [`VmCgroup::remove`] retries an `EBUSY` rmdir: the kernel
/// releases a cgroup a moment after its last task is reaped.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Controllers every VM cgroup is limited by.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Where VM cgroups go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CgroupConfig {
    /// Relative path under each hierarchy's root (e.g. `bhatti` or
    /// `machine.slice/bhatti`) of the cgroup holding one cgroup per VM.
    /// Created on first use, never removed (other VMs share it).
    pub root: String,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            root: DEFAULT_ROOT.into(),
        }
    }
}

/// A mounted cgroup tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub point: PathBuf,
    /// The cgroup (of the hierarchy, as `/proc/<pid>/cgroup` names it)
    /// mounted there; `/` unless a subtree was bind-mounted.
    pub root: PathBuf,
}

impl Mount {
    /// The directory of the cgroup `/proc/<pid>/cgroup` calls `path`.
    fn dir_of(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        let rel = p
            .strip_prefix(&self.root)
            .or_else(|_| p.strip_prefix("/"))
            .unwrap_or(p);
        self.point.join(rel)
    }
}

/// The cgroup hierarchy VM cgroups are created in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// Unified: one tree with every controller.
    V2(Mount),
    /// Legacy: one tree per controller; two of them may be one mount.
    V1 {
        cpu: Mount,
        memory: Mount,
        pids: Mount,
    },
}

/// One line of `/proc/self/mountinfo`, the parts we need.
struct MountEntry {
    point: PathBuf,
    root: PathBuf,
    fstype: String,
    super_opts: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …); the jail's
/// mount checks use it too.
pub(crate) fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                u8::try_from(v).ok()
            });
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            // `id parent maj:min root point opts [optional…] - fstype source superopts`
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?.to_owned();
            let _source = right.next()?;
            let super_opts = right.next().unwrap_or("");
            Some(MountEntry {
                root: PathBuf::from(unescape(left.get(3)?)),
                point: PathBuf::from(unescape(left.get(4)?)),
                fstype,
                super_opts: super_opts.split(',').map(str::to_owned).collect(),
            })
        })
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .collect()
}

/// Whitespace-separated words of a cgroup file (`cgroup.controllers`, …).
fn words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

impl Hierarchy {
    /// Detects the hierarchy of this host from `/proc/self/mountinfo`.
    pub fn detect() -> Result<Hierarchy> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| VmmError::io("reading /proc/self/mountinfo", e))?;
        Hierarchy::detect_from(&text)
    }

    /// Detects from mountinfo text: a cgroup2 mount offering every
    /// controller wins, else a v1 mount per controller.
    pub fn detect_from(mountinfo: &str) -> Result<Hierarchy> {
        let mut mounts = parse_mountinfo(mountinfo);
        // The whole tree before bind-mounted subtrees, and the canonical
        // place before any other.
        mounts.sort_by_key(|m| {
            (
                m.root != Path::new("/"),
                m.point != Path::new("/sys/fs/cgroup"),
            )
        });
        let mount = |m: &MountEntry| Mount {
            point: m.point.clone(),
            root: m.root.clone(),
        };
        let mut seen_v2 = Vec::new();
        for m in mounts.iter().filter(|m| m.fstype == "cgroup2") {
            let have = words(&m.point.join("cgroup.controllers"));
            if CONTROLLERS.iter().all(|c| have.iter().any(|h| h == c)) {
                return Ok(Hierarchy::V2(mount(m)));
            }
            seen_v2.push(format!("{} offers [{}]", m.point.display(), have.join(" ")));
        }
        let v1 = |c: &str| {
            mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.super_opts.iter().any(|o| o == c))
                .map(mount)
        };
        match (v1("cpu"), v1("memory"), v1("pids")) {
            (Some(cpu), Some(memory), Some(pids)) => Ok(Hierarchy::V1 { cpu, memory, pids }),
            (cpu, memory, pids) => {
                let missing: Vec<&str> = [("cpu", cpu), ("memory", memory), ("pids", pids)]
                    .into_iter()
                    .filter(|(_, m)| m.is_none())
                    .map(|(c, _)| c)
                    .collect();
                Err(VmmError::Spawn(format!(
                    "no cgroup hierarchy offers cpu, memory and pids: cgroup2: {}; \
                     cgroup v1 lacks [{}]",
                    if seen_v2.is_empty() {
                        "not mounted".to_owned()
                    } else {
                        seen_v2.join(", ")
                    },
                    missing.join(" ")
                )))
            }
        }
    }

    /// The distinct mounts (v1 controllers may share one).
    pub fn mounts(&self) -> Vec<&Mount> {
        match self {
            Hierarchy::V2(m) => vec![m],
            Hierarchy::V1 { cpu, memory, pids } => {
                let mut v: Vec<&Mount> = Vec::new();
                for m in [cpu, memory, pids] {
                    if !v.iter().any(|x| x.point == m.point) {
                        v.push(m);
                    }
                }
                v
            }
        }
    }

    /// The mount that limits `controller`.
    fn mount_of(&self, controller: &str) -> &Mount {
        match self {
            Hierarchy::V2(m) => m,
            Hierarchy::V1 { cpu, memory, pids } => match controller {
                "cpu" => cpu,
                "memory" => memory,
                _ => pids,
            },
        }
    }
}

/// One limit file to write: `controller` says which v1 tree it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitFile {
    pub controller: &'static str,
    pub file: &'static str,
    pub value: String,
    /// Written only if the kernel has it (swap accounting).
    pub optional: bool,
}

/// The files (in write order) that impose `l`.
pub fn limit_files(v2: bool, l: &ResourceLimits) -> Vec<LimitFile> {
    let f = |controller, file, value: String, optional| LimitFile {
        controller,
        file,
        value,
        optional,
    };
    if v2 {
        vec![
            f("cpu", "cpu.max", l.cpu_max(), false),
            f("memory", "memory.max", l.memory_bytes.to_string(), false),
            // No swap: guest memory that cannot stay resident is an OOM,
            // not a host swapping other tenants' pages out.
            f("memory", "memory.swap.max", "0".into(), true),
            f("pids", "pids.max", l.pids_max.to_string(), false),
        ]
    } else {
        vec![
            // Period before quota: the kernel checks the quota against it.
            f(
                "cpu",
                "cpu.cfs_period_us",
                l.cpu_period_us.to_string(),
                false,
            ),
            f("cpu", "cpu.cfs_quota_us", l.cpu_quota_us.to_string(), false),
            // memsw (memory + swap) must not be below the memory limit, so
            // it goes second; equal to it means no swap.
            f(
                "memory",
                "memory.limit_in_bytes",
                l.memory_bytes.to_string(),
                false,
            ),
            f(
                "memory",
                "memory.memsw.limit_in_bytes",
                l.memory_bytes.to_string(),
                true,
            ),
            f("pids", "pids.max", l.pids_max.to_string(), false),
        ]
    }
}

/// Writes `value` to an existing cgroup file (never creates one).
fn write_file(path: &Path, value: &str) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| VmmError::io(format!("writing {value:?} to {}", path.display()), e))
}

/// Creates VM cgroups in one hierarchy under one root.
#[derive(Debug, Clone)]
pub struct Cgroups {
    hierarchy: Hierarchy,
    root: PathBuf,
}

/// A `root` or VM id must stay below the hierarchy: relative, no `..`.
fn check_relative(what: &str, p: &str) -> Result<PathBuf> {
    let path = PathBuf::from(p);
    let ok = !p.is_empty()
        && !p.contains('\0')
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(path)
    } else {
        Err(VmmError::Spawn(format!(
            "invalid cgroup {what} {p:?}: must be a relative path without `..`"
        )))
    }
}

impl Cgroups {
    /// Detects the host's hierarchy.
    pub fn new(cfg: &CgroupConfig) -> Result<Cgroups> {
        Cgroups::with_hierarchy(Hierarchy::detect()?, cfg)
    }

    pub fn with_hierarchy(hierarchy: Hierarchy, cfg: &CgroupConfig) -> Result<Cgroups> {
        Ok(Cgroups {
            root: check_relative("root", &cfg.root)?,
            hierarchy,
        })
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// Creates VM `id`'s cgroup with `limits` (replacing an empty leftover
    /// of an earlier VMM of the same id). The caller puts the VMM in it
    /// ([`VmCgroup::open_procs`], [`join_self`]).
    pub async fn create(&self, id: &str, limits: &ResourceLimits) -> Result<VmCgroup> {
        let leaf = check_relative("VM id", id)?;
        if leaf.components().count() != 1 {
            return Err(VmmError::Spawn(format!(
                "invalid cgroup VM id {id:?}: must be one path component"
            )));
        }
        let v2 = matches!(self.hierarchy, Hierarchy::V2(_));
        let mut dirs = Vec::new();
        for m in self.hierarchy.mounts() {
            let parent = m.point.join(&self.root);
            if v2 {
                self.enable_controllers(&m.point)?;
            } else {
                std::fs::create_dir_all(&parent)
                    .map_err(|e| VmmError::io(format!("creating {}", parent.display()), e))?;
            }
            let dir = parent.join(&leaf);
            // A leftover of a VMM that was not cleaned up: it must be empty.
            if dir.exists() {
                VmCgroup {
                    dirs: vec![dir.clone()],
                }
                .remove()
                .await?;
            }
            std::fs::create_dir(&dir)
                .map_err(|e| VmmError::io(format!("creating cgroup {}", dir.display()), e))?;
            dirs.push(dir);
        }
        let cg = VmCgroup { dirs };
        if let Err(e) = self.write_limits(id, limits) {
            let _ = cg.remove_now();
            return Err(e);
        }
        Ok(cg)
    }

    fn write_limits(&self, id: &str, limits: &ResourceLimits) -> Result<()> {
        let v2 = matches!(self.hierarchy, Hierarchy::V2(_));
        for lf in limit_files(v2, limits) {
            let path = self
                .hierarchy
                .mount_of(lf.controller)
                .point
                .join(&self.root)
                .join(id)
                .join(lf.file);
            if lf.optional && !path.exists() {
                continue;
            }
            write_file(&path, &lf.value)?;
        }
        Ok(())
    }

    /// v2: creates `<mount>/<root>` and enables cpu, memory and pids in the
    /// `cgroup.subtree_control` of it and of each ancestor, so its children
    /// (the VM cgroups) have the limit files.
    fn enable_controllers(&self, mount: &Path) -> Result<()> {
        let mut dir = mount.to_path_buf();
        let mut chain = vec![dir.clone()];
        for c in self.root.components() {
            dir.push(c);
            chain.push(dir.clone());
        }
        for (i, d) in chain.iter().enumerate() {
            if i > 0 {
                match std::fs::create_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(VmmError::io(format!("creating {}", d.display()), e));
                    }
                }
            }
            let enabled = words(&d.join("cgroup.subtree_control"));
            let missing: Vec<&str> = CONTROLLERS
                .iter()
                .copied()
                .filter(|c| !enabled.iter().any(|e| e == c))
                .collect();
            if missing.is_empty() {
                continue;
            }
            let available = words(&d.join("cgroup.controllers"));
            if let Some(c) = missing.iter().find(|c| !available.iter().any(|a| a == *c)) {
                return Err(VmmError::Spawn(format!(
                    "the {c} controller is not available in {} (cgroup.controllers: {})",
                    d.display(),
                    available.join(" ")
                )));
            }
            let change: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
            // EBUSY here: `d` holds processes itself (cgroup v2 allows
            // controllers only on inner nodes without processes, except
            // the real root).
            write_file(&d.join("cgroup.subtree_control"), &change.join(" "))?;
        }
        Ok(())
    }
}

/// The cgroup of one VM: one directory per hierarchy mount (one on v2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCgroup {
    pub dirs: Vec<PathBuf>,
}

impl VmCgroup {
    /// Opens each `cgroup.procs` for [`join_self`] (close-on-exec, so the
    /// VMM does not inherit them).
    pub fn open_procs(&self) -> Result<Vec<File>> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(|e| VmmError::io(format!("opening {}", p.display()), e))
            })
            .collect()
    }

    /// Removes the directories once their processes are gone, retrying
    /// `EBUSY` for a moment. Already removed is fine.
    pub async fn remove(&self) -> Result<()> {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        for dir in &self.dirs {
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(e) => {
                        return Err(VmmError::io(
                            format!("removing cgroup {}", dir.display()),
                            e,
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// One attempt at removing (no process ever joined).
    pub fn remove_now(&self) -> Result<()> {
        for dir in &self.dirs {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(VmmError::io(
                        format!("removing cgroup {}", dir.display()),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Moves the calling process into the cgroups whose `cgroup.procs` are
/// `procs` (writing `0` means "myself", in v1 and v2 alike).
///
/// For a `pre_exec` hook: only write(2), which is async-signal-safe, and no
/// allocation.
pub fn join_self(procs: &[File]) -> std::io::Result<()> {
    for f in procs {
        // SAFETY: a valid open descriptor and a one-byte static buffer.
        let n = unsafe { libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What a process's cgroups impose, read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupState {
    /// The cgroup directory limiting cpu, memory and pids (in that order).
    pub dirs: [PathBuf; 3],
    /// `None`: no CPU quota.
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: u64,
    /// `None`: no memory limit (`max`).
    pub memory_bytes: Option<u64>,
    /// Swap allowed beyond the memory limit: v2 `memory.swap.max`, v1 memsw
    /// minus the memory limit. `None`: unlimited or not accounted.
    pub swap_bytes: Option<u64>,
    /// `None`: no limit.
    pub pids_max: Option<u64>,
}

impl CgroupState {
    /// True if these are exactly `l`, without swap.
    pub fn matches(&self, l: &ResourceLimits) -> bool {
        self.cpu_quota_us == Some(l.cpu_quota_us)
            && self.cpu_period_us == l.cpu_period_us
            && self.memory_bytes == Some(l.memory_bytes)
            && self.pids_max == Some(l.pids_max)
            && matches!(self.swap_bytes, None | Some(0))
    }
}

/// The cgroup path of `controller` in `/proc/<pid>/cgroup` text (v2: the
/// `0::` line).
pub fn proc_cgroup_path(text: &str, v2: bool, controller: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (id, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if v2 {
            id == "0" && ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_owned())
    })
}

fn read_limit(path: &Path) -> Result<Option<u64>> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| VmmError::io(format!("reading {}", path.display()), e))?;
    let s = s.trim();
    if s == "max" || s == "-1" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        VmmError::io(
            format!("parsing {}", path.display()),
            std::io::Error::other(s.to_owned()),
        )
    })
}

/// The cgroups of process `pid` and the limits they impose (for tests and
/// diagnostics).
pub fn inspect(pid: u32) -> Result<CgroupState> {
    let h = Hierarchy::detect()?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| VmmError::io(format!("reading /proc/{pid}/cgroup"), e))?;
    inspect_in(&h, &text)
}

fn inspect_in(h: &Hierarchy, proc_cgroup: &str) -> Result<CgroupState> {
    let v2 = matches!(h, Hierarchy::V2(_));
    let dir = |c: &str| -> Result<PathBuf> {
        let p = proc_cgroup_path(proc_cgroup, v2, c).ok_or_else(|| {
            VmmError::Exited(format!(
                "no {c} cgroup in /proc/<pid>/cgroup: {proc_cgroup}"
            ))
        })?;
        Ok(h.mount_of(c).dir_of(&p))
    };
    let dirs = [dir("cpu")?, dir("memory")?, dir("pids")?];
    let (cpu, mem, pids) = (&dirs[0], &dirs[1], &dirs[2]);
    if v2 {
        let cpu_max = std::fs::read_to_string(cpu.join("cpu.max"))
            .map_err(|e| VmmError::io(format!("reading {}/cpu.max", cpu.display()), e))?;
        let mut it = cpu_max.split_whitespace();
        let quota = it.next().and_then(|q| q.parse().ok());
        let period = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let swap = mem.join("memory.swap.max");
        Ok(CgroupState {
            cpu_quota_us: quota,
            cpu_period_us: period,
            memory_bytes: read_limit(&mem.join("memory.max"))?,
            swap_bytes: if swap.exists() {
                read_limit(&swap)?
            } else {
                None
            },
            pids_max: read_limit(&pids.join("pids.max"))?,
            dirs: dirs.clone(),
        })
    } else {
        let memory = read_limit(&mem.join("memory.limit_in_bytes"))?;
        let memsw = mem.join("memory.memsw.limit_in_bytes");
        let swap = match (memory, memsw.exists()) {
            (Some(m), true) => read_limit(&memsw)?.map(|s| s.saturating_sub(m)),
            _ => None,
        };
        Ok(CgroupState {
            cpu_quota_us: read_limit(&cpu.join("cpu.cfs_quota_us"))?,
            cpu_period_us: read_limit(&cpu.join("cpu.cfs_period_us"))?.unwrap_or(0),
            memory_bytes: memory,
            swap_bytes: swap,
            pids_max: read_limit(&pids.join("pids.max"))?,
            dirs: dirs.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's hybrid layout, rooted at `base`.
    fn hybrid(base: &Path) -> String {
        let b = base.display();
        format!(
            "31 23 0:28 / {b} rw,relatime - tmpfs tmpfs rw,mode=755\n\
             32 31 0:29 / {b}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
             35 31 0:32 / {b}/memory rw,relatime - cgroup cgroup rw,memory\n\
             39 31 0:36 / {b}/pids rw,relatime - cgroup cgroup rw,pids\n\
             40 31 0:37 / {b}/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
             41 31 0:38 / {b}/unified rw,relatime - cgroup2 cgroup2 rw\n"
        )
    }

    fn m(point: PathBuf) -> Mount {
        Mount {
            point,
            root: "/".into(),
        }
    }

    #[test]
    fn detects_hybrid_as_v1() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("unified")).unwrap();
        std::fs::write(t.path().join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        let h = Hierarchy::detect_from(&hybrid(t.path())).unwrap();
        assert_eq!(
            h,
            Hierarchy::V1 {
                cpu: m(t.path().join("cpu,cpuacct")),
                memory: m(t.path().join("memory")),
                pids: m(t.path().join("pids")),
            }
        );
        assert_eq!(h.mounts().len(), 3);
    }

    #[test]
    fn detects_pure_v2() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .unwrap();
        let mi = format!(
            "30 24 0:26 / {} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n",
            t.path().display()
        );
        assert_eq!(
            Hierarchy::detect_from(&mi).unwrap(),
            Hierarchy::V2(m(t.path().to_path_buf()))
        );
        // The same mount without the controllers (all bound to v1, or none
        // delegated): an error naming what is missing.
        std::fs::write(t.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        let e = Hierarchy::detect_from(&mi).unwrap_err().to_string();
        assert!(
            e.contains("offers [hugetlb]") && e.contains("[cpu memory pids]"),
            "{e}"
        );
    }

    #[test]
    fn mountinfo_escapes_and_cgroup_paths() {
        assert_eq!(unescape(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape(r"/a\04"), r"/a\04");
        let text = "9:name=systemd:/\n4:memory:/bhatti/x\n1:cpu,cpuacct:/bhatti/x\n0::/\n";
        assert_eq!(
            proc_cgroup_path(text, false, "cpu").as_deref(),
            Some("/bhatti/x")
        );
        assert_eq!(proc_cgroup_path(text, false, "pids"), None);
        assert_eq!(proc_cgroup_path(text, true, "cpu").as_deref(), Some("/"));
        let bind = Mount {
            point: "/sys/fs/cgroup".into(),
            root: "/ctr".into(),
        };
        assert_eq!(
            bind.dir_of("/ctr/bhatti/x"),
            Path::new("/sys/fs/cgroup/bhatti/x")
        );
        assert_eq!(m("/c".into()).dir_of("/bhatti/x"), Path::new("/c/bhatti/x"));
    }

    #[test]
    fn limit_file_contents() {
        let mut cfg = crate::test_vm_config("x");
        cfg.vcpus = 2;
        cfg.memory_mib = 512;
        let l = ResourceLimits::for_vm(&cfg);
        let show = |v2| {
            limit_files(v2, &l)
                .iter()
                .map(|f| {
                    format!(
                        "{}={}{}",
                        f.file,
                        f.value,
                        if f.optional { "?" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            show(true),
            "cpu.max=200000 100000 memory.max=805306368 memory.swap.max=0? pids.max=256"
        );
        assert_eq!(
            show(false),
            "cpu.cfs_period_us=100000 cpu.cfs_quota_us=200000 memory.limit_in_bytes=805306368 \
             memory.memsw.limit_in_bytes=805306368? pids.max=256"
        );
    }

    #[test]
    fn roots_and_ids_stay_below_the_hierarchy() {
        let h = Hierarchy::V2(m("/c".into()));
        for bad in ["", "/abs", "../up", "a/../b"] {
            let cfg = CgroupConfig { root: bad.into() };
            assert!(Cgroups::with_hierarchy(h.clone(), &cfg).is_err(), "{bad:?}");
        }
        let ok = CgroupConfig {
            root: "machine.slice/bhatti".into(),
        };
        assert!(Cgroups::with_hierarchy(h, &ok).is_ok());
    }

    /// v2: the controllers are enabled where they are not yet, top down.
    #[test]
    fn v2_enables_controllers_in_each_ancestor() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path();
        let all = "cpuset cpu io memory pids\n";
        std::fs::write(top.join("cgroup.controllers"), all).unwrap();
        std::fs::write(top.join("cgroup.subtree_control"), "cpu memory pids\n").unwrap();
        // What the kernel would show in a fresh child of `top`.
        let mid = top.join("machine.slice");
        std::fs::create_dir(&mid).unwrap();
        std::fs::write(mid.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(mid.join("cgroup.subtree_control"), "memory\n").unwrap();
        let leaf = mid.join("bhatti");
        std::fs::create_dir(&leaf).unwrap();
        std::fs::write(leaf.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(leaf.join("cgroup.subtree_control"), "").unwrap();
        let cg = Cgroups::with_hierarchy(
            Hierarchy::V2(m(top.to_path_buf())),
            &CgroupConfig {
                root: "machine.slice/bhatti".into(),
            },
        )
        .unwrap();
        cg.enable_controllers(top).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p.join("cgroup.subtree_control")).unwrap();
        assert_eq!(read(top), "cpu memory pids\n", "already enabled: untouched");
        assert_eq!(read(&mid), "+cpu +pids");
        assert_eq!(read(&leaf), "+cpu +memory +pids");
        // A controller the parent does not offer: a clear error.
        std::fs::write(leaf.join("cgroup.controllers"), "cpu memory\n").unwrap();
        std::fs::write(leaf.join("cgroup.subtree_control"), "").unwrap();
        let e = cg.enable_controllers(top).unwrap_err().to_string();
        assert!(e.contains("pids controller is not available"), "{e}");
    }

    /// Reads the limits back from a fake v1 tree.
    #[test]
    fn inspects_v1() {
        let t = tempfile::tempdir().unwrap();
        let h = Hierarchy::V1 {
            cpu: m(t.path().join("cpu")),
            memory: m(t.path().join("memory")),
            pids: m(t.path().join("pids")),
        };
        let l = ResourceLimits::for_vm(&crate::test_vm_config("x"));
        for lf in limit_files(false, &l) {
            let dir = h.mount_of(lf.controller).point.join("bhatti/x");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(lf.file), format!("{}\n", lf.value)).unwrap();
        }
        let text = "8:pids:/bhatti/x\n4:memory:/bhatti/x\n1:cpu:/bhatti/x\n";
        let st = inspect_in(&h, text).unwrap();
        assert!(st.matches(&l), "{st:?}");
        assert_eq!(st.swap_bytes, Some(0));
        assert_eq!(st.dirs[1], t.path().join("memory/bhatti/x"));
    }
}
