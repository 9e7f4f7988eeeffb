//! `e2b_sandboxes`: what the E2B-compatible API (`api/e2b`) keeps beside a
//! sandbox: the template it was asked for, its envd access token, its
//! end-of-life time and whether that pauses instead of destroying, and
//! the caller's metadata. A row goes with its sandbox (ON DELETE CASCADE).
//! The token is stored twice: as SHA-256 to check requests quickly, and
//! encrypted (the daemon's secret box) to hand it out again on `connect`.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{from_json, to_json, Result};

/// Migration 9.
pub const E2B_MIGRATION: &str = r#"
    CREATE TABLE e2b_sandboxes (
        sandbox_id   TEXT PRIMARY KEY REFERENCES sandboxes(id) ON DELETE CASCADE,
        owner        TEXT NOT NULL,
        template_id  TEXT NOT NULL,
        token_sha256 TEXT NOT NULL,
        token_enc    BLOB NOT NULL,
        metadata     TEXT NOT NULL DEFAULT '{}',
        started_at   INTEGER NOT NULL,
        end_at       INTEGER,
        auto_pause   INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    CREATE INDEX e2b_sandboxes_by_owner ON e2b_sandboxes (owner);
    CREATE INDEX e2b_sandboxes_by_end ON e2b_sandboxes (end_at);
"#;

/// A stored row.
#[derive(Debug, Clone, PartialEq)]
pub struct E2bRow {
    pub sandbox_id: String,
    /// The owner's user id.
    pub owner: String,
    pub template_id: String,
    /// Hex SHA-256 of the envd access token.
    pub token_sha256: String,
    /// The token, encrypted with the daemon's secret box.
    pub token_enc: Vec<u8>,
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Unix milliseconds.
    pub started_at: i64,
    /// Unix milliseconds; `None`: no end of life.
    pub end_at: Option<i64>,
    /// At `end_at`: pause (cold) instead of destroying.
    pub auto_pause: bool,
}

const COLUMNS: &str = "sandbox_id, owner, template_id, token_sha256, token_enc, metadata, \
                       started_at, end_at, auto_pause";

fn row(r: &Row) -> rusqlite::Result<(E2bRow, String)> {
    Ok((
        E2bRow {
            sandbox_id: r.get(0)?,
            owner: r.get(1)?,
            template_id: r.get(2)?,
            token_sha256: r.get(3)?,
            token_enc: r.get(4)?,
            metadata: Default::default(),
            started_at: r.get(6)?,
            end_at: r.get(7)?,
            auto_pause: r.get::<_, i64>(8)? != 0,
        },
        r.get(5)?,
    ))
}

fn finish((mut e, metadata): (E2bRow, String)) -> Result<E2bRow> {
    e.metadata = from_json("metadata", &metadata)?;
    Ok(e)
}

/// Records (or replaces) the row of a sandbox.
pub fn upsert(c: &Connection, e: &E2bRow) -> Result<()> {
    c.execute(
        &format!(
            "INSERT OR REPLACE INTO e2b_sandboxes ({COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        ),
        params![
            e.sandbox_id,
            e.owner,
            e.template_id,
            e.token_sha256,
            e.token_enc,
            to_json("metadata", &e.metadata)?,
            e.started_at,
            e.end_at,
            e.auto_pause as i64,
        ],
    )?;
    Ok(())
}

/// The row of a sandbox, whoever owns it (envd requests are authenticated
/// by the token this row holds).
pub fn get(c: &Connection, sandbox_id: &str) -> Result<Option<E2bRow>> {
    c.query_row(
        &format!("SELECT {COLUMNS} FROM e2b_sandboxes WHERE sandbox_id = ?1"),
        [sandbox_id],
        row,
    )
    .optional()?
    .map(finish)
    .transpose()
}

/// A user's rows.
pub fn list(c: &Connection, owner: &str) -> Result<Vec<E2bRow>> {
    let mut st = c.prepare(&format!(
        "SELECT {COLUMNS} FROM e2b_sandboxes WHERE owner = ?1 ORDER BY started_at"
    ))?;
    let rows = st
        .query_map([owner], row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(finish).collect()
}

/// Rows whose end of life is at or before `now_ms`.
pub fn due(c: &Connection, now_ms: i64) -> Result<Vec<E2bRow>> {
    let mut st = c.prepare(&format!(
        "SELECT {COLUMNS} FROM e2b_sandboxes WHERE end_at IS NOT NULL AND end_at <= ?1"
    ))?;
    let rows = st
        .query_map([now_ms], row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(finish).collect()
}

/// Sets the end of life (and whether it pauses); `None`: none.
pub fn set_end(
    c: &Connection,
    sandbox_id: &str,
    end_at: Option<i64>,
    auto_pause: bool,
) -> Result<()> {
    c.execute(
        "UPDATE e2b_sandboxes SET end_at = ?2, auto_pause = ?3 WHERE sandbox_id = ?1",
        params![sandbox_id, end_at, auto_pause as i64],
    )?;
    Ok(())
}

/// Records `e` unless the sandbox has a row already; answers the row that
/// is stored afterwards (two racing first connects agree on one token).
pub fn insert_if_absent(c: &Connection, e: &E2bRow) -> Result<E2bRow> {
    c.execute(
        &format!(
            "INSERT OR IGNORE INTO e2b_sandboxes ({COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        ),
        params![
            e.sandbox_id,
            e.owner,
            e.template_id,
            e.token_sha256,
            e.token_enc,
            to_json("metadata", &e.metadata)?,
            e.started_at,
            e.end_at,
            e.auto_pause as i64,
        ],
    )?;
    Ok(get(c, &e.sandbox_id)?.unwrap_or_else(|| e.clone()))
}

/// Sets the end of life only (keeps `auto_pause`).
pub fn set_end_at(c: &Connection, sandbox_id: &str, end_at: Option<i64>) -> Result<()> {
    c.execute(
        "UPDATE e2b_sandboxes SET end_at = ?2 WHERE sandbox_id = ?1",
        params![sandbox_id, end_at],
    )?;
    Ok(())
}
