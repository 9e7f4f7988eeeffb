//! `events`: an append-only log of sandbox lifecycle events (create, pause,
//! resume, snapshot, restore, wake, errors) with their latencies, for
//! `inspect`, debugging and the benchmark. Pruned by age or count.

use rusqlite::{params, Connection, Row};

use super::{now_ms, Result};

/// A stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: i64,
    pub sandbox_id: String,
    /// Owner's user id, when known.
    pub owner: Option<String>,
    /// What happened, e.g. `create`, `pause`, `resume`, `restore`, `error`.
    pub kind: String,
    /// How long it took, when it is an operation.
    pub latency_ms: Option<f64>,
    /// Unix milliseconds.
    pub at: i64,
    /// Free text, e.g. an error message.
    pub detail: Option<String>,
}

/// What [`record`] needs.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub sandbox_id: String,
    pub owner: Option<String>,
    pub kind: String,
    pub latency_ms: Option<f64>,
    pub detail: Option<String>,
}

impl NewEvent {
    pub fn new(sandbox_id: &str, kind: &str) -> NewEvent {
        NewEvent {
            sandbox_id: sandbox_id.into(),
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
    c.prepare_cached(
        "INSERT INTO events (sandbox_id, owner, kind, latency_ms, at, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![e.sandbox_id, e.owner, e.kind, e.latency_ms, now_ms(), e.detail])?;
    Ok(c.last_insert_rowid())
}

/// The latest `limit` events of the owner's sandbox, newest first.
pub fn list_for_sandbox(
    c: &Connection,
    owner: &str,
    sandbox_id: &str,
    limit: u32,
) -> Result<Vec<Event>> {
    let mut st = c.prepare_cached(
        "SELECT id, sandbox_id, owner, kind, latency_ms, at, detail FROM events
         WHERE sandbox_id = ?1 AND owner = ?2 ORDER BY id DESC LIMIT ?3",
    )?;
    let rows = st.query_map(params![sandbox_id, owner, limit], from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil;

    #[test]
    fn record_list_prune() {
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
            let l = list_for_sandbox(c, "u1", "sb1", 3)?;
            assert_eq!(l.len(), 3);
            assert_eq!(l[0].latency_ms, Some(4.0));
            assert_eq!(
                list_for_sandbox(c, "u2", "sb1", 10)?[0].detail.as_deref(),
                Some("boom")
            );
            assert_eq!(prune_keep_latest(c, 2)?, 4);
            assert_eq!(prune_keep_latest(c, 10)?, 0);
            assert_eq!(prune_before(c, now_ms() + 1000)?, 2);
            Ok(())
        })
        .unwrap();
    }
}
