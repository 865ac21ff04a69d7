//! The burst regression at the blob cache's level.

use std::time::Duration;

use dunite_testkit::check_consistency;

use crate::{blob, eventually, open, read_verified};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_concurrent_stores_coalesces_into_few_eviction_passes_and_converges() {
    const N: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 250 * 1024).await;
    let passes_at_start = cache.stats().evictor.passes;

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N as usize));
    let mut stores = tokio::task::JoinSet::new();
    for i in 0..N {
        let (cache, barrier) = (cache.clone(), barrier.clone());
        stores.spawn(async move {
            let (digest, bytes) = blob(i, 100 * 1024);
            barrier.wait().await;
            cache.store_with_size(&digest, bytes.len() as u64, &bytes[..]).await.unwrap();
            digest
        });
    }
    let digests = stores.join_all().await;
    eventually(Duration::from_secs(30), || async { cache.total_bytes().await.unwrap() <= 250 * 1024 }).await;
    // Quiesce: waits out any pass in flight and folds any pending poke.
    cache.evict_if_over_cap().await.unwrap();

    let stats = cache.stats();
    let background_passes = stats.evictor.passes - passes_at_start - 1;
    assert!(background_passes >= 1, "the burst must have caused eviction: {stats:?}");
    assert!(background_passes * 2 <= N, "{background_passes} passes for {N} stores: {stats:?}");
    assert!(stats.evictor.entries_evicted >= 6, "{stats:?}");
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
    for digest in &digests {
        read_verified(&cache, digest).await;
    }
}

/// Concurrent stores of one digest count its bytes once and leave one intact payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stores_of_one_digest_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 10 << 20).await;
    let (digest, bytes) = blob(7, 300 * 1024);
    let mut stores = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (cache, digest, bytes) = (cache.clone(), digest.clone(), bytes.clone());
        stores.spawn(
            async move { cache.store_with_size(&digest, bytes.len() as u64, &bytes[..]).await.unwrap() },
        );
    }
    let outcomes = stores.join_all().await;
    let inserted = outcomes.iter().filter(|s| s.outcome == dunite_core::StoreOutcome::Inserted).count();
    assert_eq!(inserted, 1, "{outcomes:?}");
    assert_eq!(cache.total_bytes().await.unwrap(), bytes.len() as u64);
    assert_eq!(cache.len().await.unwrap(), 1);
    assert_eq!(read_verified(&cache, &digest).await.unwrap(), bytes);
    check_consistency(cache.entries().entries(), dir.path()).await.unwrap();
}
