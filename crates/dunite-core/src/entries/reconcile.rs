//! Start-up reconciliation: make the directory and the rows agree again after a crash.

use std::collections::HashSet;
use std::path::PathBuf;

use super::layout::blocking;
use super::store::EntryStore;
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

impl EntryStore {
    /// Bring the payload directory and the rows into agreement: delete temporary files,
    /// finish interrupted removals, drop rows whose file is missing, delete files without a
    /// row, and recompute the accounted total (logging it if it was wrong).
    ///
    /// [`open`](Self::open) runs this. Run it only while no store into this cache is in
    /// flight: a store's payload is renamed into place just before its row commits.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] or [`Error::Io`] if the rows or the directory cannot be read or
    /// repaired.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let inner = self.inner();
        let ns = inner.namespace.as_str();
        let pool = inner.db.pool();
        let mut report = ReconcileReport {
            temp_files_removed: clear_dir(inner.layout.tmp_dir().to_path_buf()).await?,
            ..ReconcileReport::default()
        };

        let marked: Vec<(String,)> =
            sqlx::query_as("SELECT key FROM entries WHERE namespace = ? AND state = 1")
                .bind(ns)
                .fetch_all(pool)
                .await
                .map_err(Error::db("list interrupted removals"))?;
        for (key,) in marked {
            let file: Option<(String,)> =
                sqlx::query_as("SELECT file FROM entries WHERE namespace = ? AND key = ?")
                    .bind(ns)
                    .bind(&key)
                    .fetch_optional(pool)
                    .await
                    .map_err(Error::db("look up an interrupted removal"))?;
            if let Some((file,)) = file {
                inner.layout.unlink(&file).await?;
            }
            sqlx::query("DELETE FROM entries WHERE namespace = ? AND key = ? AND state = 1")
                .bind(ns)
                .bind(&key)
                .execute(pool)
                .await
                .map_err(Error::db("finish an interrupted removal"))?;
            report.removals_finished += 1;
        }

        // One walk of the payload directory, then set comparisons: no system call per row.
        let mut on_disk = list_payloads(inner.layout.data_dir().to_path_buf()).await?;
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT key, file FROM entries WHERE namespace = ?")
            .bind(ns)
            .fetch_all(pool)
            .await
            .map_err(Error::db("list entries"))?;
        for (key, file) in rows {
            if on_disk.remove(&file) {
                continue;
            }
            tracing::warn!(key, "entry without its payload file; dropping the row");
            sqlx::query("DELETE FROM entries WHERE namespace = ? AND key = ? AND file = ?")
                .bind(ns)
                .bind(&key)
                .bind(&file)
                .execute(pool)
                .await
                .map_err(Error::db("drop a row without its file"))?;
            report.rows_without_file += 1;
        }
        // What is left on disk has no row: a store interrupted before its commit.
        report.orphan_files_removed = on_disk.len() as u64;
        for file in on_disk {
            inner.layout.unlink(&file).await?;
        }

        let (sum, count): (i64, i64) =
            sqlx::query_as("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM entries WHERE namespace = ?")
                .bind(ns)
                .fetch_one(pool)
                .await
                .map_err(Error::db("recount entries"))?;
        let (bytes, entries): (i64, i64) =
            sqlx::query_as("SELECT bytes, entries FROM totals WHERE namespace = ?")
                .bind(ns)
                .fetch_one(pool)
                .await
                .map_err(Error::db("read the accounted total"))?;
        if (bytes, entries) != (sum, count) {
            tracing::warn!(namespace = ns, was = bytes, now = sum, "accounted total was wrong; corrected");
            sqlx::query("UPDATE totals SET bytes = ?, entries = ? WHERE namespace = ?")
                .bind(sum)
                .bind(count)
                .bind(ns)
                .execute(pool)
                .await
                .map_err(Error::db("correct the accounted total"))?;
            report.total_corrected =
                Some((u64::try_from(bytes).unwrap_or(0), u64::try_from(sum).unwrap_or(0)));
        }
        if report != ReconcileReport::default() {
            tracing::info!(namespace = ns, ?report, "reconciled the cache directory with its rows");
        }
        Ok(report)
    }
}

async fn clear_dir(dir: PathBuf) -> Result<u64> {
    let path = dir.clone();
    blocking(move || {
        let mut removed = 0;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    })
    .await
    .map_err(Error::io("clear", path))
}

/// Every payload under `data`, as the relative names rows use (`<hh>/<name>`).
async fn list_payloads(data: PathBuf) -> Result<HashSet<String>> {
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
                names.insert(format!("{shard_name}/{}", file?.file_name().to_string_lossy()));
            }
        }
        Ok(names)
    })
    .await
    .map_err(Error::io("list payloads in", path))
}
