//! `DownloadCache`: files fetched from URLs, on the shared entry cache.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use dunite_core::{
    CacheOptions, CacheStats, ContentDigest, DigestAlgorithm, EntryCache, EntryInfo, EvictionPolicy,
    FillOptions, Fills, OnConflict, PassReport, Pin,
};

use crate::{DownloadHead, Error, Fetcher, Result, UrlKey, Validators};

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
    /// An entry that is stale or does not satisfy the request (another pin), as recorded:
    /// [`DownloadCache::get_or_fetch`] (or a [`DownloadCache::fill`]) revalidates or
    /// refetches it.
    Cached(Box<DownloadInfo>),
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
    pub(crate) fn from_entry(info: &EntryInfo) -> Option<Self> {
        let meta: Meta = serde_json::from_str(&info.meta).ok()?;
        let sha256 = sha256_of_hex(meta.sha256.as_deref()?)?;
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

    /// The row's metadata as read (a refresh applies only if it is unchanged).
    pub(crate) fn meta(&self) -> &str {
        &self.meta
    }

    pub(crate) fn satisfies(&self, request: &DownloadRequest) -> bool {
        request.sha256().is_none_or(|want| *want == self.sha256)
    }
}

/// The SHA-256 a download's row records (its `meta` column), if any: what its payload must
/// hash to, for an offline check of the cache.
///
/// ```
/// assert!(dunite_download::recorded_sha256(r#"{"sha256":"00"}"#).is_none(), "too short");
/// assert!(dunite_download::recorded_sha256("not json").is_none());
/// ```
#[must_use]
pub fn recorded_sha256(meta: &str) -> Option<ContentDigest> {
    let meta: Meta = serde_json::from_str(meta).ok()?;
    sha256_of_hex(meta.sha256.as_deref()?)
}

fn sha256_of_hex(hex: &str) -> Option<ContentDigest> {
    ContentDigest::from_bytes(DigestAlgorithm::Sha256, hex::decode(hex).ok()?)
}

/// The download-specific metadata of an entry, as JSON in the core's `meta` column. Size and
/// times are the core row's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// Lower-case hex, set in the fill's own commit (from the digest of the verified bytes); a record without it
    /// (never written by this crate) is treated as a miss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_modified: Option<String>,
}

impl Meta {
    pub(crate) fn new(
        sha256: Option<&ContentDigest>,
        content_type: Option<&str>,
        validators: &Validators,
    ) -> Self {
        Self {
            sha256: sha256.map(ContentDigest::hex),
            content_type: content_type.map(str::to_owned),
            etag: validators.etag().map(str::to_owned),
            last_modified: validators.last_modified().map(str::to_owned),
        }
    }

    pub(crate) fn to_json(&self) -> Result<String> {
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
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) fetches: AtomicU64,
    pub(crate) conditional: AtomicU64,
    pub(crate) not_modified: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) failed: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(crate) struct Inner {
    pub(crate) cache: EntryCache,
    pub(crate) freshness: Duration,
    /// Fills in flight, by pin and URL: one table, for streaming clients and
    /// `get_or_fetch` alike.
    pub(crate) fills: Fills<String, DownloadHead>,
    pub(crate) counters: Counters,
}

/// A byte-capped cache of files fetched from URLs, keyed by their canonical [`UrlKey`].
///
/// Cheap to clone; clones share the cache (and its single-flight table), and its eviction
/// task ends when the last clone drops. Storage, eviction and crash recovery are the core
/// [`EntryCache`]'s; this type adds URL keys, content verification, fetch-through with one
/// upstream transfer per URL and pin at a time, and revalidation of stale entries.
///
/// See the [crate documentation](crate) for an example.
#[derive(Clone)]
pub struct DownloadCache {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for DownloadCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DownloadCache")
            .field("cache", &self.inner.cache)
            .field("freshness", &self.inner.freshness)
            .field("fills", &self.inner.fills)
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
        let fills = Fills::new(cache.entries().clone(), FillOptions::new());
        Ok(Self { inner: Arc::new(Inner { cache, freshness, fills, counters: Counters::default() }) })
    }

    /// The same cache with its fills bound by `options` (say, an idle timeout); call before
    /// the first fill.
    #[must_use]
    pub fn with_fill_options(self, options: FillOptions) -> Self {
        let inner = Arc::try_unwrap(self.inner).map_or_else(
            |shared| {
                // Already shared: the clones keep their table; this one gets its own.
                Inner {
                    cache: shared.cache.clone(),
                    freshness: shared.freshness,
                    fills: Fills::new(shared.cache.entries().clone(), options.clone()),
                    counters: Counters::default(),
                }
            },
            |mut inner| {
                inner.fills = Fills::new(inner.cache.entries().clone(), options.clone());
                inner
            },
        );
        Self { inner: Arc::new(inner) }
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
    /// - Concurrent calls for one URL and pin share one fill ([`fill`](Self::fill), the one
    ///   in-flight table the streaming path uses too): one upstream request, and every caller
    ///   gets the content or the same error. After an error the next call fetches again. A
    ///   caller that expects a different SHA-256 is another fill, verified against its own
    ///   (so one URL asked with N pins at once is N transfers).
    /// - The entry is pinned (kept from eviction) while its fill is in flight; a caller that
    ///   finds it evicted before it could open it tries again.
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
        for _ in 0..MAX_ATTEMPTS {
            // 1. A fresh entry that satisfies the request is a hit.
            let seen = match self.lookup(request).await? {
                Lookup::Fresh(download) => return Ok(*download),
                seen => seen,
            };
            // 2. Join the fill of this URL and pin, or start one (it revalidates a stale entry).
            let mut joined = self.fill(request, &seen, fetcher)?;
            let finished = joined.finished().await.map_err(|e| Error::from_fill(request.url(), e))?;
            if let Some(cause) = finished.uncached() {
                // Verified, but not stored: say why, rather than look for an entry that is
                // not there (or find a stale one).
                return Err(Error::from_fill(request.url(), cause.clone()));
            }
            let source = joined.started().await.map_or(Source::Fetched, |started| started.head().source());
            // 3. Open what the fill stored. A fill's answer is served even if already stale
            //    (with a freshness of zero it always is).
            let key = request.url().as_str();
            let entry = match finished.stored() {
                Some(stored) => self.inner.cache.open_stored(key, stored).await?,
                None => self.inner.cache.open_entry(key).await?,
            };
            if let Some(entry) = entry
                && let Some(info) = DownloadInfo::from_entry(&entry.info)
                && info.satisfies(request)
            {
                return Ok(Download { file: entry.file, info, source });
            }
            // Removed (or replaced by content we cannot serve) meanwhile: try again.
        }
        Err(Error::Vanished { url: request.url().redacted() })
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
            Some(info) => Ok(Lookup::Cached(Box::new(info))),
            // Not a download record (never written by this crate): fetched whole.
            None => Ok(Lookup::Missing),
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
