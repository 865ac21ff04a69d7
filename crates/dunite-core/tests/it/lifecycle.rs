//! The evictor's life: one pass at a time, shutdown, failures, retries and the safety tick.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dunite_core::{
    DebouncedEvictor, Error, EvictionPass, EvictionPolicy, EvictionStore, MemoryStore, PassOutcome, Removal,
    Victim,
};

use dunite_testkit::legacy_evict_if_over_cap;

use crate::support::TestStore;

/// Polls `condition` on (possibly paused) Tokio time until it holds, failing after
/// `deadline`; at most about 2,000 polls whatever the deadline.
pub async fn eventually(deadline: Duration, mut condition: impl FnMut() -> bool) {
    let give_up = tokio::time::Instant::now() + deadline;
    let step = (deadline / 2_000).max(Duration::from_millis(1));
    while !condition() {
        assert!(tokio::time::Instant::now() < give_up, "condition not reached within {deadline:?}");
        tokio::time::sleep(step).await;
    }
}

#[test]
fn spawning_outside_a_runtime_is_a_clear_error() {
    let err = DebouncedEvictor::spawn(MemoryStore::new(), EvictionPolicy::new(10)).unwrap_err();
    assert!(matches!(err, Error::NoRuntime), "{err:?}");
    assert!(err.to_string().contains("Tokio runtime"));
}

#[tokio::test]
async fn an_inconsistent_policy_is_refused() {
    let err = DebouncedEvictor::spawn(MemoryStore::new(), EvictionPolicy::new(10).with_low_watermark(20));
    assert!(matches!(err, Err(Error::InvalidPolicy(_))), "{err:?}");
}

/// Background and explicit passes under heavy concurrent poking on a multi-threaded runtime:
/// never more than one pass at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_one_pass_runs_at_a_time() {
    let store = TestStore::new(Duration::ZERO, 64, Duration::from_secs(30));
    let evictor =
        DebouncedEvictor::spawn(store.clone(), EvictionPolicy::new(2_000).with_batch_size(3)).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..4 {
        let (store, evictor) = (store.clone(), evictor.clone());
        tasks.spawn(async move {
            for i in 0..300 {
                store.store(&format!("{t}-{i}"), 97).await.unwrap();
                evictor.poke();
            }
        });
    }
    for _ in 0..4 {
        let evictor = evictor.clone();
        tasks.spawn(async move {
            for _ in 0..25 {
                evictor.evict_now().await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    evictor.evict_now().await.unwrap();
    let stats = evictor.stats();
    assert!(stats.passes > 10, "the test must actually run many passes: {stats:?}");
    assert!(stats.entries_evicted > 0, "{stats:?}");
    assert_eq!(store.counters().max_active_passes.load(Ordering::SeqCst), 1, "{stats:?}");
    assert!(store.inner.total_bytes() <= 2_000);
}

/// The instrumentation above does see overlap when there is some: the legacy driver,
/// deterministically on the paused clock.
#[tokio::test(start_paused = true)]
async fn overlap_instrumentation_catches_the_legacy_driver() {
    let store = TestStore::new(Duration::from_millis(1), 64, Duration::from_secs(30));
    let policy = EvictionPolicy::new(200);
    let mut passes = Vec::new();
    for i in 0..8 {
        store.store(&format!("k{i}"), 97).await.unwrap();
        passes.push(tokio::spawn(legacy_evict_if_over_cap(store.clone(), policy.clone())));
    }
    for pass in passes {
        pass.await.unwrap().unwrap();
    }
    assert!(store.counters().max_active_passes.load(Ordering::SeqCst) > 1);
}

#[tokio::test(start_paused = true)]
async fn task_ends_when_the_last_handle_drops() {
    let store = TestStore::new(Duration::from_millis(1), 4, Duration::from_secs(1));
    let alive = store.weak();
    let evictor = DebouncedEvictor::spawn(store.clone(), EvictionPolicy::new(100)).unwrap();
    drop(store);
    let clone = evictor.clone();
    drop(evictor);
    clone.poke();
    clone.evict_now().await.unwrap();
    assert!(alive.upgrade().is_some(), "one handle is left: the task must still run");
    drop(clone);
    eventually(Duration::from_secs(5), || alive.upgrade().is_none()).await;
}

/// Dropping the last handle mid-pass lets the removal in flight finish, then stops at the next
/// batch boundary (one-entry batches here, so exactly one entry goes).
#[tokio::test(start_paused = true)]
async fn dropping_the_handle_mid_pass_stops_at_an_entry_boundary() {
    let store = TestStore::new(Duration::from_millis(1), 4, Duration::from_secs(1));
    for i in 0..5 {
        store.store(&format!("k{i}"), 100).await.unwrap();
    }
    let (entered, release) = store.gate_removals();
    let policy = EvictionPolicy::new(150).with_low_watermark(0).with_batch_size(1);
    let evictor = DebouncedEvictor::spawn(store.clone(), policy).unwrap();
    evictor.poke();
    entered.notified().await;
    drop(evictor);
    release.add_permits(100);
    let alive = store.weak();
    let inner = store.inner.clone();
    let removals = store.counters().removals.lock().unwrap().len();
    assert_eq!(removals, 0, "the first removal is still gated");
    drop(store);
    eventually(Duration::from_secs(5), || alive.upgrade().is_none()).await;
    assert_eq!(inner.len(), 4, "exactly the entry in flight was removed");
    assert_eq!(inner.total_bytes(), inner.recount_bytes());
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_is_retried_with_backoff_and_converges() {
    let store = TestStore::new(Duration::from_millis(1), 4, Duration::from_secs(1));
    let policy = EvictionPolicy::new(250)
        .without_safety_tick()
        .with_retry_backoff(Duration::from_millis(10), Duration::from_millis(200));
    let evictor = DebouncedEvictor::spawn(store.clone(), policy).unwrap();
    store.counters().faults_left.store(7, Ordering::SeqCst);
    for i in 0..5 {
        store.store(&format!("k{i}"), 100).await.unwrap();
        evictor.poke();
    }
    eventually(Duration::from_secs(60), || store.inner.total_bytes() <= 250).await;
    let stats = evictor.stats();
    assert!(stats.errors >= 1, "faults were injected: {stats:?}");
    assert!(stats.passes < 20, "backoff must bound the retries: {stats:?}");
    assert_eq!(evictor.evict_now().await.unwrap().outcome, PassOutcome::UnderCap);
}

#[tokio::test(start_paused = true)]
async fn an_explicit_pass_reports_the_store_error() {
    let store = TestStore::new(Duration::from_millis(1), 4, Duration::from_secs(1));
    let evictor = DebouncedEvictor::spawn(store.clone(), EvictionPolicy::new(250)).unwrap();
    store.counters().faults_left.store(1, Ordering::SeqCst);
    let err = evictor.evict_now().await.unwrap_err();
    assert!(err.to_string().contains("begin a pass"), "{err}");
    evictor.evict_now().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_panicking_store_does_not_kill_the_task() {
    let store = TestStore::new(Duration::from_millis(1), 4, Duration::from_secs(1));
    let evictor = DebouncedEvictor::spawn(store.clone(), EvictionPolicy::new(250)).unwrap();
    store.counters().panic_next.store(true, Ordering::SeqCst);
    assert!(matches!(evictor.evict_now().await, Err(Error::Panicked)));
    for i in 0..5 {
        store.store(&format!("k{i}"), 100).await.unwrap();
    }
    evictor.poke();
    eventually(Duration::from_secs(60), || store.inner.total_bytes() <= 250).await;
}

/// An idle cache gets no pokes; the safety tick still finishes the job.
#[tokio::test(start_paused = true)]
async fn the_safety_tick_evicts_without_pokes() {
    let store = TestStore::new(Duration::from_millis(1), 4, Duration::from_secs(1));
    let policy = EvictionPolicy::new(250).with_safety_tick(Duration::from_secs(10));
    let _evictor = DebouncedEvictor::spawn(store.clone(), policy).unwrap();
    for i in 0..5 {
        store.store(&format!("k{i}"), 100).await.unwrap();
    }
    eventually(Duration::from_secs(30), || store.inner.total_bytes() <= 250).await;
}

/// Everything pinned: the pass makes no progress and is retried (without a poke) once the
/// pins are released.
#[tokio::test(start_paused = true)]
async fn a_pass_blocked_by_pins_is_retried() {
    let store = MemoryStore::new();
    let policy = EvictionPolicy::new(250)
        .without_safety_tick()
        .with_retry_backoff(Duration::from_millis(10), Duration::from_millis(100));
    let evictor = DebouncedEvictor::spawn(store.clone(), policy).unwrap();
    for i in 0..5 {
        store.insert(format!("k{i}"), 100);
        store.pin(&format!("k{i}"));
    }
    assert_eq!(evictor.evict_now().await.unwrap().outcome, PassOutcome::NoProgress);
    for i in 0..5 {
        store.unpin(&format!("k{i}"));
    }
    eventually(Duration::from_secs(10), || store.total_bytes() <= 250).await;
}

#[tokio::test(start_paused = true)]
async fn stats_count_pokes_coalescing_and_evictions() {
    let store = MemoryStore::new();
    let evictor =
        DebouncedEvictor::spawn(store.clone(), EvictionPolicy::new(100).with_low_watermark(50)).unwrap();
    for i in 0..4 {
        store.insert(format!("k{i}"), 40);
        evictor.poke();
    }
    let report = evictor.evict_now().await.unwrap();
    let stats = evictor.stats();
    assert_eq!(stats.pokes, 4);
    assert_eq!(stats.pokes_coalesced, 3, "the task had no chance to run between pokes");
    assert_eq!(stats.entries_evicted, 3);
    assert_eq!(stats.bytes_evicted, 120);
    assert_eq!(store.total_bytes(), 40);
    assert_eq!(stats.last_pass.as_ref(), Some(&report));
}

/// Another process holds the shared store's eviction lock for the next three passes: each is
/// turned away (`PassOutcome::Elsewhere`, counted, not an error), retried after the initial
/// retry delay without any new poke, and the fourth runs and evicts. A loop that treated
/// "elsewhere" as done would stay over the cap: the store that poked committed after the
/// other process's pass read its total.
#[tokio::test(start_paused = true)]
async fn a_pass_turned_away_by_another_process_is_retried_until_it_runs() {
    let store = TestStore::new(Duration::ZERO, 4, Duration::from_secs(30));
    let policy = EvictionPolicy::new(100)
        .without_safety_tick()
        .with_retry_backoff(Duration::from_millis(100), Duration::from_secs(10));
    let evictor = DebouncedEvictor::spawn(store.clone(), policy).unwrap();
    store.counters().busy_passes.store(3, Ordering::SeqCst);
    for i in 0..5 {
        store.store(&format!("k{i}"), 40).await.unwrap();
    }
    let poked = tokio::time::Instant::now();
    evictor.poke();
    eventually(Duration::from_secs(5), || store.inner.total_bytes() <= 100).await;
    // Retries spaced by the initial delay (100 ms), without growing it as failures do
    // (that would take 100 + 200 + 400 ms): not spun, not stretched.
    let took = poked.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(600), "{took:?}");
    let stats = evictor.stats();
    assert_eq!(stats.passes_elsewhere, 3, "{stats:?}");
    assert_eq!(stats.errors, 0, "being turned away is not a failure");
    assert_eq!(stats.passes, 1, "one pass ran, after three were turned away: {stats:?}");
    assert_eq!(store.counters().finished_passes.load(Ordering::SeqCst), 1, "every pass run is finished");
    let report = evictor.evict_now().await.unwrap();
    assert_eq!(report.outcome, PassOutcome::UnderCap);
}

/// A store whose every selected candidate is replaced (a concurrent store of the same key)
/// before the pass can remove it, for the first `churned` selections.
#[derive(Clone)]
struct Churning {
    inner: MemoryStore,
    churned: Arc<AtomicU32>,
}

struct ChurningPass {
    pass: dunite_core::MemoryPass,
    store: Churning,
}

#[async_trait::async_trait]
impl EvictionStore for Churning {
    type Error = dunite_core::MemoryStoreError;
    type Pass = ChurningPass;

    async fn begin_pass(&self) -> Result<Option<ChurningPass>, Self::Error> {
        let pass = self.inner.begin_pass().await?.expect("memory passes always begin");
        Ok(Some(ChurningPass { pass, store: self.clone() }))
    }
}

#[async_trait::async_trait]
impl EvictionPass for ChurningPass {
    type Error = dunite_core::MemoryStoreError;

    async fn total_size_bytes(&mut self) -> Result<u64, Self::Error> {
        self.pass.total_size_bytes().await
    }

    async fn least_recently_used(&mut self, limit: usize) -> Result<Vec<Victim>, Self::Error> {
        let victims = self.pass.least_recently_used(limit).await?;
        let churn = self.store.churned.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if churn.is_ok() {
            for victim in &victims {
                self.store.inner.insert(victim.key.clone(), victim.bytes);
            }
        }
        Ok(victims)
    }

    async fn remove(&mut self, victim: &Victim) -> Result<Removal, Self::Error> {
        self.pass.remove(victim).await
    }
}

/// A pass over the cap whose first selections all changed under it selects again and
/// removes, instead of reporting `NoProgress` and leaving the cache over its cap until the
/// next poke (which, after the burst's last store, never comes). Fails before the evictor
/// selected again.
#[tokio::test]
async fn a_pass_whose_candidates_all_changed_selects_again_and_removes() {
    let inner = MemoryStore::new();
    for i in 0..10 {
        inner.insert(format!("k{i}"), 100);
    }
    let store = Churning { inner: inner.clone(), churned: Arc::new(AtomicU32::new(2)) };
    let evictor = DebouncedEvictor::spawn(store, EvictionPolicy::new(500).with_batch_size(4)).unwrap();
    let report = evictor.evict_now().await.unwrap();
    assert_eq!(report.outcome, PassOutcome::Evicted, "{report:?}");
    assert!(inner.total_bytes() <= 500, "{report:?}");
    assert_eq!(report.entries_skipped, 8, "two churned selections of four: {report:?}");
    assert_eq!(evictor.stats().passes_stalled, 0);
}

/// Candidates that keep changing do not hold the pass's connection for ever: after a few
/// fruitless selections it reports `NoProgress` (and counts a stalled pass).
#[tokio::test]
async fn a_pass_whose_candidates_keep_changing_gives_up() {
    let inner = MemoryStore::new();
    for i in 0..10 {
        inner.insert(format!("k{i}"), 100);
    }
    let store = Churning { inner: inner.clone(), churned: Arc::new(AtomicU32::new(u32::MAX)) };
    let evictor = DebouncedEvictor::spawn(store, EvictionPolicy::new(500).with_batch_size(4)).unwrap();
    let report = evictor.evict_now().await.unwrap();
    assert_eq!(report.outcome, PassOutcome::NoProgress, "{report:?}");
    assert_eq!(report.entries_evicted, 0);
    assert_eq!(evictor.stats().passes_stalled, 1);
}

/// `on_evicted` hears every entry a pass removed, once it is gone, and nothing else: not a
/// pinned candidate the pass left, not an explicit removal outside a pass.
#[tokio::test]
async fn observers_hear_each_eviction_once_it_is_done() {
    let store = MemoryStore::new();
    let evictor =
        DebouncedEvictor::spawn(store.clone(), EvictionPolicy::new(1_000).with_low_watermark(600)).unwrap();
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (record, seen_by) = (Arc::clone(&heard), store.clone());
    evictor.on_evicted(move |victim: &Victim| {
        assert!(!seen_by.contains(&victim.key), "{} reported before its removal", victim.key);
        record.lock().unwrap().push((victim.key.clone(), victim.bytes));
    });
    for key in ["a", "b", "c", "d", "e"] {
        store.insert(key, 300);
    }
    assert!(store.pin("a"));
    store.remove("e");
    let report = evictor.evict_now().await.unwrap();
    let heard = heard.lock().unwrap().clone();
    assert_eq!(heard, [("b".to_owned(), 300), ("c".to_owned(), 300)], "{report:?}");
    assert_eq!(report.entries_evicted, heard.len() as u64);
    assert!(store.contains("a") && store.contains("d"));
}
