//! The image catalogue (`docs/images.md`): OCI images pulled or imported
//! and sandbox disks saved, each an ext4 disk sandboxes are created from,
//! recorded in the store's `images` table with its runtime defaults.
//!
//! Everything lives under `<data_dir>/images/`:
//! - `cache/`: pulled blobs by digest ([`crate::image::pull`]); an entry
//!   stays while a catalogue image has its digest;
//! - `disks/<owner>/<name>-<id>.ext4`: the images' disks;
//! - `work/<id>/`: a conversion in progress (unpacked tree, disk being
//!   built, an upload); removed when it ends, however it ends, and at start.
//!
//! A conversion: pull (or extract an upload) → apply the layers onto an
//! empty tree → put lohar in → `mkfs.ext4 -d` → move the disk into place →
//! record the row, checking the owner's quota (count and bytes) in the
//! same transaction. A pull whose manifest digest equals the owner's
//! image of that name returns that image at once.

pub mod archive;
pub mod names;
pub mod tasks;

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use crate::api_types::{rfc3339_ms, ImageConfigView, ImageView, TaskPhase};
use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::image::{ImageConfig, ImageError, PullAuth};
use crate::store::images::{self as rows, ImageRow, NewImage, Quota};
use crate::store::{Store, StoreError};

/// The shared image that is the `[vm] rootfs`.
pub const MINIMAL: &str = "minimal";

/// Why a catalogue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// The registry or the image (bad ref, 401, 404, bad layers, cancel).
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller's upload is not a usable image archive (400).
    #[error("{0}")]
    Archive(String),
    /// The image cannot be used that way (403: shared images).
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A host failure (500).
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = ImagesError> = std::result::Result<T, E>;

fn internal(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ImagesError {
    ImagesError::Internal(format!("{what}: {e}"))
}

/// The catalogue service.
#[derive(Debug)]
pub struct Images {
    root: PathBuf,
    lohar: PathBuf,
    quota: Quota,
    store: Store,
    /// Pull tasks (`/tasks`).
    pub tasks: tasks::Tasks,
}

/// How far a conversion is.
pub type Report<'a> = &'a (dyn Fn(TaskPhase, u64, u64) + Send + Sync);

/// A work dir removed when dropped (however the conversion ended).
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.0.display());
            }
        }
    }
}

impl Images {
    pub fn new(config: &Config, store: Store) -> Images {
        Images {
            root: config.data_dir.join("images"),
            lohar: config.images.lohar.clone(),
            quota: Quota {
                max_count: config.images.max_per_user,
                max_bytes: config.images.max_bytes_per_user,
            },
            store,
            tasks: tasks::Tasks::default(),
        }
    }

    fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }

    fn work_root(&self) -> PathBuf {
        self.root.join("work")
    }

    /// A fresh work dir under `work/`.
    fn work(&self, id: &str) -> Result<WorkDir> {
        let dir = self.work_root().join(id);
        std::fs::create_dir_all(&dir).map_err(|e| internal(dir.display(), e))?;
        Ok(WorkDir(dir))
    }

    /// A path for an upload, removed with the returned guard.
    pub fn upload_dir(&self) -> Result<(PathBuf, impl Drop)> {
        let w = self.work(&format!("upload-{}", rows::new_image_id()))?;
        Ok((w.0.clone(), w))
    }

    fn disk_path(&self, owner: &str, name: &str, id: &str) -> PathBuf {
        self.root
            .join("disks")
            .join(owner)
            .join(format!("{name}-{id}.ext4"))
    }

    /// At daemon start: sweeps what an interrupted conversion left (work
    /// dirs, partial cache entries, disks no row records, cache entries no
    /// image uses) and records the shared images from the config.
    pub async fn start(&self, config: &Config) -> Result<()> {
        let mut shared: Vec<(String, PathBuf)> = vec![(MINIMAL.into(), config.vm.rootfs.clone())];
        shared.extend(
            config
                .images
                .shared
                .iter()
                .map(|(n, p)| (n.clone(), p.clone())),
        );
        let _ = std::fs::remove_dir_all(self.work_root());
        if let Ok(rd) = std::fs::read_dir(self.cache()) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".pull-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let names: Vec<String> = shared.iter().map(|(n, _)| n.clone()).collect();
        self.store
            .run(move |c| {
                for (name, path) in &shared {
                    let size = std::fs::metadata(path)
                        .map(|m| m.len())
                        .unwrap_or_else(|e| {
                            tracing::warn!(image = %name, "shared image {}: {e}", path.display());
                            0
                        });
                    rows::upsert_shared(c, name, &path.to_string_lossy(), size)?;
                }
                rows::retain_shared(c, &names)
            })
            .await?;
        let all = self.store.run(|c| rows::all(c)).await?;
        let known: std::collections::HashSet<PathBuf> =
            all.iter().map(|r| PathBuf::from(&r.path)).collect();
        for owner_dir in std::fs::read_dir(self.root.join("disks"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for disk in std::fs::read_dir(owner_dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if !known.contains(&disk.path()) {
                    tracing::info!(
                        "removing the unrecorded image disk {}",
                        disk.path().display()
                    );
                    let _ = std::fs::remove_file(disk.path());
                }
            }
        }
        self.sweep_cache().await;
        Ok(())
    }

    /// Removes cache entries whose manifest digest no image has.
    async fn sweep_cache(&self) {
        let Ok(all) = self.store.run(|c| rows::all(c)).await else {
            return;
        };
        let digests: std::collections::HashSet<String> =
            all.into_iter().filter_map(|r| r.digest).collect();
        for e in std::fs::read_dir(self.cache())
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let digest = std::fs::read(e.path().join("image.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("manifest_digest")?.as_str().map(str::to_owned));
            if !digest.is_some_and(|d| digests.contains(&d)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Fails early when the owner is at the image count limit (the insert
    /// checks again, with the bytes).
    async fn precheck(&self, owner: &str, replacing: bool) -> Result<()> {
        if replacing {
            return Ok(());
        }
        let o = owner.to_owned();
        let n = self
            .store
            .read(move |c| {
                Ok(rows::list(c, &o)?
                    .into_iter()
                    .filter(|r| r.owner.is_some())
                    .count())
            })
            .await?;
        if n as u64 >= u64::from(self.quota.max_count) {
            return Err(StoreError::Limit(format!(
                "image limit reached: at most {} images per user; delete one first",
                self.quota.max_count
            ))
            .into());
        }
        Ok(())
    }

    /// The image `image` names for `owner` (name, shared name, reference).
    pub async fn resolve(&self, owner: &str, image: &str) -> Result<Option<ImageRow>> {
        let (o, i) = (owner.to_owned(), image.to_owned());
        Ok(self.store.read(move |c| rows::resolve(c, &o, &i)).await?)
    }

    /// The owner's images and the shared ones.
    pub async fn list(&self, owner: &str) -> Result<Vec<ImageRow>> {
        let o = owner.to_owned();
        Ok(self.store.read(move |c| rows::list(c, &o)).await?)
    }

    /// Pulls `reference` into the owner's catalogue as `name`.
    pub async fn pull(
        &self,
        owner: &str,
        reference: &str,
        name: &str,
        auth: &PullAuth,
        report: Report<'_>,
        cancel: &CancellationToken,
    ) -> Result<ImageRow> {
        let (o, n) = (owner.to_owned(), name.to_owned());
        let existing = self.store.read(move |c| rows::get_own(c, &o, &n)).await?;
        self.precheck(owner, existing.is_some()).await?;
        report(TaskPhase::Resolving, 0, 0);
        let progress = |p: crate::image::PullProgress| {
            report(TaskPhase::Downloading, p.done, p.total);
        };
        let pulled = crate::image::pull(reference, auth, &self.cache(), &progress, cancel).await?;
        if let Some(old) = &existing {
            if old.digest.as_deref() == Some(pulled.manifest_digest.as_str())
                && Path::new(&old.path).is_file()
            {
                tracing::info!(image = %name, digest = %pulled.manifest_digest, "pull: already in the catalogue");
                return Ok(old.clone());
            }
        }
        let layers: Vec<PathBuf> = pulled.layers.iter().map(|l| l.path.clone()).collect();
        let r = self
            .convert(
                owner,
                name,
                &layers,
                report,
                cancel,
                NewImage {
                    id: rows::new_image_id(),
                    owner: Some(owner.to_owned()),
                    name: name.to_owned(),
                    source: "pull".into(),
                    reference: Some(reference.to_owned()),
                    digest: Some(pulled.manifest_digest.clone()),
                    path: String::new(),
                    size_bytes: 0,
                    config: pulled.config.clone(),
                },
                existing.map(|r| r.id),
            )
            .await;
        if r.is_err() {
            // The blobs stay only for images that have them.
            self.sweep_cache().await;
        }
        r
    }

    /// Imports an extracted upload (`tarball`) as the owner's `name`.
    pub async fn import(&self, owner: &str, name: &str, tarball: &Path) -> Result<ImageRow> {
        let (o, n) = (owner.to_owned(), name.to_owned());
        if self
            .store
            .read(move |c| rows::get_own(c, &o, &n))
            .await?
            .is_some()
        {
            return Err(StoreError::Conflict(format!("an image named '{name}' exists")).into());
        }
        self.precheck(owner, false).await?;
        let id = rows::new_image_id();
        let work = self.work(&format!("import-{id}"))?;
        let (ball, dir) = (tarball.to_path_buf(), work.0.join("archive"));
        let archive = tokio::task::spawn_blocking(move || archive::open(&ball, &dir))
            .await
            .map_err(|e| internal("reading the archive", e))?
            .map_err(|e| ImagesError::Archive(format!("the upload: {e}")))?;
        let none = CancellationToken::new();
        self.convert(
            owner,
            name,
            &archive.layers,
            &|_, _, _| {},
            &none,
            NewImage {
                id,
                owner: Some(owner.to_owned()),
                name: name.to_owned(),
                source: "import".into(),
                reference: None,
                digest: archive.digest.clone(),
                path: String::new(),
                size_bytes: 0,
                config: archive.config.clone(),
            },
            None,
        )
        .await
    }

    /// Layers → tree → lohar → ext4 → row. `new.path`/`size_bytes` are
    /// filled in here.
    #[allow(clippy::too_many_arguments)]
    async fn convert(
        &self,
        owner: &str,
        name: &str,
        layers: &[PathBuf],
        report: Report<'_>,
        cancel: &CancellationToken,
        mut new: NewImage,
        replace: Option<String>,
    ) -> Result<ImageRow> {
        let work = self.work(&new.id)?;
        let root = work.0.join("root");
        std::fs::create_dir(&root).map_err(|e| internal(root.display(), e))?;
        report(TaskPhase::Unpacking, 0, layers.len() as u64);
        for (i, layer) in layers.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(ImageError::Cancelled.into());
            }
            let (r, l) = (root.clone(), layer.clone());
            tokio::task::spawn_blocking(move || crate::image::unpack::apply_layer_file(&r, &l))
                .await
                .map_err(|e| internal("unpacking", e))??;
            report(TaskPhase::Unpacking, i as u64 + 1, layers.len() as u64);
        }
        if cancel.is_cancelled() {
            return Err(ImageError::Cancelled.into());
        }
        report(TaskPhase::Building, 0, 0);
        let (r, lohar) = (root.clone(), self.lohar.clone());
        tokio::task::spawn_blocking(move || crate::image::ext4::inject_lohar(&r, &lohar))
            .await
            .map_err(|e| internal("putting lohar in", e))??;
        let built = work.0.join("disk.ext4");
        let size = tokio::select! {
            r = crate::image::ext4::build_ext4(&root, &built) => r?,
            _ = cancel.cancelled() => return Err(ImageError::Cancelled.into()),
        };
        let dest = self.disk_path(owner, name, &new.id);
        self.record(&built, &dest, size, &mut new, replace).await
    }

    /// Moves a finished disk to `dest` and records it (quota checked);
    /// on failure the disk goes, on success a replaced image's disk goes.
    async fn record(
        &self,
        built: &Path,
        dest: &Path,
        size: u64,
        new: &mut NewImage,
        replace: Option<String>,
    ) -> Result<ImageRow> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| internal(parent.display(), e))?;
        }
        std::fs::rename(built, dest).map_err(|e| internal(dest.display(), e))?;
        new.path = dest.to_string_lossy().into_owned();
        new.size_bytes = size;
        let (n, quota) = (new.clone(), self.quota);
        let r = self
            .store
            .transaction(move |tx| rows::insert(tx, &n, Some(quota), replace.as_deref()))
            .await;
        match r {
            Ok((row, old)) => {
                if let Some(old) = old {
                    let _ = std::fs::remove_file(&old.path);
                    self.sweep_cache().await;
                }
                tracing::info!(image = %row.name, owner = ?row.owner, size, source = %row.source, "image recorded");
                Ok(row)
            }
            Err(e) => {
                let _ = std::fs::remove_file(dest);
                Err(e.into())
            }
        }
    }

    /// Saves sandbox `sandbox_id`'s root disk as the owner's image `name`
    /// (the sandbox keeps running), with `config` as its defaults.
    pub async fn save(
        &self,
        engine: &Engine,
        owner: &str,
        name: &str,
        sandbox_id: &str,
        config: ImageConfig,
    ) -> Result<ImageRow> {
        let (o, n) = (owner.to_owned(), name.to_owned());
        if self
            .store
            .read(move |c| rows::get_own(c, &o, &n))
            .await?
            .is_some()
        {
            return Err(StoreError::Conflict(format!("an image named '{name}' exists")).into());
        }
        self.precheck(owner, false).await?;
        let id = rows::new_image_id();
        let work = self.work(&id)?;
        let copy = work.0.join("disk.ext4");
        engine.save_disk(sandbox_id, &copy).await?;
        let size = std::fs::metadata(&copy)
            .map_err(|e| internal(copy.display(), e))?
            .len();
        let mut new = NewImage {
            id: id.clone(),
            owner: Some(owner.to_owned()),
            name: name.to_owned(),
            source: "save".into(),
            reference: None,
            digest: None,
            path: String::new(),
            size_bytes: size,
            config,
        };
        let dest = self.disk_path(owner, name, &id);
        self.record(&copy, &dest, size, &mut new, None).await
    }

    /// Deletes the owner's image `name` and its disk. Shared images: 403.
    pub async fn delete(&self, owner: &str, name: &str) -> Result<ImageRow> {
        let (o, n) = (owner.to_owned(), name.to_owned());
        let row = self
            .store
            .run(move |c| {
                if rows::get_own(c, &o, &n)?.is_none() && rows::get_shared(c, &n)?.is_some() {
                    return Ok(None);
                }
                rows::delete(c, &o, &n).map(Some)
            })
            .await?;
        let Some(row) = row else {
            return Err(ImagesError::Forbidden(format!(
                "'{name}' is a shared image (the daemon's config lists it); it cannot be deleted through the API"
            )));
        };
        if let Err(e) = std::fs::remove_file(&row.path) {
            tracing::warn!(image = %name, "removing {}: {e}", row.path);
        }
        self.sweep_cache().await;
        tracing::info!(image = %name, owner, "image deleted");
        Ok(row)
    }
}

/// How sandboxes from this image run commands: the image's user (`root`
/// when an OCI image names none, as Docker does; lohar's default user for
/// shared disks and for saved disks whose source named none).
pub fn run_user(row: &ImageRow) -> Option<String> {
    match row.source.as_str() {
        "pull" | "import" => Some(row.config.user.clone().unwrap_or_else(|| "root".into())),
        _ => row.config.user.clone(),
    }
}

/// The API's view of a row.
pub fn view(row: &ImageRow) -> ImageView {
    ImageView {
        name: row.name.clone(),
        shared: row.owner.is_none(),
        source: row.source.clone(),
        reference: row.reference.clone(),
        digest: row.digest.clone(),
        size_bytes: row.size_bytes,
        config: ImageConfigView {
            env: row.config.env.clone(),
            working_dir: row.config.working_dir.clone(),
            user: run_user(row),
            command: row.config.command(),
        },
        created_at: rfc3339_ms(row.created_at),
    }
}
