//! Operators' pins: entries kept out of eviction until unpinned, recorded in the row
//! (`pinned`), so they hold across restarts and for every instance sharing the database.
//!
//! A pinned entry still counts against the cap: pinning is refused when the pinned entries
//! would add up to more than the cap ([`Error::PinsExceedCap`]), since the evictor could then
//! never bring the cache under it. A cap lowered below the pins after the fact is reported
//! by the evictor ("found nothing removable while over the cap") and by
//! [`EntryStore::pinned_bytes`].

use super::{EntryStore, to_u64};
use crate::{Error, Result};

/// What [`EntryStore::set_pinned`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pinning {
    /// Keep the entry out of eviction.
    Pin,
    /// Let the evictor choose it again.
    Unpin,
}

impl EntryStore {
    /// Pin or unpin `key`. Returns the entry's size, or `None` if no live entry has that key
    /// (nothing changed). Pinning an entry already pinned, or unpinning one that is not, is a
    /// no-op that still returns its size.
    ///
    /// The pin is kept when the entry is replaced by a store of the same key and goes with
    /// the entry when it is removed ([`remove`](Self::remove) removes pinned entries too).
    ///
    /// # Errors
    ///
    /// [`Error::PinsExceedCap`] if the pinned entries would add up to more than the cap
    /// (nothing is pinned then); [`Error::Database`].
    ///
    /// # Example
    ///
    /// ```
    /// use dunite_core::{Database, DatabaseOptions, EntryStore, Expected, OnConflict, Pinning};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), dunite_core::Error> {
    /// let dir = tempfile::tempdir().expect("a temporary directory");
    /// let db = Database::open_sqlite(&dir.path().join("metadata.db"), &DatabaseOptions::new()).await?;
    /// let store = EntryStore::open(db, "example", dir.path(), 100, OnConflict::KeepExisting).await?;
    /// store.store("a", &[0u8; 60][..], &Expected::new(), "").await?;
    /// store.store("b", &[1u8; 60][..], &Expected::new(), "").await?;
    /// assert_eq!(store.set_pinned("a", Pinning::Pin).await?, Some(60));
    /// // 120 pinned bytes would never fit under the cap of 100.
    /// assert!(store.set_pinned("b", Pinning::Pin).await.is_err());
    /// assert_eq!(store.pinned_bytes().await?, 60);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn set_pinned(&self, key: &str, pinning: Pinning) -> Result<Option<u64>> {
        let inner = self.inner();
        let mut conn = inner.db.acquire().await?;
        let _turn = inner.db.write_turn(&inner.namespace).await;
        let mut tx = inner.db.begin_write(&mut conn, &inner.namespace, "begin a pin").await?;
        inner.db.round_trip().await;
        let found: Option<(i64, i64)> = sqlx::query_as(
            "SELECT size, pinned FROM entries WHERE namespace = $1 AND key = $2 AND state = 0",
        )
        .bind(&inner.namespace)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(Error::db("look up an entry to pin"))?;
        let Some((size, pinned)) = found else { return Ok(None) };
        let wanted = i64::from(pinning == Pinning::Pin);
        if pinned == wanted {
            return Ok(Some(to_u64(size)));
        }
        if pinning == Pinning::Pin {
            // Under the namespace's write lock: no other pin commits in between.
            let others = pinned_sum(&mut tx, &inner.namespace).await?;
            let total = others.saturating_add(to_u64(size));
            if total > inner.max_bytes {
                tracing::warn!(
                    key = inner.shown(key),
                    pinned = total,
                    max_bytes = inner.max_bytes,
                    "refused a pin: the pinned entries would exceed the cap"
                );
                return Err(Error::PinsExceedCap {
                    size: to_u64(size),
                    pinned: total,
                    max_bytes: inner.max_bytes,
                });
            }
        }
        inner.db.round_trip().await;
        sqlx::query("UPDATE entries SET pinned = $1 WHERE namespace = $2 AND key = $3 AND state = 0")
            .bind(wanted)
            .bind(&inner.namespace)
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(Error::db("pin an entry"))?;
        tx.commit().await.map_err(Error::db("commit a pin"))?;
        if pinning == Pinning::Unpin {
            // The evictor may now have something to remove.
            inner.committed();
        }
        Ok(Some(to_u64(size)))
    }

    /// The bytes of the live entries pinned by [`set_pinned`](Self::set_pinned).
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    pub async fn pinned_bytes(&self) -> Result<u64> {
        let inner = self.inner();
        let mut conn = inner.db.acquire().await?;
        pinned_sum(&mut conn, &inner.namespace).await
    }
}

async fn pinned_sum(conn: &mut sqlx::AnyConnection, namespace: &str) -> Result<u64> {
    // SUM of a BIGINT is NUMERIC on PostgreSQL: cast back.
    let (sum,): (i64,) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM entries \
         WHERE namespace = $1 AND state = 0 AND pinned = 1",
    )
    .bind(namespace)
    .fetch_one(&mut *conn)
    .await
    .map_err(Error::db("sum the pinned entries"))?;
    Ok(to_u64(sum))
}
