//! `events`: the append-only log of what happened to sandboxes, users and
//! the daemon (create, destroy, thermal transitions with their latencies,
//! failures, rejections), the source of `GET /events` and `bhatti admin
//! events`. The `id` is monotonic (AUTOINCREMENT: never reused, even after
//! pruning), so it is the pagination cursor. Pruned by age and count.

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, Row};

use super::{now_ms, Result};

/// The table as of migration 8: `sandbox_id` may be NULL (daemon-level
/// events), `owner` NULL for host-level ones; indexes for each filter.
pub const EVENTS_MIGRATION: &str = r#"
    CREATE TABLE events_v8 (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        at         INTEGER NOT NULL,
        kind       TEXT NOT NULL,
        sandbox_id TEXT,
        owner      TEXT,
        latency_ms REAL,
        detail     TEXT
    ) STRICT;
    INSERT INTO events_v8 (id, at, kind, sandbox_id, owner, latency_ms, detail)
        SELECT id, at, kind, sandbox_id, owner, latency_ms, detail FROM events;
    -- Ids of pruned events are not handed out again either.
    DELETE FROM sqlite_sequence WHERE name = 'events_v8';
    INSERT INTO sqlite_sequence (name, seq)
        SELECT 'events_v8', seq FROM sqlite_sequence WHERE name = 'events';
    DROP TABLE events;
    ALTER TABLE events_v8 RENAME TO events;
    CREATE INDEX events_by_owner ON events (owner, id);
    CREATE INDEX events_by_sandbox ON events (sandbox_id, id);
    CREATE INDEX events_by_kind ON events (kind, id);
    CREATE INDEX events_by_time ON events (at);
"#;

/// A stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Monotonic; the cursor of [`query`].
    pub id: i64,
    /// `None`: a daemon-level event.
    pub sandbox_id: Option<String>,
    /// Owner's user id; `None` for host-level events.
    pub owner: Option<String>,
    /// What happened, e.g. `create`, `wake`, `rate_limited`.
    pub kind: String,
    /// How long it took, when it is an operation.
    pub latency_ms: Option<f64>,
    /// Unix milliseconds.
    pub at: i64,
    /// Free text, e.g. an error message.
    pub detail: Option<String>,
}

/// What [`record`] needs.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub sandbox_id: Option<String>,
    pub owner: Option<String>,
    pub kind: String,
    pub latency_ms: Option<f64>,
    pub detail: Option<String>,
}

impl NewEvent {
    /// An event of a sandbox.
    pub fn new(sandbox_id: &str, kind: &str) -> NewEvent {
        NewEvent {
            sandbox_id: Some(sandbox_id.into()),
            ..NewEvent::daemon(kind)
        }
    }
    /// An event of no sandbox (daemon start, a user's rejection).
    pub fn daemon(kind: &str) -> NewEvent {
        NewEvent {
            sandbox_id: None,
            owner: None,
            kind: kind.into(),
            latency_ms: None,
            detail: None,
        }
    }
    pub fn owner(mut self, owner: &str) -> Self {
        self.owner = Some(owner.into());
        self
    }
    pub fn latency_ms(mut self, ms: f64) -> Self {
        self.latency_ms = Some(ms);
        self
    }
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
}

const COLUMNS: &str = "id, sandbox_id, owner, kind, latency_ms, at, detail";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        id: r.get(0)?,
        sandbox_id: r.get(1)?,
        owner: r.get(2)?,
        kind: r.get(3)?,
        latency_ms: r.get(4)?,
        at: r.get(5)?,
        detail: r.get(6)?,
    })
}

/// Appends an event; returns its id.
pub fn record(c: &Connection, e: &NewEvent) -> Result<i64> {
    record_at(c, e, now_ms())
}

/// [`record`] at a given time (tests of pruning by age).
pub fn record_at(c: &Connection, e: &NewEvent, at: i64) -> Result<i64> {
    c.prepare_cached(
        "INSERT INTO events (sandbox_id, owner, kind, latency_ms, at, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![e.sandbox_id, e.owner, e.kind, e.latency_ms, at, e.detail])?;
    Ok(c.last_insert_rowid())
}

/// Which events [`query`] returns; every filter given must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    /// Only events with an id greater than this (the cursor).
    pub since: Option<i64>,
    /// Only these kinds; empty: all.
    pub kinds: Vec<String>,
    /// Only this sandbox's.
    pub sandbox_id: Option<String>,
    /// Only this user's; `None`: every user's and the daemon's own.
    pub owner: Option<String>,
    /// At most this many.
    pub limit: u32,
}

/// The WHERE clause of `f` and its arguments.
fn filter_sql(f: &EventFilter) -> (String, Vec<Value>) {
    let mut sql = String::from("id > ?");
    let mut args: Vec<Value> = vec![Value::Integer(f.since.unwrap_or(0))];
    if let Some(o) = &f.owner {
        sql.push_str(" AND owner = ?");
        args.push(Value::Text(o.clone()));
    }
    if let Some(s) = &f.sandbox_id {
        sql.push_str(" AND sandbox_id = ?");
        args.push(Value::Text(s.clone()));
    }
    if !f.kinds.is_empty() {
        sql.push_str(" AND kind IN (");
        sql.push_str(&vec!["?"; f.kinds.len()].join(", "));
        sql.push(')');
        args.extend(f.kinds.iter().cloned().map(Value::Text));
    }
    (sql, args)
}

fn select(c: &Connection, f: &EventFilter, newest: bool) -> Result<Vec<Event>> {
    let (filter, mut args) = filter_sql(f);
    let order = if newest { "DESC" } else { "ASC" };
    let sql = format!("SELECT {COLUMNS} FROM events WHERE {filter} ORDER BY id {order} LIMIT ?");
    args.push(Value::Integer(i64::from(f.limit)));
    let mut st = c.prepare_cached(&sql)?;
    let rows = st.query_map(params_from_iter(args), from_row)?;
    let mut v: Vec<Event> = rows.collect::<rusqlite::Result<_>>()?;
    if newest {
        v.reverse();
    }
    Ok(v)
}

/// Events matching `f`, oldest first (ascending id), so the last id is the
/// next `since`.
pub fn query(c: &Connection, f: &EventFilter) -> Result<Vec<Event>> {
    select(c, f, false)
}

/// The newest `limit` events matching `f`, oldest first: what `bhatti admin
/// events` shows.
pub fn latest(c: &Connection, f: &EventFilter) -> Result<Vec<Event>> {
    select(c, f, true)
}

/// How many events match `f` (its `limit` ignored).
pub fn count(c: &Connection, f: &EventFilter) -> Result<i64> {
    let (filter, args) = filter_sql(f);
    let sql = format!("SELECT COUNT(*) FROM events WHERE {filter}");
    Ok(c.prepare_cached(&sql)?
        .query_row(params_from_iter(args), |r| r.get(0))?)
}

/// Deletes events older than `before_ms` (unix ms); returns how many.
pub fn prune_before(c: &Connection, before_ms: i64) -> Result<usize> {
    Ok(c.prepare_cached("DELETE FROM events WHERE at < ?1")?
        .execute([before_ms])?)
}

/// Keeps only the newest `keep` events; returns how many were deleted.
pub fn prune_keep_latest(c: &Connection, keep: u32) -> Result<usize> {
    Ok(c.prepare_cached(
        "DELETE FROM events WHERE id <= (SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?1)",
    )?
    .execute([keep])?)
}

/// Applies both retention rules; returns how many events went.
pub fn prune(c: &Connection, max_age_ms: i64, max_count: u32) -> Result<usize> {
    Ok(prune_before(c, now_ms() - max_age_ms)? + prune_keep_latest(c, max_count)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil;

    fn ids(v: &[Event]) -> Vec<i64> {
        v.iter().map(|e| e.id).collect()
    }

    #[test]
    fn record_query_prune() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            for i in 0..5 {
                record(
                    c,
                    &NewEvent::new("sb1", "exec")
                        .owner("u1")
                        .latency_ms(i as f64),
                )?;
            }
            record(c, &NewEvent::new("sb1", "error").owner("u2").detail("boom"))?;
            let f = |owner: &str| EventFilter {
                owner: Some(owner.into()),
                sandbox_id: Some("sb1".into()),
                limit: 3,
                ..Default::default()
            };
            let l = query(c, &f("u1"))?;
            assert_eq!(l.len(), 3);
            assert_eq!(l[0].latency_ms, Some(0.0));
            assert_eq!(latest(c, &f("u1"))?[2].latency_ms, Some(4.0));
            assert_eq!(query(c, &f("u2"))?[0].detail.as_deref(), Some("boom"));
            assert_eq!(prune_keep_latest(c, 2)?, 4);
            assert_eq!(prune_keep_latest(c, 10)?, 0);
            assert_eq!(prune_before(c, now_ms() + 1000)?, 2);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn query_filters_and_cursor() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let mut all = Vec::new();
            for i in 0..30 {
                let owner = if i % 3 == 0 { "a" } else { "b" };
                let kind = ["create", "wake", "destroy"][i % 3 / 2 + i % 2];
                let e = NewEvent::new(&format!("sb{}", i % 4), kind).owner(owner);
                all.push((record(c, &e)?, e));
            }
            let daemon = record(c, &NewEvent::daemon("daemon_start"))?;
            // Paging by the cursor: every event once, in id order.
            let mut seen = Vec::new();
            let mut f = EventFilter {
                limit: 7,
                ..Default::default()
            };
            loop {
                let page = query(c, &f)?;
                if page.is_empty() {
                    break;
                }
                assert!(page.len() <= 7);
                f.since = page.last().map(|e| e.id);
                seen.extend(ids(&page));
            }
            let mut want: Vec<i64> = all.iter().map(|(id, _)| *id).collect();
            want.push(daemon);
            assert_eq!(seen, want);
            // Owner: only theirs, never the daemon's.
            let a = query(
                c,
                &EventFilter {
                    owner: Some("a".into()),
                    limit: 100,
                    ..Default::default()
                },
            )?;
            assert_eq!(a.len(), 10);
            assert!(a.iter().all(|e| e.owner.as_deref() == Some("a")));
            // Kinds (a list), sandbox, combined.
            let kinds = vec!["create".to_string(), "destroy".to_string()];
            let k = query(
                c,
                &EventFilter {
                    kinds: kinds.clone(),
                    sandbox_id: Some("sb1".into()),
                    limit: 100,
                    ..Default::default()
                },
            )?;
            let expect: Vec<i64> = all
                .iter()
                .filter(|(_, e)| kinds.contains(&e.kind) && e.sandbox_id.as_deref() == Some("sb1"))
                .map(|(id, _)| *id)
                .collect();
            assert!(!expect.is_empty());
            assert_eq!(ids(&k), expect);
            assert_eq!(
                count(
                    c,
                    &EventFilter {
                        kinds: vec!["daemon_start".into()],
                        ..Default::default()
                    }
                )?,
                1
            );
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn ids_are_not_reused_after_pruning() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let first = record(c, &NewEvent::daemon("daemon_start"))?;
            let old = record_at(c, &NewEvent::daemon("old"), now_ms() - 3_600_000)?;
            assert_eq!(prune(c, 60_000, 10)?, 1);
            assert_eq!(prune(c, 60_000, 0)?, 1);
            let next = record(c, &NewEvent::daemon("daemon_start"))?;
            assert!(next > old && old > first, "{first} {old} {next}");
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn migration_8_keeps_events_and_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bhatti.db");
        {
            let mut c = Connection::open(&p).unwrap();
            crate::store::configure(&c).unwrap();
            assert_eq!(crate::store::migrate_to(&mut c, 7).unwrap(), 7);
            for i in 0..3 {
                c.execute(
                    "INSERT INTO events (sandbox_id, owner, kind, latency_ms, at, detail) VALUES ('sb', 'u', 'wake', ?1, 5, 'x')",
                    [i],
                )
                .unwrap();
            }
            // The newest is gone: AUTOINCREMENT must still not reuse its id.
            c.execute("DELETE FROM events WHERE id = 3", []).unwrap();
        }
        let s = crate::store::Store::open(&p).unwrap();
        s.with(|c| {
            let old = query(
                c,
                &EventFilter {
                    limit: 10,
                    ..Default::default()
                },
            )?;
            assert_eq!(ids(&old), vec![1, 2]);
            assert_eq!(old[1].latency_ms, Some(1.0));
            assert_eq!(old[1].sandbox_id.as_deref(), Some("sb"));
            assert_eq!(record(c, &NewEvent::daemon("daemon_start"))?, 4);
            Ok(())
        })
        .unwrap();
    }
}
