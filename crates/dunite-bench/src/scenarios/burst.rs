//! Scenario 1, burst coalescing: N concurrent stores over the cap, on a pool of 2 with a
//! short acquire timeout and 1 ms of simulated latency per statement, through a dunite cache
//! (one debounced evictor) and through the legacy per-store `tokio::spawn` of a full pass.
//! Run for the OCI blob cache and the download cache (stores through `get_or_fetch`), on the
//! embedded SQLite database and on PostgreSQL (the test server `cargo xtask bench` starts; a
//! fresh database per run), with the same simulated latency on both: 1 ms per statement by
//! default, or `--latency-ms N` for a database far away or busy (with a 10 s acquire timeout,
//! so that stores queue instead of failing, as they would with a pool sized for that latency).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dunite_core::{Database, DatabaseOptions, EntryCache, EntryStore, EvictionPolicy, Expected, OnConflict};
use dunite_download::{DownloadCache, DownloadRequest, Fetcher, UrlKey};
use dunite_oci::{BlobCache, Digest};
use dunite_testkit::{TestBackend, TestDb, check_consistency, legacy_evict_if_over_cap, test_database};
use serde_json::json;

use crate::payload::{GenReader, upstream};
use crate::report::{Record, ms};
use crate::{Result, Settings};

const BLOB: usize = 32 * 1024;
const POOL: u32 = 2;
/// The acquire timeout at the default 1 ms per statement: short, so pool pressure shows.
const ACQUIRE_TIMEOUT: Duration = Duration::from_millis(100);
/// The acquire timeout with `--latency-ms` above 1: statements that slow need a pool that waits.
const SLOW_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon after the burst's end the cache must be back under its cap, at any latency.
const SETTLE_TARGET: Duration = Duration::from_secs(2);
/// How long to wait for the total to come back under the cap before calling it "never".
const SETTLE_DEADLINE: Duration = Duration::from_secs(20);
/// The writer tasks of the bounded variant.
const BOUNDED_WRITERS: usize = 8;

fn acquire_timeout(settings: &Settings) -> Duration {
    if settings.latency > Duration::from_millis(1) { SLOW_ACQUIRE_TIMEOUT } else { ACQUIRE_TIMEOUT }
}

fn db_options(settings: &Settings) -> DatabaseOptions {
    DatabaseOptions::new()
        .with_max_connections(POOL)
        .with_acquire_timeout(acquire_timeout(settings))
        .with_simulated_latency(settings.latency)
}

fn policy(cap: u64) -> EvictionPolicy {
    EvictionPolicy::new(cap).without_safety_tick()
}

/// Which cache kind a burst goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Oci,
    Download,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Oci => "oci",
            Self::Download => "download",
        }
    }

    fn namespace(self) -> &'static str {
        match self {
            Self::Oci => dunite_oci::NAMESPACE,
            Self::Download => dunite_download::NAMESPACE,
        }
    }

    /// What the cache kind does with a second store of a key.
    fn on_conflict(self) -> OnConflict {
        match self {
            Self::Oci => OnConflict::KeepExisting,
            Self::Download => OnConflict::Replace,
        }
    }
}

/// One payload of a burst, with its key in each cache kind.
#[derive(Debug, Clone)]
struct Blob {
    digest: Digest,
    url: UrlKey,
    bytes: Arc<Vec<u8>>,
}

impl Blob {
    fn key(&self, kind: Kind) -> String {
        match kind {
            Kind::Oci => self.digest.to_string(),
            Kind::Download => self.url.as_str().to_owned(),
        }
    }
}

/// The cache under test.
#[derive(Clone)]
enum Cache {
    Oci(BlobCache),
    Download(DownloadCache, Arc<dyn Fetcher>),
}

impl Cache {
    async fn open(
        kind: Kind,
        dir: &std::path::Path,
        db: &Database,
        cap: u64,
        blobs: &[Blob],
    ) -> Result<Self> {
        Ok(match kind {
            Kind::Oci => Self::Oci(
                BlobCache::new(BlobCache::options(dir, policy(cap)).with_database(db.clone())).await?,
            ),
            Kind::Download => {
                let options = DownloadCache::options(dir, policy(cap)).with_database(db.clone());
                let bodies: HashMap<_, _> =
                    blobs.iter().map(|b| (b.url.as_str().to_owned(), b.bytes.clone())).collect();
                Self::Download(
                    DownloadCache::new(options, Duration::from_secs(3600)).await?,
                    upstream(bodies),
                )
            }
        })
    }

    /// Store one blob; the core error on failure, if there is one.
    async fn store(&self, blob: &Blob) -> std::result::Result<(), Option<dunite_core::Error>> {
        match self {
            Self::Oci(cache) => cache
                .store_with_size(&blob.digest, blob.bytes.len() as u64, &blob.bytes[..])
                .await
                .map(drop)
                .map_err(|e| e.as_cache().cloned()),
            Self::Download(cache, upstream) => {
                let request =
                    DownloadRequest::new(blob.url.clone()).with_sha256(blob.digest.content_digest().clone());
                cache.get_or_fetch(&request, upstream).await.map(drop).map_err(|e| e.as_cache().cloned())
            }
        }
    }

    fn entries(&self) -> &EntryCache {
        match self {
            Self::Oci(cache) => cache.entries(),
            Self::Download(cache, _) => cache.entries(),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    stored: AtomicU64,
    store_timeouts: AtomicU64,
    eviction_timeouts: AtomicU64,
    other_errors: AtomicU64,
    passes: AtomicU64,
    passes_removing: AtomicU64,
    running: AtomicU64,
    peak_running: AtomicU64,
}

impl Counters {
    fn record(&self, error: Option<&dunite_core::Error>, in_eviction: bool) {
        let counter = match (error.is_some_and(dunite_core::Error::is_pool_timeout), in_eviction) {
            (true, false) => &self.store_timeouts,
            (true, true) => &self.eviction_timeouts,
            (false, _) => &self.other_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What one driver did with one burst.
#[derive(Debug)]
struct Outcome {
    stored: u64,
    burst: Duration,
    total_at_burst_end: Option<u64>,
    settle: Option<Duration>,
    passes: u64,
    /// Passes that removed at least one entry.
    passes_removing: u64,
    peak_eviction: u64,
    store_timeouts: u64,
    eviction_timeouts: u64,
    other_errors: u64,
    consistent: bool,
    final_total: u64,
}

pub async fn run(settings: Settings) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for backend in [TestBackend::Sqlite, TestBackend::Postgres] {
        if backend == TestBackend::Postgres && dunite_testkit::pg::server_url().is_none() {
            eprintln!("no PostgreSQL server (DUNITE_TEST_DATABASE_URL): burst on PostgreSQL skipped");
            continue;
        }
        records.extend(run_on(&settings, backend).await?);
    }
    Ok(records)
}

fn backend_name(backend: TestBackend) -> &'static str {
    match backend {
        TestBackend::Sqlite => "sqlite",
        TestBackend::Postgres => "postgres",
    }
}

/// A fresh database for one run on `backend`, and its guard.
async fn open_db(settings: &Settings, backend: TestBackend, dir: &std::path::Path) -> Result<TestDb> {
    test_database(backend, dir, &db_options(settings)).await.ok_or_else(|| "no PostgreSQL test server".into())
}

async fn run_on(settings: &Settings, backend: TestBackend) -> Result<Vec<Record>> {
    let slow = settings.latency > Duration::from_millis(1);
    // A thousand stores at tens of milliseconds a statement is minutes per variant.
    let sizes: &[usize] = match (settings.quick, slow) {
        (true, true) => &[8],
        (true, false) | (false, true) => &[8, 64],
        (false, false) => &[8, 64, 1024],
    };
    let mut records = Vec::new();
    for kind in [Kind::Oci, Kind::Download] {
        for &n in sizes {
            let blobs = (0..n)
                .map(|i| {
                    let bytes = GenReader::to_vec((n * 1_000_000 + i) as u64, BLOB);
                    let url = UrlKey::parse(&format!("https://bench.example/n{n}/blob-{i}"))?;
                    Ok(Blob { digest: Digest::sha256_of(&bytes), url, bytes: Arc::new(bytes) })
                })
                .collect::<Result<Vec<_>>>()?;
            // An eighth of the burst fits (at least 2 blobs): every variant must evict, even
            // when most stores of an all-at-once burst fail.
            let cap = ((n / 8).max(2) * BLOB) as u64;
            // All N stores at once, as specified; then the same N stores from 8 writer tasks
            // (the shape of `dunite_testkit::contract::pool`), where the store path alone fits
            // the pool and what is left is eviction's own cost.
            let variants: &[usize] = if n > BOUNDED_WRITERS { &[n, BOUNDED_WRITERS] } else { &[n] };
            for &writers in variants {
                let ours = ours(settings, backend, kind, &blobs, cap, writers).await?;
                let legacy = legacy(settings, backend, kind, &blobs, cap, writers).await?;
                records.push(record(settings, backend, kind, n, writers, cap, &ours, &legacy));
            }
        }
    }
    Ok(records)
}

fn settle_figure(settle: Option<Duration>) -> serde_json::Value {
    settle.map_or_else(|| json!(format!("never (> {} s)", SETTLE_DEADLINE.as_secs())), |d| json!(ms(d)))
}

#[allow(clippy::too_many_arguments, reason = "one record's parameters, named at the one call")]
fn record(
    settings: &Settings,
    backend: TestBackend,
    kind: Kind,
    n: usize,
    writers: usize,
    cap: u64,
    ours: &Outcome,
    legacy: &Outcome,
) -> Record {
    let kind = kind.name();
    // SQLite keeps the names of earlier runs.
    let on = match backend {
        TestBackend::Sqlite => String::new(),
        TestBackend::Postgres => format!("{}/", backend_name(backend)),
    };
    let mut name = if writers == n {
        format!("burst/{on}{kind}/n={n}")
    } else {
        format!("burst/{on}{kind}/n={n}/writers={writers}")
    };
    if settings.latency != Duration::from_millis(1) {
        name.push_str(&format!("/latency={}ms", settings.latency.as_millis()));
    }
    let mut r = Record::new(name, "legacy spawn per store");
    r.param("database", backend_name(backend))
        .param("stores", n as u64)
        .param("writer_tasks", writers as u64)
        .param("blob_bytes", BLOB as u64)
        .param("cap_bytes", cap)
        .param("pool", POOL)
        .param("acquire_timeout_ms", ms(acquire_timeout(settings)))
        .param("simulated_latency_ms", ms(settings.latency));
    r.pair("stores committed", ours.stored, legacy.stored)
        .pair("eviction passes", ours.passes, legacy.passes)
        .pair("passes that evicted something", ours.passes_removing, legacy.passes_removing)
        .pair(
            "passes that evicted nothing",
            ours.passes - ours.passes_removing,
            legacy.passes - legacy.passes_removing,
        )
        .pair("peak passes running (eviction connections)", ours.peak_eviction, legacy.peak_eviction)
        .pair("PoolTimedOut in stores", ours.store_timeouts, legacy.store_timeouts)
        .pair("PoolTimedOut in eviction", ours.eviction_timeouts, legacy.eviction_timeouts)
        .pair("other errors", ours.other_errors, legacy.other_errors)
        .pair("burst wall time (ms)", ms(ours.burst), ms(legacy.burst))
        .pair(
            "total at burst end (x cap)",
            over_cap(ours.total_at_burst_end, cap),
            over_cap(legacy.total_at_burst_end, cap),
        )
        .pair("ms until total <= cap, after burst", settle_figure(ours.settle), settle_figure(legacy.settle))
        .pair(
            "final total (x cap)",
            over_cap(Some(ours.final_total), cap),
            over_cap(Some(legacy.final_total), cap),
        )
        .pair("rows, total and files agree", ours.consistent, legacy.consistent);
    if ours.passes > 0 {
        r.ratio("eviction passes, legacy / dunite", legacy.passes as f64 / ours.passes as f64);
    }
    r.target(format!("at most 2 eviction passes per burst (got {})", ours.passes), ours.passes <= 2)
        .target("peak eviction connections 1", ours.peak_eviction <= 1)
        .target(
            format!("zero PoolTimedOut (got {})", ours.store_timeouts + ours.eviction_timeouts),
            ours.store_timeouts + ours.eviction_timeouts == 0,
        )
        .target("total back under the cap", ours.settle.is_some())
        .target(
            format!("back under the cap within {} s of the burst's end", SETTLE_TARGET.as_secs()),
            ours.settle.is_some_and(|d| d <= SETTLE_TARGET),
        );
    r
}

fn over_cap(total: Option<u64>, cap: u64) -> serde_json::Value {
    total.map_or_else(|| json!("unread (PoolTimedOut)"), |t| json!(t as f64 / cap as f64))
}

/// Poll `total` until it is at most `cap`; `None` if that does not happen in time.
async fn settle<F, Fut>(cap: u64, mut total: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<u64>>,
{
    let started = Instant::now();
    while started.elapsed() < SETTLE_DEADLINE {
        if total().await.is_some_and(|t| t <= cap) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// Deal the blobs out to `writers` tasks, round robin.
fn share(blobs: &[Blob], writers: usize) -> Vec<Vec<Blob>> {
    let mut shares = vec![Vec::new(); writers];
    for (i, blob) in blobs.iter().enumerate() {
        shares[i % writers].push(blob.clone());
    }
    shares
}

async fn ours(
    settings: &Settings,
    backend: TestBackend,
    kind: Kind,
    blobs: &[Blob],
    cap: u64,
    writers: usize,
) -> Result<Outcome> {
    let dir = settings.tempdir()?;
    let db = open_db(settings, backend, dir.path()).await?;
    let cache = Cache::open(kind, dir.path(), db.database(), cap, blobs).await?;
    let before = cache.entries().stats().evictor;
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mine in share(blobs, writers) {
        let (cache, counters) = (cache.clone(), counters.clone());
        tasks.spawn(async move {
            for blob in mine {
                match cache.store(&blob).await {
                    Ok(()) => {
                        counters.stored.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => counters.record(e.as_ref(), false),
                }
            }
        });
    }
    tasks.join_all().await;
    let burst = started.elapsed();
    let entries = cache.entries();
    let total_at_burst_end = entries.total_bytes().await.ok();
    let settled = settle(cap, || async { entries.total_bytes().await.ok() }).await;
    // Let a pass still pending (a poke from the last stores) run and be counted.
    tokio::time::sleep(entries.evictor().policy().debounce() + Duration::from_millis(300)).await;
    let after = entries.stats().evictor;
    let consistent = check_consistency(entries.entries(), dir.path()).await.is_ok();
    Ok(Outcome {
        stored: counters.stored.load(Ordering::Relaxed),
        burst,
        total_at_burst_end,
        settle: settled,
        passes: after.passes - before.passes,
        passes_removing: after.passes_removing - before.passes_removing,
        // By construction: one eviction task per cache, one pass at a time, one connection.
        peak_eviction: u64::from(after.passes > before.passes),
        store_timeouts: counters.store_timeouts.load(Ordering::Relaxed),
        // The evictor logs and counts a failed pass; with this pool, a failure is a timeout.
        eviction_timeouts: after.errors - before.errors,
        other_errors: counters.other_errors.load(Ordering::Relaxed),
        consistent,
        final_total: entries.total_bytes().await?,
    })
}

async fn legacy(
    settings: &Settings,
    backend: TestBackend,
    kind: Kind,
    blobs: &[Blob],
    cap: u64,
    writers: usize,
) -> Result<Outcome> {
    let dir = settings.tempdir()?;
    let db = open_db(settings, backend, dir.path()).await?;
    let store =
        EntryStore::open(db.database().clone(), kind.namespace(), dir.path(), cap, kind.on_conflict())
            .await?;
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mine in share(blobs, writers) {
        let (store, counters) = (store.clone(), counters.clone());
        tasks.spawn(async move {
            let mut passes = Vec::new();
            for blob in mine {
                let expected = Expected::new()
                    .with_size(blob.bytes.len() as u64)
                    .with_digest(blob.digest.content_digest().clone());
                match store.store(&blob.key(kind), &blob.bytes[..], &expected, "").await {
                    // The legacy pattern: every store spawns its own full pass.
                    Ok(_) => {
                        counters.stored.fetch_add(1, Ordering::Relaxed);
                        passes.push(tokio::spawn(legacy_pass(store.clone(), policy(cap), counters.clone())));
                    }
                    Err(e) => counters.record(Some(&e), false),
                }
            }
            passes
        });
    }
    let passes: Vec<_> = tasks.join_all().await.into_iter().flatten().collect();
    let burst = started.elapsed();
    let total_at_burst_end = store.total_bytes().await.ok();
    let settled = settle(cap, || async { store.total_bytes().await.ok() }).await;
    for pass in passes {
        pass.await?;
    }
    let consistent = check_consistency(&store, dir.path()).await.is_ok();
    Ok(Outcome {
        stored: counters.stored.load(Ordering::Relaxed),
        burst,
        total_at_burst_end,
        settle: settled,
        passes: counters.passes.load(Ordering::Relaxed),
        passes_removing: counters.passes_removing.load(Ordering::Relaxed),
        peak_eviction: counters.peak_running.load(Ordering::Relaxed),
        store_timeouts: counters.store_timeouts.load(Ordering::Relaxed),
        eviction_timeouts: counters.eviction_timeouts.load(Ordering::Relaxed),
        other_errors: counters.other_errors.load(Ordering::Relaxed),
        consistent,
        final_total: store.total_bytes().await?,
    })
}

/// One legacy pass, counted while it runs.
async fn legacy_pass(store: EntryStore, policy: EvictionPolicy, counters: Arc<Counters>) {
    counters.passes.fetch_add(1, Ordering::Relaxed);
    let running = counters.running.fetch_add(1, Ordering::SeqCst) + 1;
    counters.peak_running.fetch_max(running, Ordering::SeqCst);
    let result = legacy_evict_if_over_cap(store, policy).await;
    counters.running.fetch_sub(1, Ordering::SeqCst);
    match result {
        Ok(Some(removed)) if removed > 0 => {
            counters.passes_removing.fetch_add(1, Ordering::Relaxed);
        }
        Ok(_) => {}
        Err(e) => counters.record(Some(&e), true),
    }
}
