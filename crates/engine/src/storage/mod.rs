//! Per-sandbox disks: a copy-on-write root disk cloned from the base rootfs,
//! and the config drive.
//!
//! Root disks are made by one of three methods, picked once at start-up:
//!
//! - [`DiskMethod::Reflink`]: `FICLONE` into the data dir, when its
//!   filesystem shares extents (XFS with reflink, btrfs). Near-instant.
//! - [`DiskMethod::XfsLoop`]: the data dir's filesystem cannot reflink, so
//!   the engine keeps its own sparse XFS image (`<data_dir>/reflink.img`,
//!   `mkfs.xfs -m reflink=1`) loop-mounted at `<data_dir>/reflink`; base
//!   images are copied into it once and sandbox disks are reflinked there.
//! - [`DiskMethod::Copy`]: a sparse copy (`SEEK_DATA`/`SEEK_HOLE`), the last
//!   resort: time and space grow with the data in the base image.

mod config_drive;
mod copy;
mod reflink;
mod volume;
mod xfs_loop;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::cmd::CmdError;

pub use config_drive::{write_config_drive, write_placeholder_drive, CONFIG_DRIVE_BYTES};
pub use copy::sparse_copy;
pub use reflink::{ficlone, reflink_supported};
pub use volume::{clone_volume, create_volume, grow_volume, CloneMethod};
pub use xfs_loop::{is_mountpoint, unmount_xfs_loop};

/// What the configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskStrategy {
    /// Reflink, else the XFS loop image, else a sparse copy.
    #[default]
    Auto,
    Reflink,
    XfsLoop,
    Copy,
}

/// The method actually in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskMethod {
    Reflink,
    XfsLoop,
    Copy,
}

impl std::fmt::Display for DiskMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskMethod::Reflink => "reflink",
            DiskMethod::XfsLoop => "xfs-loop",
            DiskMethod::Copy => "copy",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("disk strategy {0:?} is not available here: {1}")]
    Unavailable(DiskStrategy, String),
    #[error("config drive: {0}")]
    ConfigDrive(String),
}

impl StorageError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StorageError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// Storage settings.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// The engine's data dir.
    pub data_dir: PathBuf,
    /// Base root filesystem (ext4 image) every sandbox disk starts from.
    pub rootfs: PathBuf,
    pub strategy: DiskStrategy,
    /// Apparent size of `<data_dir>/reflink.img` (sparse).
    pub xfs_loop_size_mb: u64,
}

/// A root disk made for one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootDisk {
    pub path: PathBuf,
    pub method: DiskMethod,
}

/// Makes and removes per-sandbox disks.
#[derive(Debug)]
pub struct Storage {
    cfg: StorageConfig,
    method: DiskMethod,
    /// Directory whose filesystem reflinks (`data_dir` or the XFS mount).
    reflink_root: Option<PathBuf>,
    /// Serializes imports of base images into `reflink_root/bases`.
    import_lock: Mutex<()>,
}

impl Storage {
    /// Resolves the strategy (mounting the XFS image when needed) and logs
    /// the method chosen.
    pub async fn new(cfg: StorageConfig) -> Result<Storage> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| StorageError::io(format!("creating {}", cfg.data_dir.display()), e))?;
        let (method, reflink_root) = match cfg.strategy {
            DiskStrategy::Reflink => {
                reflink_supported(&cfg.data_dir)
                    .map_err(|why| StorageError::Unavailable(DiskStrategy::Reflink, why))?;
                (DiskMethod::Reflink, Some(cfg.data_dir.clone()))
            }
            DiskStrategy::XfsLoop => {
                let root = xfs_loop::ensure(&cfg.data_dir, cfg.xfs_loop_size_mb).await?;
                (DiskMethod::XfsLoop, Some(root))
            }
            DiskStrategy::Copy => (DiskMethod::Copy, None),
            DiskStrategy::Auto => match reflink_supported(&cfg.data_dir) {
                Ok(()) => (DiskMethod::Reflink, Some(cfg.data_dir.clone())),
                Err(why) => {
                    tracing::info!("no reflink in the data dir ({why}); trying an XFS loop image");
                    match xfs_loop::ensure(&cfg.data_dir, cfg.xfs_loop_size_mb).await {
                        Ok(root) => (DiskMethod::XfsLoop, Some(root)),
                        Err(e) => {
                            tracing::warn!(
                                "no XFS loop image ({e}); sandbox disks will be full sparse copies"
                            );
                            (DiskMethod::Copy, None)
                        }
                    }
                }
            },
        };
        tracing::info!(method = %method, "sandbox root disks by {method}");
        Ok(Storage {
            cfg,
            method,
            reflink_root,
            import_lock: Mutex::new(()),
        })
    }

    pub fn method(&self) -> DiskMethod {
        self.method
    }

    /// Where the disk of sandbox `id` goes, given its sandbox dir.
    pub fn root_disk_path(&self, id: &str, sandbox_dir: &Path) -> PathBuf {
        match self.method {
            DiskMethod::XfsLoop => self
                .reflink_root
                .as_ref()
                .expect("xfs-loop has a mount")
                .join("disks")
                .join(format!("{id}.ext4")),
            DiskMethod::Reflink | DiskMethod::Copy => sandbox_dir.join("rootfs.ext4"),
        }
    }

    /// Makes the root disk of sandbox `id` from `base` (default: the
    /// configured rootfs), grown to `disk_mb` if that is larger.
    pub async fn create_root_disk(
        &self,
        id: &str,
        sandbox_dir: &Path,
        base: Option<&Path>,
        disk_mb: Option<u64>,
    ) -> Result<RootDisk> {
        let base = base.unwrap_or(&self.cfg.rootfs).to_path_buf();
        let dest = self.root_disk_path(id, sandbox_dir);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StorageError::io(format!("creating {}", parent.display()), e))?;
        }
        let started = Instant::now();
        match self.method {
            DiskMethod::Reflink | DiskMethod::XfsLoop => {
                let root = self.reflink_root.as_ref().expect("reflink root");
                // Straight from the configured image when it already lives on
                // the reflink filesystem; else from a copy imported once.
                let direct = ficlone_file(&base, &dest);
                if let Err(e) = direct {
                    let _ = std::fs::remove_file(&dest);
                    tracing::debug!(
                        "direct reflink of the base failed ({e}); using an imported copy"
                    );
                    let base = self.imported_base(root, &base).await?;
                    ficlone_file(&base, &dest).map_err(|e| {
                        let _ = std::fs::remove_file(&dest);
                        StorageError::io(
                            format!("reflinking {} to {}", base.display(), dest.display()),
                            e,
                        )
                    })?;
                }
            }
            DiskMethod::Copy => {
                let (src, dst) = (base.clone(), dest.clone());
                blocking(move || sparse_copy(&src, &dst))
                    .await
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(&dest);
                    })?;
            }
        }
        let cloned = started.elapsed();
        if let Some(mb) = disk_mb {
            if let Err(e) = grow_ext4(&dest, mb).await {
                let _ = std::fs::remove_file(&dest);
                return Err(e);
            }
        }
        tracing::info!(
            method = %self.method,
            clone_ms = ms(cloned),
            total_ms = ms(started.elapsed()),
            "root disk ready"
        );
        Ok(RootDisk {
            path: dest,
            method: self.method,
        })
    }

    /// Removes a root disk; a missing one is fine.
    /// Where a checkpoint keeps its copy of a root disk: beside the other
    /// disks on the reflink filesystem (so copies are reflinks), else in
    /// the checkpoint's own directory.
    pub fn checkpoint_disk_path(&self, key: &str, checkpoint_dir: &Path) -> PathBuf {
        match self.method {
            DiskMethod::XfsLoop => self
                .reflink_root
                .as_ref()
                .expect("xfs-loop has a mount")
                .join("checkpoints")
                .join(format!("{key}.ext4")),
            DiskMethod::Reflink | DiskMethod::Copy => checkpoint_dir.join("rootfs.ext4"),
        }
    }

    /// Copies a disk image to `dest` (a new file): a reflink where the
    /// method has them, else (or if the reflink fails) a sparse copy.
    pub async fn clone_disk(&self, src: &Path, dest: &Path) -> Result<()> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| StorageError::io(format!("creating {}", parent.display()), e))?;
        }
        let started = Instant::now();
        if self.method != DiskMethod::Copy {
            match ficlone_file(src, dest) {
                Ok(()) => {
                    tracing::debug!(ms = ms(started.elapsed()), "disk reflinked");
                    return Ok(());
                }
                Err(e) => {
                    let _ = std::fs::remove_file(dest);
                    tracing::debug!("reflink of {} failed ({e}); copying", src.display());
                }
            }
        }
        let (s, d) = (src.to_path_buf(), dest.to_path_buf());
        blocking(move || sparse_copy(&s, &d))
            .await
            .inspect_err(|_| {
                let _ = std::fs::remove_file(dest);
            })?;
        tracing::debug!(ms = ms(started.elapsed()), "disk copied");
        Ok(())
    }

    /// Where root disks live outside their sandbox dirs (xfs-loop), for
    /// collecting orphans; `None` when they live in the sandbox dirs.
    pub fn disks_dir(&self) -> Option<PathBuf> {
        self.reflink_root.as_ref().map(|r| r.join("disks"))
    }

    /// Where checkpoint disks live outside their checkpoint dirs.
    pub fn checkpoint_disks_dir(&self) -> Option<PathBuf> {
        self.reflink_root.as_ref().map(|r| r.join("checkpoints"))
    }

    pub fn remove_root_disk(&self, disk: &Path) -> Result<()> {
        match std::fs::remove_file(disk) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(format!("removing {}", disk.display()), e)),
        }
    }

    /// Removes the imported copies of base images (xfs-loop) that are none
    /// of `keep` (the configured rootfs is always kept): images deleted or
    /// replaced since they were first used.
    pub async fn sweep_bases(&self, keep: &[PathBuf]) {
        let Some(root) = self.reflink_root.as_ref() else {
            return;
        };
        let _guard = self.import_lock.lock().await;
        let mut wanted: std::collections::HashSet<String> =
            keep.iter().filter_map(|p| base_key(p)).collect();
        wanted.extend(base_key(&self.cfg.rootfs));
        let bases = root.join("bases");
        let Ok(rd) = std::fs::read_dir(&bases) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".ext4") else {
                continue;
            };
            if !wanted.contains(key) {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => {
                        tracing::info!(base = %name, "removed an imported base no image uses")
                    }
                    Err(err) => tracing::warn!("removing {}: {err}", e.path().display()),
                }
            }
        }
    }

    /// The base image `src` inside `root/bases`, copied there on first use. The
    /// name carries the source's path, size and mtime, so a rebuilt base is
    /// imported again.
    async fn imported_base(&self, root: &Path, src: &Path) -> Result<PathBuf> {
        let src = &src.to_path_buf();
        std::fs::metadata(src)
            .map_err(|e| StorageError::io(format!("reading {}", src.display()), e))?;
        let key = base_key(src).unwrap_or_default();
        let bases = root.join("bases");
        let base = bases.join(format!("{key}.ext4"));
        let _guard = self.import_lock.lock().await;
        if base.exists() {
            return Ok(base);
        }
        std::fs::create_dir_all(&bases)
            .map_err(|e| StorageError::io(format!("creating {}", bases.display()), e))?;
        let tmp = bases.join(format!(".import-{key}"));
        let started = Instant::now();
        let (s, t) = (src.clone(), tmp.clone());
        blocking(move || {
            sparse_copy(&s, &t)?;
            let f = std::fs::File::open(&t)
                .map_err(|e| StorageError::io(format!("opening {}", t.display()), e))?;
            f.sync_all()
                .map_err(|e| StorageError::io(format!("syncing {}", t.display()), e))
        })
        .await
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        std::fs::rename(&tmp, &base)
            .map_err(|e| StorageError::io(format!("renaming {}", tmp.display()), e))?;
        tracing::info!(
            base = %src.display(),
            ms = ms(started.elapsed()),
            "imported the base image for reflinks"
        );
        Ok(base)
    }
}

/// The name of `src`'s imported copy: its path, size and mtime hashed, so
/// a rebuilt base is imported again. `None` when it cannot be read.
fn base_key(src: &Path) -> Option<String> {
    let meta = std::fs::metadata(src).ok()?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default()
        .as_nanos();
    let canon = std::fs::canonicalize(src).unwrap_or_else(|_| src.to_path_buf());
    let key =
        crate::net::fnv1a64(format!("{}\0{}\0{}", canon.display(), meta.len(), mtime).as_bytes());
    Some(format!("{key:016x}"))
}

fn ficlone_file(src: &Path, dest: &Path) -> std::io::Result<()> {
    let s = std::fs::File::open(src)?;
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)?;
    ficlone(&s, &d)
}

/// Grows an ext4 image file to `mb` MiB (never shrinks it).
pub async fn grow_ext4(path: &Path, mb: u64) -> Result<()> {
    let want = mb.saturating_mul(1 << 20);
    let have = std::fs::metadata(path)
        .map_err(|e| StorageError::io(format!("reading {}", path.display()), e))?
        .len();
    if want <= have {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(want))
        .map_err(|e| StorageError::io(format!("extending {}", path.display()), e))?;
    // The image was just cloned from a clean base, so skipping the forced
    // fsck resize2fs would ask for is safe.
    crate::cmd::run("resize2fs", [std::ffi::OsStr::new("-f"), path.as_os_str()]).await?;
    Ok(())
}

pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::io("blocking task", std::io::Error::other(e.to_string())))?
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
