//! `volume_backups` and `backup_schedules`: the daemon's record of volume
//! backups (the bucket's manifests are the other, surviving a lost
//! database) and each volume's cron schedule with keep-last-N.
//!
//! A backup row is `running` while its upload runs, then `done` or
//! `failed`; at most one runs per volume (a partial unique index). Rows
//! still `running` when the daemon starts were cut off by a crash and
//! become `failed` ([`fail_interrupted`]); their uploads were never
//! completed, so the bucket holds no object for them.

use rusqlite::{params, Connection, OptionalExtension};

use super::{now_ms, Result, StoreError};

/// The schema step of this module (appended to `MIGRATIONS`).
pub const BACKUPS_MIGRATION: &str = r#"
    CREATE TABLE volume_backups (
        id           TEXT PRIMARY KEY,
        owner        TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        volume_name  TEXT NOT NULL,
        volume_id    TEXT NOT NULL,
        object_key   TEXT NOT NULL,
        raw_bytes    INTEGER NOT NULL DEFAULT 0,
        stored_bytes INTEGER NOT NULL DEFAULT 0,
        sha256       TEXT NOT NULL DEFAULT '',
        state        TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed')),
        error        TEXT,
        created_at   INTEGER NOT NULL,
        finished_at  INTEGER
    ) STRICT;
    CREATE INDEX volume_backups_by_volume ON volume_backups (owner, volume_name, created_at);
    CREATE UNIQUE INDEX volume_backups_one_running ON volume_backups (owner, volume_name)
        WHERE state = 'running';

    CREATE TABLE backup_schedules (
        volume_id   TEXT PRIMARY KEY,
        owner       TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        volume_name TEXT NOT NULL,
        cron        TEXT NOT NULL,
        keep_last   INTEGER NOT NULL CHECK (keep_last >= 1),
        next_at     INTEGER NOT NULL,
        last_at     INTEGER,
        last_error  TEXT,
        UNIQUE (owner, volume_name)
    ) STRICT;
    CREATE INDEX backup_schedules_by_next ON backup_schedules (next_at);
"#;

/// A backup's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupState {
    Running,
    Done,
    Failed,
}

impl BackupState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::Running => "running",
            BackupState::Done => "done",
            BackupState::Failed => "failed",
        }
    }
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "running" => BackupState::Running,
            "done" => BackupState::Done,
            "failed" => BackupState::Failed,
            other => {
                return Err(StoreError::Sqlite(rusqlite::Error::InvalidColumnType(
                    8,
                    format!("state {other:?}"),
                    rusqlite::types::Type::Text,
                )))
            }
        })
    }
}

/// One row of `volume_backups`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRow {
    pub id: String,
    pub owner: String,
    pub volume_name: String,
    pub volume_id: String,
    pub object_key: String,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub sha256: String,
    pub state: BackupState,
    pub error: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

const COLS: &str = "id, owner, volume_name, volume_id, object_key, raw_bytes, stored_bytes, \
                    sha256, state, error, created_at, finished_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(BackupRow, String)> {
    Ok((
        BackupRow {
            id: r.get(0)?,
            owner: r.get(1)?,
            volume_name: r.get(2)?,
            volume_id: r.get(3)?,
            object_key: r.get(4)?,
            raw_bytes: r.get::<_, i64>(5)? as u64,
            stored_bytes: r.get::<_, i64>(6)? as u64,
            sha256: r.get(7)?,
            state: BackupState::Running,
            error: r.get(9)?,
            created_at: r.get(10)?,
            finished_at: r.get(11)?,
        },
        r.get(8)?,
    ))
}

fn parse((mut b, state): (BackupRow, String)) -> Result<BackupRow> {
    b.state = BackupState::parse(&state)?;
    Ok(b)
}

/// What a new backup is of.
#[derive(Debug, Clone)]
pub struct NewBackup<'a> {
    pub id: &'a str,
    pub owner: &'a str,
    pub volume_name: &'a str,
    pub volume_id: &'a str,
    pub object_key: &'a str,
}

/// Records a running backup; [`StoreError::Conflict`] when one of the same
/// volume is still running.
pub fn insert_running(c: &Connection, b: &NewBackup<'_>) -> Result<BackupRow> {
    let now = now_ms();
    let r = c
        .prepare_cached(
            "INSERT INTO volume_backups (id, owner, volume_name, volume_id, object_key, state, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6)",
        )?
        .execute(params![b.id, b.owner, b.volume_name, b.volume_id, b.object_key, now]);
    if let Err(e) = r {
        return Err(super::unique_as_conflict(e, || {
            format!("a backup of volume '{}' is already running", b.volume_name)
        }));
    }
    get(c, b.owner, b.id)?.ok_or_else(|| StoreError::NotFound(b.id.to_string()))
}

/// Marks a running backup done with its sizes and hash.
pub fn finish(c: &Connection, id: &str, raw: u64, stored: u64, sha256: &str) -> Result<()> {
    let n = c
        .prepare_cached(
            "UPDATE volume_backups SET state = 'done', raw_bytes = ?2, stored_bytes = ?3, \
             sha256 = ?4, finished_at = ?5 WHERE id = ?1 AND state = 'running'",
        )?
        .execute(params![id, raw as i64, stored as i64, sha256, now_ms()])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("no running backup '{id}'")));
    }
    Ok(())
}

/// Marks a running backup failed with its error.
pub fn fail(c: &Connection, id: &str, error: &str) -> Result<()> {
    c.prepare_cached(
        "UPDATE volume_backups SET state = 'failed', error = ?2, finished_at = ?3 \
         WHERE id = ?1 AND state = 'running'",
    )?
    .execute(params![id, error, now_ms()])?;
    Ok(())
}

/// At daemon start: backups still `running` were cut off by a crash.
pub fn fail_interrupted(c: &Connection) -> Result<usize> {
    Ok(c.prepare_cached(
        "UPDATE volume_backups SET state = 'failed', \
         error = 'interrupted by a daemon restart', finished_at = ?1 WHERE state = 'running'",
    )?
    .execute([now_ms()])?)
}

/// One backup of the owner's.
pub fn get(c: &Connection, owner: &str, id: &str) -> Result<Option<BackupRow>> {
    let r = c
        .prepare_cached(&format!(
            "SELECT {COLS} FROM volume_backups WHERE owner = ?1 AND id = ?2"
        ))?
        .query_row([owner, id], row)
        .optional()?;
    r.map(parse).transpose()
}

/// The volume's backups, newest first.
pub fn list(c: &Connection, owner: &str, volume_name: &str) -> Result<Vec<BackupRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLS} FROM volume_backups WHERE owner = ?1 AND volume_name = ?2 \
         ORDER BY created_at DESC, id DESC"
    ))?;
    let rows = st.query_map([owner, volume_name], row)?;
    rows.map(|r| parse(r?)).collect()
}

/// Removes a backup's row; false when there was none.
pub fn delete(c: &Connection, owner: &str, id: &str) -> Result<bool> {
    Ok(
        c.prepare_cached("DELETE FROM volume_backups WHERE owner = ?1 AND id = ?2")?
            .execute([owner, id])?
            > 0,
    )
}

/// One row of `backup_schedules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleRow {
    pub volume_id: String,
    pub owner: String,
    pub volume_name: String,
    /// A 5-field cron expression (UTC), see backups::schedule.
    pub cron: String,
    pub keep_last: u32,
    /// When it runs next (Unix milliseconds).
    pub next_at: i64,
    pub last_at: Option<i64>,
    pub last_error: Option<String>,
}

const SCOLS: &str = "volume_id, owner, volume_name, cron, keep_last, next_at, last_at, last_error";

fn srow(r: &rusqlite::Row<'_>) -> rusqlite::Result<ScheduleRow> {
    Ok(ScheduleRow {
        volume_id: r.get(0)?,
        owner: r.get(1)?,
        volume_name: r.get(2)?,
        cron: r.get(3)?,
        keep_last: r.get(4)?,
        next_at: r.get(5)?,
        last_at: r.get(6)?,
        last_error: r.get(7)?,
    })
}

/// Sets (or replaces) a volume's schedule.
pub fn put_schedule(c: &Connection, s: &ScheduleRow) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO backup_schedules (volume_id, owner, volume_name, cron, keep_last, next_at, last_at, last_error) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
         ON CONFLICT (volume_id) DO UPDATE SET volume_name = excluded.volume_name, \
         cron = excluded.cron, keep_last = excluded.keep_last, next_at = excluded.next_at",
    )?
    .execute(params![
        s.volume_id,
        s.owner,
        s.volume_name,
        s.cron,
        s.keep_last,
        s.next_at,
        s.last_at,
        s.last_error
    ])?;
    Ok(())
}

/// A volume's schedule, by owner and name.
pub fn get_schedule(c: &Connection, owner: &str, volume_name: &str) -> Result<Option<ScheduleRow>> {
    Ok(c.prepare_cached(&format!(
        "SELECT {SCOLS} FROM backup_schedules WHERE owner = ?1 AND volume_name = ?2"
    ))?
    .query_row([owner, volume_name], srow)
    .optional()?)
}

/// Removes a volume's schedule (also when the volume is deleted); false
/// when it had none.
pub fn delete_schedule(c: &Connection, volume_id: &str) -> Result<bool> {
    Ok(
        c.prepare_cached("DELETE FROM backup_schedules WHERE volume_id = ?1")?
            .execute([volume_id])?
            > 0,
    )
}

/// Schedules due at `now` (ms), most overdue first.
pub fn due(c: &Connection, now: i64) -> Result<Vec<ScheduleRow>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {SCOLS} FROM backup_schedules WHERE next_at <= ?1 ORDER BY next_at, volume_id"
    ))?;
    let rows = st.query_map([now], srow)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The earliest `next_at` of all schedules.
pub fn next_due(c: &Connection) -> Result<Option<i64>> {
    Ok(
        c.query_row("SELECT MIN(next_at) FROM backup_schedules", [], |r| {
            r.get(0)
        })?,
    )
}

/// Records a scheduled run: when it ran, its error, and the next time.
pub fn mark_ran(
    c: &Connection,
    volume_id: &str,
    ran_at: i64,
    next_at: i64,
    error: Option<&str>,
) -> Result<()> {
    c.prepare_cached(
        "UPDATE backup_schedules SET last_at = ?2, next_at = ?3, last_error = ?4 WHERE volume_id = ?1",
    )?
    .execute(params![volume_id, ran_at, next_at, error])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil;
    use super::*;

    fn new<'a>(id: &'a str, owner: &'a str, vol: &'a str) -> NewBackup<'a> {
        NewBackup {
            id,
            owner,
            volume_name: vol,
            volume_id: "vol-1",
            object_key: "k",
        }
    }

    #[test]
    fn backup_rows_lifecycle() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let u = testutil::user(c, "alice");
            let v = testutil::user(c, "victor");
            let b = insert_running(c, &new("b1", &u, "data"))?;
            assert_eq!(b.state, BackupState::Running);
            // One running backup per volume; other volumes are free.
            let e = insert_running(c, &new("b2", &u, "data")).unwrap_err();
            assert!(matches!(e, StoreError::Conflict(_)), "{e}");
            insert_running(c, &new("b3", &u, "other"))?;
            finish(c, "b1", 100, 40, "ab")?;
            assert!(finish(c, "b1", 1, 1, "x").is_err(), "finished twice");
            let b = get(c, &u, "b1")?.unwrap();
            assert_eq!(
                (b.state, b.raw_bytes, b.stored_bytes, b.sha256.as_str()),
                (BackupState::Done, 100, 40, "ab")
            );
            assert!(b.finished_at.is_some());
            // Now another may run.
            insert_running(c, &new("b2", &u, "data"))?;
            fail(c, "b2", "boom")?;
            let l = list(c, &u, "data")?;
            assert_eq!(l.len(), 2);
            assert_eq!(l[1].id, "b1");
            assert_eq!(l[0].error.as_deref(), Some("boom"));
            // Another owner sees nothing.
            assert!(get(c, &v, "b1")?.is_none());
            assert!(list(c, &v, "data")?.is_empty());
            assert!(!delete(c, &v, "b1")?);
            // A crash leaves b3 running: the next start fails it.
            assert_eq!(fail_interrupted(c)?, 1);
            let b3 = get(c, &u, "b3")?.unwrap();
            assert_eq!(b3.state, BackupState::Failed);
            assert!(b3.error.unwrap().contains("restart"));
            assert!(delete(c, &u, "b1")?);
            assert!(get(c, &u, "b1")?.is_none());
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn schedules() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let u = testutil::user(c, "alice");
            let mut sc = ScheduleRow {
                volume_id: "vol-1".into(),
                owner: u.clone(),
                volume_name: "data".into(),
                cron: "0 3 * * *".into(),
                keep_last: 7,
                next_at: 1_000,
                last_at: None,
                last_error: None,
            };
            put_schedule(c, &sc)?;
            let mut other = sc.clone();
            other.volume_id = "vol-2".into();
            other.volume_name = "logs".into();
            other.next_at = 5_000;
            put_schedule(c, &other)?;
            assert_eq!(next_due(c)?, Some(1_000));
            assert_eq!(due(c, 999)?, vec![]);
            assert_eq!(due(c, 1_000)?, vec![sc.clone()]);
            assert_eq!(due(c, 9_000)?.len(), 2);
            mark_ran(c, "vol-1", 1_001, 90_000, Some("store down"))?;
            let got = get_schedule(c, &u, "data")?.unwrap();
            assert_eq!(
                (got.last_at, got.next_at, got.last_error.as_deref()),
                (Some(1_001), 90_000, Some("store down"))
            );
            // Replacing keeps the last run, takes the new rule.
            sc.cron = "*/5 * * * *".into();
            sc.keep_last = 2;
            sc.next_at = 2_000;
            put_schedule(c, &sc)?;
            let got = get_schedule(c, &u, "data")?.unwrap();
            assert_eq!(
                (got.cron.as_str(), got.keep_last, got.last_at),
                ("*/5 * * * *", 2, Some(1_001))
            );
            assert!(delete_schedule(c, "vol-1")?);
            assert!(!delete_schedule(c, "vol-1")?);
            assert!(get_schedule(c, &u, "data")?.is_none());
            // keep_last below 1 is refused by the schema too.
            other.keep_last = 0;
            assert!(put_schedule(c, &other).is_err());
            Ok(())
        })
        .unwrap();
    }
}
