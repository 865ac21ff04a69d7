//! What an eviction pass needs from a cache: the store traits.

use std::sync::Arc;

use async_trait::async_trait;

/// A cache's metadata and payloads, as the evictor sees them.
///
/// The evictor calls [`begin_pass`](Self::begin_pass) once per pass and then drives the
/// returned [`EvictionPass`]. The split exists so that a SQL implementation can acquire **one**
/// connection per pass (held by the pass value, released when it drops) instead of one per
/// call: a pass, however many entries it removes, holds at most one connection.
///
/// A store shared by several processes also decides there that only one of them evicts at a
/// time: `begin_pass` returns `Ok(None)` when another process's pass holds the store, and
/// the evictor then retries shortly (see [`PassOutcome::Elsewhere`](crate::PassOutcome)).
///
/// Implementations must be cheap to share (the evictor keeps the store for its whole life)
/// and every method must be cancel safe at `.await` points: the evictor never drops a call in
/// flight, but the runtime may shut down mid-pass.
///
/// # Example
///
/// [`MemoryStore`](crate::MemoryStore) is a complete implementation; see its source.
#[async_trait]
pub trait EvictionStore: Send + Sync + 'static {
    /// The store's own error; the evictor wraps it with the operation and entry that failed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// One pass's exclusive view of the store (for SQL: one pooled connection).
    type Pass: EvictionPass<Error = Self::Error>;

    /// Start a pass, acquiring whatever it holds for its duration, or return `Ok(None)` at
    /// once, holding nothing, when another process sharing the store is running a pass (never
    /// wait for it: the caller retries later).
    async fn begin_pass(&self) -> Result<Option<Self::Pass>, Self::Error>;
}

/// One eviction pass over a store. The evictor ends every pass it began with
/// [`finish`](Self::finish); dropping it instead (a cancelled pass) must also release what it
/// holds, if less gracefully.
#[async_trait]
pub trait EvictionPass: Send {
    /// The store's error type.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The accounted total of the cache's payload bytes. Should be O(1): a value kept
    /// alongside the entries, not a sum over them.
    async fn total_size_bytes(&mut self) -> Result<u64, Self::Error>;

    /// Up to `limit` entries, least recently used first, that may be evicted now. Entries
    /// being written or pinned (an in-flight read or upstream fill) must not be returned.
    async fn least_recently_used(&mut self, limit: usize) -> Result<Vec<Victim>, Self::Error>;

    /// Remove `victim` (metadata and payload) **if it is unchanged since it was selected**:
    /// same key and same [`Victim::version`], not pinned. Otherwise leave it and return
    /// [`Removal::Skipped`].
    ///
    /// An implementation must not hold a transaction across the payload unlink, and must
    /// keep the accounted total in step with the rows it deletes.
    async fn remove(&mut self, victim: &Victim) -> Result<Removal, Self::Error>;

    /// Remove several victims, each under [`remove`](Self::remove)'s conditions; returns one
    /// [`Removal`] per victim, in order. A store that can remove a batch in fewer round trips
    /// or lock turns (a SQL store) overrides this; the default removes them one by one.
    ///
    /// The evictor only passes victims it needs, so a batch is never larger than the pass
    /// requires. An error may leave some victims of the batch removed: each removal is atomic
    /// on its own and keeps the accounted total right.
    async fn remove_batch(&mut self, victims: &[Victim]) -> Result<Vec<Removal>, Self::Error> {
        let mut removals = Vec::with_capacity(victims.len());
        for victim in victims {
            removals.push(self.remove(victim).await?);
        }
        Ok(removals)
    }

    /// `key` as the evictor shows it in errors (and so in logs). A store whose keys may hold
    /// a secret (a URL with a token in its query) overrides this; the default shows the key.
    fn show_key(&self, key: &str) -> String {
        key.to_owned()
    }

    /// End the pass and release what [`begin_pass`](EvictionStore::begin_pass) took (for a
    /// shared SQL store, the cross-process eviction lock). Called after every pass, whether it
    /// succeeded or not. The default releases nothing.
    async fn finish(self) -> Result<(), Self::Error>
    where
        Self: Sized,
    {
        Ok(())
    }
}

/// An entry selected as an eviction candidate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Victim {
    /// The entry's key in its cache (a digest, a URL key); used in logs and errors.
    pub key: String,
    /// The entry's accounted size.
    pub bytes: u64,
    /// An opaque token that changes whenever the entry is re-stored or touched (a generation
    /// or access stamp). Removal is conditional on it being unchanged.
    pub version: i64,
}

impl Victim {
    /// A candidate for removal.
    #[must_use]
    pub fn new(key: impl Into<String>, bytes: u64, version: i64) -> Self {
        Self { key: key.into(), bytes, version }
    }
}

/// What [`EvictionPass::remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Removal {
    /// The entry was removed and `bytes` were subtracted from the accounted total.
    Removed {
        /// Bytes freed.
        bytes: u64,
    },
    /// The entry changed, was pinned, or was already gone since it was selected; nothing was
    /// removed.
    Skipped,
}

#[async_trait]
impl<T: EvictionStore> EvictionStore for Arc<T> {
    type Error = T::Error;
    type Pass = T::Pass;

    async fn begin_pass(&self) -> Result<Option<Self::Pass>, Self::Error> {
        (**self).begin_pass().await
    }
}
