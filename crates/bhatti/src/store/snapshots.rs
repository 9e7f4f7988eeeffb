//! `snapshots`: named checkpoints of a sandbox, unique by name per owner.
//! A checkpoint outlives the sandbox it was taken from.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{from_json, new_id, now_ms, to_json, unique_as_conflict, Result, StoreError};

/// A stored checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    pub id: String,
    pub owner: String,
    pub name: String,
    /// The sandbox it was taken from (which may since be destroyed).
    pub sandbox_id: String,
    /// Where its files are (JSON chosen by the daemon, e.g. disk, memory and
    /// state paths).
    pub files: serde_json::Value,
    /// The source sandbox's spec, so a resume gets the same shape.
    pub spec: serde_json::Value,
    pub size_bytes: u64,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// What [`insert`] needs.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub owner: String,
    pub name: String,
    pub sandbox_id: String,
    pub files: serde_json::Value,
    pub spec: serde_json::Value,
    pub size_bytes: u64,
}

const COLUMNS: &str = "id, owner, name, sandbox_id, files, spec, size_bytes, created_at";

fn raw(r: &Row<'_>) -> rusqlite::Result<(SnapshotRow, String, String)> {
    Ok((
        SnapshotRow {
            id: r.get(0)?,
            owner: r.get(1)?,
            name: r.get(2)?,
            sandbox_id: r.get(3)?,
            files: serde_json::Value::Null,
            spec: serde_json::Value::Null,
            size_bytes: r.get::<_, i64>(6)?.max(0) as u64,
            created_at: r.get(7)?,
        },
        r.get(4)?,
        r.get(5)?,
    ))
}

fn finish((mut row, files, spec): (SnapshotRow, String, String)) -> Result<SnapshotRow> {
    row.files = from_json("snapshots.files", &files)?;
    row.spec = from_json("snapshots.spec", &spec)?;
    Ok(row)
}

/// Inserts a checkpoint with a fresh id; a name the owner already uses is a
/// [`StoreError::Conflict`].
pub fn insert(c: &Connection, s: &NewSnapshot) -> Result<SnapshotRow> {
    let row = SnapshotRow {
        id: new_id("snap_"),
        owner: s.owner.clone(),
        name: s.name.clone(),
        sandbox_id: s.sandbox_id.clone(),
        files: s.files.clone(),
        spec: s.spec.clone(),
        size_bytes: s.size_bytes,
        created_at: now_ms(),
    };
    c.prepare_cached(&format!(
        "INSERT INTO snapshots ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    ))?
    .execute(params![
        row.id,
        row.owner,
        row.name,
        row.sandbox_id,
        to_json("snapshots.files", &row.files)?,
        to_json("snapshots.spec", &row.spec)?,
        row.size_bytes.min(i64::MAX as u64) as i64,
        row.created_at
    ])
    .map_err(|e| {
        unique_as_conflict(e, || {
            format!("a checkpoint named '{}' already exists", s.name)
        })
    })?;
    Ok(row)
}

/// Records what a finished checkpoint holds (its row was reserved before
/// the work began).
pub fn finish_reserved(
    c: &Connection,
    owner: &str,
    name: &str,
    spec: &serde_json::Value,
    size_bytes: u64,
) -> Result<SnapshotRow> {
    let n = c
        .prepare_cached(
            "UPDATE snapshots SET spec = ?3, size_bytes = ?4 WHERE owner = ?1 AND name = ?2",
        )?
        .execute(params![
            owner,
            name,
            to_json("snapshots.spec", spec)?,
            size_bytes.min(i64::MAX as u64) as i64
        ])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no checkpoint '{name}'")));
    }
    get(c, owner, name)?.ok_or_else(|| StoreError::NotFound(format!("no checkpoint '{name}'")))
}

/// The owner's checkpoint named `name`.
pub fn get(c: &Connection, owner: &str, name: &str) -> Result<Option<SnapshotRow>> {
    let r = c
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM snapshots WHERE owner = ?1 AND name = ?2"
        ))?
        .query_row(params![owner, name], raw)
        .optional()?;
    r.map(finish).transpose()
}

/// The owner's checkpoints, oldest first.
pub fn list(c: &Connection, owner: &str) -> Result<Vec<SnapshotRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM snapshots WHERE owner = ?1 ORDER BY created_at, name"
    ))?;
    let rows = st
        .query_map([owner], raw)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(finish).collect()
}

/// How many checkpoints the owner keeps (for the `max_snapshots` cap).
pub fn count(c: &Connection, owner: &str) -> Result<u32> {
    let n: i64 = c
        .prepare_cached("SELECT COUNT(*) FROM snapshots WHERE owner = ?1")?
        .query_row([owner], |r| r.get(0))?;
    Ok(n as u32)
}

/// Bytes the owner's checkpoints take (reservations included).
pub fn total_bytes(c: &Connection, owner: &str) -> Result<u64> {
    let n: i64 = c
        .prepare_cached("SELECT COALESCE(SUM(size_bytes), 0) FROM snapshots WHERE owner = ?1")?
        .query_row([owner], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

/// Deletes the owner's checkpoint `name` and returns it (so the caller can
/// remove its files); [`StoreError::NotFound`] when absent.
pub fn delete(c: &Connection, owner: &str, name: &str) -> Result<SnapshotRow> {
    let row = get(c, owner, name)?
        .ok_or_else(|| StoreError::NotFound(format!("no checkpoint '{name}'")))?;
    c.prepare_cached("DELETE FROM snapshots WHERE owner = ?1 AND name = ?2")?
        .execute(params![owner, name])?;
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil;

    fn snap(owner: &str, name: &str) -> NewSnapshot {
        NewSnapshot {
            owner: owner.into(),
            name: name.into(),
            sandbox_id: "sb1".into(),
            files: serde_json::json!({"mem": "/x/mem"}),
            spec: serde_json::json!({"cpus": 1}),
            size_bytes: 4096,
        }
    }

    #[test]
    fn unique_per_owner_and_scoped() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let a = testutil::user(c, "alice");
            let b = testutil::user(c, "bob");
            let r = insert(c, &snap(&a, "base"))?;
            assert_eq!(r.size_bytes, 4096);
            let e = insert(c, &snap(&a, "base")).unwrap_err();
            assert!(
                matches!(e, StoreError::Conflict(ref m) if m.contains("base")),
                "{e}"
            );
            insert(c, &snap(&b, "base"))?;
            insert(c, &snap(&a, "second"))?;
            assert_eq!(get(c, &a, "base")?.unwrap().files["mem"], "/x/mem");
            assert_eq!(list(c, &a)?.len(), 2);
            assert_eq!(count(c, &b)?, 1);
            assert!(get(c, &b, "second")?.is_none());
            assert!(matches!(
                delete(c, &b, "second"),
                Err(StoreError::NotFound(_))
            ));
            assert_eq!(delete(c, &a, "second")?.name, "second");
            assert_eq!(count(c, &a)?, 1);
            Ok(())
        })
        .unwrap();
    }
}
