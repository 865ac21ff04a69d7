//! `DownloadCache`: files fetched from URLs, on the shared entry cache.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use serde::{Deserialize, Serialize};

use dunite_core::{
    CacheOptions, CacheStats, ContentDigest, DigestAlgorithm, EntryCache, EntryInfo, EvictionPolicy,
    Expected, OnConflict, PassReport, Pin, Stored,
};

use crate::{Error, FetchRequest, Fetched, Fetcher, ResponseMeta, Result, UrlKey, Validators};

/// The namespace of download rows in the metadata database.
pub const NAMESPACE: &str = "downloads";

/// How often one call retries when the entry it fetched is removed before it can open it.
const MAX_ATTEMPTS: usize = 4;

/// What [`DownloadCache::get_or_fetch`] is asked for: a URL and, optionally, the SHA-256 its
/// content must have.
///
/// # Example
///
/// ```
/// use dunite_core::{ContentDigest, DigestAlgorithm};
/// use dunite_download::DownloadRequest;
///
/// let request = DownloadRequest::new("https://example.com/tool.tar.gz".parse()?)
///     .with_sha256(ContentDigest::of(DigestAlgorithm::Sha256, b"the tarball"));
/// assert!(request.sha256().is_some());
/// # Ok::<(), dunite_download::UrlError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadRequest {
    url: UrlKey,
    sha256: Option<ContentDigest>,
}

impl DownloadRequest {
    /// A request for `url`'s content, whatever it is.
    #[must_use]
    pub fn new(url: UrlKey) -> Self {
        Self { url, sha256: None }
    }

    /// The content must hash to `digest` (a SHA-256 digest; any other algorithm is refused
    /// with [`Error::UnsupportedDigest`]). A download that does not is refused with
    /// [`DigestMismatch`](dunite_core::Error::DigestMismatch) and not cached; a cached entry
    /// that does not is treated as a miss.
    #[must_use]
    pub fn with_sha256(mut self, digest: ContentDigest) -> Self {
        self.sha256 = Some(digest);
        self
    }

    /// The URL.
    #[must_use]
    pub fn url(&self) -> &UrlKey {
        &self.url
    }

    /// The expected SHA-256, if any.
    #[must_use]
    pub fn sha256(&self) -> Option<&ContentDigest> {
        self.sha256.as_ref()
    }
}

/// Where a [`Download`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// A fresh cached entry: no upstream request.
    Hit,
    /// A new body from upstream (a miss, or a stale entry whose content changed).
    Fetched,
    /// A stale entry upstream confirmed unchanged ("not modified"): no body transferred.
    Revalidated,
}

/// What [`DownloadCache::lookup`] found for a request.
#[derive(Debug)]
#[non_exhaustive]
pub enum Lookup {
    /// A fresh entry that satisfies the request, opened: a hit (counted, its access recorded).
    Fresh(Box<Download>),
    /// An entry that is stale or does not satisfy the request (another pin):
    /// [`DownloadCache::get_or_fetch`] revalidates or refetches it.
    Cached,
    /// No entry.
    Missing,
}

/// What is recorded about a cached download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadInfo {
    size: u64,
    sha256: ContentDigest,
    content_type: Option<String>,
    validators: Validators,
    stored_at_ms: i64,
    /// The row's metadata as read: a refresh applies only if it is unchanged.
    meta: String,
}

impl DownloadInfo {
    /// The content's size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The content's SHA-256.
    #[must_use]
    pub fn sha256(&self) -> &ContentDigest {
        &self.sha256
    }

    /// The response's `Content-Type`, if it had one.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// The response's `ETag`, if it had one.
    #[must_use]
    pub fn etag(&self) -> Option<&str> {
        self.validators.etag()
    }

    /// The response's `Last-Modified`, if it had one.
    #[must_use]
    pub fn last_modified(&self) -> Option<&str> {
        self.validators.last_modified()
    }

    /// The `ETag` and `Last-Modified`, for a conditional request.
    #[must_use]
    pub fn validators(&self) -> &Validators {
        &self.validators
    }

    /// When the entry was stored or last revalidated.
    #[must_use]
    pub fn stored_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(u64::try_from(self.stored_at_ms).unwrap_or(0))
    }

    /// Whether the entry is older than `freshness` (always, for a freshness of zero).
    #[must_use]
    pub fn is_stale(&self, freshness: Duration) -> bool {
        let age_ms = now_ms().saturating_sub(self.stored_at_ms).max(0);
        u128::from(age_ms.unsigned_abs()) >= freshness.as_millis()
    }

    /// The recorded metadata of a row; `None` if it is not a complete download record (an
    /// entry whose digest is not recorded yet, or foreign metadata).
    fn from_entry(info: &EntryInfo) -> Option<Self> {
        let meta: Meta = serde_json::from_str(&info.meta).ok()?;
        let bytes = hex::decode(meta.sha256?).ok()?;
        let sha256 = ContentDigest::from_bytes(DigestAlgorithm::Sha256, bytes)?;
        let mut validators = Validators::new();
        if let Some(etag) = meta.etag {
            validators = validators.with_etag(etag);
        }
        if let Some(last_modified) = meta.last_modified {
            validators = validators.with_last_modified(last_modified);
        }
        Some(Self {
            size: info.size,
            sha256,
            content_type: meta.content_type,
            validators,
            stored_at_ms: info.stored_at_ms,
            meta: info.meta.clone(),
        })
    }

    fn satisfies(&self, request: &DownloadRequest) -> bool {
        request.sha256().is_none_or(|want| *want == self.sha256)
    }
}

/// The download-specific metadata of an entry, as JSON in the core's `meta` column. Size and
/// times are the core row's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    /// Lower-case hex, set in the store's own commit (`store_with_meta`); a record without it
    /// (never written by this crate) is treated as a miss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_modified: Option<String>,
}

impl Meta {
    fn new(sha256: Option<&ContentDigest>, content_type: Option<&str>, validators: &Validators) -> Self {
        Self {
            sha256: sha256.map(ContentDigest::hex),
            content_type: content_type.map(str::to_owned),
            etag: validators.etag().map(str::to_owned),
            last_modified: validators.last_modified().map(str::to_owned),
        }
    }

    fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Metadata(Arc::new(e)))
    }
}

/// An open cached download and what is recorded about it. The handle stays valid (and its
/// bytes complete and correct) even if the entry is evicted or replaced while it is read.
#[derive(Debug)]
pub struct Download {
    file: tokio::fs::File,
    info: DownloadInfo,
    source: Source,
}

impl Download {
    /// The open content, to read or seek.
    pub fn file_mut(&mut self) -> &mut tokio::fs::File {
        &mut self.file
    }

    /// The open content.
    #[must_use]
    pub fn into_file(self) -> tokio::fs::File {
        self.file
    }

    /// What is recorded about the content.
    #[must_use]
    pub fn info(&self) -> &DownloadInfo {
        &self.info
    }

    /// Whether this was a hit, a fetch or a revalidation.
    #[must_use]
    pub fn source(&self) -> Source {
        self.source
    }
}

/// Counters of a [`DownloadCache`]'s fetch-through, beside the core's [`CacheStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DownloadStats {
    /// Calls answered from a fresh entry, with no upstream request.
    pub hits: u64,
    /// Calls to a fetcher (each is one upstream request).
    pub fetches: u64,
    /// Of those, conditional requests (carrying a stale entry's validators).
    pub conditional: u64,
    /// "Not modified" answers that refreshed an entry without a transfer.
    pub not_modified: u64,
    /// Calls that joined a fetch already in flight instead of starting one.
    pub coalesced: u64,
    /// Fills that ended in an error (each reached every caller that waited on it).
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    fetches: AtomicU64,
    conditional: AtomicU64,
    not_modified: AtomicU64,
    coalesced: AtomicU64,
    failed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A fill that succeeded. It holds the pin, so the entry is not evicted before every caller
/// waiting on the fill has opened it.
struct Filled {
    source: Source,
    /// What the fill stored (none for a revalidation), so its callers open it without a
    /// second lookup.
    stored: Option<Stored>,
    _pin: Pin,
}

type SharedFill = Shared<BoxFuture<'static, Result<Arc<Filled>>>>;

/// A fill in flight: its id (so only it removes itself), what its leader expects, and the
/// shared answer.
struct InFlight {
    id: u64,
    expected: Option<ContentDigest>,
    fill: SharedFill,
}

struct Inner {
    cache: EntryCache,
    freshness: Duration,
    in_flight: Mutex<HashMap<String, InFlight>>,
    next_id: AtomicU64,
    counters: Counters,
}

/// A byte-capped cache of files fetched from URLs, keyed by their canonical [`UrlKey`].
///
/// Cheap to clone; clones share the cache (and its single-flight table), and its eviction
/// task ends when the last clone drops. Storage, eviction and crash recovery are the core
/// [`EntryCache`]'s; this type adds URL keys, content verification, fetch-through with one
/// upstream transfer per URL at a time, and revalidation of stale entries.
///
/// See the [crate documentation](crate) for an example.
#[derive(Clone)]
pub struct DownloadCache {
    inner: Arc<Inner>,
}

impl fmt::Debug for DownloadCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DownloadCache")
            .field("cache", &self.inner.cache)
            .field("freshness", &self.inner.freshness)
            .field("in_flight", &lock(&self.inner.in_flight).len())
            .finish_non_exhaustive()
    }
}

impl DownloadCache {
    /// The options of a download cache with payloads under `dir` and its metadata in the
    /// embedded SQLite database `dir/metadata.db`; adjust them before [`new`](Self::new):
    /// `.with_database_url("postgres://...")` keeps the metadata in PostgreSQL instead, where
    /// several processes may share one database and one `dir` under one cap.
    #[must_use]
    pub fn options(dir: impl Into<std::path::PathBuf>, policy: EvictionPolicy) -> CacheOptions {
        // A key is a URL, whose query may carry a token: logs and errors show it redacted.
        CacheOptions::new(dir, NAMESPACE, policy)
            .with_key_display(|key| UrlKey::parse(key).map_or_else(|_| key.to_owned(), |url| url.redacted()))
    }

    /// Open or create the cache: reconcile the directory with the metadata after a crash,
    /// spawn the cache's one evictor and run a start-up eviction pass.
    ///
    /// An entry older than `freshness` is revalidated upstream before it is served (with
    /// [`Duration::ZERO`], on every request). Stores always replace the entry of their URL,
    /// whatever `options` say, since a URL's content can change.
    ///
    /// Requires a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the directory or database cannot be opened or the options are
    /// inconsistent.
    pub async fn new(options: CacheOptions, freshness: Duration) -> Result<Self> {
        let cache = EntryCache::open(options.with_on_conflict(OnConflict::Replace)).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                cache,
                freshness,
                in_flight: Mutex::default(),
                next_id: AtomicU64::new(0),
                counters: Counters::default(),
            }),
        })
    }

    /// How long an entry is served without revalidation.
    #[must_use]
    pub fn freshness(&self) -> Duration {
        self.inner.freshness
    }

    /// The content of `request`'s URL: from the cache if a fresh entry satisfies the request,
    /// else fetched with `fetcher` (revalidating a stale entry with its validators), stored,
    /// and opened.
    ///
    /// - A cached entry whose SHA-256 differs from the request's expected one is a miss: the
    ///   URL is fetched again and verified.
    /// - Concurrent calls for one URL share one fetch (single flight): one upstream request,
    ///   and every caller gets the content or the same error. After an error the next call
    ///   fetches again. A caller that expects a different SHA-256 than the one that started
    ///   the fetch waits for it, then makes its own attempt.
    /// - The entry is pinned (kept from eviction) while its fill is in flight, and until every
    ///   caller waiting on it has opened it.
    /// - A `Content-Length` reported by the fetcher is enforced, as is the expected SHA-256:
    ///   a mismatch, a short or long body, or a body that fails mid-stream is a typed error and
    ///   stores nothing (a stale entry being replaced is kept).
    ///
    /// Requires a Tokio runtime: the fetch runs on a spawned task.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. Dropping the future does not cancel the fetch, which completes (and
    /// caches its result) for the other callers waiting on it and for the next call.
    ///
    /// # Errors
    ///
    /// [`Error::UnsupportedDigest`] for an expected digest that is not SHA-256,
    /// [`Error::Fetch`] if the fetcher fails, [`Error::Cache`] with
    /// [`DigestMismatch`](dunite_core::Error::DigestMismatch),
    /// [`Truncated`](dunite_core::Error::Truncated), [`TooLong`](dunite_core::Error::TooLong),
    /// [`Source`](dunite_core::Error::Source) or [`TooLarge`](dunite_core::Error::TooLarge)
    /// for bad content and an I/O or database error for the cache's own failures,
    /// [`Error::UnexpectedNotModified`] for a "not modified" answer to an unconditional
    /// request, [`Error::FetchAborted`] if the fetcher panicked, [`Error::Vanished`] if the
    /// entry was removed before it could be opened on every attempt.
    pub async fn get_or_fetch<F>(&self, request: &DownloadRequest, fetcher: &F) -> Result<Download>
    where
        F: Fetcher + Clone + 'static,
    {
        if let Some(digest) = request.sha256()
            && digest.algorithm() != DigestAlgorithm::Sha256
        {
            return Err(Error::UnsupportedDigest { algorithm: digest.algorithm().name() });
        }
        let key = request.url().as_str();
        for _ in 0..MAX_ATTEMPTS {
            // 1. A fresh entry that satisfies the request is a hit; a stale one is revalidated.
            let mut stale = None;
            if let Some(entry) = self.inner.cache.open_entry(key).await?
                && let Some(info) = DownloadInfo::from_entry(&entry.info)
                && info.satisfies(request)
            {
                if !info.is_stale(self.inner.freshness) {
                    bump(&self.inner.counters.hits);
                    return Ok(Download { file: entry.file, info, source: Source::Hit });
                }
                stale = Some(info);
            }
            // 2. Join the fill in flight for this URL, or start one.
            let (fill, shared_expectation) = self.join_or_start(request, stale, fetcher)?;
            let filled = fill.await;
            if !shared_expectation {
                // The fill answered someone else's question; ask ours again.
                continue;
            }
            let filled = filled?;
            // 3. Open what the fill stored. A fill's answer is served even if already stale
            //    (with a freshness of zero it always is).
            let entry = match &filled.stored {
                Some(stored) => self.inner.cache.open_stored(key, stored).await?,
                None => self.inner.cache.open_entry(key).await?,
            };
            if let Some(entry) = entry
                && let Some(info) = DownloadInfo::from_entry(&entry.info)
                && info.satisfies(request)
            {
                return Ok(Download { file: entry.file, info, source: filled.source });
            }
            // Removed (or replaced by content we cannot serve) meanwhile: try again.
        }
        Err(Error::Vanished { url: request.url().redacted() })
    }

    /// Returns the fill for `request`'s URL and whether it answers the same question (the
    /// same expected digest) as `request`.
    fn join_or_start<F>(
        &self,
        request: &DownloadRequest,
        stale: Option<DownloadInfo>,
        fetcher: &F,
    ) -> Result<(SharedFill, bool)>
    where
        F: Fetcher + Clone + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| dunite_core::Error::NoRuntime)?;
        let key = request.url().as_str();
        let mut in_flight = lock(&self.inner.in_flight);
        if let Some(flight) = in_flight.get(key) {
            bump(&self.inner.counters.coalesced);
            return Ok((flight.fill.clone(), flight.expected.as_ref() == request.sha256()));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        // The task removes its table entry when it ends, which needs the lock held here: so
        // it cannot do so before the entry is inserted below.
        let task = runtime.spawn(Arc::clone(&self.inner).fill(id, request.clone(), stale, fetcher.clone()));
        let url = request.url().redacted();
        let fill =
            async move { task.await.unwrap_or_else(|_| Err(Error::FetchAborted { url })) }.boxed().shared();
        in_flight
            .insert(key.to_owned(), InFlight { id, expected: request.sha256().cloned(), fill: fill.clone() });
        Ok((fill, true))
    }

    /// One metadata read for `request`: a fresh entry that satisfies it, opened (the hit
    /// [`get_or_fetch`](Self::get_or_fetch) would give), or whether there is an entry at all.
    /// Never asks the upstream. A server's hit path calls this once instead of
    /// [`info`](Self::info) followed by `get_or_fetch`, which read the metadata twice.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the metadata cannot be read or the payload cannot be opened.
    pub async fn lookup(&self, request: &DownloadRequest) -> Result<Lookup> {
        let Some(entry) = self.inner.cache.open_entry(request.url().as_str()).await? else {
            return Ok(Lookup::Missing);
        };
        match DownloadInfo::from_entry(&entry.info) {
            Some(info) if info.satisfies(request) && !info.is_stale(self.inner.freshness) => {
                bump(&self.inner.counters.hits);
                Ok(Lookup::Fresh(Box::new(Download { file: entry.file, info, source: Source::Hit })))
            }
            _ => Ok(Lookup::Cached),
        }
    }

    /// Open the cached entry of `url`, whatever its age, without any upstream request.
    /// Records the access for LRU order.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the metadata cannot be read or the payload cannot be opened.
    pub async fn open(&self, url: &UrlKey) -> Result<Option<Download>> {
        let Some(entry) = self.inner.cache.open_entry(url.as_str()).await? else { return Ok(None) };
        Ok(DownloadInfo::from_entry(&entry.info).map(|info| Download {
            file: entry.file,
            info,
            source: Source::Hit,
        }))
    }

    /// What is recorded about `url`'s entry, whatever its age (no access recorded).
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the metadata cannot be read.
    pub async fn info(&self, url: &UrlKey) -> Result<Option<DownloadInfo>> {
        Ok(self.inner.cache.info(url.as_str()).await?.as_ref().and_then(DownloadInfo::from_entry))
    }

    /// The validators (`ETag`, `Last-Modified`) of `url`'s entry, for a caller that makes its
    /// own conditional request; `None` if the URL is not cached or its response carried
    /// neither. Whether the entry is stale: [`info`](Self::info) and
    /// [`DownloadInfo::is_stale`].
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the metadata cannot be read.
    pub async fn validators(&self, url: &UrlKey) -> Result<Option<Validators>> {
        Ok(self.info(url).await?.map(|info| info.validators).filter(|v| !v.is_empty()))
    }

    /// Whether `url` is cached (no access recorded).
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the metadata cannot be read.
    pub async fn contains(&self, url: &UrlKey) -> Result<bool> {
        Ok(self.inner.cache.contains(url.as_str()).await?)
    }

    /// Remove `url`'s entry now. Returns the bytes freed, if it was cached. Readers that have
    /// it open keep their bytes.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] on an I/O or database error.
    pub async fn remove(&self, url: &UrlKey) -> Result<Option<u64>> {
        Ok(self.inner.cache.remove(url.as_str()).await?)
    }

    /// Keep `url`'s entry out of eviction while the guard lives.
    pub fn pin(&self, url: &UrlKey) -> Pin {
        self.inner.cache.pin(url.as_str())
    }

    /// The number of cached downloads (O(1)).
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the metadata cannot be read.
    pub async fn len(&self) -> Result<u64> {
        Ok(self.inner.cache.len().await?)
    }

    /// Whether the cache is empty.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the metadata cannot be read.
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.inner.cache.is_empty().await?)
    }

    /// The accounted total of cached bytes (O(1): kept alongside the rows).
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the metadata cannot be read.
    pub async fn total_bytes(&self) -> Result<u64> {
        Ok(self.inner.cache.total_bytes().await?)
    }

    /// Run an eviction pass now (on the cache's one eviction task) and wait for it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the pass still runs.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] if the pass failed (the evictor also retries it).
    pub async fn evict_if_over_cap(&self) -> Result<PassReport> {
        Ok(self.inner.cache.evict_if_over_cap().await?)
    }

    /// Hits, misses, bytes stored and the evictor's counters.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// The fetch-through counters: hits, fetches, revalidations, coalesced calls.
    #[must_use]
    pub fn download_stats(&self) -> DownloadStats {
        let c = &self.inner.counters;
        DownloadStats {
            hits: c.hits.load(Ordering::Relaxed),
            fetches: c.fetches.load(Ordering::Relaxed),
            conditional: c.conditional.load(Ordering::Relaxed),
            not_modified: c.not_modified.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    /// The shared entry cache underneath.
    #[must_use]
    pub fn entries(&self) -> &EntryCache {
        &self.inner.cache
    }
}

/// Removes a fill's table entry when its task ends, however it ends.
struct Landed {
    inner: Arc<Inner>,
    key: String,
    id: u64,
}

impl Drop for Landed {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.inner.in_flight);
        if in_flight.get(&self.key).is_some_and(|flight| flight.id == self.id) {
            in_flight.remove(&self.key);
        }
    }
}

impl Inner {
    /// The spawned task of one fill.
    async fn fill<F: Fetcher>(
        self: Arc<Self>,
        id: u64,
        request: DownloadRequest,
        stale: Option<DownloadInfo>,
        fetcher: F,
    ) -> Result<Arc<Filled>> {
        let key = request.url().as_str();
        let _landed = Landed { inner: Arc::clone(&self), key: key.to_owned(), id };
        let pin = self.cache.pin(key);
        match self.fetch_and_store(&request, stale, &fetcher).await {
            Ok((source, stored)) => Ok(Arc::new(Filled { source, stored, _pin: pin })),
            Err(error) => {
                bump(&self.counters.failed);
                tracing::debug!(url = request.url().redacted(), %error, "fetch-through failed");
                Err(error)
            }
        }
    }

    async fn fetch_and_store<F: Fetcher>(
        &self,
        request: &DownloadRequest,
        mut stale: Option<DownloadInfo>,
        fetcher: &F,
    ) -> Result<(Source, Option<Stored>)> {
        let url = request.url();
        let key = url.as_str();
        loop {
            let validators = stale.as_ref().map(|info| info.validators.clone()).filter(|v| !v.is_empty());
            bump(&self.counters.fetches);
            if validators.is_some() {
                bump(&self.counters.conditional);
            }
            let conditional = validators.is_some();
            let answer = fetcher
                .fetch(FetchRequest::new(url.clone(), validators))
                .await
                .map_err(|e| Error::fetch(url, e))?;
            match answer {
                Fetched::Body { body, meta } => {
                    let stored = self.store(request, body, &meta).await?;
                    return Ok((Source::Fetched, Some(stored)));
                }
                Fetched::NotModified { meta } => {
                    let Some(info) = stale.take().filter(|_| conditional) else {
                        return Err(Error::UnexpectedNotModified { url: url.redacted() });
                    };
                    let mut validators = info.validators.clone();
                    if !meta.validators().is_empty() {
                        validators = meta.validators().clone();
                    }
                    let record = Meta::new(Some(&info.sha256), info.content_type(), &validators);
                    if self.cache.refresh(key, &info.meta, &record.to_json()?).await? {
                        bump(&self.counters.not_modified);
                        return Ok((Source::Revalidated, None));
                    }
                    // Removed or replaced since we looked: fetch the content whole (`stale`
                    // is now None).
                }
            }
        }
    }

    async fn store(
        &self,
        request: &DownloadRequest,
        body: crate::Body,
        meta: &ResponseMeta,
    ) -> Result<Stored> {
        let key = request.url().as_str();
        let mut expected = Expected::new();
        if let Some(length) = meta.content_length() {
            expected = expected.with_size(length);
        }
        if let Some(digest) = request.sha256() {
            expected = expected.with_digest(digest.clone());
        }
        let mut record = Meta::new(request.sha256(), meta.content_type(), meta.validators());
        // Fail on an unencodable record before any byte is stored, then fill in the digest
        // the core computes while streaming; the record is complete in the store's own commit.
        record.to_json()?;
        Ok(self
            .cache
            .store_with_meta(key, body, &expected, move |digest| {
                record.sha256 = Some(digest.hex());
                record.to_json().unwrap_or_default()
            })
            .await?)
    }
}
