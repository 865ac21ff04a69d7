//! Test and benchmark helpers shared by dunite's crates.
//!
//! This crate is a dev-dependency only. It keeps alive, for tests and benchmarks, the
//! pattern dunite replaces ([`legacy_evict_if_over_cap`]), and checks that a cache's rows,
//! accounted total and files on disk agree ([`check_consistency`]). [`pg`] gives tests
//! databases on the PostgreSQL test server. [`contract`] is the suite every cache kind runs
//! (bursts, a pool of two, invariants, bad input), through an adapter it implements.

#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod contract;
pub mod peers;
pub mod pg;

use std::path::Path;

use dunite_core::{EntryStore, EvictionPass, EvictionPolicy, EvictionStore, Expected, Removal};

/// The legacy eviction: one full pass, on its own connection, meant to be
/// `tokio::spawn`ed after **every** store. Under a burst this is N concurrent passes wanting
/// N connections; dunite's `DebouncedEvictor` exists to replace it. Test and bench code only.
///
/// Returns how many entries the pass removed, or `None` when the store turned it away because
/// another pass (on a shared database, of any instance) was running; the legacy pattern then
/// simply has no pass for its store.
///
/// # Errors
///
/// The store's error, `PoolTimedOut` among them when the pool is exhausted.
pub async fn legacy_evict_if_over_cap<S: EvictionStore>(
    store: S,
    policy: EvictionPolicy,
) -> Result<Option<u64>, S::Error> {
    // The legacy pattern knew nothing of other processes: a busy store just means no pass.
    let Some(mut pass) = store.begin_pass().await? else {
        return Ok(None);
    };
    let mut total = pass.total_size_bytes().await?;
    let mut removed = 0;
    if total <= policy.max_bytes() {
        return pass.finish().await.map(|()| Some(removed));
    }
    while total > policy.low_watermark() {
        let victims = pass.least_recently_used(policy.batch_size()).await?;
        if victims.is_empty() {
            break;
        }
        for victim in &victims {
            if let Removal::Removed { bytes } = pass.remove(victim).await? {
                total = total.saturating_sub(bytes);
                removed += 1;
            }
        }
    }
    pass.finish().await.map(|()| Some(removed))
}

/// What [`legacy_store_burst`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegacyBurst {
    /// `PoolTimedOut` errors of stores, reads and passes.
    pub pool_timeouts: u64,
    /// The accounted total once every legacy pass ended.
    pub final_total: u64,
    /// Passes turned away because another was running: each store whose pass this was has
    /// none, so whether the cap holds after the burst depends on which pass ran last.
    pub passes_lost: u64,
}

/// The burst of the pool-of-two tests, through the legacy pattern on a bare `store`: `tasks`
/// tasks each store `per_task` entries (`entry(task, i)` gives the key, the bytes and their
/// digest), `tokio::spawn` [`legacy_evict_if_over_cap`] after every store, and read each entry
/// back. Requires a multi-threaded Tokio runtime to show the failure.
///
/// # Panics
///
/// If a task panics or the total cannot be read.
pub async fn legacy_store_burst<F>(
    store: &EntryStore,
    policy: EvictionPolicy,
    tasks: u64,
    per_task: u64,
    entry: F,
) -> LegacyBurst
where
    F: Fn(u64, u64) -> (String, Vec<u8>, dunite_core::ContentDigest) + Send + Sync + 'static,
{
    let entry = std::sync::Arc::new(entry);
    let tally = std::sync::Arc::new(PoolTally::default());
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (store, tally, entry, policy) = (store.clone(), tally.clone(), entry.clone(), policy.clone());
        let lost = lost.clone();
        set.spawn(async move {
            let mut evictions = Vec::new();
            for i in 0..per_task {
                let (key, bytes, digest) = entry(t, i);
                let expected = Expected::new().with_size(bytes.len() as u64).with_digest(digest);
                match store.store(&key, &bytes[..], &expected, "").await {
                    Ok(_) => {
                        evictions.push(tokio::spawn(legacy_evict_if_over_cap(store.clone(), policy.clone())))
                    }
                    Err(e) => tally.record(&e),
                }
                if let Err(e) = store.open_entry(&key).await {
                    tally.record(&e);
                }
            }
            for eviction in evictions {
                match eviction.await.expect("a legacy pass panicked") {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => tally.record(&e),
                }
            }
        });
    }
    set.join_all().await;
    LegacyBurst {
        pool_timeouts: tally.pool_timeouts(),
        final_total: store.total_bytes().await.expect("read the total"),
        passes_lost: lost.load(std::sync::atomic::Ordering::Relaxed),
    }
}

/// What a cache directory holds on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes of payload files under `data/`.
    pub payload_bytes: u64,
    /// Payload files under `data/`.
    pub payload_files: u64,
    /// Files under `tmp/`.
    pub temp_files: u64,
}

/// Walk a cache directory (`data/<shard>/<file>` and `tmp/<file>`).
///
/// # Panics
///
/// If the directory cannot be read.
#[must_use]
pub fn disk_usage(dir: &Path) -> DiskUsage {
    let mut usage = DiskUsage::default();
    let data = dir.join("data");
    if data.exists() {
        for shard in std::fs::read_dir(&data).expect("read data dir") {
            let shard = shard.expect("read data dir").path();
            for file in std::fs::read_dir(&shard).expect("read shard") {
                let meta = file.expect("read shard").metadata().expect("stat payload");
                usage.payload_bytes += meta.len();
                usage.payload_files += 1;
            }
        }
    }
    let tmp = dir.join("tmp");
    if tmp.exists() {
        usage.temp_files = std::fs::read_dir(&tmp).expect("read tmp dir").count() as u64;
    }
    usage
}

/// Check that the accounted total and count equal the sum and count of the live rows, and
/// that those equal the payload files on disk (each row's file with its size, no file without
/// a row), with no temporary file and no row being removed: the core's offline check
/// ([`EntryStore::check`], what `dunite check` runs), without hashing. Returns the total.
/// Call it once the cache is quiet (no store in flight).
///
/// # Errors
///
/// A description of every disagreement.
pub async fn check_consistency(store: &EntryStore, dir: &Path) -> Result<u64, String> {
    let checked = EntryStore::open_for_check(store.database().clone(), store.namespace(), dir)
        .await
        .map_err(|e| e.to_string())?;
    let report = checked.check(&dunite_core::CheckOptions::new()).await.map_err(|e| e.to_string())?;
    if !report.findings.is_empty() {
        let found: Vec<String> = report.findings.iter().map(|f| f.problem.to_string()).collect();
        return Err(found.join("; "));
    }
    Ok(report.row_bytes)
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG dependency.
#[must_use]
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// The bounded-pool scenario's database: a pool of 2 connections with a 200 ms acquire
/// timeout, on a database that costs 2 ms per statement (a networked database, where the
/// `PoolTimedOut` failure was first seen). The legacy driver exhausts it; dunite's caches
/// must not.
#[must_use]
pub fn pool_of_two() -> dunite_core::DatabaseOptions {
    dunite_core::DatabaseOptions::new()
        .with_max_connections(2)
        .with_acquire_timeout(std::time::Duration::from_millis(200))
        .with_simulated_latency(std::time::Duration::from_millis(2))
}

/// Run `future` to completion on a fresh two-worker Tokio runtime: for the bodies of
/// proptests, which are synchronous.
///
/// # Panics
///
/// When the runtime cannot be built.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a Tokio runtime")
        .block_on(future)
}

/// The database backends a test body runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBackend {
    /// The embedded SQLite file in the test's directory.
    Sqlite,
    /// A fresh database on the PostgreSQL test server (see [`pg`]).
    Postgres,
}

/// A test's database, and on PostgreSQL the guard that drops it: keep it alive as long as
/// the caches using it (declare it after them, so it drops last).
#[derive(Debug)]
pub struct TestDb {
    database: dunite_core::Database,
    _server: Option<pg::TestDatabase>,
}

impl TestDb {
    /// The open database.
    #[must_use]
    pub fn database(&self) -> &dunite_core::Database {
        &self.database
    }
}

/// Open a database on `backend` with `options`: SQLite at `dir/metadata.db`, or a fresh
/// database on the PostgreSQL test server. `None` when that server is not configured, which
/// [`pg::server_url`] allows only outside CI.
///
/// # Panics
///
/// When the database cannot be opened.
pub async fn test_database(
    backend: TestBackend,
    dir: &Path,
    options: &dunite_core::DatabaseOptions,
) -> Option<TestDb> {
    match backend {
        TestBackend::Sqlite => {
            let database = dunite_core::Database::open_sqlite(&dir.join("metadata.db"), options)
                .await
                .expect("open the SQLite test database");
            Some(TestDb { database, _server: None })
        }
        TestBackend::Postgres => {
            let server = pg::fresh_database().await?;
            let database = dunite_core::Database::connect(server.url(), options)
                .await
                .expect("open the PostgreSQL test database");
            Some(TestDb { database, _server: Some(server) })
        }
    }
}

/// Counts errors of a burst: pool timeouts apart from everything else.
#[derive(Debug, Default)]
pub struct PoolTally {
    pool_timeouts: std::sync::atomic::AtomicU64,
    other_errors: std::sync::atomic::AtomicU64,
}

impl PoolTally {
    /// Count `error`.
    pub fn record(&self, error: &dunite_core::Error) {
        let counter = if error.is_pool_timeout() { &self.pool_timeouts } else { &self.other_errors };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Count an error that is not the core's (a cache kind's own), among the other errors.
    pub fn record_other(&self) {
        self.other_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// `PoolTimedOut` errors counted.
    #[must_use]
    pub fn pool_timeouts(&self) -> u64 {
        self.pool_timeouts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Other errors counted.
    #[must_use]
    pub fn other_errors(&self) -> u64 {
        self.other_errors.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A reader that yields the first `good` bytes of `data` (at most 1,000 per read), then fails
/// like a cut connection.
#[derive(Debug)]
pub struct CutAfter {
    data: Vec<u8>,
    pos: usize,
    good: usize,
}

impl CutAfter {
    /// Cut `data` after `good` bytes.
    #[must_use]
    pub fn new(data: Vec<u8>, good: usize) -> Self {
        Self { data, pos: 0, good }
    }
}

impl tokio::io::AsyncRead for CutAfter {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.pos >= self.good {
            let error = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "upstream cut");
            return std::task::Poll::Ready(Err(error));
        }
        let end = (self.pos + buf.remaining().min(1000)).min(self.good);
        buf.put_slice(&self.data[self.pos..end]);
        self.pos = end;
        std::task::Poll::Ready(Ok(()))
    }
}

/// A reader that panics if read: proves a refusal happened before any byte was consumed.
#[derive(Debug)]
pub struct MustNotRead;

impl tokio::io::AsyncRead for MustNotRead {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        panic!("the cache read a stream it should have refused up front")
    }
}

/// Poll the async `condition` every 5 ms until it holds.
///
/// # Panics
///
/// If it does not hold within `deadline`.
pub async fn eventually<F, Fut>(deadline: std::time::Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    while !condition().await {
        assert!(tokio::time::Instant::now() < give_up, "condition not reached within {deadline:?}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Poll `ready` every 20 ms until it holds, as [`eventually`] does, naming `what` was
/// awaited when it gives up.
///
/// # Panics
///
/// If it does not hold within `limit`.
pub async fn poll_until(limit: std::time::Duration, what: &str, mut ready: impl AsyncFnMut() -> bool) {
    let give_up = tokio::time::Instant::now() + limit;
    while !ready().await {
        assert!(tokio::time::Instant::now() < give_up, "gave up waiting: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The proptest case count: `PROPTEST_CASES` when set (`cargo xtask ci` sets 256), else
/// `default` for a quick local run.
#[must_use]
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
