//! Refetch after eviction: which entries this instance evicted lately, so a miss of one of
//! them within [`REFETCH_WINDOW`] is counted (`dunite_refetch_after_eviction_total`). Many
//! such refetches say the cap is too small for what clients pull.
//!
//! The record is fed by each cache's evictor (`DebouncedEvictor::on_evicted`) and holds a
//! hash of each key (a download's key is a URL whose query may carry a token: it is not kept)
//! and when it was evicted, at most [`MAX_REMEMBERED`] of them: memory stays bounded however
//! fast the evictor runs. Past that bound the oldest are forgotten first, so a churning cache
//! undercounts rather than grows. With a shared database the evictor may run in another
//! instance: only this instance's evictions are known here.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher as _, RandomState};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How recent an eviction must be for a miss of its key to count as a refetch.
pub(crate) const REFETCH_WINDOW: Duration = Duration::from_secs(10 * 60);

/// The most evictions remembered, over every cache: about 40 bytes each.
pub(crate) const MAX_REMEMBERED: usize = 1 << 16;

/// Recently evicted keys, per cache.
#[derive(Debug)]
pub(crate) struct RecentEvictions {
    hasher: RandomState,
    window: Duration,
    capacity: usize,
    inner: Mutex<Remembered>,
}

/// One eviction: the cache's name and the key's hash.
type Evicted = (&'static str, u64);

#[derive(Debug, Default)]
struct Remembered {
    /// When each key was last evicted.
    at: HashMap<Evicted, Instant>,
    /// Every eviction recorded, oldest first (a key evicted twice is here twice; only its
    /// latest is in `at`).
    order: VecDeque<(Evicted, Instant)>,
}

impl RecentEvictions {
    /// A record of the evictions of the last `window`, at most `capacity` of them.
    pub(crate) fn new(window: Duration, capacity: usize) -> Self {
        Self { hasher: RandomState::new(), window, capacity, inner: Mutex::default() }
    }

    /// `key` was evicted from `cache` now.
    pub(crate) fn evicted(&self, cache: &'static str, key: &str) {
        let now = Instant::now();
        let id = (cache, self.hasher.hash_one(key));
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.forget(now.checked_sub(self.window), self.capacity.saturating_sub(1));
        inner.at.insert(id, now);
        inner.order.push_back((id, now));
    }

    /// Whether `key` was evicted from `cache` within the window; if so, it is forgotten, so
    /// the clients that join one refetch count it once.
    pub(crate) fn take_refetch(&self, cache: &'static str, key: &str) -> bool {
        let now = Instant::now();
        let id = (cache, self.hasher.hash_one(key));
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.forget(now.checked_sub(self.window), self.capacity);
        inner.at.remove(&id).is_some()
    }
}

impl Remembered {
    /// Forget the evictions before `before`, and the oldest past `keep`. Bounded: each turn
    /// removes one recorded eviction.
    fn forget(&mut self, before: Option<Instant>, keep: usize) {
        while let Some(&(id, at)) = self.order.front() {
            let expired = before.is_some_and(|before| at < before);
            if !expired && self.order.len() <= keep {
                break;
            }
            self.order.pop_front();
            // Only if this is the key's latest eviction: a later one stays remembered.
            if self.at.get(&id) == Some(&at) {
                self.at.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_miss_within_the_window_of_an_eviction_counts_once() {
        let recent = RecentEvictions::new(REFETCH_WINDOW, 100);
        recent.evicted("blobs", "sha256:a");
        assert!(!recent.take_refetch("manifests", "sha256:a"), "another cache's key");
        assert!(!recent.take_refetch("blobs", "sha256:b"), "never evicted");
        tokio::time::advance(REFETCH_WINDOW - Duration::from_secs(1)).await;
        assert!(recent.take_refetch("blobs", "sha256:a"));
        assert!(!recent.take_refetch("blobs", "sha256:a"), "counted once");
    }

    #[tokio::test(start_paused = true)]
    async fn an_eviction_older_than_the_window_is_forgotten() {
        let recent = RecentEvictions::new(REFETCH_WINDOW, 100);
        recent.evicted("blobs", "sha256:a");
        tokio::time::advance(REFETCH_WINDOW / 2).await;
        recent.evicted("blobs", "sha256:b");
        tokio::time::advance(REFETCH_WINDOW / 2 + Duration::from_secs(1)).await;
        assert!(!recent.take_refetch("blobs", "sha256:a"));
        assert!(recent.take_refetch("blobs", "sha256:b"));
        assert_eq!(recent.inner.lock().unwrap().order.len(), 1, "a is forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_evicted_again_is_remembered_from_its_latest_eviction() {
        let recent = RecentEvictions::new(REFETCH_WINDOW, 100);
        recent.evicted("blobs", "sha256:a");
        tokio::time::advance(REFETCH_WINDOW - Duration::from_secs(1)).await;
        recent.evicted("blobs", "sha256:a");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(recent.take_refetch("blobs", "sha256:a"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_record_is_bounded_and_forgets_the_oldest_first() {
        let recent = RecentEvictions::new(REFETCH_WINDOW, 3);
        for key in ["a", "b", "c", "d", "e"] {
            recent.evicted("blobs", key);
        }
        {
            let inner = recent.inner.lock().unwrap();
            assert_eq!((inner.order.len(), inner.at.len()), (3, 3));
        }
        assert!(!recent.take_refetch("blobs", "a") && !recent.take_refetch("blobs", "b"));
        assert!(recent.take_refetch("blobs", "c") && recent.take_refetch("blobs", "e"));
    }
}
