//! The production failure, reproduced: a burst of fetch-throughs against a pool of 2.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dunite_core::{DatabaseOptions, EntryStore, EvictionPolicy, Expected, OnConflict};
use dunite_download::NAMESPACE;
use dunite_testkit::{check_consistency, legacy_evict_if_over_cap};

use crate::{HOUR, Upstream, content, eventually, open_with, read_verified, url, verified_request};

const TASKS: u64 = 8;
const FETCHES_PER_TASK: u64 = 8;
const FILE: usize = 32 * 1024;
const CAP: u64 = 16 * FILE as u64;

/// A pool of 2 with a short acquire timeout, on a database that costs a millisecond per
/// statement (a networked database, where the failure was seen in production).
fn pool() -> DatabaseOptions {
    DatabaseOptions::new()
        .with_max_connections(2)
        .with_acquire_timeout(Duration::from_millis(200))
        .with_simulated_latency(Duration::from_millis(2))
}

fn policy() -> EvictionPolicy {
    EvictionPolicy::new(CAP).without_safety_tick()
}

#[derive(Debug, Default)]
struct Tally {
    pool_timeouts: AtomicU64,
    other_errors: AtomicU64,
}

impl Tally {
    fn record(&self, error: &dunite_core::Error) {
        if error.is_pool_timeout() {
            self.pool_timeouts.fetch_add(1, Ordering::Relaxed);
        } else {
            self.other_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn record_download(&self, error: &dunite_download::Error) {
        match error.as_cache() {
            Some(error) => self.record(error),
            None => {
                self.other_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// 64 fetch-throughs from 8 tasks that also read, through `DownloadCache`: no
/// `PoolTimedOut`, the cap holds once the burst ends, every file still present reads back
/// with its sha256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_cache_survives_a_burst_on_a_pool_of_two() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open_with(dir.path(), policy(), pool(), HOUR).await;
    let upstream = Upstream::default();
    let tally = Arc::new(Tally::default());
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let (cache, tally, upstream) = (cache.clone(), tally.clone(), upstream.clone());
        tasks.spawn(async move {
            let mut mine = Vec::new();
            for i in 0..FETCHES_PER_TASK {
                let key = url(&format!("task-{t}/file-{i}"));
                let (_, bytes) = content(t * 1000 + i, FILE);
                upstream.serve(&key, bytes.clone(), Some("\"v1\""));
                match cache.get_or_fetch(&verified_request(&key, &bytes), &upstream).await {
                    Ok(_) => mine.push(key),
                    Err(e) => tally.record_download(&e),
                }
                for key in &mine {
                    if let Err(e) = cache.open(key).await {
                        tally.record_download(&e);
                    }
                }
            }
            mine
        });
    }
    let stored: Vec<_> = tasks.join_all().await.into_iter().flatten().collect();
    assert_eq!(tally.pool_timeouts.load(Ordering::Relaxed), 0, "PoolTimedOut under a burst");
    assert_eq!(tally.other_errors.load(Ordering::Relaxed), 0);
    assert_eq!(stored.len() as u64, TASKS * FETCHES_PER_TASK);
    assert_eq!(upstream.calls() as u64, TASKS * FETCHES_PER_TASK);

    eventually(Duration::from_secs(30), || async { cache.total_bytes().await.unwrap() <= CAP }).await;
    cache.evict_if_over_cap().await.unwrap();
    let total = check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
    assert!(total <= CAP);
    let mut present = 0;
    for key in &stored {
        present += u64::from(read_verified(&cache, key).await.is_some());
    }
    assert!(present > 0 && present * FILE as u64 == total);
    assert_eq!(cache.stats().evictor.errors, 0, "{:?}", cache.stats());
}

/// The same burst through the legacy per-store spawn on a bare entry store: the pool times
/// out. This is the failure `DownloadCache` exists to prevent, and proves the test above can
/// fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_spawn_per_store_hits_pool_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dunite_core::Database::open_sqlite(&dir.path().join("metadata.db"), &pool()).await.unwrap();
    let store = EntryStore::open(db, NAMESPACE, dir.path(), CAP, OnConflict::Replace).await.unwrap();
    let tally = Arc::new(Tally::default());
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let (store, tally) = (store.clone(), tally.clone());
        tasks.spawn(async move {
            let mut evictions = Vec::new();
            for i in 0..FETCHES_PER_TASK {
                let key = url(&format!("task-{t}/file-{i}"));
                let (digest, bytes) = content(t * 1000 + i, FILE);
                let expected = Expected::new().with_size(FILE as u64).with_digest(digest);
                match store.store(key.as_str(), &bytes[..], &expected, "").await {
                    Ok(_) => evictions.push(tokio::spawn(legacy_evict_if_over_cap(store.clone(), policy()))),
                    Err(e) => tally.record(&e),
                }
                if let Err(e) = store.open_entry(key.as_str()).await {
                    tally.record(&e);
                }
            }
            for eviction in evictions {
                if let Err(e) = eviction.await.unwrap() {
                    tally.record(&e);
                }
            }
        });
    }
    tasks.join_all().await;
    let timeouts = tally.pool_timeouts.load(Ordering::Relaxed);
    assert!(timeouts > 0, "the legacy pattern should exhaust a pool of 2");
}
