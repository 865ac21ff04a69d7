//! The offline check of one cache: do the rows, the accounted total and the payload files
//! agree, and do payloads hash to what their rows say? With repair, fix what can be fixed.
//!
//! Run it only while no server uses the cache (`dunite check` opens the database and the
//! directory itself). It reports before it repairs: every finding says whether it was fixed.
//! `options.rs` says how it runs, `report.rs` what it found; this file is the check.

mod options;
mod report;

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use super::database::Database;
use super::layout::blocking;
use super::store::{EntryStore, OnConflict};
use crate::hash::ContentDigest;
use crate::{Error, Result};

pub use self::options::{CheckOptions, CheckProgress, ExpectedDigest, Repair, Verify};
pub use self::report::{CheckReport, Finding, Problem};

/// A live row as the check reads it.
struct Row {
    key: String,
    file: String,
    size: u64,
    meta: String,
}

impl EntryStore {
    /// Open a cache's entries for [`check`](Self::check) only: no reconciliation (which
    /// would repair without reporting), no evictor. The directory's `data/` and `tmp/` are
    /// created if missing.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open).
    pub async fn open_for_check(db: Database, namespace: &str, dir: &Path) -> Result<Self> {
        Self::open_unreconciled(db, namespace, dir, i64::MAX as u64, OnConflict::KeepExisting, |key| {
            key.to_owned()
        })
        .await
    }

    /// Check that the rows, the accounted total and the payload files agree (every live row
    /// has its file with the row's size, every file under `data/` has a row, `tmp/` is empty,
    /// no removal is left half done, the total is the rows' sum) and, as `options` say, that
    /// payloads hash to what their rows say; with [`Repair::Yes`], fix each finding through
    /// the same write paths the cache uses, so the accounting stays exact.
    ///
    /// Run it while nothing else uses the cache: a store in flight looks like an orphan file.
    /// Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] or [`Error::Io`] if the rows or the directory cannot be read (or a
    /// repair cannot be made).
    ///
    /// # Example
    ///
    /// ```
    /// use dunite_core::{CheckOptions, Database, DatabaseOptions, EntryStore, Expected, OnConflict, Repair};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), dunite_core::Error> {
    /// let dir = tempfile::tempdir().expect("a temporary directory");
    /// let db = Database::open_sqlite(&dir.path().join("metadata.db"), &DatabaseOptions::new()).await?;
    /// let store = EntryStore::open(db.clone(), "example", dir.path(), 1 << 20, OnConflict::KeepExisting).await?;
    /// store.store("a", &b"bytes"[..], &Expected::new(), "").await?;
    /// std::fs::write(dir.path().join("data").join("stray"), b"x").expect("plant an orphan");
    ///
    /// let checked = EntryStore::open_for_check(db, "example", dir.path()).await?;
    /// let report = checked.check(&CheckOptions::new().with_repair(Repair::Yes)).await?;
    /// assert_eq!(report.findings.len(), 1);
    /// assert!(report.is_consistent(), "repaired");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn check(&self, options: &CheckOptions) -> Result<CheckReport> {
        let inner = self.inner();
        let ns = inner.namespace.as_str();
        let repair = options.repair == Repair::Yes;
        let mut report = CheckReport { namespace: ns.to_owned(), ..CheckReport::default() };
        let mut findings = Vec::new();
        let mut found = |problem: Problem, repaired: bool| report_finding(&mut findings, problem, repaired);

        for file in list_files(inner.layout.tmp_dir().to_path_buf()).await? {
            let repaired = repair && remove_file(&inner.layout.tmp_dir().join(&file)).await?;
            found(Problem::TempFile { file }, repaired);
        }

        let rows: Vec<(String, String, i64, i64, String)> = sqlx::query_as(
            "SELECT key, file, size, state, meta FROM entries WHERE namespace = $1 ORDER BY key",
        )
        .bind(ns)
        .fetch_all(inner.db.pool())
        .await
        .map_err(Error::db("list entries"))?;
        let mut on_disk = list_payloads(inner.layout.data_dir().to_path_buf()).await?;
        let mut live = Vec::new();
        let mut marked = Vec::new();
        for (key, file, size, state, meta) in rows {
            if state == 0 {
                live.push(Row { key, file, size: u64::try_from(size).unwrap_or(0), meta });
            } else {
                marked.push((key, file));
            }
        }
        if !marked.is_empty() {
            let mut deleted = Vec::new();
            if repair {
                let mut conn = inner.db.acquire().await?;
                deleted = inner.delete_marked(&mut conn, &marked).await?;
                for (_, file, _) in &deleted {
                    inner.layout.unlink(file).await?;
                }
            }
            for (key, file) in marked {
                // Its payload (if still there) belongs to this finding, not to an orphan's.
                on_disk.remove(&file);
                let repaired = deleted.iter().any(|(k, _, _)| *k == key);
                found(Problem::UnfinishedRemoval { key }, repaired);
            }
        }

        let mut intact = Vec::with_capacity(live.len());
        for row in live {
            match on_disk.remove(&row.file) {
                None => {
                    let repaired = repair
                        && self.delete_row(&row.key, &row.file, true, "drop a row without its file").await?;
                    found(Problem::MissingFile { key: row.key, file: row.file }, repaired);
                }
                Some(size) if size != row.size => {
                    let repaired = repair && self.remove_bad(&row).await?;
                    found(Problem::WrongSize { key: row.key, row: row.size, file: size }, repaired);
                }
                Some(_) => intact.push(row),
            }
        }
        report.files = intact.len() as u64;
        for (file, size) in on_disk {
            report.files += 1;
            let repaired = repair && remove_file(&inner.layout.payload(&file)).await?;
            found(Problem::OrphanFile { file, size }, repaired);
        }

        // Hash what is asked, against what the kind says each row must hash to.
        let chosen: Vec<(&Row, ContentDigest)> = match (&options.expected, options.verify) {
            (Some(expected), Verify::Sample(_) | Verify::All) => {
                let mut with: Vec<_> =
                    intact.iter().filter_map(|row| expected(&row.key, &row.meta).map(|d| (row, d))).collect();
                if let Verify::Sample(n) = options.verify {
                    sample(&mut with, usize::try_from(n).unwrap_or(usize::MAX));
                }
                with
            }
            _ => Vec::new(),
        };
        let total: u64 = chosen.iter().map(|(row, _)| row.size).sum();
        let mut done = 0u64;
        let mut wrong = Vec::new();
        for (row, expected) in chosen {
            let actual = hash_file(inner.layout.payload(&row.file), expected.algorithm(), |n| {
                done += n;
                if let Some(progress) = &options.progress {
                    progress(done, total);
                }
            })
            .await?;
            if actual == expected {
                report.verified += 1;
            } else {
                wrong.push((row, expected, actual));
            }
        }
        for (row, expected, actual) in wrong {
            let repaired = repair && self.remove_bad(row).await?;
            found(
                Problem::WrongDigest {
                    key: row.key.clone(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                },
                repaired,
            );
        }

        // The total, last: the repairs above kept it in step with the rows they changed.
        let (sum, count): (i64, i64) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT), COUNT(*) FROM entries WHERE namespace = $1",
        )
        .bind(ns)
        .fetch_one(inner.db.pool())
        .await
        .map_err(Error::db("sum entries"))?;
        let mut conn = inner.db.acquire().await?;
        let (bytes, entries) = inner.totals_on(&mut conn).await?;
        drop(conn);
        let rows = (u64::try_from(sum).unwrap_or(0), u64::try_from(count).unwrap_or(0));
        report.row_bytes = rows.0;
        report.rows = rows.1;
        if (bytes, entries) != rows {
            let repaired = repair && self.recount().await?.is_some();
            found(Problem::WrongTotal { accounted: (bytes, entries), rows }, repaired);
        }
        report.findings = findings;
        Ok(report)
    }

    /// Remove an entry whose payload is wrong: its row (keeping the total in step), then its
    /// file. Returns whether the row was still there.
    async fn remove_bad(&self, row: &Row) -> Result<bool> {
        let deleted = self.delete_row(&row.key, &row.file, true, "remove a damaged entry").await?;
        if deleted {
            self.inner().layout.unlink(&row.file).await?;
        }
        Ok(deleted)
    }
}

fn report_finding(findings: &mut Vec<Finding>, problem: Problem, repaired: bool) {
    // The report is the caller's to show; the log only traces.
    tracing::debug!(%problem, repaired, "check finding");
    findings.push(Finding { problem, repaired });
}

/// Keep `n` of `items`, chosen by a seed that changes per run, so repeated sampled checks
/// cover different entries.
fn sample<T>(items: &mut Vec<T>, n: usize) {
    if items.len() <= n {
        return;
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos() & 0xffff_ffff_ffff).unwrap_or(1))
        | 1;
    let mut state = seed;
    // A partial Fisher–Yates shuffle with xorshift: the first `n` are a uniform sample.
    for i in 0..n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let span = (items.len() - i) as u64;
        let j = i + usize::try_from(state % span).unwrap_or(0);
        items.swap(i, j);
    }
    items.truncate(n);
}

/// Hash the file at `path`, reporting the bytes read as it goes.
async fn hash_file(
    path: PathBuf,
    algorithm: crate::DigestAlgorithm,
    mut progress: impl FnMut(u64),
) -> Result<ContentDigest> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let shown = path.clone();
    let hashing = blocking(move || {
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = algorithm.hasher();
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                return Ok(hasher.finish());
            }
            hasher.update(&buffer[..n]);
            let _ = tx.send(n as u64);
        }
    });
    tokio::pin!(hashing);
    loop {
        tokio::select! {
            Some(n) = rx.recv() => progress(n),
            result = &mut hashing => {
                while let Ok(n) = rx.try_recv() {
                    progress(n);
                }
                return result.map_err(Error::io("hash", shown));
            }
        }
    }
}

async fn remove_file(path: &Path) -> Result<bool> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(Error::io("remove", path.to_path_buf())(e)),
    }
}

/// The names of the files in `dir`.
async fn list_files(dir: PathBuf) -> Result<Vec<String>> {
    let path = dir.clone();
    blocking(move || {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort_unstable();
        Ok(names)
    })
    .await
    .map_err(Error::io("list", path))
}

/// Every file under `data` (in its shard directories) with its size, by the relative names
/// rows use (`<hh>/<name>`); files directly in `data` too.
async fn list_payloads(data: PathBuf) -> Result<HashMap<String, u64>> {
    let path = data.clone();
    blocking(move || {
        let mut files = HashMap::new();
        for entry in std::fs::read_dir(&data)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() {
                for file in std::fs::read_dir(entry.path())? {
                    let file = file?;
                    let size = file.metadata()?.len();
                    files.insert(format!("{name}/{}", file.file_name().to_string_lossy()), size);
                }
            } else {
                files.insert(name, entry.metadata()?.len());
            }
        }
        Ok(files)
    })
    .await
    .map_err(Error::io("list payloads in", path))
}
