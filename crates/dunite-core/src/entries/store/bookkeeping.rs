//! In-process bookkeeping of an [`EntryStore`]: the clock that stamps versions, access stamps
//! (taken in memory, flushed in batches by a background task or before a pass) and pins.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::AnyConnection;

use super::{EntryStore, Inner, lock, values_list};
use crate::{Error, Result};

/// Access stamps written per statement (two bound values each, well under SQLite's limit).
const FLUSH_CHUNK: usize = 500;

/// Strictly increasing microsecond stamps: the LRU order and the removal condition.
#[derive(Default)]
pub(super) struct Clock {
    last: AtomicI64,
}

impl Clock {
    pub(super) fn next(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let prev = self.last.fetch_max(now, Ordering::SeqCst);
        if prev >= now { self.last.fetch_add(1, Ordering::SeqCst) + 1 } else { now }
    }
}

/// Keeps an entry out of eviction while held; see [`EntryStore::pin`].
#[must_use = "the pin is released when dropped"]
pub struct Pin {
    inner: Arc<Inner>,
    key: String,
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pin").field("key", &self.key).finish()
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = lock(&self.inner.pins);
        if let Some(count) = pins.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.key);
            }
        }
    }
}

impl EntryStore {
    /// Keep `key` out of eviction until the returned guard drops (for example while an
    /// upstream fill or a long read is in flight). Pins are per process.
    pub fn pin(&self, key: &str) -> Pin {
        *lock(&self.inner.pins).entry(key.to_owned()).or_default() += 1;
        Pin { inner: Arc::clone(&self.inner), key: key.to_owned() }
    }

    /// Record an access to `key` in memory; [`flush_accesses`](Self::flush_accesses) writes
    /// them.
    pub fn touch(&self, key: &str) {
        let stamp = self.inner.clock.next();
        lock(&self.inner.touches).insert(key.to_owned(), stamp);
    }

    /// Write the pending access stamps in one transaction. Runs in the background (see
    /// [`spawn_access_flusher`](Self::spawn_access_flusher)) and before every eviction pass.
    ///
    /// # Errors
    ///
    /// [`Error::Database`]; the stamps are then kept for the next flush.
    pub async fn flush_accesses(&self) -> Result<()> {
        let mut conn = self.inner.db.acquire().await?;
        self.inner.flush_accesses_on(&mut conn).await
    }

    /// Spawn the task that flushes access stamps every `period` (and deletes the payloads of
    /// stores whose commit failed unseen, once the database says no row names them). It holds
    /// only a weak reference and ends once the store is dropped. Requires a Tokio runtime.
    pub fn spawn_access_flusher(&self, period: Duration) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                interval.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                if lock(&inner.touches).is_empty()
                    && lock(&inner.unsettled).is_empty()
                    && !inner.origins.has_pending()
                {
                    continue;
                }
                let result = async {
                    let mut conn = inner.db.acquire().await?;
                    // A payload that cannot be settled yet must not hold up the stamps.
                    if let Err(error) = inner.settle_unseen_on(&mut conn).await {
                        tracing::warn!(%error, "settling a payload failed; will retry");
                    }
                    if let Err(error) = inner.flush_origins_on(&mut conn).await {
                        tracing::warn!(%error, "recording origins failed; will retry");
                    }
                    inner.flush_accesses_on(&mut conn).await
                };
                if let Err(error) = result.await {
                    tracing::warn!(%error, "flushing access stamps failed; will retry");
                }
            }
        });
    }
}

/// Access stamps taken for a flush: put back on drop unless [`written`](Self::written), so a
/// flush that fails or is cancelled loses none (a newer stamp taken meanwhile wins).
struct TakenStamps<'a> {
    inner: &'a Inner,
    pending: HashMap<String, i64>,
}

impl TakenStamps<'_> {
    fn written(mut self) {
        self.pending.clear();
    }
}

impl Drop for TakenStamps<'_> {
    fn drop(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut touches = lock(&self.inner.touches);
        for (key, stamp) in self.pending.drain() {
            let slot = touches.entry(key).or_insert(stamp);
            *slot = (*slot).max(stamp);
        }
    }
}

impl Inner {
    pub(super) async fn flush_accesses_on(&self, conn: &mut AnyConnection) -> Result<()> {
        // Taken now, put back unless written: on an error and on a cancel alike.
        let taken = TakenStamps { inner: self, pending: std::mem::take(&mut *lock(&self.touches)) };
        if taken.pending.is_empty() {
            return Ok(());
        }
        let _turn = self.db.write_turn(&self.namespace).await;
        let mut tx = self.db.begin_write(conn, &self.namespace, "begin an access flush").await?;
        let pending: Vec<(&String, &i64)> = taken.pending.iter().collect();
        // One statement per chunk, not per key: on a networked database every statement is a
        // round trip made while holding the write lock.
        for chunk in pending.chunks(FLUSH_CHUNK) {
            let values = values_list(1, chunk.len(), 2);
            let sql = format!(
                "WITH t(key, stamp) AS (VALUES {values}) \
                 UPDATE entries SET version = t.stamp FROM t \
                 WHERE entries.namespace = ${} AND entries.key = t.key AND entries.state = 0 \
                 AND entries.version < t.stamp",
                2 * chunk.len() + 1
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (key, stamp) in chunk {
                query = query.bind(key.as_str()).bind(**stamp);
            }
            self.db.round_trip().await;
            query.bind(&self.namespace).execute(&mut *tx).await.map_err(Error::db("record accesses"))?;
        }
        tx.commit().await.map_err(Error::db("commit an access flush"))?;
        self.counters.access_writes.fetch_add(pending.len() as u64, Ordering::Relaxed);
        taken.written();
        Ok(())
    }

    pub(super) fn is_pinned(&self, key: &str) -> bool {
        lock(&self.pins).contains_key(key)
    }
}
