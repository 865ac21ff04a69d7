//! An in-memory [`EvictionStore`]: the reference implementation of the store contract.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use crate::store::{EvictionPass, EvictionStore, Removal, Victim};

/// An in-memory cache index implementing [`EvictionStore`], for tests and as a readable
/// reference for store implementors.
///
/// Entries are byte counts under string keys; every insert or touch gives the entry a new
/// version from a logical clock, which is also its LRU position. The accounted total is kept
/// alongside the entries, and LRU selection walks an ordered index, so a pass costs what it
/// evicts.
///
/// Cloning shares the same store.
///
/// # Example
///
/// ```
/// use dunite_core::MemoryStore;
///
/// let store = MemoryStore::new();
/// store.insert("a", 10);
/// store.insert("b", 20);
/// store.touch("a");
/// assert_eq!(store.total_bytes(), 30);
/// assert_eq!(store.keys_lru_first(), ["b", "a"]);
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// `version -> key`: the LRU order.
    lru: BTreeMap<i64, String>,
    total: u64,
    clock: i64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    bytes: u64,
    version: i64,
    pinned: u32,
}

/// The error type of [`MemoryStore`]; it never fails, but the trait wants a type.
#[derive(Debug, thiserror::Error)]
#[error("memory store error")]
#[non_exhaustive]
pub struct MemoryStoreError;

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryStore")
            .field("entries", &state.entries.len())
            .field("total", &state.total)
            .finish()
    }
}

impl MemoryStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Insert or re-store `key` with `bytes`, making it most recently used. Returns the
    /// entry's new version.
    pub fn insert(&self, key: impl Into<String>, bytes: u64) -> i64 {
        let key = key.into();
        let mut state = self.lock();
        state.clock += 1;
        let version = state.clock;
        let pinned = match state.entries.remove(&key) {
            Some(old) => {
                state.lru.remove(&old.version);
                state.total -= old.bytes;
                old.pinned
            }
            None => 0,
        };
        state.entries.insert(key.clone(), Entry { bytes, version, pinned });
        state.lru.insert(version, key);
        state.total += bytes;
        version
    }

    /// Mark `key` as used now. Returns whether it exists.
    pub fn touch(&self, key: &str) -> bool {
        let mut state = self.lock();
        state.clock += 1;
        let version = state.clock;
        let Some(entry) = state.entries.get_mut(key) else { return false };
        let old = std::mem::replace(&mut entry.version, version);
        state.lru.remove(&old);
        state.lru.insert(version, key.to_owned());
        true
    }

    /// Remove `key` unconditionally. Returns the bytes it held.
    pub fn remove(&self, key: &str) -> Option<u64> {
        let mut state = self.lock();
        let entry = state.entries.remove(key)?;
        state.lru.remove(&entry.version);
        state.total -= entry.bytes;
        Some(entry.bytes)
    }

    /// Protect `key` from eviction until a matching [`unpin`](Self::unpin). Returns whether
    /// it exists.
    pub fn pin(&self, key: &str) -> bool {
        self.lock().entries.get_mut(key).map(|e| e.pinned += 1).is_some()
    }

    /// Undo one [`pin`](Self::pin).
    pub fn unpin(&self, key: &str) {
        if let Some(entry) = self.lock().entries.get_mut(key) {
            entry.pinned = entry.pinned.saturating_sub(1);
        }
    }

    /// Whether `key` is present.
    #[must_use]
    pub fn contains(&self, key: &str) -> bool {
        self.lock().entries.contains_key(key)
    }

    /// The current version of `key`.
    #[must_use]
    pub fn version(&self, key: &str) -> Option<i64> {
        self.lock().entries.get(key).map(|e| e.version)
    }

    /// The accounted total.
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        self.lock().total
    }

    /// The sum of the entries' sizes, computed the slow way (for invariant checks).
    #[must_use]
    pub fn recount_bytes(&self) -> u64 {
        self.lock().entries.values().map(|e| e.bytes).sum()
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the store is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys, least recently used first.
    #[must_use]
    pub fn keys_lru_first(&self) -> Vec<String> {
        self.lock().lru.values().cloned().collect()
    }
}

/// A pass over a [`MemoryStore`].
#[derive(Debug)]
pub struct MemoryPass {
    store: MemoryStore,
}

#[async_trait]
impl EvictionStore for MemoryStore {
    type Error = MemoryStoreError;
    type Pass = MemoryPass;

    async fn begin_pass(&self) -> Result<Option<MemoryPass>, MemoryStoreError> {
        Ok(Some(MemoryPass { store: self.clone() }))
    }
}

#[async_trait]
impl EvictionPass for MemoryPass {
    type Error = MemoryStoreError;

    async fn total_size_bytes(&mut self) -> Result<u64, MemoryStoreError> {
        Ok(self.store.total_bytes())
    }

    async fn least_recently_used(&mut self, limit: usize) -> Result<Vec<Victim>, MemoryStoreError> {
        let state = self.store.lock();
        Ok(state
            .lru
            .iter()
            .filter_map(|(&version, key)| {
                let entry = state.entries.get(key)?;
                (entry.pinned == 0).then(|| Victim::new(key.clone(), entry.bytes, version))
            })
            .take(limit)
            .collect())
    }

    async fn remove(&mut self, victim: &Victim) -> Result<Removal, MemoryStoreError> {
        let mut state = self.store.lock();
        match state.entries.get(&victim.key) {
            Some(entry) if entry.version == victim.version && entry.pinned == 0 => {
                let bytes = entry.bytes;
                state.entries.remove(&victim.key);
                state.lru.remove(&victim.version);
                state.total -= bytes;
                Ok(Removal::Removed { bytes })
            }
            _ => Ok(Removal::Skipped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn removal_is_conditional_on_the_selected_version() {
        let store = MemoryStore::new();
        store.insert("a", 5);
        store.insert("b", 7);
        let mut pass = store.begin_pass().await.unwrap().unwrap();
        let victims = pass.least_recently_used(10).await.unwrap();
        assert_eq!(victims.iter().map(|v| v.key.as_str()).collect::<Vec<_>>(), ["a", "b"]);

        store.touch("a");
        store.insert("b", 9);
        assert_eq!(pass.remove(&victims[0]).await.unwrap(), Removal::Skipped);
        assert_eq!(pass.remove(&victims[1]).await.unwrap(), Removal::Skipped);
        assert_eq!(store.total_bytes(), 14);

        let victims = pass.least_recently_used(1).await.unwrap();
        assert_eq!(pass.remove(&victims[0]).await.unwrap(), Removal::Removed { bytes: 5 });
        assert_eq!(store.total_bytes(), 9);
        assert_eq!(store.recount_bytes(), 9);
    }

    #[tokio::test]
    async fn pinned_entries_are_never_selected_or_removed() {
        let store = MemoryStore::new();
        store.insert("a", 5);
        let mut pass = store.begin_pass().await.unwrap().unwrap();
        let victims = pass.least_recently_used(10).await.unwrap();
        assert!(store.pin("a"));
        assert_eq!(pass.remove(&victims[0]).await.unwrap(), Removal::Skipped);
        assert!(pass.least_recently_used(10).await.unwrap().is_empty());
        store.unpin("a");
        assert_eq!(pass.least_recently_used(10).await.unwrap().len(), 1);
    }
}
