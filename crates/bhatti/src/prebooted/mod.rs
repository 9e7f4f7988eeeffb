//! Pre-booted snapshots: instant creates.
//!
//! For each template (and each image a user creates sandboxes from),
//! bhatti keeps a checkpoint of a guest that was booted once, whose agent
//! answered and whose `init` ran. A create with the same [`Shape`] restores
//! it through the fork path (fresh id, token, MAC, IP, hostname,
//! machine-id, RNG reseed, env and secrets) instead of booting.
//!
//! - Key: SHA-256 over the shape, the base disk's identity and the
//!   fingerprint of the kernel and lohar in use, so a changed image, kernel
//!   or lohar gives a new key: the old snapshot is no longer used and the
//!   new one is built in the background ([`Prebooted::ensure`]).
//! - Builds run one at a time (they boot a VM), as a sandbox `pb-<key>` on
//!   the owner's network (host address [`BUILDER_HOST`], kept out of the
//!   sandbox pool) with the owner's default egress; secrets never enter
//!   the snapshot (forks get them through `reidentify`).
//! - Layout: `<checkpoints_dir>/pb_<key>/` in the checkpoint format, plus
//!   `built.json`; `.tmp` leftovers are removed by the engine's orphan
//!   collection, stale entries at start ([`Prebooted::collect_stale`]),
//!   others when their template or image goes.
//! - While a create restores a snapshot it holds a [`Lease`]; a snapshot
//!   in use is never removed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api_types::PrebootedView;
use crate::engine::{CheckpointMeta, CreateSpec, Engine};
use crate::init_session::InitOutcome;
use crate::net::egress::{Egress, EgressPolicy};
use crate::net::tenants::{TenantSandbox, TenantUser, Tenants};
use crate::store::Store;

/// The host number in each user's /24 that template builds use (the
/// sandbox pool ends below it).
pub const BUILDER_HOST: u8 = 254;
/// How long a template's `init` may run.
const INIT_TIMEOUT: Duration = Duration::from_secs(1800);
/// Bytes of `init` output kept for the template's view.
const INIT_OUTPUT_TAIL: usize = 4096;
/// A failed build is retried by `ensure` only after this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);
const BUILT_FILE: &str = "built.json";
const DIR_PREFIX: &str = "pb_";

/// What a pre-booted guest must match to stand in for a fresh boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub owner: String,
    /// The root disk's base image (`None`: the engine's rootfs).
    pub base: Option<PathBuf>,
    pub cpus: u8,
    pub memory_mb: u32,
    pub disk_mb: Option<u64>,
    /// The env the guest booted with (init may depend on it).
    pub env: BTreeMap<String, String>,
    pub init: Option<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
}

/// What `built.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Built {
    key: String,
    shape: Shape,
    built_at_ms: i64,
    build_ms: u64,
    #[serde(default)]
    init_output: Option<String>,
}

#[derive(Debug, Clone)]
enum State {
    Building,
    Ready(Built),
    Failed { error: String, at: Instant },
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// Creates restoring from it right now.
    in_use: usize,
    owner: String,
    last_used: Instant,
}

/// Most snapshots kept per user; past it the least recently used ready
/// one goes (a template's is rebuilt when next asked for).
const MAX_PER_OWNER: usize = 16;

/// The pre-booted snapshots of one daemon. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Prebooted {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    engine: Engine,
    store: Store,
    tenants: Option<Arc<Tenants>>,
    default_egress: Egress,
    /// Hash of the kernel and lohar in use.
    fingerprint: String,
    entries: Mutex<HashMap<String, Entry>>,
    /// One build at a time.
    build_lock: tokio::sync::Mutex<()>,
    /// Decisions to keep an owner's network are taken one at a time.
    keep_lock: tokio::sync::Mutex<()>,
    tasks: tokio_util::task::TaskTracker,
}

/// A ready snapshot held for one create; dropping it lets it go.
#[derive(Debug)]
pub struct Lease {
    inner: Arc<Inner>,
    key: String,
    pub dir: PathBuf,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(e) = self.inner.entries().get_mut(&self.key) {
            e.in_use = e.in_use.saturating_sub(1);
        }
    }
}

impl Prebooted {
    /// Loads the snapshots already built.
    /// `lohar` is the agent binary images get, hashed into every key.
    pub async fn new(
        checkpoints_dir: &Path,
        engine: Engine,
        store: Store,
        tenants: Option<Arc<Tenants>>,
        default_egress: Egress,
        lohar: Option<PathBuf>,
    ) -> std::io::Result<Prebooted> {
        let kernel = engine.config().kernel.clone();
        let rootfs = engine.config().rootfs.clone();
        let fingerprint = tokio::task::spawn_blocking(move || {
            let mut h = Sha256::new();
            for p in [Some(kernel), lohar].into_iter().flatten() {
                h.update(p.as_os_str().as_encoded_bytes());
                h.update(file_sha256(&p)?);
            }
            h.update(file_identity(&rootfs).as_bytes());
            Ok::<_, std::io::Error>(hex::encode(h.finalize()))
        })
        .await
        .map_err(std::io::Error::other)??;
        std::fs::create_dir_all(checkpoints_dir)?;
        let mut entries = HashMap::new();
        for name in dir_names(checkpoints_dir) {
            let Some(key) = name.strip_prefix(DIR_PREFIX) else {
                continue;
            };
            let dir = checkpoints_dir.join(&name);
            match std::fs::read(dir.join(BUILT_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<Built>(&b).ok())
            {
                Some(b) if b.key == key && CheckpointMeta::load(&dir).is_ok() => {
                    entries.insert(
                        key.to_owned(),
                        Entry {
                            owner: b.shape.owner.clone(),
                            state: State::Ready(b),
                            in_use: 0,
                            last_used: Instant::now(),
                        },
                    );
                }
                // Half-written (a crash between the checkpoint and its
                // description): useless.
                _ => remove_checkpoint(&dir),
            }
        }
        tracing::info!(ready = entries.len(), "pre-booted snapshots loaded");
        let owners: std::collections::BTreeSet<String> =
            entries.values().map(|e| e.owner.clone()).collect();
        let p = Prebooted {
            inner: Arc::new(Inner {
                dir: checkpoints_dir.to_path_buf(),
                engine,
                store,
                tenants,
                default_egress,
                fingerprint,
                entries: Mutex::new(entries),
                build_lock: tokio::sync::Mutex::new(()),
                keep_lock: tokio::sync::Mutex::new(()),
                tasks: tokio_util::task::TaskTracker::new(),
            }),
        };
        for owner in owners {
            p.inner.keep_network(&owner).await;
        }
        Ok(p)
    }

    /// The key of a shape.
    pub fn key(&self, shape: &Shape) -> String {
        let base = shape
            .base
            .as_deref()
            .map(file_identity)
            .unwrap_or_else(|| "default".into());
        let mut h = Sha256::new();
        h.update(b"bhatti-prebooted-v1\0");
        h.update(self.inner.fingerprint.as_bytes());
        h.update(base.as_bytes());
        h.update(serde_json::to_vec(shape).unwrap_or_default());
        hex::encode(&h.finalize()[..16])
    }

    /// The snapshot for `shape` if it is ready, held until the lease drops.
    pub fn acquire(&self, shape: &Shape) -> Option<Lease> {
        let key = self.key(shape);
        let mut entries = self.inner.entries();
        let e = entries.get_mut(&key)?;
        if !matches!(e.state, State::Ready(_)) {
            return None;
        }
        e.in_use += 1;
        e.last_used = Instant::now();
        Some(Lease {
            inner: self.inner.clone(),
            dir: self.inner.dir.join(format!("{DIR_PREFIX}{key}")),
            key,
        })
    }

    /// Where the snapshot for `shape` is, for views.
    pub fn view(&self, shape: &Shape) -> PrebootedView {
        let key = self.key(shape);
        match self.inner.entries().get(&key).map(|e| &e.state) {
            None => PrebootedView {
                state: "none".into(),
                ..Default::default()
            },
            Some(State::Building) => PrebootedView {
                state: "building".into(),
                ..Default::default()
            },
            Some(State::Failed { error, .. }) => PrebootedView {
                state: "failed".into(),
                error: Some(error.clone()),
                ..Default::default()
            },
            Some(State::Ready(b)) => PrebootedView {
                state: "ready".into(),
                built_at: Some(crate::api_types::rfc3339_ms(b.built_at_ms)),
                build_ms: Some(b.build_ms),
                init_output: b.init_output.clone(),
                error: None,
            },
        }
    }

    /// Builds the snapshot for `shape` in the background unless it is
    /// ready, being built, or failed less than a minute ago.
    pub fn ensure(&self, shape: Shape) {
        let key = self.key(&shape);
        {
            let mut entries = self.inner.entries();
            match entries.get(&key).map(|e| &e.state) {
                Some(State::Ready(_) | State::Building) => return,
                Some(State::Failed { at, .. }) if at.elapsed() < RETRY_AFTER => return,
                _ => {}
            }
            entries.insert(
                key.clone(),
                Entry {
                    state: State::Building,
                    in_use: 0,
                    owner: shape.owner.clone(),
                    last_used: Instant::now(),
                },
            );
        }
        self.evict_beyond_cap(&shape.owner);
        let inner = self.inner.clone();
        self.inner.tasks.spawn(async move {
            let result = inner.build(&key, &shape).await;
            let state = match result {
                Ok(b) => {
                    tracing::info!(key = %key, ms = b.build_ms, "pre-booted snapshot ready");
                    State::Ready(b)
                }
                Err(error) => {
                    tracing::warn!(key = %key, "pre-booted snapshot failed: {error}");
                    State::Failed {
                        error,
                        at: Instant::now(),
                    }
                }
            };
            if let Some(e) = inner.entries().get_mut(&key) {
                e.state = state;
            }
            inner.keep_network(&shape.owner).await;
        });
    }

    /// Removes stale snapshots: built for another kernel, lohar or base
    /// disk (their key no longer matches their shape) or from a base image
    /// that is gone. Called at start.
    pub fn collect_stale(&self) {
        self.remove_where(|this, key, b| {
            this.key(&b.shape) != key || b.shape.base.as_ref().is_some_and(|p| !p.exists())
        });
    }

    /// Removes the snapshot of `shape` (its template was deleted).
    pub fn remove(&self, shape: &Shape) {
        let key = self.key(shape);
        self.remove_where(|_, k, _| k == key);
    }

    /// Removes the snapshots built on the base image `path` (deleted).
    pub fn remove_base(&self, path: &Path) {
        self.remove_where(|_, _, b| b.shape.base.as_deref() == Some(path));
    }

    /// Keeps the owner at [`MAX_PER_OWNER`] snapshots: the least recently
    /// used ready ones that no create holds go first.
    fn evict_beyond_cap(&self, owner: &str) {
        let victims: Vec<String> = {
            let entries = self.inner.entries();
            let mine: Vec<(&String, &Entry)> =
                entries.iter().filter(|(_, e)| e.owner == owner).collect();
            let over = mine.len().saturating_sub(MAX_PER_OWNER);
            let mut idle: Vec<(&String, &Entry)> = mine
                .into_iter()
                .filter(|(_, e)| e.in_use == 0 && !matches!(e.state, State::Building))
                .collect();
            idle.sort_by_key(|(_, e)| e.last_used);
            idle.into_iter()
                .take(over)
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in victims {
            // Failed ones are only forgotten; ready ones lose their files.
            let failed = {
                let mut entries = self.inner.entries();
                let failed = entries
                    .get(&key)
                    .is_some_and(|e| matches!(e.state, State::Failed { .. }));
                if failed {
                    entries.remove(&key);
                }
                failed
            };
            if !failed {
                self.remove_where(|_, k, _| k == key);
            }
        }
    }

    /// Removes the ready snapshots `pred` picks that no create holds;
    /// failed entries it picks are forgotten.
    fn remove_where(&self, pred: impl Fn(&Prebooted, &str, &Built) -> bool) {
        let gone: Vec<(String, String)> = {
            let mut entries = self.inner.entries();
            let gone: Vec<String> = entries
                .iter()
                .filter(|(k, e)| match &e.state {
                    State::Ready(b) => e.in_use == 0 && pred(self, k, b),
                    _ => false,
                })
                .map(|(k, _)| k.clone())
                .collect();
            gone.into_iter()
                .filter_map(|k| entries.remove(&k).map(|e| (k, e.owner)))
                .collect()
        };
        let mut owners = std::collections::BTreeSet::new();
        for (k, owner) in gone {
            tracing::info!(key = %k, "pre-booted snapshot no longer wanted; removed");
            remove_checkpoint(&self.inner.dir.join(format!("{DIR_PREFIX}{k}")));
            owners.insert(owner);
        }
        for owner in owners {
            let inner = self.inner.clone();
            self.inner
                .tasks
                .spawn(async move { inner.keep_network(&owner).await });
        }
    }

    /// Waits for builds in flight (at shutdown).
    pub async fn shutdown(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Inner {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Boots a builder sandbox, runs `init`, checkpoints it, removes it.
    async fn build(&self, key: &str, shape: &Shape) -> Result<Built, String> {
        let _one = self.build_lock.lock().await;
        let started = Instant::now();
        let id = format!("pb-{}", &key[..16.min(key.len())]);
        if self.engine.get(&id).is_ok() {
            let _ = self.engine.destroy(&id).await;
        }
        let tsb = self.builder_net(&id, &shape.owner).await?;
        let network = match (&self.tenants, &tsb) {
            (Some(t), Some(tsb)) => {
                t.add_sandbox(tsb)
                    .await
                    .map_err(|e| format!("the builder's network: {e}"))?;
                Some(
                    t.attach(tsb)
                        .map_err(|e| format!("the builder's network: {e}"))?,
                )
            }
            _ => None,
        };
        let spec = CreateSpec {
            name: Some(id.clone()),
            hostname: Some("sandbox".into()),
            cpus: shape.cpus,
            memory_mb: shape.memory_mb,
            disk_mb: shape.disk_mb,
            env: shape.env.clone(),
            // Run at boot as the session `init`, which the snapshot keeps:
            // every sandbox restored from it lists it.
            init: shape.init.clone(),
            files: Vec::new(),
            network,
            base: shape.base.clone(),
            user: shape.user.clone(),
            workdir: shape.workdir.clone(),
            volumes: Vec::new(),
        };
        let dir = self.dir.join(format!("{DIR_PREFIX}{key}"));
        let result = async {
            self.engine
                .create_as(id.clone(), spec)
                .await
                .map_err(|e| format!("booting: {e}"))?;
            let init_output = match shape.init.as_deref().filter(|s| !s.trim().is_empty()) {
                Some(_) => Some(self.wait_init(&id).await?),
                None => None,
            };
            remove_checkpoint(&dir);
            self.engine
                .checkpoint(&id, &dir)
                .await
                .map_err(|e| format!("checkpoint: {e}"))?;
            let built = Built {
                key: key.to_owned(),
                shape: shape.clone(),
                built_at_ms: now_ms(),
                build_ms: started.elapsed().as_millis() as u64,
                init_output,
            };
            let json = serde_json::to_vec_pretty(&built).map_err(|e| e.to_string())?;
            write_synced(&dir.join(BUILT_FILE), &json)
                .map_err(|e| format!("writing {BUILT_FILE}: {e}"))?;
            Ok::<_, String>(built)
        }
        .await;
        if let Err(e) = self.engine.destroy(&id).await {
            tracing::warn!(id = %id, "removing the template builder: {e}");
        }
        if let (Some(t), Some(tsb), Ok(_)) = (&self.tenants, &tsb, &result) {
            // Kept from now on (see `keep_network`): not torn down with
            // the builder only to be set up again.
            if let Err(e) = t.keep_user(&tsb.user, true).await {
                tracing::warn!(owner = %shape.owner, "keeping the owner's network: {e}");
            }
        }
        if let (Some(t), Some(tsb)) = (&self.tenants, &tsb) {
            if let Err(e) = t.remove_sandbox(tsb).await {
                tracing::warn!(id = %id, "removing the builder's network: {e}");
            }
        }
        if result.is_err() {
            remove_checkpoint(&dir);
        }
        result
    }

    /// An owner's network stays up while they have a ready snapshot (an
    /// instant create then finds it there) and goes with their last
    /// snapshot when they have no sandbox either.
    async fn keep_network(&self, owner: &str) {
        let Some(t) = &self.tenants else {
            return;
        };
        let _one = self.keep_lock.lock().await;
        let keep = self
            .entries()
            .values()
            .any(|e| e.owner == owner && matches!(e.state, State::Ready(_)));
        let result = match self.tenant_user(owner).await {
            Ok(user) => t.keep_user(&user, keep).await.map_err(|e| e.to_string()),
            // A deleted user's network went with their sandboxes.
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(owner, keep, "the owner's network: {e}");
        }
    }

    /// The owner as the network sees them.
    async fn tenant_user(&self, owner: &str) -> Result<TenantUser, String> {
        let owner_id = owner.to_owned();
        let user = self
            .store
            .read(move |c| crate::store::users::get(c, &owner_id))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no user {owner}"))?;
        Ok(TenantUser {
            user_id: user.id.clone(),
            index: user.net_index,
            isolated: user.net_isolated,
        })
    }

    /// The builder's place on its owner's network.
    async fn builder_net(&self, id: &str, owner: &str) -> Result<Option<TenantSandbox>, String> {
        if self.tenants.is_none() {
            return Ok(None);
        }
        Ok(Some(TenantSandbox {
            id: id.to_owned(),
            name: id.to_owned(),
            user: self.tenant_user(owner).await?,
            ip_host: BUILDER_HOST,
            egress: EgressPolicy {
                egress: self.default_egress,
                ..Default::default()
            },
        }))
    }

    /// Waits for the builder's `init` session to end; a non-zero exit
    /// fails the build with the output's tail.
    async fn wait_init(&self, id: &str) -> Result<String, String> {
        let agent = self
            .engine
            .agent(id)
            .await
            .map_err(|e| format!("agent: {e}"))?;
        // Bytes, not characters: a little more, then cut at a boundary.
        match crate::init_session::wait(&agent, INIT_TIMEOUT, INIT_OUTPUT_TAIL + 4).await {
            InitOutcome::Exited { status, tail: out } => {
                let text = tail(&String::from_utf8_lossy(&out), INIT_OUTPUT_TAIL);
                if status.exit_code != 0 {
                    return Err(format!("init exited with {}: {text}", status.exit_code));
                }
                Ok(text)
            }
            InitOutcome::TimedOut | InitOutcome::Running => {
                Err(format!("init did not finish within {INIT_TIMEOUT:?}"))
            }
            InitOutcome::Unknown(e) => Err(format!("init: {e}")),
        }
    }
}

/// The last `max` bytes of `s`, cut at a character boundary.
fn tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

fn remove_checkpoint(dir: &Path) {
    if let Err(e) = CheckpointMeta::remove(dir) {
        tracing::warn!("removing {}: {e}", dir.display());
    }
}

fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Path, size and mtime: a file replaced or rewritten reads differently.
fn file_identity(p: &Path) -> String {
    let canon = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (len, mtime) = std::fs::metadata(&canon)
        .map(|m| {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .unwrap_or_default()
                .as_nanos();
            (m.len(), t)
        })
        .unwrap_or_default();
    format!("{}\0{len}\0{mtime}", canon.display())
}

fn write_synced(p: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, p)
}

fn file_sha256(p: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_vec())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_cuts_at_a_char_boundary() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aéb", 2), "b");
    }
}
