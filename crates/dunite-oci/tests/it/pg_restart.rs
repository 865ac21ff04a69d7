//! The PostgreSQL server restarted in the middle of a burst. Runs alone (nextest override):
//! every test sharing the server would see it go.

use std::time::Duration;

use dunite_core::{DatabaseOptions, Error as CoreError, EvictionPolicy};
use dunite_oci::{BlobCache, Error};
use dunite_testkit::{check_consistency, disk_usage, pg};

use crate::{blob, eventually, read_verified};

const BLOB: usize = 16 * 1024;
const CAP: u64 = 8 * BLOB as u64;

/// Starts the server again if the test fails while it is down, so the tests after it run.
struct Stopped(bool);

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.0 {
            pg::start_server();
        }
    }
}

/// A blob cache over a fresh database with a pool of 4 and quick retries, flushing accesses
/// (and settling unseen commits) every `flush`; `None` without a test server.
async fn open_cache(flush: Duration) -> Option<(BlobCache, tempfile::TempDir, pg::TestDatabase)> {
    let dir = tempfile::tempdir().unwrap();
    let server = pg::fresh_database().await?;
    let options = DatabaseOptions::new().with_max_connections(4).with_acquire_timeout(Duration::from_secs(2));
    let policy = EvictionPolicy::new(CAP)
        .without_safety_tick()
        .with_retry_backoff(Duration::from_millis(20), Duration::from_millis(500));
    let cache = BlobCache::new(
        BlobCache::options(dir.path(), policy)
            .with_database_url(server.url())
            .with_database_options(options)
            .with_access_flush_period(flush),
    )
    .await
    .unwrap();
    Some((cache, dir, server))
}

async fn store_range(cache: &BlobCache, seeds: std::ops::Range<u64>) -> Vec<Result<(), Error>> {
    let mut tasks = tokio::task::JoinSet::new();
    for seed in seeds {
        let cache = cache.clone();
        tasks.spawn(async move {
            let (digest, bytes) = blob(seed, BLOB);
            cache.store(&digest, &bytes[..]).await.map(drop)
        });
    }
    tasks.join_all().await
}

/// Stores during the outage fail with a database error and leave nothing behind; the evictor
/// fails, backs off and lives on; once the server is back, stores succeed and the cache
/// converges under its cap with rows, total and files in agreement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_recover_and_converge_after_a_database_restart_mid_burst() {
    if !pg::can_restart() {
        // A server given by URL only: this test cannot stop it. CI always starts its own.
        return;
    }
    let Some((cache, dir, server)) = open_cache(Duration::from_secs(1)).await else { return };

    assert!(store_range(&cache, 0..16).await.iter().all(Result::is_ok));
    // Let the evictor settle, so the files counted next change only by what the outage does.
    eventually(Duration::from_secs(30), || async { cache.total_bytes().await.is_ok_and(|t| t <= CAP) }).await;
    cache.evict_if_over_cap().await.unwrap();
    let before = disk_usage(dir.path());

    tokio::task::spawn_blocking(pg::stop_server).await.unwrap();
    let mut stopped = Stopped(true);
    let during = store_range(&cache, 100..108).await;
    for result in &during {
        assert!(
            matches!(result, Err(Error::Cache(CoreError::Database { .. }))),
            "a store during the outage must fail with a database error, got {result:?}"
        );
    }
    assert!(cache.evict_if_over_cap().await.is_err(), "no pass can run without the database");
    let after_failures = disk_usage(dir.path());
    assert_eq!(after_failures.payload_files, before.payload_files, "a failed store left a payload");
    assert_eq!(after_failures.temp_files, 0, "a failed store left a temporary file");
    tokio::task::spawn_blocking(pg::start_server).await.unwrap();
    stopped.0 = false;

    // The pool drops the dead connections and opens new ones. Until a probe finds the server
    // back, callers fail fast (at most a second or two): wait for the first store to succeed.
    eventually(Duration::from_secs(15), || async { store_range(&cache, 199..200).await[0].is_ok() }).await;
    let after = store_range(&cache, 200..224).await;
    assert!(after.iter().all(Result::is_ok), "stores after the restart: {after:?}");
    eventually(Duration::from_secs(30), || async { cache.total_bytes().await.is_ok_and(|t| t <= CAP) }).await;
    let report = cache.evict_if_over_cap().await.expect("the evictor is alive and the database back");
    assert!(report.total_after <= CAP);
    let total = check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
    assert!(total <= CAP && total > 0);
    for seed in 200..224 {
        let (digest, _) = blob(seed, BLOB);
        read_verified(&cache, &digest).await;
    }
    assert!(cache.stats().evictor.errors > 0, "the pass during the outage should have failed");
    drop(cache);
    drop(server);
}

/// The server stopped while stores and eviction passes are in flight (connections die
/// mid-transaction, some at their COMMIT): the writers see database errors, and once the
/// server is back the running cache, with no restart of its own, ends with rows, total and
/// files in agreement under its cap. Before unseen commits were settled, a store cut at its
/// COMMIT could leave a payload no row names until the next start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_stores_in_flight_leaves_rows_and_files_in_agreement() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    if !pg::can_restart() {
        return;
    }
    let Some((cache, dir, server)) = open_cache(Duration::from_millis(50)).await else { return };

    // Four writers store new blobs until told to stop, counting outcomes.
    let (stop, ok, failed) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut writers = tokio::task::JoinSet::new();
    for lane in 0..4u64 {
        let (cache, stop, ok, failed) = (cache.clone(), stop.clone(), ok.clone(), failed.clone());
        writers.spawn(async move {
            // Bounded: a writer stops by itself after this many stores.
            for i in 0..20_000u64 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (digest, bytes) = blob(1_000_000 + lane * 100_000 + i, BLOB);
                match cache.store(&digest, &bytes[..]).await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(Error::Cache(CoreError::Database { .. })) => failed.fetch_add(1, Ordering::SeqCst),
                    Err(other) => panic!("a store failed other than on the database: {other}"),
                };
            }
        });
    }
    eventually(Duration::from_secs(30), || async { ok.load(Ordering::SeqCst) >= 32 }).await;
    tokio::task::spawn_blocking(pg::stop_server).await.unwrap();
    let mut stopped = Stopped(true);
    eventually(Duration::from_secs(30), || async { failed.load(Ordering::SeqCst) >= 4 }).await;
    tokio::task::spawn_blocking(pg::start_server).await.unwrap();
    stopped.0 = false;
    let resumed = ok.load(Ordering::SeqCst);
    eventually(Duration::from_secs(30), || async { ok.load(Ordering::SeqCst) >= resumed + 32 }).await;
    stop.store(true, Ordering::SeqCst);
    writers.join_all().await;

    // Unseen commits settle and the evictor drives the total under the cap, in the background.
    eventually(Duration::from_secs(30), || async {
        cache.evict_if_over_cap().await.is_ok_and(|report| report.total_after <= CAP)
            && check_consistency(cache.entries().entries(), dir.path()).await.is_ok()
    })
    .await;
    let total = check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
    assert!(total <= CAP && total > 0);
    drop(cache);
    drop(server);
}
