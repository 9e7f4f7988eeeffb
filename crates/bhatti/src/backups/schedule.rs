//! Backup schedules: a standard 5-field cron expression (minute hour
//! day-of-month month day-of-week, evaluated in UTC; `@daily` and friends
//! work too) and keep-last-N, stored in `backup_schedules`.
//!
//! [`run_loop`] is the daemon's task: it wakes when the earliest schedule
//! is due (at least every `max_sleep`), runs each due schedule's backup
//! through a [`ScheduledBackup`] (so this module needs no volumes), one at
//! a time, and records when it ran, its error and the next time. A
//! schedule whose backup fails is not retried before its next time; a
//! daemon that was down runs each overdue schedule once, not once per
//! missed time.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use tokio_util::sync::CancellationToken;

use crate::store::backups::{self as rows, ScheduleRow};
use crate::store::{now_ms, Store};

/// Most backups a schedule may keep.
pub const MAX_KEEP_LAST: u32 = 1000;

/// Parses a 5-field cron expression; the error says what is wrong.
pub fn parse(expr: &str) -> Result<Cron, String> {
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("invalid cron expression {expr:?}: {e}"))?;
    // Also refuses expressions that never match (e.g. 30 February).
    next_after(&cron, now_ms()).ok_or_else(|| format!("cron expression {expr:?} never matches"))?;
    Ok(cron)
}

/// Checks a schedule as a request gives it.
pub fn validate(expr: &str, keep_last: u32) -> Result<Cron, String> {
    if !(1..=MAX_KEEP_LAST).contains(&keep_last) {
        return Err(format!("keep_last must be between 1 and {MAX_KEEP_LAST}"));
    }
    parse(expr)
}

/// The first time strictly after `after_ms` (Unix ms) that `cron` matches,
/// in Unix ms; `None` when there is none.
pub fn next_after(cron: &Cron, after_ms: i64) -> Option<i64> {
    let t: DateTime<Utc> = Utc.timestamp_millis_opt(after_ms).single()?;
    cron.find_next_occurrence(&t, false)
        .ok()
        .map(|n| n.timestamp_millis())
}

/// The next run of a schedule given as text; `i64::MAX` (never) when the
/// stored expression no longer parses or never matches.
fn next_of(expr: &str, after_ms: i64) -> i64 {
    parse(expr)
        .ok()
        .and_then(|c| next_after(&c, after_ms))
        .unwrap_or(i64::MAX)
}

/// What a scheduled run does: back the volume up and apply
/// `keep_last`. The daemon implements it over volumes.
#[async_trait::async_trait]
pub trait ScheduledBackup: Send + Sync {
    /// Runs one scheduled backup; the error text is recorded as the
    /// schedule's `last_error`.
    async fn run(&self, schedule: &ScheduleRow) -> Result<(), String>;
}

/// Runs due schedules until `shutdown` fires.
pub async fn run_loop(
    store: Store,
    runner: Arc<dyn ScheduledBackup>,
    shutdown: CancellationToken,
    max_sleep: Duration,
) {
    while !shutdown.is_cancelled() {
        let now = now_ms();
        let due = match store.run(move |c| rows::due(c, now)).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("backup schedules: {e}");
                Vec::new()
            }
        };
        for s in due {
            if shutdown.is_cancelled() {
                return;
            }
            let result = runner.run(&s).await;
            if let Err(e) = &result {
                tracing::warn!(owner = %s.owner, volume = %s.volume_name, "scheduled backup failed: {e}");
            }
            let ran = now_ms();
            let next = next_of(&s.cron, ran);
            let id = s.volume_id.clone();
            let err = result.err();
            if let Err(e) = store
                .run(move |c| rows::mark_ran(c, &id, ran, next, err.as_deref()))
                .await
            {
                tracing::warn!("backup schedules: {e}");
            }
        }
        let wait = match store.run(|c| rows::next_due(c)).await {
            Ok(Some(at)) => Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64),
            _ => max_sleep,
        }
        // A floor, so a schedule that cannot be marked (database trouble)
        // is not retried in a busy loop.
        .max(Duration::from_millis(100))
        .min(max_sleep);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn next_times() {
        let daily = parse("0 3 * * *").unwrap();
        assert_eq!(
            next_after(&daily, ms("2026-01-01T05:00:00Z")),
            Some(ms("2026-01-02T03:00:00Z"))
        );
        // Strictly after: a run at 03:00 schedules the next day's.
        assert_eq!(
            next_after(&daily, ms("2026-01-02T03:00:00Z")),
            Some(ms("2026-01-03T03:00:00Z"))
        );
        let q = parse("*/15 * * * *").unwrap();
        assert_eq!(
            next_after(&q, ms("2026-03-01T10:07:30Z")),
            Some(ms("2026-03-01T10:15:00Z"))
        );
        let sunday = parse("30 1 * * 0").unwrap();
        // 2026-03-04 is a Wednesday.
        assert_eq!(
            next_after(&sunday, ms("2026-03-04T00:00:00Z")),
            Some(ms("2026-03-08T01:30:00Z"))
        );
        assert!(parse("@daily").is_ok());
    }

    #[test]
    fn bad_expressions_and_keep_last() {
        for bad in ["", "bad", "* * * * * *", "61 * * * *", "0 3 30 2 *"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(validate("0 3 * * *", 0).is_err());
        assert!(validate("0 3 * * *", MAX_KEEP_LAST + 1).is_err());
        assert!(validate("0 3 * * *", 7).is_ok());
        assert_eq!(next_of("garbage", 0), i64::MAX);
    }

    struct Fake {
        ran: Mutex<Vec<String>>,
        fail: bool,
    }

    #[async_trait::async_trait]
    impl ScheduledBackup for Fake {
        async fn run(&self, s: &ScheduleRow) -> Result<(), String> {
            self.ran.lock().unwrap().push(s.volume_name.clone());
            if self.fail {
                Err("store refused".into())
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn loop_runs_due_schedules_once_and_reschedules() {
        for fail in [false, true] {
            let (store, _d) = crate::store::testutil::store();
            let owner = store
                .run(|c| Ok(crate::store::testutil::user(c, "alice")))
                .await
                .unwrap();
            let row = |vol: &str, next_at| ScheduleRow {
                volume_id: format!("id-{vol}"),
                owner: owner.clone(),
                volume_name: vol.into(),
                cron: "0 3 * * *".into(),
                keep_last: 3,
                next_at,
                last_at: None,
                last_error: None,
            };
            // Overdue by days: runs once, not once per missed day.
            let (due, later) = (
                row("due", now_ms() - 5 * 86_400_000),
                row("later", i64::MAX),
            );
            store
                .run(move |c| {
                    rows::put_schedule(c, &due)?;
                    rows::put_schedule(c, &later)
                })
                .await
                .unwrap();
            let fake = Arc::new(Fake {
                ran: Mutex::new(Vec::new()),
                fail,
            });
            let stop = CancellationToken::new();
            let task = tokio::spawn(run_loop(
                store.clone(),
                fake.clone(),
                stop.clone(),
                Duration::from_millis(20),
            ));
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let got = loop {
                let o = owner.clone();
                let s = store
                    .run(move |c| rows::get_schedule(c, &o, "due"))
                    .await
                    .unwrap()
                    .unwrap();
                if s.last_at.is_some() {
                    break s;
                }
                assert!(std::time::Instant::now() < deadline, "never ran");
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            // A few more loop turns must not run it again.
            tokio::time::sleep(Duration::from_millis(100)).await;
            stop.cancel();
            task.await.unwrap();
            assert_eq!(*fake.ran.lock().unwrap(), vec!["due".to_string()]);
            assert_eq!(got.next_at, next_of("0 3 * * *", got.last_at.unwrap()));
            assert!(got.next_at > now_ms());
            assert_eq!(got.last_error.is_some(), fail);
        }
    }
}
