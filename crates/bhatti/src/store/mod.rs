//! The daemon's durable state in SQLite (rusqlite, bundled): users, sandboxes,
//! checkpoints, secrets and events.
//!
//! - One file, `<data_dir>/bhatti.db`, in WAL mode with foreign keys on and a
//!   busy timeout, so the host-side `bhatti user …` commands can write while
//!   the daemon runs.
//! - Schema migrations: [`MIGRATIONS`] is a list of SQL steps; `PRAGMA
//!   user_version` records how many have run, and each pending step runs in
//!   its own transaction together with the version bump.
//! - Typed queries live in one small module per table ([`users`],
//!   [`sandboxes`], [`snapshots`], [`secrets`], [`events`], [`shell_tokens`])
//!   as free functions over `&Connection`, so they compose inside one
//!   transaction. Every query on a user's objects takes the owner's id and
//!   never returns another owner's rows.
//!
//! ## Async use
//!
//! [`Store`] is a cheap clone around `Arc<Mutex<Connection>>`. Async code calls
//! [`Store::run`], which takes the lock inside `tokio::task::spawn_blocking`,
//! so a slow disk never stalls the runtime's worker threads; sync code (the
//! host CLI, tests) calls [`Store::with`]. One connection is enough: SQLite
//! serializes writers anyway, queries here are index lookups of a few
//! microseconds, and a mutex (unlike a dedicated thread with a channel) lets
//! callers borrow the connection for a whole transaction and keeps the same
//! API usable without a runtime.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode};

pub mod backups;
pub mod e2b;
pub mod events;
pub mod images;
pub mod published;
pub mod sandboxes;
pub mod secrets;
pub mod shell_tokens;
pub mod snapshots;
pub mod templates;
mod thermal;
pub mod users;
pub mod volumes;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness or reference constraint refused the change (maps to 409).
    #[error("{0}")]
    Conflict(String),
    /// A per-user count limit refused the insert (maps to 429).
    #[error("{0}")]
    Limit(String),
    /// No such row for this owner (maps to 404).
    #[error("{0}")]
    NotFound(String),
    /// The database was written by a newer bhatti.
    #[error("database schema version {found} is newer than this bhatti supports ({supported}); upgrade bhatti")]
    TooNew { found: i64, supported: i64 },
    /// Opening the database file failed.
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A JSON column did not parse.
    #[error("corrupt JSON in column {column}: {source}")]
    Json {
        column: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The blocking task running a query panicked or was cancelled.
    #[error("database task failed: {0}")]
    Task(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which constraint a failed statement hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Constraint {
    Unique,
    ForeignKey,
    Other,
}

/// The constraint `e` violated, if it is a constraint violation.
pub(crate) fn constraint(e: &rusqlite::Error) -> Option<Constraint> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation => {
            Some(match f.extended_code {
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => Constraint::Unique,
                rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY => Constraint::ForeignKey,
                _ => Constraint::Other,
            })
        }
        _ => None,
    }
}

/// Maps a uniqueness violation to [`StoreError::Conflict`] with `msg`.
pub(crate) fn unique_as_conflict(e: rusqlite::Error, msg: impl FnOnce() -> String) -> StoreError {
    match constraint(&e) {
        Some(Constraint::Unique) => StoreError::Conflict(msg()),
        _ => StoreError::Sqlite(e),
    }
}

/// Milliseconds since the Unix epoch, the unit of every timestamp column.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The schema, one step per version. Step `i` moves the database from
/// `user_version = i` to `i + 1`. Append only; never edit a released step.
pub const MIGRATIONS: &[&str] = &[
    // 1: users, sandboxes, checkpoints, secrets.
    r#"
    CREATE TABLE users (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL UNIQUE,
        key_sha256    TEXT NOT NULL UNIQUE,
        max_sandboxes INTEGER,
        max_cpus      INTEGER,
        max_memory_mb INTEGER,
        created_at    INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE sandboxes (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL REFERENCES users(id) ON DELETE RESTRICT,
        name       TEXT NOT NULL,
        spec       TEXT NOT NULL,
        status     TEXT NOT NULL,
        keep_hot   INTEGER NOT NULL DEFAULT 0,
        labels     TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        UNIQUE (owner, name)
    ) STRICT;

    CREATE TABLE snapshots (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL REFERENCES users(id) ON DELETE RESTRICT,
        name       TEXT NOT NULL,
        sandbox_id TEXT NOT NULL,
        files      TEXT NOT NULL,
        spec       TEXT NOT NULL DEFAULT '{}',
        size_bytes INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        UNIQUE (owner, name)
    ) STRICT;

    CREATE TABLE secrets (
        owner      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        ciphertext BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (owner, name)
    ) STRICT;
    "#,
    // 2: lifecycle events with latencies; the per-user checkpoint cap.
    r#"
    CREATE TABLE events (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        sandbox_id TEXT NOT NULL,
        owner      TEXT,
        kind       TEXT NOT NULL,
        latency_ms REAL,
        at         INTEGER NOT NULL,
        detail     TEXT
    ) STRICT;
    CREATE INDEX events_by_sandbox ON events (sandbox_id, id);
    CREATE INDEX events_by_time ON events (at);

    ALTER TABLE users ADD COLUMN max_snapshots INTEGER;
    "#,
    // 3: per-user networks (a subnet index each, the address cursor, the
    // isolation switch) and per-sandbox addresses and egress policies.
    r#"
    ALTER TABLE users ADD COLUMN net_index INTEGER;
    ALTER TABLE users ADD COLUMN net_cursor INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE users ADD COLUMN net_isolated INTEGER;
    UPDATE users SET net_index =
        (SELECT COUNT(*) FROM users AS u WHERE u.created_at < users.created_at
            OR (u.created_at = users.created_at AND u.id < users.id));
    CREATE UNIQUE INDEX users_by_net_index ON users (net_index);

    ALTER TABLE sandboxes ADD COLUMN ip_host INTEGER;
    ALTER TABLE sandboxes ADD COLUMN egress TEXT;
    CREATE UNIQUE INDEX sandboxes_by_address ON sandboxes (owner, ip_host);
    "#,
    // 4: published ports (public aliases) and web-shell tokens (hashes only).
    r#"
    CREATE TABLE published_ports (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        port       INTEGER NOT NULL,
        alias      TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        UNIQUE (sandbox_id, port)
    ) STRICT;

    CREATE TABLE shell_tokens (
        token_sha256 TEXT PRIMARY KEY,
        owner        TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        sandbox_id   TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        created_at   INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX shell_tokens_by_sandbox ON shell_tokens (sandbox_id);
    "#,
    // 5: images (a user's catalogue; owner NULL = shared) and templates.
    r#"
    CREATE TABLE images (
        id         TEXT PRIMARY KEY,
        owner      TEXT REFERENCES users(id) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        source     TEXT NOT NULL,
        reference  TEXT,
        digest     TEXT,
        path       TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        config     TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;
    CREATE UNIQUE INDEX images_by_name ON images (coalesce(owner, ''), name);

    CREATE TABLE templates (
        id         TEXT PRIMARY KEY,
        owner      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        image      TEXT,
        spec       TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (owner, name)
    ) STRICT;
    "#,
    // 6: volumes (ext4 images that outlive sandboxes; `ephemeral_sandbox`
    // set: the volume goes with that sandbox) and which sandbox has which
    // volume mounted where.
    r#"
    CREATE TABLE volumes (
        id                TEXT PRIMARY KEY,
        owner             TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name              TEXT NOT NULL,
        size_mb           INTEGER NOT NULL,
        path              TEXT NOT NULL,
        ephemeral_sandbox TEXT,
        created_at        INTEGER NOT NULL,
        UNIQUE (owner, name)
    ) STRICT;
    CREATE INDEX volumes_by_ephemeral_sandbox ON volumes (ephemeral_sandbox);

    CREATE TABLE volume_attachments (
        volume_id  TEXT NOT NULL REFERENCES volumes(id) ON DELETE CASCADE,
        sandbox_id TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        mount      TEXT NOT NULL,
        read_only  INTEGER NOT NULL,
        PRIMARY KEY (volume_id, sandbox_id)
    ) STRICT;
    CREATE INDEX volume_attachments_by_sandbox ON volume_attachments (sandbox_id);
    "#,
    // 7: volume backups and their schedules.
    backups::BACKUPS_MIGRATION,
    // 8: events as the source of truth: sandbox_id nullable (daemon-level
    // events), indexes by owner, sandbox, kind and time.
    events::EVENTS_MIGRATION,
    // 9: what the E2B-compatible API keeps beside a sandbox.
    e2b::E2B_MIGRATION,
];

/// The schema version this build writes.
pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Switches the file to WAL (the mode persists in the file). Changing the
/// journal mode needs an exclusive lock and SQLite reports `SQLITE_BUSY` at
/// once instead of calling the busy handler, so when several processes open
/// a new database together (the daemon and `bhatti user create`) the losers
/// retry here, with a short backoff, for as long as the busy timeout.
fn set_wal(conn: &Connection) -> Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut backoff = Duration::from_millis(1);
    loop {
        // journal_mode returns a row.
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
            Ok(_) => return Ok(()),
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sets the connection pragmas every bhatti connection uses.
pub fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    set_wal(conn)?;
    conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL;")?;
    Ok(())
}

/// Applies pending migrations up to `target` (at most [`schema_version`]).
/// Each step and its `user_version` bump commit together, so a crash leaves
/// the database at a whole version. Returns the version reached.
pub fn migrate_to(conn: &mut Connection, target: i64) -> Result<i64> {
    let target = target.min(schema_version());
    let version = |c: &Connection| -> Result<i64> {
        Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    };
    let first = version(conn)?;
    if first > schema_version() {
        return Err(StoreError::TooNew {
            found: first,
            supported: schema_version(),
        });
    }
    loop {
        // The version is read inside a write transaction (BEGIN IMMEDIATE),
        // so two processes opening a new database at once (the daemon and
        // `bhatti user create`) cannot both apply the same step.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let v = version(&tx)?;
        if v >= target {
            return Ok(v);
        }
        tx.execute_batch(MIGRATIONS[v as usize])?;
        // PRAGMA takes no bound parameters; v is an integer we own.
        tx.execute_batch(&format!("PRAGMA user_version = {}", v + 1))?;
        tx.commit()?;
    }
}

/// Applies every pending migration.
pub fn migrate(conn: &mut Connection) -> Result<i64> {
    migrate_to(conn, schema_version())
}

/// Opens (creating when missing) a configured, migrated connection.
pub fn open_connection(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    configure(&conn)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// A shared handle on the database; see the module docs for async use.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens `path` (creating it and its parent directory, mode 0700, when
    /// missing) and migrates it.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref();
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() && !parent.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)?;
            }
        }
        let conn = open_connection(path)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path.to_path_buf()),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (an open transaction rolls back on drop), so poisoning is ignored.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with the connection on this thread (blocking). For sync
    /// callers only; async code uses [`Store::run`].
    pub fn with<R>(&self, f: impl FnOnce(&mut Connection) -> Result<R>) -> Result<R> {
        let mut guard = self.lock();
        f(&mut guard)
    }

    /// For point reads on the request path (an indexed lookup takes a few
    /// microseconds, a hop to the blocking pool tens): runs `f` right here
    /// when the connection is free, else on the blocking pool like
    /// [`Store::run`] so a long write never stalls an async worker.
    pub async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
    {
        // The guard must not live across the await below (it is !Send).
        let f = match self.conn.try_lock() {
            Ok(mut g) => return f(&mut g),
            Err(std::sync::TryLockError::Poisoned(p)) => return f(&mut p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => f,
        };
        self.run(f).await
    }

    /// Runs `f` with the connection on tokio's blocking pool.
    pub async fn run<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.with(f))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs `f` inside one transaction, committed when `f` returns `Ok`.
    pub async fn transaction<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<R> + Send + 'static,
    {
        self.run(move |c| {
            let tx = c.transaction()?;
            let r = f(&tx)?;
            tx.commit()?;
            Ok(r)
        })
        .await
    }
}

/// Parses a JSON text column.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    column: &'static str,
    s: &str,
) -> Result<T> {
    serde_json::from_str(s).map_err(|source| StoreError::Json { column, source })
}

/// Serializes a value for a JSON text column.
pub(crate) fn to_json<T: serde::Serialize>(column: &'static str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|source| StoreError::Json { column, source })
}

/// A random id: `prefix` + 16 hex characters (64 random bits).
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    rand::fill(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// A fresh store in a temp dir, plus the dir guard.
    pub fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().join("state/bhatti.db")).unwrap();
        (s, dir)
    }

    /// Inserts a user and returns its id.
    pub fn user(c: &Connection, name: &str) -> String {
        let u = users::NewUser {
            name: name.into(),
            key_sha256: format!("{:0>64}", name),
            caps: users::UserCaps::default(),
        };
        users::insert(c, &u).unwrap().id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(c: &Connection) -> i64 {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn open_sets_pragmas_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bhatti.db");
        let s = Store::open(&p).unwrap();
        s.with(|c| {
            assert_eq!(version(c), schema_version());
            let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            assert_eq!(mode, "wal");
            let fk: i64 = c.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
            assert_eq!(fk, 1);
            testutil::user(c, "alice");
            Ok(())
        })
        .unwrap();
        drop(s);
        // Reopening runs no migration twice and keeps the data.
        let s = Store::open(&p).unwrap();
        s.with(|c| {
            assert_eq!(version(c), schema_version());
            assert_eq!(migrate(c)?, schema_version());
            assert!(users::get_by_name(c, "alice")?.is_some());
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn upgrades_from_version_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bhatti.db");
        {
            let mut c = Connection::open(&p).unwrap();
            configure(&c).unwrap();
            assert_eq!(migrate_to(&mut c, 1).unwrap(), 1);
            // A row written by the old schema (no max_snapshots column).
            for (id, name, at) in [("u1", "old", 1), ("u0", "older", 0), ("u2", "newer", 2)] {
                c.execute(
                    "INSERT INTO users (id, name, key_sha256, max_sandboxes, created_at) VALUES (?1, ?2, ?1, 3, ?3)",
                    rusqlite::params![id, name, at],
                )
                .unwrap();
            }
            c.execute(
                "INSERT INTO sandboxes (id, owner, name, spec, status, created_at, updated_at) VALUES ('s1', 'u1', 'web', '{}', 'running', 1, 1)",
                [],
            )
            .unwrap();
            assert!(c.prepare("SELECT * FROM events").is_err());
        }
        let s = Store::open(&p).unwrap();
        s.with(|c| {
            assert_eq!(version(c), schema_version());
            let u = users::get_by_name(c, "old")?.unwrap();
            assert_eq!(u.caps.max_sandboxes, Some(3));
            assert_eq!(u.caps.max_snapshots, None);
            // Existing users get subnet indexes by age; new ones the next.
            assert_eq!(u.net_index, 1);
            assert_eq!(users::get_by_name(c, "older")?.unwrap().net_index, 0);
            assert_eq!(users::get_by_name(c, "newer")?.unwrap().net_index, 2);
            assert!(!testutil::user(c, "fresh").is_empty());
            assert_eq!(users::get_by_name(c, "fresh")?.unwrap().net_index, 3);
            // An old sandbox has no address (it keeps the engine's legacy
            // bridge) and no policy of its own.
            let sb = sandboxes::get(c, "u1", "web")?.unwrap();
            assert_eq!((sb.ip_host, sb.egress), (None, None));
            events::record(c, &events::NewEvent::new("sb", "create").latency_ms(1.5))?;
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bhatti.db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch("PRAGMA user_version = 99").unwrap();
        }
        let e = Store::open(&p).unwrap_err();
        assert!(matches!(e, StoreError::TooNew { found: 99, .. }), "{e}");
        assert!(e.to_string().contains("newer"));
    }

    #[test]
    fn concurrent_first_opens_all_succeed() {
        // The daemon and `bhatti user create` may open a new database at the
        // same moment: both must end up with one, fully migrated schema.
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("race.db");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let (p, b) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        open_connection(&p).map(|c| {
                            c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
                                .unwrap()
                        })
                    })
                })
                .collect();
            for h in handles {
                let v = h.join().unwrap().expect("open under contention");
                assert_eq!(v, schema_version());
            }
        }
    }

    #[test]
    fn failed_migration_step_leaves_whole_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Connection::open(dir.path().join("x.db")).unwrap();
        migrate_to(&mut c, 1).unwrap();
        // Make step 2 fail half-way: its events table already exists.
        c.execute_batch("CREATE TABLE events (x INTEGER)").unwrap();
        assert!(migrate(&mut c).is_err());
        assert_eq!(version(&c), 1);
        // The ALTER from the failed step did not stick either.
        assert!(c.prepare("SELECT max_snapshots FROM users").is_err());
    }

    #[tokio::test]
    async fn run_works_from_async() {
        let (s, _d) = testutil::store();
        let id = s.run(|c| Ok(testutil::user(c, "bob"))).await.unwrap();
        let u = s
            .run(|c| users::get_by_name(c, "bob"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(u.id, id);
        let r: Result<()> = s
            .transaction(|tx| {
                testutil::user(tx, "carol");
                Err(StoreError::Conflict("abort".into()))
            })
            .await;
        assert!(r.is_err());
        assert!(s
            .run(|c| users::get_by_name(c, "carol"))
            .await
            .unwrap()
            .is_none());
    }
}
