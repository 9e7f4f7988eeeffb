//! Sandbox states, the operations allowed in each, and the record persisted
//! per sandbox as `<data_dir>/sandboxes/<id>/sandbox.json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bhatti_protocol::guest_config::GuestFile;
use bhatti_vmm::{BackendKind, SnapshotFiles, SnapshotKind, VmConfig};
use serde::{Deserialize, Serialize};

use crate::net::GuestNet;
use crate::storage::RootDisk;

/// Version of the `sandbox.json` layout.
pub const RECORD_VERSION: u32 = 1;
pub const RECORD_FILE: &str = "sandbox.json";

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Disks, network and the first boot are being set up.
    Creating,
    /// The VMM runs the guest.
    Running,
    /// The VMM is alive with its vCPUs stopped.
    Paused,
    /// No VMM process; the sandbox boots from its snapshot (if any) or disk.
    Stopped,
    /// Starting it failed; see `error`. It can be started again from disk.
    Failed,
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
        })
    }
}

/// Engine operations that change a sandbox's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Pause,
    Resume,
    /// Snapshot to disk and end the VMM.
    Snapshot,
    /// Start a VMM from the snapshot.
    Restore,
    /// Start a stopped or failed sandbox (snapshot, else fresh boot).
    Start,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Snapshot => "snapshot",
            Op::Restore => "restore",
            Op::Start => "start",
        }
    }
}

/// What `op` does from `from`: the state it ends in, `Ok(None)` when there
/// is nothing to do (already there), or `Err` when it is not allowed.
pub fn transition(from: SandboxState, op: Op) -> Result<Option<SandboxState>, String> {
    use SandboxState::*;
    let to = match (op, from) {
        (Op::Pause, Running) => Some(Paused),
        (Op::Pause, Paused) => None,
        (Op::Resume, Paused) => Some(Running),
        (Op::Resume, Running) => None,
        (Op::Snapshot, Running | Paused) => Some(Stopped),
        (Op::Snapshot, Stopped) => None,
        (Op::Restore, Stopped) => Some(Running),
        (Op::Start, Stopped | Failed) => Some(Running),
        (Op::Start, Running) => None,
        (Op::Start, Paused) => Some(Running),
        _ => return Err(format!("cannot {} a sandbox that is {from}", op.name())),
    };
    Ok(to)
}

/// Size bounds every sandbox obeys, whoever asks: the API's validation,
/// the daemon config's checks and [`CreateSpec::validate`] all use these.
pub const MAX_CPUS: u32 = 64;
pub const MIN_MEMORY_MB: u32 = 128;
pub const MAX_MEMORY_MB: u32 = 262_144;
pub const MIN_DISK_MB: u64 = 64;
pub const MAX_DISK_MB: u64 = 4 << 20;
/// Most volumes one sandbox may have.
pub const MAX_VOLUMES: usize = 16;
/// Most files given at create.
pub const MAX_FILES: usize = 256;
/// Their bytes together (decoded). They travel base64 in the config
/// drive's JSON, which must stay well within the drive (about 2.5 MiB of
/// the 4 MiB image hold a file); see [`MAX_CONFIG_JSON`].
pub const MAX_FILES_BYTES: usize = 1 << 20;
/// Largest config drive JSON a spec may make (files, env and init).
pub const MAX_CONFIG_JSON: usize = 2 << 20;
/// Guest trees no file may be placed in (kernel interfaces, not disk).
const NO_FILES_UNDER: [&str; 3] = ["/proc", "/sys", "/dev"];

/// A path a file may be placed at: absolute and normalized (no empty,
/// `.` or `..` components, no trailing `/`), not `/`, no NUL, at most
/// 4096 bytes, not under /proc, /sys or /dev.
pub fn validate_file_path(path: &str) -> Result<(), String> {
    let shown = |why: &str| format!("file path {path:?} {why}");
    if !path.starts_with('/') {
        return Err(shown("must be absolute"));
    }
    if path.len() > 4096 || path.contains('\0') {
        return Err(shown("must be at most 4096 bytes without NUL"));
    }
    if path == "/" {
        return Err(shown("names no file"));
    }
    if path[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(shown(
            "must be normalized (no '..', '.', '//' or trailing '/')",
        ));
    }
    if NO_FILES_UNDER
        .iter()
        .any(|d| std::path::Path::new(path).starts_with(d))
    {
        return Err(shown("is under /proc, /sys or /dev"));
    }
    Ok(())
}

/// The files of a create: each path valid and given once, modes at most
/// 0o7777, [`MAX_FILES`] and [`MAX_FILES_BYTES`] respected.
pub fn validate_files(files: &[GuestFile]) -> Result<(), String> {
    if files.len() > MAX_FILES {
        return Err(format!("at most {MAX_FILES} files, not {}", files.len()));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0usize;
    for f in files {
        validate_file_path(&f.path)?;
        if !seen.insert(f.path.as_str()) {
            return Err(format!("file path {:?} is given twice", f.path));
        }
        if let Some(m) = f.mode.filter(|&m| m > 0o7777) {
            return Err(format!("file {:?}: mode {m:#o} is above 0o7777", f.path));
        }
        total += f.content.len();
    }
    if total > MAX_FILES_BYTES {
        return Err(format!(
            "the files hold {total} bytes together, more than {MAX_FILES_BYTES}"
        ));
    }
    Ok(())
}

/// What the caller asks for when creating a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateSpec {
    /// Unique among the engine's sandboxes; defaults to the id.
    pub name: Option<String>,
    pub cpus: u8,
    pub memory_mb: u32,
    /// Grow the root disk to this size; `None` keeps the base image's size.
    pub disk_mb: Option<u64>,
    /// Sandbox-wide environment for every command.
    pub env: BTreeMap<String, String>,
    /// Script run once, at the first boot, as the user: lohar's session
    /// `init`. A later fresh boot does not run it again.
    pub init: Option<String>,
    /// Files placed in the guest at the first boot (or, for a fork, right
    /// after its restore); cleared from the record once placed.
    pub files: Vec<GuestFile>,
    /// The guest's hostname; defaults to the name.
    pub hostname: Option<String>,
    /// Where its NIC goes (bridge and address chosen by the caller); `None`
    /// uses the engine's default bridge and pool.
    pub network: Option<crate::net::NetAttach>,
    /// The ext4 image its root disk is cloned from (an image from the
    /// catalogue, lohar inside); `None` uses the engine's rootfs.
    pub base: Option<PathBuf>,
    /// The user commands run as (`name`, `uid`, `name:group`, `uid:gid`,
    /// resolved in the guest); `None`: lohar's default user.
    pub user: Option<String>,
    /// Working directory of commands that name none; `None`: the user's
    /// home.
    pub workdir: Option<String>,
    /// Volumes attached as data disks (in this order) and mounted by the
    /// guest at boot. A restore needs the same list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
}

/// One volume of a sandbox: an ext4 image on the host, mounted in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The image file.
    pub path: PathBuf,
    /// Absolute mount point in the guest ([`validate_mount_point`]).
    pub mount: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Directories a volume may not be mounted on (nor, for the pseudo
/// filesystems, below). Any `/lib*` is refused as well.
pub const RESERVED_MOUNTS: &[&str] = &[
    "/", "/bin", "/boot", "/dev", "/etc", "/proc", "/run", "/sbin", "/sys", "/usr", "/var", "/tmp",
];
const RESERVED_TREES: &[&str] = &["/proc", "/sys", "/dev"];

/// A volume's mount point: absolute, normalized (no `.`, `..`, `//` or
/// trailing `/`), not a system directory ([`RESERVED_MOUNTS`], any `/lib*`)
/// nor below `/proc`, `/sys` or `/dev`.
pub fn validate_mount_point(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("{p:?} must be an absolute path"));
    }
    if p.len() > 4096 || p.contains('\0') {
        return Err(format!("{p:?} is not a usable path"));
    }
    let normalized = p.len() > 1
        && !p.ends_with('/')
        && p[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if p != "/" && !normalized {
        return Err(format!(
            "{p:?} must be normalized (no '.', '..', '//' or trailing '/')"
        ));
    }
    let top_lib = p.starts_with("/lib") && !p[1..].contains('/');
    if RESERVED_MOUNTS.contains(&p) || top_lib {
        return Err(format!(
            "{p:?} is a system directory; mount volumes elsewhere"
        ));
    }
    if RESERVED_TREES
        .iter()
        .any(|t| p.starts_with(&format!("{t}/")))
    {
        return Err(format!("{p:?} is inside a kernel filesystem"));
    }
    Ok(())
}

impl Default for CreateSpec {
    fn default() -> Self {
        CreateSpec {
            name: None,
            cpus: 1,
            memory_mb: 512,
            disk_mb: None,
            env: BTreeMap::new(),
            init: None,
            files: Vec::new(),
            hostname: None,
            network: None,
            base: None,
            user: None,
            workdir: None,
            volumes: Vec::new(),
        }
    }
}

impl CreateSpec {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(name) = &self.name {
            validate_name(name)?;
        }
        if let Some(h) = &self.hostname {
            validate_name(h)?;
        }
        if !(1..=MAX_CPUS).contains(&u32::from(self.cpus)) {
            return Err(format!("cpus must be 1 to {MAX_CPUS}, not {}", self.cpus));
        }
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&self.memory_mb) {
            return Err(format!(
                "memory_mb must be {MIN_MEMORY_MB} to {MAX_MEMORY_MB}, not {}",
                self.memory_mb
            ));
        }
        if let Some(d) = self.disk_mb {
            if !(MIN_DISK_MB..=MAX_DISK_MB).contains(&d) {
                return Err(format!(
                    "disk_mb must be {MIN_DISK_MB} to {MAX_DISK_MB}, not {d}"
                ));
            }
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!("invalid environment variable name {k:?}"));
            }
        }
        if let Some(u) = &self.user {
            let ok = !u.is_empty()
                && u.len() <= 64
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
            if !ok {
                return Err(format!("invalid user {u:?}"));
            }
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') || w.contains('\0') || w.len() > 4096 {
                return Err(format!("workdir {w:?} must be an absolute path"));
            }
        }
        let mut mounts = std::collections::BTreeSet::new();
        for v in &self.volumes {
            validate_mount_point(&v.mount).map_err(|e| format!("volume mount {e}"))?;
            if !mounts.insert(v.mount.as_str()) {
                return Err(format!("two volumes are mounted at {:?}", v.mount));
            }
        }
        if self.volumes.len() > MAX_VOLUMES {
            return Err(format!("at most {MAX_VOLUMES} volumes per sandbox"));
        }
        validate_files(&self.files)?;
        // What the config drive will hold, roughly: base64 files, env, init.
        let config_bytes = self
            .files
            .iter()
            .map(|f| f.content.len().div_ceil(3) * 4 + f.path.len())
            .sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + self.init.as_ref().map_or(0, String::len);
        if config_bytes > MAX_CONFIG_JSON {
            return Err(format!(
                "files, env and init need about {config_bytes} bytes of config, more than {MAX_CONFIG_JSON}"
            ));
        }
        Ok(())
    }
}

/// Names: 1–63 of `[a-z0-9-]`, starting with a letter or digit (they
/// double as the guest hostname).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'"
        ))
    }
}

/// The snapshot a stopped sandbox resumes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub files: SnapshotFiles,
    pub kind: SnapshotKind,
    pub created_unix_ms: i64,
    /// Set when restoring it failed; it is then never tried again.
    #[serde(default)]
    pub failed: Option<String>,
}

/// Everything the engine knows about one sandbox, persisted as JSON (0600:
/// it holds the token).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub version: u32,
    pub id: String,
    pub name: String,
    pub created_unix_ms: i64,
    pub spec: CreateSpec,
    pub token: String,
    pub state: SandboxState,
    /// Why the last operation failed or why the sandbox stopped.
    #[serde(default)]
    pub error: Option<String>,
    pub backend: BackendKind,
    pub disk: RootDisk,
    pub config_disk: PathBuf,
    pub net: Option<GuestNet>,
    /// How the VMM is started (also what `adopt` and `restore` get).
    pub vm: VmConfig,
    #[serde(default)]
    pub snapshot: Option<SnapshotRecord>,
    /// The guest agent's boot id at the last connection.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// The VMM's pid while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
}

impl SandboxRecord {
    /// A snapshot that may still be restored.
    pub fn usable_snapshot(&self) -> Option<&SnapshotRecord> {
        self.snapshot.as_ref().filter(|s| s.failed.is_none())
    }

    /// Writes `dir/sandbox.json` atomically (temp file, fsync, rename).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        self.write(dir, true)
    }

    /// Like [`SandboxRecord::save`] but without the fsyncs: for changes that
    /// need not survive a host crash (paused ↔ running: after a crash the
    /// VMM is gone anyway, and a live one reports its own state on adopt).
    pub fn save_volatile(&self, dir: &Path) -> std::io::Result<()> {
        self.write(dir, false)
    }

    fn write(&self, dir: &Path, durable: bool) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&json)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp, dir.join(RECORD_FILE))?;
        if durable {
            sync_dir(dir)?;
        }
        Ok(())
    }

    pub fn load(dir: &Path) -> std::io::Result<SandboxRecord> {
        let bytes = std::fs::read(dir.join(RECORD_FILE))?;
        let rec: SandboxRecord = serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if rec.version != RECORD_VERSION {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unsupported record version {}", rec.version),
            ));
        }
        Ok(rec)
    }
}

/// fsyncs a directory, making renames in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use SandboxState::*;

    #[test]
    fn mount_points() {
        for ok in [
            "/data",
            "/home/lohar/work",
            "/workspace",
            "/var2",
            "/mnt/a-b",
        ] {
            assert_eq!(validate_mount_point(ok), Ok(()), "{ok}");
        }
        for bad in [
            "data", "/", "/etc", "/usr", "/var", "/tmp", "/lib", "/lib64", "/libexec", "/proc/x",
            "/library", "/sys/fs", "/dev/shm", "/data/", "/a//b", "/a/./b", "/a/../b", "", "/run",
        ] {
            assert!(validate_mount_point(bad).is_err(), "{bad}");
        }
        let spec = |mounts: &[&str]| CreateSpec {
            volumes: mounts
                .iter()
                .map(|m| VolumeMount {
                    path: "/v.ext4".into(),
                    mount: (*m).into(),
                    read_only: false,
                })
                .collect(),
            ..CreateSpec::default()
        };
        assert!(spec(&["/a", "/b"]).validate().is_ok());
        assert!(spec(&["/a", "/a"]).validate().is_err());
    }

    #[test]
    fn transitions() {
        assert_eq!(transition(Running, Op::Pause), Ok(Some(Paused)));
        assert_eq!(transition(Paused, Op::Pause), Ok(None));
        assert_eq!(transition(Paused, Op::Resume), Ok(Some(Running)));
        assert_eq!(transition(Running, Op::Resume), Ok(None));
        assert_eq!(transition(Running, Op::Snapshot), Ok(Some(Stopped)));
        assert_eq!(transition(Paused, Op::Snapshot), Ok(Some(Stopped)));
        assert_eq!(transition(Stopped, Op::Snapshot), Ok(None));
        assert_eq!(transition(Stopped, Op::Restore), Ok(Some(Running)));
        assert_eq!(transition(Failed, Op::Start), Ok(Some(Running)));
        assert_eq!(transition(Paused, Op::Start), Ok(Some(Running)));
        for bad in [
            (Stopped, Op::Pause),
            (Stopped, Op::Resume),
            (Failed, Op::Resume),
            (Running, Op::Restore),
            (Paused, Op::Restore),
            (Failed, Op::Snapshot),
            (Creating, Op::Pause),
            (Creating, Op::Start),
        ] {
            let e = transition(bad.0, bad.1).unwrap_err();
            assert!(e.contains(&bad.0.to_string()), "{e}");
        }
    }

    #[test]
    fn spec_validation() {
        assert!(CreateSpec::default().validate().is_ok());
        let bad = |f: fn(&mut CreateSpec)| {
            let mut s = CreateSpec::default();
            f(&mut s);
            s.validate().unwrap_err()
        };
        bad(|s| s.cpus = 0);
        bad(|s| s.memory_mb = 16);
        bad(|s| s.disk_mb = Some(1));
        bad(|s| s.name = Some("Bad_Name".into()));
        bad(|s| s.name = Some("-x".into()));
        bad(|s| {
            s.env.insert("A=B".into(), "x".into());
        });
        bad(|s| {
            s.files.push(GuestFile {
                path: "/a/../etc/passwd".into(),
                mode: None,
                content: vec![],
            })
        });
        let file = |path: &str, mode: Option<u32>, len: usize| GuestFile {
            path: path.into(),
            mode,
            content: vec![b'x'; len],
        };
        for p in [
            "relative", "/", "/a//b", "/a/./b", "/a/", "/proc/x", "/sys", "/dev/sda", "/a\0b",
        ] {
            assert!(validate_files(&[file(p, None, 1)]).is_err(), "{p}");
        }
        assert!(
            validate_files(&[file("/etc/x", None, 1), file("/devices/x", Some(0o7777), 1)]).is_ok()
        );
        assert!(validate_files(&[file("/x", Some(0o10000), 1)]).is_err());
        assert!(validate_files(&[file("/x", None, 1), file("/x", None, 1)]).is_err());
        assert!(validate_files(&[file("/x", None, MAX_FILES_BYTES)]).is_ok());
        assert!(validate_files(&[file("/x", None, MAX_FILES_BYTES), file("/y", None, 1)]).is_err());
        let many: Vec<GuestFile> = (0..=MAX_FILES)
            .map(|i| file(&format!("/f{i}"), None, 0))
            .collect();
        assert!(validate_files(&many).is_err());
        bad(|s| {
            s.env.insert("BIG".into(), "x".repeat(MAX_CONFIG_JSON));
        });
        assert!(validate_name("web-1").is_ok());
        assert!(validate_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn state_wire_names() {
        assert_eq!(serde_json::to_string(&Running).unwrap(), "\"running\"");
        assert_eq!(
            serde_json::from_str::<SandboxState>("\"failed\"").unwrap(),
            Failed
        );
    }
}
