//! The metadata database: connection setup, pool bounds and embedded migrations.

use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::{Error, Result};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Bounds of the metadata database's connection pool.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use dunite_core::DatabaseOptions;
///
/// let options = DatabaseOptions::new().with_max_connections(2).with_acquire_timeout(Duration::from_millis(500));
/// assert_eq!(options.max_connections(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseOptions {
    max_connections: u32,
    acquire_timeout: Duration,
    busy_timeout: Duration,
    simulated_latency: Duration,
}

impl Default for DatabaseOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl DatabaseOptions {
    /// Defaults: at most 4 connections, 30 s to acquire one, 5 s SQLite busy timeout.
    #[must_use]
    pub fn new() -> Self {
        Self {
            max_connections: 4,
            acquire_timeout: Duration::from_secs(30),
            busy_timeout: Duration::from_secs(5),
            simulated_latency: Duration::ZERO,
        }
    }

    /// At most `n` pooled connections (at least 1; 2 or more recommended, since an eviction
    /// pass holds one for its duration).
    #[must_use]
    pub fn with_max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// How long `acquire` waits for a free connection before `PoolTimedOut`.
    #[must_use]
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How long SQLite waits on a locked database before `SQLITE_BUSY`.
    #[must_use]
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// For tests and benchmarks: wait `latency` before every statement the caches run, while
    /// holding the connection, to model a database across a network (where the pool
    /// exhaustion that dunite prevents was first seen) on the embedded one. Zero by default.
    #[must_use]
    pub fn with_simulated_latency(mut self, latency: Duration) -> Self {
        self.simulated_latency = latency;
        self
    }

    /// The pool's connection bound.
    #[must_use]
    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }
}

/// A handle to the metadata database; cheap to clone, and shareable by several caches (each
/// keeps its rows under its own namespace).
///
/// SQLite is the embedded default. The database is created in WAL mode (set once, when the
/// file is created; WAL is a property of the file), with `synchronous = NORMAL`, which WAL
/// keeps consistent across crashes. Every write transaction that reads first is begun with
/// `BEGIN IMMEDIATE`, so it takes the write lock up front and waits out the busy timeout
/// instead of failing with `SQLITE_BUSY` on lock upgrade; within one process, writes are
/// also funnelled through one FIFO turn, so our own connections never wait on each other
/// inside SQLite's busy handler.
#[derive(Debug, Clone)]
pub struct Database {
    pool: SqlitePool,
    latency: Duration,
    /// Funnels this process's write transactions (FIFO), so SQLite never busy-waits between
    /// our own connections: its busy handler sleeps in steps of up to 100 ms, holding a pooled
    /// connection all the while.
    writer: Arc<tokio::sync::Mutex<()>>,
}

impl Database {
    /// Open (creating if needed) the SQLite database at `path` and run the embedded
    /// migrations. Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the file cannot be opened or migrated.
    pub async fn open_sqlite(path: &Path, options: &DatabaseOptions) -> Result<Self> {
        let connect = SqliteConnectOptions::new().filename(path);
        Self::open_with(connect, options).await
    }

    /// Open a database by URL (`sqlite://path/to/file.db`, `sqlite::memory:`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a URL this build cannot use, [`Error::Database`] if the
    /// database cannot be opened or migrated.
    pub async fn connect(url: &str, options: &DatabaseOptions) -> Result<Self> {
        if !url.starts_with("sqlite:") {
            return Err(Error::InvalidConfig(format!(
                "unsupported database URL scheme in {url:?} (expected sqlite:)"
            )));
        }
        let connect = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::InvalidConfig(format!("bad database URL {url:?}: {e}")))?;
        Self::open_with(connect, options).await
    }

    async fn open_with(connect: SqliteConnectOptions, options: &DatabaseOptions) -> Result<Self> {
        if options.max_connections == 0 {
            return Err(Error::InvalidConfig("database pool needs at least one connection".into()));
        }
        let connect = connect
            .create_if_missing(true)
            .busy_timeout(options.busy_timeout)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true);
        let is_new = !tokio::fs::try_exists(connect.get_filename()).await.unwrap_or(false);
        if is_new {
            // WAL is persistent: set it once on the new file, not on every connection.
            let once = connect.clone().journal_mode(SqliteJournalMode::Wal);
            let conn =
                sqlx::ConnectOptions::connect(&once).await.map_err(Error::db("create the database"))?;
            sqlx::Connection::close(conn).await.map_err(Error::db("create the database"))?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .min_connections(0)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(Error::db("open the database"))?;
        MIGRATOR.run(&pool).await.map_err(|e| Error::Database {
            op: "migrate the database",
            source: sqlx::Error::from(e).into(),
        })?;
        Ok(Self { pool, latency: options.simulated_latency, writer: Arc::default() })
    }

    /// Wait for this process's turn to write. Take it after acquiring the connection and
    /// before beginning the write transaction: always in that order, so holders of the turn
    /// never wait for a connection held by a waiter for the turn.
    pub(crate) async fn write_turn(&self) -> tokio::sync::OwnedMutexGuard<()> {
        Arc::clone(&self.writer).lock_owned().await
    }

    /// The simulated per-statement latency (see [`DatabaseOptions::with_simulated_latency`]).
    pub(crate) async fn round_trip(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    /// The underlying pool.
    #[must_use]
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}
