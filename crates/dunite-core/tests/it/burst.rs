//! The burst regression: many concurrent stores must collapse into few eviction passes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use dunite_core::{DebouncedEvictor, EvictionPolicy};

use dunite_testkit::legacy_evict_if_over_cap;

use crate::support::TestStore;

/// How a store is followed by eviction.
#[derive(Debug, Clone, Copy)]
enum Driver {
    Debounced,
    /// `tokio::spawn(evict_if_over_cap)` after every store: what dunite replaces.
    LegacySpawnPerStore,
}

#[derive(Debug)]
struct BurstOutcome {
    n: u64,
    passes: u64,
    final_total: u64,
    cap: u64,
    pool_timeouts: u64,
}

impl BurstOutcome {
    fn check(&self) -> Result<(), String> {
        if self.final_total > self.cap {
            return Err(format!("total {} did not converge under the cap {}", self.final_total, self.cap));
        }
        if self.passes * 2 > self.n {
            return Err(format!("{} passes for {} stores: not coalesced", self.passes, self.n));
        }
        if self.pool_timeouts != 0 {
            return Err(format!("{} pool timeouts", self.pool_timeouts));
        }
        Ok(())
    }
}

/// N stores start together (with a little jitter, as a pull's blobs finish at nearly the same
/// time), each commits through the pool and then triggers eviction through `driver`.
/// Simulated database latency runs on Tokio's paused clock, so the run is deterministic.
async fn burst(driver: Driver, n: u64, cap: u64, blob: u64) -> BurstOutcome {
    let store = TestStore::new(Duration::from_millis(1), 16, Duration::from_secs(5));
    let policy = EvictionPolicy::new(cap).without_safety_tick();
    let evictor = DebouncedEvictor::spawn(store.clone(), policy.clone()).unwrap();

    let mut stores = tokio::task::JoinSet::new();
    for i in 0..n {
        let (store, evictor, policy) = (store.clone(), evictor.clone(), policy.clone());
        stores.spawn(async move {
            tokio::time::sleep(Duration::from_micros(300 * i)).await;
            store.store(&format!("blob-{i}"), blob).await.unwrap();
            match driver {
                Driver::Debounced => {
                    evictor.poke();
                    None
                }
                Driver::LegacySpawnPerStore => Some(tokio::spawn(legacy_evict_if_over_cap(store, policy))),
            }
        });
    }
    let mut legacy_tasks = Vec::new();
    while let Some(spawned) = stores.join_next().await {
        legacy_tasks.extend(spawned.unwrap());
    }
    let mut explicit_passes = 0;
    match driver {
        Driver::Debounced => {
            // The pokes alone must bring the total under the cap...
            crate::lifecycle::eventually(Duration::from_secs(60), || store.inner.total_bytes() <= cap).await;
            // ...then quiesce: wait out any pass in flight and fold any pending poke.
            evictor.evict_now().await.unwrap();
            explicit_passes = 1;
        }
        Driver::LegacySpawnPerStore => {
            for task in legacy_tasks {
                let _ = task.await.unwrap();
            }
        }
    }
    BurstOutcome {
        n,
        passes: store.counters().total_calls.load(Ordering::SeqCst) - explicit_passes,
        final_total: store.inner.total_bytes(),
        cap,
        pool_timeouts: store.counters().pool_timeouts.load(Ordering::SeqCst),
    }
}

#[tokio::test(start_paused = true)]
async fn burst_of_concurrent_stores_coalesces_into_few_eviction_passes_and_converges() {
    let outcome = burst(Driver::Debounced, 8, 250, 100).await;
    outcome.check().unwrap();
    assert!(outcome.passes >= 1, "the burst must have triggered eviction: {outcome:?}");
}

#[tokio::test(start_paused = true)]
async fn burst_of_1024_stores_still_takes_at_most_a_few_passes() {
    let outcome = burst(Driver::Debounced, 1024, 2_500, 100).await;
    outcome.check().unwrap();
    assert!(outcome.passes * 8 <= outcome.n, "{outcome:?}");
}

/// The same scenario through the legacy driver fails the same check: the test can fail.
#[tokio::test(start_paused = true)]
async fn legacy_spawn_per_store_fails_the_burst_check() {
    let outcome = burst(Driver::LegacySpawnPerStore, 8, 250, 100).await;
    let err = outcome.check().unwrap_err();
    assert!(err.contains("not coalesced"), "{err}: {outcome:?}");
}
