//! Where entries were served through: an origin per entry and caller-chosen grouping (for
//! OCI caches, the repository a blob or manifest was pulled through), for usage per origin
//! and purges by origin.
//!
//! Recording costs no database write on the request path: a pair is queued in memory and
//! written in batches by the access flusher (and before every read of the table), once per
//! process and pair while it is remembered. Content-addressed entries are shared, so a key
//! may have several origins; rows whose entry is gone are pruned when usage is read.

use std::collections::HashSet;
use std::sync::Mutex;

use sqlx::AnyConnection;

use super::{EntryStore, Inner, lock, to_u64, values_list};
use crate::{Error, Result};

/// Pairs queued at most: past this (a flusher stuck on a database outage), new ones are
/// dropped; usage then undercounts, and nothing else is affected.
const MAX_PENDING: usize = 10_000;

/// Pairs remembered as written, so a hit does not queue its pair again; cleared when full.
const MAX_WRITTEN: usize = 100_000;

/// Pairs written per statement (three bound values each, well under SQLite's limit).
const CHUNK: usize = 300;

/// The in-memory half: pairs queued and pairs known written.
#[derive(Default)]
pub(super) struct Origins {
    pending: Mutex<HashSet<(String, String)>>,
    written: Mutex<HashSet<(String, String)>>,
}

impl Origins {
    pub(super) fn has_pending(&self) -> bool {
        !lock(&self.pending).is_empty()
    }
}

/// The bytes and entries served through one origin (see [`EntryStore::usage_by_origin`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OriginUsage {
    /// The origin (for OCI caches, `host/repository`).
    pub origin: String,
    /// Bytes of the live entries served through it. An entry shared with other origins is
    /// counted in full for each of them, so the sum over origins may exceed the cache total.
    pub bytes: u64,
    /// Live entries served through it.
    pub entries: u64,
    /// Of those, the bytes of entries served through this origin only: what removing the
    /// origin's entries would free.
    pub exclusive_bytes: u64,
}

impl EntryStore {
    /// Record that `key` was served through `origin`. In memory; written in batches.
    pub fn record_origin(&self, key: &str, origin: &str) {
        let origins = &self.inner().origins;
        let pair = (key.to_owned(), origin.to_owned());
        if lock(&origins.written).contains(&pair) {
            return;
        }
        let mut pending = lock(&origins.pending);
        if pending.len() < MAX_PENDING {
            pending.insert(pair);
        }
    }

    /// Bytes and entries per origin, largest first. Writes the queued origins and prunes the
    /// rows of entries that are gone first.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    pub async fn usage_by_origin(&self) -> Result<Vec<OriginUsage>> {
        let inner = self.inner();
        let mut conn = inner.db.acquire().await?;
        inner.flush_origins_on(&mut conn).await?;
        inner.prune_origins_on(&mut conn).await?;
        inner.db.round_trip().await;
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT o.origin, CAST(COALESCE(SUM(e.size), 0) AS BIGINT), COUNT(*), \
             CAST(COALESCE(SUM(CASE WHEN NOT EXISTS (SELECT 1 FROM entry_origins p \
                 WHERE p.namespace = o.namespace AND p.key = o.key AND p.origin <> o.origin) \
                 THEN e.size ELSE 0 END), 0) AS BIGINT) \
             FROM entry_origins o JOIN entries e ON e.namespace = o.namespace AND e.key = o.key \
             WHERE o.namespace = $1 AND e.state = 0 GROUP BY o.origin ORDER BY 2 DESC, o.origin",
        )
        .bind(&inner.namespace)
        .fetch_all(&mut *conn)
        .await
        .map_err(Error::db("sum the usage per origin"))?;
        Ok(rows
            .into_iter()
            .map(|(origin, bytes, entries, exclusive)| OriginUsage {
                origin,
                bytes: to_u64(bytes),
                entries: to_u64(entries),
                exclusive_bytes: to_u64(exclusive),
            })
            .collect())
    }

    /// The keys of the live entries served through `origin`: `(only this origin, shared
    /// with others)`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`].
    pub async fn keys_of_origin(&self, origin: &str) -> Result<(Vec<String>, Vec<String>)> {
        let inner = self.inner();
        let mut conn = inner.db.acquire().await?;
        inner.flush_origins_on(&mut conn).await?;
        inner.db.round_trip().await;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT o.key, CASE WHEN EXISTS (SELECT 1 FROM entry_origins p \
                 WHERE p.namespace = o.namespace AND p.key = o.key AND p.origin <> o.origin) THEN 1 ELSE 0 END \
             FROM entry_origins o JOIN entries e ON e.namespace = o.namespace AND e.key = o.key \
             WHERE o.namespace = $1 AND o.origin = $2 AND e.state = 0 ORDER BY o.key",
        )
        .bind(&inner.namespace)
        .bind(origin)
        .fetch_all(&mut *conn)
        .await
        .map_err(Error::db("list the entries of an origin"))?;
        let (shared, only): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(_, shared)| *shared != 0);
        Ok((only.into_iter().map(|r| r.0).collect(), shared.into_iter().map(|r| r.0).collect()))
    }
}

impl Inner {
    /// Write the queued origins (put back on failure, so none is lost to an outage).
    pub(super) async fn flush_origins_on(&self, conn: &mut AnyConnection) -> Result<()> {
        let pending: Vec<(String, String)> = lock(&self.origins.pending).drain().collect();
        if pending.is_empty() {
            return Ok(());
        }
        let written = self.write_origins(conn, &pending).await;
        if let Err(e) = written {
            let mut queue = lock(&self.origins.pending);
            let room = MAX_PENDING.saturating_sub(queue.len());
            queue.extend(pending.into_iter().take(room));
            return Err(e);
        }
        let mut known = lock(&self.origins.written);
        if known.len() + pending.len() > MAX_WRITTEN {
            known.clear();
        }
        known.extend(pending);
        Ok(())
    }

    async fn write_origins(&self, conn: &mut AnyConnection, pairs: &[(String, String)]) -> Result<()> {
        let _turn = self.db.write_turn(&self.namespace).await;
        let mut tx = self.db.begin_write(conn, &self.namespace, "begin recording origins").await?;
        for chunk in pairs.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO entry_origins (namespace, key, origin) VALUES {} ON CONFLICT DO NOTHING",
                values_list(1, chunk.len(), 3)
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (key, origin) in chunk {
                query = query.bind(&self.namespace).bind(key.as_str()).bind(origin.as_str());
            }
            self.db.round_trip().await;
            query.execute(&mut *tx).await.map_err(Error::db("record origins"))?;
        }
        tx.commit().await.map_err(Error::db("commit recorded origins"))
    }

    /// Delete the origin rows of entries that are gone; forget what was written, so a pair
    /// whose entry comes back is recorded again.
    pub(super) async fn prune_origins_on(&self, conn: &mut AnyConnection) -> Result<()> {
        let _turn = self.db.write_turn(&self.namespace).await;
        let mut tx = self.db.begin_write(conn, &self.namespace, "begin pruning origins").await?;
        self.db.round_trip().await;
        sqlx::query(
            "DELETE FROM entry_origins WHERE namespace = $1 AND NOT EXISTS (SELECT 1 FROM entries e \
             WHERE e.namespace = entry_origins.namespace AND e.key = entry_origins.key)",
        )
        .bind(&self.namespace)
        .execute(&mut *tx)
        .await
        .map_err(Error::db("prune origins"))?;
        tx.commit().await.map_err(Error::db("commit pruned origins"))?;
        lock(&self.origins.written).clear();
        Ok(())
    }
}
