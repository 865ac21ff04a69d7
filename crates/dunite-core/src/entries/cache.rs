//! `EntryCache`: an [`EntryStore`] with its [`DebouncedEvictor`], the cache every kind wraps.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncRead;

use super::database::{Database, DatabaseOptions};
use super::layout::Expected;
use super::store::{EntryInfo, EntryStats, EntryStore, KeyDisplay, OnConflict, OpenEntry, Pin, Stored};
use crate::{DebouncedEvictor, Error, EvictionPolicy, EvictorStats, PassOutcome, PassReport, Result};

/// How to open an [`EntryCache`].
///
/// # Example
///
/// ```
/// use dunite_core::{CacheOptions, EvictionPolicy, OnConflict};
///
/// let options = CacheOptions::new("/var/cache/dunite/blobs", "oci", EvictionPolicy::new(20 << 30))
///     .with_on_conflict(OnConflict::KeepExisting);
/// assert_eq!(options.namespace(), "oci");
/// ```
#[derive(Debug, Clone)]
pub struct CacheOptions {
    dir: PathBuf,
    namespace: String,
    policy: EvictionPolicy,
    database: Option<Database>,
    database_url: Option<String>,
    database_options: DatabaseOptions,
    on_conflict: OnConflict,
    access_flush_period: Duration,
    show_key: KeyDisplay,
}

impl CacheOptions {
    /// Payloads under `dir`, rows under `namespace`, evicted by `policy`. By default the
    /// metadata lives in an embedded SQLite database at `dir/metadata.db`, an existing key is
    /// replaced by a new store, and access stamps are flushed every second.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>, namespace: &str, policy: EvictionPolicy) -> Self {
        Self {
            dir: dir.into(),
            namespace: namespace.to_owned(),
            policy,
            database: None,
            database_url: None,
            database_options: DatabaseOptions::new(),
            on_conflict: OnConflict::Replace,
            access_flush_period: Duration::from_secs(1),
            show_key: |key| key.to_owned(),
        }
    }

    /// Keep the rows in `database` (shared with other caches, under this cache's namespace)
    /// instead of the embedded default.
    #[must_use]
    pub fn with_database(mut self, database: Database) -> Self {
        self.database = Some(database);
        self
    }

    /// Keep the rows in the database at `url` (`postgres://...` for several instances sharing
    /// one database and one cache directory, or `sqlite://...`), opened with
    /// [`with_database_options`](Self::with_database_options) when the cache opens. A
    /// database given with [`with_database`](Self::with_database) takes precedence.
    ///
    /// ```
    /// use dunite_core::{CacheOptions, EvictionPolicy};
    ///
    /// let options = CacheOptions::new("/srv/cache/blobs", "oci", EvictionPolicy::new(20 << 30))
    ///     .with_database_url("postgres://dunite@db.internal/dunite");
    /// assert_eq!(options.namespace(), "oci");
    /// ```
    #[must_use]
    pub fn with_database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// Pool bounds for a database the cache opens itself (the embedded default, or one given
    /// by [`with_database_url`](Self::with_database_url)).
    #[must_use]
    pub fn with_database_options(mut self, options: DatabaseOptions) -> Self {
        self.database_options = options;
        self
    }

    /// What a store does when the key is already present.
    #[must_use]
    pub fn with_on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.on_conflict = on_conflict;
        self
    }

    /// Show keys in logs and errors through `show_key` instead of as they are: for keys that
    /// may hold a secret, such as URLs with a token in their query.
    ///
    /// ```
    /// use dunite_core::{CacheOptions, EvictionPolicy};
    ///
    /// let options = CacheOptions::new("/var/cache/files", "files", EvictionPolicy::new(1 << 30))
    ///     .with_key_display(|key| key.split('?').next().unwrap_or(key).to_owned());
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn with_key_display(mut self, show_key: KeyDisplay) -> Self {
        self.show_key = show_key;
        self
    }

    /// How often recorded accesses are written to the database.
    #[must_use]
    pub fn with_access_flush_period(mut self, period: Duration) -> Self {
        self.access_flush_period = period;
        self
    }

    /// The payload directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The namespace of the cache's rows.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The eviction policy.
    #[must_use]
    pub fn policy(&self) -> &EvictionPolicy {
        &self.policy
    }
}

/// Counters of an [`EntryCache`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Hits, misses, stores and bytes stored.
    pub entries: EntryStats,
    /// The evictor's pokes, passes and evictions.
    pub evictor: EvictorStats,
}

/// A byte-capped cache of entries: an [`EntryStore`] and the one [`DebouncedEvictor`] that
/// keeps it under its cap. Cloning shares the cache; the evictor task ends when the last
/// clone drops.
///
/// Cache kinds wrap this and add their keys and verification (`dunite-oci`'s `BlobCache`,
/// `dunite-download`'s `DownloadCache`).
///
/// # Example
///
/// ```
/// use dunite_core::{CacheOptions, EntryCache, EvictionPolicy, Expected};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), dunite_core::Error> {
/// let dir = tempfile::tempdir().map_err(|e| dunite_core::Error::InvalidConfig(e.to_string()))?;
/// let cache = EntryCache::open(CacheOptions::new(dir.path(), "demo", EvictionPolicy::new(1 << 20))).await?;
///
/// let stored = cache.store("greeting", &b"hello"[..], &Expected::new().with_size(5), "").await?;
/// assert_eq!(stored.size, 5);
///
/// let entry = cache.open_entry("greeting").await?.expect("just stored");
/// assert_eq!(entry.info.size, 5);
/// assert_eq!(cache.total_bytes().await?, 5);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct EntryCache {
    store: EntryStore,
    evictor: DebouncedEvictor<EntryStore>,
}

impl EntryCache {
    /// Open or create the cache, reconcile it with its directory, spawn its evictor and run a
    /// start-up pass (so a cache opened over its cap, say with a smaller cap than last time,
    /// comes back under it before serving).
    ///
    /// Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::NoRuntime`] outside a runtime, [`Error::InvalidPolicy`] or
    /// [`Error::InvalidConfig`] for bad options, [`Error::Io`] or [`Error::Database`] if the
    /// directory or the database cannot be opened.
    pub async fn open(options: CacheOptions) -> Result<Self> {
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let database = match (options.database, &options.database_url) {
            (Some(database), _) => database,
            (None, Some(url)) => Database::connect(url, &options.database_options).await?,
            (None, None) => {
                tokio::fs::create_dir_all(&options.dir)
                    .await
                    .map_err(Error::io("create directory", &options.dir))?;
                Database::open_sqlite(&options.dir.join("metadata.db"), &options.database_options).await?
            }
        };
        let store = EntryStore::open_with_key_display(
            database,
            &options.namespace,
            &options.dir,
            options.policy.max_bytes(),
            options.on_conflict,
            options.show_key,
        )
        .await?;
        let evictor = DebouncedEvictor::spawn(store.clone(), options.policy)?;
        // Every commit that may add bytes pokes (after the commit, as the evictor's contract
        // requires), including one whose answer was lost and one whose caller went away.
        store.set_commit_hook(Box::new(evictor.weak_poke()));
        store.spawn_access_flusher(options.access_flush_period);
        start_up_passes(&evictor).await;
        Ok(Self { store, evictor })
    }

    /// Store `reader`'s bytes under `key` (see [`EntryStore::store`]), then poke the evictor.
    ///
    /// # Cancel safety
    ///
    /// As [`EntryStore::store`]: cancelling never leaves a visible partial entry.
    ///
    /// # Errors
    ///
    /// As [`EntryStore::store`]; nothing is stored on error.
    pub async fn store<R>(&self, key: &str, reader: R, expected: &Expected, meta: &str) -> Result<Stored>
    where
        R: AsyncRead + Unpin + Send,
    {
        self.store_with_meta(key, reader, expected, |_| meta.to_owned()).await
    }

    /// As [`store`](Self::store), with the metadata derived from the computed digest; see
    /// [`EntryStore::store_with_meta`].
    ///
    /// # Cancel safety
    ///
    /// As [`EntryStore::store`].
    ///
    /// # Errors
    ///
    /// As [`EntryStore::store`]; nothing is stored on error.
    pub async fn store_with_meta<R, M>(
        &self,
        key: &str,
        reader: R,
        expected: &Expected,
        meta: M,
    ) -> Result<Stored>
    where
        R: AsyncRead + Unpin + Send,
        M: FnOnce(&crate::ContentDigest) -> String + Send,
    {
        // The store's commit hook pokes the evictor.
        self.store.store_with_meta(key, reader, expected, meta).await
    }

    /// Store the file at `path` without copying it, then poke the evictor; see
    /// [`EntryStore::store_file`].
    ///
    /// # Cancel safety
    ///
    /// As [`EntryStore::store`].
    ///
    /// # Errors
    ///
    /// As [`EntryStore::store_file`].
    pub async fn store_file(
        &self,
        key: &str,
        path: &Path,
        expected: &Expected,
        meta: &str,
    ) -> Result<Stored> {
        self.store.store_file(key, path, expected, meta).await
    }

    /// Open `key`'s payload, recording the access; see [`EntryStore::open_entry`].
    ///
    /// # Errors
    ///
    /// As [`EntryStore::open_entry`].
    pub async fn open_entry(&self, key: &str) -> Result<Option<OpenEntry>> {
        self.store.open_entry(key).await
    }

    /// Open the entry a store of `key` just committed, without a database lookup (falling back
    /// to [`open_entry`](Self::open_entry) if it is gone); see [`EntryStore::open_stored`].
    ///
    /// # Errors
    ///
    /// As [`EntryStore::open_stored`].
    ///
    /// # Example
    ///
    /// ```
    /// use dunite_core::{CacheOptions, EntryCache, EvictionPolicy, Expected};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), dunite_core::Error> {
    /// # let dir = tempfile::tempdir().map_err(|e| dunite_core::Error::InvalidConfig(e.to_string()))?;
    /// let cache = EntryCache::open(CacheOptions::new(dir.path(), "demo", EvictionPolicy::new(1 << 20))).await?;
    /// let stored = cache.store("greeting", &b"hello"[..], &Expected::new(), "v1").await?;
    /// // Serve what was stored: the handle and the row as committed, no second lookup.
    /// let entry = cache.open_stored("greeting", &stored).await?.expect("just stored");
    /// assert_eq!((entry.info.size, entry.info.meta.as_str()), (5, "v1"));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn open_stored(&self, key: &str, stored: &Stored) -> Result<Option<OpenEntry>> {
        self.store.open_stored(key, stored).await
    }

    /// Open `key`'s payload without the database, verified against `digest`; see
    /// [`EntryStore::open_unindexed`].
    ///
    /// # Errors
    ///
    /// As [`EntryStore::open_unindexed`].
    pub async fn open_unindexed(
        &self,
        key: &str,
        digest: &crate::ContentDigest,
    ) -> Result<Option<(tokio::fs::File, u64)>> {
        self.store.open_unindexed(key, digest).await
    }

    /// What is recorded about `key`; see [`EntryStore::info`].
    ///
    /// # Errors
    ///
    /// As [`EntryStore::info`].
    pub async fn info(&self, key: &str) -> Result<Option<EntryInfo>> {
        self.store.info(key).await
    }

    /// Replace `key`'s metadata and refresh its stored time, if its metadata is still
    /// `seen_meta`; see [`EntryStore::refresh`].
    ///
    /// # Errors
    ///
    /// As [`EntryStore::refresh`].
    pub async fn refresh(&self, key: &str, seen_meta: &str, meta: &str) -> Result<bool> {
        self.store.refresh(key, seen_meta, meta).await
    }

    /// Whether `key` is present.
    ///
    /// # Errors
    ///
    /// As [`EntryStore::contains`].
    pub async fn contains(&self, key: &str) -> Result<bool> {
        self.store.contains(key).await
    }

    /// Remove `key` now; see [`EntryStore::remove`].
    ///
    /// # Errors
    ///
    /// As [`EntryStore::remove`].
    pub async fn remove(&self, key: &str) -> Result<Option<u64>> {
        self.store.remove(key).await
    }

    /// Keep `key` out of eviction while the guard lives; see [`EntryStore::pin`].
    pub fn pin(&self, key: &str) -> Pin {
        self.store.pin(key)
    }

    /// The accounted total (O(1)).
    ///
    /// # Errors
    ///
    /// As [`EntryStore::total_bytes`].
    pub async fn total_bytes(&self) -> Result<u64> {
        self.store.total_bytes().await
    }

    /// The number of entries (O(1)).
    ///
    /// # Errors
    ///
    /// As [`EntryStore::len`].
    pub async fn len(&self) -> Result<u64> {
        self.store.len().await
    }

    /// Whether the cache is empty.
    ///
    /// # Errors
    ///
    /// As [`EntryStore::is_empty`].
    pub async fn is_empty(&self) -> Result<bool> {
        self.store.is_empty().await
    }

    /// Run an eviction pass now and wait for it; see [`DebouncedEvictor::evict_now`]. For
    /// start-up and for callers that must know the cap holds before going on.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the pass still runs.
    ///
    /// # Errors
    ///
    /// As [`DebouncedEvictor::evict_now`].
    pub async fn evict_if_over_cap(&self) -> Result<PassReport> {
        self.evictor.evict_now().await
    }

    /// Counters of the store and the evictor.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        CacheStats { entries: self.store.stats(), evictor: self.evictor.stats() }
    }

    /// The entry store.
    #[must_use]
    pub fn entries(&self) -> &EntryStore {
        &self.store
    }

    /// The evictor.
    #[must_use]
    pub fn evictor(&self) -> &DebouncedEvictor<EntryStore> {
        &self.evictor
    }
}

/// The start-up eviction: passes until the total is under the cap, so a cache opened over it
/// (a lowered cap, say) serves only once back under it. Every pass over the cap removes at
/// least one chunk, so in one process this ends; it stops early on a pass that removes
/// nothing or fails, and when the total a pass starts from is no lower than the last one's
/// (other instances storing as fast as this one evicts): the evictor then carries on in the
/// background.
async fn start_up_passes(evictor: &DebouncedEvictor<EntryStore>) {
    let mut last_start = u64::MAX;
    loop {
        match evictor.evict_now().await {
            Ok(report)
                if report.outcome == PassOutcome::TimeBudgetSpent
                    && report.entries_evicted > 0
                    && report.total_before < last_start =>
            {
                last_start = report.total_before;
            }
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(%error, "start-up eviction pass failed; the evictor retries in the background");
                return;
            }
        }
    }
}
