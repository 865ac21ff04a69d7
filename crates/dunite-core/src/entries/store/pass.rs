//! Eviction over an [`EntryStore`]: [`EntryPass`] and the [`EvictionStore`] and
//! [`EvictionPass`] implementations the evictor drives.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Any;
use sqlx::pool::PoolConnection;

use super::removal::Targets;
use super::{EntryStore, Inner, lock, to_i64, to_u64};
use crate::{Error, EvictionPass, EvictionStore, Removal, Result, Victim};

/// One eviction pass over an [`EntryStore`]: one pooled connection for the whole pass, holding
/// the namespace's eviction lock on a shared database.
pub struct EntryPass {
    inner: Arc<Inner>,
    conn: PoolConnection<Any>,
    /// Whether `conn` holds the cross-process eviction lock (PostgreSQL).
    locked: bool,
}

impl Drop for EntryPass {
    fn drop(&mut self) {
        if self.locked {
            // Not finished (cancelled, or the unlock failed): a session lock must not go back
            // to the pool with its connection. Closing the connection releases it.
            self.conn.close_on_drop();
        }
    }
}

impl fmt::Debug for EntryPass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntryPass").field("namespace", &self.inner.namespace).finish_non_exhaustive()
    }
}

#[async_trait]
impl EvictionStore for EntryStore {
    type Error = Error;
    type Pass = EntryPass;

    async fn begin_pass(&self) -> Result<Option<EntryPass>> {
        let inner = &self.inner;
        let conn = inner.db.acquire().await?;
        // Counted as locked from before the lock query: if it is cancelled or fails after
        // the server granted the lock, the connection closes instead of going back to the
        // pool with the lock.
        let mut pass = EntryPass { inner: Arc::clone(inner), conn, locked: inner.db.is_shared() };
        if !inner.db.try_lock_evictions(&mut pass.conn, &inner.namespace).await? {
            // Another instance is evicting: give the connection back at once.
            pass.locked = false;
            tracing::debug!(namespace = %inner.namespace, "another instance holds the eviction lock");
            return Ok(None);
        }
        if inner.db.is_shared() {
            tracing::debug!(namespace = %inner.namespace, "eviction lock taken");
        }
        if let Err(error) = inner.settle_unseen_on(&mut pass.conn).await {
            tracing::debug!(%error, "settling unseen commits failed; will retry");
        }
        if let Err(error) = inner.finish_marked(&mut pass.conn).await {
            // Leave the lock the way every failed pass does.
            if let Err(unlock) = pass.finish().await {
                tracing::debug!(%unlock, "releasing the eviction lock failed; the connection closes");
            }
            return Err(error);
        }
        Ok(Some(pass))
    }
}

#[async_trait]
impl EvictionPass for EntryPass {
    type Error = Error;

    fn show_key(&self, key: &str) -> String {
        self.inner.shown(key)
    }

    async fn total_size_bytes(&mut self) -> Result<u64> {
        Ok(self.inner.totals_on(&mut self.conn).await?.0)
    }

    async fn least_recently_used(&mut self, limit: usize) -> Result<Vec<Victim>> {
        // Selection must see the latest accesses, or it picks entries just read and then has
        // to skip them.
        self.inner.flush_accesses_on(&mut self.conn).await?;
        // Entries pinned by an operator (`pinned = 1`) are skipped by the index; those pinned
        // in this process (a fill, a read) are filtered here: ask for enough rows to still
        // fill the batch.
        let pinned = lock(&self.inner.pins).len();
        self.inner.db.round_trip().await;
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT key, size, version FROM entries WHERE namespace = $1 AND state = 0 AND pinned = 0 \
             ORDER BY version LIMIT $2",
        )
        .bind(&self.inner.namespace)
        .bind(to_i64((limit + pinned) as u64))
        .fetch_all(&mut *self.conn)
        .await
        .map_err(Error::db("select least-recently-used entries"))?;
        Ok(rows
            .into_iter()
            .filter(|(key, _, _)| !self.inner.is_pinned(key))
            .take(limit)
            .map(|(key, size, version)| Victim::new(key, to_u64(size), version))
            .collect())
    }

    async fn remove(&mut self, victim: &Victim) -> Result<Removal> {
        let removals = self.remove_batch(std::slice::from_ref(victim)).await?;
        Ok(removals.first().copied().unwrap_or(Removal::Skipped))
    }

    async fn remove_batch(&mut self, victims: &[Victim]) -> Result<Vec<Removal>> {
        self.inner.remove_entries(&mut self.conn, Targets::Victims(victims)).await
    }

    async fn finish(mut self) -> Result<()> {
        if self.locked {
            // Logged before the unlock, so logged holding times never overlap across instances.
            tracing::debug!(namespace = %self.inner.namespace, "eviction lock released");
            self.inner.db.unlock_evictions(&mut self.conn, &self.inner.namespace).await?;
            self.locked = false;
        }
        Ok(())
    }
}
