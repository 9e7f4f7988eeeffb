//! `shell_tokens`: links that open one sandbox's terminal in a browser
//! (`POST /sandboxes/{id}/shell-token`). Only a token's SHA-256 is stored;
//! each expires, and a sandbox has at most [`MAX_LIVE`] live ones, checked
//! in the same transaction as the insert (expired rows are pruned there and
//! never count). Deleting the sandbox or its owner deletes its tokens.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{now_ms, Result, StoreError};

/// Live (unexpired) tokens one sandbox may have.
pub const MAX_LIVE: u32 = 5;

/// What a live token opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellGrant {
    pub owner: String,
    pub sandbox_id: String,
    /// Unix milliseconds.
    pub expires_at: i64,
}

/// Stores a token's hash for the owner's sandbox, valid until `expires_at`
/// (Unix ms). [`StoreError::Conflict`] when the sandbox already has
/// [`MAX_LIVE`] live tokens; nothing changes then.
pub fn insert(
    c: &mut Connection,
    token_sha256: &str,
    owner: &str,
    sandbox_id: &str,
    expires_at: i64,
) -> Result<()> {
    let now = now_ms();
    // IMMEDIATE: the count and the insert see the same rows even when
    // another connection (the host CLI) writes too.
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.prepare_cached("DELETE FROM shell_tokens WHERE sandbox_id = ?1 AND expires_at <= ?2")?
        .execute(params![sandbox_id, now])?;
    let live: u32 = tx
        .prepare_cached("SELECT COUNT(*) FROM shell_tokens WHERE sandbox_id = ?1")?
        .query_row([sandbox_id], |r| r.get(0))?;
    if live >= MAX_LIVE {
        return Err(StoreError::Conflict(format!(
            "this sandbox already has {MAX_LIVE} live shell links; revoke them first"
        )));
    }
    tx.prepare_cached(
        "INSERT INTO shell_tokens (token_sha256, owner, sandbox_id, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![token_sha256, owner, sandbox_id, now, expires_at])?;
    tx.commit()?;
    Ok(())
}

/// The grant of a token by its hash; `None` when unknown, revoked or
/// expired.
pub fn lookup(c: &Connection, token_sha256: &str) -> Result<Option<ShellGrant>> {
    Ok(c.prepare_cached(
        "SELECT owner, sandbox_id, expires_at FROM shell_tokens
             WHERE token_sha256 = ?1 AND expires_at > ?2",
    )?
    .query_row(params![token_sha256, now_ms()], |r| {
        Ok(ShellGrant {
            owner: r.get(0)?,
            sandbox_id: r.get(1)?,
            expires_at: r.get(2)?,
        })
    })
    .optional()?)
}

/// Revokes every token of the owner's sandbox; returns how many there were.
pub fn delete_for_sandbox(c: &Connection, owner: &str, sandbox_id: &str) -> Result<usize> {
    Ok(
        c.prepare_cached("DELETE FROM shell_tokens WHERE owner = ?1 AND sandbox_id = ?2")?
            .execute(params![owner, sandbox_id])?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sandboxes::{self, NewSandbox};
    use crate::store::testutil;

    fn count(c: &Connection) -> i64 {
        c.query_row("SELECT COUNT(*) FROM shell_tokens", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn at_most_five_live_per_sandbox_and_expired_ones_do_not_count() {
        let (s, _d) = testutil::store();
        s.with(|c| {
            let a = testutil::user(c, "alice");
            sandboxes::insert(c, &NewSandbox::new("sb1", &a, "one"))?;
            sandboxes::insert(c, &NewSandbox::new("sb2", &a, "two"))?;
            let later = now_ms() + 60_000;
            for i in 0..MAX_LIVE {
                insert(c, &format!("h{i}"), &a, "sb1", later)?;
            }
            let e = insert(c, "h5", &a, "sb1", later).unwrap_err();
            assert!(matches!(e, StoreError::Conflict(_)), "{e}");
            assert!(
                lookup(c, "h5")?.is_none(),
                "a refused insert stores nothing"
            );
            // Another sandbox has its own five.
            insert(c, "other", &a, "sb2", later)?;
            // An expired token does not count, and is pruned by the next insert.
            c.execute(
                "UPDATE shell_tokens SET expires_at = ?1 WHERE token_sha256 = 'h0'",
                [now_ms() - 1],
            )?;
            assert!(lookup(c, "h0")?.is_none(), "expired is refused");
            insert(c, "h6", &a, "sb1", later)?;
            assert_eq!(count(c), 6);
            let g = lookup(c, "h6")?.expect("live");
            assert_eq!(
                (g.owner.as_str(), g.sandbox_id.as_str()),
                (a.as_str(), "sb1")
            );
            assert_eq!(g.expires_at, later);

            // Revoke: only that sandbox's, only for its owner.
            assert_eq!(delete_for_sandbox(c, "someone-else", "sb1")?, 0);
            assert_eq!(delete_for_sandbox(c, &a, "sb1")?, 5);
            assert!(lookup(c, "h6")?.is_none());
            assert!(lookup(c, "other")?.is_some());
            // Destroying the sandbox drops its tokens.
            sandboxes::delete(c, &a, "sb2")?;
            assert_eq!(count(c), 0);
            Ok(())
        })
        .unwrap();
    }
}
