//! `sandboxes`: one row per sandbox a user owns. Names are unique per owner.
//! Every query takes the owner; only [`list_all`] (daemon recovery) does not.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{from_json, now_ms, to_json, unique_as_conflict, Result, StoreError};
use crate::net::egress::EgressPolicy;

/// Host numbers a sandbox may have in its owner's /24 (`.1` is the gateway,
/// `.254` is kept for template builds: `prebooted::BUILDER_HOST`).
pub const FIRST_HOST: u8 = 2;
pub const LAST_HOST: u8 = 253;

/// A stored sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub id: String,
    /// The owner's user id.
    pub owner: String,
    pub name: String,
    /// The create request as the daemon resolved it (JSON; never secret values).
    pub spec: serde_json::Value,
    /// Lifecycle status as the daemon names it (e.g. `running`, `stopped`).
    pub status: String,
    pub keep_hot: bool,
    pub labels: BTreeMap<String, String>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// Its address's host number in the owner's /24; `None`: no network.
    pub ip_host: Option<u8>,
    /// Its egress policy; `None`: the config's default.
    pub egress: Option<EgressPolicy>,
}

/// What [`insert`] needs.
#[derive(Debug, Clone)]
pub struct NewSandbox {
    pub id: String,
    pub owner: String,
    pub name: String,
    pub spec: serde_json::Value,
    pub status: String,
    pub keep_hot: bool,
    pub labels: BTreeMap<String, String>,
    pub ip_host: Option<u8>,
    pub egress: Option<EgressPolicy>,
}

impl NewSandbox {
    /// A sandbox with an empty spec, status `creating`, no labels.
    pub fn new(id: &str, owner: &str, name: &str) -> NewSandbox {
        NewSandbox {
            id: id.into(),
            owner: owner.into(),
            name: name.into(),
            spec: serde_json::json!({}),
            status: "creating".into(),
            keep_hot: false,
            labels: BTreeMap::new(),
            ip_host: None,
            egress: None,
        }
    }
}

/// Fields [`update`] may change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct SandboxUpdate {
    pub status: Option<String>,
    pub keep_hot: Option<bool>,
    pub labels: Option<BTreeMap<String, String>>,
    pub spec: Option<serde_json::Value>,
    /// A new name (unique per owner).
    pub name: Option<String>,
    pub egress: Option<EgressPolicy>,
}

const COLUMNS: &str =
    "id, owner, name, spec, status, keep_hot, labels, created_at, updated_at, ip_host, egress";

struct Raw {
    row: SandboxRow,
    spec: String,
    labels: String,
    egress: Option<String>,
}

fn raw(r: &Row<'_>) -> rusqlite::Result<Raw> {
    Ok(Raw {
        row: SandboxRow {
            id: r.get(0)?,
            owner: r.get(1)?,
            name: r.get(2)?,
            spec: serde_json::Value::Null,
            status: r.get(4)?,
            keep_hot: r.get(5)?,
            labels: BTreeMap::new(),
            created_at: r.get(7)?,
            updated_at: r.get(8)?,
            ip_host: r
                .get::<_, Option<i64>>(9)?
                .and_then(|h| u8::try_from(h).ok()),
            egress: None,
        },
        spec: r.get(3)?,
        labels: r.get(6)?,
        egress: r.get(10)?,
    })
}

fn finish(r: Raw) -> Result<SandboxRow> {
    let mut row = r.row;
    row.spec = from_json("sandboxes.spec", &r.spec)?;
    row.labels = from_json("sandboxes.labels", &r.labels)?;
    row.egress = r
        .egress
        .as_deref()
        .map(|e| from_json("sandboxes.egress", e))
        .transpose()?;
    Ok(row)
}

/// Inserts a sandbox. A name the owner already uses (or a taken id) is a
/// [`StoreError::Conflict`]; an unknown owner fails on the foreign key.
pub fn insert(c: &Connection, s: &NewSandbox) -> Result<SandboxRow> {
    let now = now_ms();
    let spec = to_json("sandboxes.spec", &s.spec)?;
    let labels = to_json("sandboxes.labels", &s.labels)?;
    let egress = s
        .egress
        .as_ref()
        .map(|e| to_json("sandboxes.egress", e))
        .transpose()?;
    c.prepare_cached(&format!(
        "INSERT INTO sandboxes ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10)"
    ))?
    .execute(params![
        s.id, s.owner, s.name, spec, s.status, s.keep_hot, labels, now, s.ip_host, egress
    ])
    .map_err(|e| {
        unique_as_conflict(e, || format!("a sandbox named '{}' already exists", s.name))
    })?;
    Ok(SandboxRow {
        id: s.id.clone(),
        owner: s.owner.clone(),
        name: s.name.clone(),
        spec: s.spec.clone(),
        status: s.status.clone(),
        keep_hot: s.keep_hot,
        labels: s.labels.clone(),
        created_at: now,
        updated_at: now,
        ip_host: s.ip_host,
        egress: s.egress.clone(),
    })
}

/// Picks a free host number in the owner's /24, round-robin after the last
/// one handed out (a just-freed address is not reused at once: neighbours
/// may still cache its old MAC). Call inside the transaction that inserts
/// the sandbox. [`StoreError::Conflict`] when all are taken.
pub fn allocate_ip_host(c: &Connection, owner: &str) -> Result<u8> {
    let cursor: i64 = c
        .prepare_cached("SELECT net_cursor FROM users WHERE id = ?1")?
        .query_row([owner], |r| r.get(0))
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no user '{owner}'")))?;
    let mut used = [false; 256];
    let mut st =
        c.prepare_cached("SELECT ip_host FROM sandboxes WHERE owner = ?1 AND ip_host IS NOT NULL")?;
    for h in st.query_map([owner], |r| r.get::<_, i64>(0))? {
        if let Ok(h) = usize::try_from(h?) {
            if h < used.len() {
                used[h] = true;
            }
        }
    }
    let span = i64::from(LAST_HOST - FIRST_HOST) + 1;
    let start = cursor.clamp(i64::from(FIRST_HOST) - 1, i64::from(LAST_HOST));
    for step in 1..=span {
        let h = i64::from(FIRST_HOST) + (start - i64::from(FIRST_HOST) + step).rem_euclid(span);
        if !used[h as usize] {
            c.prepare_cached("UPDATE users SET net_cursor = ?2 WHERE id = ?1")?
                .execute(params![owner, h])?;
            return Ok(h as u8);
        }
    }
    Err(StoreError::Conflict(format!(
        "no free address left in the user's network ({span} sandboxes at most)"
    )))
}

/// The owner's sandbox whose id, else name, is `id_or_name`.
///
/// Two point lookups (primary key, then the `(owner, name)` index) rather
/// than one `id = ?2 OR name = ?2` query: SQLite plans that OR with a sort
/// and it costs several times as much, on every request that names a sandbox.
pub fn get(c: &Connection, owner: &str, id_or_name: &str) -> Result<Option<SandboxRow>> {
    for by in ["id", "name"] {
        let r = c
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM sandboxes WHERE owner = ?1 AND {by} = ?2"
            ))?
            .query_row(params![owner, id_or_name], raw)
            .optional()?;
        if let Some(r) = r {
            return finish(r).map(Some);
        }
    }
    Ok(None)
}

/// A sandbox by id, whoever owns it (the daemon's own lookups, never a
/// user's request).
pub fn get_by_id(c: &Connection, id: &str) -> Result<Option<SandboxRow>> {
    let r = c
        .prepare_cached(&format!("SELECT {COLUMNS} FROM sandboxes WHERE id = ?1"))?
        .query_row([id], raw)
        .optional()?;
    r.map(finish).transpose()
}

/// Like [`get`], but a missing sandbox is [`StoreError::NotFound`].
pub fn require(c: &Connection, owner: &str, id_or_name: &str) -> Result<SandboxRow> {
    get(c, owner, id_or_name)?
        .ok_or_else(|| StoreError::NotFound(format!("no sandbox '{id_or_name}'")))
}

/// The owner's sandboxes, oldest first.
pub fn list(c: &Connection, owner: &str) -> Result<Vec<SandboxRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM sandboxes WHERE owner = ?1 ORDER BY created_at, id"
    ))?;
    let rows = st
        .query_map([owner], raw)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(finish).collect()
}

/// Every owner's sandboxes: for the daemon's recovery at start only.
pub fn list_all(c: &Connection) -> Result<Vec<SandboxRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM sandboxes ORDER BY created_at, id"
    ))?;
    let rows = st
        .query_map([], raw)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(finish).collect()
}

/// How many sandboxes the owner has (for the `max_sandboxes` cap).
pub fn count(c: &Connection, owner: &str) -> Result<u32> {
    let n: i64 = c
        .prepare_cached("SELECT COUNT(*) FROM sandboxes WHERE owner = ?1")?
        .query_row([owner], |r| r.get(0))?;
    Ok(n as u32)
}

/// Applies `u` to the owner's sandbox `id` and returns the new row.
pub fn update(c: &Connection, owner: &str, id: &str, u: &SandboxUpdate) -> Result<SandboxRow> {
    let labels = u
        .labels
        .as_ref()
        .map(|l| to_json("sandboxes.labels", l))
        .transpose()?;
    let spec = u
        .spec
        .as_ref()
        .map(|s| to_json("sandboxes.spec", s))
        .transpose()?;
    let egress = u
        .egress
        .as_ref()
        .map(|e| to_json("sandboxes.egress", e))
        .transpose()?;
    let n = c
        .prepare_cached(
            "UPDATE sandboxes SET
                status = COALESCE(?3, status),
                keep_hot = COALESCE(?4, keep_hot),
                labels = COALESCE(?5, labels),
                spec = COALESCE(?6, spec),
                updated_at = ?7,
                name = COALESCE(?8, name),
                egress = COALESCE(?9, egress)
             WHERE owner = ?1 AND id = ?2",
        )?
        .execute(params![
            owner,
            id,
            u.status,
            u.keep_hot,
            labels,
            spec,
            now_ms(),
            u.name,
            egress
        ])
        .map_err(|e| {
            unique_as_conflict(e, || {
                format!(
                    "a sandbox named '{}' already exists",
                    u.name.as_deref().unwrap_or_default()
                )
            })
        })?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no sandbox '{id}'")));
    }
    require(c, owner, id)
}

/// Sets only the status (the engine's state changes).
pub fn set_status(c: &Connection, owner: &str, id: &str, status: &str) -> Result<()> {
    let n = c
        .prepare_cached(
            "UPDATE sandboxes SET status = ?3, updated_at = ?4 WHERE owner = ?1 AND id = ?2",
        )?
        .execute(params![owner, id, status, now_ms()])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no sandbox '{id}'")));
    }
    Ok(())
}

/// Deletes the owner's sandbox `id`; [`StoreError::NotFound`] when absent.
pub fn delete(c: &Connection, owner: &str, id: &str) -> Result<()> {
    let n = c
        .prepare_cached("DELETE FROM sandboxes WHERE owner = ?1 AND id = ?2")?
        .execute(params![owner, id])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no sandbox '{id}'")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil;

    #[test]
    fn names_unique_per_owner_and_scoped() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let alice = testutil::user(c, "alice");
            let bob = testutil::user(c, "bob");
            let mut n = NewSandbox::new("sb_a1", &alice, "web");
            n.labels.insert("team".into(), "x".into());
            n.spec = serde_json::json!({"cpus": 2});
            let a1 = insert(c, &n)?;
            assert_eq!(a1.labels["team"], "x");

            // Same name, same owner: conflict. Same id: conflict.
            let e = insert(c, &NewSandbox::new("sb_a2", &alice, "web")).unwrap_err();
            assert!(
                matches!(e, StoreError::Conflict(ref m) if m.contains("web")),
                "{e}"
            );
            let e = insert(c, &NewSandbox::new("sb_a1", &bob, "other")).unwrap_err();
            assert!(matches!(e, StoreError::Conflict(_)), "{e}");
            // Same name, another owner: fine.
            insert(c, &NewSandbox::new("sb_b1", &bob, "web"))?;
            // Unknown owner: refused by the foreign key.
            assert!(insert(c, &NewSandbox::new("sb_x", "u_nobody", "web")).is_err());

            // Lookups by id or name only see the owner's rows.
            assert_eq!(get(c, &alice, "web")?.unwrap().id, "sb_a1");
            assert_eq!(get(c, &alice, "sb_a1")?.unwrap().spec["cpus"], 2);
            assert_eq!(get(c, &bob, "web")?.unwrap().id, "sb_b1");
            assert!(get(c, &bob, "sb_a1")?.is_none());
            assert!(matches!(
                require(c, &bob, "sb_a1"),
                Err(StoreError::NotFound(_))
            ));
            assert_eq!(list(c, &alice)?.len(), 1);
            assert_eq!(count(c, &bob)?, 1);
            assert_eq!(list_all(c)?.len(), 2);

            // Writes are scoped too.
            assert!(matches!(
                set_status(c, &bob, "sb_a1", "running"),
                Err(StoreError::NotFound(_))
            ));
            assert!(matches!(
                delete(c, &bob, "sb_a1"),
                Err(StoreError::NotFound(_))
            ));
            assert!(matches!(
                update(
                    c,
                    &bob,
                    "sb_a1",
                    &SandboxUpdate {
                        keep_hot: Some(true),
                        ..Default::default()
                    }
                ),
                Err(StoreError::NotFound(_))
            ));
            assert!(!get(c, &alice, "sb_a1")?.unwrap().keep_hot);

            let u = update(
                c,
                &alice,
                "sb_a1",
                &SandboxUpdate {
                    keep_hot: Some(true),
                    labels: Some(BTreeMap::from([("a".into(), "b".into())])),
                    ..Default::default()
                },
            )?;
            assert!(u.keep_hot);
            assert_eq!(u.labels.len(), 1);
            assert_eq!(u.status, "creating");
            set_status(c, &alice, "sb_a1", "running")?;
            assert_eq!(get(c, &alice, "web")?.unwrap().status, "running");
            delete(c, &alice, "sb_a1")?;
            assert!(get(c, &alice, "web")?.is_none());
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn addresses_round_robin_unique_per_owner() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let a = testutil::user(c, "alice");
            let b = testutil::user(c, "bob");
            let mut taken = Vec::new();
            for i in 0..3 {
                let h = allocate_ip_host(c, &a)?;
                let mut n = NewSandbox::new(&format!("sa{i}"), &a, &format!("n{i}"));
                n.ip_host = Some(h);
                insert(c, &n)?;
                taken.push(h);
            }
            assert_eq!(taken, [2, 3, 4]);
            // Another owner has a pool of their own.
            assert_eq!(allocate_ip_host(c, &b)?, 2);
            // A freed address is not reused at once.
            delete(c, &a, "sa0")?;
            assert_eq!(allocate_ip_host(c, &a)?, 5);
            // The same address twice for one owner is refused by the index.
            let mut dup = NewSandbox::new("sdup", &a, "dup");
            dup.ip_host = Some(3);
            assert!(matches!(insert(c, &dup), Err(StoreError::Conflict(_))));
            // Rename: unique per owner; egress stored as JSON.
            let e = update(
                c,
                &a,
                "sa1",
                &SandboxUpdate {
                    name: Some("n2".into()),
                    ..Default::default()
                },
            )
            .unwrap_err();
            assert!(matches!(e, StoreError::Conflict(_)), "{e}");
            let r = update(
                c,
                &a,
                "sa1",
                &SandboxUpdate {
                    name: Some("web".into()),
                    egress: Some(EgressPolicy::deny_all()),
                    ..Default::default()
                },
            )?;
            assert_eq!(r.name, "web");
            assert_eq!(
                get(c, &a, "web")?.unwrap().egress,
                Some(EgressPolicy::deny_all())
            );
            assert_eq!(r.ip_host, Some(3));
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_full_network_is_a_conflict() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let a = testutil::user(c, "alice");
            for i in FIRST_HOST..=LAST_HOST {
                let h = allocate_ip_host(c, &a)?;
                let mut n = NewSandbox::new(&format!("s{i}"), &a, &format!("n{i}"));
                n.ip_host = Some(h);
                insert(c, &n)?;
            }
            assert!(matches!(
                allocate_ip_host(c, &a),
                Err(StoreError::Conflict(_))
            ));
            delete(c, &a, "s100")?;
            assert_eq!(allocate_ip_host(c, &a)?, 100);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn id_match_wins_over_name_match() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let a = testutil::user(c, "alice");
            insert(c, &NewSandbox::new("abc", &a, "first"))?;
            // A second sandbox whose *name* equals the first one's id.
            insert(c, &NewSandbox::new("def", &a, "abc"))?;
            assert_eq!(get(c, &a, "abc")?.unwrap().id, "abc");
            assert_eq!(get(c, &a, "def")?.unwrap().id, "def");
            Ok(())
        })
        .unwrap();
    }
}
