//! Start-up reconciliation: make the directory and the rows agree again after a crash.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::layout::blocking;
use super::store::{EntryStore, adjust_totals};
use crate::{Error, Result};

/// What [`EntryStore::reconcile`] repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// Temporary files of interrupted stores, deleted.
    pub temp_files_removed: u64,
    /// Removals interrupted between marking and deleting the row, finished.
    pub removals_finished: u64,
    /// Rows whose payload was missing, dropped.
    pub rows_without_file: u64,
    /// Payload files without a row (a store interrupted before its commit), deleted.
    pub orphan_files_removed: u64,
    /// The accounted total before and after, when it was wrong.
    pub total_corrected: Option<(u64, u64)>,
}

/// Marked rows finished per delete statement (two bound values each).
const MARKED_PER_STATEMENT: usize = 500;

impl EntryStore {
    /// Bring the payload directory and the rows into agreement: delete temporary files,
    /// finish interrupted removals, drop rows whose file is missing, delete files without a
    /// row, and recompute the accounted total (logging it if it was wrong).
    ///
    /// [`open`](Self::open) runs this. On SQLite, run it only while no store into this cache
    /// is in flight: a store's payload is renamed into place just before its row commits. On
    /// a shared database (PostgreSQL), other instances may be storing meanwhile, so temporary
    /// and orphan files younger than [`Database::orphan_grace`](crate::Database::orphan_grace)
    /// are left for a later start-up; rows, files
    /// and the total are changed only in transactions that keep the total exact.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] or [`Error::Io`] if the rows or the directory cannot be read or
    /// repaired.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let inner = self.inner();
        let ns = inner.namespace.as_str();
        let pool = inner.db.pool();
        let grace = inner.db.orphan_grace();
        let mut report = ReconcileReport {
            temp_files_removed: clear_dir(inner.layout.tmp_dir().to_path_buf(), grace).await?,
            ..ReconcileReport::default()
        };

        let marked: Vec<(String, String)> =
            sqlx::query_as("SELECT key, file FROM entries WHERE namespace = $1 AND state = 1")
                .bind(ns)
                .fetch_all(pool)
                .await
                .map_err(Error::db("list interrupted removals"))?;
        // Deleted first, and only while still marked (another instance's remover may put a
        // row back, live, meanwhile); then the payloads of the rows deleted are unlinked. One
        // that cannot be is no longer counted, and is an orphan for the walk below.
        if !marked.is_empty() {
            let mut conn = inner.db.acquire().await?;
            for chunk in marked.chunks(MARKED_PER_STATEMENT) {
                for (_, file, _) in inner.delete_marked(&mut conn, chunk).await? {
                    if let Err(error) = inner.layout.unlink(&file).await {
                        tracing::warn!(%error, "could not delete the payload of an interrupted removal");
                    }
                    report.removals_finished += 1;
                }
            }
        }

        // One walk of the payload directory, then set comparisons: no system call per row.
        // Rows first: a row listed here had its file in place before it committed.
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT key, file FROM entries WHERE namespace = $1")
                .bind(ns)
                .fetch_all(pool)
                .await
                .map_err(Error::db("list entries"))?;
        let mut on_disk = list_payloads(inner.layout.data_dir().to_path_buf(), grace).await?;
        let mut missing = Vec::new();
        for (key, file) in rows {
            // Not in the walk: missing, or just young (a young file is left out of it).
            if !on_disk.remove(&file) && !file_exists(&inner.layout.payload(&file)).await? {
                missing.push((key, file));
            }
        }
        if inner.db.is_shared() && !missing.is_empty() {
            // Another instance may be fine where this one is not (a volume not mounted yet
            // would make every row look orphaned and wipe the shared cache). Leave the rows:
            // a read of one drops it, and eviction removes the rest in LRU order.
            tracing::warn!(
                namespace = ns,
                rows = missing.len(),
                "rows whose payload this instance cannot see; left for reads and eviction to drop"
            );
            missing.clear();
        }
        for (key, file) in missing {
            if self.delete_row(&key, &file, true, "drop a row without its file").await? {
                tracing::warn!(key = inner.shown(&key), "entry without its payload file; dropped the row");
                report.rows_without_file += 1;
            }
        }
        // What is left on disk has no row: a store interrupted before its commit.
        report.orphan_files_removed = on_disk.len() as u64;
        for file in on_disk {
            inner.layout.unlink(&file).await?;
        }

        report.total_corrected = self.recount().await?;
        if report != ReconcileReport::default() {
            tracing::info!(namespace = ns, ?report, "reconciled the cache directory with its rows");
        }
        Ok(report)
    }

    /// Delete the row of `key` if it still names `file` (and, with `only_live`, is live, not
    /// being removed), keeping the total in step. Returns whether a row was deleted.
    pub(super) async fn delete_row(
        &self,
        key: &str,
        file: &str,
        only_live: bool,
        op: &'static str,
    ) -> Result<bool> {
        let inner = self.inner();
        let mut conn = inner.db.acquire().await?;
        let _turn = inner.db.write_turn(&inner.namespace).await;
        let mut tx = inner.db.begin_write(&mut conn, &inner.namespace, op).await?;
        let sql = if only_live {
            "DELETE FROM entries WHERE namespace = $1 AND key = $2 AND file = $3 AND state = 0 RETURNING size"
        } else {
            "DELETE FROM entries WHERE namespace = $1 AND key = $2 AND file = $3 RETURNING size"
        };
        let deleted: Option<(i64,)> = sqlx::query_as(sql)
            .bind(&inner.namespace)
            .bind(key)
            .bind(file)
            .fetch_optional(&mut *tx)
            .await
            .map_err(Error::db(op))?;
        if let Some((size,)) = deleted {
            adjust_totals(&mut tx, &inner.db, &inner.namespace, -size, -1).await?;
        }
        tx.commit().await.map_err(Error::db(op))?;
        Ok(deleted.is_some())
    }

    /// Recompute the accounted total from the rows, under the namespace's write lock (so no
    /// store commits in between); returns the total before and after when it was wrong.
    pub(super) async fn recount(&self) -> Result<Option<(u64, u64)>> {
        let inner = self.inner();
        let ns = inner.namespace.as_str();
        let mut conn = inner.db.acquire().await?;
        let _turn = inner.db.write_turn(&inner.namespace).await;
        let mut tx = inner.db.begin_write(&mut conn, ns, "begin a recount").await?;
        // SUM of a BIGINT is NUMERIC on PostgreSQL: cast back.
        let (sum, count): (i64, i64) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT), COUNT(*) FROM entries WHERE namespace = $1",
        )
        .bind(ns)
        .fetch_one(&mut *tx)
        .await
        .map_err(Error::db("recount entries"))?;
        let (bytes, entries): (i64, i64) =
            sqlx::query_as("SELECT bytes, entries FROM totals WHERE namespace = $1")
                .bind(ns)
                .fetch_one(&mut *tx)
                .await
                .map_err(Error::db("read the accounted total"))?;
        if (bytes, entries) == (sum, count) {
            return Ok(None);
        }
        tracing::warn!(namespace = ns, was = bytes, now = sum, "accounted total was wrong; corrected");
        adjust_totals(&mut tx, &inner.db, ns, sum - bytes, count - entries).await?;
        tx.commit().await.map_err(Error::db("commit a recount"))?;
        Ok(Some((u64::try_from(bytes).unwrap_or(0), u64::try_from(sum).unwrap_or(0))))
    }
}

/// Whether `path` exists (a payload young enough to be skipped by the walk).
async fn file_exists(path: &std::path::Path) -> Result<bool> {
    tokio::fs::try_exists(path).await.map_err(Error::io("look for", path.to_path_buf()))
}

/// Whether `entry` was last written at least `grace` ago (always, for a zero grace). A file
/// gone since the listing (another instance renamed or removed it) is not stale.
fn is_stale(entry: &std::fs::DirEntry, grace: Duration) -> std::io::Result<bool> {
    if grace.is_zero() {
        return Ok(true);
    }
    let modified = match entry.metadata().and_then(|m| m.modified()) {
        Ok(modified) => modified,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(SystemTime::now().duration_since(modified).is_ok_and(|age| age >= grace))
}

async fn clear_dir(dir: PathBuf, grace: Duration) -> Result<u64> {
    let path = dir.clone();
    blocking(move || {
        let mut removed = 0;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() && is_stale(&entry, grace)? {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    // Another instance's cleanup got there first.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    })
    .await
    .map_err(Error::io("clear", path))
}

/// Every payload under `data` last written at least `grace` ago, as the relative names rows
/// use (`<hh>/<name>`).
async fn list_payloads(data: PathBuf, grace: Duration) -> Result<HashSet<String>> {
    let path = data.clone();
    blocking(move || {
        let mut names = HashSet::new();
        for shard in std::fs::read_dir(&data)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            let shard_name = shard.file_name().to_string_lossy().into_owned();
            for file in std::fs::read_dir(shard.path())? {
                let file = file?;
                if is_stale(&file, grace)? {
                    names.insert(format!("{shard_name}/{}", file.file_name().to_string_lossy()));
                }
            }
        }
        Ok(names)
    })
    .await
    .map_err(Error::io("list payloads in", path))
}
