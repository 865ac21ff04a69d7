//! Instrumented stores and the legacy per-store-spawn driver the evictor replaces.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dunite_core::{EvictionPass, EvictionStore, MemoryPass, MemoryStore, Removal, Victim};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The error of the instrumented store.
#[derive(Debug, thiserror::Error)]
pub enum TestStoreError {
    #[error("pool timed out")]
    PoolTimedOut,
    #[error("injected fault")]
    Injected,
}

/// A [`MemoryStore`] behind a model of a bounded connection pool, with simulated latency,
/// counters and fault injection.
#[derive(Clone)]
pub struct TestStore {
    pub inner: MemoryStore,
    shared: Arc<Counters>,
    latency: Duration,
    pool: Arc<Semaphore>,
    acquire_timeout: Duration,
}

#[derive(Default)]
pub struct Counters {
    pub total_calls: AtomicU64,
    pub active_passes: AtomicUsize,
    pub max_active_passes: AtomicUsize,
    pub pool_timeouts: AtomicU64,
    pub faults_left: AtomicU32,
    /// Every removal, as (key, version).
    pub removals: Mutex<Vec<(String, i64)>>,
    /// Removals of victims this pass never selected (must stay empty).
    pub unselected_removals: AtomicU64,
    /// When set, the next store call panics.
    pub panic_next: std::sync::atomic::AtomicBool,
    /// The next `n` passes find the store busy: another process holds it (`Ok(None)`).
    pub busy_passes: AtomicU32,
    /// Passes that finished (`EvictionPass::finish`).
    pub finished_passes: AtomicU64,
    remove_gate: Mutex<Option<(Arc<tokio::sync::Notify>, Arc<Semaphore>)>>,
}

impl TestStore {
    pub fn new(latency: Duration, pool_size: usize, acquire_timeout: Duration) -> Self {
        Self {
            inner: MemoryStore::new(),
            shared: Arc::default(),
            latency,
            pool: Arc::new(Semaphore::new(pool_size)),
            acquire_timeout,
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.shared
    }

    /// Observes the store's lifetime: dead once every clone (the evictor's included) is gone.
    pub fn weak(&self) -> std::sync::Weak<Counters> {
        Arc::downgrade(&self.shared)
    }

    /// Make every `remove` announce itself on `entered` and wait for a permit on `release`.
    pub fn gate_removals(&self) -> (Arc<tokio::sync::Notify>, Arc<Semaphore>) {
        let gate = (Arc::new(tokio::sync::Notify::new()), Arc::new(Semaphore::new(0)));
        *self.shared.remove_gate.lock().unwrap() = Some(gate.clone());
        gate
    }

    /// A store as a cache does it: take a pool connection, commit, release it.
    pub async fn store(&self, key: &str, bytes: u64) -> Result<i64, TestStoreError> {
        let _conn = self.acquire().await?;
        self.simulate_latency().await;
        Ok(self.inner.insert(key, bytes))
    }

    async fn acquire(&self) -> Result<OwnedSemaphorePermit, TestStoreError> {
        match tokio::time::timeout(self.acquire_timeout, Arc::clone(&self.pool).acquire_owned()).await {
            Ok(permit) => Ok(permit.expect("pool semaphore is never closed")),
            Err(_) => {
                self.shared.pool_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(TestStoreError::PoolTimedOut)
            }
        }
    }

    async fn simulate_latency(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        } else {
            tokio::task::yield_now().await;
        }
    }

    fn maybe_fail(&self) -> Result<(), TestStoreError> {
        assert!(!self.shared.panic_next.swap(false, Ordering::SeqCst), "injected panic");
        let took =
            self.shared.faults_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if took.is_ok() { Err(TestStoreError::Injected) } else { Ok(()) }
    }
}

/// One pass: holds one pool connection for its whole life.
pub struct TestPass {
    store: TestStore,
    inner: MemoryPass,
    selected: HashSet<(String, i64)>,
    _conn: OwnedSemaphorePermit,
}

impl Drop for TestPass {
    fn drop(&mut self) {
        self.store.shared.active_passes.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl EvictionStore for TestStore {
    type Error = TestStoreError;
    type Pass = TestPass;

    async fn begin_pass(&self) -> Result<Option<TestPass>, TestStoreError> {
        self.maybe_fail()?;
        let busy =
            self.shared.busy_passes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if busy.is_ok() {
            return Ok(None);
        }
        let conn = self.acquire().await?;
        let active = self.shared.active_passes.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.max_active_passes.fetch_max(active, Ordering::SeqCst);
        let inner = self.inner.begin_pass().await.expect("memory store never fails").expect("not shared");
        Ok(Some(TestPass { store: self.clone(), inner, selected: HashSet::new(), _conn: conn }))
    }
}

#[async_trait]
impl EvictionPass for TestPass {
    type Error = TestStoreError;

    async fn total_size_bytes(&mut self) -> Result<u64, TestStoreError> {
        self.store.shared.total_calls.fetch_add(1, Ordering::SeqCst);
        self.store.maybe_fail()?;
        self.store.simulate_latency().await;
        Ok(self.inner.total_size_bytes().await.expect("memory store never fails"))
    }

    async fn least_recently_used(&mut self, limit: usize) -> Result<Vec<Victim>, TestStoreError> {
        self.store.maybe_fail()?;
        self.store.simulate_latency().await;
        let victims = self.inner.least_recently_used(limit).await.expect("memory store never fails");
        self.selected.extend(victims.iter().map(|v| (v.key.clone(), v.version)));
        Ok(victims)
    }

    async fn remove(&mut self, victim: &Victim) -> Result<Removal, TestStoreError> {
        self.store.maybe_fail()?;
        let gate = self.store.shared.remove_gate.lock().unwrap().clone();
        if let Some((entered, release)) = gate {
            entered.notify_one();
            release.acquire().await.expect("gate is never closed").forget();
        }
        if !self.selected.contains(&(victim.key.clone(), victim.version)) {
            self.store.shared.unselected_removals.fetch_add(1, Ordering::SeqCst);
        }
        self.store.simulate_latency().await;
        let removal = self.inner.remove(victim).await.expect("memory store never fails");
        if let Removal::Removed { .. } = removal {
            self.store.shared.removals.lock().unwrap().push((victim.key.clone(), victim.version));
        }
        Ok(removal)
    }

    async fn finish(self) -> Result<(), TestStoreError> {
        self.store.shared.finished_passes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Checks that every stored version that is gone was removed by an eviction (or replaced by
/// a later store of the same key), and that no version was removed twice.
pub fn check_removal_log(store: &TestStore, stored: &[(String, i64)]) -> Result<(), String> {
    let removals = store.counters().removals.lock().unwrap().clone();
    let unique: HashSet<_> = removals.iter().cloned().collect();
    if unique.len() != removals.len() {
        return Err(format!("an entry was removed twice: {removals:?}"));
    }
    let unselected = store.counters().unselected_removals.load(Ordering::SeqCst);
    if unselected != 0 {
        return Err(format!("{unselected} removals of entries the pass never selected"));
    }
    let mut latest: HashMap<&str, i64> = HashMap::new();
    for (key, version) in stored {
        let v = latest.entry(key).or_insert(*version);
        *v = (*v).max(*version);
    }
    for (key, version) in latest {
        // Present at that version or a later one (touched, re-stored), or evicted at one.
        let present = store.inner.version(key).is_some_and(|v| v >= version);
        let evicted = unique.iter().any(|(k, v)| k == key && *v >= version);
        if !present && !evicted {
            return Err(format!("{key}@{version} vanished without an eviction removing it"));
        }
    }
    if store.inner.total_bytes() != store.inner.recount_bytes() {
        return Err("accounted total differs from the sum of entries".into());
    }
    Ok(())
}
