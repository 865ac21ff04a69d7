//! The metadata database: the backends (SQLite, PostgreSQL), connection set-up, pool bounds,
//! embedded migrations, and the locks that differ between backends.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest as _;
use sqlx::any::{Any, AnyPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyConnection, AnyPool, Transaction};
use tokio::time::Instant;

use crate::{Error, Result};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

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

    /// How long SQLite waits on a locked database before `SQLITE_BUSY` (SQLite only).
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

/// Which database server a [`Database`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// The embedded default: one file, one process.
    Sqlite,
    /// A PostgreSQL server, which several dunite instances may share.
    Postgres,
}

/// A handle to the metadata database; cheap to clone, and shareable by several caches (each
/// keeps its rows under its own namespace).
///
/// Every query the caches run is written once, in SQL both backends accept; what differs
/// between them lives here: connection set-up, migrations, how a write transaction takes its
/// lock, and the cross-instance eviction lock.
///
/// **SQLite** is the embedded default, for one process per database file (a second process
/// on the same file and directory is not supported). The database is created in WAL mode
/// (set once, when the file is created; WAL is a property of the file), with
/// `synchronous = NORMAL`, which WAL keeps consistent across crashes. Write transactions
/// begin with `BEGIN IMMEDIATE`, so they take the write lock up front instead of failing with
/// `SQLITE_BUSY` on lock upgrade.
///
/// **PostgreSQL** is for several instances sharing one database and one cache directory.
/// Every write transaction first locks its namespace's row in `totals`
/// (`SELECT ... FOR UPDATE`), which serialises writers per cache across instances as
/// SQLite's lock does within one, and an eviction pass runs only while holding a session
/// advisory lock on its namespace (taken without waiting: see
/// [`EvictionStore::begin_pass`](crate::EvictionStore::begin_pass)).
///
/// On both, this process's writes are also funnelled through one FIFO turn, so its own
/// connections never queue inside the database's lock (SQLite's busy handler sleeps in steps
/// of up to 100 ms, holding a pooled connection all the while).
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    latency: Duration,
    writer: Arc<tokio::sync::Mutex<()>>,
    /// PostgreSQL's write locks are per namespace (its `totals` row), so are its turns: a
    /// cache waiting for another instance's lock holds up no other cache.
    namespace_writers: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// Set while the server is unreachable: until when callers fail at once (see `acquire`).
    down_until: Arc<std::sync::Mutex<Option<Instant>>>,
    /// Callers waiting for a write turn: lets unit tests order a race without sleeping.
    #[cfg(test)]
    pub(crate) turn_waiters: Arc<std::sync::atomic::AtomicUsize>,
}

/// After the pool could not open a connection, how long every caller fails at once instead of
/// waiting out the acquire timeout (during an outage, each would otherwise wait it in full).
const FAIL_FAST: Duration = Duration::from_secs(1);

/// How long one caller waits for a connection while probing whether an unreachable server is
/// back (the others keep failing at once meanwhile).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Database {
    /// Open (creating if needed) the SQLite database at `path` and run the embedded
    /// migrations. Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a path that is not UTF-8, [`Error::Database`] if the file
    /// cannot be opened or migrated.
    pub async fn open_sqlite(path: &Path, options: &DatabaseOptions) -> Result<Self> {
        let Some(text) = path.to_str() else {
            return Err(Error::InvalidConfig(format!("database path {} is not UTF-8", path.display())));
        };
        let is_new = !tokio::fs::try_exists(path).await.unwrap_or(false);
        let url = format!("sqlite://{}?mode=rwc", encode_path(text));
        let pool = Self::open_pool(&url, Backend::Sqlite, options).await?;
        if is_new {
            // WAL is persistent: set it once on the new file, not on every connection.
            sqlx::raw_sql("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .map_err(Error::db("create the database"))?;
        }
        Self::migrate(pool, Backend::Sqlite, options).await
    }

    /// Open a database by URL: `sqlite://path/to/file.db` (created if missing) or
    /// `postgres://user:password@host:port/database` (the database must exist; its tables
    /// are created by the embedded migrations). Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a URL this build cannot use, [`Error::Database`] if the
    /// database cannot be reached or migrated.
    pub async fn connect(url: &str, options: &DatabaseOptions) -> Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = Self::open_pool(url, Backend::Postgres, options).await?;
            return Self::migrate(pool, Backend::Postgres, options).await;
        }
        if !url.starts_with("sqlite:") {
            return Err(Error::InvalidConfig(format!(
                "unsupported database URL scheme in {} (expected sqlite: or postgres:)",
                redact(url)
            )));
        }
        let parsed = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::InvalidConfig(format!("bad database URL {url:?}: {e}")))?;
        let path = parsed.get_filename();
        if url.contains(":memory:") || path.as_os_str().is_empty() {
            return Err(Error::InvalidConfig(format!(
                "database URL {url:?} names no file (a cache's database must be a file)"
            )));
        }
        Self::open_sqlite(path, options).await
    }

    async fn open_pool(url: &str, backend: Backend, options: &DatabaseOptions) -> Result<AnyPool> {
        if options.max_connections == 0 {
            return Err(Error::InvalidConfig("database pool needs at least one connection".into()));
        }
        sqlx::any::install_default_drivers();
        let mut pool = AnyPoolOptions::new()
            .max_connections(options.max_connections)
            .min_connections(0)
            .acquire_timeout(options.acquire_timeout);
        if backend == Backend::Postgres {
            // A peer that vanished must not hold a lock for long: give up waiting on a row lock
            // after 10 s (the write fails and is retried by its caller), end a session idle in a
            // transaction after a minute, and notice a dead client within about a minute (its
            // eviction lock is then released).
            pool = pool.after_connect(|conn, _meta| {
                Box::pin(async move {
                    sqlx::raw_sql(
                        "SET lock_timeout = '10s'; SET idle_in_transaction_session_timeout = '60s'; \
                         SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; \
                         SET tcp_keepalives_count = 3;",
                    )
                    .execute(conn)
                    .await
                    .map(drop)
                })
            });
        }
        if backend == Backend::Sqlite {
            let busy_ms = options.busy_timeout.as_millis();
            pool = pool.after_connect(move |conn, _meta| {
                Box::pin(async move {
                    let pragmas = format!(
                        "PRAGMA busy_timeout = {busy_ms}; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;"
                    );
                    sqlx::raw_sql(sqlx::AssertSqlSafe(pragmas)).execute(conn).await.map(drop)
                })
            });
        }
        pool.connect(url).await.map_err(|source| Error::Database {
            op: "open the database",
            source: Arc::new(redact_error(source)),
        })
    }

    async fn migrate(pool: AnyPool, backend: Backend, options: &DatabaseOptions) -> Result<Self> {
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        // Concurrent start-ups are safe: the migrator holds a database lock while it runs.
        migrator.run(&pool).await.map_err(|e| Error::Database {
            op: "migrate the database",
            source: sqlx::Error::from(e).into(),
        })?;
        Ok(Self {
            pool,
            backend,
            latency: options.simulated_latency,
            writer: Arc::default(),
            namespace_writers: Arc::default(),
            #[cfg(test)]
            turn_waiters: Arc::default(),
            down_until: Arc::default(),
        })
    }

    /// Which backend this is.
    #[must_use]
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether other processes may use this database (and the cache directories beside it)
    /// at the same time: true for PostgreSQL. Start-up cleanup then leaves young temporary
    /// and orphan files alone, since they may be another instance's stores in flight.
    #[must_use]
    pub fn is_shared(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// How old a leftover file (a temporary file, a payload without a row, an upstream spool)
    /// must be before start-up cleanup may delete it: zero for a database one process owns,
    /// 15 minutes for a shared one, where a younger file may be another instance's store in
    /// flight (a payload is renamed into place just before its row commits). Far longer than
    /// a commit can take.
    #[must_use]
    pub fn orphan_grace(&self) -> Duration {
        if self.is_shared() { SHARED_ORPHAN_GRACE } else { Duration::ZERO }
    }

    /// A pooled connection, failing fast while the server is unreachable.
    ///
    /// When the pool times out without having opened all its connections, it was not busy:
    /// it could not connect (sqlx retries a refused connection until the acquire timeout).
    /// Then, for [`FAIL_FAST`], every caller fails at once with the same error instead of
    /// waiting the timeout out in turn; after that, one caller at a time probes with a short
    /// timeout until a connection opens again. A pool merely busy is never treated as down.
    pub(crate) async fn acquire(&self) -> Result<PoolConnection<Any>> {
        let probing = {
            let mut down = self.down_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match *down {
                Some(until) if Instant::now() < until => {
                    return Err(Error::Database {
                        op: "acquire a connection",
                        source: Arc::new(sqlx::Error::Io(std::io::Error::new(
                            std::io::ErrorKind::NotConnected,
                            "the database is unreachable (failing fast after a failed connection attempt)",
                        ))),
                    });
                }
                Some(_) => {
                    *down = Some(Instant::now() + PROBE_TIMEOUT);
                    true
                }
                None => false,
            }
        };
        let acquired = if probing {
            tokio::time::timeout(PROBE_TIMEOUT, self.pool.acquire())
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut))
        } else {
            self.pool.acquire().await
        };
        let unreachable = match &acquired {
            Ok(_) => false,
            Err(sqlx::Error::PoolTimedOut) => self.pool.size() < self.pool.options().get_max_connections(),
            Err(sqlx::Error::Io(_) | sqlx::Error::Tls(_)) => true,
            Err(_) => false,
        };
        {
            let mut down = self.down_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if acquired.is_ok() && down.is_some() {
                tracing::info!("the metadata database is reachable again");
                *down = None;
            } else if unreachable {
                if down.is_none() {
                    tracing::warn!("the metadata database is unreachable; failing fast and probing");
                }
                *down = Some(Instant::now() + FAIL_FAST);
            }
        }
        match acquired {
            // Not busy: it could not connect. Said so, so that a caller can tell an outage
            // from a busy pool (`Error::is_pool_timeout`).
            Err(sqlx::Error::PoolTimedOut) if unreachable => Err(Error::Database {
                op: "acquire a connection",
                source: Arc::new(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the database is unreachable (no connection could be opened within the acquire timeout)",
                ))),
            }),
            acquired => acquired.map_err(Error::db("acquire a connection")),
        }
    }

    /// Wait for this process's turn to write to `namespace`: one turn per database on SQLite
    /// (its lock is the whole database's), one per namespace on PostgreSQL (its lock is the
    /// namespace's `totals` row). Take it after acquiring the connection and before beginning
    /// the write transaction: always in that order, so holders of the turn never wait for a
    /// connection held by a waiter for the turn.
    pub(crate) async fn write_turn(&self, namespace: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let turn = match self.backend {
            Backend::Sqlite => Arc::clone(&self.writer),
            Backend::Postgres => {
                let mut turns =
                    self.namespace_writers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                Arc::clone(turns.entry(namespace.to_owned()).or_default())
            }
        };
        #[cfg(test)]
        self.turn_waiters.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let guard = turn.lock_owned().await;
        #[cfg(test)]
        self.turn_waiters.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        guard
    }

    /// Begin a write transaction on `namespace`, holding its write lock until commit or
    /// rollback: SQLite's database lock, or PostgreSQL's lock on the namespace's `totals`
    /// row. Take the [`write_turn`](Self::write_turn) first.
    pub(crate) async fn begin_write<'c>(
        &self,
        conn: &'c mut AnyConnection,
        namespace: &str,
        op: &'static str,
    ) -> Result<Transaction<'c, Any>> {
        self.round_trip().await;
        match self.backend {
            Backend::Sqlite => {
                sqlx::Connection::begin_with(conn, "BEGIN IMMEDIATE").await.map_err(Error::db(op))
            }
            Backend::Postgres => {
                let mut tx = sqlx::Connection::begin(conn).await.map_err(Error::db(op))?;
                self.round_trip().await;
                sqlx::query("SELECT bytes FROM totals WHERE namespace = $1 FOR UPDATE")
                    .bind(namespace)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(Error::db(op))?;
                Ok(tx)
            }
        }
    }

    /// Try to take the eviction lock of `namespace` on `conn`, without waiting. Always granted
    /// on SQLite (one process; the evictor already runs one pass at a time); on PostgreSQL a
    /// session advisory lock, held until [`unlock_evictions`](Self::unlock_evictions) or
    /// until the connection closes.
    pub(crate) async fn try_lock_evictions(&self, conn: &mut AnyConnection, namespace: &str) -> Result<bool> {
        match self.backend {
            Backend::Sqlite => Ok(true),
            Backend::Postgres => {
                self.round_trip().await;
                let (granted,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
                    .bind(eviction_lock_id(namespace))
                    .fetch_one(conn)
                    .await
                    .map_err(Error::db("take the eviction lock"))?;
                Ok(granted)
            }
        }
    }

    /// Release what [`try_lock_evictions`](Self::try_lock_evictions) took.
    pub(crate) async fn unlock_evictions(&self, conn: &mut AnyConnection, namespace: &str) -> Result<()> {
        match self.backend {
            Backend::Sqlite => Ok(()),
            Backend::Postgres => {
                self.round_trip().await;
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(eviction_lock_id(namespace))
                    .execute(conn)
                    .await
                    .map_err(Error::db("release the eviction lock"))?;
                Ok(())
            }
        }
    }

    /// Whether the server answers now: one trivial query (`SELECT 1`) on a pooled connection,
    /// for readiness checks. Bound it with a timeout of the caller's: waiting for a connection
    /// is bounded only by the pool's acquire timeout.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if no connection can be had or the query fails.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(Error::db("ping the database"))?;
        Ok(())
    }

    /// The simulated per-statement latency (see [`DatabaseOptions::with_simulated_latency`]).
    pub(crate) async fn round_trip(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    /// The underlying pool. Queries written for both backends use `$1`-style placeholders,
    /// which SQLite also accepts.
    #[must_use]
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

const SHARED_ORPHAN_GRACE: Duration = Duration::from_secs(15 * 60);

/// The advisory lock key of a namespace's eviction passes: 64 bits of a hash of its name,
/// stable across processes and versions.
fn eviction_lock_id(namespace: &str) -> i64 {
    let digest = sha2::Sha256::digest(format!("dunite-eviction:{namespace}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// Percent-encode a file path for a `sqlite://` URL (the driver decodes it again).
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"/-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A URL with its password replaced, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}:***{}", &url[..scheme + 3 + colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Connection errors can quote the URL; keep passwords out of logs.
fn redact_error(error: sqlx::Error) -> sqlx::Error {
    match error {
        sqlx::Error::Configuration(source) => sqlx::Error::Configuration(redact(&source.to_string()).into()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded_for_the_sqlite_url() {
        assert_eq!(encode_path("/tmp/a b/c?d#e%f.db"), "/tmp/a%20b/c%3Fd%23e%25f.db");
        assert_eq!(encode_path("/var/lib/dunite/metadata.db"), "/var/lib/dunite/metadata.db");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("mysql://h/db"), "mysql://h/db");
    }

    #[test]
    fn lock_ids_differ_per_namespace_and_are_stable() {
        assert_ne!(eviction_lock_id("oci-blobs"), eviction_lock_id("downloads"));
        assert_eq!(eviction_lock_id("oci-blobs"), eviction_lock_id("oci-blobs"));
    }
}
