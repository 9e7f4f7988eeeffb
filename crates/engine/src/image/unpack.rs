//! Applying OCI/docker layer tarballs onto a directory, in order.
//!
//! A layer is a tar (plain or gzip) of the files it adds or changes, plus
//! whiteouts: `.wh.<name>` deletes `<name>` from the layers below, and
//! `.wh..wh..opq` in a directory hides everything the layers below put there.
//! Modes, owners, mtimes, symlinks, hard links and `SCHILY.xattr.*` PAX
//! records are kept (we run as root).
//!
//! Layers come from the network and are untrusted. Every path is resolved
//! here component by component with symlinks interpreted *inside* the rootfs
//! (as if chrooted: `/etc` in a link target means `<root>/etc`), `..` never
//! climbs above the root, and the last component of an entry is never
//! followed. So `a -> /etc` then `a/passwd` writes `<root>/etc/passwd`, never
//! the host's. Nothing else writes into the tree while a layer is applied, so
//! resolve-then-act has no race to lose.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::ImageError;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// Symlink hops allowed while resolving one path (Linux's MAXSYMLINKS).
const MAX_HOPS: usize = 40;

/// What applying one layer did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries created (files, dirs, links, nodes).
    pub entries: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Entries skipped (device nodes we could not make, unknown types).
    pub skipped: u64,
}

/// Applies the layer tarball at `layer` (plain, gzip; sniffed from its first
/// bytes) onto `root`. Blocking: call it from `spawn_blocking`.
pub fn apply_layer_file(root: &Path, layer: &Path) -> Result<LayerStats, ImageError> {
    let file = fs::File::open(layer)
        .map_err(|e| ImageError::io(format!("opening layer {}", layer.display()), e))?;
    apply_layer(root, file)
}

/// Applies a layer tarball read from `reader` onto `root` (which must exist).
pub fn apply_layer(root: &Path, reader: impl Read) -> Result<LayerStats, ImageError> {
    let mut reader = BufReader::new(reader);
    let magic = {
        use std::io::BufRead;
        let buf = reader
            .fill_buf()
            .map_err(|e| ImageError::io("reading layer", e))?;
        buf.get(..4).map(|b| b.to_vec()).unwrap_or_default()
    };
    if magic.starts_with(&[0x1f, 0x8b]) {
        apply_tar(root, flate2::read::GzDecoder::new(reader))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(ImageError::Layer(
            "zstd-compressed layers are not supported yet".into(),
        ))
    } else {
        apply_tar(root, reader)
    }
}

fn apply_tar(root: &Path, reader: impl Read) -> Result<LayerStats, ImageError> {
    let root = fs::canonicalize(root)
        .map_err(|e| ImageError::io(format!("rootfs {}", root.display()), e))?;
    let mut archive = tar::Archive::new(reader);
    let mut stats = LayerStats::default();
    // Host paths this layer wrote: an opaque marker keeps these.
    let mut written = Written::default();
    // Directory mtimes are set last: adding children changes them.
    let mut dir_times: Vec<(PathBuf, filetime::FileTime)> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| ImageError::Layer(format!("reading tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ImageError::Layer(format!("reading tar: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| ImageError::Layer(format!("entry path: {e}")))?
            .into_owned();
        let Some((parent, name)) = split_entry_path(&raw)? else {
            // The root itself ("./"): take its mode and owner.
            if entry.header().entry_type().is_dir() {
                set_meta(&root, &mut entry, false)?;
            }
            continue;
        };
        let name_bytes = name.as_bytes();
        if name_bytes == OPAQUE.as_bytes() {
            let dir = resolve_dir(&root, &parent, true)?;
            clear_opaque(&dir, &written)?;
            stats.whiteouts += 1;
            continue;
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(ImageError::Layer(format!("bad whiteout {}", raw.display())));
            }
            // A whiteout in a directory that does not exist has nothing to hide.
            // Whiteouts hide lower layers only, never this layer's own entries.
            if let Some(dir) = resolve_dir_existing(&root, &parent)? {
                let hidden = dir.join(OsStr::from_bytes(hidden));
                if !written.entries.contains(&hidden) {
                    remove_any(&hidden)?;
                }
            }
            stats.whiteouts += 1;
            continue;
        }
        let dir = resolve_dir(&root, &parent, true)?;
        let target = dir.join(&name);
        let kind = entry.header().entry_type();
        let created = match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&target)?;
                        mkdir(&target)?;
                    }
                    Err(_) => mkdir(&target)?,
                }
                set_meta(&target, &mut entry, false)?;
                if let Ok(t) = entry.header().mtime() {
                    dir_times.push((
                        target.clone(),
                        filetime::FileTime::from_unix_time(t as i64, 0),
                    ));
                }
                true
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                replace(&target)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .map_err(|e| ImageError::io(format!("creating {}", target.display()), e))?;
                io::copy(&mut entry, &mut f)
                    .map_err(|e| ImageError::io(format!("writing {}", target.display()), e))?;
                drop(f);
                set_meta(&target, &mut entry, false)?;
                set_mtime(&target, &entry, false)?;
                true
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| ImageError::Layer(format!("link name: {e}")))?
                    .ok_or_else(|| {
                        ImageError::Layer(format!("symlink {} has no target", raw.display()))
                    })?
                    .into_owned();
                replace(&target)?;
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(|e| ImageError::io(format!("symlink {}", target.display()), e))?;
                set_meta(&target, &mut entry, true)?;
                set_mtime(&target, &entry, true)?;
                true
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| ImageError::Layer(format!("link name: {e}")))?
                    .ok_or_else(|| {
                        ImageError::Layer(format!("hard link {} has no target", raw.display()))
                    })?
                    .into_owned();
                let Some((lparent, lname)) = split_entry_path(&link)? else {
                    return Err(ImageError::Layer(format!(
                        "hard link {} to the root",
                        raw.display()
                    )));
                };
                let source = resolve_dir_existing(&root, &lparent)?
                    .map(|d| d.join(lname))
                    .ok_or_else(|| {
                        ImageError::Layer(format!(
                            "hard link {} -> {}: target missing",
                            raw.display(),
                            link.display()
                        ))
                    })?;
                match fs::symlink_metadata(&source) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(ImageError::Layer(format!(
                            "hard link {} -> {}: target missing or a directory",
                            raw.display(),
                            link.display()
                        )))
                    }
                }
                if source != target {
                    replace(&target)?;
                    // linkat without AT_SYMLINK_FOLLOW: a symlink source is linked itself.
                    fs::hard_link(&source, &target).map_err(|e| {
                        ImageError::io(
                            format!("hard link {} -> {}", target.display(), source.display()),
                            e,
                        )
                    })?;
                }
                true
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                replace(&target)?;
                if make_node(&target, &entry) {
                    set_meta(&target, &mut entry, false)?;
                    true
                } else {
                    stats.skipped += 1;
                    false
                }
            }
            other => {
                tracing::debug!(path = %raw.display(), kind = ?other, "layer: skipping entry type");
                stats.skipped += 1;
                false
            }
        };
        if created {
            stats.entries += 1;
            written.insert(&root, target);
        }
    }
    for (dir, t) in dir_times.iter().rev() {
        let _ = filetime::set_symlink_file_times(dir, *t, *t);
    }
    Ok(stats)
}

/// Host paths this layer wrote, and the directories above them: an opaque
/// marker or a whiteout leaves these alone.
#[derive(Default)]
struct Written {
    entries: HashSet<PathBuf>,
    ancestors: HashSet<PathBuf>,
}

impl Written {
    fn insert(&mut self, root: &Path, path: PathBuf) {
        let mut up = path.parent();
        while let Some(dir) = up {
            if dir == root || !dir.starts_with(root) || !self.ancestors.insert(dir.to_path_buf()) {
                break;
            }
            up = dir.parent();
        }
        self.entries.insert(path);
    }
}

/// Splits an entry path into its parent components and last name, dropping
/// `.` and a leading `/`; `None` for the root itself. `..` is refused: no
/// legitimate layer needs it, and refusing beats clamping silently.
fn split_entry_path(path: &Path) -> Result<Option<(Vec<OsString>, OsString)>, ImageError> {
    let mut parts: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_owned()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(ImageError::Layer(format!(
                    "entry {} climbs out with ..",
                    path.display()
                )))
            }
        }
    }
    Ok(parts.pop().map(|last| (parts, last)))
}

/// Resolves `parts` (relative to `root`) to a real directory inside `root`,
/// following symlinks within the rootfs; with `create`, missing directories
/// are made (0755, root-owned), as tar writers may leave parents out.
pub(crate) fn resolve_dir(
    root: &Path,
    parts: &[OsString],
    create: bool,
) -> Result<PathBuf, ImageError> {
    resolve(root, parts, create)?.ok_or_else(|| ImageError::Layer("directory missing".into()))
}

fn resolve_dir_existing(root: &Path, parts: &[OsString]) -> Result<Option<PathBuf>, ImageError> {
    resolve(root, parts, false)
}

fn resolve(root: &Path, parts: &[OsString], create: bool) -> Result<Option<PathBuf>, ImageError> {
    let mut pending: VecDeque<OsString> = parts.iter().cloned().collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        if part == "." || part.is_empty() {
            continue;
        }
        if part == ".." {
            resolved.pop();
            continue;
        }
        let mut here = root.to_path_buf();
        here.extend(&resolved);
        here.push(&part);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(ImageError::Layer(format!(
                        "too many symlinks resolving {}",
                        here.display()
                    )));
                }
                let link = fs::read_link(&here)
                    .map_err(|e| ImageError::io(format!("readlink {}", here.display()), e))?;
                if link.is_absolute() {
                    resolved.clear();
                }
                for c in link.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push_front(n.to_owned()),
                        Component::ParentDir => pending.push_front("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(m) if m.is_dir() => resolved.push(part),
            Ok(_) => {
                return Err(ImageError::Layer(format!(
                    "{} is not a directory",
                    here.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                mkdir(&here)?;
                resolved.push(part);
            }
            Err(e) => return Err(ImageError::io(format!("stat {}", here.display()), e)),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(Some(out))
}

fn mkdir(path: &Path) -> Result<(), ImageError> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(path)
        .map_err(|e| ImageError::io(format!("mkdir {}", path.display()), e))
}

use std::os::unix::fs::DirBuilderExt;

/// Removes whatever is at `path` (not following a symlink); absent is fine.
fn remove_any(path: &Path) -> Result<(), ImageError> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| ImageError::io(format!("removing {}", path.display()), e))
}

/// Makes room for a non-directory entry at `path`.
fn replace(path: &Path) -> Result<(), ImageError> {
    remove_any(path)
}

/// Empties `dir` of what lower layers put there, keeping this layer's entries
/// (and the directories leading to them).
fn clear_opaque(dir: &Path, written: &Written) -> Result<(), ImageError> {
    let read =
        fs::read_dir(dir).map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
    for child in read {
        let child = child.map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
        let path = child.path();
        if written.entries.contains(&path) {
            continue;
        }
        if written.ancestors.contains(&path) {
            // A directory only partly from this layer: clear what is not.
            if fs::symlink_metadata(&path)
                .map(|m| m.is_dir())
                .unwrap_or(false)
            {
                clear_opaque(&path, written)?;
                continue;
            }
        }
        remove_any(&path)?;
    }
    Ok(())
}

/// Owner, then mode (chown clears set-id bits), then xattrs.
fn set_meta<R: Read>(
    path: &Path,
    entry: &mut tar::Entry<'_, R>,
    symlink: bool,
) -> Result<(), ImageError> {
    let header = entry.header();
    let uid = header.uid().ok().and_then(|u| u32::try_from(u).ok());
    let gid = header.gid().ok().and_then(|g| u32::try_from(g).ok());
    let mode = header.mode().ok();
    std::os::unix::fs::lchown(path, uid, gid)
        .map_err(|e| ImageError::io(format!("chown {}", path.display()), e))?;
    if !symlink {
        if let Some(mode) = mode {
            fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| ImageError::io(format!("chmod {}", path.display()), e))?;
        }
    }
    if let Ok(Some(pax)) = entry.pax_extensions() {
        for ext in pax.flatten() {
            let Ok(key) = ext.key() else { continue };
            let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if let Err(e) = xattr::set(path, name, ext.value_bytes()) {
                // Some filesystems take no user.* or security.* xattrs; the
                // file is still usable without them.
                tracing::debug!(path = %path.display(), xattr = name, error = %e, "layer: xattr not set");
            }
        }
    }
    Ok(())
}

fn set_mtime<R: Read>(
    path: &Path,
    entry: &tar::Entry<'_, R>,
    symlink: bool,
) -> Result<(), ImageError> {
    let Ok(t) = entry.header().mtime() else {
        return Ok(());
    };
    let t = filetime::FileTime::from_unix_time(i64::try_from(t).unwrap_or(i64::MAX), 0);
    let r = if symlink {
        filetime::set_symlink_file_times(path, t, t)
    } else {
        filetime::set_file_times(path, t, t)
    };
    r.map_err(|e| ImageError::io(format!("mtime {}", path.display()), e))
}

/// mknod for char/block devices and FIFOs; false (with a debug log) if the
/// kernel refuses, e.g. devices in an unprivileged container.
fn make_node<R: Read>(path: &Path, entry: &tar::Entry<'_, R>) -> bool {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let header = entry.header();
    let kind = match header.entry_type() {
        tar::EntryType::Char => SFlag::S_IFCHR,
        tar::EntryType::Block => SFlag::S_IFBLK,
        _ => SFlag::S_IFIFO,
    };
    let major = header.device_major().ok().flatten().unwrap_or(0);
    let minor = header.device_minor().ok().flatten().unwrap_or(0);
    let mode = Mode::from_bits_truncate(header.mode().unwrap_or(0o644) & 0o777);
    match mknod(path, kind, mode, makedev(major.into(), minor.into())) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "layer: skipping device node");
            false
        }
    }
}

#[cfg(test)]
mod tests;
