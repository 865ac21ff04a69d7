//! The read path of an [`EntryStore`]: row lookups and opening payloads, through the database
//! or, for a content-addressed key while it is unreachable, without it.

use std::sync::atomic::Ordering;

use super::rows::{EntryInfo, OpenEntry, Stored};
use super::{EntryStore, to_u64};
use crate::hash::ContentDigest;
use crate::{Error, Result};

impl EntryStore {
    /// Open the entry under `key`, if present, and record the access (in memory; written to
    /// the database in batches, so a hit performs no database write).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the row cannot be read, [`Error::Io`] if the payload exists but
    /// cannot be opened.
    pub async fn open_entry(&self, key: &str) -> Result<Option<OpenEntry>> {
        let inner = &self.inner;
        let Some((file, info)) = self.lookup_row(key).await? else {
            inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let path = inner.layout.payload(&file);
        match tokio::fs::File::open(&path).await {
            Ok(file) => {
                inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                self.touch(key);
                Ok(Some(OpenEntry { file, info }))
            }
            // Evicted or replaced between the lookup and the open: a miss, never wrong bytes.
            // Or a live row that lost its payload (a commit whose answer was lost, a shared
            // directory another instance could see and this one cannot): drop that row, if
            // it is still live and still names the file, so it stops counting and the next
            // store of the key fills it again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                inner.counters.misses.fetch_add(1, Ordering::Relaxed);
                match self.delete_row(key, &file, true, "drop a row without its file").await {
                    Ok(true) => {
                        tracing::warn!(
                            key = inner.shown(key),
                            "entry without its payload file; dropped the row"
                        );
                    }
                    Ok(false) => {}
                    Err(error) => tracing::debug!(%error, "could not drop a row without its file"),
                }
                Ok(None)
            }
            Err(e) => Err(Error::io("open", path)(e)),
        }
    }

    /// Open the entry that `stored` (a store of `key`) committed, without a database lookup,
    /// and record the access: for a caller that stores and then serves what it stored. If
    /// that payload is gone (evicted, or replaced by a later store) or the store found `key`
    /// already present, this is [`open_entry`](Self::open_entry): whatever `key` holds now,
    /// found with one lookup.
    ///
    /// The handle and its [`EntryInfo`] always belong together; the info is the row as the
    /// store committed it, so a later [`refresh`](Self::refresh) of the row is not reflected.
    ///
    /// # Errors
    ///
    /// As [`open_entry`](Self::open_entry).
    ///
    /// See [`EntryCache::open_stored`](crate::EntryCache::open_stored) for an example.
    pub async fn open_stored(&self, key: &str, stored: &Stored) -> Result<Option<OpenEntry>> {
        if let Some((file, info)) = &stored.committed {
            let path = self.inner.layout.payload(file);
            match tokio::fs::File::open(&path).await {
                Ok(file) => {
                    self.touch(key);
                    return Ok(Some(OpenEntry { file, info: info.clone() }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("open", path)(e)),
            }
        }
        self.open_entry(key).await
    }

    /// Open `key`'s payload **without the database**, for when it is unreachable: a file of
    /// `key`'s on disk whose bytes hash to `digest` (every candidate is read whole to check).
    /// Only for content-addressed keys, where the digest alone says which bytes are right.
    /// Records no access. Returns the file, at its start, and its size.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the directory or a candidate cannot be read.
    pub async fn open_unindexed(
        &self,
        key: &str,
        digest: &ContentDigest,
    ) -> Result<Option<(tokio::fs::File, u64)>> {
        self.inner.layout.find_verified(key, digest).await
    }

    /// What is recorded about `key`, without opening or touching it.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the row cannot be read.
    pub async fn info(&self, key: &str) -> Result<Option<EntryInfo>> {
        Ok(self.lookup_row(key).await?.map(|(_, info)| info))
    }

    async fn lookup_row(&self, key: &str) -> Result<Option<(String, EntryInfo)>> {
        let mut conn = self.inner.db.acquire().await?;
        self.inner.db.round_trip().await;
        let row: Option<(String, i64, i64, String)> = sqlx::query_as(
            "SELECT file, size, stored_at, meta FROM entries WHERE namespace = $1 AND key = $2 AND state = 0",
        )
        .bind(&self.inner.namespace)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await
        .map_err(Error::db("look up an entry"))?;
        Ok(row.map(|(file, size, stored_at_ms, meta)| {
            (file, EntryInfo { size: to_u64(size), stored_at_ms, meta })
        }))
    }

    /// Whether a live entry exists under `key` (no access recorded).
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the row cannot be read.
    pub async fn contains(&self, key: &str) -> Result<bool> {
        Ok(self.lookup_row(key).await?.is_some())
    }
}
