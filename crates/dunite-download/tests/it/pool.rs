//! The production failure, reproduced: a burst of fetch-throughs against a pool of 2.

use std::sync::Arc;

use std::time::Duration;

use dunite_core::{EntryStore, EvictionPolicy, OnConflict};
use dunite_download::NAMESPACE;
use dunite_testkit::{
    LegacyBurst, PoolTally, TestBackend, check_consistency, legacy_store_burst, pool_of_two, test_database,
};

use crate::{HOUR, Upstream, content, eventually, open_on, read_verified, url, verified_request};

const TASKS: u64 = 8;
const FETCHES_PER_TASK: u64 = 8;
const FILE: usize = 32 * 1024;
const CAP: u64 = 16 * FILE as u64;

fn policy() -> EvictionPolicy {
    EvictionPolicy::new(CAP).without_safety_tick()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_cache_survives_a_burst_on_a_pool_of_two() {
    download_cache_burst(TestBackend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_cache_survives_a_burst_on_a_pool_of_two_on_postgres() {
    download_cache_burst(TestBackend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_spawn_per_store_hits_pool_timeouts() {
    let timeouts = legacy_burst(TestBackend::Sqlite).await.unwrap().pool_timeouts;
    assert!(timeouts > 0, "the legacy pattern should exhaust a pool of 2");
}

/// On PostgreSQL the legacy passes take the store's cross-instance eviction lock (without
/// waiting), so they do not pile onto the pool; but a pass turned away is simply lost, and
/// the cap then holds after the burst only if the pass that ran last came after the last
/// store (measured for blobs, three runs: 1.37-1.56x the cap, with 0-6 timeouts; about 1 run
/// in 15 ends exactly at the cap by that luck). Any of the three shows the legacy pattern does
/// not hold the cap there; `download_cache_survives_a_burst_on_a_pool_of_two_on_postgres` must (its one evictor never competes with itself, and
/// retries a pass another instance turned away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_spawn_per_store_fails_on_postgres_too() {
    let Some(burst) = legacy_burst(TestBackend::Postgres).await else { return };
    assert!(
        burst.pool_timeouts > 0 || burst.final_total > CAP || burst.passes_lost > 0,
        "the legacy pattern should time out, lose passes or lose the cap ({burst:?}, cap {CAP})"
    );
}

/// 64 fetch-throughs from 8 tasks that also read, through `DownloadCache`: no
/// `PoolTimedOut`, the cap holds once the burst ends, every file still present reads back
/// with its sha256.
async fn download_cache_burst(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((cache, _db)) = open_on(backend, dir.path(), policy(), pool_of_two(), HOUR).await else {
        return;
    };
    let upstream = Upstream::default();
    let tally = Arc::new(PoolTally::default());
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
                    Err(e) => record(&tally, &e),
                }
                for key in &mine {
                    if let Err(e) = cache.open(key).await {
                        record(&tally, &e);
                    }
                }
            }
            mine
        });
    }
    let stored: Vec<_> = tasks.join_all().await.into_iter().flatten().collect();
    assert_eq!(tally.pool_timeouts(), 0, "PoolTimedOut under a burst");
    assert_eq!(tally.other_errors(), 0);
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
async fn legacy_burst(backend: TestBackend) -> Option<LegacyBurst> {
    let dir = tempfile::tempdir().unwrap();
    let db = test_database(backend, dir.path(), &pool_of_two()).await?;
    let store = EntryStore::open(db.database().clone(), NAMESPACE, dir.path(), CAP, OnConflict::Replace)
        .await
        .unwrap();
    Some(
        legacy_store_burst(&store, policy(), TASKS, FETCHES_PER_TASK, |t, i| {
            let (digest, bytes) = content(t * 1000 + i, FILE);
            (url(&format!("task-{t}/file-{i}")).as_str().to_owned(), bytes, digest)
        })
        .await,
    )
}

/// Count a download error: the core's errors by kind, anything else as "other".
fn record(tally: &PoolTally, error: &dunite_download::Error) {
    match error.as_cache() {
        Some(core) => tally.record(core),
        None => tally.record(&dunite_core::Error::InvalidConfig(error.to_string())),
    }
}
