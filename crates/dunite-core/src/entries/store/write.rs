//! The write path of an [`EntryStore`]: a store, from the verified payload to its committed
//! row (and the cleanup after it), the refresh of a revalidated entry, and
//! [`adjust_totals`], the one writer of `totals`.

use std::sync::atomic::Ordering;

use sqlx::Any;
use tokio::io::AsyncRead;

use super::rows::{EntryInfo, OnConflict, StoreOutcome, Stored};
use super::{EntryStore, now_ms, to_i64};
use crate::entries::database::Database;
use crate::entries::faults;
use crate::entries::layout::{Expected, Written};
use crate::hash::ContentDigest;
use crate::{Error, Result};

/// The operation of a store's COMMIT: its failure is ambiguous (see `commit_written`).
const COMMIT_A_STORE: &str = "commit a store";

impl EntryStore {
    /// Store the bytes of `reader` under `key`, verified against `expected`.
    ///
    /// Memory stays bounded (one 256 KiB buffer) whatever the size. The order is: write to a
    /// temporary file while hashing, verify size and digest, sync, rename into place under a
    /// fresh name, commit the row and the total in one transaction, and (for a replacement)
    /// delete the old payload.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while the bytes are read or verified leaves nothing behind (the
    /// temporary file goes with it). Once they are verified, the move into place and the
    /// commit run on a task of their own and finish whether or not the future is still
    /// awaited: the entry is then stored (and the evictor poked) or cleaned up, never left as
    /// a payload without a row. Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::TooLarge`], [`Error::Truncated`], [`Error::TooLong`],
    /// [`Error::DigestMismatch`], [`Error::Source`] for bad input; [`Error::Io`] and
    /// [`Error::Database`] for the cache's own failures. In every case nothing is stored. The
    /// database is first used after the bytes are verified, so an [`Error::Database`] means
    /// the bytes were right but could not be recorded (a caller may still pass them on).
    pub async fn store<R>(&self, key: &str, reader: R, expected: &Expected, meta: &str) -> Result<Stored>
    where
        R: AsyncRead + Unpin + Send,
    {
        self.store_with_meta(key, reader, expected, |_| meta.to_owned()).await
    }

    /// As [`store`](Self::store), with the row's metadata derived from the digest of the bytes
    /// received (computed while streaming), in the same commit: for a cache kind that records
    /// the content's digest without knowing it up front.
    ///
    /// # Cancel safety
    ///
    /// As [`store`](Self::store).
    ///
    /// # Errors
    ///
    /// As [`store`](Self::store).
    pub async fn store_with_meta<R, M>(
        &self,
        key: &str,
        reader: R,
        expected: &Expected,
        meta: M,
    ) -> Result<Stored>
    where
        R: AsyncRead + Unpin + Send,
        M: FnOnce(&ContentDigest) -> String + Send,
    {
        let written = self.inner.layout.write_temp(reader, expected, self.inner.max_bytes).await?;
        self.commit_written(key, written, meta).await
    }

    /// Store the file at `path` under `key` without copying it: the file is verified against
    /// `expected` in place (read once), synced, and moved into the cache (copied and removed
    /// if it is on another file system). For a payload already spooled to disk, such as an
    /// upstream fill. The file must not be written to any more.
    ///
    /// On success the file is gone from `path`. On a verification error (size, digest, cap) it
    /// is left where it is; on a later error (the move or the commit) it is deleted.
    ///
    /// # Cancel safety
    ///
    /// As [`store`](Self::store).
    ///
    /// # Errors
    ///
    /// As [`store`](Self::store), with [`Error::Io`] where `store` has [`Error::Source`].
    pub async fn store_file(
        &self,
        key: &str,
        path: &std::path::Path,
        expected: &Expected,
        meta: &str,
    ) -> Result<Stored> {
        let written = self.inner.layout.adopt(path, expected, self.inner.max_bytes).await?;
        self.commit_written(key, written, |_| meta.to_owned()).await
    }

    /// Move a verified payload into place and commit it (the shared half of every store).
    ///
    /// Once the payload is verified, the move into place and the commit run on a task of their
    /// own: a caller that stops waiting (a cancelled request) neither rolls back a commit the
    /// server may already have applied nor leaves the payload without a row. The commit finishes, is cleaned up or
    /// left to settle, and calls the commit hook, whatever the caller does.
    pub(crate) async fn commit_written<M>(&self, key: &str, written: Written, meta: M) -> Result<Stored>
    where
        M: FnOnce(&ContentDigest) -> String + Send,
    {
        let (size, digest) = (written.size, written.digest.clone());
        let meta = meta(&digest);
        // From the move into place on, on a task of its own: a caller that stops waiting
        // (a cancelled request) can no longer leave a payload in place with no row, whether
        // it goes during the move (whose blocking rename finishes regardless) or the commit.
        let (store, key) = (self.clone(), key.to_owned());
        let finishing = tokio::spawn(async move {
            let file = store.inner.layout.persist(written.temp, &key).await?;
            store.commit_payload(key, file, size, meta).await
        });
        let (outcome, committed) =
            finishing.await.map_err(|e| if e.is_panic() { Error::Panicked } else { Error::Stopped })??;
        Ok(Stored { size, digest, outcome, committed })
    }

    /// Commit the row of a payload in place, and clean up after it: the replaced payload, the
    /// duplicate one, or the new one if the commit is known not to have happened.
    async fn commit_payload(
        &self,
        key: String,
        file: String,
        size: u64,
        meta: String,
    ) -> Result<(StoreOutcome, Option<(String, EntryInfo)>)> {
        let inner = &self.inner;
        let stored_at_ms = now_ms();
        let mut checked_existing = false;
        let outcome = loop {
            let mut replaced = None;
            let committed = match self.commit(&key, &file, size, stored_at_ms, &meta, &mut replaced).await {
                Ok(committed) => committed,
                // The COMMIT itself failed: it may have been applied with only the answer lost
                // (the connection dropped). Keep the payload: a row may name it, and deleting
                // it here could leave a committed row without its file. It is settled once the
                // database answers again (`settle_unseen_on`): kept if a row names it, deleted
                // if none does. The evictor is told now, since the bytes may be counted.
                Err(e @ Error::Database { op: COMMIT_A_STORE, .. }) => {
                    tracing::warn!(error = %e, "a store's commit failed unseen; its payload is kept until settled");
                    inner.settle_later(key, file, replaced);
                    inner.committed();
                    return Err(e);
                }
                Err(e) => {
                    // Rolled back: never leave a payload without a row; if even this fails, it
                    // is settled (deleted, since no row names it) once the volume lets it.
                    if let Err(unlink) = inner.layout.unlink(&file).await {
                        tracing::warn!(%unlink, "could not delete an uncommitted payload; retried later");
                        inner.settle_later(key, file, None);
                    }
                    return Err(e);
                }
            };
            match committed {
                // A dead row dropped on the first round (below): to the caller, a replacement.
                Committed::Inserted if checked_existing => break StoreOutcome::Replaced,
                Committed::Inserted => break StoreOutcome::Inserted,
                Committed::Replaced => {
                    // No row names the old payload any more, whether it was live or being
                    // removed (a removal that marked it may never get to its unlink).
                    if let Some(old) = replaced
                        && let Err(e) = inner.layout.unlink(&old).await
                    {
                        tracing::warn!(error = %e, "could not delete a replaced payload; retried later");
                        inner.settle_later(key.clone(), file.clone(), Some(old));
                    }
                    break StoreOutcome::Replaced;
                }
                Committed::AlreadyPresent { existing } => {
                    // A live row whose payload is gone (its store's COMMIT succeeded unseen and
                    // the store deleted its file, say) is no entry to keep: drop it and store
                    // again, or it would stay counted and unreadable for as long as stores of
                    // its key keep it recent. Checked after the commit, holding no lock. Not on a
                    // shared database: another instance's view of the volume may lag or differ,
                    // and its rows are not this instance's to drop (reconcile holds back too).
                    let path = inner.layout.payload(&existing);
                    if !checked_existing
                        && !inner.db.is_shared()
                        && !tokio::fs::try_exists(&path).await.unwrap_or(true)
                    {
                        checked_existing = true;
                        if let Err(e) =
                            self.delete_row(&key, &existing, true, "drop a row without its file").await
                        {
                            // This store's payload is in place and no row names it.
                            inner.settle_later(key, file, None);
                            return Err(e);
                        }
                        continue;
                    }
                    if let Err(e) = inner.layout.unlink(&file).await {
                        tracing::warn!(error = %e, "could not delete a duplicate payload; retried later");
                        inner.settle_later(key.clone(), file, None);
                    }
                    self.touch(&key);
                    return Ok((StoreOutcome::AlreadyPresent, None));
                }
            }
        };
        inner.counters.stores.fetch_add(1, Ordering::Relaxed);
        inner.counters.bytes_stored.fetch_add(size, Ordering::Relaxed);
        // After the commit, as the evictor's contract requires.
        inner.committed();
        Ok((outcome, Some((file, EntryInfo { size, stored_at_ms, meta }))))
    }

    /// The store's transaction. `replaced` is set to the payload the row named before, when
    /// the row is replaced (known before the COMMIT, so a commit whose answer is lost can
    /// still delete it once settled).
    async fn commit(
        &self,
        key: &str,
        file: &str,
        size: u64,
        stored_at_ms: i64,
        meta: &str,
        replaced: &mut Option<String>,
    ) -> Result<Committed> {
        let inner = &self.inner;
        // Lock order everywhere: a connection first, then the write turn (an eviction pass
        // holds its connection across turns).
        let mut conn = inner.db.acquire().await?;
        let _turn = inner.db.write_turn(&inner.namespace).await;
        let mut tx = inner.db.begin_write(&mut conn, &inner.namespace, "begin a store").await?;
        self.inner.db.round_trip().await;
        let existing: Option<(String, i64, i64)> =
            sqlx::query_as("SELECT file, size, state FROM entries WHERE namespace = $1 AND key = $2")
                .bind(&inner.namespace)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(Error::db("look up an entry"))?;
        let version = inner.clock.next();
        let size_i = to_i64(size);
        let (delta_bytes, delta_entries) = match existing {
            None => {
                self.inner.db.round_trip().await;
                sqlx::query(
                    "INSERT INTO entries (namespace, key, file, size, version, stored_at, state, meta) \
                     VALUES ($1, $2, $3, $4, $5, $6, 0, $7)",
                )
                .bind(&inner.namespace)
                .bind(key)
                .bind(file)
                .bind(size_i)
                .bind(version)
                .bind(stored_at_ms)
                .bind(meta)
                .execute(&mut *tx)
                .await
                .map_err(Error::db("insert an entry"))?;
                (size_i, 1)
            }
            Some((existing, _, 0)) if inner.on_conflict == OnConflict::KeepExisting => {
                // Stored again: make the kept entry recent in the database, not only in this
                // process's access stamps, so a pass that selected it at its old version (here
                // or on another instance) skips it, and LRU order sees the store.
                self.inner.db.round_trip().await;
                sqlx::query(
                    "UPDATE entries SET version = $1 WHERE namespace = $2 AND key = $3 AND state = 0",
                )
                .bind(version)
                .bind(&inner.namespace)
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(Error::db("renew an entry stored again"))?;
                // Not COMMIT_A_STORE: whatever this commit's fate, no row names the new payload.
                tx.commit().await.map_err(Error::db("commit a renewal"))?;
                return Ok(Committed::AlreadyPresent { existing });
            }
            Some((old_file, old_size, _)) => {
                self.inner.db.round_trip().await;
                // An operator's pin stays with a live entry that is replaced by a body no larger
                // (the pins were within the cap, and still are), and goes with one that grows
                // (it might take the pins past the cap: pin it again, which checks) or with one
                // being removed (a purge) that this store takes over. `size` on the right is the
                // row's old size.
                sqlx::query(
                    "UPDATE entries SET file = $1, size = $2, version = $3, stored_at = $4, \
                     pinned = CASE WHEN state = 0 AND $2 <= size THEN pinned ELSE 0 END, state = 0, \
                     meta = $5 WHERE namespace = $6 AND key = $7",
                )
                .bind(file)
                .bind(size_i)
                .bind(version)
                .bind(stored_at_ms)
                .bind(meta)
                .bind(&inner.namespace)
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(Error::db("replace an entry"))?;
                *replaced = Some(old_file);
                (size_i - old_size, 0)
            }
        };
        let committed = if delta_entries == 1 { Committed::Inserted } else { Committed::Replaced };
        adjust_totals(&mut tx, &inner.db, &inner.namespace, delta_bytes, delta_entries).await?;
        if inner.layout.faults.commit_lost() {
            drop(tx);
            return Err(Error::db(COMMIT_A_STORE)(sqlx::Error::Io(faults::injected("COMMIT lost"))));
        }
        tx.commit().await.map_err(Error::db(COMMIT_A_STORE))?;
        if inner.layout.faults.commit_answer_lost() {
            return Err(Error::db(COMMIT_A_STORE)(sqlx::Error::Io(faults::injected("COMMIT answer lost"))));
        }
        Ok(committed)
    }

    /// Replace `key`'s metadata with `meta` and refresh its stored time, keeping its payload
    /// (for a revalidated entry), **only if the entry still has the metadata `seen_meta`** the
    /// caller read before revalidating. Returns whether it was refreshed.
    ///
    /// The condition keeps a revalidation from relabelling an entry that was replaced
    /// meanwhile (by another process sharing the database, say): the replacement's
    /// metadata describes the replacement's bytes, and stays.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the row cannot be written.
    pub async fn refresh(&self, key: &str, seen_meta: &str, meta: &str) -> Result<bool> {
        let mut conn = self.inner.db.acquire().await?;
        let _turn = self.inner.db.write_turn(&self.inner.namespace).await;
        let mut tx = self.inner.db.begin_write(&mut conn, &self.inner.namespace, "begin a refresh").await?;
        self.inner.db.round_trip().await;
        let done = sqlx::query(
            "UPDATE entries SET meta = $1, stored_at = $2, version = $3 \
             WHERE namespace = $4 AND key = $5 AND state = 0 AND meta = $6",
        )
        .bind(meta)
        .bind(now_ms())
        .bind(self.inner.clock.next())
        .bind(&self.inner.namespace)
        .bind(key)
        .bind(seen_meta)
        .execute(&mut *tx)
        .await
        .map_err(Error::db("refresh an entry"))?;
        tx.commit().await.map_err(Error::db("commit a refresh"))?;
        Ok(done.rows_affected() == 1)
    }
}

enum Committed {
    Inserted,
    Replaced,
    /// The key's live row was kept; `existing` is its payload.
    AlreadyPresent {
        existing: String,
    },
}

/// Add `bytes` and `entries` (either may be negative) to `namespace`'s accounted total, in the
/// write transaction `tx` that changes the rows they account for.
///
/// # Invariant
///
/// **The only writer of `totals`** (besides the insert in
/// `EntryStore::open_with_key_display` that creates a namespace's row at zero): no other
/// statement updates the table, and every store, removal and recount goes through here, so
/// the total moves with the rows, in one commit.
pub(crate) async fn adjust_totals(
    tx: &mut sqlx::Transaction<'_, Any>,
    db: &Database,
    namespace: &str,
    bytes: i64,
    entries: i64,
) -> Result<()> {
    if bytes == 0 && entries == 0 {
        return Ok(());
    }
    db.round_trip().await;
    sqlx::query("UPDATE totals SET bytes = bytes + $1, entries = entries + $2 WHERE namespace = $3")
        .bind(bytes)
        .bind(entries)
        .bind(namespace)
        .execute(&mut **tx)
        .await
        .map_err(Error::db("update the accounted total"))?;
    Ok(())
}
