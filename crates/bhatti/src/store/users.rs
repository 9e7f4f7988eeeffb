//! `users`: API users, each with the SHA-256 of their key (never the key) and
//! optional caps overriding the config's `[limits]` defaults.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{new_id, now_ms, unique_as_conflict, Result, StoreError};

/// Per-user caps; `None` means the config's default applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserCaps {
    pub max_sandboxes: Option<u32>,
    pub max_cpus: Option<u32>,
    pub max_memory_mb: Option<u32>,
    pub max_snapshots: Option<u32>,
}

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub name: String,
    /// Lower-case hex SHA-256 of the API key.
    pub key_sha256: String,
    pub caps: UserCaps,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Which /24 of the network pool is theirs (unique; assigned at creation).
    pub net_index: u32,
    /// Their sandboxes cannot reach each other; `None`: the config's default.
    pub net_isolated: Option<bool>,
}

/// What [`insert`] needs.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub name: String,
    pub key_sha256: String,
    pub caps: UserCaps,
}

const COLUMNS: &str = "id, name, key_sha256, max_sandboxes, max_cpus, max_memory_mb, max_snapshots, created_at, net_index, net_isolated";

fn cap(v: Option<i64>) -> Option<u32> {
    v.map(|n| n.clamp(0, u32::MAX as i64) as u32)
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        name: r.get(1)?,
        key_sha256: r.get(2)?,
        caps: UserCaps {
            max_sandboxes: cap(r.get(3)?),
            max_cpus: cap(r.get(4)?),
            max_memory_mb: cap(r.get(5)?),
            max_snapshots: cap(r.get(6)?),
        },
        created_at: r.get(7)?,
        net_index: r
            .get::<_, Option<i64>>(8)?
            .unwrap_or(0)
            .clamp(0, u32::MAX as i64) as u32,
        net_isolated: r.get(9)?,
    })
}

/// The smallest subnet index no user has (indexes of deleted users are
/// reused).
pub fn free_net_index(c: &Connection) -> Result<u32> {
    let n: i64 = c
        .prepare_cached(
            "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM users WHERE net_index = 0) THEN 0
             ELSE (SELECT MIN(net_index) + 1 FROM users AS u WHERE net_index IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM users AS v WHERE v.net_index = u.net_index + 1))
             END",
        )?
        .query_row([], |r| r.get(0))?;
    Ok(n.clamp(0, u32::MAX as i64) as u32)
}

/// Inserts a user with a fresh id. A taken name (or key hash) is a
/// [`StoreError::Conflict`].
pub fn insert(c: &Connection, u: &NewUser) -> Result<User> {
    let user = User {
        id: new_id("u_"),
        name: u.name.clone(),
        key_sha256: u.key_sha256.clone(),
        caps: u.caps,
        created_at: now_ms(),
        net_index: free_net_index(c)?,
        net_isolated: None,
    };
    c.prepare_cached(&format!(
        "INSERT INTO users ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
    ))?
    .execute(params![
        user.id,
        user.name,
        user.key_sha256,
        user.caps.max_sandboxes,
        user.caps.max_cpus,
        user.caps.max_memory_mb,
        user.caps.max_snapshots,
        user.created_at,
        user.net_index,
        user.net_isolated
    ])
    .map_err(|e| unique_as_conflict(e, || format!("a user named '{}' already exists", u.name)))?;
    Ok(user)
}

/// The user whose key hashes to `key_sha256`.
pub fn get_by_key_hash(c: &Connection, key_sha256: &str) -> Result<Option<User>> {
    Ok(c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM users WHERE key_sha256 = ?1"
    ))?
    .query_row([key_sha256], from_row)
    .optional()?)
}

pub fn get_by_name(c: &Connection, name: &str) -> Result<Option<User>> {
    Ok(
        c.prepare_cached(&format!("SELECT {COLUMNS} FROM users WHERE name = ?1"))?
            .query_row([name], from_row)
            .optional()?,
    )
}

pub fn get(c: &Connection, id: &str) -> Result<Option<User>> {
    Ok(
        c.prepare_cached(&format!("SELECT {COLUMNS} FROM users WHERE id = ?1"))?
            .query_row([id], from_row)
            .optional()?,
    )
}

/// All users, by name.
pub fn list(c: &Connection) -> Result<Vec<User>> {
    let mut st = c.prepare_cached(&format!("SELECT {COLUMNS} FROM users ORDER BY name"))?;
    let rows = st.query_map([], from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Replaces a user's key hash (key rotation).
pub fn set_key_hash(c: &Connection, name: &str, key_sha256: &str) -> Result<()> {
    let n = c
        .prepare_cached("UPDATE users SET key_sha256 = ?2 WHERE name = ?1")?
        .execute(params![name, key_sha256])
        .map_err(|e| unique_as_conflict(e, || "that key is already in use".into()))?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no user named '{name}'")));
    }
    Ok(())
}

/// Replaces a user's caps.
pub fn set_caps(c: &Connection, name: &str, caps: &UserCaps) -> Result<()> {
    let n = c
        .prepare_cached(
            "UPDATE users SET max_sandboxes = ?2, max_cpus = ?3, max_memory_mb = ?4, max_snapshots = ?5 WHERE name = ?1",
        )?
        .execute(params![name, caps.max_sandboxes, caps.max_cpus, caps.max_memory_mb, caps.max_snapshots])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no user named '{name}'")));
    }
    Ok(())
}

/// Sets whether a user's sandboxes are isolated from each other (`None`:
/// the config's default).
pub fn set_net_isolated(c: &Connection, name: &str, isolated: Option<bool>) -> Result<User> {
    let n = c
        .prepare_cached("UPDATE users SET net_isolated = ?2 WHERE name = ?1")?
        .execute(params![name, isolated])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no user named '{name}'")));
    }
    get_by_name(c, name)?.ok_or_else(|| StoreError::NotFound(format!("no user named '{name}'")))
}

/// Deletes a user and their secrets. Refused with [`StoreError::Conflict`]
/// while the user still has sandboxes or checkpoints: those own VMs and files,
/// which the daemon must destroy first.
pub fn delete(c: &Connection, name: &str) -> Result<()> {
    let Some(u) = get_by_name(c, name)? else {
        return Err(StoreError::NotFound(format!("no user named '{name}'")));
    };
    let sandboxes: i64 = c.query_row(
        "SELECT COUNT(*) FROM sandboxes WHERE owner = ?1",
        [&u.id],
        |r| r.get(0),
    )?;
    let snapshots: i64 = c.query_row(
        "SELECT COUNT(*) FROM snapshots WHERE owner = ?1",
        [&u.id],
        |r| r.get(0),
    )?;
    if sandboxes > 0 || snapshots > 0 {
        return Err(StoreError::Conflict(format!(
            "user '{name}' still has {sandboxes} sandbox(es) and {snapshots} checkpoint(s); destroy them first"
        )));
    }
    c.prepare_cached("DELETE FROM users WHERE id = ?1")?
        .execute([&u.id])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil;

    fn new(name: &str, hash: &str) -> NewUser {
        NewUser {
            name: name.into(),
            key_sha256: hash.into(),
            caps: UserCaps::default(),
        }
    }

    #[test]
    fn crud_and_conflicts() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let a = insert(c, &new("alice", "h1"))?;
            assert!(a.id.starts_with("u_"));
            let e = insert(c, &new("alice", "h2")).unwrap_err();
            assert!(
                matches!(e, StoreError::Conflict(ref m) if m.contains("alice")),
                "{e}"
            );
            let e = insert(c, &new("bob", "h1")).unwrap_err();
            assert!(matches!(e, StoreError::Conflict(_)), "{e}");
            let b = insert(
                c,
                &NewUser {
                    caps: UserCaps {
                        max_sandboxes: Some(2),
                        max_cpus: Some(1),
                        ..Default::default()
                    },
                    ..new("bob", "h2")
                },
            )?;
            assert_eq!(get_by_key_hash(c, "h2")?.unwrap(), b);
            assert_eq!(get(c, &a.id)?.unwrap().name, "alice");
            assert!(get_by_key_hash(c, "nope")?.is_none());
            assert_eq!(
                list(c)?.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
                ["alice", "bob"]
            );

            set_key_hash(c, "alice", "h3")?;
            assert!(get_by_key_hash(c, "h1")?.is_none());
            assert!(matches!(
                set_key_hash(c, "bob", "h3"),
                Err(StoreError::Conflict(_))
            ));
            assert!(matches!(
                set_key_hash(c, "zed", "h9"),
                Err(StoreError::NotFound(_))
            ));

            set_caps(
                c,
                "alice",
                &UserCaps {
                    max_memory_mb: Some(256),
                    ..Default::default()
                },
            )?;
            assert_eq!(
                get_by_name(c, "alice")?.unwrap().caps.max_memory_mb,
                Some(256)
            );

            // Subnet indexes: unique, the smallest free one, reused.
            assert_eq!((a.net_index, b.net_index), (0, 1));
            let carol = insert(c, &new("carol", "h4"))?;
            assert_eq!(carol.net_index, 2);
            assert_eq!(
                set_net_isolated(c, "carol", Some(true))?.net_isolated,
                Some(true)
            );

            delete(c, "bob")?;
            assert!(get_by_name(c, "bob")?.is_none());
            assert_eq!(insert(c, &new("dave", "h5"))?.net_index, 1);
            assert!(matches!(delete(c, "bob"), Err(StoreError::NotFound(_))));
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn delete_refused_while_sandboxes_exist() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let id = testutil::user(c, "alice");
            crate::store::sandboxes::insert(
                c,
                &crate::store::sandboxes::NewSandbox::new("sb1", &id, "web"),
            )?;
            crate::store::secrets::upsert(c, &id, "TOKEN", b"x")?;
            let e = delete(c, "alice").unwrap_err();
            assert!(
                matches!(e, StoreError::Conflict(ref m) if m.contains("destroy")),
                "{e}"
            );
            crate::store::sandboxes::delete(c, &id, "sb1")?;
            delete(c, "alice")?;
            // Secrets went with the user.
            let n: i64 = c.query_row("SELECT COUNT(*) FROM secrets", [], |r| r.get(0))?;
            assert_eq!(n, 0);
            Ok(())
        })
        .unwrap();
    }
}
