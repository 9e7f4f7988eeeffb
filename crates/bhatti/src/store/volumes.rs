//! `volumes` and `volume_attachments`: a user's ext4 volumes and which
//! sandbox has which one mounted. Names are unique per owner.
//!
//! Attaching is checked where it is recorded, inside the caller's
//! transaction (the sandbox insert's): read-only by any number of
//! sandboxes, or read-write by exactly one, so two racing creates cannot
//! both get a volume read-write. A volume being resized or cloned is
//! [`Busy`] (in this process) and can be neither attached nor deleted.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use super::{new_id, now_ms, Result, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRow {
    pub id: String,
    pub owner: String,
    pub name: String,
    pub size_mb: u64,
    pub path: PathBuf,
    /// The sandbox this volume goes with, if it is ephemeral.
    pub ephemeral_sandbox: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// One sandbox's use of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub volume_id: String,
    pub volume_name: String,
    pub sandbox_id: String,
    pub sandbox_name: String,
    pub mount: String,
    pub read_only: bool,
    /// The volume's image file.
    pub path: PathBuf,
}

/// A volume to record; its file exists already.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub id: String,
    pub owner: String,
    pub name: String,
    pub size_mb: u64,
    pub path: PathBuf,
    pub ephemeral_sandbox: Option<String>,
}

/// A fresh volume id.
pub fn new_volume_id() -> String {
    new_id("vol-")
}

const COLUMNS: &str = "id, owner, name, size_mb, path, ephemeral_sandbox, created_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeRow> {
    Ok(VolumeRow {
        id: r.get(0)?,
        owner: r.get(1)?,
        name: r.get(2)?,
        size_mb: r.get::<_, i64>(3)?.max(0) as u64,
        path: PathBuf::from(r.get::<_, String>(4)?),
        ephemeral_sandbox: r.get(5)?,
        created_at: r.get(6)?,
    })
}

/// MiB of volumes `owner` has.
pub fn used_mb(c: &Connection, owner: &str) -> Result<u64> {
    let n: i64 = c
        .prepare_cached("SELECT COALESCE(SUM(size_mb), 0) FROM volumes WHERE owner = ?1")?
        .query_row([owner], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

fn check_quota(c: &Connection, owner: &str, extra_mb: u64, max_bytes: u64) -> Result<()> {
    let used = used_mb(c, owner)?;
    let want = used.saturating_add(extra_mb).saturating_mul(1 << 20);
    if want > max_bytes {
        return Err(StoreError::Limit(format!(
            "volumes would take {} MiB; the limit is {} MiB per user",
            used.saturating_add(extra_mb),
            max_bytes >> 20
        )));
    }
    Ok(())
}

/// Records a volume unless the name is taken ([`StoreError::Conflict`]) or
/// the owner's volumes would pass `max_bytes` ([`StoreError::Limit`]). Run
/// it inside a transaction so the quota check holds.
pub fn insert(c: &Connection, v: &NewVolume, max_bytes: u64) -> Result<VolumeRow> {
    check_quota(c, &v.owner, v.size_mb, max_bytes)?;
    let r = VolumeRow {
        id: v.id.clone(),
        owner: v.owner.clone(),
        name: v.name.clone(),
        size_mb: v.size_mb,
        path: v.path.clone(),
        ephemeral_sandbox: v.ephemeral_sandbox.clone(),
        created_at: now_ms(),
    };
    let done = c
        .prepare_cached(
            "INSERT INTO volumes (id, owner, name, size_mb, path, ephemeral_sandbox, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            r.id,
            r.owner,
            r.name,
            r.size_mb as i64,
            r.path.to_string_lossy(),
            r.ephemeral_sandbox,
            r.created_at
        ]);
    if let Err(e) = done {
        return Err(super::unique_as_conflict(e, || {
            format!("a volume named '{}' exists", v.name)
        }));
    }
    Ok(r)
}

pub fn get(c: &Connection, owner: &str, name: &str) -> Result<Option<VolumeRow>> {
    Ok(c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM volumes WHERE owner = ?1 AND name = ?2"
    ))?
    .query_row([owner, name], row)
    .optional()?)
}

/// The owner's volume whose image is `path`.
pub fn find_by_path(
    c: &Connection,
    owner: &str,
    path: &std::path::Path,
) -> Result<Option<VolumeRow>> {
    Ok(c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM volumes WHERE owner = ?1 AND path = ?2"
    ))?
    .query_row(params![owner, path.to_string_lossy()], row)
    .optional()?)
}

/// The owner's volumes, oldest first.
pub fn list(c: &Connection, owner: &str) -> Result<Vec<VolumeRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM volumes WHERE owner = ?1 ORDER BY created_at, id"
    ))?;
    let rows = st.query_map([owner], row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn attachments_where(c: &Connection, clause: &str, key: &str) -> Result<Vec<Attachment>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT a.volume_id, v.name, a.sandbox_id, s.name, a.mount, a.read_only, v.path \
         FROM volume_attachments a JOIN volumes v ON v.id = a.volume_id \
         JOIN sandboxes s ON s.id = a.sandbox_id WHERE {clause} ORDER BY a.rowid"
    ))?;
    let rows = st.query_map([key], |r| {
        Ok(Attachment {
            volume_id: r.get(0)?,
            volume_name: r.get(1)?,
            sandbox_id: r.get(2)?,
            sandbox_name: r.get(3)?,
            mount: r.get(4)?,
            read_only: r.get::<_, i64>(5)? != 0,
            path: PathBuf::from(r.get::<_, String>(6)?),
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Who has the volume attached.
pub fn attachments(c: &Connection, volume_id: &str) -> Result<Vec<Attachment>> {
    attachments_where(c, "a.volume_id = ?1", volume_id)
}

/// The volumes a sandbox has, in the order they were attached.
pub fn of_sandbox(c: &Connection, sandbox_id: &str) -> Result<Vec<Attachment>> {
    attachments_where(c, "a.sandbox_id = ?1", sandbox_id)
}

/// Attaches `owner`'s volume `name` to the sandbox (whose row must exist
/// in this transaction): read-only next to other read-only attachments,
/// read-write only when nobody else has it.
pub fn attach(
    c: &Connection,
    owner: &str,
    sandbox_id: &str,
    name: &str,
    mount: &str,
    read_only: bool,
) -> Result<VolumeRow> {
    let v =
        get(c, owner, name)?.ok_or_else(|| StoreError::NotFound(format!("no volume '{name}'")))?;
    if is_busy(&v.id) {
        return Err(StoreError::Conflict(format!(
            "volume '{name}' is being resized or cloned; try again when that is done"
        )));
    }
    if let Some(e) = v.ephemeral_sandbox.as_deref().filter(|e| *e != sandbox_id) {
        return Err(StoreError::Conflict(format!(
            "volume '{name}' belongs to sandbox {e} (ephemeral)"
        )));
    }
    let others = attachments(c, &v.id)?;
    if let Some(a) = others.iter().find(|a| !read_only || !a.read_only) {
        return Err(StoreError::Conflict(format!(
            "volume '{name}' is attached {} to sandbox '{}'; a volume is either read-write by one sandbox or read-only by any number",
            if a.read_only { "read-only" } else { "read-write" },
            a.sandbox_name
        )));
    }
    let r = c
        .prepare_cached(
            "INSERT INTO volume_attachments (volume_id, sandbox_id, mount, read_only) \
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![v.id, sandbox_id, mount, i64::from(read_only)]);
    if let Err(e) = r {
        return Err(super::unique_as_conflict(e, || {
            format!("volume '{name}' is listed twice")
        }));
    }
    Ok(v)
}

/// Removes a volume's row unless a sandbox has it attached or it is busy
/// ([`StoreError::Conflict`]); returns it (the caller removes its file).
pub fn delete(c: &mut Connection, owner: &str, name: &str) -> Result<VolumeRow> {
    let tx = c.transaction()?;
    let v = get(&tx, owner, name)?
        .ok_or_else(|| StoreError::NotFound(format!("no volume '{name}'")))?;
    check_detached(&tx, &v, "deleted")?;
    tx.execute("DELETE FROM volumes WHERE id = ?1", [&v.id])?;
    tx.commit()?;
    Ok(v)
}

fn check_detached(c: &Connection, v: &VolumeRow, what: &str) -> Result<()> {
    if is_busy(&v.id) {
        return Err(StoreError::Conflict(format!(
            "volume '{}' is being resized or cloned",
            v.name
        )));
    }
    if let Some(a) = attachments(c, &v.id)?.first() {
        return Err(StoreError::Conflict(format!(
            "volume '{}' is attached to sandbox '{}' (at {}); it can be {what} once that sandbox is deleted",
            v.name, a.sandbox_name, a.mount
        )));
    }
    Ok(())
}

/// Removes the rows of the volumes that go with `sandbox_id` (their
/// attachments too); returns them for their files to be removed.
pub fn delete_ephemeral(
    c: &mut Connection,
    owner: &str,
    sandbox_id: &str,
) -> Result<Vec<VolumeRow>> {
    let tx = c.transaction()?;
    let rows: Vec<VolumeRow> = {
        let mut st = tx.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM volumes WHERE owner = ?1 AND ephemeral_sandbox = ?2"
        ))?;
        let r = st.query_map([owner, sandbox_id], row)?;
        r.collect::<rusqlite::Result<_>>()?
    };
    tx.execute(
        "DELETE FROM volumes WHERE owner = ?1 AND ephemeral_sandbox = ?2",
        [owner, sandbox_id],
    )?;
    tx.commit()?;
    Ok(rows)
}

/// Records a new size (after the file grew).
pub fn set_size(c: &Connection, owner: &str, id: &str, size_mb: u64) -> Result<()> {
    c.execute(
        "UPDATE volumes SET size_mb = ?3 WHERE owner = ?1 AND id = ?2",
        params![owner, id, size_mb as i64],
    )?;
    Ok(())
}

/// What a [`claim`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Growing to this many MiB: attached nowhere, within the quota.
    Resize { size_mb: u64, max_bytes: u64 },
    /// Copying it: nobody may write it meanwhile (read-only attachments
    /// are fine).
    CloneSource,
    /// Backing it up: no resize or clone meanwhile; a sandbox that has it
    /// read-write has its vCPUs paused while the copy is taken (the
    /// caller's job: `Engine::save_volume`).
    BackupSource,
    /// Restoring a backup over it: attached nowhere.
    Restore,
}

/// Volumes in the middle of a resize or clone (this process).
static BUSY: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn is_busy(id: &str) -> bool {
    BUSY.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains(id)
}

/// Marks a volume busy until dropped.
#[derive(Debug)]
pub struct Busy(String);

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// Checks that the volume may be resized or cloned now and marks it busy
/// (attaches and deletes are refused until the [`Busy`] is dropped).
pub fn claim(
    c: &mut Connection,
    owner: &str,
    name: &str,
    what: Claim,
) -> Result<(VolumeRow, Busy)> {
    let tx = c.transaction()?;
    let v = get(&tx, owner, name)?
        .ok_or_else(|| StoreError::NotFound(format!("no volume '{name}'")))?;
    match what {
        Claim::Resize { size_mb, max_bytes } => {
            check_detached(&tx, &v, "resized")?;
            check_quota(&tx, owner, size_mb.saturating_sub(v.size_mb), max_bytes)?;
        }
        Claim::Restore => check_detached(&tx, &v, "restored")?,
        Claim::CloneSource | Claim::BackupSource => {
            if is_busy(&v.id) {
                return Err(StoreError::Conflict(format!(
                    "volume '{name}' is being resized, cloned or backed up"
                )));
            }
            if what == Claim::CloneSource {
                if let Some(a) = attachments(&tx, &v.id)?.iter().find(|a| !a.read_only) {
                    return Err(StoreError::Conflict(format!(
                        "volume '{name}' is attached read-write to sandbox '{}'; clone it once that sandbox is deleted (or attach it read-only)",
                        a.sandbox_name
                    )));
                }
            }
        }
    }
    BUSY.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(v.id.clone());
    Ok((v.clone(), Busy(v.id)))
}

#[cfg(test)]
mod tests {
    use super::super::sandboxes::{self, NewSandbox};
    use super::super::testutil::{store, user};
    use super::*;

    fn vol(owner: &str, name: &str, mb: u64) -> NewVolume {
        NewVolume {
            id: new_volume_id(),
            owner: owner.into(),
            name: name.into(),
            size_mb: mb,
            path: format!("/v/{name}.ext4").into(),
            ephemeral_sandbox: None,
        }
    }

    fn sandbox(c: &Connection, owner: &str, name: &str) -> String {
        let id = format!("sb-{name}");
        sandboxes::insert(
            c,
            &NewSandbox {
                id: id.clone(),
                owner: owner.into(),
                name: name.into(),
                spec: serde_json::json!({}),
                status: "creating".into(),
                keep_hot: false,
                labels: Default::default(),
                ip_host: None,
                egress: None,
            },
        )
        .unwrap();
        id
    }

    #[test]
    fn attach_rules_quota_and_delete() {
        let (s, _d) = store();
        s.with(|c| {
            let u = user(c, "ann");
            let other = user(c, "bob");
            insert(c, &vol(&u, "data", 100), 1 << 30)?;
            // Same name: conflict; over the quota: limit.
            assert!(matches!(
                insert(c, &vol(&u, "data", 1), 1 << 30),
                Err(StoreError::Conflict(_))
            ));
            assert!(matches!(
                insert(c, &vol(&u, "big", 1000), 1 << 30),
                Err(StoreError::Limit(_))
            ));
            assert_eq!(used_mb(c, &u)?, 100);
            let (a, b, x) = (
                sandbox(c, &u, "a"),
                sandbox(c, &u, "b"),
                sandbox(c, &u, "x"),
            );
            // Two read-only attachments, then no read-write one.
            attach(c, &u, &a, "data", "/d", true)?;
            attach(c, &u, &b, "data", "/d", true)?;
            assert!(matches!(
                attach(c, &u, &x, "data", "/d", false),
                Err(StoreError::Conflict(_))
            ));
            assert_eq!(attachments(c, &get(c, &u, "data")?.unwrap().id)?.len(), 2);
            // Another user's name is not found.
            assert!(matches!(
                attach(c, &other, &x, "data", "/d", true),
                Err(StoreError::NotFound(_))
            ));
            // Attached: no delete, no resize; a clone is fine (read-only).
            assert!(matches!(
                delete(c, &u, "data"),
                Err(StoreError::Conflict(_))
            ));
            let resize = Claim::Resize {
                size_mb: 200,
                max_bytes: 1 << 30,
            };
            assert!(matches!(
                claim(c, &u, "data", resize),
                Err(StoreError::Conflict(_))
            ));
            {
                let (_, busy) = claim(c, &u, "data", Claim::CloneSource)?;
                // Busy: no attach meanwhile.
                assert!(matches!(
                    attach(c, &u, &x, "data", "/d", true),
                    Err(StoreError::Conflict(_))
                ));
                drop(busy);
            }
            sandboxes::delete(c, &u, &a)?;
            sandboxes::delete(c, &u, &b)?;
            // Detached: read-write by one only.
            attach(c, &u, &x, "data", "/d", false)?;
            sandboxes::delete(c, &u, &x)?;
            let (_, busy) = claim(c, &u, "data", resize)?;
            drop(busy);
            let too_big = Claim::Resize {
                size_mb: 2000,
                max_bytes: 1 << 30,
            };
            assert!(matches!(
                claim(c, &u, "data", too_big),
                Err(StoreError::Limit(_))
            ));
            assert_eq!(delete(c, &u, "data")?.name, "data");
            assert!(get(c, &u, "data")?.is_none());
            // Ephemeral volumes go with their sandbox.
            let e = sandbox(c, &u, "e");
            let mut ev = vol(&u, "sb-e.0", 10);
            ev.ephemeral_sandbox = Some(e.clone());
            insert(c, &ev, 1 << 30)?;
            attach(c, &u, &e, "sb-e.0", "/scratch", false)?;
            assert!(matches!(
                attach(c, &u, &a, "sb-e.0", "/scratch", true),
                Err(StoreError::Conflict(_))
            ));
            sandboxes::delete(c, &u, &e)?;
            assert_eq!(delete_ephemeral(c, &u, &e)?.len(), 1);
            assert!(list(c, &u)?.is_empty());
            Ok(())
        })
        .unwrap();
    }
}
