//! `secrets`: a user's named secrets, stored only as age ciphertext (see
//! [`crate::secrets`]). Listing returns names and timestamps, never values.

use rusqlite::{params, Connection, OptionalExtension};

use super::{now_ms, Result, StoreError};

/// A secret's name and timestamps (no value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMeta {
    pub name: String,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

/// Creates or replaces the owner's secret `name`; returns true when it is new.
pub fn upsert(c: &Connection, owner: &str, name: &str, ciphertext: &[u8]) -> Result<bool> {
    let now = now_ms();
    let existed: bool = c
        .prepare_cached("SELECT 1 FROM secrets WHERE owner = ?1 AND name = ?2")?
        .query_row(params![owner, name], |_| Ok(()))
        .optional()?
        .is_some();
    c.prepare_cached(
        "INSERT INTO secrets (owner, name, ciphertext, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT (owner, name) DO UPDATE SET ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
    )?
    .execute(params![owner, name, ciphertext, now])?;
    Ok(!existed)
}

/// The owner's secrets' names and timestamps, by name.
pub fn list(c: &Connection, owner: &str) -> Result<Vec<SecretMeta>> {
    let mut st = c.prepare_cached(
        "SELECT name, created_at, updated_at FROM secrets WHERE owner = ?1 ORDER BY name",
    )?;
    let rows = st.query_map([owner], |r| {
        Ok(SecretMeta {
            name: r.get(0)?,
            created_at: r.get(1)?,
            updated_at: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The ciphertext of the owner's secret `name` (for injection into a
/// sandbox's environment; never for an API response).
pub fn ciphertext(c: &Connection, owner: &str, name: &str) -> Result<Option<Vec<u8>>> {
    Ok(
        c.prepare_cached("SELECT ciphertext FROM secrets WHERE owner = ?1 AND name = ?2")?
            .query_row(params![owner, name], |r| r.get(0))
            .optional()?,
    )
}

/// Deletes the owner's secret `name`; [`StoreError::NotFound`] when absent.
pub fn delete(c: &Connection, owner: &str, name: &str) -> Result<()> {
    let n = c
        .prepare_cached("DELETE FROM secrets WHERE owner = ?1 AND name = ?2")?
        .execute(params![owner, name])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no secret '{name}'")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil;

    #[test]
    fn upsert_list_delete_scoped() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let a = testutil::user(c, "alice");
            let b = testutil::user(c, "bob");
            assert!(upsert(c, &a, "TOKEN", b"ct1")?);
            assert!(!upsert(c, &a, "TOKEN", b"ct2")?);
            assert!(upsert(c, &b, "TOKEN", b"bob")?);
            assert_eq!(ciphertext(c, &a, "TOKEN")?.unwrap(), b"ct2");
            assert_eq!(ciphertext(c, &b, "TOKEN")?.unwrap(), b"bob");
            assert!(ciphertext(c, &b, "OTHER")?.is_none());
            let l = list(c, &a)?;
            assert_eq!(l.len(), 1);
            assert!(l[0].updated_at >= l[0].created_at);
            delete(c, &a, "TOKEN")?;
            assert!(matches!(
                delete(c, &a, "TOKEN"),
                Err(StoreError::NotFound(_))
            ));
            assert_eq!(list(c, &b)?.len(), 1);
            Ok(())
        })
        .unwrap();
    }
}
