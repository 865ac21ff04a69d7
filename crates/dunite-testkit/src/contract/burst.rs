//! Bursts of concurrent stores: few eviction passes, convergence under the cap, one count per key.

use std::sync::Arc;
use std::time::Duration;

use dunite_core::{DatabaseOptions, EvictionPolicy, StoreOutcome};

use super::{ContractCache, Item, open};
use crate::{TestBackend, eventually};

/// Eight stores of 100 KiB start together on a cache capped at 250 KiB: their pokes coalesce
/// into at least one and at most four background passes, which bring the total under the cap
/// without an explicit pass; at least six entries are evicted; rows, total and files agree
/// and every entry left reads back intact. A fetch-through cache asked its source once per
/// store.
///
/// Needs a multi-threaded runtime (`#[tokio::test(flavor = "multi_thread", worker_threads =
/// 2)]`).
///
/// # Panics
///
/// When the contract is broken.
pub async fn burst_of_concurrent_stores_coalesces_into_few_eviction_passes_and_converges<C: ContractCache>() {
    const N: u64 = 8;
    const CAP: u64 = 250 * 1024;
    let policy = EvictionPolicy::new(CAP).without_safety_tick();
    let opened = open::<C>(TestBackend::Sqlite, &DatabaseOptions::new(), policy, false)
        .await
        .expect("SQLite is always there");
    let cache = &opened.cache;
    let passes_at_start = cache.stats().evictor.passes;

    let barrier = Arc::new(tokio::sync::Barrier::new(N as usize));
    let mut stores = tokio::task::JoinSet::new();
    for i in 0..N {
        let (cache, barrier) = (cache.clone(), barrier.clone());
        stores.spawn(async move {
            let item = Item { verified: false, ..Item::new(i, 100 * 1024) };
            barrier.wait().await;
            cache.put(&item).await.expect("store").key
        });
    }
    let keys = stores.join_all().await;
    if let Some(calls) = cache.source_calls() {
        assert_eq!(calls, N, "one source request per store");
    }
    eventually(Duration::from_secs(30), || async { cache.total_bytes().await.expect("total") <= CAP }).await;
    // Quiesce: waits out any pass in flight and folds any pending poke.
    cache.evict_now().await.expect("a pass");

    let stats = cache.stats();
    let background_passes = stats.evictor.passes - passes_at_start - 1;
    assert!(background_passes >= 1, "the burst must have caused eviction: {stats:?}");
    assert!(background_passes * 2 <= N, "{background_passes} passes for {N} stores: {stats:?}");
    assert!(stats.evictor.entries_evicted >= 6, "{stats:?}");
    opened.check_consistency().await.expect("consistent");
    for key in &keys {
        opened.read_verified(key).await;
    }
}

/// Eight concurrent stores of one 300 KiB item: one entry, its bytes counted once, its
/// payload intact; where the cache reports store outcomes, exactly one store inserted.
///
/// Needs a multi-threaded runtime.
///
/// # Panics
///
/// When the contract is broken.
pub async fn concurrent_stores_of_one_key_count_once<C: ContractCache>() {
    let policy = EvictionPolicy::new(10 << 20).without_safety_tick();
    let opened = open::<C>(TestBackend::Sqlite, &DatabaseOptions::new(), policy, false)
        .await
        .expect("SQLite is always there");
    let cache = &opened.cache;
    let item = Item::new(7, 300 * 1024);
    let mut stores = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let cache = cache.clone();
        stores.spawn(async move { cache.put(&item).await.expect("store") });
    }
    let puts = stores.join_all().await;
    let outcomes: Vec<_> = puts.iter().filter_map(|put| put.outcome).collect();
    if !outcomes.is_empty() {
        assert_eq!(outcomes.len(), puts.len(), "some stores report an outcome, some do not: {puts:?}");
        let inserted = outcomes.iter().filter(|outcome| **outcome == StoreOutcome::Inserted).count();
        assert_eq!(inserted, 1, "{outcomes:?}");
    }
    assert!(puts.iter().all(|put| put.sha256 == item.sha256()), "{puts:?}");
    assert_eq!(cache.total_bytes().await.expect("total"), item.size as u64);
    assert_eq!(cache.entry_count().await.expect("entry count"), 1);
    assert_eq!(opened.read_verified(&puts[0].key).await, Some(item.bytes()));
    opened.check_consistency().await.expect("consistent");
}
