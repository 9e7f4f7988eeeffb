//! `images`: the catalogue. A row is an ext4 disk sandboxes can be created
//! from, owned by a user (names unique per owner) or shared (owner NULL,
//! from the daemon's config). Lookups by name look at the caller's images
//! first, then the shared ones; a registry reference matches the
//! `reference` column the same way.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{from_json, new_id, now_ms, to_json, unique_as_conflict, Result, StoreError};
use crate::image::ImageConfig;

/// A stored image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRow {
    pub id: String,
    /// `None`: a shared image.
    pub owner: Option<String>,
    pub name: String,
    /// `pull`, `import`, `save` or `shared`.
    pub source: String,
    pub reference: Option<String>,
    pub digest: Option<String>,
    /// The ext4 disk.
    pub path: String,
    pub size_bytes: u64,
    pub config: ImageConfig,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// What [`insert`] needs.
#[derive(Debug, Clone)]
pub struct NewImage {
    /// A fresh id (the disk's file name carries it, so it is made first).
    pub id: String,
    pub owner: Option<String>,
    pub name: String,
    pub source: String,
    pub reference: Option<String>,
    pub digest: Option<String>,
    pub path: String,
    pub size_bytes: u64,
    pub config: ImageConfig,
}

/// A user's image allowance.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub max_count: u32,
    pub max_bytes: u64,
}

/// A fresh image id.
pub fn new_image_id() -> String {
    new_id("img_")
}

const COLUMNS: &str =
    "id, owner, name, source, reference, digest, path, size_bytes, config, created_at";

fn raw(r: &Row<'_>) -> rusqlite::Result<(ImageRow, String)> {
    Ok((
        ImageRow {
            id: r.get(0)?,
            owner: r.get(1)?,
            name: r.get(2)?,
            source: r.get(3)?,
            reference: r.get(4)?,
            digest: r.get(5)?,
            path: r.get(6)?,
            size_bytes: r.get::<_, i64>(7)?.max(0) as u64,
            config: ImageConfig::default(),
            created_at: r.get(9)?,
        },
        r.get(8)?,
    ))
}

fn finish((mut row, config): (ImageRow, String)) -> Result<ImageRow> {
    row.config = from_json("images.config", &config)?;
    Ok(row)
}

fn query(c: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<Vec<ImageRow>> {
    let mut stmt = c.prepare_cached(sql)?;
    let rows = stmt.query_map(p, raw)?;
    rows.map(|r| finish(r?)).collect()
}

/// The owner's image `name` (not a shared one).
pub fn get_own(c: &Connection, owner: &str, name: &str) -> Result<Option<ImageRow>> {
    c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM images WHERE owner = ?1 AND name = ?2"
    ))?
    .query_row(params![owner, name], raw)
    .optional()?
    .map(finish)
    .transpose()
}

/// The shared image `name`.
pub fn get_shared(c: &Connection, name: &str) -> Result<Option<ImageRow>> {
    c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM images WHERE owner IS NULL AND name = ?1"
    ))?
    .query_row(params![name], raw)
    .optional()?
    .map(finish)
    .transpose()
}

/// What `image` names for `owner`: their image of that name, a shared one,
/// then (newest first) their or a shared image pulled from that reference.
pub fn resolve(c: &Connection, owner: &str, image: &str) -> Result<Option<ImageRow>> {
    if let Some(r) = get_own(c, owner, image)? {
        return Ok(Some(r));
    }
    if let Some(r) = get_shared(c, image)? {
        return Ok(Some(r));
    }
    Ok(query(
        c,
        &format!(
            "SELECT {COLUMNS} FROM images WHERE (owner = ?1 OR owner IS NULL) AND reference = ?2
             ORDER BY owner IS NULL, created_at DESC LIMIT 1"
        ),
        params![owner, image],
    )?
    .pop())
}

/// The owner's images and the shared ones, shared first, then by name.
pub fn list(c: &Connection, owner: &str) -> Result<Vec<ImageRow>> {
    query(
        c,
        &format!(
            "SELECT {COLUMNS} FROM images WHERE owner = ?1 OR owner IS NULL
             ORDER BY owner IS NOT NULL, name"
        ),
        params![owner],
    )
}

/// Every row (the start-up sweep of disks nobody records).
pub fn all(c: &Connection) -> Result<Vec<ImageRow>> {
    query(c, &format!("SELECT {COLUMNS} FROM images"), [])
}

/// Inserts a user's image within `quota`, replacing the owner's image of
/// the same name (`replace`: its id) if there is one; the replaced row is
/// returned so its disk can go. Count and bytes are checked in the same
/// transaction as the insert ([`StoreError::Limit`]); a name taken by
/// another image meanwhile is a [`StoreError::Conflict`].
pub fn insert(
    tx: &rusqlite::Transaction<'_>,
    new: &NewImage,
    quota: Option<Quota>,
    replace: Option<&str>,
) -> Result<(ImageRow, Option<ImageRow>)> {
    let old = match (&new.owner, replace) {
        (Some(owner), Some(old_id)) => {
            let old = get_own(tx, owner, &new.name)?.filter(|r| r.id == old_id);
            if old.is_none() {
                return Err(StoreError::Conflict(format!(
                    "the image '{}' changed while this one was being made; try again",
                    new.name
                )));
            }
            tx.prepare_cached("DELETE FROM images WHERE id = ?1")?
                .execute(params![old_id])?;
            old
        }
        _ => None,
    };
    if let (Some(owner), Some(q)) = (&new.owner, quota) {
        let (count, bytes): (i64, i64) = tx
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM images WHERE owner = ?1",
            )?
            .query_row(params![owner], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if count.max(0) as u64 >= u64::from(q.max_count) {
            return Err(StoreError::Limit(format!(
                "image limit reached: at most {} images per user; delete one first",
                q.max_count
            )));
        }
        let total = (bytes.max(0) as u64).saturating_add(new.size_bytes);
        if total > q.max_bytes {
            return Err(StoreError::Limit(format!(
                "image space limit reached: this image ({} bytes) would make {total} of at most {} bytes per user; delete an image first",
                new.size_bytes, q.max_bytes
            )));
        }
    }
    let row = ImageRow {
        id: new.id.clone(),
        owner: new.owner.clone(),
        name: new.name.clone(),
        source: new.source.clone(),
        reference: new.reference.clone(),
        digest: new.digest.clone(),
        path: new.path.clone(),
        size_bytes: new.size_bytes,
        config: new.config.clone(),
        created_at: now_ms(),
    };
    tx.prepare_cached(&format!(
        "INSERT INTO images ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
    ))?
    .execute(params![
        row.id,
        row.owner,
        row.name,
        row.source,
        row.reference,
        row.digest,
        row.path,
        row.size_bytes.min(i64::MAX as u64) as i64,
        to_json("images.config", &row.config)?,
        row.created_at
    ])
    .map_err(|e| unique_as_conflict(e, || format!("an image named '{}' exists", new.name)))?;
    Ok((row, old))
}

/// Records a shared image (config's `[images] shared` and the `[vm]
/// rootfs`), keeping its row when the path is unchanged.
pub fn upsert_shared(c: &Connection, name: &str, path: &str, size_bytes: u64) -> Result<()> {
    let size = size_bytes.min(i64::MAX as u64) as i64;
    let n = c
        .prepare_cached(
            "UPDATE images SET path = ?2, size_bytes = ?3 WHERE owner IS NULL AND name = ?1",
        )?
        .execute(params![name, path, size])?;
    if n == 0 {
        c.prepare_cached(&format!(
            "INSERT INTO images ({COLUMNS}) VALUES (?1, NULL, ?2, 'shared', NULL, NULL, ?3, ?4, '{{}}', ?5)"
        ))?
        .execute(params![new_image_id(), name, path, size, now_ms()])?;
    }
    Ok(())
}

/// Removes shared rows whose names the config no longer lists.
pub fn retain_shared(c: &Connection, keep: &[String]) -> Result<()> {
    let names: Vec<String> = query(
        c,
        &format!("SELECT {COLUMNS} FROM images WHERE owner IS NULL"),
        [],
    )?
    .into_iter()
    .map(|r| r.name)
    .filter(|n| !keep.contains(n))
    .collect();
    for n in names {
        c.prepare_cached("DELETE FROM images WHERE owner IS NULL AND name = ?1")?
            .execute(params![n])?;
    }
    Ok(())
}

/// Deletes the owner's image `name` and returns its row (its disk is the
/// caller's to remove). A shared image is refused (403 by the API: it
/// checks [`get_shared`] first); an image a template of the owner uses is a
/// [`StoreError::Conflict`].
pub fn delete(c: &Connection, owner: &str, name: &str) -> Result<ImageRow> {
    let Some(row) = get_own(c, owner, name)? else {
        return Err(StoreError::NotFound(format!("no image '{name}'")));
    };
    let used: Option<String> = c
        .prepare_cached("SELECT name FROM templates WHERE owner = ?1 AND image = ?2 LIMIT 1")?
        .query_row(params![owner, name], |r| r.get(0))
        .optional()?;
    if let Some(t) = used {
        return Err(StoreError::Conflict(format!(
            "the image '{name}' is used by the template '{t}'; delete the template first"
        )));
    }
    c.prepare_cached("DELETE FROM images WHERE id = ?1")?
        .execute(params![row.id])?;
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil;

    fn new(owner: Option<&str>, name: &str, size: u64) -> NewImage {
        NewImage {
            id: new_image_id(),
            owner: owner.map(str::to_owned),
            name: name.into(),
            source: "pull".into(),
            reference: Some(format!("reg/{name}")),
            digest: Some("sha256:00".into()),
            path: format!("/x/{name}.ext4"),
            size_bytes: size,
            config: ImageConfig {
                env: vec!["A=1".into()],
                ..Default::default()
            },
        }
    }

    #[test]
    fn insert_resolve_list_delete_with_quota_and_templates() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let a = testutil::user(c, "alice");
            let b = testutil::user(c, "bob");
            let q = Some(Quota {
                max_count: 2,
                max_bytes: 100,
            });
            let tx = c.transaction()?;
            let (py, old) = insert(&tx, &new(Some(&a), "py:3", 40), q, None)?;
            assert!(old.is_none());
            assert_eq!(py.config.env, ["A=1"]);
            // Too big for the bytes left.
            let e = insert(&tx, &new(Some(&a), "big", 61), q, None).unwrap_err();
            assert!(matches!(e, StoreError::Limit(_)), "{e}");
            insert(&tx, &new(Some(&a), "small", 60), q, None)?;
            let e = insert(&tx, &new(Some(&a), "third", 0), q, None).unwrap_err();
            assert!(matches!(e, StoreError::Limit(_)), "{e}");
            // A name is per owner; a duplicate is a conflict.
            insert(&tx, &new(Some(&b), "py:3", 1), q, None)?;
            let e = insert(&tx, &new(Some(&b), "py:3", 1), q, None).unwrap_err();
            assert!(matches!(e, StoreError::Conflict(_)), "{e}");
            // Replacing frees the old row's bytes and count.
            let (py2, old) = insert(&tx, &new(Some(&a), "py:3", 40), q, Some(&py.id))?;
            assert_eq!(old.map(|o| o.id), Some(py.id.clone()));
            tx.commit()?;

            upsert_shared(c, "minimal", "/img/rootfs.ext4", 10)?;
            upsert_shared(c, "minimal", "/img/rootfs2.ext4", 11)?;
            upsert_shared(c, "dev", "/img/dev.ext4", 12)?;
            assert_eq!(get_shared(c, "minimal")?.unwrap().path, "/img/rootfs2.ext4");
            assert_eq!(resolve(c, &a, "py:3")?.unwrap().id, py2.id);
            assert_eq!(resolve(c, &a, "reg/small")?.unwrap().name, "small");
            assert_eq!(resolve(c, &a, "dev")?.unwrap().owner, None);
            assert!(resolve(c, &b, "small")?.is_none());
            let names: Vec<_> = list(c, &a)?.into_iter().map(|r| r.name).collect();
            assert_eq!(names, ["dev", "minimal", "py:3", "small"]);
            retain_shared(c, &["minimal".into()])?;
            assert!(get_shared(c, "dev")?.is_none());

            c.execute(
                "INSERT INTO templates (id, owner, name, image, spec, created_at) VALUES ('t1', ?1, 'web', 'py:3', '{}', 0)",
                params![a],
            )?;
            let e = delete(c, &a, "py:3").unwrap_err();
            assert!(matches!(e, StoreError::Conflict(_)), "{e}");
            assert!(matches!(
                delete(c, &a, "minimal").unwrap_err(),
                StoreError::NotFound(_)
            ));
            assert_eq!(delete(c, &a, "small")?.name, "small");
            assert!(delete(c, &b, "py:3").is_ok());
            Ok(())
        })
        .unwrap();
    }
}
