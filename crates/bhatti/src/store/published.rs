//! `published_ports`: a sandbox's ports published under a public alias.
//! Aliases are unique across all users (they are host names); a port is
//! published at most once per sandbox. Rows go with their sandbox (and
//! user) by foreign key.

use rusqlite::{params, Connection, OptionalExtension};

use super::{new_id, now_ms, Result, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: String,
    pub owner: String,
    pub sandbox_id: String,
    pub port: u16,
    pub alias: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

const COLUMNS: &str = "id, owner, sandbox_id, port, alias, created_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Published> {
    Ok(Published {
        id: r.get(0)?,
        owner: r.get(1)?,
        sandbox_id: r.get(2)?,
        port: r.get(3)?,
        alias: r.get(4)?,
        created_at: r.get(5)?,
    })
}

/// Publishes `port` of the owner's sandbox as `alias`, unless the owner
/// already has `max_per_user` published ports ([`StoreError::Limit`]), the
/// port is already published ([`StoreError::Conflict`]) or the alias is
/// taken by anyone ([`StoreError::Conflict`]). One transaction.
pub fn insert(
    c: &mut Connection,
    owner: &str,
    sandbox_id: &str,
    port: u16,
    alias: &str,
    max_per_user: u32,
) -> Result<Published> {
    let tx = c.transaction()?;
    let have: u32 = tx
        .prepare_cached("SELECT COUNT(*) FROM published_ports WHERE owner = ?1")?
        .query_row([owner], |r| r.get(0))?;
    if have >= max_per_user {
        return Err(StoreError::Limit(format!(
            "at most {max_per_user} published ports per user"
        )));
    }
    let p = Published {
        id: new_id("pub-"),
        owner: owner.to_owned(),
        sandbox_id: sandbox_id.to_owned(),
        port,
        alias: alias.to_owned(),
        created_at: now_ms(),
    };
    let r = tx
        .prepare_cached(&format!(
            "INSERT INTO published_ports ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
        ))?
        .execute(params![
            p.id,
            p.owner,
            p.sandbox_id,
            p.port,
            p.alias,
            p.created_at
        ]);
    if let Err(e) = r {
        let msg = e.to_string();
        return Err(super::unique_as_conflict(e, || {
            if msg.contains("alias") {
                format!("the alias '{alias}' is taken")
            } else {
                format!("port {port} is already published")
            }
        }));
    }
    tx.commit()?;
    Ok(p)
}

/// A sandbox's published ports, by port.
pub fn list_for_sandbox(c: &Connection, owner: &str, sandbox_id: &str) -> Result<Vec<Published>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM published_ports WHERE owner = ?1 AND sandbox_id = ?2 ORDER BY port"
    ))?;
    let rows = st.query_map(params![owner, sandbox_id], row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// All of the owner's published ports, by sandbox then port.
pub fn list_for_owner(c: &Connection, owner: &str) -> Result<Vec<Published>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM published_ports WHERE owner = ?1 ORDER BY sandbox_id, port"
    ))?;
    let rows = st.query_map([owner], row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The published port of an alias (any owner: the public listener's lookup).
pub fn by_alias(c: &Connection, alias: &str) -> Result<Option<Published>> {
    Ok(c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM published_ports WHERE alias = ?1"
    ))?
    .query_row([alias], row)
    .optional()?)
}

/// Unpublishes a port; [`StoreError::NotFound`] when it was not published.
pub fn delete(c: &Connection, owner: &str, sandbox_id: &str, port: u16) -> Result<Published> {
    let p = c
        .prepare_cached(&format!(
            "DELETE FROM published_ports WHERE owner = ?1 AND sandbox_id = ?2 AND port = ?3
             RETURNING {COLUMNS}"
        ))?
        .query_row(params![owner, sandbox_id, port], row)
        .optional()?;
    p.ok_or_else(|| StoreError::NotFound(format!("port {port} is not published")))
}

/// Renames the aliases that were derived from a sandbox's old name
/// (`<old>-<port>`) to the new name, where the new alias is free; others
/// keep theirs. Returns the rows changed.
pub fn follow_rename(
    c: &mut Connection,
    owner: &str,
    sandbox_id: &str,
    derive: impl Fn(u16) -> (String, String),
) -> Result<Vec<Published>> {
    let tx = c.transaction()?;
    let mut changed = Vec::new();
    for p in list_for_sandbox(&tx, owner, sandbox_id)? {
        let (old, new) = derive(p.port);
        if p.alias != old || old == new {
            continue;
        }
        let n = tx
            .prepare_cached(
                "UPDATE published_ports SET alias = ?1 WHERE id = ?2
                 AND NOT EXISTS (SELECT 1 FROM published_ports WHERE alias = ?1)",
            )?
            .execute(params![new, p.id])?;
        if n == 1 {
            changed.push(Published { alias: new, ..p });
        }
    }
    tx.commit()?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sandboxes::{self, NewSandbox};
    use crate::store::testutil;

    #[test]
    fn publish_lookup_unpublish() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let alice = testutil::user(c, "alice");
            let bob = testutil::user(c, "bob");
            sandboxes::insert(c, &NewSandbox::new("sb-a", &alice, "web"))?;
            sandboxes::insert(c, &NewSandbox::new("sb-b", &bob, "api"))?;
            let p = insert(c, &alice, "sb-a", 8000, "web-8000", 3)?;
            assert_eq!(by_alias(c, "web-8000")?, Some(p.clone()));
            // The same port twice, or another user's alias: conflicts.
            assert!(matches!(
                insert(c, &alice, "sb-a", 8000, "other", 3),
                Err(StoreError::Conflict(m)) if m.contains("already published")
            ));
            assert!(matches!(
                insert(c, &bob, "sb-b", 9000, "web-8000", 3),
                Err(StoreError::Conflict(m)) if m.contains("taken")
            ));
            insert(c, &alice, "sb-a", 8001, "b", 3)?;
            insert(c, &alice, "sb-a", 8002, "c", 3)?;
            assert!(matches!(
                insert(c, &alice, "sb-a", 8003, "d", 3),
                Err(StoreError::Limit(_))
            ));
            assert_eq!(list_for_sandbox(c, &alice, "sb-a")?.len(), 3);
            assert!(list_for_sandbox(c, &bob, "sb-a")?.is_empty());
            assert_eq!(list_for_owner(c, &alice)?.len(), 3);
            // Bob cannot unpublish Alice's port.
            assert!(matches!(
                delete(c, &bob, "sb-a", 8000),
                Err(StoreError::NotFound(_))
            ));
            assert_eq!(delete(c, &alice, "sb-a", 8000)?.alias, "web-8000");
            assert_eq!(by_alias(c, "web-8000")?, None);
            // Rows go with their sandbox.
            sandboxes::delete(c, &alice, "sb-a")?;
            assert!(list_for_owner(c, &alice)?.is_empty());
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn derived_aliases_follow_a_rename() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let alice = testutil::user(c, "alice");
            sandboxes::insert(c, &NewSandbox::new("sb-a", &alice, "web"))?;
            insert(c, &alice, "sb-a", 8000, "web-8000", 9)?;
            insert(c, &alice, "sb-a", 8001, "custom", 9)?;
            let changed = follow_rename(c, &alice, "sb-a", |port| {
                (format!("web-{port}"), format!("site-{port}"))
            })?;
            assert_eq!(changed.len(), 1);
            assert!(by_alias(c, "site-8000")?.is_some());
            assert!(by_alias(c, "custom")?.is_some());
            assert!(by_alias(c, "web-8000")?.is_none());
            Ok(())
        })
        .unwrap();
    }
}
