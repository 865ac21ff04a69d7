//! The production failure, reproduced: a burst of blob stores against a pool of 2.

use std::sync::Arc;

use std::time::Duration;

use dunite_core::{EntryStore, EvictionPolicy, OnConflict};
use dunite_testkit::{
    LegacyBurst, PoolTally, TestBackend, check_consistency, legacy_store_burst, pool_of_two, test_database,
};

use crate::{blob, eventually, open_on, read_verified};

const TASKS: u64 = 8;
const STORES_PER_TASK: u64 = 8;
const BLOB: usize = 32 * 1024;
const CAP: u64 = 16 * BLOB as u64;

fn policy() -> EvictionPolicy {
    EvictionPolicy::new(CAP).without_safety_tick()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_cache_survives_a_burst_on_a_pool_of_two() {
    blob_cache_burst(TestBackend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_cache_survives_a_burst_on_a_pool_of_two_on_postgres() {
    blob_cache_burst(TestBackend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_spawn_per_store_hits_pool_timeouts() {
    let timeouts = legacy_burst(TestBackend::Sqlite).await.unwrap().pool_timeouts;
    // Measured: about 90 of the 64 stores' reads and passes time out (2026-11-24).
    assert!(timeouts > 0, "the legacy pattern should exhaust a pool of 2");
}

/// On PostgreSQL the legacy passes take the store's cross-instance eviction lock (without
/// waiting), so they do not pile onto the pool; but a pass turned away is simply lost, and
/// the cap then holds after the burst only if the pass that ran last came after the last
/// store (measured for blobs, three runs: 1.37-1.56x the cap, with 0-6 timeouts; about 1 run
/// in 15 ends exactly at the cap by that luck). Any of the three shows the legacy pattern does
/// not hold the cap there; `blob_cache_survives_a_burst_on_a_pool_of_two_on_postgres` must (its one evictor never competes with itself, and
/// retries a pass another instance turned away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_spawn_per_store_fails_on_postgres_too() {
    let Some(burst) = legacy_burst(TestBackend::Postgres).await else { return };
    assert!(
        burst.pool_timeouts > 0 || burst.final_total > CAP || burst.passes_lost > 0,
        "the legacy pattern should time out, lose passes or lose the cap ({burst:?}, cap {CAP})"
    );
}

/// 64 stores from 8 tasks that also read, through `BlobCache`: no `PoolTimedOut`, the cap
/// holds once the burst ends, every blob still present reads back with its digest.
async fn blob_cache_burst(backend: TestBackend) {
    let dir = tempfile::tempdir().unwrap();
    let Some((cache, _db)) = open_on(backend, dir.path(), policy(), pool_of_two()).await else { return };
    let tally = Arc::new(PoolTally::default());
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let (cache, tally) = (cache.clone(), tally.clone());
        tasks.spawn(async move {
            let mut mine = Vec::new();
            for i in 0..STORES_PER_TASK {
                let (digest, bytes) = blob(t * 1000 + i, BLOB);
                match cache.store_with_size(&digest, bytes.len() as u64, &bytes[..]).await {
                    Ok(_) => mine.push(digest),
                    Err(e) => tally.record(e.as_cache().unwrap()),
                }
                for digest in &mine {
                    if let Err(e) = cache.open(digest).await {
                        tally.record(e.as_cache().unwrap());
                    }
                }
            }
            mine
        });
    }
    let stored: Vec<_> = tasks.join_all().await.into_iter().flatten().collect();
    assert_eq!(tally.pool_timeouts(), 0, "PoolTimedOut under a burst");
    assert_eq!(tally.other_errors(), 0);
    assert_eq!(stored.len() as u64, TASKS * STORES_PER_TASK);

    eventually(Duration::from_secs(30), || async { cache.total_bytes().await.unwrap() <= CAP }).await;
    cache.evict_if_over_cap().await.unwrap();
    let total = check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
    assert!(total <= CAP);
    let mut present = 0;
    for digest in &stored {
        present += u64::from(read_verified(&cache, digest).await.is_some());
    }
    assert!(present > 0 && present * BLOB as u64 == total);
    assert_eq!(cache.stats().evictor.errors, 0, "{:?}", cache.stats());
}

/// The same burst through the legacy per-store spawn: the pool times out. This is the
/// failure `BlobCache` exists to prevent, and proves the test above can fail.
async fn legacy_burst(backend: TestBackend) -> Option<LegacyBurst> {
    let dir = tempfile::tempdir().unwrap();
    let db = test_database(backend, dir.path(), &pool_of_two()).await?;
    let namespace = dunite_oci::NAMESPACE;
    let store = EntryStore::open(db.database().clone(), namespace, dir.path(), CAP, OnConflict::KeepExisting)
        .await
        .unwrap();
    Some(
        legacy_store_burst(&store, policy(), TASKS, STORES_PER_TASK, |t, i| {
            let (digest, bytes) = blob(t * 1000 + i, BLOB);
            (digest.to_string(), bytes, digest.content_digest().clone())
        })
        .await,
    )
}
